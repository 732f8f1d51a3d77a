"""COCO reading for training: every record kind pycocotools accepts, clear errors, augmentations."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskseg.errors import SourceError
from maskseg.training.data import Augment, CocoDetection, collate, copy_paste, flip_and_jitter, read_coco

from ..conftest import ROOT

FRUITS = ROOT / "tests" / "data" / "fruits_nuts"


def _square(x0: int, y0: int, x1: int, y1: int, h: int = 48, w: int = 64) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture
def mixed_coco(tmp_path) -> Path:
    """Three 64x48 PNGs; categories 42 and 7 (unsorted, non-contiguous); annotation id 0 (a polygon),
    uncompressed RLE, compressed RLE, a crowd region, and an image with no annotations."""
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "empty.png"):
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    compressed = mask_utils.encode(np.asfortranarray(_square(30, 10, 50, 40)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    uncompressed_mask = _square(5, 20, 25, 45)
    counts, previous, run = [], 0, 0  # COCO's uncompressed RLE: column-major runs, zeros first
    for value in uncompressed_mask.flatten(order="F").tolist():
        if value != previous:
            counts.append(run)
            previous, run = value, 0
        run += 1
    counts.append(run)
    crowd = mask_utils.encode(np.asfortranarray(_square(0, 0, 10, 10)))
    data = {
        "images": [{"id": 0, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 7, "file_name": "b.png", "width": 64, "height": 48},
                   {"id": 3, "file_name": "empty.png", "width": 64, "height": 48}],
        "categories": [{"id": 42, "name": "fig"}, {"id": 7, "name": "date"}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 42, "iscrowd": 0, "bbox": [10, 5, 20, 15],
             "segmentation": [[10, 5, 30, 5, 30, 20, 10, 20]], "area": 300},
            {"id": 5, "image_id": 0, "category_id": 7, "iscrowd": 0, "bbox": [5, 20, 20, 25],
             "segmentation": {"size": [48, 64], "counts": counts}, "area": 500},
            {"id": 6, "image_id": 7, "category_id": 42, "iscrowd": 0, "bbox": [30, 10, 20, 30],
             "segmentation": compressed, "area": 600},
            {"id": 9, "image_id": 7, "category_id": 7, "iscrowd": 1, "bbox": [0, 0, 10, 10],
             "segmentation": {"size": [48, 64], "counts": crowd["counts"].decode("ascii")}, "area": 100},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_reads_polygons_rle_crowd_and_non_contiguous_ids(mixed_coco):
    coco = read_coco(mixed_coco)
    assert [(c.label, c.id, c.name) for c in coco.categories] == [(1, 7, "date"), (2, 42, "fig")]
    assert [im.id for im in coco.images] == [0, 7, 3]
    dataset = CocoDetection(coco, mixed_coco.parent)
    oracle = COCO(str(mixed_coco))
    for index, image_id in enumerate((0, 7, 3)):
        image, target = dataset[index]
        assert image.dtype == torch.float32 and image.shape == (3, 48, 64) and float(image.max()) <= 1.0
        anns = [a for a in oracle.loadAnns(oracle.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]]
        assert target["image_id"] == image_id
        assert target["labels"].tolist() == [{7: 1, 42: 2}[a["category_id"]] for a in anns]
        assert target["masks"].shape == (len(anns), 48, 64)
        for mask, ann in zip(target["masks"], anns, strict=True):
            assert np.array_equal(mask.numpy(), oracle.annToMask(ann))
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert target["boxes"].reshape(-1, 4).tolist() == expected
    assert coco.num_instances == 3  # the crowd region is not an instance to learn


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["annotations"][1].update(category_id=3), r"annotations\[1\] \(id 5\): category_id 3 is not"),
    (lambda d: d["annotations"][0]["segmentation"][0].pop(), r"annotations\[0\] \(id 0\): a polygon must be"),
    (lambda d: d["annotations"][2].update(id=0), r"annotations\[2\] \(id 0\): annotation id 0 appears twice"),
    (lambda d: d["annotations"][2]["segmentation"].update(size=[10, 10]), r"annotations\[2\] \(id 6\): RLE size"),
    (lambda d: d["annotations"][1].update(image_id=99), r"annotations\[1\] \(id 5\): image_id 99"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), r"annotations\[0\] \(id 0\): bbox must be"),
    (lambda d: d["images"][1].pop("width"), r"images\[1\] \(id 7\): 'width' must be a positive integer"),
    (lambda d: d.pop("categories"), r"no 'categories' list"),
])
def test_malformed_file_names_the_first_bad_record(mixed_coco, edit, message):
    data = json.loads(mixed_coco.read_text())
    edit(data)
    mixed_coco.write_text(json.dumps(data))
    with pytest.raises(SourceError, match=message) as info:
        read_coco(mixed_coco)
    assert str(mixed_coco) in str(info.value)


def test_unreadable_json_and_image_of_another_size(mixed_coco):
    broken = mixed_coco.with_name("broken.json")
    broken.write_text('{"images": [')
    with pytest.raises(SourceError, match="not a readable JSON file"):
        read_coco(broken)
    data = json.loads(mixed_coco.read_text())
    data["images"][0]["width"] = 65
    data["annotations"] = data["annotations"][2:3]
    mixed_coco.write_text(json.dumps(data))
    with pytest.raises(SourceError, match=r"a.png: decoded size 64x48 differs from the 65x48"):
        CocoDetection(read_coco(mixed_coco), mixed_coco.parent)[0]


def test_val_split_holds_out_the_last_images():
    train, val = read_coco(FRUITS / "trainval.json").split(0.2)
    assert [im.id for im in val.images] == [14, 15, 16, 17]
    assert [im.file_name for im in val.images] == ["6.jpg", "7.jpg", "8.jpg", "9.jpg"]
    assert [im.id for im in train.images] == list(range(14))
    assert {a["image_id"] for a in val.data["annotations"]} == {14, 15, 16, 17}
    assert len(train.data["annotations"]) + len(val.data["annotations"]) == 165


def _bounds(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_flips_and_transpose_move_boxes_with_the_pixels():
    image = torch.zeros((3, 48, 64), dtype=torch.uint8)
    image[0, 10:30, 5:20] = 200
    mask = torch.from_numpy(_square(5, 10, 20, 30))[None]
    target = {"boxes": torch.tensor([[5.0, 10.0, 20.0, 30.0]]), "labels": torch.tensor([1]), "masks": mask}
    for aug, shape in ((Augment(hflip=1.0), (48, 64)), (Augment(vflip=1.0), (48, 64)),
                       (Augment(transpose=1.0), (64, 48)), (Augment(1.0, 1.0, 1.0), (64, 48))):
        out_image, out = flip_and_jitter(image, target, aug)
        assert out["masks"].shape[1:] == out_image.shape[1:] == shape
        assert out["boxes"][0].tolist() == _bounds(out["masks"][0])
        assert torch.equal(out_image[0] > 0, out["masks"][0] > 0)


def test_colour_jitter_changes_pixels_not_targets():
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    target = {"boxes": torch.tensor([[1.0, 2.0, 9.0, 9.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones((1, 32, 32), dtype=torch.uint8)}
    out_image, out = flip_and_jitter(image, target, Augment(color_jitter=0.5))
    assert out_image.dtype == torch.uint8 and not torch.equal(out_image, image)
    assert torch.equal(out["boxes"], target["boxes"]) and torch.equal(out["masks"], target["masks"])


def test_copy_paste_occludes_and_keeps_targets_consistent():
    """A big square under three pasted ones: no pixel ends up in two instances, boxes follow the masks,
    the covered instance is trimmed or dropped and the pasted pixels come from the source image."""
    torch.manual_seed(3)
    image = torch.zeros((3, 48, 64), dtype=torch.uint8)
    big = torch.from_numpy(_square(4, 4, 60, 44))[None]
    target = {"boxes": torch.tensor([[4.0, 4.0, 60.0, 44.0]]), "labels": torch.tensor([1]), "masks": big}
    src_image = torch.full((3, 48, 64), 250, dtype=torch.uint8)
    squares = [(2, 2, 14, 14), (20, 5, 34, 19), (40, 25, 56, 41)]
    src = {"boxes": torch.tensor(squares, dtype=torch.float32), "labels": torch.tensor([2, 3, 2]),
           "masks": torch.stack([torch.from_numpy(_square(*sq)) for sq in squares])}
    for _ in range(5):
        out_image, out = copy_paste(image, target, src_image, src)
        n = len(out["labels"])
        assert n >= 2 and out["masks"].shape == (n, 48, 64) and out["boxes"].shape == (n, 4)
        assert int(out["masks"].sum(0).max()) == 1
        for box, mask in zip(out["boxes"], out["masks"], strict=True):
            assert box.tolist() == _bounds(mask)
        pasted = out["masks"][-1].bool()
        assert bool((out_image[:, pasted] == 250).all())
        if out["labels"][0] == 1:
            assert int(out["masks"][0].sum()) < int(big.sum())
        assert set(out["labels"][-(n - 1):].tolist()) <= {2, 3}
    assert int(image.sum()) == 0  # the input is left untouched


def test_collate_and_fruits_nuts_sample():
    dataset = CocoDetection(read_coco(FRUITS / "trainval.json"), FRUITS / "images", Augment(0.5, 0.5, 0.5, 0.2, 0.5))
    torch.manual_seed(0)
    images, targets = collate([dataset[0], dataset[5]])
    assert len(images) == len(targets) == 2
    for image, target in zip(images, targets, strict=True):
        assert image.shape[0] == 3 and image.shape[1:] == target["masks"].shape[1:]
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) > 0
        widths = target["boxes"][:, 2:] - target["boxes"][:, :2]
        assert bool((widths >= 1).all())
