"""An Ultralytics YOLO-seg dataset (data.yaml, images/, labels/) read as a COCO set for training.

The layout is Ultralytics' (https://docs.ultralytics.com/datasets/segment/): data.yaml names the classes
(``names``: a list, or index -> name) and the training images (``train``: a folder, a list file of image
paths, or a list of those, relative to ``path`` or to data.yaml's folder); an image's labels are found by
replacing its last ``/images/`` with ``/labels/`` and its extension with ``.txt``; each line is
``<class-index> <x1> <y1> ... <xn> <yn>`` normalised to [0, 1] (a 5-field detection line
``<class> <cx> <cy> <w> <h>`` is taken as a rectangle). maskseg's own yolo writer adds ``category_ids``
(class index -> category id), which gives the categories their ids back; otherwise id = index + 1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import IMAGE_EXTENSIONS
from ..errors import SourceError
from .data import CocoSet, check_coco


def is_yolo_yaml(path: str | Path) -> bool:
    """Whether ``path`` names a YOLO dataset's YAML file (by its extension)."""
    return str(path).lower().endswith((".yaml", ".yml"))


def yolo_root(data_yaml: str | Path) -> Path:
    """The folder a data.yaml's paths are relative to: its ``path`` (relative to the file's folder), or
    the file's folder."""
    data_yaml = Path(data_yaml)
    path = _load_yaml(data_yaml).get("path")
    return data_yaml.parent / path if path else data_yaml.parent


def label_path(image: str) -> str:
    """Ultralytics' rule: the last ``/images/`` of the image path becomes ``/labels/``, the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(image.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def read_yolo(data_yaml: str | Path, split: str = "train") -> CocoSet:
    """The ``split`` images of a YOLO-seg dataset and their polygons as a checked COCO set: file names
    relative to ``yolo_root(data_yaml)``, image and annotation ids from 1 in path order."""
    data_yaml = Path(data_yaml)
    config = _load_yaml(data_yaml)
    names = config.get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise SourceError(f"{data_yaml}: no 'names' (a list of class names, or class index -> name)")
    ids = config.get("category_ids") or {k: int(k) + 1 for k in names}
    categories = [{"id": int(ids[k]), "name": str(names[k])} for k in sorted(names)]
    cat_of = {int(k): int(ids[k]) for k in names}
    root = yolo_root(data_yaml)
    images, annotations = [], []
    for image in _split_images(data_yaml, root, config.get(split)):
        width, height = _upright_size(image)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": os.path.relpath(image, root).replace(os.sep, "/"),
                       "width": width, "height": height})
        labels = Path(label_path(str(image)))
        if not labels.is_file():  # an image without a label file is a negative
            continue
        for n, line in enumerate(labels.read_text(encoding="utf-8").splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{labels}:{n}"
            try:
                k, values = int(fields[0]), [float(v) for v in fields[1:]]
            except ValueError:
                raise SourceError(f"{where}: expected a class index and numbers, found {line!r:.80}") from None
            if k not in cat_of:
                raise SourceError(f"{where}: class {k} is not in {data_yaml}'s names")
            if len(values) == 4:  # a detection line: the box as a rectangle
                cx, cy, w, h = values
                x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
                values = [x0, y0, x1, y0, x1, y1, x0, y1]
            if len(values) < 6 or len(values) % 2:
                raise SourceError(f"{where}: a polygon needs 3 or more x y pairs, found {len(values)} numbers")
            xs = [min(max(v, 0.0), 1.0) * width for v in values[0::2]]
            ys = [min(max(v, 0.0), 1.0) * height for v in values[1::2]]
            polygon = [round(c, 3) for xy in zip(xs, ys, strict=True) for c in xy]
            area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_of[k],
                                "segmentation": [polygon], "area": round(area, 2), "iscrowd": 0,
                                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
    if not images:
        raise SourceError(f"{data_yaml}: no images in its '{split}' split")
    return check_coco({"images": images, "annotations": annotations, "categories": categories}, data_yaml)


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: dataset file not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SourceError(f"{path}: not a readable YAML file ({exc})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{path}: expected a YOLO data.yaml mapping (names, train, ...)")
    return config


def _split_images(data_yaml: Path, root: Path, entries: Any) -> list[Path]:
    if not entries:
        raise SourceError(f"{data_yaml}: no image folder or list for this split")
    found: list[Path] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        where = root / str(entry)
        if where.is_dir():
            found += [p for p in where.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        elif where.is_file():  # a list file: one image path a line, relative to the root
            for line in where.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    found.append(root / line.strip())
        else:
            raise SourceError(f"{data_yaml}: {where} is neither a folder nor a list file")
    return sorted(set(found))


def _upright_size(image: Path) -> tuple[int, int]:
    """(width, height) as maskseg decodes the image (EXIF orientation applied), from its header."""
    from PIL import Image

    try:
        with Image.open(image) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except OSError as exc:
        raise SourceError(f"{image}: cannot read the image header ({exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
