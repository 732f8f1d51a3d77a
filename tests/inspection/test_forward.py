"""``inspect_image``: every stage's shapes on a real photo, detections equal predict's."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from maskseg.decode import decode_bytes
from maskseg.inspection import StageOutputs, inspect_image
from maskseg.segmenter import Segmenter

from ..conftest import SAMPLES


@pytest.fixture(scope="module")
def inspected(loaded) -> StageOutputs:
    return inspect_image(SAMPLES / "chelsea.png", loaded, top=50)


def _shape(out: StageOutputs, stage: str, name: str) -> tuple[int, ...]:
    return out.stage(stage).row(name).shape


def test_every_stage_has_the_models_shapes(inspected, loaded):
    net = loaded.module
    out = inspected
    h, w = 300, 451  # chelsea.png
    channels = net.backbone.out_channels
    num_classes = net.roi_heads.box_predictor.cls_score.out_features
    anchors_per_loc = net.rpn.anchor_generator.num_anchors_per_location()

    inp = out.input
    scale = min(160 / min(h, w), 256 / max(h, w))
    assert inp.original_size == (h, w)
    assert inp.resized_size == (math.floor(h * scale), math.floor(w * scale))
    assert inp.scale_factor == pytest.approx(scale)
    ph, pw = inp.padded_size
    assert ph % 32 == 0 and pw % 32 == 0 and ph >= inp.resized_size[0] and pw >= inp.resized_size[1]
    assert _shape(out, "input", "batch.tensors") == (1, 3, ph, pw)

    assert [lv.name for lv in out.levels] == ["P2", "P3", "P4", "P5", "P6"]
    assert [lv.key for lv in out.levels] == ["0", "1", "2", "3", "pool"]
    sizes = [(ph // s, pw // s) for s in (4, 8, 16, 32)]
    sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))  # P6: stride-2 pool of P5
    for lv, (fh, fw), a in zip(out.levels, sizes, anchors_per_loc, strict=True):
        assert _shape(out, "backbone", f"features['{lv.key}'] {lv.name}") == (1, channels, fh, fw)
        assert _shape(out, "rpn", f"objectness {lv.name}") == (1, a, fh, fw)
        assert _shape(out, "rpn", f"box deltas {lv.name}") == (1, 4 * a, fh, fw)
        assert _shape(out, "rpn", f"anchors {lv.name}") == (a * fh * fw, 4)
        assert lv.anchor_count == a * fh * fw
        assert lv.pre_nms == min(net.rpn.pre_nms_top_n(), lv.anchor_count)
        assert lv.proposals <= lv.after_nms <= lv.after_filters <= lv.pre_nms
    assert out.levels[0].anchor_sizes == (32.0,) and out.levels[-1].anchor_sizes == (512.0,)
    assert out.levels[0].aspect_ratios == (0.5, 1.0, 2.0)

    n = _shape(out, "proposals", "proposals")[0]
    assert 0 < n <= net.rpn.post_nms_top_n()
    assert sum(lv.proposals for lv in out.levels) == n
    assert _shape(out, "proposals", "proposal objectness") == (n,)
    assert _shape(out, "proposals", "proposal FPN level") == (n,)
    assert _shape(out, "proposals", "pre-NMS boxes") == (sum(lv.pre_nms for lv in out.levels), 4)
    assert out.proposal_levels_checked

    assert _shape(out, "box_head", "RoI features") == (n, channels, 7, 7)
    assert _shape(out, "box_head", "RoI pooled level") == (n,)
    assert _shape(out, "box_head", "box-head features") == (n, net.roi_heads.box_head.fc7.out_features)
    assert _shape(out, "box_head", "class logits") == (n, num_classes)
    assert _shape(out, "box_head", "box deltas") == (n, 4 * num_classes)
    assert sum(lv.rois for lv in out.levels) == n and out.levels[-1].rois == 0  # nothing is pooled from P6

    k = _shape(out, "detections", "scores")[0]
    assert 0 < k <= net.roi_heads.detections_per_img
    assert _shape(out, "detections", "boxes") == (k, 4)
    assert _shape(out, "mask_head", "mask RoI features") == (k, channels, 14, 14)
    assert _shape(out, "mask_head", "mask logits") == (k, num_classes, 28, 28)
    assert _shape(out, "mask_head", "mask probabilities") == (k, 1, 28, 28)
    probs = out.stage("mask_head").row("mask probabilities")
    assert 0 <= probs.min <= probs.max <= 1

    final = len(out.detections)
    assert final <= k
    assert _shape(out, "final", "boxes") == (final, 4)
    assert _shape(out, "final", "masks") == (final, h, w)


def test_dump_is_bounded_by_top_and_holds_the_levels(inspected):
    t = inspected.tensors
    assert t["proposals/boxes"].shape == (50, 4)
    assert t["roi/features"].shape[0] == 50
    assert t["mask/logits"].shape[0] <= 50
    for lv in inspected.levels:
        assert t[f"rpn/objectness/{lv.name}"].shape == _shape(inspected, "rpn", f"objectness {lv.name}")
    levels = set(np.unique(t["proposals/level"]).tolist())
    assert levels <= {2, 3, 4, 5, 6}


def test_roi_levels_follow_the_fpn_equation(inspected):
    """Each RoI's level, as reported, is FPN's eq. 1 on its box, clamped to the pooled levels P2..P5."""
    boxes = inspected.tensors["proposals/boxes"].astype(np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    expected = np.clip(np.floor(4 + np.log2(np.sqrt(area) / 224) + 1e-6), 2, 5)
    np.testing.assert_array_equal(inspected.tensors["roi/level"], expected.astype(np.int64))


def test_final_detections_equal_predicts(inspected, loaded):
    rgb = decode_bytes((SAMPLES / "chelsea.png").read_bytes(), "chelsea.png")
    [ref] = Segmenter(loaded=loaded, mask_thresh=0.5)([rgb])
    dets = inspected.detections
    assert len(dets) == len(ref) > 0
    np.testing.assert_array_equal(dets.boxes, ref.boxes)
    np.testing.assert_array_equal(dets.scores, ref.scores)
    np.testing.assert_array_equal(dets.labels, ref.labels)
    for a, b in zip(dets.masks, ref.masks, strict=True):
        assert (a.x0, a.y0) == (b.x0, b.y0)
        np.testing.assert_array_equal(a.bitmap, b.bitmap)


def test_json_and_npz_round_trip(inspected, tmp_path):
    data = json.loads(inspected.save_json(tmp_path / "i.json").read_text())
    assert [s["key"] for s in data["stages"]] == [
        "input", "backbone", "rpn", "proposals", "box_head", "detections", "mask_head", "final"]
    rows = {r["name"]: r for s in data["stages"] for r in s["rows"] if s["key"] == "box_head"}
    assert rows["class logits"]["shape"] == list(_shape(inspected, "box_head", "class logits"))
    assert rows["class logits"]["dtype"] == "float32"
    assert len(data["detections"]) == len(inspected.detections)
    with np.load(inspected.save_npz(tmp_path / "t.npz"), allow_pickle=False) as npz:
        assert set(npz.files) == set(inspected.tensors)
        np.testing.assert_array_equal(npz["final/scores"], inspected.detections.scores[:50])
        from pycocotools import mask as mask_utils

        h, w = npz["final/image_size"].tolist()
        first = mask_utils.decode({"size": [h, w], "counts": bytes(npz["final/masks_rle"][0])})
        np.testing.assert_array_equal(first.astype(bool), inspected.detections.masks[0].full())


@pytest.mark.slow
def test_resnet50_fpn_on_800x800_gives_the_well_known_table():
    """torchvision's maskrcnn_resnet50_fpn (random weights, 91 classes) on an 800x800 photo."""
    from maskseg.models import LoadedModel, coco_categories
    from maskseg.synth import random_maskrcnn

    net = random_maskrcnn("maskrcnn_resnet50_fpn", num_classes=91, min_size=800, max_size=1333)
    net.roi_heads.detections_per_img = 10  # keeps the mask head quick; shapes are per detection anyway
    loaded = LoadedModel("maskrcnn_resnet50_fpn", net, coco_categories(), torch.device("cpu"), "random")
    rgb = decode_bytes((SAMPLES / "astronaut.png").read_bytes(), "astronaut.png")
    rgb = cv2.resize(rgb, (800, 800), interpolation=cv2.INTER_LINEAR)
    out = inspect_image(rgb, loaded, image_name="astronaut_800.png")
    assert out.input.resized_size == out.input.padded_size == (800, 800)
    expected = {("0", "P2"): 200, ("1", "P3"): 100, ("2", "P4"): 50, ("3", "P5"): 25, ("pool", "P6"): 13}
    for (key, name), side in expected.items():
        assert _shape(out, "rpn", f"objectness {name}") == (1, 3, side, side)
        assert _shape(out, "rpn", f"box deltas {name}") == (1, 12, side, side)
        assert _shape(out, "backbone", f"features['{key}'] {name}") == (1, 256, side, side)
    assert _shape(out, "proposals", "proposals") == (1000, 4)
    assert _shape(out, "box_head", "RoI features") == (1000, 256, 7, 7)
    assert _shape(out, "box_head", "box-head features") == (1000, 1024)
    assert _shape(out, "box_head", "class logits") == (1000, 91)
    assert _shape(out, "box_head", "box deltas") == (1000, 364)
    k = _shape(out, "detections", "scores")[0]
    assert k > 0
    assert _shape(out, "mask_head", "mask RoI features") == (k, 256, 14, 14)
    assert _shape(out, "mask_head", "mask logits") == (k, 91, 28, 28)
