"""Multi-page TIFF -> one image per page (``--tiff-pages``), named ``scan.tif/p0001`` (1-based).

Without ``--tiff-pages`` a TIFF is one image, its first page, as any multi-frame file. Pages are
decoded one at a time from the file's bytes; a page that cannot be decoded ends the file with a
``Failure`` that says how many pages were read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import replace

from .batching import Failure
from .config import DEFAULT_MAX_PIXELS, DEFAULT_UINT16
from .decode import DecodedImage, image_to_rgb, read_file_bytes
from .errors import DecodeError
from .sources import ImageRef

TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})


def is_tiff_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in TIFF_EXTENSIONS


def page_ref(ref: ImageRef, number: int) -> ImageRef:
    """The ref of page ``number`` (1-based) of a TIFF."""
    return replace(ref, rel_path=f"{ref.rel_path}/p{number:04d}", out_stem=f"{ref.out_stem}/p{number:04d}")


def iter_pages(ref: ImageRef, *, max_pixels: int = DEFAULT_MAX_PIXELS, uint16: str = DEFAULT_UINT16,
               done: Callable[[ImageRef], bool] | None = None) -> Iterator[DecodedImage | Failure]:
    """Every page of a TIFF as its own image; a single-page TIFF keeps its own name."""
    from PIL import Image

    try:
        data, st = read_file_bytes(ref.path)
    except DecodeError as exc:
        yield Failure(ref, exc.reason)
        return
    try:
        img = Image.open(io.BytesIO(data))
        pages = int(getattr(img, "n_frames", 1))
    except Exception as exc:
        yield Failure(ref, f"cannot read as a TIFF: {exc}", st.st_size, st.st_mtime_ns)
        return
    if pages <= 1:
        from .decode import decode_image

        try:
            yield decode_image(ref, max_pixels=max_pixels, uint16=uint16)
        except DecodeError as exc:
            yield Failure(ref, exc.reason, st.st_size, st.st_mtime_ns)
        return
    for i in range(pages):
        pref = page_ref(ref, i + 1)
        if done is not None and done(pref):
            continue
        try:
            img.seek(i)
            w, h = img.size
            if w * h > max_pixels:
                raise ValueError(f"{w}x{h} = {w * h:,} pixels, over the --max-pixels limit of {max_pixels:,}")
            rgb = image_to_rgb(img, uint16)
        except Exception as exc:
            yield Failure(ref, f"page {i + 1} of {pages} cannot be decoded ({exc}); {i} pages read",
                          st.st_size, st.st_mtime_ns)
            return
        yield DecodedImage(pref, rgb, st.st_size, st.st_mtime_ns)
