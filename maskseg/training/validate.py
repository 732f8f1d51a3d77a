"""The COCOeval glue used during training: a module's bbox and segm AP on a validation ``CocoSet``."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from .data import CocoDetection, CocoSet


def evaluate_module(module: Any, coco: CocoSet, image_dir: str | Path, device: Any, min_size: int, *,
                    score_thresh: float = 0.05, mask_thresh: float = 0.5) -> dict[str, float]:
    """COCO bbox and segm AP/AP50/AP75 (pycocotools COCOeval) of ``module`` on ``coco``'s images.

    Runs torchvision's own forward and postprocess (full-image masks, as its reference evaluation does)
    at short side ``min_size``; the module is left in train mode with its thresholds restored.
    """
    import numpy as np
    import torch
    from pycocotools import mask as mask_utils

    label_to_id = {c.label: c.id for c in coco.categories}
    dataset = CocoDetection(coco, image_dir)
    heads, transform = module.roi_heads, module.transform
    saved = (heads.score_thresh, heads.detections_per_img, transform.min_size)
    heads.score_thresh, heads.detections_per_img, transform.min_size = score_thresh, 100, (min_size,)
    results: list[dict] = []
    module.eval()
    try:
        with torch.inference_mode():
            for index in range(len(dataset)):
                image, _ = dataset.load(index)
                out = module([image.to(device).float().div_(255.0)])[0]
                masks = (out["masks"][:, 0] > mask_thresh).cpu().numpy().astype(np.uint8)
                rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
                for k, (box, score, label) in enumerate(zip(out["boxes"].tolist(), out["scores"].tolist(),
                                                            out["labels"].tolist(), strict=True)):
                    rle = rles[k]
                    rle["counts"] = rle["counts"].decode("ascii")
                    results.append({"image_id": coco.images[index].id, "category_id": label_to_id[int(label)],
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    "score": float(score), "segmentation": rle})
    finally:
        heads.score_thresh, heads.detections_per_img, transform.min_size = saved
        module.train()
    return coco_ap(coco.data, results)


def coco_ap(gt: dict, results: list[dict]) -> dict[str, float]:
    """pycocotools COCOeval on a ground-truth dict and a results list -> {bbox,segm}_{AP,AP50,AP75}
    (0.0 when there are no detections). COCOeval's printed tables are kept off stdout.

    Annotation ids are renumbered from 1 (COCOeval marks matches by id, so an id 0 would count its
    match as a false positive), and a missing ``area``/``bbox`` is computed from the mask."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = {**gt, "annotations": [{**a, "id": k} for k, a in enumerate(gt["annotations"], start=1)]}
        ground.createIndex()
        for ann in ground.dataset["annotations"]:
            if "area" not in ann or "bbox" not in ann:
                rle = ground.annToRLE(ann)
                ann.setdefault("area", float(mask_utils.area(rle)))
                ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
        for iou_type in ("bbox", "segm"):
            if not results:
                out.update({f"{iou_type}_AP": 0.0, f"{iou_type}_AP50": 0.0, f"{iou_type}_AP75": 0.0})
                continue
            dets = ground.loadRes([dict(r) for r in results])
            ev = COCOeval(ground, dets, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats = [max(float(s), 0.0) for s in ev.stats[:3]]
            out.update({f"{iou_type}_AP": round(stats[0], 5), f"{iou_type}_AP50": round(stats[1], 5),
                        f"{iou_type}_AP75": round(stats[2], 5)})
    return out
