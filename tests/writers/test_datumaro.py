"""Datumaro, the format library CVAT uses for its COCO 1.0 import, reads predictions.json (RLE masks) and
predictions_polygons.json with the same images, boxes, classes, scores and masks as maskseg wrote.

Datumaro finds a COCO dataset by its layout (annotations/instances_<subset>.json beside images/), as in
the zip CVAT takes; the test lays the files out that way. Datumaro 1.13 (the newest release) reads YOLO
detection lines only (5 fields), not YOLO-seg polygons: the YOLO tree is checked in test_yolo.py.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest
from pycocotools import mask as mask_utils

from .conftest import load_predictions

dm = pytest.importorskip("datumaro", reason="datumaro is not installed (pip install -e '.[dev]')")


def _import(annotation_run, tmp_path, filename, *, drop: str | None = None):
    """Datumaro's import of OUT/<filename> laid out as CVAT's COCO zip; ``drop`` leaves one image out."""
    doc = json.loads((annotation_run / filename).read_text())
    if drop is not None:
        [gone] = [im["id"] for im in doc["images"] if im["file_name"] == drop]
        doc["images"] = [im for im in doc["images"] if im["id"] != gone]
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != gone]
    root = tmp_path / filename.replace(".json", "")
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_default.json").write_text(json.dumps(doc))
    photos = os.path.commonpath([os.path.realpath(p) for p in (annotation_run / "yolo" / "images").rglob("*.*")])
    os.symlink(photos, root / "images")
    return dm.Dataset.import_from(str(root), "coco_instances"), doc


def test_datumaro_names_images_without_extension(annotation_run, tmp_path):
    """Datumaro (so CVAT) keys images by file name without extension: x.jpg and x.png in one folder collide
    there (maskseg keeps both; README says to give such inputs distinct stems before importing)."""
    from datumaro.components.errors import RepeatedItemError

    with pytest.raises(RepeatedItemError):
        ds, _ = _import(annotation_run, tmp_path, "predictions.json")
        list(ds)


@pytest.mark.parametrize("filename", ["predictions.json", "predictions_polygons.json"])
def test_datumaro_reads_what_maskseg_wrote(annotation_run, tmp_path, filename):
    pred = load_predictions(annotation_run)
    ds, ours = _import(annotation_run, tmp_path, filename, drop="x.png")
    names = [c.name for c in ds.categories()[dm.AnnotationType.label]]
    assert names == [c["name"] for c in pred["categories"]]
    label_to_id = {k: next(c["id"] for c in pred["categories"] if c["name"] == n) for k, n in enumerate(names)}
    by_image = defaultdict(list)
    for a in ours["annotations"]:
        by_image[a["image_id"]].append(a)
    assert len(ds) == len(ours["images"]) == len(pred["images"]) - 1
    seen = 0
    for item in ds:
        image_id = item.attributes["id"]
        im = next(i for i in pred["images"] if i["id"] == image_id)
        assert item.media.size == (im["height"], im["width"])
        boxes = sorted((a for a in item.annotations if a.type == dm.AnnotationType.bbox), key=lambda a: a.id)
        expected = sorted(by_image[image_id], key=lambda a: a["id"])
        assert len(boxes) == len(expected) > 0
        for box, ann in zip(boxes, expected, strict=True):
            assert box.id == ann["id"] and label_to_id[box.label] == ann["category_id"]
            assert box.get_bbox() == pytest.approx(ann["bbox"], abs=1e-3)
            assert box.attributes["score"] == pytest.approx(ann["score"])
            shapes = [a for a in item.annotations if a.id == ann["id"] and a.type != dm.AnnotationType.bbox]
            assert all(label_to_id[s.label] == ann["category_id"] for s in shapes)
            if isinstance(ann["segmentation"], dict):  # RLE: one mask, the same pixels
                [mask] = shapes
                seg = ann["segmentation"]
                ref = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
                assert (mask.image.astype(bool) == ref.astype(bool)).all()
            else:  # polygons: every part, the same points
                assert len(shapes) == len(ann["segmentation"])
                assert sorted([round(v, 2) for v in s.points] for s in shapes) == sorted(ann["segmentation"])
            seen += 1
    assert seen == len(ours["annotations"])
