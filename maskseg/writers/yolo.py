"""``OUT/yolo/``: the predictions as an Ultralytics YOLO-seg dataset.

```
OUT/yolo/data.yaml                 names in class-index order; category_ids: class index -> category id
OUT/yolo/images/<rel stem><ext>    a symbolic link to each input image
OUT/yolo/labels/<rel stem>.txt     one line per detection: class index, then x y pairs in [0, 1]
```

Ultralytics finds an image's labels by replacing ``/images/`` with ``/labels/`` in its path and the
extension with ``.txt``, hence the links: ``OUT/yolo`` is a dataset it (and any YOLO-seg reader) can
train on as it is. Label files are written per image, atomically; ``data.yaml`` at checkpoints.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path, PurePosixPath

import numpy as np

from ..atomic import TEMP_MARK, atomic_write_bytes
from ..detections import Detections
from .base import BaseWriter, ImageRecord, RunContext
from .shapes import join_parts, mask_polygons

DATA_YAML = "data.yaml"


def yolo_line(class_index: int, points: np.ndarray, width: int, height: int) -> str:
    """``"<class> x1 y1 x2 y2 ..."``: ``points`` [K, 2] (x, y) pixels normalised by the image size,
    clipped to [0, 1], 6 decimals (Ultralytics' own converters write 6 too)."""
    norm = np.clip(points / np.array([width, height], dtype=np.float64), 0.0, 1.0)
    return " ".join([str(class_index), *(f"{v:.6f}" for v in norm.ravel())])


def _link(target: str, path: Path) -> None:
    """Make ``path`` a symbolic link to ``target``, replacing what is there in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = path.with_name(f"{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}-{path.name[:32]}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class YoloWriter(BaseWriter):
    """Class indices are the run's categories in id order (0, 1, ...); ``data.yaml`` maps them back to
    category ids. Each detection is one line: a mask of several parts becomes one polygon whose parts are
    joined by zero-width bridges (as Ultralytics' COCO converter does); a detection with an empty mask
    has no polygon and no line; box-only models write Ultralytics' detection lines (class cx cy w h)."""

    def open(self, run: RunContext) -> None:
        super().open(run)
        self.index = {c.id: k for k, c in enumerate(sorted(run.categories, key=lambda c: c.id))}

    def write(self, image: ImageRecord, detections: Detections) -> None:
        run, tol = self.run, self.run.options.polygon_tolerance
        lines = []
        for i in range(len(detections)):
            k = self.index.get(int(detections.labels[i]))
            if k is None:
                continue
            if detections.masks is None:
                x1, y1, x2, y2 = (float(v) for v in detections.boxes[i])
                cx, cy, w, h = (x1 + x2) / 2 / image.width, (y1 + y2) / 2 / image.height, \
                    (x2 - x1) / image.width, (y2 - y1) / image.height
                lines.append(f"{k} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
                continue
            parts = mask_polygons(detections.masks[i], tol)
            if parts:
                lines.append(yolo_line(k, join_parts(parts), image.width, image.height))
        atomic_write_bytes(run.output_path("yolo", "labels", image.out_stem + ".txt"),
                           "".join(line + "\n" for line in lines).encode("ascii"))
        suffix = PurePosixPath(image.rel_path).suffix
        _link(os.path.abspath(image.path), run.output_path("yolo", "images", image.out_stem + suffix))

    def checkpoint(self) -> None:
        self._write_data_yaml()

    def close(self) -> None:
        self._write_data_yaml()

    def _write_data_yaml(self) -> None:
        path = self.run.output_path("yolo", DATA_YAML)
        if not (self.run.changed or not path.exists()):
            return
        cats = sorted(self.run.categories, key=lambda c: c.id)
        # JSON strings are valid YAML scalars: names with quotes, colons or non-ASCII stay exact.
        text = [
            f"# Ultralytics YOLO-seg dataset written by maskseg ({self.run.model_name}) from its predictions.",
            "# Class indices are the categories in id order; category_ids maps each index back to the",
            "# category id used in predictions.json. `path` is left out: readers take this file's folder.",
            "train: images",
            "val: images",
            f"nc: {len(cats)}",
            "names:",
            *(f"  {k}: {json.dumps(c.name)}" for k, c in enumerate(cats)),
            "category_ids:",
            *(f"  {k}: {c.id}" for k, c in enumerate(cats)),
        ]
        atomic_write_bytes(path, ("\n".join(text) + "\n").encode("utf-8"))
