"""Engines: turn ImageRefs into per-batch decoded images and detections, locally or on a Ray cluster."""

from .base import BatchResult, Engine, ModelInfo
from .factory import make_engine
from .local import LocalEngine

__all__ = ["BatchResult", "Engine", "LocalEngine", "ModelInfo", "make_engine"]
