"""The json writer: one file per image, the same detections as predictions.json, with class names."""

from __future__ import annotations

import json
import os

from maskseg.atomic import TEMP_MARK

from .conftest import load_predictions


def test_one_file_per_image_mirrors_the_inputs(annotation_run):
    pred = load_predictions(annotation_run)
    names = {c["id"]: c["name"] for c in pred["categories"]}
    files = sorted(p.relative_to(annotation_run / "json").as_posix() for p in (annotation_run / "json").rglob("*.json"))
    assert files == sorted(im["file_name"] + ".json" for im in pred["images"])
    assert not list(annotation_run.rglob(TEMP_MARK + "*"))
    for im in pred["images"]:
        doc = json.loads((annotation_run / "json" / (im["file_name"] + ".json")).read_text())
        assert doc["image"]["id"] == im["id"] and doc["image"]["file_name"] == im["file_name"]
        assert (doc["image"]["width"], doc["image"]["height"]) == (im["width"], im["height"])
        anns = [a for a in pred["annotations"] if a["image_id"] == im["id"]]
        assert len(doc["annotations"]) == len(anns)
        for mine, theirs in zip(doc["annotations"], anns, strict=True):
            assert mine["category_name"] == names[theirs["category_id"]]
            for key in ("category_id", "bbox", "score", "area", "segmentation"):
                assert mine[key] == theirs[key]


def test_rerun_rewrites_nothing_and_overwrite_clears(annotation_run, tiny_checkpoint, tmp_path):
    """A second run over the same inputs finds nothing new: every writer's files stay as they were; with
    --overwrite the annotation-tool outputs go too (then come back)."""
    import shutil

    from tests.conftest import run_cli

    from .conftest import ANNOTATION_WRITERS

    out = tmp_path / "out"
    shutil.copytree(annotation_run, out, symlinks=True)
    (out / ".maskseg.lock").unlink()
    photos = os.path.commonpath([os.path.realpath(p) for p in (out / "yolo" / "images").rglob("*.*")])
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.is_symlink() and p.name != ".maskseg.lock")
    before = {p: p.stat().st_mtime_ns for p in files}
    r = run_cli("predict", photos, "-o", out, "--weights", tiny_checkpoint, "--writers", ANNOTATION_WRITERS,
                "--score-thresh", "0.3")
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == before
    (out / "yolo" / "labels" / "stale.txt").write_text("0 0 0 1 0 1 1\n")
    r = run_cli("predict", photos, "-o", out, "--weights", tiny_checkpoint, "--writers", "coco", "--overwrite",
                "--score-thresh", "0.3")
    assert r.returncode == 0, r.stderr
    for gone in ("yolo", "json", "predictions_polygons.json", "labelstudio_tasks.json", "labelstudio_config.xml"):
        assert not (out / gone).exists(), gone
