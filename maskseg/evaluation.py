"""``evaluate``: COCO bbox and segm AP of a results file, or of a model run over a dataset's images.

The numbers are pycocotools' own: ``COCOeval.evaluate/accumulate/summarize`` run on the files as given.
What this module adds is around that call: inputs are read with a size limit and checked first, so
pycocotools' assertion failures and silent pitfalls (unknown ids, masks of another size, annotation
id 0) become one-line messages; per-class AP and precision-recall curves are read from
``COCOeval.eval['precision']`` as detectron2 does. Nothing here re-implements matching.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import EvalConfig
from .errors import Interrupted, MasksegError, UsageError
from .evaluate_inputs import EvalInputError, GroundTruth, Notes, Results, examples, name_parts, quiet, read_json

if TYPE_CHECKING:
    import threading

    from .api import ProgressReporter

log = logging.getLogger(__name__)

EVAL_RESULTS_FILE = "eval_results.json"
# pycocotools' _summarizeDets, in its order: (key, AP (1) or AR (0), IoU threshold, area, maxDets index).
_SUMMARY: tuple[tuple[str, int, float | None, str, int], ...] = (
    ("AP", 1, None, "all", 2), ("AP50", 1, 0.5, "all", 2), ("AP75", 1, 0.75, "all", 2),
    ("APs", 1, None, "small", 2), ("APm", 1, None, "medium", 2), ("APl", 1, None, "large", 2),
    ("AR1", 0, None, "all", 0), ("AR10", 0, None, "all", 1), ("AR100", 0, None, "all", 2),
    ("ARs", 0, None, "small", 2), ("ARm", 0, None, "medium", 2), ("ARl", 0, None, "large", 2),
)
_LINE = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"  # pycocotools' iStr


# ----------------------------------------------------------------------------- the metrics record


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
        return _LINE.format(self.title, short, self.iou, self.area, self.max_dets, self.value)


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
        iou_type, key = _parse_metric(spec, tuple(m.iou_type for m in self.metrics), self.max_dets)
        return f"{iou_type} {key}", self[iou_type].stat(key)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = {m["iou_type"]: m for m in d["metrics"]}
        for m in d["metrics"].values():
            m["stats"] = {s["key"]: s for s in m["stats"]}
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------- the entry point


def evaluate(
    annotations: str | Path,
    results: str | Path | None = None,
    *,
    images: str | Path | None = None,
    out: str | Path | None = None,
    config: EvalConfig | None = None,
    progress: ProgressReporter | None = None,
    stop: threading.Event | None = None,
) -> EvalReport:
    """COCO bbox/segm metrics of ``results`` (a COCO results list, or a COCO dataset with scores such as
    maskseg's predictions.json) against ``annotations``; or, with ``images``, of the model in
    ``config.predict`` run over ANN's images (resumably, into ``out``) and then evaluated.

    Image ids are mapped by file name where results name images that way (and for maskseg outputs,
    whose ids are maskseg's own). Raises ``UsageError`` for contradictory arguments and
    ``EvalInputError`` for files that cannot be evaluated.
    """
    config = config or EvalConfig()
    _check_config(config)
    if (results is None) == (images is None):
        raise UsageError("give exactly one of results (a results file) or images (a folder to run the model on)")
    notes = Notes()
    ann_path = Path(annotations)
    gt = GroundTruth(read_json(ann_path, "annotations"), ann_path, config.iou_types, notes)
    if images is not None:
        if out is None:
            raise UsageError("images= needs out= (the folder the model's outputs are kept in)")
        names, res_path = _predict_over(gt, Path(images), Path(out), config, progress, stop, notes)
        source: Any = read_json(res_path, "predictions")
        if isinstance(source, dict) and source.get("annotations") == []:
            raise EvalInputError(f"the model made no detections on ANN's {len(gt.images)} images (score threshold "
                                 f"{config.predict.model.score_thresh}); there is nothing to evaluate")
    else:
        res_path = Path(results)  # type: ignore[arg-type]
        source = read_json(res_path, "results")
        names = None
    dets = Results(source, res_path, gt, config.iou_types, notes, names)
    if images is not None:
        from .atomic import atomic_write_bytes

        # What was evaluated, in ANN's image ids: pycocotools can be run on it as it is.
        atomic_write_bytes(Path(out) / EVAL_RESULTS_FILE,  # type: ignore[arg-type]
                           json.dumps(dets.items, separators=(",", ":")).encode())
    dt = _load_results(gt, dets.items)  # one loaded copy serves both IoU types, as in pycocotools' demo
    per_category = Counter(r["category_id"] for r in dets.items)
    metrics = tuple(_cocoeval(gt, dt, per_category, t, config.max_dets) for t in config.iou_types)
    report = EvalReport(
        annotations=str(ann_path), results=str(res_path), images=len(gt.images), instances=sum(gt.instances.values()),
        detections=len(dets.items), max_dets=config.max_dets, metrics=metrics, warnings=tuple(notes),
        pycocotools_version=_pycocotools_version(),
    )
    if config.fail_under is not None:
        label, value = report.metric(config.fail_metric)
        gate = Gate(label, value, config.fail_under, value >= config.fail_under)
        report = replace(report, gate=gate)
    return report


def _check_config(config: EvalConfig) -> None:
    bad = [t for t in config.iou_types if t not in ("bbox", "segm")]
    if bad or not config.iou_types:
        raise UsageError(f"IoU types must be bbox and/or segm, not {', '.join(bad) or 'none'}")
    if config.max_dets < 10:
        raise UsageError(f"max_dets must be at least 10 (COCOeval's maxDets: 1, 10, max_dets), not {config.max_dets}")
    if config.fail_under is not None:
        if not 0.0 <= config.fail_under <= 1.0:
            raise UsageError(f"fail_under must be between 0 and 1, not {config.fail_under}")
        _parse_metric(config.fail_metric, config.iou_types, config.max_dets)


def _parse_metric(spec: str | None, iou_types: tuple[str, ...], max_dets: int) -> tuple[str, str]:
    if spec is None:
        return ("segm" if "segm" in iou_types else iou_types[0]), "AP"
    iou_type, _, key = spec.strip().partition("/")
    iou_type = iou_type.strip().lower()
    keys = {k.lower(): k for k in _stat_keys(max_dets)}
    key = keys.get((key.strip() or "AP").lower(), "")
    if iou_type not in iou_types or not key:
        raise UsageError(f"unknown metric {spec!r}: use TYPE or TYPE/STAT, TYPE one of {', '.join(iou_types)}, "
                         f"STAT one of {', '.join(_stat_keys(max_dets))}")
    return iou_type, key


def _stat_keys(max_dets: int) -> list[str]:
    return [f"AR{max_dets}" if k == "AR100" else k for k, *_ in _SUMMARY]


# ----------------------------------------------------------------------------- running the model


def _predict_over(gt: GroundTruth, folder: Path, out: Path, config: EvalConfig, progress: Any, stop: Any,
                  notes: Notes) -> tuple[dict[str, int], Path]:
    """Run ``predict`` over exactly ANN's images; returns maskseg's rel_path -> ANN id, and predictions.json."""
    from .api import predict
    from .sources import scan_sources

    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (images)")
    root = folder.resolve()
    paths: dict[str, int] = {}
    missing: list[str] = []
    for image_id, img in gt.images.items():
        name = img.get("file_name")
        parts = name_parts(name) if isinstance(name, str) else []
        if not parts or ".." in parts or name.startswith(("/", "\\")):
            raise EvalInputError(f"{gt.path}: image {image_id} has file_name {name!r}: it must be a path inside "
                                 f"the images folder")
        path = str(root.joinpath(*parts))
        if path in paths:
            raise EvalInputError(f"{gt.path}: images {paths[path]} and {image_id} are both {name!r}")
        if not Path(path).is_file():
            missing.append("/".join(parts))
        paths[path] = image_id
    if missing:
        raise EvalInputError(f"{len(missing)} of ANN's {len(gt.images)} images are not in {folder} "
                             f"({examples(missing)}); --images must be the folder ANN's file names are relative to")
    # predict names images by their path relative to the inputs' common folder; the same scan gives it here.
    scan = scan_sources(list(paths), recursive=False, exclude=str(out))
    rel_to_id = {ref.rel_path: paths[ref.path] for ref in scan.refs}
    summary = predict(list(paths), out, config.predict, progress=progress, stop=stop)
    if summary.interrupted is not None:
        raise Interrupted(signal.SIGINT)
    if summary.failed_total:
        notes.warn(f"{summary.failed_total} of ANN's images could not be segmented (listed in "
                   f"{out / 'failures.jsonl'}); their objects count as missed")
    return rel_to_id, out / "predictions.json"


# ----------------------------------------------------------------------------- pycocotools


@contextlib.contextmanager
def _pycocotools(what: str) -> Iterator[None]:
    """pycocotools fails with asserts and bare exceptions; what the checks above let through ends here."""
    try:
        yield
    except MasksegError:
        raise
    except Exception as exc:
        log.debug("pycocotools failed", exc_info=True)
        raise EvalInputError(f"pycocotools could not {what}: {type(exc).__name__}: {exc}") from None


def _load_results(gt: GroundTruth, items: list[dict]) -> Any:
    """``COCO.loadRes`` of the checked results (it adds area, id and iscrowd to each entry)."""
    with _pycocotools("load the results"), quiet():
        return gt.coco.loadRes(items)


def _cocoeval(gt: GroundTruth, dt: Any, detections: Counter[int], iou_type: str, max_dets: int) -> IoUTypeMetrics:
    """COCOeval evaluate/accumulate/summarize for one IoU type; ``detections`` counts results per category."""
    from pycocotools.cocoeval import COCOeval

    with _pycocotools(f"evaluate {iou_type}"):
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
            values = [_summarize(ev, ap, iou, area, m) for _, ap, iou, area, m in _SUMMARY]
            summary = ""
    p = ev.params
    stats = tuple(Stat(key if key != "AR100" else f"AR{max_dets}",
                       "Average Precision" if ap else "Average Recall",
                       f"{p.iouThrs[0]:0.2f}:{p.iouThrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}",
                       area, p.maxDets[m], v)
                  for (key, ap, iou, area, m), v in zip(_SUMMARY, values, strict=True))
    if not summary:
        summary = "".join(s.line() + "\n" for s in stats)
    return IoUTypeMetrics(iou_type, stats, *_per_class(ev, gt, detections), summary=summary)


def _summarize(ev: Any, ap: int, iou: float | None, area: str, m: int) -> float:
    """One number the way pycocotools' ``_summarize`` computes it, at ``p.maxDets[m]``."""
    p = ev.params
    a = p.areaRngLbl.index(area)
    s = ev.eval["precision"][..., a, m] if ap else ev.eval["recall"][..., a, m]
    if iou is not None:
        s = s[np.where(iou == p.iouThrs)[0]]
    return float(np.mean(s[s > -1])) if (s > -1).any() else -1.0


def _mean_valid(a: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    valid = a > -1
    n = valid.sum(axis=axis)
    total = np.where(valid, a, 0.0).sum(axis=axis)
    return np.where(n > 0, total / np.maximum(n, 1), -1.0)


def _per_class(ev: Any, gt: GroundTruth, detections: Counter[int]) -> tuple[tuple, tuple, tuple, tuple]:
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
        class_curves.append(PRCurve(name, tuple(_mean_valid(pk, (0,)).tolist()), int(cat_id)))
    curves = (
        PRCurve("IoU=0.50", tuple(_mean_valid(prec[t50], (1,)).tolist())),
        PRCurve("IoU=0.75", tuple(_mean_valid(prec[t75], (1,)).tolist())),
        PRCurve(f"IoU={p.iouThrs[0]:0.2f}:{p.iouThrs[-1]:0.2f}", tuple(_mean_valid(prec, (0, 2)).tolist())),
    )
    return tuple(per_class), tuple(float(r) for r in p.recThrs), curves, tuple(class_curves)


def _pycocotools_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pycocotools")
    except PackageNotFoundError:
        return ""
