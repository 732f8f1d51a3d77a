"""The backend names and ``load_backend``: each runtime's module is imported only when chosen."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import UsageError
from ..precision import ResolvedPrecision, resolve_precision
from .base import Backend

BACKENDS = {
    "torch": "torchvision in PyTorch (default)",
    "onnxruntime": "ONNX Runtime, on a model from `maskseg export --format onnx` (pip install 'maskseg[onnx]')",
    "tensorflow": "a TensorFlow Object Detection API SavedModel (pip install 'maskseg[tensorflow]')",
    "openvino": "OpenVINO on the CPU, on a model from `maskseg export --format onnx` (pip install 'maskseg[openvino]')",
}


def load_backend(config: ModelConfig) -> Backend:
    """Build the backend ``config.backend`` names, with its weights loaded and ready."""
    name = config.backend
    if name != "torch" and config.compile:
        raise UsageError(f"--compile applies to the torch backend only, not --backend {name}")
    if name in BACKENDS:
        resolve_model_precision(config)  # refuses what this backend or device cannot run
    if name == "torch":
        from .torch_backend.backend import TorchBackend

        return TorchBackend.load(config)
    if name == "onnxruntime":
        from .onnx_backend import OnnxBackend

        return OnnxBackend.load(config)
    if name == "tensorflow":
        from .tf_backend import TensorFlowBackend

        return TensorFlowBackend.load(config)
    if name == "openvino":
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend.load(config)
    raise UsageError(f"--backend {name}: expected one of {', '.join(BACKENDS)}")


def resolve_model_precision(config: ModelConfig) -> ResolvedPrecision:
    """``config.precision`` (``auto`` included) resolved for its backend and device (``maskseg.precision``).

    Asks torch about the device only for the torch backend."""
    device_type, cuda_bf16 = "cpu", False
    if config.backend == "torch":
        from ..models import resolve_device
        from .torch_backend.backend import cuda_supports_bf16

        device: Any = resolve_device(config.device)
        device_type, cuda_bf16 = device.type, cuda_supports_bf16(device)
    return resolve_precision(config.precision, backend=config.backend, device_type=device_type,
                             cuda_bf16=cuda_bf16)

