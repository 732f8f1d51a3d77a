"""The records an evaluation returns: COCOeval's twelve numbers, per-class AP, PR curves, the gate."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UsageError

# pycocotools' _summarizeDets, in its order: (key, AP (1) or AR (0), IoU threshold, area, maxDets index).
SUMMARY_STATS: tuple[tuple[str, int, float | None, str, int], ...] = (
    ("AP", 1, None, "all", 2), ("AP50", 1, 0.5, "all", 2), ("AP75", 1, 0.75, "all", 2),
    ("APs", 1, None, "small", 2), ("APm", 1, None, "medium", 2), ("APl", 1, None, "large", 2),
    ("AR1", 0, None, "all", 0), ("AR10", 0, None, "all", 1), ("AR100", 0, None, "all", 2),
    ("ARs", 0, None, "small", 2), ("ARm", 0, None, "medium", 2), ("ARl", 0, None, "large", 2),
)
SUMMARY_LINE = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"  # pycocotools' iStr


@dataclass(frozen=True)
class Stat:
    """One of COCOeval's twelve summary numbers (``value`` -1 where nothing could be measured)."""

    key: str  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR<max_dets>, ARs, ARm, ARl
    title: str  # "Average Precision" or "Average Recall"
    iou: str  # "0.50:0.95", "0.50" or "0.75"
    area: str  # all, small, medium, large
    max_dets: int
    value: float

    def line(self) -> str:
        """The line pycocotools' ``summarize()`` prints for this number."""
        short = "(AP)" if self.title.endswith("Precision") else "(AR)"
        return SUMMARY_LINE.format(self.title, short, self.iou, self.area, self.max_dets, self.value)


@dataclass(frozen=True)
class ClassAP:
    """AP of one ANN category (area all, the largest maxDets); -1 where ANN has no instance of it."""

    category_id: int
    name: str
    instances: int  # ANN's non-crowd annotations of this category
    detections: int  # results of this category that were evaluated
    ap: float
    ap50: float
    ap75: float


@dataclass(frozen=True)
class PRCurve:
    """Interpolated precision at COCOeval's recall thresholds, averaged over the valid entries (-1: none)."""

    label: str  # "IoU=0.50", "IoU=0.75", "IoU=0.50:0.95", or a class name (averaged over IoU thresholds)
    precision: tuple[float, ...]
    category_id: int | None = None


@dataclass(frozen=True)
class IoUTypeMetrics:
    """Everything COCOeval measured for one IoU type (``bbox`` or ``segm``)."""

    iou_type: str
    stats: tuple[Stat, ...]
    per_class: tuple[ClassAP, ...]
    recall_thresholds: tuple[float, ...]
    curves: tuple[PRCurve, ...]
    class_curves: tuple[PRCurve, ...]
    summary: str  # the twelve lines as pycocotools prints them

    def stat(self, key: str) -> float:
        for s in self.stats:
            if s.key.lower() == key.lower():
                return s.value
        raise KeyError(key)

    @property
    def values(self) -> tuple[float, ...]:
        """The twelve numbers in ``COCOeval.stats`` order."""
        return tuple(s.value for s in self.stats)


@dataclass(frozen=True)
class Gate:
    """The ``fail_under`` check: ``passed`` is false when ``value < threshold``."""

    metric: str
    value: float
    threshold: float
    passed: bool


@dataclass(frozen=True)
class EvalReport:
    """An evaluation: per IoU type metrics, what was evaluated, and the warnings raised on the way."""

    annotations: str
    results: str | None
    images: int  # ANN's images (all are evaluated; those without results count as missed)
    instances: int  # ANN's non-crowd annotations
    detections: int  # results evaluated
    max_dets: int
    metrics: tuple[IoUTypeMetrics, ...]
    warnings: tuple[str, ...] = ()
    gate: Gate | None = None
    pycocotools_version: str = ""

    def __getitem__(self, iou_type: str) -> IoUTypeMetrics:
        for m in self.metrics:
            if m.iou_type == iou_type:
                return m
        raise KeyError(iou_type)

    def metric(self, spec: str | None = None) -> tuple[str, float]:
        """``(label, value)`` of ``TYPE`` or ``TYPE/STAT`` (``segm``, ``bbox/AP50``); ``None``: segm AP or bbox AP."""
        iou_type, key = parse_metric(spec, tuple(m.iou_type for m in self.metrics), self.max_dets)
        return f"{iou_type} {key}", self[iou_type].stat(key)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = {m["iou_type"]: m for m in d["metrics"]}
        for m in d["metrics"].values():
            m["stats"] = {s["key"]: s for s in m["stats"]}
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1, allow_nan=False) + "\n"


def parse_metric(spec: str | None, iou_types: tuple[str, ...], max_dets: int) -> tuple[str, str]:
    if spec is None:
        return ("segm" if "segm" in iou_types else iou_types[0]), "AP"
    iou_type, _, key = spec.strip().partition("/")
    iou_type = iou_type.strip().lower()
    keys = {k.lower(): k for k in stat_keys(max_dets)}
    key = keys.get((key.strip() or "AP").lower(), "")
    if iou_type not in iou_types or not key:
        raise UsageError(f"unknown metric {spec!r}: use TYPE or TYPE/STAT, TYPE one of {', '.join(iou_types)}, "
                         f"STAT one of {', '.join(stat_keys(max_dets))}")
    return iou_type, key


def stat_keys(max_dets: int) -> list[str]:
    return [f"AR{max_dets}" if k == "AR100" else k for k, *_ in SUMMARY_STATS]
