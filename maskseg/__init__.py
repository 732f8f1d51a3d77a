"""maskseg: batch instance segmentation with Mask R-CNN (torchvision), resumable and cron-safe.

The public names load on first use (PEP 562), so ``import maskseg`` and ``maskseg --help`` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "RunSummary": "api", "predict": "api",
    "ModelConfig": "config", "PredictConfig": "config",
    "BoxMask": "detections", "Detections": "detections",
    "DecodeError": "errors", "LockedError": "errors", "MasksegError": "errors", "OutputError": "errors",
    "SourceError": "errors", "UsageError": "errors", "WeightsError": "errors", "WriterError": "errors",
    "evaluate": "evaluation",
    "StageOutputs": "inspection", "inspect_image": "inspection",
    "Segmenter": "segmenter",
    "train": "training",
}
__all__ = [
    "BoxMask", "DecodeError", "Detections", "LockedError", "MasksegError", "ModelConfig", "OutputError",
    "PredictConfig", "RunSummary", "Segmenter", "SourceError", "StageOutputs", "UsageError", "WeightsError",
    "WriterError", "evaluate", "inspect_image", "predict", "train",
]

if TYPE_CHECKING:
    from .api import RunSummary, predict
    from .config import ModelConfig, PredictConfig
    from .detections import BoxMask, Detections
    from .errors import (
        DecodeError,
        LockedError,
        MasksegError,
        OutputError,
        SourceError,
        UsageError,
        WeightsError,
        WriterError,
    )
    from .evaluation import evaluate
    from .inspection import StageOutputs, inspect_image
    from .segmenter import Segmenter
    from .training import train


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'maskseg' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

