"""Tiled TIFFs (and BigTIFFs, and TIFFs in small strips) read by region, for sliced inference.

With ``--tile``, a TIFF whose first page is stored in tiles or strips of at most
``REGION_MAX_BLOCK_PIXELS`` is not decoded whole: ``open_tiff_regions`` reads its header and returns a
``TiffRegions``, which the tiler indexes like an array (``img[y0:y1, x0:x1]``) and which decodes only
the TIFF tiles (or strips) under each rectangle, with tifffile's per-segment decoder (any compression
tifffile decodes: none, deflate, PackBits, LZMA; JPEG, LZW, zstd, WebP... when imagecodecs is
installed). Memory is bounded by the model tiles in flight and a small cache of decoded TIFF tiles
(``REGION_CACHE_BYTES``), not by the image; ``--tile-full`` downscales strip by strip (from a
reduced-resolution level of the file when it has one). 16-bit pixels go through the same ``--uint16``
conversion as a whole decode, with statistics gathered over the whole image tile by tile first.

What is not read by region is decoded whole as before (and held to ``--max-pixels``): an Orientation
tag other than 1 (top-left), colour other than gray or RGB (palette, YCbCr, CMYK, min-is-white),
separate colour planes, other than 8 or 16 bits per sample, blocks over ``REGION_MAX_BLOCK_PIXELS``
(a TIFF in one strip), data tifffile cannot decode, objects in object storage; the reason is logged.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import DEFAULT_MAX_PIXELS, DEFAULT_UINT16, REGION_CACHE_BYTES, REGION_MAX_BLOCK_PIXELS
from .decode import DecodedImage, Uint16Scale, decode_image, uint16_scale
from .errors import DecodeError
from .sources import ImageRef

log = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
_JPEG = frozenset({6, 7, 33007, 34892})  # compressions whose segments need the JPEGTables tag


def decode_for_tiling(ref: ImageRef, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                      uint16: str = DEFAULT_UINT16) -> DecodedImage:
    """``decode_image`` for a tiled run: a local TIFF that can be read by region comes back with a
    ``TiffRegions`` as its pixels (only its header read; not held to ``max_pixels`` nor to the file
    size limit, since it is never decoded whole), anything else decoded whole by ``decode_image``."""
    if ref.etag is None and is_tiff_file(ref.path):
        try:
            regions = open_tiff_regions(ref.path, uint16=uint16,
                                        max_block_pixels=min(max_pixels, REGION_MAX_BLOCK_PIXELS))
        except DecodeError:
            regions = None  # the whole decode reports what is wrong with the file
        if regions is not None:
            return DecodedImage(ref, regions, regions.file_size, regions.mtime_ns)
    return decode_image(ref, max_pixels=max_pixels, uint16=uint16)


def is_tiff_file(path: str) -> bool:
    """Whether ``path`` is a regular file that starts like a TIFF or BigTIFF (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 4, 0) in _TIFF_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Level:
    """One TIFF page read block by block: its size, its blocks (tiles, or strips as full-width tiles) and
    tifffile's decoder for them. ``page`` is a ``tifffile.TiffPage`` whose file is closed again (its
    decoder needs only each block's bytes)."""

    page: Any
    height: int
    width: int
    block_h: int
    block_w: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    channels: int  # 1 (gray) or 3 (RGB): what is kept of the decoded samples

    @property
    def across(self) -> int:
        return math.ceil(self.width / self.block_w)

    @property
    def down(self) -> int:
        return math.ceil(self.height / self.block_h)


class TiffRegions:
    """An upright [H, W, 3] uint8 RGB image read from a TIFF by region, indexed like a numpy array.

    ``img[y0:y1, x0:x1]`` decodes only the blocks under that rectangle and returns a new [h, w, 3]
    uint8 array; ``downscaled(h, w)`` gives the whole image at a smaller size (area average, as
    ``cv2.resize(..., INTER_AREA)``); ``np.asarray(img)`` decodes it whole (the cost a whole-image
    consumer pays). Each read opens the file, checks that it is the file that was opened (size and
    mtime) and reads the blocks it needs with ``os.pread``; safe to use from several threads.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: str, levels: list[_Level], scale: Uint16Scale | None, file_size: int, mtime_ns: int,
                 *, cache_bytes: int = REGION_CACHE_BYTES) -> None:
        self.path = path
        self.levels = levels  # levels[0]: the image; then reduced-resolution levels, largest first
        self.scale = scale  # 16-bit data: how it becomes 8-bit (whole-image statistics); None for 8-bit
        self.file_size = file_size
        self.mtime_ns = mtime_ns
        self.shape = (levels[0].height, levels[0].width, 3)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TiffRegions({self.path!r}, {self.shape[1]}x{self.shape[0]}, levels={len(self.levels)})"

    def __getitem__(self, key: Any) -> np.ndarray:
        """``img[y0:y1, x0:x1]`` (optionally ``, :``): slices with step 1 only."""
        if not isinstance(key, tuple) or len(key) not in (2, 3) or not all(isinstance(k, slice) for k in key):
            raise TypeError(f"{self!r}: index with two slices, img[y0:y1, x0:x1]")
        (y0, y1, sy), (x0, x1, sx) = key[0].indices(self.shape[0]), key[1].indices(self.shape[1])
        if sy != 1 or sx != 1 or (len(key) == 3 and key[2] != slice(None)):
            raise TypeError(f"{self!r}: only img[y0:y1, x0:x1] is read by region")
        return self.read(y0, max(y0, y1), x0, max(x0, x1))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        log.debug("%s: decoded whole", self.path)
        arr = self.read(0, self.shape[0], 0, self.shape[1])
        return arr if dtype is None else arr.astype(dtype)

    def read(self, y0: int, y1: int, x0: int, x1: int, *, level: int = 0) -> np.ndarray:
        """Rows ``y0:y1``, columns ``x0:x1`` of ``levels[level]`` as [y1-y0, x1-x0, 3] uint8 RGB."""
        lv = self.levels[level]
        raw = np.zeros((y1 - y0, x1 - x0, lv.channels), lv.page.dtype)
        if y1 > y0 and x1 > x0:
            fd = self._open()
            try:
                for by in range(y0 // lv.block_h, (y1 - 1) // lv.block_h + 1):
                    for bx in range(x0 // lv.block_w, (x1 - 1) // lv.block_w + 1):
                        block = self._block(fd, level, by * lv.across + bx)
                        top, left = by * lv.block_h, bx * lv.block_w
                        ya, yb = max(y0, top), min(y1, top + block.shape[0])
                        xa, xb = max(x0, left), min(x1, left + block.shape[1])
                        raw[ya - y0 : yb - y0, xa - x0 : xb - x0] = block[ya - top : yb - top, xa - left : xb - left]
            finally:
                os.close(fd)
        return _to_rgb8(raw, self.scale)

    def rows(self, step: int, *, level: int = 0) -> Iterator[np.ndarray]:
        """``levels[level]`` top to bottom in bands of ``step`` rows, each [rows, W, 3] uint8."""
        lv = self.levels[level]
        for y in range(0, lv.height, step):
            yield self.read(y, min(lv.height, y + step), 0, lv.width, level=level)

    def downscaled(self, height: int, width: int) -> np.ndarray:
        """The image resized to [height, width, 3] uint8 by area averaging, never decoded whole: from the
        smallest reduced-resolution level at least that large when the file has one, else from the
        image itself strip by strip (then equal to ``cv2.resize(whole, (width, height), INTER_AREA)``)."""
        level = max(i for i, lv in enumerate(self.levels) if lv.height >= height and lv.width >= width)
        lv = self.levels[level]
        step = max(lv.block_h, (1 << 22) // max(1, lv.width) // lv.block_h * lv.block_h)
        return area_downscale(self.rows(step, level=level), lv.height, lv.width, height, width)

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise DecodeError(self.path, f"cannot open: {exc.strerror}") from None
        st = os.fstat(fd)
        if st.st_size != self.file_size or st.st_mtime_ns != self.mtime_ns:
            os.close(fd)
            raise DecodeError(self.path, "file changed while being read (still being written?); retried next run")
        return fd

    def _block(self, fd: int, level: int, index: int) -> np.ndarray:
        """Block ``index`` of a level, decoded, cut to the image and to the kept channels (cached)."""
        key = (level, index)
        with self._lock:
            block = self._cache.get(key)
            if block is not None:
                self._cache.move_to_end(key)
                return block
        block = _decode_block(self.levels[level], index, fd, self.path)
        with self._lock:
            if key not in self._cache and block.nbytes <= self._cache_bytes:
                self._cache[key] = block
                self._cached += block.nbytes
                while self._cached > self._cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
        return block


def _decode_block(lv: _Level, index: int, fd: int, path: str) -> np.ndarray:
    """[h, w, channels] pixels of block ``index`` (in the page's dtype), cut to the image's edge."""
    count = lv.counts[index]
    try:
        data = os.pread(fd, count, lv.offsets[index]) if count else None
    except OSError as exc:
        raise DecodeError(path, f"read failed: {exc.strerror}") from None
    if data is not None and len(data) != count:
        raise DecodeError(path, f"truncated TIFF: block {index} ends past the end of the file")
    kwargs = {}
    if lv.page.compression in _JPEG:
        kwargs = {"jpegtables": lv.page.jpegtables, "jpegheader": lv.page.jpegheader}
    try:
        segment, _, shape = lv.page.decode(data, index, **kwargs)
    except Exception as exc:
        raise DecodeError(path, f"cannot decode TIFF block {index}: {exc}") from None
    by, bx = divmod(index, lv.across)
    h = min(lv.block_h, lv.height - by * lv.block_h)
    w = min(lv.block_w, lv.width - bx * lv.block_w)
    if segment is None:  # an empty block (no bytes): TIFF's fill value, 0
        return np.zeros((h, w, lv.channels), lv.page.dtype)
    # a copy where cut (edge tiles are padded, alpha dropped), so the cache holds only what it counts
    return np.ascontiguousarray(segment.reshape(shape[1:])[:h, :w, : lv.channels])


def _to_rgb8(raw: np.ndarray, scale: Uint16Scale | None) -> np.ndarray:
    """[h, w, 1 or 3] uint8/uint16 -> [h, w, 3] uint8, as ``maskseg.decode`` converts a whole image."""
    if raw.dtype == np.uint16:
        raw = (scale or Uint16Scale()).apply(raw)
    if raw.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(raw, 3, axis=2))
    return np.ascontiguousarray(raw)


def open_tiff_regions(path: str, *, uint16: str = DEFAULT_UINT16,
                      max_block_pixels: int = REGION_MAX_BLOCK_PIXELS) -> TiffRegions | None:
    """A ``TiffRegions`` over the first page of the TIFF at ``path``, or None (the reason logged) when
    it cannot be read by region and must be decoded whole. 16-bit data in ``range`` or ``percentile``
    mode is read once here, tile by tile, for the whole image's statistics."""
    import tifffile

    try:
        st = os.stat(path)
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            reason = _unsupported(page, max_block_pixels)
            pixels = int(page.imagelength) * int(page.imagewidth)
            if reason is not None:
                _decoded_whole(path, reason, pixels)
                return None
            levels = [_level(page)]
            levels += _reduced_levels(tif, page, max_block_pixels)
    except (OSError, tifffile.TiffFileError, ValueError, KeyError, IndexError) as exc:
        _decoded_whole(path, str(exc), 0)
        return None
    regions = TiffRegions(path, levels, None, st.st_size, st.st_mtime_ns)
    try:
        fd = regions._open()
        try:
            _decode_block(levels[0], 0, fd, path)  # a compression tifffile cannot decode shows here
        finally:
            os.close(fd)
    except DecodeError as exc:
        _decoded_whole(path, exc.reason, pixels)
        return None
    if page.dtype == np.uint16:
        regions.scale = _uint16_scale_of(regions, uint16)
    log.debug("%s: read by region (%dx%d, blocks of %dx%d, %d levels)", path, levels[0].width, levels[0].height,
              levels[0].block_w, levels[0].block_h, len(levels))
    return regions


def _decoded_whole(path: str, reason: str, pixels: int) -> None:
    """Say why a TIFF is decoded whole: at INFO for a large one (where memory is at stake), else DEBUG."""
    level = logging.INFO if pixels > REGION_MAX_BLOCK_PIXELS else logging.DEBUG
    log.log(level, "%s: decoded whole, not read by region: %s", path, reason)


def _unsupported(page: Any, max_block_pixels: int) -> str | None:
    """Why a tifffile page cannot be read by region here, or None."""
    orientation = page.tags.get(274)
    if orientation is not None and orientation.value != 1:
        return f"Orientation tag {orientation.value} (only 1, top-left, is read by region)"
    if int(page.photometric) not in (1, 2):  # MINISBLACK, RGB
        return f"photometric {page.photometric.name} (gray or RGB are read by region)"
    if page.bitspersample not in (8, 16) or int(page.sampleformat) != 1:
        return f"{page.bitspersample}-bit samples of format {int(page.sampleformat)} (8- or 16-bit unsigned are)"
    if page.samplesperpixel > 1 and int(page.planarconfig) != 1:
        return "separate colour planes"
    if page.imagedepth > 1 or len(page.shaped) != 5 or page.shaped[0] != 1:
        return "volume or multi-plane data"
    if int(page.photometric) == 2 and page.samplesperpixel < 3:
        return f"RGB with {page.samplesperpixel} samples per pixel"
    block_h, block_w = _block_size(page)
    if block_h * block_w > max_block_pixels:
        kind = "tiles" if page.is_tiled else "strips"
        return f"its {kind} are {block_w}x{block_h} pixels, over {max_block_pixels:,}"
    if len(page.dataoffsets) != math.ceil(page.imagelength / block_h) * math.ceil(page.imagewidth / block_w):
        return "block count does not match its size"
    return None


def _block_size(page: Any) -> tuple[int, int]:
    if page.is_tiled:
        return int(page.tilelength), int(page.tilewidth)
    return min(int(page.rowsperstrip), int(page.imagelength)), int(page.imagewidth)


def _level(page: Any) -> _Level:
    block_h, block_w = _block_size(page)
    return _Level(page, int(page.imagelength), int(page.imagewidth), block_h, block_w,
                  tuple(int(o) for o in page.dataoffsets), tuple(int(c) for c in page.databytecounts),
                  1 if int(page.photometric) == 1 else 3)


def _reduced_levels(tif: Any, page: Any, max_block_pixels: int) -> list[_Level]:
    """The file's reduced-resolution levels of ``page`` (SubIFDs, or a pyramid series), largest first,
    those that are read the same way and keep the image's aspect (within a pixel)."""
    try:
        series = tif.series[0]
        if series.keyframe.offset != page.offset:
            return []
        pages = [lv.keyframe for lv in series.levels[1:]]
    except Exception:  # no usable series: the image alone
        return []
    out = []
    for p in pages:
        if (p.dtype != page.dtype or int(p.photometric) != int(page.photometric)
                or p.samplesperpixel != page.samplesperpixel or _unsupported(p, max_block_pixels) is not None):
            continue
        h, w = int(p.imagelength), int(p.imagewidth)
        if abs(h * page.imagewidth / page.imagelength - w) > 1.5 or h >= page.imagelength:
            continue
        out.append(_level(p))
    return sorted(out, key=lambda lv: -lv.height)


def _uint16_scale_of(regions: TiffRegions, mode: str) -> Uint16Scale:
    """Whole-image statistics of 16-bit data, gathered block by block (``maskseg.decode.uint16_scale``)."""
    if mode == "shift":
        return uint16_scale(mode)
    lv = regions.levels[0]
    top = 0
    hist = np.zeros(65536, np.int64) if mode == "percentile" else None
    fd = regions._open()
    try:
        for index in range(len(lv.offsets)):
            block = _decode_block(lv, index, fd, regions.path)
            if hist is not None:
                hist += np.bincount(block.reshape(-1), minlength=65536)
            elif block.size:
                top = max(top, int(block.max()))
    finally:
        os.close(fd)
    return uint16_scale(mode, top=top, histogram=hist)


def area_downscale(strips: Iterable[np.ndarray], height: int, width: int, out_h: int, out_w: int) -> np.ndarray:
    """An image given as consecutive bands of rows (each [rows, width, C] uint8, ``height`` rows in all)
    resized to [out_h, out_w, C] uint8 by area averaging, one band at a time.

    Equal to ``cv2.resize(whole, (out_w, out_h), interpolation=cv2.INTER_AREA)`` (a downscale on both
    axes): where both ratios are whole numbers each band is resized by OpenCV itself (its blocks never
    straddle bands whose height is a multiple of the ratio); otherwise each row is averaged across and
    the rows summed down with the weights OpenCV's general area resize computes, in its order and float32
    precision (``_area_weights``). Written here because OpenCV's resize needs the whole image in memory.
    """
    fy, fx = height / out_h, width / out_w
    if fy == int(fy) and fx == int(fx):
        return _area_downscale_whole_ratio(strips, int(fy), out_h, out_w)
    taps = _taps(_area_weights(width, out_w), out_w)
    weights = iter(_area_weights(height, out_h))
    pending = next(weights, None)
    out: np.ndarray | None = None
    acc: np.ndarray | None = None
    prev = y = 0
    for strip in strips:
        if strip.ndim == 2:
            strip = strip[:, :, None]
        across = np.zeros((strip.shape[0], out_w, strip.shape[2]), np.float32)
        for index, alpha in taps:  # OpenCV's first pass: buf[dx] += src[sx] * alpha, in table order
            across += strip[:, index] * alpha[None, :, None]
        if out is None:
            out = np.zeros((out_h, out_w, strip.shape[2]), np.uint8)
        while pending is not None and pending[1] < y + strip.shape[0]:
            dy, sy, beta = pending
            row = beta * across[sy - y]
            if acc is None or dy != prev:
                if acc is not None:
                    out[prev] = np.clip(np.rint(acc), 0, 255)
                acc, prev = row, dy
            else:
                acc += row
            pending = next(weights, None)
        y += strip.shape[0]
    if out is None or acc is None:
        raise ValueError("area_downscale: no rows")
    out[prev] = np.clip(np.rint(acc), 0, 255)
    return out


def _taps(table: list[tuple[int, int, np.float32]], out: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """An area table as taps: tap t holds each output's t-th (input index, weight), weight 0 where an
    output has fewer inputs (adding 0.0 leaves a float sum unchanged), so the sums run in table order."""
    per: list[list[tuple[int, np.float32]]] = [[] for _ in range(out)]
    for d, s, w in table:
        per[d].append((s, w))
    taps = []
    for t in range(max(len(p) for p in per)):
        index = np.array([p[t][0] if t < len(p) else 0 for p in per], np.intp)
        alpha = np.array([p[t][1] if t < len(p) else 0.0 for p in per], np.float32)
        taps.append((index, alpha))
    return taps


def _area_downscale_whole_ratio(strips: Iterable[np.ndarray], ratio: int, out_h: int, out_w: int) -> np.ndarray:
    """``area_downscale`` when both ratios are whole numbers: OpenCV on bands of ``ratio``-row multiples."""
    import cv2

    out: np.ndarray | None = None
    carry: np.ndarray | None = None
    y = 0
    for strip in strips:
        band = strip if carry is None else np.concatenate([carry, strip])
        usable = band.shape[0] // ratio * ratio
        carry = band[usable:] if usable < band.shape[0] else None
        if usable:
            small = cv2.resize(band[:usable], (out_w, usable // ratio), interpolation=cv2.INTER_AREA)
            small = small.reshape(usable // ratio, out_w, -1)
            if out is None:
                out = np.zeros((out_h, out_w, small.shape[2]), np.uint8)
            out[y : y + small.shape[0]] = small
            y += small.shape[0]
    if out is None:
        raise ValueError("area_downscale: no rows")
    return out


def _area_weights(size: int, out: int) -> list[tuple[int, int, np.float32]]:
    """(output index, input index, weight) of an area resize from ``size`` to ``out`` along one axis, as
    OpenCV's ``computeResizeAreaTab`` makes them (same double arithmetic, weights rounded to float32)."""
    scale = 1.0 / (out / size)
    tab = []
    for d in range(out):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, size - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, size - 1)
        s1 = min(s1, s2)
        if s1 - f1 > 1e-3:
            tab.append((d, s1 - 1, np.float32((s1 - f1) / cell)))
        for s in range(s1, s2):
            tab.append((d, s, np.float32(1.0 / cell)))
        if f2 - s2 > 1e-3:
            tab.append((d, s2, np.float32(min(min(f2 - s2, 1.0), cell) / cell)))
    return tab
