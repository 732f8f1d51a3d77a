"""ImageRef -> upright RGB uint8 array, or a DecodeError naming the reason.

Decoding uses Pillow rather than OpenCV: Pillow reads the header first (so the pixel-count guard runs
before any pixel is decoded), raises on truncated data where OpenCV silently fills grey, and decodes by
content from bytes we read ourselves (OpenCV's path functions can crash on non-UTF-8 names).
"""

from __future__ import annotations

import functools
import io
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .config import DEFAULT_MAX_PIXELS, DEFAULT_UINT16, MAX_FILE_BYTES, UINT16_MODES
from .errors import DecodeError, UndecodableError
from .sources import ImageRef

if TYPE_CHECKING:
    from .regions import TiffRegions


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``rgb`` is [H, W, 3] uint8, upright (EXIF orientation applied); in a tiled run a
    TIFF read by region (``maskseg.regions.TiffRegions``: indexed like the array, decoded by region).

    ``size``/``mtime_ns`` describe the bytes actually decoded (they may differ from the scan's when
    the file changed in between), and are what the journal records.
    """

    ref: ImageRef
    rgb: np.ndarray | TiffRegions
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


def decode_image(ref: ImageRef, *, max_pixels: int = DEFAULT_MAX_PIXELS, uint16: str = DEFAULT_UINT16) -> DecodedImage:
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
        rgb = decode_bytes(data, ref.path, max_pixels=max_pixels, uint16=uint16)
    except DecodeError as exc:
        raise UndecodableError(ref.path, exc.reason, size, mtime_ns) from None
    return DecodedImage(ref, rgb, size, mtime_ns)


def decode_bytes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 uint16: str = DEFAULT_UINT16) -> np.ndarray:
    """Decode image bytes by content into an upright [H, W, 3] uint8 RGB array.

    The first frame of multi-frame files is used. 16-bit data (gray, RGB; 12-bit data stored in 16)
    becomes 8-bit as ``uint16`` says (``to_uint8``); alpha is dropped; gray, palette and CMYK are
    converted to RGB. HEIC/HEIF is read when pillow-heif is installed. ``name`` is only used in error
    messages.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if uint16 not in UINT16_MODES:
        raise ValueError(f"uint16={uint16!r}: expected one of {', '.join(UINT16_MODES)}")
    _register_heif()

    if not data:
        raise DecodeError(name, "empty file (0 bytes)")
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # Pillow's own bomb check (a process-wide setting) would refuse what --max-pixels allows: a
        # larger --max-pixels is the user's explicit word, so Pillow's limit follows it (never lowered).
        Image.MAX_IMAGE_PIXELS = max_pixels
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
        if _is_rgb16(img):  # Pillow reads 16-bit colour as 8-bit (its top bits); OpenCV keeps all 16
            return _rgb16(data, name, uint16)
        img.load()
        # in place: the default returns a copy even when there is nothing to turn (1.2 GB at 20000 x 20000)
        img = ImageOps.exif_transpose(img, in_place=True) or img
        return _to_rgb(img, uint16)
    except DecodeError:
        raise
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = "truncated or corrupt image data (" + reason + ")"
        raise DecodeError(name, f"cannot decode {img.format or 'image'}: {reason}") from None


def _to_rgb(img, uint16: str = DEFAULT_UINT16) -> np.ndarray:  # img: PIL.Image.Image
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            gray = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            gray = to_uint8(np.clip(arr.astype(np.int64), 0, 65535).astype(np.uint16), uint16)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.width * img.height > STRIP_PIXELS:
        return _rgb_by_strips(img)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8, order="C")


# Images above this many pixels are converted a strip at a time, so that decoding one needs the decoded
# image and the array (2x its size), not also a converted copy and Pillow's bytes export (up to 4x:
# ``np.array(img)`` goes through ``img.tobytes()``). Strips of 1 MP (STRIP_ROWS_PIXELS) were no slower than
# the whole conversion (0.04-0.08 s against 0.08-0.10 s for a 4096 x 4096 JPEG) and spared a 48 MiB copy.
STRIP_PIXELS = 1 << 22
STRIP_ROWS_PIXELS = 1 << 20


def _rgb_by_strips(img) -> np.ndarray:  # img: PIL.Image.Image, loaded
    width, height = img.size
    out = np.empty((height, width, 3), np.uint8)
    step = max(1, STRIP_ROWS_PIXELS // width)
    for y in range(0, height, step):
        strip = img.crop((0, y, width, min(height, y + step)))
        if strip.mode != "RGB":
            strip = strip.convert("RGB")
        out[y : y + strip.height] = np.asarray(strip)
    return out


def image_to_rgb(img, uint16: str = DEFAULT_UINT16) -> np.ndarray:  # img: PIL.Image.Image
    """A loaded Pillow image (one page or frame) as [H, W, 3] uint8 RGB (EXIF orientation not applied)."""
    img.load()
    return _to_rgb(img, uint16)


def to_uint8(arr: np.ndarray, mode: str = DEFAULT_UINT16) -> np.ndarray:
    """16-bit pixels (any shape, uint16) -> uint8.

    ``shift``: the top 8 bits (x >> 8): right for data that uses all 16 bits, 1/16 as bright for
    12-bit data. ``range`` (the default): the top 8 bits *of the bit depth the data uses* (its largest
    value rounded up to 8, 10, 12, 14 or 16 bits): 12-bit data (x >> 4) fills the 8-bit range, data
    that uses all 16 bits comes out exactly as with ``shift``, and the scale steps only by whole bit
    depths, so a dark image is not stretched like a bright one. ``percentile``: the 0.5th..99.5th
    percentiles stretched to 0..255 (contrast-stretched per image, like microscopy viewers; changes
    the look of ordinary photos).
    """
    if mode == "shift":
        return Uint16Scale().apply(arr)
    if mode == "range":
        return uint16_scale(mode, top=int(arr.max()) if arr.size else 0).apply(arr)
    hist = np.bincount(arr.reshape(-1), minlength=65536) if arr.size else None
    return uint16_scale(mode, histogram=hist).apply(arr)


@dataclass(frozen=True)
class Uint16Scale:
    """How one image's 16-bit pixels become 8-bit: a right ``shift``, or (``lo`` set) ``lo..hi`` stretched
    to 0..255. Made from whole-image statistics (``uint16_scale``), so a region read by parts
    (``maskseg.regions``) converts exactly as the whole image would."""

    shift: int = 8
    lo: float | None = None
    hi: float = 0.0

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """uint16 pixels (any shape) -> uint8, same shape."""
        if self.lo is None:
            return (arr >> self.shift).astype(np.uint8)
        scale = 255.0 / max(self.hi - self.lo, 1.0)
        return np.clip((arr.astype(np.float32) - self.lo) * scale + 0.5, 0, 255).astype(np.uint8)


def uint16_scale(mode: str, *, top: int = 0, histogram: np.ndarray | None = None) -> Uint16Scale:
    """The ``Uint16Scale`` of ``mode`` (see ``to_uint8``) for an image whose largest value is ``top``
    (``range``) or whose 65536-bin value histogram is ``histogram`` (``percentile``; None: no pixels)."""
    if mode == "shift":
        return Uint16Scale()
    if mode == "range":
        bits = max(8, top.bit_length())
        return Uint16Scale(shift=min(16, bits + (bits % 2)) - 8)  # 8, 10, 12, 14 or 16 bits
    if histogram is None or not histogram.any():
        return Uint16Scale(lo=0.0, hi=1.0)
    lo, hi = histogram_percentiles(histogram, (0.5, 99.5))
    return Uint16Scale(lo=lo, hi=hi)


def histogram_percentiles(histogram: np.ndarray, percents: tuple[float, ...]) -> tuple[float, ...]:
    """Percentiles of the values a histogram counts (bin i = value i), interpolated linearly between
    order statistics as ``np.percentile`` does; counted from a histogram so that it can be summed over
    parts of an image."""
    cum = np.cumsum(histogram)
    n = int(cum[-1])

    def order_statistic(k: int) -> int:  # the k-th smallest value, 0-based
        return int(np.searchsorted(cum, k, side="right"))

    out = []
    for q in percents:
        at = q / 100.0 * (n - 1)
        k = int(np.floor(at))
        a, b = order_statistic(k), order_statistic(min(k + 1, n - 1))
        out.append(float(a + (b - a) * (at - k)))
    return tuple(out)


def _is_rgb16(img) -> bool:  # img: PIL.Image.Image, not loaded
    if img.mode not in ("RGB", "RGBA") or not img.tile:
        return False
    args = img.tile[0].args
    raw = args[0] if isinstance(args, tuple) else args
    return isinstance(raw, str) and ";16" in raw


def _rgb16(data: bytes, name: str, uint16: str) -> np.ndarray:
    """16-bit colour PNG/TIFF through OpenCV (BGR[A] uint16) -> RGB uint8 by ``uint16``."""
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.dtype != np.uint16:
        raise DecodeError(name, "cannot decode its 16-bit colour data")
    rgb = arr[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped
    return np.ascontiguousarray(to_uint8(rgb, uint16))


@functools.cache
def _register_heif() -> None:
    """Let Pillow open HEIC/HEIF (phone photos) when pillow-heif is installed; once per process."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()
