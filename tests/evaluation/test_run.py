"""maskseg.evaluation against pycocotools' own COCOeval, on the real fruits_nuts dataset (tests/data)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import maskseg.evaluation.inputs as evaluate_inputs
from maskseg import evaluate
from maskseg.config import EvalConfig
from maskseg.errors import EvalInputError, UsageError
from maskseg.evaluation import EVAL_RESULTS_FILE, plot_pr_curves

DATA = Path(__file__).parents[1] / "data" / "fruits_nuts"
ANN = DATA / "trainval.json"
# tests/data/fruits_nuts/README.txt: GT fed back as score-1.0 results.
PERFECT = [1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 0.3168117463794887, 1.0, 1.0, -1.0, 1.0, 1.0]


def load_ann() -> dict:
    return json.loads(ANN.read_text())


def write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def gt_as_results(ann: dict, **extra: object) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"], **extra} for a in ann["annotations"]]


def rle_str(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def perturbed(ann: dict, seed: int = 0) -> list[dict]:
    """Imperfect results: objects dropped, boxes and masks shifted, classes swapped, false positives, RLE masks."""
    rng = np.random.default_rng(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(ann)
        coco.createIndex()
    out = []
    for a in ann["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        dx, dy = (int(v) for v in rng.integers(-6, 7, 2))
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.integers(1, 4))
        mask = np.roll(coco.annToMask(coco.anns[a["id"]]), (dy, dx), axis=(0, 1))
        out.append({"image_id": a["image_id"], "category_id": cat, "score": round(float(rng.uniform(0.05, 1)), 5),
                    "bbox": [x + dx, y + dy, w * float(rng.uniform(0.85, 1.15)), h * float(rng.uniform(0.85, 1.15))],
                    "segmentation": rle_str(mask)})
    for img in ann["images"]:
        for _ in range(int(rng.integers(0, 4))):
            x, y = float(rng.uniform(0, 600)), float(rng.uniform(0, 400))
            mask = np.zeros((img["height"], img["width"]), np.uint8)
            mask[int(y):int(y) + 80, int(x):int(x) + 90] = 1
            out.append({"image_id": img["id"], "category_id": int(rng.integers(1, 4)), "bbox": [x, y, 90.0, 80.0],
                        "score": round(float(rng.uniform(0.05, 0.6)), 5), "segmentation": rle_str(mask)})
    return out


def pycocotools_eval(ann: Path, res: Path, iou_type: str, max_dets: int = 100) -> tuple[COCOeval, str]:
    """pycocotools' own run, the way its demo does it; returns the evaluator and what summarize() printed."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        dt = gt.loadRes(str(res))
        ev = COCOeval(gt, dt, iou_type)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        ev.summarize()
    return ev, printed.getvalue()


@pytest.fixture
def noisy(tmp_path) -> Path:
    return write(tmp_path / "noisy.json", perturbed(load_ann()))


# ------------------------------------------------------------------------------------------- numbers


def test_ground_truth_fed_back_is_perfect(tmp_path):
    res = write(tmp_path / "res.json", gt_as_results(load_ann()))
    report = evaluate(ANN, res)
    assert [m.iou_type for m in report.metrics] == ["bbox", "segm"]
    for m in report.metrics:
        assert list(m.values) == PERFECT
        assert [(c.name, c.category_id, c.instances, c.ap, c.ap50, c.ap75) for c in m.per_class] == [
            ("date", 1, 71, 1.0, 1.0, 1.0), ("fig", 2, 41, 1.0, 1.0, 1.0), ("hazelnut", 3, 53, 1.0, 1.0, 1.0)]
        assert all(p == 1.0 for c in m.curves + m.class_curves for p in c.precision)
        assert len(m.recall_thresholds) == 101
    assert (report.images, report.instances, report.detections, report.warnings) == (18, 165, 165, ())


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_numbers_equal_pycocotools_to_every_digit(noisy, iou_type):
    report = evaluate(ANN, noisy)
    ev, printed = pycocotools_eval(ANN, noisy, iou_type)
    mine = report[iou_type]
    assert list(mine.values) == ev.stats.tolist()
    assert 0.2 < mine.stat("AP") < 0.95  # the noise makes it a real test
    assert mine.summary == printed
    assert mine.summary.count("\n") == 12
    # per-class AP as detectron2 reads it from precision [T, R, K, A, M]
    precision = ev.eval["precision"]
    for k, c in enumerate(mine.per_class):
        p = precision[:, :, k, 0, -1]
        assert c.ap == float(np.mean(p[p > -1]))
        assert c.ap50 == float(np.mean(p[0][p[0] > -1]))
    assert mine.curves[0].precision == pytest.approx(precision[0, :, :, 0, -1].mean(axis=1).tolist(), abs=1e-12)


def test_max_dets_other_than_100(noisy):
    report = evaluate(ANN, noisy, config=EvalConfig(max_dets=20))
    for t in ("bbox", "segm"):
        ev, _ = pycocotools_eval(ANN, noisy, t, max_dets=20)
        mine = report[t]
        # pycocotools' summarize() looks AP up at maxDets=100 only (-1 here); the rest it reads at maxDets[2]
        assert ev.stats[0] == -1 and list(mine.values[1:]) == ev.stats[1:].tolist()
        p = ev.eval["precision"][:, :, :, 0, 2]
        assert mine.values[0] == float(np.mean(p[p > -1]))
        assert [s.key for s in mine.stats][8] == "AR20" and mine.stats[8].max_dets == 20
    assert report.metric("segm/ar20")[1] == report["segm"].values[8]


def test_summary_replica_agrees_with_pycocotools_at_100(noisy):
    from maskseg.evaluation.coco import summarize_at
    from maskseg.evaluation.report import SUMMARY_STATS

    ev, _ = pycocotools_eval(ANN, noisy, "segm")
    assert [summarize_at(ev, ap, iou, area, m) for _, ap, iou, area, m in SUMMARY_STATS] == ev.stats.tolist()


# ------------------------------------------------------------------------------------------- forms of results


@pytest.mark.parametrize("form", ["polygons", "polygons-no-bbox", "uncompressed-rle", "compressed-rle-no-bbox"])
def test_segmentation_forms(tmp_path, form):
    ann = load_ann()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ANN))
    res = gt_as_results(ann)
    for r, a in zip(res, ann["annotations"], strict=True):
        if form.endswith("no-bbox"):
            del r["bbox"]
        if "rle" in form:
            mask = coco.annToMask(coco.anns[a["id"]])
            rle = rle_str(mask)
            if form == "uncompressed-rle":
                flat = mask.flatten(order="F")
                change = np.flatnonzero(np.diff(np.concatenate(([0], flat, [2 - flat[-1]]))))
                rle = {"size": list(mask.shape), "counts": np.diff(np.concatenate(([0], change))).tolist()}
            r["segmentation"] = rle
    report = evaluate(ANN, write(tmp_path / "res.json", res))
    assert report["segm"].stat("AP") == 1.0
    assert report["bbox"].stat("AP50") == 1.0


def test_bbox_only_results(tmp_path):
    res = [{k: v for k, v in r.items() if k != "segmentation"} for r in gt_as_results(load_ann())]
    path = write(tmp_path / "boxes.json", res)
    with pytest.raises(EvalInputError, match=r"no segmentation.*--iou-type bbox"):
        evaluate(ANN, path)
    report = evaluate(ANN, path, config=EvalConfig(iou_types=("bbox",)))
    assert list(report["bbox"].values) == PERFECT
    assert report.metric() == ("bbox AP", 1.0)


@pytest.mark.parametrize("name", ["{}", "images/{}", "/data/fruits/images/{}", "./{}"])
def test_results_naming_images_by_file_name(tmp_path, noisy, name):
    ann = load_ann()
    files = {img["id"]: img["file_name"] for img in ann["images"]}
    res = json.loads(noisy.read_text())
    for i, r in enumerate(res):
        fname = name.format(files[r["image_id"]])
        if i % 2:
            r["image_id"] = fname
        else:
            del r["image_id"]
            r["file_name"] = fname
    by_name = evaluate(ANN, write(tmp_path / "named.json", res))
    by_id = evaluate(ANN, noisy)
    assert [m.values for m in by_name.metrics] == [m.values for m in by_id.metrics]


def test_ann_with_longer_file_names(tmp_path, noisy):
    ann = load_ann()
    for img in ann["images"]:
        img["file_name"] = "fruits/images/" + img["file_name"]
    ann_path = write(tmp_path / "ann.json", ann)
    res = json.loads(noisy.read_text())
    names = {img["id"]: img["file_name"].rsplit("/", 1)[1] for img in ann["images"]}
    for r in res:
        r["image_id"] = names[r["image_id"]]
    report = evaluate(ann_path, write(tmp_path / "named.json", res))
    assert report["segm"].values == evaluate(ANN, noisy)["segm"].values


def test_predictions_dataset_with_its_own_image_ids(tmp_path, noisy):
    """maskseg's predictions.json: a COCO dataset with scores, its image ids its own, matched by file name."""
    ann = load_ann()
    res = json.loads(noisy.read_text())
    ids = {img["id"]: 1000 + 7 * img["id"] for img in ann["images"]}
    dataset = {
        "images": [{"id": ids[img["id"]], "file_name": "run/" + img["file_name"], "width": 800, "height": 600}
                   for img in ann["images"]],
        "categories": ann["categories"],
        "annotations": [{**r, "image_id": ids[r["image_id"]], "id": n + 1, "iscrowd": 0, "area": 1.0}
                        for n, r in enumerate(res)],
    }
    report = evaluate(ANN, write(tmp_path / "predictions.json", dataset))
    assert [m.values for m in report.metrics] == [m.values for m in evaluate(ANN, noisy).metrics]


def test_maskseg_results_json_is_mapped_through_its_predictions_json(tmp_path, noisy):
    ann = load_ann()
    out = tmp_path / "out"
    out.mkdir()
    res = json.loads(noisy.read_text())
    (out / "journal.jsonl").write_text("")
    write(out / "predictions.json", {"images": [{"id": img["id"] + 1, "file_name": img["file_name"]}
                                                for img in ann["images"]], "annotations": [], "categories": []})
    for r in res:
        r["image_id"] += 1
    report = evaluate(ANN, write(out / "results.json", res))
    assert report["segm"].values == evaluate(ANN, noisy)["segm"].values


# ------------------------------------------------------------------------------------------- checks


def test_categories_ann_lacks_warn_and_are_ignored_as_pycocotools_does(tmp_path, noisy):
    res = json.loads(noisy.read_text())
    res[0]["category_id"] = 99
    path = write(tmp_path / "res.json", res)
    report = evaluate(ANN, path)
    assert any("category ids ANN does not have (99)" in w for w in report.warnings)
    assert list(report["segm"].values) == pycocotools_eval(ANN, path, "segm")[0].stats.tolist()

    for r in res:
        r["category_id"] += 50
    report = evaluate(ANN, write(tmp_path / "coco_ids.json", res))
    assert any("none of the results' category ids" in w for w in report.warnings)
    assert report["bbox"].stat("AP") == 0.0


def test_images_ann_lacks(tmp_path, noisy):
    res = json.loads(noisy.read_text())
    res[0]["image_id"] = 4242
    res[1]["image_id"] = "nowhere.jpg"
    report = evaluate(ANN, write(tmp_path / "res.json", res))
    assert any("2 of" in w and "4242" in w and "nowhere.jpg" in w for w in report.warnings)
    assert report.detections == len(res) - 2
    for r in res:
        r["image_id"] = 4242
    with pytest.raises(EvalInputError, match="none of the results' images are in ANN"):
        evaluate(ANN, write(tmp_path / "other.json", res))


def test_empty_results(tmp_path):
    with pytest.raises(EvalInputError, match="no results"):
        evaluate(ANN, write(tmp_path / "res.json", []))


def test_masks_of_another_size(tmp_path):
    res = gt_as_results(load_ann())
    res[3]["segmentation"] = rle_str(np.ones((300, 400), np.uint8))
    with pytest.raises(EvalInputError, match=r"another size.*mask 300x400, ANN 600x800"):
        evaluate(ANN, write(tmp_path / "res.json", res))


def test_annotation_id_zero_warns_and_keeps_pycocotools_numbers(tmp_path):
    ann = load_ann()
    for a in ann["annotations"]:
        a["id"] -= 1
    ann_path = write(tmp_path / "ann.json", ann)
    res = write(tmp_path / "res.json", gt_as_results(ann))
    report = evaluate(ann_path, res)
    assert any("id 0" in w and "false positive" in w and "Renumber" in w for w in report.warnings)
    assert report["segm"].stat("AP") < 1.0
    assert list(report["segm"].values) == pycocotools_eval(ann_path, res, "segm")[0].stats.tolist()


@pytest.mark.parametrize(("text", "message"), [
    ('[{"image_id": 1,', r"invalid JSON at line 1 column"),
    ("", "invalid JSON"),
    (b"[\xff]", "not UTF-8"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": NaN}]', "score must be a finite number"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, Infinity, 4], "score": 1}]', "bbox must be"),
    ('{"results": []}', "expected a COCO results list"),
    ('"text"', "expected a COCO results list"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}]', "score must be a finite number"),
    ('[{"image_id": 1, "category_id": "date", "bbox": [1, 2, 3, 4], "score": 1}]', "category_id must be an integer"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2], "score": 1}]', r"bbox must be \[x, y, width, height\]"),
    ('[{"image_id": 1, "category_id": 1, "score": 1}]', "neither bbox nor segmentation"),
    ('[{"image_id": 1, "category_id": 1, "score": 1, "segmentation": [[1, 2]]}]', "segmentation must be"),
    ('[3]', "expected an object"),
    ('{"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1}]}', "images need integer ids and file names"),
    ('{"images": [{"id": 1, "file_name": "0.jpg"}], "annotations": [{"id": 1, "image_id": 1}]}', "no score"),
    ("[" * 100000, "nested too deeply|invalid JSON"),
])
def test_malformed_results(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(EvalInputError, match=message) as info:
        evaluate(ANN, path, config=EvalConfig(iou_types=("bbox",)))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda a: a.pop("images"), "not a COCO instances file"),
    (lambda a: a["annotations"].clear(), "no annotations"),
    (lambda a: a["images"].append(dict(a["images"][0])), "image id 0 appears twice"),
    (lambda a: a["annotations"][5].pop("area"), r"annotations\[5\] \(id 6\): area"),
    (lambda a: a["annotations"][2].pop("segmentation"), "no segmentation"),
    (lambda a: a["images"][1].update(width="800"), r"images\[1\] needs"),
])
def test_malformed_ground_truth(tmp_path, mutate, message):
    ann = load_ann()
    mutate(ann)
    with pytest.raises(EvalInputError, match=message):
        evaluate(write(tmp_path / "ann.json", ann), write(tmp_path / "res.json", gt_as_results(load_ann())))


def test_ground_truth_duplicates_warn(tmp_path):
    ann = load_ann()
    ann["annotations"][1]["id"] = ann["annotations"][0]["id"]
    ann["annotations"][2]["category_id"] = 7
    report = evaluate(write(tmp_path / "ann.json", ann), write(tmp_path / "res.json", gt_as_results(load_ann())))
    assert any("appear more than once" in w for w in report.warnings)
    assert any("category ids not in its categories (7)" in w for w in report.warnings)


def test_json_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_inputs, "MAX_JSON_BYTES", 1000)
    with pytest.raises(EvalInputError, match=r"over the 1,000-byte limit"):
        evaluate(ANN, write(tmp_path / "res.json", gt_as_results(load_ann())))


def test_missing_files_and_bad_config(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(EvalInputError, match="not a regular file"):
        evaluate(ANN, tmp_path / "fifo.json")
    with pytest.raises(UsageError, match="no such results file"):
        evaluate(ANN, tmp_path / "none.json")
    with pytest.raises(UsageError, match="exactly one"):
        evaluate(ANN)
    with pytest.raises(UsageError, match="bbox and/or segm"):
        evaluate(ANN, tmp_path / "none.json", config=EvalConfig(iou_types=("keypoints",)))
    with pytest.raises(UsageError, match="unknown metric 'segm/AP42'"):
        evaluate(ANN, tmp_path / "none.json", config=EvalConfig(fail_under=0.5, fail_metric="segm/AP42"))
    with pytest.raises(UsageError, match="unknown metric 'segm'"):
        evaluate(ANN, tmp_path / "none.json",
                 config=EvalConfig(iou_types=("bbox",), fail_under=0.5, fail_metric="segm"))
    with pytest.raises(UsageError, match="at least 10"):
        evaluate(ANN, tmp_path / "none.json", config=EvalConfig(max_dets=5))


# ------------------------------------------------------------------------------------------- outputs


def test_gate(noisy):
    report = evaluate(ANN, noisy, config=EvalConfig(fail_under=0.99))
    assert report.gate is not None and not report.gate.passed
    assert (report.gate.metric, report.gate.value) == ("segm AP", report["segm"].stat("AP"))
    report = evaluate(ANN, noisy, config=EvalConfig(fail_under=0.1, fail_metric="bbox/AP50"))
    assert report.gate.passed and report.gate.value == report["bbox"].stat("AP50")


def test_json_report_and_plots(tmp_path, noisy):
    report = evaluate(ANN, noisy)
    data = json.loads(report.to_json())
    for t in ("bbox", "segm"):
        assert [s["value"] for s in data["metrics"][t]["stats"].values()] == list(report[t].values)
        assert data["metrics"][t]["per_class"][0]["name"] == "date"
        assert len(data["metrics"][t]["curves"][0]["precision"]) == 101
    assert data["pycocotools_version"]
    paths = plot_pr_curves(report, tmp_path / "plots")
    assert [p.name for p in paths] == ["pr_bbox.png", "pr_segm.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_images_path_runs_the_model_and_maps_ids(tmp_path, tiny_checkpoint):
    """ANN's images through predict (its ids are maskseg's own), mapped back to ANN's ids by file name."""
    from maskseg.config import ModelConfig, PredictConfig

    ann = load_ann()
    keep = {14, 15}
    ann["images"] = [i for i in ann["images"] if i["id"] in keep]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
    ann_path = write(tmp_path / "ann.json", ann)
    config = EvalConfig(predict=PredictConfig(model=ModelConfig(weights=str(tiny_checkpoint), device="cpu",
                                                                score_thresh=0.05), writers=("coco", "results")))
    out = tmp_path / "out"
    report = evaluate(ann_path, images=DATA / "images", out=out, config=config)
    assert report.images == 2 and report.detections > 0
    evaluated = json.loads((out / EVAL_RESULTS_FILE).read_text())
    assert {r["image_id"] for r in evaluated} <= keep
    for t in ("bbox", "segm"):
        assert list(report[t].values) == pycocotools_eval(ann_path, out / EVAL_RESULTS_FILE, t)[0].stats.tolist()
    with pytest.raises(EvalInputError, match="1 of ANN's 2 images are not in"):
        ann["images"][0]["file_name"] = "gone.jpg"
        evaluate(write(tmp_path / "ann2.json", ann), images=DATA / "images", out=out, config=config)
