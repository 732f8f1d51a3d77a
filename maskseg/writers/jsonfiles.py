"""``OUT/json/<rel path>.json``: one file per image, written (atomically) as soon as it is done.

For pipelines that consume results while the run goes on: a file appears whole or not at all, and a
recomputed image replaces its file. Boxes are XYWH pixels as in COCO, masks compressed COCO RLE.
"""

from __future__ import annotations

from ..atomic import atomic_write_bytes
from ..detections import Detections
from ..jsonio import dumps
from .base import BaseWriter, ImageRecord


class JsonFilesWriter(BaseWriter):
    """Writes ``{"image": {...}, "model": ..., "annotations": [...]}`` per image; each annotation has
    category_id, category_name, bbox (XYWH), score, area and segmentation (RLE) when the model has masks."""

    def write(self, image: ImageRecord, detections: Detections) -> None:
        run = self.run
        doc = {
            "image": {"id": image.image_id, "file_name": image.rel_path, "path": image.path,
                      "width": image.width, "height": image.height},
            "model": run.model_name,
            "annotations": [{"category_id": a["category_id"], "category_name": run.category_name(a["category_id"]),
                             **{k: v for k, v in a.items() if k != "category_id"}} for a in image.annotations],
        }
        atomic_write_bytes(run.output_path("json", image.rel_path + ".json"), (dumps(doc) + "\n").encode("utf-8"))
