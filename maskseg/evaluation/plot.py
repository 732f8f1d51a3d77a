"""Precision-recall curves of an ``EvalReport`` as PNG files, one per IoU type (matplotlib, Agg)."""

from __future__ import annotations

import io
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..errors import OutputError
from .report import EvalReport, IoUTypeMetrics, PRCurve


def plot_pr_curves(report: EvalReport, folder: str | Path) -> list[Path]:
    """Write ``FOLDER/pr_<iou type>.png`` for each IoU type: all classes at IoU 0.50, 0.75 and
    0.50:0.95 on the left, each class (averaged over IoU thresholds) on the right. Returns the paths."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the plot folder: {exc.strerror}") from None
    written = []
    for metrics in report.metrics:
        path = folder / f"pr_{metrics.iou_type}.png"
        try:
            atomic_write_bytes(path, _figure_png(metrics))
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror}") from None
        written.append(path)
    return written


def _figure_png(metrics: IoUTypeMetrics) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8), layout="constrained")
    overall, per_class = fig.subplots(1, 2, sharey=True)
    recall = metrics.recall_thresholds
    for curve in metrics.curves:
        _draw(overall, recall, curve, curve.label)
    for curve, cls in zip(metrics.class_curves, metrics.per_class, strict=True):
        ap = f"{cls.ap:.3f}" if cls.ap >= 0 else "n/a"
        _draw(per_class, recall, curve, f"{curve.label} (AP {ap}, {cls.instances} objects)")
    overall.set_title(f"{metrics.iou_type}: all classes (AP {metrics.stat('AP'):.3f})")
    per_class.set_title(f"{metrics.iou_type}: per class, IoU=0.50:0.95")
    for ax in (overall, per_class):
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="lower left", fontsize="small")
    overall.set_ylabel("precision (interpolated)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _draw(ax: object, recall: tuple[float, ...], curve: PRCurve, label: str) -> None:
    """Plot the recall thresholds where precision is defined (pycocotools marks the rest -1)."""
    pts = [(r, p) for r, p in zip(recall, curve.precision, strict=True) if p >= 0]
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, label=label)  # type: ignore[attr-defined]
