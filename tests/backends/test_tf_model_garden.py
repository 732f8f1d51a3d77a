"""--backend tensorflow on TF Model Garden exports: a real one (made by Model Garden's own exporter, kept in
tests/data/tf_model_garden with the outputs its own evaluator reads from it) and one built here with the
same signature; plus the guard that stops a run on outputs no known export layout can hold."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskseg.backends.base import RawDetections
from maskseg.backends.tf_outputs import (
    export_layout,
    model_garden_to_raw_detections,
    params_num_classes,
    to_raw_detections,
    yaml_scalar,
)
from maskseg.errors import ModelOutputError
from maskseg.postprocess import raw_to_detections

from ..conftest import ROOT, run_cli

needs_tf = pytest.mark.skipif(find_spec("tensorflow") is None, reason="the tensorflow extra is not installed")

GARDEN = ROOT / "tests" / "data" / "tf_model_garden"
EXPORT = GARDEN / "export"
# The photos the reference outputs were made from (tests/data/tf_model_garden/make_reference.py).
PHOTOS = {"fruits_nuts_0": ROOT / "tests" / "data" / "fruits_nuts" / "images" / "0.jpg",
          "chelsea": ROOT / "sample_images" / "chelsea.png"}


def _info(orig: tuple[int, int], canvas: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    return np.array([[orig, canvas, scale, (0.0, 0.0)]], np.float32)


def _garden(boxes: list, scores: list, classes: list, info: np.ndarray, masks: np.ndarray | None = None) -> dict:
    n = len(scores)
    out = {
        "detection_boxes": np.array([boxes], np.float32).reshape(1, n, 4),
        "detection_scores": np.array([scores], np.float32),
        "detection_classes": np.array([classes], np.int32),
        "num_detections": np.array([n], np.int32),
        "image_info": info,
    }
    out["detection_masks"] = masks if masks is not None else np.ones((1, n, 28, 28), np.float32)
    return out


def test_model_garden_boxes_are_divided_by_the_scale_row_and_kept_unclipped():
    # A 400x200 (W x H) image on a 256 canvas: scale 0.64 both ways; the second box runs into the padding.
    info = _info((200, 400), (256, 256), (0.64, 0.64))
    outputs = _garden([[32, 64, 96, 128], [100, 200, 140, 256]], [0.9, 0.8], [18, 1], info)
    raw = model_garden_to_raw_detections(outputs, (200, 400), score_thresh=0.5, max_dets=10)
    assert raw.mask_layout == "roi" and raw.labels.tolist() == [18, 1]
    np.testing.assert_allclose(raw.boxes, [[100, 50, 200, 150], [312.5, 156.25, 400, 218.75]], atol=1e-3)


def test_pasting_happens_on_the_unclipped_box_then_box_and_mask_are_clipped():
    # A box half outside the image: its all-ones mask must cover the visible half, and the box must end at the edge.
    masks = np.zeros((1, 28, 28), np.float32)
    masks[0, :, :14] = 1.0  # left half of the box
    raw = RawDetections(np.array([[60.0, 10.0, 140.0, 50.0]], np.float32), np.array([0.9], np.float32),
                        np.array([1]), masks, "roi")
    dets = raw_to_detections(raw, (100, 100), mask_thresh=0.5)
    assert dets.boxes.tolist() == [[60.0, 10.0, 100.0, 50.0]]
    m = dets.masks[0]
    full = np.zeros((100, 100), bool)
    full[m.y0:m.y0 + m.bitmap.shape[0], m.x0:m.x0 + m.bitmap.shape[1]] = m.bitmap
    # The left half of the unclipped 80 px box is x 60..100: all of the visible part, none squeezed.
    assert full[15:45, 60:100].all() and not full[:, :57].any()
    box = RawDetections(np.array([[60.0, 10.0, 140.0, 50.0]], np.float32), np.array([0.9], np.float32),
                        np.array([1]), masks, "box")
    exact = raw_to_detections(box, (100, 100), mask_thresh=0.5).masks[0]
    assert exact.bitmap.shape[1] == 40 and exact.bitmap[:, :38].all()


def test_od_api_boxes_outside_0_1_stop_with_the_output_named():
    outputs = {"detection_boxes": np.array([[[10.0, 20.0, 300.0, 400.0]]], np.float32),
               "detection_scores": np.array([[0.9]], np.float32), "detection_classes": np.array([[1.0]], np.float32)}
    with pytest.raises(ModelOutputError, match=r"detection_boxes holds values from 10 to 400, where normalised"):
        to_raw_detections(outputs, (100, 100), score_thresh=0.5, max_dets=10, source="m/saved_model")
    outputs["detection_boxes"] = np.array([[[0.1, 0.2, np.nan, 0.4]]], np.float32)
    with pytest.raises(ModelOutputError, match="NaN"):
        to_raw_detections(outputs, (100, 100), score_thresh=0.5, max_dets=10)


def test_model_garden_impossible_values_stop():
    info = _info((200, 400), (256, 256), (0.64, 0.64))
    with pytest.raises(ModelOutputError, match="detection_boxes"):
        model_garden_to_raw_detections(_garden([[0, 0, 900, 50]], [0.9], [1], info), (200, 400),
                                       score_thresh=0.5, max_dets=10)
    with pytest.raises(ModelOutputError, match="detection_scores"):
        model_garden_to_raw_detections(_garden([[0, 0, 90, 50]], [3.0], [1], info), (200, 400),
                                       score_thresh=0.5, max_dets=10)
    with pytest.raises(ModelOutputError, match="image_info says the image is 400x200"):
        model_garden_to_raw_detections(_garden([[0, 0, 90, 50]], [0.9], [1], info), (300, 300),
                                       score_thresh=0.5, max_dets=10)


def test_params_yaml_num_classes_counts_the_background(tmp_path):
    assert yaml_scalar("task:\n  model:\n    num_classes: 91  # COCO\n    x: 1\n", ("task", "model", "num_classes")) \
        == "91"
    assert yaml_scalar("runtime:\n  num_classes: 5\ntask:\n  model:\n    y: 2\n", ("task", "model", "num_classes")) \
        is None
    (tmp_path / "saved_model").mkdir()
    assert params_num_classes(tmp_path / "saved_model") is None
    shutil.copy(EXPORT / "params.yaml", tmp_path / "params.yaml")
    assert params_num_classes(tmp_path / "saved_model") == 90
    assert export_layout({"image_info": 1, "detection_boxes": 1}) == "model_garden"
    assert export_layout({"detection_boxes": 1}) == "od_api"


def build_saved_models(root: str) -> None:
    """ROOT/garden/{saved_model, params.yaml}: Model Garden's signature with known values (resize to a 128
    canvas, boxes in canvas pixels, one running into the padding); ROOT/pixels/saved_model: an OD API-like
    signature (no image_info) whose boxes are pixels. Run in a subprocess."""
    import tensorflow as tf

    class Garden(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="inputs")])
        def detect(self, inputs):
            shape = tf.cast(tf.shape(inputs)[1:3], tf.float32)
            scale = 128.0 / tf.reduce_max(shape)
            info = tf.stack([shape, [128.0, 128.0], [scale, scale], [0.0, 0.0]])[None]
            boxes = tf.constant([[[16.0, 32.0, 48.0, 64.0], [40.0, 100.0, 80.0, 128.0]]])
            masks = tf.concat([tf.ones([1, 2, 28, 14]), tf.zeros([1, 2, 28, 14])], axis=-1)
            return {"detection_boxes": boxes, "detection_scores": tf.constant([[0.9, 0.8]]),
                    "detection_classes": tf.constant([[3, 17]], tf.int32), "detection_masks": masks,
                    "num_detections": tf.constant([2], tf.int32), "image_info": info}

    class Pixels(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="input_tensor")])
        def detect(self, input_tensor):
            return {"detection_boxes": tf.constant([[[10.0, 20.0, 60.0, 90.0]]]),
                    "detection_scores": tf.constant([[0.9]]), "detection_classes": tf.constant([[1.0]]),
                    "num_detections": tf.constant([1.0])}

    for name, module in (("garden", Garden()), ("pixels", Pixels())):
        tf.saved_model.save(module, f"{root}/{name}/saved_model", signatures={"serving_default": module.detect})
    Path(root, "garden", "params.yaml").write_text("task:\n  model:\n    num_classes: 21\n    input_size: [128]\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("garden_models")
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.backends.test_tf_model_garden import " \
           f"build_saved_models; build_saved_models({str(root)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def _results(out: Path) -> dict[str, list[dict]]:
    data = json.loads((out / "predictions.json").read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    by_file: dict[str, list[dict]] = {n: [] for n in names.values()}
    for a in data["annotations"]:
        by_file[names[a["image_id"]]].append(a)
    return by_file


@needs_tf
def test_built_model_garden_export_without_labels(built, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "wide.png"), np.full((100, 200, 3), 128, np.uint8))  # scale 128/200 = 0.64
    out = tmp_path / "out"
    r = run_cli("predict", str(photos), "-o", str(out), "--backend", "tensorflow", "--weights", str(built / "garden"))
    assert r.returncode == 0, r.stderr
    assert "Model Garden" in r.stderr
    [dets] = _results(out).values()
    assert [a["category_id"] for a in dets] == [3, 17]
    np.testing.assert_allclose(dets[0]["bbox"], [50, 25, 50, 50], atol=0.01)  # (box / 0.64), XYWH
    # the second box runs past the image (x to 200, y to 125 of 100 rows): clipped after pasting
    np.testing.assert_allclose(dets[1]["bbox"], [156.25, 62.5, 43.75, 37.5], atol=0.01)
    m = mask_utils.decode(dets[0]["segmentation"]).astype(bool)
    assert m[25:75, 50:74].all() and not m[:, 76:].any()  # the left half of its box, as the mask says
    categories = json.loads((out / "predictions.json").read_text())["categories"]
    assert len(categories) == 20 and categories[0]["name"] == "class_1"  # params.yaml's 21, less background


@needs_tf
def test_unknown_layout_fails_loudly(built, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "a.png"), np.full((100, 100, 3), 128, np.uint8))
    r = run_cli("predict", str(photos), "-o", str(tmp_path / "out"), "--backend", "tensorflow",
                "--weights", str(built / "pixels"), "--labels", str(_label_map(tmp_path)))
    assert r.returncode == 1, r.stderr
    assert "detection_boxes holds values from 10 to 90, where normalised [0, 1] boxes" in r.stderr
    assert "Traceback" not in r.stderr


def _label_map(tmp_path: Path) -> Path:
    path = tmp_path / "labels.pbtxt"
    path.write_text("item { id: 1 name: 'thing' }\n")
    return path


@needs_tf
def test_real_model_garden_export_matches_its_own_evaluator(tmp_path):
    """The export Model Garden's exporter wrote, run by maskseg without --labels, against what Model Garden's
    COCO evaluator reads from the same outputs: boxes / image_info[2] and masks by its paste_instance_masks."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for key, src in PHOTOS.items():
        shutil.copy(src, photos / f"{key}{src.suffix}")
    out = tmp_path / "out"
    r = run_cli("predict", str(photos), "-o", str(out), "--backend", "tensorflow", "--weights", str(EXPORT),
                "--score-thresh", "0", "--writers", "coco")
    assert r.returncode == 0, r.stderr
    assert "Importing a function" not in r.stderr and "custom gradients" not in r.stderr
    results = _results(out)
    for key, src in PHOTOS.items():
        ref = np.load(GARDEN / f"{key}.npz")
        height, width = (int(v) for v in ref["image_hw"])
        dets = results[f"{key}{src.suffix}"]
        order = np.argsort(-ref["eval_scores"], kind="stable")
        assert len(dets) == len(order) == int(ref["num_detections"][0])
        assert [a["category_id"] for a in dets] == ref["eval_classes"][order].tolist()
        ymin, xmin, ymax, xmax = ref["eval_boxes_yxyx"][order].astype(np.float64).T
        x0, y0 = np.clip(xmin, 0, width), np.clip(ymin, 0, height)
        x1, y1 = np.clip(xmax, 0, width), np.clip(ymax, 0, height)
        expected = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
        np.testing.assert_allclose([a["bbox"] for a in dets], expected, atol=0.01)
        ious = []
        for a, ref_mask in zip(dets, ref["eval_masks"][order], strict=True):
            mine = mask_utils.decode(a["segmentation"]).astype(bool)
            union = (mine | ref_mask).sum()
            ious.append((mine & ref_mask).sum() / union if union else 1.0)
        assert min(ious) >= 0.9, (key, sorted(ious)[:5])
