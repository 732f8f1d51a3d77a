"""The OpenVINO backend: the same ONNX file as ``--backend onnxruntime`` (``maskseg export --format
onnx``), compiled by OpenVINO for the CPU.

OpenVINO reads the ONNX graph as it is; ``OpenVinoSession`` presents its compiled model with the few
calls of an ONNX Runtime session that ``OnnxBackend`` makes (inputs, outputs, metadata, run), so the
graph description, the resize, the score cut and ``to_raw_detections`` are the ONNX backend's own, and
the outputs go through the same pipeline. ``precision``: ``auto`` leaves the choice to OpenVINO (bf16 on
a CPU with bf16 instructions, f32 elsewhere), ``fp32``/``bf16`` set its inference precision hint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import UsageError, WeightsError
from .onnx_backend import OnnxBackend, describe_graph, graph_categories, meta_int

log = logging.getLogger(__name__)

INSTALL_HINT = "--backend openvino needs OpenVINO: pip install 'maskseg[openvino]'"
# OpenVINO element type names -> the ONNX Runtime type strings describe_graph reads.
_ORT_TYPES = {"u8": "tensor(uint8)", "f32": "tensor(float)", "i64": "tensor(int64)", "f16": "tensor(float16)"}
_HINTS = {"fp32": "f32", "bf16": "bf16"}
SUPPORTED_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PortInfo:
    """An input or output as ONNX Runtime's ``NodeArg`` shows it: name, type string, shape (None: dynamic)."""

    name: str
    type: str
    shape: list[int | None]


class OpenVinoSession:
    """An OpenVINO compiled model behind ONNX Runtime's session calls (``get_inputs``, ``get_outputs``,
    ``run``, ``get_modelmeta``, ``get_providers``); one infer request, reused image after image."""

    def __init__(self, compiled: Any, graph: OnnxGraphInfo) -> None:
        self.compiled = compiled
        self.metadata = dict(graph.metadata)
        self._request = compiled.create_infer_request()
        # A port may carry several tensor names; the ONNX graph's own input/output name is the one to show.
        self._inputs = [_port(p, graph.inputs) for p in compiled.inputs]
        self._outputs = [_port(p, graph.outputs) for p in compiled.outputs]
        self._output_ports = {info.name: port for info, port in zip(self._outputs, compiled.outputs, strict=True)}

    def get_inputs(self) -> list[PortInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[PortInfo]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return ["OpenVINO CPU"]

    def get_modelmeta(self) -> Any:
        return _Meta(self.metadata)

    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs ``names`` for the inputs ``feed``, as numpy arrays (copies: the request reuses its buffers)."""
        results = self._request.infer(dict(feed))
        return [np.array(results[self._output_ports[n]]) for n in names]


@dataclass(frozen=True)
class _Meta:
    custom_metadata_map: dict[str, str]


def _port(port: Any, graph_names: Sequence[str]) -> PortInfo:
    names = port.get_names()
    name = next((n for n in graph_names if n in names), None) or port.get_any_name()
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    kind = port.get_element_type().get_type_name()
    return PortInfo(name, _ORT_TYPES.get(kind, f"tensor({kind})"), shape)


@dataclass(frozen=True)
class OnnxGraphInfo:
    """What OpenVINO does not carry over from an ONNX file: its metadata_props (maskseg's export keeps
    the classes and input size there) and the graph's own input and output names."""

    metadata: dict[str, str]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class OpenVinoBackend(OnnxBackend):
    """``OnnxBackend`` over an OpenVINO compiled model (CPU); ``inference_precision`` is what OpenVINO runs
    (``f32``, ``bf16``)."""

    inference_precision = ""

    @classmethod
    def load(cls, config: ModelConfig) -> OpenVinoBackend:
        """The ONNX file ``config.weights`` compiled for the CPU at ``config.precision``."""
        if not config.weights:
            raise UsageError("--backend openvino needs --weights MODEL.onnx "
                             "(make one with `maskseg export --format onnx -o model.onnx`)")
        path = Path(config.weights)
        if not path.is_file():
            raise WeightsError(f"{path}: ONNX model file not found")
        if config.device not in ("auto", "cpu"):
            raise UsageError(f"--device {config.device}: the openvino backend runs on the CPU; use --device cpu")
        ov = import_openvino()
        core = ov.Core()
        properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if config.precision in _HINTS:
            properties["INFERENCE_PRECISION_HINT"] = _HINTS[config.precision]
        if config.threads:
            properties["INFERENCE_NUM_THREADS"] = int(config.threads)
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", properties)
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"{path}: not an ONNX model OpenVINO can compile ({detail}); make one with "
                               "`maskseg export --format onnx`") from None
        graph = onnx_graph_info(path)
        meta = graph.metadata
        version = meta_int(meta.get("maskseg_format_version"))
        if version and version > SUPPORTED_FORMAT_VERSION:
            raise WeightsError(f"{path}: made by a newer maskseg (ONNX format version {version}); upgrade maskseg")
        session = OpenVinoSession(compiled, graph)
        io = describe_graph(session, str(path))
        categories, num_classes = graph_categories(meta, str(path), config, str(path))
        name = meta.get("arch") or path.stem
        backend = cls(session, "cpu", io, meta, categories, num_classes, config, name)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        used = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        backend.inference_precision = used
        log.info("openvino model %s (%d classes) from %s on the CPU, inference precision %s (%s)", name,
                 num_classes, path, used, "asked" if config.precision in _HINTS else "OpenVINO's choice")
        return backend


def onnx_graph_info(path: Path) -> OnnxGraphInfo:
    """Metadata and input/output names of the ONNX file at ``path`` (its weights are not read)."""
    try:
        import onnx
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise WeightsError(f"{path}: not an ONNX file ({type(exc).__name__})") from None
    initializers = {i.name for i in proto.graph.initializer}
    return OnnxGraphInfo({p.key: p.value for p in proto.metadata_props},
                         tuple(i.name for i in proto.graph.input if i.name not in initializers),
                         tuple(o.name for o in proto.graph.output))


def import_openvino() -> Any:
    """``openvino``, or a UsageError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return openvino
