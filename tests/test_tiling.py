"""Sliced inference: the tile grid, box-local merging of detections across tiles, and the wrapper that
sends tiles through a segmenter. Detections here are synthetic (no model): a fake segmenter that finds
bright blobs, so tiled and whole-image results can be compared pixel for pixel."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from maskseg.config import TileConfig, parse_tile
from maskseg.detections import BoxMask, Detections
from maskseg.errors import UsageError
from maskseg.tiling import Tile, TiledSegmenter, merge_tiles, tile_grid, tile_starts, union_mask, upscale


def _dets_from_full_masks(full_masks: list[np.ndarray], labels: list[int], scores: list[float]) -> Detections:
    """Detections with box-local masks cut from full-image masks (test helper only)."""
    size = full_masks[0].shape if full_masks else (1, 1)
    boxes, masks = [], []
    for m in full_masks:
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        boxes.append([x0, y0, x1, y1])
        masks.append(BoxMask(x0, y0, m[y0:y1, x0:x1].copy(), size))
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(labels, np.int64), tuple(masks), size)


def _crop(full: np.ndarray, t: Tile) -> np.ndarray:
    return full[t.y0 : t.y1, t.x0 : t.x1]


def _ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def test_tile_starts_cover_the_image_and_end_at_its_edge():
    assert tile_starts(100, 128, 0.2) == [0]
    assert tile_starts(230, 128, 0.2) == [0, 102]
    starts = tile_starts(1000, 256, 0.25)
    assert starts[0] == 0 and starts[-1] == 1000 - 256
    assert all(b - a <= 256 for a, b in itertools.pairwise(starts))  # no gaps
    grid = tile_grid(300, 500, 256, 0.2)
    assert all(t.x1 - t.x0 == 256 and t.y1 - t.y0 == 256 for t in grid)
    covered = np.zeros((300, 500), bool)
    for t in grid:
        covered[t.y0 : t.y1, t.x0 : t.x1] = True
    assert covered.all()


def test_object_cut_by_a_tile_edge_becomes_one_detection_with_the_union_mask():
    h, w = 100, 230
    obj = _ellipse(h, w, 130, 50, 70, 30)  # x 60..200: wider than the 26 px band the tiles share
    left, right = Tile(0, 0, 128, 100), Tile(102, 0, 230, 100)
    parts = [(left, _dets_from_full_masks([_crop(obj, left)], [2], [0.9])),
             (right, _dets_from_full_masks([_crop(obj, right)], [2], [0.7]))]
    merged = merge_tiles(parts, (h, w))
    assert len(merged) == 1
    assert merged.labels.tolist() == [2] and merged.scores[0] == pytest.approx(0.9)
    np.testing.assert_array_equal(merged.masks[0].full(), obj)
    ys, xs = np.nonzero(obj)
    np.testing.assert_allclose(merged.boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    # box-local: the merged mask covers the object's box, not the image
    assert merged.masks[0].bitmap.shape == (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)


def test_object_over_four_tiles_is_joined_once():
    h, w = 230, 230
    obj = _ellipse(h, w, 115, 115, 80, 80)
    tiles = tile_grid(h, w, 128, 0.2)
    assert len(tiles) == 4
    parts = [(t, _dets_from_full_masks([_crop(obj, t)], [1], [0.5 + 0.1 * k])) for k, t in enumerate(tiles)]
    merged = merge_tiles(parts, (h, w))
    assert len(merged) == 1
    np.testing.assert_array_equal(merged.masks[0].full(), obj)


def test_duplicate_whole_in_both_tiles_is_merged_and_keeps_the_higher_score():
    h, w = 100, 230
    obj = _ellipse(h, w, 115, 50, 8, 8)  # inside the shared band 102..128
    left, right = Tile(0, 0, 128, 100), Tile(102, 0, 230, 100)
    parts = [(left, _dets_from_full_masks([_crop(obj, left)], [3], [0.6])),
             (right, _dets_from_full_masks([_crop(obj, right)], [3], [0.8]))]
    merged = merge_tiles(parts, (h, w))
    assert len(merged) == 1 and merged.scores[0] == pytest.approx(0.8)
    np.testing.assert_array_equal(merged.masks[0].full(), obj)


def test_partial_copy_at_a_tile_edge_merges_into_the_whole_object_by_ios():
    h, w = 100, 230
    obj = _ellipse(h, w, 112, 50, 12, 12)  # whole in the left tile, cut by the right tile's left edge at 102
    left, right = Tile(0, 0, 128, 100), Tile(102, 0, 230, 100)
    parts = [(left, _dets_from_full_masks([_crop(obj, left)], [1], [0.9])),
             (right, _dets_from_full_masks([_crop(obj, right)], [1], [0.95]))]
    merged = merge_tiles(parts, (h, w))
    assert len(merged) == 1
    np.testing.assert_array_equal(merged.masks[0].full(), obj)


def test_neighbours_and_other_classes_are_not_merged():
    h, w = 100, 230
    a = _ellipse(h, w, 108, 30, 10, 10)
    b = _ellipse(h, w, 122, 70, 10, 10)  # close to a, not overlapping
    left, right = Tile(0, 0, 128, 100), Tile(102, 0, 230, 100)
    parts = [(left, _dets_from_full_masks([_crop(a, left), _crop(b, left)], [1, 1], [0.9, 0.8])),
             (right, _dets_from_full_masks([_crop(a, right)], [2], [0.7]))]  # same pixels, another class
    merged = merge_tiles(parts, (h, w))
    assert sorted(merged.labels.tolist()) == [1, 1, 2]


def test_low_scored_detection_spanning_two_neighbours_does_not_weld_them():
    h, w = 100, 230
    a = _ellipse(h, w, 40, 50, 12, 12)
    b = _ellipse(h, w, 68, 50, 12, 12)  # a's neighbour, 4 px apart: both whole inside the left tile
    span = _ellipse(h, w, 54, 50, 30, 14) | a | b  # the model's low-scored guess covering both
    left, right = Tile(0, 0, 128, 100), Tile(102, 0, 230, 100)
    parts = [(left, _dets_from_full_masks([_crop(a, left), _crop(b, left), _crop(span, left)], [1, 1, 1],
                                          [0.99, 0.98, 0.2])),
             (right, _dets_from_full_masks([], [], []))]
    merged = merge_tiles(parts, (h, w))
    assert merged.scores.tolist() == pytest.approx([0.99, 0.98, 0.2])  # a and b each stay themselves
    np.testing.assert_array_equal(merged.masks[0].full(), a)
    np.testing.assert_array_equal(merged.masks[1].full(), b)


def test_whole_duplicates_keep_the_best_mask_not_their_union():
    h, w = 100, 230
    obj = _ellipse(h, w, 115, 50, 8, 8)  # inside the shared band, whole in both tiles
    shifted = _ellipse(h, w, 116, 51, 8, 8)  # the other tile's view, 1 px off (IoU about 0.8)
    left, right = Tile(0, 0, 128, 100), Tile(102, 0, 230, 100)
    parts = [(left, _dets_from_full_masks([_crop(obj, left)], [1], [0.9])),
             (right, _dets_from_full_masks([_crop(shifted, right)], [1], [0.6]))]
    merged = merge_tiles(parts, (h, w))
    assert len(merged) == 1 and merged.scores[0] == pytest.approx(0.9)
    np.testing.assert_array_equal(merged.masks[0].full(), obj)


def test_kept_fragment_takes_the_whole_view_and_its_other_fragments():
    h, w = 100, 330
    obj = _ellipse(h, w, 112, 50, 12, 12)  # whole in the middle tile; cut by the left and right tiles' edges
    left, middle, right = Tile(0, 0, 110, 100), Tile(90, 0, 200, 100), Tile(110, 0, 330, 100)
    parts = [(left, _dets_from_full_masks([_crop(obj, left)], [1], [0.95])),  # fragment, scored highest
             (middle, _dets_from_full_masks([_crop(obj, middle)], [1], [0.9])),
             (right, _dets_from_full_masks([_crop(obj, right)], [1], [0.5]))]
    merged = merge_tiles(parts, (h, w))
    assert len(merged) == 1 and merged.scores[0] == pytest.approx(0.95)
    np.testing.assert_array_equal(merged.masks[0].full(), obj)


def test_box_only_detections_merge_too():
    left, right = Tile(0, 0, 128, 100), Tile(102, 0, 230, 100)
    d1 = Detections(np.array([[60, 10, 128, 50]], np.float32), np.array([0.9], np.float32),
                    np.array([1]), None, (100, 128))
    d2 = Detections(np.array([[0, 10, 98, 50]], np.float32), np.array([0.8], np.float32),
                    np.array([1]), None, (100, 128))
    merged = merge_tiles([(left, d1), (right, d2)], (100, 230))
    assert len(merged) == 1 and merged.masks is None
    np.testing.assert_allclose(merged.boxes[0], [60, 10, 200, 50])


def test_union_mask_is_box_local():
    a = BoxMask(10, 10, np.ones((5, 5), bool), (1000, 1000))
    b = BoxMask(12, 20, np.ones((3, 3), bool), (1000, 1000))
    u = union_mask([a, b], (1000, 1000))
    assert (u.x0, u.y0, u.bitmap.shape) == (10, 10, (13, 5))
    assert u.area == 25 + 9


class BlobSegmenter:
    """A fake segmenter: every 4-connected bright region is a detection of label 1 (score from its
    brightness), with its exact box-local mask. It records the image sizes it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def __call__(self, images):
        import cv2

        out = []
        for rgb in images:
            self.seen.append(rgb.shape[:2])
            fg = (rgb[:, :, 0] > 127).astype(np.uint8)
            n, lab, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=4)
            boxes, masks, scores = [], [], []
            for k in range(1, n):
                x, y, bw, bh, _ = stats[k]
                boxes.append([x, y, x + bw, y + bh])
                masks.append(BoxMask(int(x), int(y), lab[y : y + bh, x : x + bw] == k, rgb.shape[:2]))
                scores.append(float(rgb[y + bh // 2, x + bw // 2, 1]) / 255)
            out.append(Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                                  np.ones(len(scores), np.int64), tuple(masks), rgb.shape[:2]))
        return out


def _blob_image(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    rgb = np.zeros((h, w, 3), np.uint8)
    objs = []
    for _ in range(25):
        cx, cy = rng.uniform(20, w - 20), rng.uniform(20, h - 20)
        r = rng.uniform(5, 30)
        m = _ellipse(h, w, cx, cy, r, r * rng.uniform(0.5, 1.0))
        if any((m & o).any() or (np.roll(m, 1, 0) & o).any() or (np.roll(m, 1, 1) & o).any() for o in objs):
            continue  # keep blobs apart so connected components are the objects
        objs.append(m)
        rgb[m] = (255, 200, 0)
    return rgb, objs


@pytest.mark.parametrize("size,overlap", [(128, 0.2), (100, 0.3), (160, 0.0)])
def test_tiled_segmenter_finds_what_the_whole_image_gives(size, overlap):
    rgb, objs = _blob_image(300, 420)
    fake = BlobSegmenter()
    [whole] = fake([rgb])
    tiled = TiledSegmenter(fake, TileConfig(size=size, overlap=overlap), batch_size=3)
    [dets] = tiled([rgb])
    assert max(max(s) for s in fake.seen[1:]) <= size  # the model only ever saw tiles
    got = sorted((m.area, m.x0, m.y0, m.bitmap.tobytes()) for m in dets.masks)
    want = sorted((m.area, m.x0, m.y0, m.bitmap.tobytes()) for m in whole.masks)
    assert len(dets) == len(whole) >= len(objs) - 2
    assert got == want


def test_small_images_are_not_tiled_and_auto_tiles_only_large_ones():
    fake = BlobSegmenter()
    rgb, _ = _blob_image(100, 120)
    TiledSegmenter(fake, TileConfig(size=256), batch_size=1)([rgb, rgb])
    assert fake.seen == [(100, 120), (100, 120)]  # one batch of two whole images
    fake.seen.clear()
    TiledSegmenter(fake, TileConfig(size=0), batch_size=1)([rgb])
    assert fake.seen == [(100, 120)]
    fake.seen.clear()
    wide = np.zeros((100, 2800, 3), np.uint8)  # past auto's 2666 px: 1024 px tiles
    TiledSegmenter(fake, TileConfig(size=0), batch_size=2)([wide])
    assert fake.seen == [(100, 1024)] * 4


def test_tile_full_adds_a_downscaled_pass_mapped_back():
    fake = BlobSegmenter()
    rgb = np.zeros((2000, 2700, 3), np.uint8)
    rgb[100:1900, 100:2600] = (255, 255, 0)  # one object larger than any tile
    [dets] = TiledSegmenter(fake, TileConfig(size=1024, full=True), batch_size=2)([rgb])
    assert max(fake.seen[-1]) == 1333  # the full pass ran downscaled
    assert len(dets) == 1
    assert dets.masks[0].area == pytest.approx(1800 * 2500, rel=0.01)


def test_upscale_maps_boxes_and_masks():
    small = Detections(np.array([[10, 20, 30, 40]], np.float32), np.array([0.5], np.float32), np.array([1]),
                       (BoxMask(10, 20, np.ones((20, 20), bool), (100, 100)),), (100, 100))
    big = upscale(small, (400, 400))
    np.testing.assert_allclose(big.boxes[0], [40, 80, 120, 160])
    assert (big.masks[0].x0, big.masks[0].y0, big.masks[0].bitmap.shape) == (40, 80, (80, 80))


def test_parse_tile_and_config_checks():
    assert parse_tile(None) is None and parse_tile("auto") == 0 and parse_tile("1024") == 1024
    for bad in ("abc", "8", "-5"):
        with pytest.raises(UsageError):
            parse_tile(bad)
    with pytest.raises(UsageError):
        TileConfig(size=512, overlap=0.95)
