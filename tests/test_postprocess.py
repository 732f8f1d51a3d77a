"""The three mask layouts paste to the same pixels torchvision (or a plain full-image threshold) gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from maskseg.backends import RawDetections
from maskseg.postprocess import raw_to_detections


def _boxes() -> torch.Tensor:
    return torch.tensor([[10.3, 5.7, 60.2, 40.9], [0.0, 0.0, 99.0, 79.0], [80.5, 60.5, 130.0, 95.0]])


def test_roi_layout_equals_torchvision_paste():
    torch.manual_seed(0)
    masks = torch.rand(3, 28, 28)
    boxes = _boxes()
    raw = RawDetections(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 2, 3]), masks, "roi")
    dets = raw_to_detections(raw, (80, 100), mask_thresh=0.5)
    reference = (paste_masks_in_image(masks[:, None], boxes, (80, 100))[:, 0] > 0.5).numpy()
    for m, ref in zip(dets.masks, reference, strict=True):
        np.testing.assert_array_equal(m.full(), ref)


def test_box_layout_stretches_the_mask_over_its_box():
    mask = torch.zeros(1, 4, 4)
    mask[0, :, :2] = 1.0  # left half of the box
    raw = RawDetections(torch.tensor([[20.0, 10.0, 60.0, 30.0]]), torch.tensor([1.0]), torch.tensor([1]), mask, "box")
    [m] = raw_to_detections(raw, (50, 80), mask_thresh=0.5).masks
    full = m.full()
    assert full[10:30, 20:38].all() and not full[10:30, 42:60].any()
    assert not full[:10].any() and not full[30:].any() and not full[:, :20].any()


def test_image_layout_is_cropped_to_the_box():
    full = torch.zeros(1, 50, 80)
    full[0, 12:20, 25:40] = 0.9
    full[0, 45:, 70:] = 0.9  # outside the box: dropped
    raw = RawDetections(torch.tensor([[22.0, 10.0, 44.5, 25.0]]), torch.tensor([1.0]), torch.tensor([2]), full, "image")
    [m] = raw_to_detections(raw, (50, 80), mask_thresh=0.5).masks
    assert (m.x0, m.y0, m.bitmap.shape) == (22, 10, (15, 23))
    assert m.area == 8 * 15 and m.full()[12:20, 25:40].all()


def test_label_filter_drops_rows_and_masks_together():
    torch.manual_seed(1)
    raw = RawDetections(_boxes(), torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 2, 1]), torch.rand(3, 28, 28))
    dets = raw_to_detections(raw, (80, 100), mask_thresh=0.5, keep_labels={1})
    assert dets.labels.tolist() == [1, 1] and len(dets.masks) == 2
    np.testing.assert_allclose(dets.scores, [0.9, 0.7])


# --- class-agnostic NMS (--agnostic-nms) ---------------------------------------------------------------

def _overlapping() -> tuple[RawDetections, np.ndarray]:
    """Full-image mask probabilities of four detections on a 60x80 image: a fig (0.9) and a date (0.8)
    over the same object (mask IoU 0.75), a second fig (0.7) overlapping the first fig (same class), and a
    hazelnut (0.6) elsewhere touching the date a little (IoU < 0.1)."""
    m = np.zeros((4, 60, 80), np.float32)
    m[0, 10:30, 10:30] = 1  # fig, 400 px
    m[1, 10:30, 15:30] = 1  # date: 300 px inside the fig -> IoU 300/400
    m[2, 12:32, 12:32] = 1  # fig again
    m[3, 10:30, 29:50] = 1  # hazelnut: 20 px shared with the date
    boxes = np.array([[10, 10, 30, 30], [15, 10, 30, 30], [12, 12, 32, 32], [29, 10, 50, 30]], np.float32)
    raw = RawDetections(torch.tensor(boxes), torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([2, 1, 2, 3]),
                        torch.tensor(m), "image")
    return raw, m > 0.5


def test_mask_iou_is_computed_box_locally():
    from maskseg.postprocess import mask_iou

    raw, full = _overlapping()
    dets = raw_to_detections(raw, (60, 80), mask_thresh=0.5)
    for i in range(4):
        for j in range(4):
            inter, union = (full[i] & full[j]).sum(), (full[i] | full[j]).sum()
            assert mask_iou(dets.masks[i], dets.masks[j]) == pytest.approx(inter / union)
    assert mask_iou(dets.masks[0], dets.masks[1]) == pytest.approx(0.75)


def test_agnostic_nms_drops_only_cross_class_overlaps():
    from maskseg.postprocess import agnostic_nms

    raw, _ = _overlapping()
    dets = raw_to_detections(raw, (60, 80), mask_thresh=0.5)
    kept = agnostic_nms(dets, 0.5)
    assert kept.labels.tolist() == [2, 2, 3]  # the date under the fig is gone; the same-class fig stays
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert agnostic_nms(dets, 0.8).labels.tolist() == [2, 1, 2, 3]  # IoU 0.75 < 0.8: nothing dropped
    # A dropped detection suppresses nothing: a chain fig -> date -> hazelnut (IoU 0.67, 0.67; fig-hazelnut
    # 0.43) keeps the hazelnut once the date is gone.
    m = np.zeros((3, 40, 50), np.float32)
    for k, x0 in enumerate((10, 14, 18)):
        m[k, 10:30, x0 : x0 + 20] = 1
    boxes = torch.tensor([[x0, 10, x0 + 20, 30] for x0 in (10, 14, 18)], dtype=torch.float32)
    chain = raw_to_detections(RawDetections(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([2, 1, 3]),
                                            torch.tensor(m), "image"), (40, 50), mask_thresh=0.5)
    assert agnostic_nms(chain, 0.5).labels.tolist() == [2, 3]
    assert agnostic_nms(chain, 0.4).labels.tolist() == [2]


def test_segmenter_applies_agnostic_nms_only_when_asked():
    from maskseg.detections import Category
    from maskseg.segmenter import Segmenter

    raw, _ = _overlapping()

    class Backend:
        name, device, num_classes = "fake", "cpu", 4
        categories = (Category(1, 11, "date"), Category(2, 12, "fig"), Category(3, 13, "hazelnut"))

        def infer(self, images):
            return [raw for _ in images]

    rgb = np.zeros((60, 80, 3), np.uint8)
    [plain] = Segmenter(backend=Backend())([rgb])
    [nms] = Segmenter(backend=Backend(), agnostic_nms=0.5)([rgb])
    assert plain.labels.tolist() == [12, 11, 12, 13]
    assert nms.labels.tolist() == [12, 12, 13]
