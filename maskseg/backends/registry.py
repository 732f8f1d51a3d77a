"""The backend names and ``load_backend``: each runtime's module is imported only when chosen."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import UsageError
from .base import Backend

BACKENDS = {
    "torch": "torchvision in PyTorch (default)",
    "onnxruntime": "ONNX Runtime, on a model from `maskseg export --format onnx` (pip install 'maskseg[onnx]')",
    "tensorflow": "a TensorFlow Object Detection API SavedModel (pip install 'maskseg[tensorflow]')",
}


def load_backend(config: ModelConfig) -> Backend:
    """Build the backend ``config.backend`` names, with its weights loaded and ready."""
    name = config.backend
    if name != "torch" and (config.precision != "fp32" or config.compile):
        flag = "--compile" if config.compile else f"--precision {config.precision}"
        raise UsageError(f"{flag} applies to the torch backend only, not --backend {name}")
    if name == "torch":
        from .torch_backend.backend import TorchBackend

        return TorchBackend.load(config)
    if name == "onnxruntime":
        from .onnx_backend import OnnxBackend

        return OnnxBackend.load(config)
    if name == "tensorflow":
        from .tf_backend import TensorFlowBackend

        return TensorFlowBackend.load(config)
    raise UsageError(f"--backend {name}: expected one of {', '.join(BACKENDS)}")
