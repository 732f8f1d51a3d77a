"""The yolo writer: an Ultralytics YOLO-seg tree, checked against the conventions of Ultralytics' format
docs (https://docs.ultralytics.com/datasets/segment/) by this test's own reading, not Ultralytics (AGPL):
labels found from image paths by replacing /images/ with /labels/ and the suffix with .txt; one line per
object, ``<class-index> <x1> <y1> <x2> <y2> ... <xn> <yn>``, coordinates normalised to [0, 1]; a
data.yaml whose ``names`` map class indices 0..nc-1 to names."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml
from pycocotools import mask as mask_utils

from .conftest import load_predictions

IMG_FORMATS = {"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm", "heic"}


def img2label_path(image: str) -> str:
    """Ultralytics' rule (``img2label_paths``): the last /images/ becomes /labels/, the suffix .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(image.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def read_yolo(root: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Every image under ``root/images`` -> its label lines as (class index, [K, 2] normalised points)."""
    out = {}
    for image in sorted((root / "images").rglob("*")):
        if image.is_dir():
            continue
        assert image.suffix[1:].lower() in IMG_FORMATS
        lines = Path(img2label_path(str(image))).read_text().splitlines()
        rows = []
        for line in lines:
            fields = line.split()
            cls, coords = int(fields[0]), np.array([float(v) for v in fields[1:]])
            assert len(coords) >= 6 and len(coords) % 2 == 0, line[:80]
            rows.append((cls, coords.reshape(-1, 2)))
        out[str(image.relative_to(root / "images"))] = rows
    return out


def test_yolo_tree_follows_ultralytics_conventions(annotation_run):
    root = annotation_run / "yolo"
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data["names"] == {0: "date", 1: "fig", 2: "hazelnut"} and data["nc"] == 3
    assert (root / data["train"]).is_dir() and (root / data["val"]).is_dir()
    index_to_id = data["category_ids"]
    labels = read_yolo(root)
    pred = load_predictions(annotation_run)
    by_name = {im["file_name"]: im for im in pred["images"]}
    # x.jpg and x.png share a stem: each gets its own image and label file.
    assert sorted(labels) == ["sub/7.jpg", "sub/chelsea.png", "x_jpg.jpg", "x_png.png"]
    for image in (root / "images").rglob("*.*"):
        assert image.is_symlink() and image.resolve().stat().st_size > 0
    for name, rows in labels.items():
        rel = os.path.realpath(root / "images" / name)
        im = next(i for i in pred["images"] if rel.endswith(i["file_name"]))
        anns = [a for a in pred["annotations"] if a["image_id"] == im["id"] and a["area"] > 0]
        assert len(rows) == len(anns) > 0
        for (cls, pts), ann in zip(rows, anns, strict=True):
            assert 0 <= cls < data["nc"] and index_to_id[cls] == ann["category_id"]
            assert pts.min() >= 0 and pts.max() <= 1
            # The polygon spans the mask's pixels (pixel edges; simplification moves it at most ~1 px).
            px = pts * [im["width"], im["height"]]
            seg = ann["segmentation"]
            x, y, w, h = mask_utils.toBbox({"size": seg["size"], "counts": seg["counts"].encode()}).tolist()
            assert abs(px[:, 0].min() - x) <= 1 and abs(px[:, 1].min() - y) <= 1
            assert abs(px[:, 0].max() - (x + w)) <= 1 and abs(px[:, 1].max() - (y + h)) <= 1
    assert set(by_name) == {"x.jpg", "x.png", "sub/7.jpg", "sub/chelsea.png"}
