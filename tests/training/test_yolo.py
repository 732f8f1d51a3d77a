"""A YOLO-seg dataset read back for training: predict -> yolo writer -> ``read_yolo`` and the training data
loader give the same images, classes, boxes and masks as predictions.json; ``maskseg train --yolo`` trains."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskseg.errors import SourceError
from maskseg.training import CocoDetection, read_yolo, yolo_root

from ..cli.test_train import TINY_OPTIONS
from ..conftest import run_cli
from ..writers.conftest import annotation_run, load_predictions

__all__ = ["annotation_run"]  # the shared fixture, imported for pytest


def test_round_trip_through_the_yolo_writer(annotation_run):
    pred = load_predictions(annotation_run)
    data_yaml = annotation_run / "yolo" / "data.yaml"
    coco = read_yolo(data_yaml)
    assert [(c.id, c.name) for c in coco.categories] == [(c["id"], c["name"]) for c in pred["categories"]]
    root = yolo_root(data_yaml)
    assert len(coco.images) == len(pred["images"])
    dataset = CocoDetection(coco, root)
    label_of = {c.id: c.label for c in coco.categories}
    checked = 0
    for index, im in enumerate(coco.images):
        real = os.path.realpath(root / im.file_name)
        [theirs] = [i for i in pred["images"] if real.endswith(i["file_name"])]
        assert (im.width, im.height) == (theirs["width"], theirs["height"])
        anns = [a for a in pred["annotations"] if a["image_id"] == theirs["id"] and a["area"] > 0]
        image, target = dataset.load(index)
        assert tuple(image.shape[1:]) == (im.height, im.width)
        assert target["labels"].tolist() == [label_of[a["category_id"]] for a in anns]
        for box, mask, ann in zip(target["boxes"].tolist(), target["masks"].numpy(), anns, strict=True):
            seg = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            x, y, w, h = mask_utils.toBbox(seg).tolist()
            assert box == pytest.approx([x, y, x + w, y + h], abs=1.0)
            ref = mask_utils.decode(seg).astype(bool)
            assert (ref & ~mask.astype(bool)).sum() <= 0.1 * ref.sum()
            checked += 1
    assert checked == sum(1 for a in pred["annotations"] if a["area"] > 0) > 0


def test_foreign_yolo_dataset_and_its_errors(tmp_path):
    import cv2

    root = tmp_path / "ds"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "train" / "a.png"), np.zeros((50, 100, 3), np.uint8))
    cv2.imwrite(str(root / "images" / "train" / "b.png"), np.zeros((50, 100, 3), np.uint8))  # no labels: a negative
    (root / "labels" / "train" / "a.txt").write_text("1 0.1 0.2 0.5 0.2 0.5 0.6\n0 0.5 0.5 0.2 0.4\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [cat, dog]\n")
    coco = read_yolo(root / "data.yaml")
    assert [(c.id, c.name) for c in coco.categories] == [(1, "cat"), (2, "dog")]  # id = index + 1
    assert [im.file_name for im in coco.images] == ["images/train/a.png", "images/train/b.png"]
    poly, box = coco.images[0].annotations
    assert poly["category_id"] == 2 and poly["segmentation"] == [[10.0, 10.0, 50.0, 10.0, 50.0, 30.0]]
    assert box["category_id"] == 1 and box["bbox"] == pytest.approx([40.0, 15.0, 20.0, 20.0])
    assert coco.images[1].annotations == ()
    (root / "labels" / "train" / "a.txt").write_text("5 0.1 0.2 0.5 0.2 0.5 0.6\n")
    with pytest.raises(SourceError, match=r"a.txt:1: class 5 is not in"):
        read_yolo(root / "data.yaml")
    (root / "labels" / "train" / "a.txt").write_text("0 0.1 0.2 0.5\n")
    with pytest.raises(SourceError, match=r"a.txt:1: a polygon needs 3 or more x y pairs"):
        read_yolo(root / "data.yaml")


@pytest.mark.slow
def test_train_cli_reads_the_yolo_writers_tree(annotation_run, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--yolo", annotation_run / "yolo" / "data.yaml", "-o", run, "--epochs", "1",
                "--val-split", "0.25", *TINY_OPTIONS)
    assert r.returncode == 0, r.stderr
    assert "on 3 images" in r.stderr and (run / "best.pt").is_file()
    pred = load_predictions(annotation_run)
    train, val = (json.loads((run / f"{s}.json").read_text()) for s in ("train", "val"))
    assert len(train["images"]) + len(val["images"]) == len(pred["images"])
    assert len(train["annotations"]) + len(val["annotations"]) == sum(1 for a in pred["annotations"] if a["area"])
    assert train["categories"] == [{"id": c["id"], "name": c["name"]} for c in pred["categories"]]
