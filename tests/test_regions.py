"""Tiled TIFFs read by region: the same pixels as a whole decode (any window, 8/16-bit, gray/RGB, BigTIFF,
strips), the cases decoded whole instead, the --max-pixels rule, the strip-by-strip downscale (and a
pyramid level), and tiled prediction with a real (tiny) model giving exactly what a whole decode gives.
Files are written by tifffile itself."""

from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest
import tifffile

from maskseg.config import ModelConfig, TileConfig
from maskseg.decode import decode_image
from maskseg.detections import BoxMask, Detections
from maskseg.errors import DecodeError, UndecodableError
from maskseg.regions import TiffRegions, area_downscale, decode_for_tiling, open_tiff_regions
from maskseg.sources import ImageRef
from maskseg.tiling import TiledSegmenter
from maskseg.writers.overlay import downscale_region

from .conftest import SAMPLES


def _ref(path) -> ImageRef:
    st = os.stat(path)
    return ImageRef(os.fspath(path), os.path.basename(path), "x", st.st_size, st.st_mtime_ns)


def _picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """[h, w, 3] uint8: smooth noise, so neighbouring pixels differ and every tile is different."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), np.uint8), (0, 0), 2)


def _photos(h: int, w: int) -> np.ndarray:
    """[h, w, 3] uint8 RGB made of real photos (fruits_nuts) side by side, for a model to find things in."""
    tiles = [cv2.imread(str(SAMPLES / "fruits_nuts" / f"{n}.jpg"))[:, :, ::-1] for n in (6, 7, 8, 9)]
    row = np.hstack(tiles * 2)
    return np.ascontiguousarray(np.vstack([row] * 3)[:h, :w])


A8 = _picture(1000, 1200)
A16 = (A8.astype(np.uint16) * 16 + np.random.default_rng(1).integers(0, 16, A8.shape)).astype(np.uint16)  # 12-bit
FORMATS = {
    "rgb8 tiled deflate": (A8, {"tile": (256, 256), "compression": "zlib", "photometric": "rgb"}),
    "rgb8 BigTIFF": (A8, {"tile": (256, 256), "bigtiff": True, "photometric": "rgb"}),
    "rgb8 strips": (A8, {"rowsperstrip": 48, "compression": "zlib", "photometric": "rgb"}),
    "rgb8 tiled lzma": (A8, {"tile": (128, 192), "compression": "lzma", "photometric": "rgb"}),
    "rgba8 tiled": (np.dstack([A8, A8[:, :, :1]]), {"tile": (256, 256), "compression": "zlib", "photometric": "rgb",
                                                    "extrasamples": [2]}),
    "gray8 tiled": (A8[:, :, 0], {"tile": (256, 256), "compression": "zlib", "photometric": "minisblack"}),
    "rgb16 tiled": (A16, {"tile": (256, 256), "compression": "zlib", "photometric": "rgb"}),
    "gray16 tiled": (A16[:, :, 1], {"tile": (256, 256), "compression": "zlib", "photometric": "minisblack"}),
    "rgb16 big-endian": (A16, {"tile": (64, 128), "byteorder": ">", "photometric": "rgb"}),
}


@pytest.mark.parametrize("name,uint16", [(name, mode) for name, (arr, _) in FORMATS.items()
                                         for mode in (("range", "shift", "percentile") if arr.dtype == np.uint16
                                                      else ("range",))])
def test_region_reads_give_the_pixels_of_a_whole_decode(tmp_path, name, uint16):
    arr, kwargs = FORMATS[name]
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, arr, **kwargs)
    regions = open_tiff_regions(str(path), uint16=uint16)
    assert isinstance(regions, TiffRegions) and regions.shape == (1000, 1200, 3)
    whole = decode_image(_ref(path), uint16=uint16).rgb  # Pillow, or OpenCV for 16-bit colour
    np.testing.assert_array_equal(np.asarray(regions), whole)
    rng = np.random.default_rng(2)
    windows = [(0, 1000, 0, 1200), (250, 262, 250, 262), (255, 257, 0, 1200), (700, 1000, 1000, 1200),
               (999, 1000, 1199, 1200), (0, 1, 0, 1)]  # tile borders, the image's last row and column
    for _ in range(30):
        y0, x0 = int(rng.integers(0, 1000)), int(rng.integers(0, 1200))
        windows.append((y0, int(rng.integers(y0 + 1, 1001)), x0, int(rng.integers(x0 + 1, 1201))))
    for y0, y1, x0, x1 in windows:
        got = regions[y0:y1, x0:x1]
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, whole[y0:y1, x0:x1], err_msg=f"window y {y0}:{y1}, x {x0}:{x1}")
    np.testing.assert_array_equal(regions[-10:, :], whole[-10:])


def test_only_the_blocks_under_a_window_are_decoded(tmp_path, monkeypatch):
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, A8, tile=(256, 256), compression="zlib", photometric="rgb")
    regions = open_tiff_regions(str(path))
    import maskseg.regions as mod

    seen: list[int] = []
    real = mod._decode_block
    monkeypatch.setattr(mod, "_decode_block", lambda lv, i, fd, p: seen.append(i) or real(lv, i, fd, p))
    regions[300:600, 300:600]  # blocks (1,1), (1,2), (2,1), (2,2) of a 5-wide grid
    assert sorted(seen) == [6, 7, 11, 12]
    regions[300:400, 300:400]  # cached
    assert sorted(seen) == [6, 7, 11, 12]


def test_tiffs_that_are_decoded_whole_instead(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="maskseg.regions")
    turned = tmp_path / "turned.tif"
    tifffile.imwrite(turned, A8, tile=(256, 256), photometric="rgb", extratags=[(274, 3, 1, 6, True)])
    palette = tmp_path / "palette.tif"
    colormap = np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1))
    tifffile.imwrite(palette, A8[:, :, 0], tile=(256, 256), photometric="palette", colormap=colormap)
    one_strip = tmp_path / "one_strip.tif"
    tifffile.imwrite(one_strip, A8, photometric="rgb", rowsperstrip=1000)
    planes = tmp_path / "planes.tif"
    tifffile.imwrite(planes, np.moveaxis(A8, 2, 0), tile=(256, 256), photometric="rgb", planarconfig="separate")
    for path, why in [(turned, "Orientation tag 6"), (palette, "PALETTE"), (one_strip, "strips are 1200x1000"),
                      (planes, "separate colour planes")]:
        caplog.clear()
        assert open_tiff_regions(str(path), max_block_pixels=1 << 20) is None
        assert why in caplog.text and "decoded whole" in caplog.text
    # and in a tiled run they are decoded whole: the Orientation tag applied as before
    image = decode_for_tiling(_ref(turned))
    assert isinstance(image.rgb, np.ndarray) and image.rgb.shape == (1200, 1000, 3)
    np.testing.assert_array_equal(image.rgb, np.rot90(A8, -1))


def test_max_pixels_holds_for_whole_decodes_not_for_region_reads(tmp_path):
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(tiled, A8, tile=(256, 256), compression="zlib", photometric="rgb")
    image = decode_for_tiling(_ref(tiled), max_pixels=500_000)  # 1.2 MP: read by region, not refused
    assert isinstance(image.rgb, TiffRegions)
    assert (image.size, image.mtime_ns) == (os.stat(tiled).st_size, os.stat(tiled).st_mtime_ns)
    one_strip = tmp_path / "one_strip.tif"
    tifffile.imwrite(one_strip, A8, photometric="rgb", rowsperstrip=1000)
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), A8)
    for path in (one_strip, png):
        with pytest.raises(UndecodableError, match="over the --max-pixels limit of 500,000"):
            decode_for_tiling(_ref(path), max_pixels=500_000)
    # a TIFF tile larger than --max-pixels is not read by region either
    with pytest.raises(UndecodableError, match="--max-pixels"):
        decode_for_tiling(_ref(tiled), max_pixels=50_000)


def test_a_file_changed_after_opening_is_refused(tmp_path):
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, A8, tile=(256, 256), photometric="rgb")
    regions = open_tiff_regions(str(path))
    tifffile.imwrite(path, A8[:500], tile=(256, 256), photometric="rgb")
    with pytest.raises(DecodeError, match="changed while being read"):
        regions[0:10, 0:10]


@pytest.mark.parametrize("size,out,step", [((2000, 1500), (1333, 1000), 64), ((1700, 2300), (985, 1333), 7),
                                           ((2666, 2666), (1333, 1333), 77), ((2000, 3999), (667, 1333), 256),
                                           ((300, 200), (3, 2), 300)])
def test_area_downscale_by_strips_equals_opencv_on_the_whole(size, out, step):
    img = _picture(*size, seed=3)
    want = cv2.resize(img, out[::-1], interpolation=cv2.INTER_AREA)
    got = area_downscale((img[y : y + step] for y in range(0, size[0], step)), *size, *out)
    np.testing.assert_array_equal(got, want)


def test_downscaled_reads_strips_or_the_pyramid_level(tmp_path):
    img = _picture(2000, 1500, seed=4)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, img, tile=(256, 256), compression="zlib", photometric="rgb")
    regions = open_tiff_regions(str(flat))
    np.testing.assert_array_equal(regions.downscaled(1333, 1000),
                                  cv2.resize(img, (1000, 1333), interpolation=cv2.INTER_AREA))
    # a pyramid (SubIFDs): the smallest level at least as large is read. Its pixels are made different
    # (a constant) to show which level was used.
    pyramid = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(pyramid) as tw:
        tw.write(img, tile=(256, 256), compression="zlib", photometric="rgb", subifds=2)
        tw.write(np.full((1000, 750, 3), 7, np.uint8), tile=(256, 256), photometric="rgb", subfiletype=1)
        tw.write(np.full((500, 375, 3), 9, np.uint8), tile=(256, 256), photometric="rgb", subfiletype=1)
    regions = open_tiff_regions(str(pyramid))
    assert [lv.height for lv in regions.levels] == [2000, 1000, 500]
    np.testing.assert_array_equal(np.asarray(regions), img)  # level 0 is the image
    assert (regions.downscaled(667, 500) == 7).all()
    assert (regions.downscaled(400, 300) == 9).all()
    np.testing.assert_array_equal(regions.downscaled(1333, 1000),
                                  cv2.resize(img, (1000, 1333), interpolation=cv2.INTER_AREA))


def test_overlay_of_a_region_image_is_drawn_downscaled(tmp_path):
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, A8, tile=(256, 256), photometric="rgb")
    regions = open_tiff_regions(str(path))
    dets = Detections(np.array([[100, 200, 300, 400]], np.float32), np.array([0.9], np.float32), np.array([1]),
                      (BoxMask(100, 200, np.ones((200, 200), bool), (1000, 1200)),), (1000, 1200))
    small, moved = downscale_region(regions, dets, 600)
    assert small.shape == (500, 600, 3) and moved.image_size == (500, 600)
    np.testing.assert_allclose(moved.boxes[0], [50, 100, 150, 200])
    assert moved.masks[0].bitmap.shape == (100, 100)
    whole, same = downscale_region(regions, dets, 4096)
    assert whole.shape == (1000, 1200, 3) and same is dets


def _same(a: Detections, b: Detections) -> None:
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.labels, b.labels)
    for m, n in zip(a.masks, b.masks, strict=True):
        assert (m.x0, m.y0) == (n.x0, n.y0)
        np.testing.assert_array_equal(m.bitmap, n.bitmap)


@pytest.fixture(scope="module")
def tiny_segmenter(tiny_checkpoint):
    from maskseg.segmenter import Segmenter

    return Segmenter(ModelConfig(weights=str(tiny_checkpoint), device="cpu", score_thresh=0.3))


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,uint16", [
    ("rgb8 tiled", {"tile": (256, 256), "compression": "zlib"}, None),
    ("rgb16 BigTIFF", {"tile": (128, 256), "compression": "zlib", "bigtiff": True}, "percentile"),
    ("rgb8 strips", {"rowsperstrip": 40, "compression": "zlib"}, None),
])
def test_tiled_prediction_over_regions_equals_a_whole_decode(tmp_path, tiny_segmenter, name, kwargs, uint16):
    rgb = _photos(1500, 2000)  # --tile-full downscales it (long side past 1333), by strips when read by region
    data = rgb if uint16 is None else rgb.astype(np.uint16) * 257
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, data, photometric="rgb", **kwargs)
    mode = uint16 or "range"
    regions = decode_for_tiling(_ref(path), uint16=mode).rgb
    whole = decode_image(_ref(path), uint16=mode).rgb
    assert isinstance(regions, TiffRegions) and isinstance(whole, np.ndarray)
    tiled = TiledSegmenter(tiny_segmenter, TileConfig(size=512, overlap=0.2, full=True), batch_size=2)
    [from_regions] = tiled([regions])
    [from_whole] = tiled([whole])
    _same(from_regions, from_whole)
    assert from_regions.boxes[:, 2].max() > 1000  # found in tiles far from the origin
