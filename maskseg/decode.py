"""ImageRef -> upright RGB uint8 array, or a DecodeError naming the reason.

Decoding uses Pillow rather than OpenCV: Pillow reads the header first (so the pixel-count guard runs
before any pixel is decoded), raises on truncated data where OpenCV silently fills grey, and decodes by
content from bytes we read ourselves (OpenCV's path functions can crash on non-UTF-8 names).
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass

import numpy as np

from .config import DEFAULT_MAX_PIXELS, MAX_FILE_BYTES
from .errors import DecodeError, UndecodableError
from .sources import ImageRef


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``rgb`` is [H, W, 3] uint8, upright (EXIF orientation applied).

    ``size``/``mtime_ns`` describe the bytes actually decoded (they may differ from the scan's when
    the file changed in between), and are what the journal records.
    """

    ref: ImageRef
    rgb: np.ndarray
    size: int
    mtime_ns: int

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def read_file_bytes(path: str) -> tuple[bytes, os.stat_result]:
    """Read a regular file whole without ever blocking on a FIFO or device.

    Raises ``DecodeError`` when the path is not a regular file, vanished, is unreadable, is larger
    than ``MAX_FILE_BYTES`` or changed while being read. A path that is not a regular file when looked
    at is never opened (opening a device can act on it); one swapped for a FIFO after that look is
    opened without blocking and refused.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DecodeError(path, "not a regular file; not opened")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DecodeError(path, "file vanished before it could be read") from None
    except PermissionError:
        raise DecodeError(path, "permission denied") from None
    except OSError as exc:
        raise DecodeError(path, f"cannot open: {exc.strerror}") from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise DecodeError(path, "not a regular file; not read")
        if before.st_size > MAX_FILE_BYTES:
            raise DecodeError(path, f"file is {before.st_size:,} bytes, over the {MAX_FILE_BYTES:,} limit")
        chunks = []
        remaining = before.st_size + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        after = os.fstat(fd)
    except OSError as exc:
        raise DecodeError(path, f"read failed: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) != after.st_size or after.st_mtime_ns != before.st_mtime_ns:
        raise DecodeError(path, "file changed while being read (still being written?); retried next run")
    return data, after


def decode_image(ref: ImageRef, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read and decode one image (a file, or an object when ``ref.etag`` is set: read from object
    storage by whoever calls this); see ``decode_bytes`` for the conversions."""
    if ref.etag is not None:
        from .objects import read_object

        data, info = read_object(ref.path, ref.etag)
        size, mtime_ns = info.size, info.mtime_ns
    else:
        data, st = read_file_bytes(ref.path)
        size, mtime_ns = st.st_size, st.st_mtime_ns
    try:
        rgb = decode_bytes(data, ref.path, max_pixels=max_pixels)
    except DecodeError as exc:
        raise UndecodableError(ref.path, exc.reason, size, mtime_ns) from None
    return DecodedImage(ref, rgb, size, mtime_ns)


def decode_bytes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes by content into an upright [H, W, 3] uint8 RGB array.

    The first frame of multi-frame files is used. 16-bit data keeps its top 8 bits; alpha is dropped;
    gray, palette and CMYK are converted to RGB. ``name`` is only used in error messages.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise DecodeError(name, "empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise DecodeError(name, f"declares more than {limit:,} pixels (Pillow's decompression-bomb limit); "
                                "refused before decoding") from None
    except UnidentifiedImageError:
        raise DecodeError(name, f"not an image (unrecognised content, starts with {data[:8]!r})") from None
    except Exception as exc:
        raise DecodeError(name, f"unreadable header: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise DecodeError(
            name, f"{width}x{height} = {width * height:,} pixels, over the --max-pixels limit of {max_pixels:,}; "
                  "refused before decoding"
        )
    if width < 1 or height < 1:
        raise DecodeError(name, f"image has no pixels ({width}x{height})")
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except DecodeError:
        raise
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = "truncated or corrupt image data (" + reason + ")"
        raise DecodeError(name, f"cannot decode {img.format or 'image'}: {reason}") from None


def _to_rgb(img) -> np.ndarray:  # img: PIL.Image.Image
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            gray = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            gray = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8, order="C")
