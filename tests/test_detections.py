"""Detections and BoxMask: validation, indexing, and RLE equal to pycocotools' own encoding."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskseg.detections import BoxMask, Detections


def _reference_rle(m: BoxMask) -> dict:
    return mask_utils.encode(np.asfortranarray(m.full().astype(np.uint8)))


@pytest.mark.parametrize("seed", range(5))
def test_box_local_rle_equals_pycocotools_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    for trial in range(400):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        h, w = int(rng.integers(0, height - y0 + 1)), int(rng.integers(0, width - x0 + 1))
        if trial % 3 == 0:  # touching top and bottom: runs join across columns
            y0, h = 0, height
        bitmap = rng.random((h, w)) < rng.random()
        m = BoxMask(x0, y0, bitmap, (height, width))
        ref = _reference_rle(m)
        assert m.rle()["counts"] == ref["counts"].decode()
        assert m.rle()["size"] == [height, width]
        assert m.area == int(mask_utils.area(ref))


def test_full_and_empty_masks():
    full = BoxMask(0, 0, np.ones((3, 4), bool), (3, 4))
    assert full.rle_counts() == [0, 12]
    assert full.rle()["counts"] == _reference_rle(full)["counts"].decode()
    empty = BoxMask(2, 1, np.zeros((0, 0), bool), (3, 4))
    assert empty.rle_counts() == [12]
    assert empty.area == 0


def test_box_mask_rejects_masks_leaving_the_image():
    with pytest.raises(ValueError, match="leaves"):
        BoxMask(3, 0, np.ones((2, 2), bool), (4, 4))
    with pytest.raises(ValueError, match="bool"):
        BoxMask(0, 0, np.ones((2, 2), np.uint8), (4, 4))


def _dets(n: int) -> Detections:
    boxes = np.array([[i, i, i + 2, i + 3] for i in range(n)], np.float32)
    masks = tuple(BoxMask(i, i, np.ones((3, 2), bool), (10, 10)) for i in range(n))
    return Detections(boxes, np.linspace(0.9, 0.5, n).astype(np.float32), np.arange(n, dtype=np.int64) + 1,
                      masks, (10, 10))


def test_indexing_returns_new_detections():
    d = _dets(4)
    sub = d[d.scores > 0.6]
    assert isinstance(sub, Detections) and len(sub) == 3
    assert sub.labels.tolist() == [1, 2, 3]
    assert d[1].boxes.tolist() == [[1, 1, 3, 4]]
    assert len(d[[0, 3]].masks) == 2


def test_construction_checks_shapes():
    with pytest.raises(ValueError, match="boxes"):
        Detections(np.zeros((2, 3), np.float32), np.zeros(2, np.float32), np.zeros(2, np.int64), None, (5, 5))
    with pytest.raises(ValueError, match="masks"):
        Detections(np.zeros((1, 4), np.float32), np.zeros(1, np.float32), np.zeros(1, np.int64), (), (5, 5))


def test_to_coco_records():
    [rec] = _dets(1).to_coco()
    assert rec["category_id"] == 1
    assert rec["bbox"] == [0.0, 0.0, 2.0, 3.0]  # XYWH
    assert rec["area"] == 6
    decoded = mask_utils.decode({"size": rec["segmentation"]["size"],
                                 "counts": rec["segmentation"]["counts"].encode()})
    assert decoded.shape == (10, 10) and decoded.sum() == 6


def test_from_rle_inverts_rle_over_the_masks_own_extent():
    """``BoxMask.from_rle`` decodes pycocotools' RLE (string or counts) to the same pixels, stored over the
    mask's extent only; an empty RLE gives an empty mask."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        full = np.zeros((h, w), bool)
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        full[y : y + int(rng.integers(1, 20)), x : x + int(rng.integers(1, 20))] = True
        full &= rng.random((h, w)) < 0.7
        enc = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
        for rle in ({"size": [h, w], "counts": enc["counts"].decode()}, {"size": [h, w], "counts": enc["counts"]}):
            m = BoxMask.from_rle(rle)
            assert np.array_equal(m.full(), full)
            if full.any():
                ys, xs = np.nonzero(full)
                assert (m.y0, m.x0, m.bitmap.shape) == (ys.min(), xs.min(), (np.ptp(ys) + 1, np.ptp(xs) + 1))
                assert m.rle() == {"size": [h, w], "counts": enc["counts"].decode()}
            else:
                assert m.area == 0
    counts = BoxMask(1, 2, np.ones((2, 3), bool), (5, 6)).rle_counts()
    assert BoxMask.from_rle({"size": [5, 6], "counts": counts}).full().sum() == 6
