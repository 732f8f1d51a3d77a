"""The glue to pycocotools: ``COCO.loadRes`` and ``COCOeval`` evaluate/accumulate/summarize, their
failures turned into one-line messages, per-class AP and PR curves read from ``eval['precision']``
as detectron2 does. Nothing here re-implements matching.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import EvalInputError, MasksegError
from .inputs import GroundTruth, quiet
from .report import SUMMARY_STATS, ClassAP, IoUTypeMetrics, PRCurve, Stat

log = logging.getLogger(__name__)


@contextlib.contextmanager
def pycocotools_errors(what: str) -> Iterator[None]:
    """pycocotools fails with asserts and bare exceptions; what the checks above let through ends here."""
    try:
        yield
    except MasksegError:
        raise
    except Exception as exc:
        log.debug("pycocotools failed", exc_info=True)
        raise EvalInputError(f"pycocotools could not {what}: {type(exc).__name__}: {exc}") from None


def load_results(gt: GroundTruth, items: list[dict]) -> Any:
    """``COCO.loadRes`` of the checked results (it adds area, id and iscrowd to each entry)."""
    with pycocotools_errors("load the results"), quiet():
        return gt.coco.loadRes(items)


def cocoeval(gt: GroundTruth, dt: Any, detections: Counter[int], iou_type: str, max_dets: int) -> IoUTypeMetrics:
    """COCOeval evaluate/accumulate/summarize for one IoU type; ``detections`` counts results per category."""
    from pycocotools.cocoeval import COCOeval

    with pycocotools_errors(f"evaluate {iou_type}"):
        with quiet():
            ev = COCOeval(gt.coco, dt, iou_type)
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
        if max_dets == 100:
            with quiet() as printed:
                ev.summarize()
            values = [float(v) for v in ev.stats]
            summary = printed.getvalue()
        else:
            # pycocotools' summarize() looks AP up at a fixed maxDets=100 (-1 otherwise); read the same
            # arrays at maxDets[2] instead, the way summarize() reads every other number.
            values = [summarize_at(ev, ap, iou, area, m) for _, ap, iou, area, m in SUMMARY_STATS]
            summary = ""
    p = ev.params
    stats = tuple(Stat(key if key != "AR100" else f"AR{max_dets}",
                       "Average Precision" if ap else "Average Recall",
                       f"{p.iouThrs[0]:0.2f}:{p.iouThrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}",
                       area, p.maxDets[m], v)
                  for (key, ap, iou, area, m), v in zip(SUMMARY_STATS, values, strict=True))
    if not summary:
        summary = "".join(s.line() + "\n" for s in stats)
    return IoUTypeMetrics(iou_type, stats, *per_class_metrics(ev, gt, detections), summary=summary)


def summarize_at(ev: Any, ap: int, iou: float | None, area: str, m: int) -> float:
    """One number the way pycocotools' ``summarize_at`` computes it, at ``p.maxDets[m]``."""
    p = ev.params
    a = p.areaRngLbl.index(area)
    s = ev.eval["precision"][..., a, m] if ap else ev.eval["recall"][..., a, m]
    if iou is not None:
        s = s[np.where(iou == p.iouThrs)[0]]
    return float(np.mean(s[s > -1])) if (s > -1).any() else -1.0


def mean_valid(a: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    valid = a > -1
    n = valid.sum(axis=axis)
    total = np.where(valid, a, 0.0).sum(axis=axis)
    return np.where(n > 0, total / np.maximum(n, 1), -1.0)


def per_class_metrics(ev: Any, gt: GroundTruth, detections: Counter[int]) -> tuple[tuple, tuple, tuple, tuple]:
    """Per-class AP and PR curves from ``eval['precision']`` [T, R, K, A, M] (area all, the largest maxDets)."""
    p = ev.params
    prec = ev.eval["precision"][:, :, :, p.areaRngLbl.index("all"), -1]  # [T, R, K]
    t50, t75 = (int(np.where(t == p.iouThrs)[0][0]) for t in (0.5, 0.75))
    per_class = []
    class_curves = []
    for k, cat_id in enumerate(p.catIds):
        pk = prec[:, :, k]
        ap, ap50, ap75 = (float(np.mean(x[x > -1])) if (x > -1).any() else -1.0 for x in (pk, pk[t50], pk[t75]))
        name = gt.categories[cat_id]
        per_class.append(ClassAP(int(cat_id), name, gt.instances[cat_id], detections[cat_id], ap, ap50, ap75))
        class_curves.append(PRCurve(name, tuple(mean_valid(pk, (0,)).tolist()), int(cat_id)))
    curves = (
        PRCurve("IoU=0.50", tuple(mean_valid(prec[t50], (1,)).tolist())),
        PRCurve("IoU=0.75", tuple(mean_valid(prec[t75], (1,)).tolist())),
        PRCurve(f"IoU={p.iouThrs[0]:0.2f}:{p.iouThrs[-1]:0.2f}", tuple(mean_valid(prec, (0, 2)).tolist())),
    )
    return tuple(per_class), tuple(float(r) for r in p.recThrs), curves, tuple(class_curves)


def pycocotools_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pycocotools")
    except PackageNotFoundError:
        return ""
