"""``maskseg inspect`` through the real CLI: table, JSON, dump and pictures; detections equal predict's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ..conftest import run_cli

FRUITS = Path(__file__).resolve().parents[1] / "data" / "fruits_nuts"


def test_inspect_writes_table_json_dump_and_pictures(tiny_checkpoint, tmp_path):
    out = tmp_path / "insp"
    r = run_cli("inspect", FRUITS / "images" / "3.jpg", "--weights", tiny_checkpoint, "--device", "cpu",
                "-o", out, "--top", "20", "--targets", FRUITS / "trainval.json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for text in ("Backbone + FPN", "objectness P2", "box deltas P6", "FPN levels", "RoI features", "class logits",
                 "mask logits", "Training view: RPN targets", "sampled positives", "mask targets", "loss_total"):
        assert text in r.stdout, text
    data = json.loads((out / "inspect.json").read_text())
    assert data["input"]["original_size"] == [600, 800]
    assert data["targets"]["file_name"] == "3.jpg"
    assert data["targets"]["rpn"]["sampled_positive"] + data["targets"]["rpn"]["sampled_negative"] <= 256
    with np.load(out / "tensors.npz", allow_pickle=False) as npz:
        assert npz["proposals/boxes"].shape == (20, 4)
        assert npz["rpn/objectness/P2"].ndim == 4
        assert "targets/mask_targets" in npz.files
    for name in ("objectness.png", "proposals.png", "roi_levels.png", "mask_logits.png", "overlay.jpg",
                 "targets_anchors.png", "targets_masks.png"):
        assert (out / name).stat().st_size > 1000, name


def test_inspect_detections_equal_predicts(tiny_checkpoint, tmp_path):
    """The same detections as `maskseg predict` with the same settings. predict runs the model with
    maskseg.optimize's inference rewrites (BN folded into convs, fused conv+ReLU), inspect the plain
    torchvision modules, so floats may differ by rounding: boxes to 0.01 px, masks by a pixel or so.
    (test_inspection checks bit-for-bit equality against the Segmenter on the same module.)"""
    from pycocotools import mask as mask_utils

    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(FRUITS / "images" / "5.jpg", images / "5.jpg")
    r = run_cli("predict", images, "-o", tmp_path / "pred", "--weights", tiny_checkpoint, "--device", "cpu",
                "--score-thresh", "0.7", "--mask-thresh", "0.4", "--writers", "results")
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", images / "5.jpg", "--weights", tiny_checkpoint, "--device", "cpu", "-q",
                "--score-thresh", "0.7", "--mask-thresh", "0.4", "--json", tmp_path / "i.json")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # -q: no table
    predicted = json.loads((tmp_path / "pred" / "results.json").read_text())
    inspected = json.loads((tmp_path / "i.json").read_text())["detections"]
    assert len(predicted) == len(inspected) > 0
    for p, d in zip(predicted, inspected, strict=True):
        x0, y0, x1, y1 = d["box_xyxy"]
        np.testing.assert_allclose(p["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=0.02)
        assert p["score"] == pytest.approx(d["score"], abs=1e-4)
        assert p["category_id"] == d["category_id"]
        area = int(mask_utils.area(p["segmentation"]))
        assert abs(area - d["mask_area"]) <= max(3, 0.005 * area)


def test_inspect_errors(tiny_checkpoint, tmp_path):
    r = run_cli("inspect", FRUITS / "images" / "3.jpg", "--weights", tiny_checkpoint, "--device", "cpu",
                "--targets", tmp_path / "nope.json")
    assert r.returncode == 2
    assert "nope.json: no such file" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("inspect", tmp_path / "missing.jpg", "--weights", tiny_checkpoint, "--device", "cpu")
    assert r.returncode == 1
    assert "missing.jpg" in r.stderr and "Traceback" not in r.stderr
