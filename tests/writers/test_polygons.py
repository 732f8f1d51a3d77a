"""The polygons writer: every part of a mask kept, area from the mask, box-local tracing, and a COCO
file pycocotools loads with the same images, boxes, scores and ids as predictions.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskseg.detections import BoxMask, Detections
from maskseg.journal import Journal
from maskseg.models import Category
from maskseg.writers import RunContext, load_writers
from maskseg.writers.polygons import coco_polygons
from maskseg.writers.shapes import join_parts, mask_polygons
from tests.conftest import SAMPLES, run_cli

from .conftest import load_predictions


def _raster(polys: list[list[float]], h: int, w: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)


def _two_parts_with_hole() -> tuple[np.ndarray, BoxMask]:
    full = np.zeros((40, 50), bool)
    full[5:25, 5:25] = True  # a square with a hole
    full[12:16, 12:16] = False
    full[30:36, 30:45] = True  # a second part
    full[2, 47] = True  # a single pixel: a part too
    return full, BoxMask(3, 2, full[2:36, 3:48].copy(), (40, 50))


def test_every_part_kept_and_edges_followed():
    full, mask = _two_parts_with_hole()
    assert mask.full().tolist() == full.tolist()
    parts = mask_polygons(mask, tolerance=0)
    assert len(parts) == 3
    raster = _raster([p.ravel().tolist() for p in parts], 40, 50)
    filled = full.copy()
    filled[12:16, 12:16] = True  # holes cannot be expressed: the outline fills them
    assert raster.tolist() == filled.tolist()
    # Each part's outline runs along its pixels' edges (pixel x covers [x, x+1)), not their centres.
    xs = sorted(p[:, 0].min() for p in parts)
    assert xs[0] == pytest.approx(5.25) and xs[-1] == pytest.approx(47.25)


def test_coco_polygons_from_rle_are_box_local_and_simplified():
    full, mask = _two_parts_with_hole()
    rle = mask.rle()
    decoded = BoxMask.from_rle(rle)
    assert (decoded.x0, decoded.y0) == (5, 2) and decoded.full().tolist() == full.tolist()
    exact = coco_polygons(rle, 0)
    assert len(exact) == 3 and all(len(p) >= 6 and len(p) % 2 == 0 for p in exact)
    circle = np.zeros((200, 200), np.uint8)
    import cv2

    cv2.circle(circle, (100, 100), 60, 1, -1)
    rle = BoxMask(0, 0, circle.astype(bool), (200, 200)).rle()
    fine, coarse = coco_polygons(rle, 0), coco_polygons(rle, 2)
    assert len(coarse[0]) < len(fine[0]) / 3
    for polys in (fine, coarse):
        r = _raster(polys, 200, 200)
        iou = (r & circle.astype(bool)).sum() / (r | circle.astype(bool)).sum()
        assert iou > 0.98


def test_join_parts_keeps_every_part_in_one_ring():
    _, mask = _two_parts_with_hole()
    parts = mask_polygons(mask, 0)
    ring = join_parts(parts)
    assert len(ring) == sum(len(p) for p in parts) + 2 * (len(parts) - 1)
    for p in parts:  # every vertex of every part is on the ring
        assert {tuple(v) for v in p.tolist()} <= {tuple(v) for v in ring.tolist()}


def test_writer_from_journal_keeps_ids_boxes_and_mask_area(tmp_path):
    full, mask = _two_parts_with_hole()
    dets = Detections(np.array([[3, 2, 48, 36]], np.float32), np.array([0.9], np.float32),
                      np.array([2], np.int64), (mask,), (40, 50))
    journal = Journal(tmp_path)
    journal.add({"kind": "done", "image_id": 1, "rel_path": "a.jpg", "path": "/x/a.jpg", "size": 1, "mtime_ns": 1,
                 "width": 50, "height": 40, "writers": ["polygons"], "detections": dets.to_coco()})
    journal.flush()
    run = RunContext(tmp_path, journal, [Category(2, 2, "fig")], "small", changed=True)
    for w in load_writers(["coco", "polygons"]):
        w.open(run)
        w.close()
    journal.close()
    coco = COCO(str(tmp_path / "predictions_polygons.json"))
    [ann] = coco.loadAnns(coco.getAnnIds())
    assert ann["area"] == int(full.sum())  # from the mask: the filled hole does not count
    assert len(ann["segmentation"]) == 3
    assert coco.annToMask(ann).sum() == int(full.sum()) + 16
    rle_ann = json.loads((tmp_path / "predictions.json").read_text())["annotations"][0]
    assert {k: v for k, v in ann.items() if k != "segmentation"} == \
        {k: v for k, v in rle_ann.items() if k != "segmentation"}
    assert json.loads((tmp_path / "predictions_polygons.json").read_text())["info"]["polygon_tolerance"] == 0.75


def test_cli_polygons_match_predictions(annotation_run):
    rle = load_predictions(annotation_run)
    poly = json.loads((annotation_run / "predictions_polygons.json").read_text())
    assert poly["images"] == rle["images"] and poly["categories"] == rle["categories"]
    assert len(poly["annotations"]) == len(rle["annotations"]) > 0
    coco = COCO(str(annotation_run / "predictions_polygons.json"))
    missed = total = 0
    for a, b in zip(poly["annotations"], rle["annotations"], strict=True):
        assert (a["id"], a["image_id"], a["bbox"], a["score"], a["area"]) == \
            (b["id"], b["image_id"], b["bbox"], b["score"], b["area"])
        assert all(len(p) >= 6 for p in a["segmentation"])
        ref = mask_utils.decode({"size": b["segmentation"]["size"], "counts": b["segmentation"]["counts"]}) > 0
        missed += int((ref & ~(coco.annToMask(a) > 0)).sum())
        total += int(ref.sum())
    # The random model's masks are thin stripes, the hardest case for simplification; still, nearly every
    # mask pixel lies inside the polygons (outlines follow pixel edges, holes are filled).
    assert missed <= 0.03 * total


@pytest.mark.slow
def test_demo_polygons_agree_with_masks(tmp_path):
    """The default tolerance on the demo model's real masks: mask IoU of polygon vs RLE >= 0.95."""
    out = tmp_path / "out"
    proc = run_cli("predict", SAMPLES / "fruits_nuts" / "6.jpg", SAMPLES / "fruits_nuts" / "9.jpg", "-o", out,
                   "--model", "demo", "--writers", "coco,polygons")
    assert proc.returncode == 0, proc.stderr
    rle = load_predictions(out)["annotations"]
    poly = json.loads((out / "predictions_polygons.json").read_text())["annotations"]
    assert len(rle) >= 10
    ious = []
    for a, b in zip(poly, rle, strict=True):
        h, w = b["segmentation"]["size"]
        ref = {"size": [h, w], "counts": b["segmentation"]["counts"].encode()}
        drawn = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
        inter = mask_utils.area(mask_utils.merge([ref, drawn], intersect=True))
        ious.append(inter / mask_utils.area(mask_utils.merge([ref, drawn])))
    assert np.mean(ious) >= 0.97 and np.percentile(ious, 10) >= 0.95


def test_tolerance_is_a_setting_of_out(tmp_path):
    from maskseg.config import PredictConfig, WriterOptions
    from maskseg.outdir import settings_of

    assert "polygon_tolerance" not in settings_of(PredictConfig())  # earlier run.json files still match
    assert settings_of(PredictConfig(writer_options=WriterOptions(polygon_tolerance=0)))["polygon_tolerance"] == 0
