"""Backends: what runs the network. Each turns RGB images into ``RawDetections``; the rest of the
pipeline (label filtering, mask paste, RLE, writers, journal) is shared.

``torch`` (torchvision, the default) lives in ``torch_backend``; other runtimes (ONNX Runtime,
OpenVINO, TensorFlow SavedModel) live beside it and are imported only when chosen, so their packages stay
optional.
"""

from .base import Backend, MaskLayout, RawDetections
from .registry import BACKENDS, load_backend, resolve_model_precision

__all__ = ["BACKENDS", "Backend", "MaskLayout", "RawDetections", "load_backend", "resolve_model_precision"]
