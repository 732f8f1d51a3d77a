"""The json writer: one file per image, the same detections as predictions.json, with class names."""

from __future__ import annotations

import json

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
