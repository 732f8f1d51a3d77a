"""The real ``maskseg eval`` CLI in a subprocess: results files, a tiny model over a tiny dataset, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ..conftest import run_cli
from ..evaluation.test_run import ANN, DATA, PERFECT, gt_as_results, load_ann, perturbed, pycocotools_eval, write


@pytest.fixture
def noisy(tmp_path) -> Path:
    return write(tmp_path / "noisy.json", perturbed(load_ann()))


def stats_of(report: Path, iou_type: str) -> list[float]:
    data = json.loads(report.read_text())
    return [s["value"] for s in data["metrics"][iou_type]["stats"].values()]


def test_results_file_prints_pycocotools_numbers(tmp_path, noisy):
    report = tmp_path / "report.json"
    r = run_cli("eval", "--coco", ANN, "--results", noisy, "--json", report, "--plot", tmp_path / "plots")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for t in ("bbox", "segm"):
        ev, printed = pycocotools_eval(ANN, noisy, t)
        assert stats_of(report, t) == ev.stats.tolist()
        assert json.loads(report.read_text())["metrics"][t]["summary"] == printed
    # the table shows each number as pycocotools prints it (3 decimals), one row per stat, a column per type
    bbox, _ = pycocotools_eval(ANN, noisy, "bbox")
    segm, _ = pycocotools_eval(ANN, noisy, "segm")
    rows = [line for line in r.stdout.splitlines() if "Average" in line]
    assert len(rows) == 12
    for row, b, s in zip(rows, bbox.stats, segm.stats, strict=True):
        assert [c.strip() for c in row.split("│")][-3:-1] == [f"{b:0.3f}", f"{s:0.3f}"]
    assert all(name in r.stdout for name in ("date", "fig", "hazelnut", "Per-class AP"))
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["pr_bbox.png", "pr_segm.png"]


def test_ground_truth_fed_back_and_bbox_only(tmp_path):
    res = write(tmp_path / "res.json", gt_as_results(load_ann()))
    report = tmp_path / "report.json"
    r = run_cli("eval", "--coco", ANN, "--results", res, "--iou-type", "bbox", "--json", report, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert stats_of(report, "bbox") == PERFECT
    assert list(json.loads(report.read_text())["metrics"]) == ["bbox"]


def test_fail_under_exit_3(noisy):
    r = run_cli("eval", "--coco", ANN, "--results", noisy, "--fail-under", "0.99", "-q")
    assert r.returncode == 3, r.stderr
    assert "segm AP" in r.stderr and "below --fail-under 0.99" in r.stderr
    r = run_cli("eval", "--coco", ANN, "--results", noisy, "--fail-under", "0.1", "--fail-metric", "bbox/AP50")
    assert r.returncode == 0, r.stderr
    assert "bbox AP50" in r.stdout and ">= --fail-under 0.1" in r.stdout


@pytest.mark.parametrize("args", [
    [],
    ["--images", DATA / "images"],  # together with --results below
    ["--weights", "w.pt"],
    ["--fail-under", "0.5", "--fail-metric", "segm/AP33"],
    ["--iou-type", "keypoints"],
    ["--max-dets", "3"],
])
def test_usage_errors_exit_2(noisy, args):
    r = run_cli("eval", "--coco", ANN, "--results", noisy, *args) if args else run_cli("eval", "--coco", ANN)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr


def test_missing_coco_option_exit_2(noisy):
    r = run_cli("eval", "--results", noisy)
    assert r.returncode == 2 and "--coco" in r.stderr


@pytest.mark.parametrize(("text", "message"), [
    ('[{"image_id": 0, "category_id": 1,', "invalid JSON"),
    ("[]", "no results"),
    ('[{"image_id": 0, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1, '
     '"segmentation": {"size": [10, 10], "counts": "0"}}]', "another size"),
])
def test_bad_results_exit_1_with_one_line(tmp_path, text, message):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    r = run_cli("eval", "--coco", ANN, "--results", bad)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("maskseg: error:")]
    assert len(errors) == 1 and message in errors[0] and str(bad) in errors[0]
    assert "Traceback" not in r.stderr


def test_images_through_a_tiny_model(tmp_path, tiny_checkpoint):
    """--images: the predict pipeline over ANN's images (tiny dataset, tiny model), then COCOeval."""
    ann = load_ann()
    keep = {img["id"]: img for img in ann["images"] if img["file_name"] in ("6.jpg", "7.jpg", "8.jpg")}
    images = tmp_path / "images"
    images.mkdir()
    for img in keep.values():
        shutil.copy(DATA / "images" / img["file_name"], images / img["file_name"])
    ann["images"] = list(keep.values())
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
    ann_path = write(tmp_path / "ann.json", ann)
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = ("eval", "--coco", ann_path, "--images", images, "--weights", tiny_checkpoint, "-o", out,
            "--device", "cpu", "--json", report)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stdout.splitlines() if "Average" in line]) == 12
    assert {"predictions.json", "results.json", "eval_results.json", "journal.jsonl"} <= {p.name for p in out.iterdir()}

    # maskseg's results.json names images by maskseg's ids; map them to ANN's through predictions.json's
    # file names and let pycocotools evaluate that: the CLI's numbers must be the same to every digit.
    names = {i["id"]: i["file_name"] for i in json.loads((out / "predictions.json").read_text())["images"]}
    ann_ids = {img["file_name"]: i for i, img in keep.items()}
    results = json.loads((out / "results.json").read_text())
    assert results, "the tiny model should detect something"
    mapped = write(tmp_path / "mapped.json", [{**d, "image_id": ann_ids[names[d["image_id"]]]} for d in results])
    for t in ("bbox", "segm"):
        ev, _ = pycocotools_eval(ann_path, mapped, t)
        assert stats_of(report, t) == ev.stats.tolist()

    # a rerun resumes: nothing is segmented again, the numbers stay
    first = json.loads(report.read_text())["metrics"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "0 images to segment, 3 already done" in r.stderr
    assert json.loads(report.read_text())["metrics"] == first

    # --results on maskseg's own predictions.json gives the same numbers
    again = tmp_path / "again.json"
    r = run_cli("eval", "--coco", ann_path, "--results", out / "predictions.json", "--json", again, "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(again.read_text())["metrics"] == first


def test_images_missing_from_the_folder(tmp_path, tiny_checkpoint):
    r = run_cli("eval", "--coco", ANN, "--images", tmp_path, "--weights", tiny_checkpoint, "-o", tmp_path / "out")
    assert r.returncode == 1
    assert "18 of ANN's 18 images are not in" in r.stderr and "Traceback" not in r.stderr
