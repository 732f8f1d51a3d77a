"""Evaluation: COCO bbox and segm AP with pycocotools, of a results file or of a model run.

``inputs`` reads and checks the files, ``coco`` is the glue to pycocotools, ``report`` holds the
records, ``plot`` draws PR curves, ``run`` is the entry point ``evaluate``.
"""

from .coco import pycocotools_version
from .inputs import GroundTruth, Results
from .plot import plot_pr_curves
from .report import SUMMARY_STATS, ClassAP, EvalReport, Gate, IoUTypeMetrics, PRCurve, Stat
from .run import EVAL_RESULTS_FILE, evaluate

__all__ = [
    "EVAL_RESULTS_FILE", "SUMMARY_STATS", "ClassAP", "EvalReport", "Gate", "GroundTruth", "IoUTypeMetrics",
    "PRCurve", "Results", "Stat", "evaluate", "plot_pr_curves", "pycocotools_version",
]
