"""--backend tensorflow: tiny SavedModels built here (TF Object Detection API outputs, known values),
the real CLI on real photos, every output checked against what the adapter must make of them."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskseg.backends.tf_backend import find_saved_model, pipeline_num_classes, tf_categories, to_raw_detections
from maskseg.errors import UsageError, WeightsError
from maskseg.labelmap import parse_label_map

from ..conftest import ROOT, SAMPLES, run_cli

# find_spec, not importorskip: importing TensorFlow here would cost every test run seconds.
needs_tf = pytest.mark.skipif(find_spec("tensorflow") is None, reason="the tensorflow extra is not installed")

# Model "box": uint8 input, 15 x 15 masks over their boxes, a gap label map. Rows as the model emits them
# (ymin, xmin, ymax, xmax normalized; score; class; mask), padded to 6; num_detections = 5.
MASK_SIZE = 15
HALF = 7  # the left (row 1) or top (row 2) HALF cells of the mask are 1, the rest 0
BOX_ROWS = [
    ((0.25, 0.125, 0.75, 0.5), 0.95, 1, "full"),
    ((0.5, 0.5, 1.0, 1.0), 0.80, 3, "left"),
    ((0.0, 0.0, 0.5, 0.25), 0.70, 7, "top"),
    ((0.125, 0.625, 0.375, 0.875), 0.60, 5, "full"),  # id 5 is not in the label map: dropped
    ((0.5, 0.0, 0.75, 0.25), 0.30, 1, "full"),  # under --score-thresh 0.5
    ((0.0, 0.0, 1.0, 1.0), 0.99, 3, "full"),  # padding past num_detections
]
BOX_NUM_DETECTIONS = 5
LABEL_MAP = """# ids with gaps, both quote styles, a display_name
item { id: 1 name: 'date' }
item {
  id: 3
  name: "/m/0fig"
  display_name: "fig"
}
item { id: 7, name: 'hazelnut' }  # 2, 4, 5, 6 unused
"""
# Model "image": float input, full-image masks, no label map (pipeline.config says 6 classes).
# Row 0's score is 0.9 * max(input) / 255: fed 0..1 instead of 0..255 it would fall under the threshold.
IMAGE_ROWS = [((0.25, 0.25, 0.75, 0.75), None, 2), ((0.0, 0.5, 0.5, 1.0), 0.6, 5), ((0.5, 0.0, 1.0, 0.5), 0.2, 6)]


def build_saved_models(root: str) -> None:
    """Write ROOT/box/saved_model and ROOT/image/{saved_model, pipeline.config}; run in a subprocess."""
    import tensorflow as tf

    def box_mask(kind: str) -> np.ndarray:
        m = np.zeros((MASK_SIZE, MASK_SIZE), np.float32)
        if kind == "full":
            m[:] = 1
        elif kind == "left":
            m[:, :HALF] = 1
        else:
            m[:HALF] = 1
        return m

    boxes = np.array([[r[0] for r in BOX_ROWS]], np.float32)
    scores = np.array([[r[1] for r in BOX_ROWS]], np.float32)
    classes = np.array([[r[2] for r in BOX_ROWS]], np.float32)
    masks = np.array([[box_mask(r[3]) for r in BOX_ROWS]], np.float32)

    class BoxModel(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="input_tensor")])
        def detect(self, input_tensor):
            return {
                "detection_boxes": tf.constant(boxes), "detection_scores": tf.constant(scores),
                "detection_classes": tf.constant(classes),
                "num_detections": tf.constant([float(BOX_NUM_DETECTIONS)]),
                "detection_masks": tf.constant(masks),
                "detection_multiclass_scores": tf.zeros([1, len(BOX_ROWS), 9]),
            }

    class ImageModel(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32, name="images")])
        def detect(self, images):
            h, w = tf.shape(images)[1], tf.shape(images)[2]
            rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
            quadrant = tf.where((rows < h // 2) & (cols < w // 2), 0.9, 0.1)
            peak = tf.reduce_max(images) / 255.0
            return {
                "detection_boxes": tf.constant([[r[0] for r in IMAGE_ROWS]], tf.float32),
                "detection_scores": tf.stack([0.9 * peak, 0.6, 0.2])[None],
                "detection_classes": tf.constant([[float(r[2]) for r in IMAGE_ROWS]]),
                "num_detections": tf.constant([3.0]),
                "detection_masks": tf.stack([quadrant, tf.fill([h, w], 0.8), tf.fill([h, w], 0.8)])[None],
            }

    for name, module in (("box", BoxModel()), ("image", ImageModel())):
        tf.saved_model.save(module, str(Path(root) / name / "saved_model"),
                            signatures={"serving_default": module.detect})
    (Path(root) / "image" / "pipeline.config").write_text(
        "model {\n  faster_rcnn {\n    num_classes: 6\n  }\n}\n")


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tf_models")
    script = "import sys; from tests.backends.test_tf_backend import build_saved_models as b; b(sys.argv[1])"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", script, str(root)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tf_photos")
    (folder / "sub").mkdir()
    shutil.copy(SAMPLES / "chelsea.png", folder / "chelsea.png")  # 451 x 300
    shutil.copy(SAMPLES / "coins.png", folder / "coins.png")  # 384 x 303, grayscale
    shutil.copy(SAMPLES / "rocket.jpg", folder / "sub" / "rocket.jpg")  # 640 x 427
    return folder


def _pixel_box(norm: tuple[float, ...], height: int, width: int) -> list[float]:
    y1, x1, y2, x2 = (float(np.float32(v)) for v in norm)
    return [x1 * width, y1 * height, x2 * width, y2 * height]


def _box_mask_area(box: list[float], kind: str, height: int, width: int) -> int:
    """Pixels on for an M x M mask stretched over ``box``: every pixel whose square the box touches
    samples the mask at its centre (bilinear, edges clamped); a 1/0 edge at cell HALF is crossed
    where the sample position reaches HALF cells, so a pixel is on iff its centre lies before it."""
    x1, y1, x2, y2 = box
    cols = range(max(math.floor(x1), 0), min(math.ceil(x2), width))
    rows = range(max(math.floor(y1), 0), min(math.ceil(y2), height))
    if kind == "left":
        cols = [x for x in cols if (x + 0.5 - x1) / (x2 - x1) * MASK_SIZE < HALF]
    if kind == "top":
        rows = [y for y in rows if (y + 0.5 - y1) / (y2 - y1) * MASK_SIZE < HALF]
    return len(cols) * len(rows)


def _by_file(out: Path) -> tuple[COCO, dict[str, list[dict]]]:
    coco = COCO(str(out / "predictions.json"))
    results = json.loads((out / "results.json").read_text())
    names = {img["id"]: img["file_name"] for img in coco.dataset["images"]}
    per_file: dict[str, list[dict]] = {name: [] for name in names.values()}
    for r in results:
        per_file[names[r["image_id"]]].append(r)
    coco.loadRes(results)  # pycocotools accepts the results file as it is
    return coco, per_file


def _check(result: dict, box: list[float], score: float, category: int, area: int, hw: tuple[int, int]) -> None:
    x1, y1, x2, y2 = box
    assert result["category_id"] == category
    assert result["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.006)
    assert result["score"] == pytest.approx(score, abs=1e-5)
    assert result["segmentation"]["size"] == list(hw)
    assert int(mask_utils.area(result["segmentation"])) == area


@needs_tf
@pytest.mark.slow
def test_box_masks_and_a_label_map_with_gaps(saved_models, photos, tmp_path):
    labels = tmp_path / "label_map.pbtxt"
    labels.write_text(LABEL_MAP)
    out = tmp_path / "out"
    args = ["predict", photos, "-o", out, "--backend", "tensorflow", "--weights", saved_models / "box" / "saved_model",
            "--labels", labels, "--threads", "1", "--writers", "coco,results,overlay,masks"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "oneDNN" not in r.stderr
    assert "class id 5 is not in" in r.stderr

    coco, per_file = _by_file(out)
    assert coco.dataset["categories"] == [{"id": 1, "name": "date", "supercategory": ""},
                                          {"id": 3, "name": "fig", "supercategory": ""},
                                          {"id": 7, "name": "hazelnut", "supercategory": ""}]
    assert sorted(per_file) == ["chelsea.png", "coins.png", "sub/rocket.jpg"]
    for name, results in per_file.items():
        height, width = cv2.imread(str(photos / name)).shape[:2]
        assert len(results) == 3
        for result, (norm, score, category, kind) in zip(results, BOX_ROWS[:3], strict=True):
            box = _pixel_box(norm, height, width)
            _check(result, box, score, category, _box_mask_area(box, kind, height, width), (height, width))
        stem = Path(name).with_suffix("")
        assert sorted(p.name for p in (out / "masks" / stem).glob("*.png")) == ["0_date.png", "1_fig.png",
                                                                              "2_hazelnut.png"]
        overlay = cv2.imread(str(out / "overlays" / (name + ".jpg" if name.endswith(".png") else name)))
        assert overlay.shape[:2] == (height, width)
    assert json.loads((out / "run.json").read_text())["model_name"] == "tensorflow:box"

    before = (out / "results.json").read_bytes()
    again = run_cli(*args)  # nothing new: resumes without loading TensorFlow, rewrites nothing
    assert again.returncode == 0, again.stderr
    assert (out / "results.json").read_bytes() == before


@needs_tf
@pytest.mark.slow
def test_full_image_masks_float_input_and_export_folder(saved_models, photos, tmp_path):
    out = tmp_path / "out"
    r = run_cli("predict", photos / "chelsea.png", photos / "sub" / "rocket.jpg", "-o", out,
                "--backend", "tensorflow", "--weights", saved_models / "image")
    assert r.returncode == 0, r.stderr

    coco, per_file = _by_file(out)
    assert [c["name"] for c in coco.dataset["categories"]] == [f"class_{i}" for i in range(1, 7)]
    for name, results in per_file.items():
        rgb = cv2.imread(str(photos / name))
        height, width = rgb.shape[:2]
        (norm0, _, cat0), (norm1, score1, cat1) = IMAGE_ROWS[:2]
        box0, box1 = _pixel_box(norm0, height, width), _pixel_box(norm1, height, width)
        # row 0: the top-left quadrant mask kept inside its box (rounded outwards); row 1: the whole box
        area0 = (width // 2 - math.floor(box0[0])) * (height // 2 - math.floor(box0[1]))
        area1 = (math.ceil(box1[2]) - math.floor(box1[0])) * (math.ceil(box1[3]) - math.floor(box1[1]))
        assert len(results) == 2
        _check(results[0], box0, 0.9 * int(rgb.max()) / 255, cat0, area0, (height, width))
        _check(results[1], box1, score1, cat1, area1, (height, width))


def test_missing_extra_names_the_install(tmp_path):
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named tensorflow (test stand-in)')\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), str(ROOT)]), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "maskseg", "predict", SAMPLES / "coins.png", "-o", tmp_path / "out",
                        "--backend", "tensorflow", "--weights", model, "-q"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2
    expected = "maskseg: error: --backend tensorflow needs TensorFlow: pip install 'maskseg[tensorflow]'"
    assert r.stderr.strip() == expected


def test_bad_inputs_fail_before_tensorflow_loads(tmp_path):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    r = run_cli("predict", SAMPLES / "coins.png", "-o", tmp_path / "o1", "--backend", "tensorflow",
                "--weights", not_a_model)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{not_a_model}: not a SavedModel folder" in r.stderr

    (not_a_model / "saved_model.pb").write_bytes(b"")
    labels = tmp_path / "broken.pbtxt"
    labels.write_text("item {\n  id: 1\n  name: 'a'\n}\nitem {\n  id: one\n}\n")
    r = run_cli("predict", SAMPLES / "coins.png", "-o", tmp_path / "o2", "--backend", "tensorflow",
                "--weights", not_a_model, "--labels", labels)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{labels}:6: id must be an integer, found 'one'" in r.stderr


def test_no_tensorflow_import_unless_chosen():
    code = ("import sys, maskseg.cli, maskseg.backends.tf_backend, maskseg.labelmap; "
            "print('tensorflow' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def _outputs(rows: list[tuple], masks: np.ndarray, num: int | None = None) -> dict[str, np.ndarray]:
    out = {
        "detection_boxes": np.array([[r[0] for r in rows]], np.float32),
        "detection_scores": np.array([[r[1] for r in rows]], np.float32),
        "detection_classes": np.array([[r[2] for r in rows]], np.float32),
        "detection_masks": masks[None],
    }
    if num is not None:
        out["num_detections"] = np.array([num], np.float32)
    return out


def test_adapter_orders_thresholds_caps_and_cuts_padding():
    rows = [((0.0, 0.0, 0.5, 0.5), 0.6, 2), ((0.5, 0.5, 1.0, 1.0), 0.9, 4), ((0.1, 0.2, 0.3, 0.4), 0.7, 1),
            ((0.0, 0.0, 1.0, 1.0), 0.99, 9)]
    outputs = _outputs(rows, np.zeros((4, 33, 33), np.float32), num=3)
    raw = to_raw_detections(outputs, (200, 100), score_thresh=0.65, max_dets=5)
    assert raw.mask_layout == "box" and raw.masks.shape == (2, 33, 33)
    assert raw.labels.tolist() == [4, 1] and raw.labels.dtype == np.int64
    assert raw.scores.tolist() == pytest.approx([0.9, 0.7])
    np.testing.assert_allclose(raw.boxes, [[50, 100, 100, 200], [20, 20, 40, 60]], atol=1e-4)
    capped = to_raw_detections(outputs, (200, 100), score_thresh=0.0, max_dets=2)
    assert capped.labels.tolist() == [4, 1]


def test_adapter_full_image_masks_at_a_fixed_input_size_are_resized():
    masks = np.zeros((1, 64, 64), np.float32)
    masks[0, :32, :32] = 1.0
    raw = to_raw_detections(_outputs([((0.0, 0.0, 0.5, 0.5), 0.9, 1)], masks), (100, 300),
                            score_thresh=0.5, max_dets=10, fed_size=(64, 64))
    assert raw.mask_layout == "image" and raw.masks.shape == (1, 100, 300)
    np.testing.assert_allclose(raw.boxes, [[0, 0, 150, 50]])
    assert (raw.masks[0, :45, :140] > 0.5).all() and not (raw.masks[0, 55:, 160:] > 0.5).any()


def test_saved_model_folder_and_pipeline_config(tmp_path):
    export = tmp_path / "exported_model"
    (export / "saved_model").mkdir(parents=True)
    (export / "saved_model" / "saved_model.pb").write_bytes(b"")
    assert find_saved_model(export) == export / "saved_model"
    assert find_saved_model(export / "saved_model" / "saved_model.pb") == export / "saved_model"
    assert pipeline_num_classes(export / "saved_model") is None
    (export / "pipeline.config").write_text("model {\n  faster_rcnn {\n    num_classes: 90  # COCO\n  }\n}\n")
    assert pipeline_num_classes(export / "saved_model") == 90
    with pytest.raises(WeightsError, match="SavedModel folder not found"):
        find_saved_model(tmp_path / "nowhere")


def test_categories_from_label_map_count_or_neither(tmp_path):
    items = parse_label_map(LABEL_MAP)
    assert [(c.label, c.id, c.name) for c in tf_categories(items, "l.pbtxt", tmp_path, 8)] == [
        (1, 1, "date"), (3, 3, "fig"), (7, 7, "hazelnut")]
    assert [c.name for c in tf_categories(None, None, tmp_path, 3)] == ["class_1", "class_2", "class_3"]
    with pytest.raises(UsageError, match=r"pass --labels label_map\.pbtxt"):
        tf_categories(None, None, tmp_path / "saved_model", None)
