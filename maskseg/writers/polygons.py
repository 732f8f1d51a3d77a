"""``OUT/predictions_polygons.json``: the COCO dataset of ``predictions.json`` with polygon masks.

Rebuilt from the journal like ``predictions.json`` (same image and annotation ids, boxes, scores and
areas), so it is resumable and swapped in atomically. Each RLE is decoded over its own extent only
(``BoxMask.from_rle``) and traced there: no full-image array per mask.
"""

from __future__ import annotations

from ..detections import BoxMask
from .coco import CocoWriter
from .shapes import mask_polygons


def coco_polygons(rle: dict, tolerance: float) -> list[list[float]]:
    """A COCO RLE as COCO polygon segmentation: one flat [x1, y1, x2, y2, ...] list per part, every
    part kept, holes filled (COCO polygons cannot express them), coordinates rounded to 0.01 px."""
    return [[round(float(v), 2) for v in part.ravel()] for part in mask_polygons(BoxMask.from_rle(rle), tolerance)]


class PolygonsWriter(CocoWriter):
    """``predictions.json`` with ``segmentation`` as polygons; ``area`` stays the mask's pixel count
    (a filled hole would otherwise count), and ``info.polygon_tolerance`` says how they were simplified."""

    filename = "predictions_polygons.json"

    def _info(self) -> dict:
        return {"polygon_tolerance": self.run.options.polygon_tolerance}

    def _annotation(self, det: dict) -> dict:
        seg = det.get("segmentation")
        if seg is None:
            return det
        return {**det, "segmentation": coco_polygons(seg, self.run.options.polygon_tolerance)}
