"""The ONNX Runtime backend: a model from ``maskseg export --format onnx`` (or a torchvision Mask R-CNN
exported to ONNX by other means), fed one image at a time.

maskseg's own export takes ``image`` uint8 [H, W, 3] RGB, ``size`` int64 [2] and ``score_thresh``
float32 [] and returns 28 x 28 masks per box (``maskseg.export``); its metadata names the classes and
the input size. A third-party export of torchvision's model (``torch.onnx.export(model, [image])``)
takes a float [3, H, W] image in [0, 1] (optionally batched [1, 3, H, W]), resizes inside its graph
and returns masks already pasted into the image ([N, 1, H, W]); its classes come from ``--labels``
or, for torchvision's 91-slot COCO classifier, COCO's names. ``to_raw_detections`` is the one adapter
from either output form to ``RawDetections``; the rest of the pipeline is the torch backend's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..detections import Category
from ..errors import UsageError, WeightsError
from .base import MaskLayout, RawDetections

log = logging.getLogger(__name__)

INSTALL_HINT = "--backend onnxruntime needs ONNX Runtime: pip install 'maskseg[onnx]'"
OUTPUTS = ("boxes", "labels", "scores", "masks")
CLS_SCORE_WEIGHT = "roi_heads.box_predictor.cls_score.weight"
SUPPORTED_FORMAT_VERSION = 1


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The (height, width) torchvision's GeneralizedRCNNTransform resizes an image to.

    Python float64 arithmetic, exactly as eager torchvision does it (scale, then ``F.interpolate``'s
    floor): a short side of 303 with min_size 160 becomes 159, as in torch. Computed here rather than
    in the graph because the exported graph does it in float32 and gets other sizes.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


@dataclass(frozen=True)
class GraphIO:
    """How a graph is fed and read.

    ``image``: the image input's name; ``uint8``: it takes uint8 0..255 (else float 0..1);
    ``channels_first``: [3, H, W] (else [H, W, 3]); ``batched``: a leading batch dimension of 1;
    ``sized``/``thresholded``: it takes maskseg's ``size`` and ``score_thresh`` inputs; ``outputs``:
    the output names for boxes, labels, scores and masks (None when it has no masks).
    """

    image: str
    uint8: bool
    channels_first: bool
    batched: bool
    sized: bool
    thresholded: bool
    outputs: tuple[str, str, str, str | None]


def to_raw_detections(
    outputs: Mapping[str, np.ndarray],
    image_size: tuple[int, int],
    *,
    mask_layout: MaskLayout | None,
    score_thresh: float,
    max_dets: int,
) -> RawDetections:
    """One image's graph outputs -> RawDetections; the one place an ONNX model's output form is read.

    ``boxes`` [N, 4] float XYXY pixels of the original image of ``image_size`` (H, W); ``labels`` [N]
    (any numeric dtype -> int64); ``scores`` [N]; ``masks`` optional, [N, 1, M, M] / [N, M, M]
    probabilities over each box (torchvision's "roi" layout) or [N, 1, H, W] / [N, H, W] pasted into the
    image ("image"). ``mask_layout`` None infers it from the masks' size. Detections scoring above
    ``score_thresh`` are kept (torchvision's strict ``>``), best first, at most ``max_dets``.
    """
    boxes = np.asarray(outputs["boxes"], dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(outputs["scores"], dtype=np.float32).reshape(-1)
    labels = np.asarray(outputs["labels"]).reshape(-1).astype(np.int64)
    if not len(boxes) == len(scores) == len(labels):
        raise WeightsError(f"the model gave {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    masks = outputs.get("masks")
    layout: MaskLayout = mask_layout or "roi"
    if masks is not None:
        masks = np.asarray(masks, dtype=np.float32)
        if masks.ndim == 4:
            masks = masks[:, 0]
        if masks.ndim != 3 or len(masks) != len(boxes):
            raise WeightsError(f"the model gave masks of shape {list(masks.shape)} for {len(boxes)} boxes")
        if mask_layout is None:
            layout = "image" if tuple(masks.shape[1:]) == tuple(image_size) else "roi"
    keep = np.flatnonzero(scores > score_thresh)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:max_dets]
    return RawDetections(boxes[keep], scores[keep], labels[keep], masks[keep] if masks is not None else None, layout)


class OnnxBackend:
    """An ONNX Runtime session over a Mask R-CNN graph; one ``session.run`` per image."""

    def __init__(self, session: Any, device: str, io: GraphIO, meta: Mapping[str, str],
                 categories: list[Category], num_classes: int, config: ModelConfig, name: str) -> None:
        self.session = session
        self.io = io
        self.meta = dict(meta)
        self.categories = categories
        self._num_classes = num_classes
        self.name = name
        self.device = device
        self.score_thresh = config.score_thresh
        self.max_dets = config.max_dets
        layout = meta.get("mask_layout") or None
        if layout not in (None, "roi", "box", "image"):
            raise WeightsError(f"{name}: unknown mask_layout {layout!r} in its metadata (expected roi, box or image)")
        self.mask_layout: MaskLayout | None = layout  # type: ignore[assignment]
        self.min_size = config.min_size or meta_int(meta.get("min_size"))
        self.max_size = config.max_size or meta_int(meta.get("max_size"))
        if io.sized and not (self.min_size and self.max_size):
            raise WeightsError(f"{name}: the model takes a resize size but its metadata has no min_size/max_size; "
                               "pass --min-size and --max-size")
        if not io.sized and (config.min_size or config.max_size):
            raise UsageError(f"--min-size/--max-size: {name} resizes inside its graph; export it again with "
                             "`maskseg export --format onnx --min-size ...`")
        exported_dets = meta_int(meta.get("max_dets"))
        if exported_dets and config.max_dets > exported_dets:
            log.warning("%s was exported with at most %d detections per image; --max-dets %d gives no more",
                        name, exported_dets, config.max_dets)

    @classmethod
    def load(cls, config: ModelConfig) -> OnnxBackend:
        """The ONNX file ``config.weights``, on CUDA when the session can use it (``config.device``)."""
        if not config.weights:
            raise UsageError("--backend onnxruntime needs --weights MODEL.onnx "
                             "(make one with `maskseg export --format onnx -o model.onnx`)")
        path = Path(config.weights)
        if not path.is_file():
            raise WeightsError(f"{path}: ONNX model file not found")
        return cls._create(str(path), config, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, config: ModelConfig, source: str = "ONNX model") -> OnnxBackend:
        """A backend over an ONNX model held in memory (``maskseg.export`` checks its export this way)."""
        return cls._create(data, config, source)

    @classmethod
    def _create(cls, model: str | bytes, config: ModelConfig, source: str) -> OnnxBackend:
        ort = import_onnxruntime()
        session, device = _session(ort, model, config, source)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        version = meta_int(meta.get("maskseg_format_version"))
        if version and version > SUPPORTED_FORMAT_VERSION:
            raise WeightsError(f"{source}: made by a newer maskseg (ONNX format version {version}); upgrade maskseg")
        io = describe_graph(session, source)
        categories, num_classes = graph_categories(meta, model, config, source)
        name = meta.get("arch") or (Path(model).stem if isinstance(model, str) else "onnx")
        backend = cls(session, device, io, meta, categories, num_classes, config, name)
        log.info("onnxruntime model %s (%d classes) from %s on %s (%s)", name, num_classes, source,
                 backend.device, ", ".join(session.get_providers()))
        return backend

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def infer(self, images: Sequence[np.ndarray]) -> list[RawDetections]:
        """Run each [H, W, 3] uint8 RGB image through the graph; one RawDetections per image, in order."""
        return [self._infer_one(rgb) for rgb in images]

    def _infer_one(self, rgb: np.ndarray) -> RawDetections:
        height, width = int(rgb.shape[0]), int(rgb.shape[1])
        io = self.io
        if io.uint8:
            image = np.ascontiguousarray(rgb.transpose(2, 0, 1) if io.channels_first else rgb)
        else:
            image = np.ascontiguousarray(rgb.transpose(2, 0, 1) if io.channels_first else rgb, dtype=np.float32)
            image /= 255.0
        feed: dict[str, np.ndarray] = {io.image: image[None] if io.batched else image}
        if io.sized:
            feed["size"] = np.array(resized_size(height, width, self.min_size, self.max_size), dtype=np.int64)
        if io.thresholded:
            feed["score_thresh"] = np.array(self.score_thresh, dtype=np.float32)
        names = [n for n in io.outputs if n is not None]
        values = dict(zip(OUTPUTS, self.session.run(names, feed), strict=False))
        return to_raw_detections(values, (height, width), mask_layout=self.mask_layout,
                                 score_thresh=self.score_thresh, max_dets=self.max_dets)


def import_onnxruntime() -> Any:
    """``onnxruntime``, or a UsageError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return onnxruntime


def describe_graph(session: Any, source: str) -> GraphIO:
    """Find the image input and the boxes/labels/scores/masks outputs of a Mask R-CNN graph."""
    inputs = {i.name: i for i in session.get_inputs()}
    extra = {"size", "score_thresh"} & set(inputs)
    images = [i for n, i in inputs.items() if n not in extra and len(i.shape) in (3, 4)]
    described = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs.values())
    if len(images) != 1 or len(inputs) != 1 + len(extra):
        raise WeightsError(f"{source}: expected one image input ([H, W, 3] uint8 or [3, H, W] float), "
                           f"found {described}")
    image = images[0]
    batched = len(image.shape) == 4
    if batched and isinstance(image.shape[0], int) and image.shape[0] != 1:
        raise WeightsError(f"{source}: the image input takes batches of {image.shape[0]}; maskseg feeds 1")
    channels_first = (image.shape[1:] if batched else image.shape)[0] == 3
    if image.type not in ("tensor(uint8)", "tensor(float)"):
        raise WeightsError(f"{source}: the image input is {image.type}; expected uint8 or float32")
    outs = [o.name for o in session.get_outputs()]
    if {"boxes", "labels", "scores"} <= set(outs):
        named = ("boxes", "labels", "scores", "masks" if "masks" in outs else None)
    elif len(outs) in (3, 4):  # torchvision's own order when the export did not name them
        named = (outs[0], outs[1], outs[2], outs[3] if len(outs) == 4 else None)
    else:
        raise WeightsError(f"{source}: expected outputs boxes, labels, scores[, masks], found {', '.join(outs)}")
    return GraphIO(image.name, image.type == "tensor(uint8)", channels_first, batched,
                   "size" in extra, "score_thresh" in extra, named)


def _session(ort: Any, model: str | bytes, config: ModelConfig, source: str) -> tuple[Any, str]:
    """An InferenceSession with every graph optimization, ``config.threads`` intra-op threads and the
    CUDA provider when ``config.device`` allows it and this onnxruntime has it; and its device name."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise to users
    if config.threads:
        options.intra_op_num_threads = config.threads
    providers = _providers(ort, config.device)
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise WeightsError(f"{source}: not an ONNX model ONNX Runtime can load ({detail}); torch weights run "
                           "with --backend torch, or become ONNX with `maskseg export --format onnx`") from None
    if providers[0] == "CPUExecutionProvider":
        return session, "cpu"
    if "CUDAExecutionProvider" in session.get_providers():
        return session, f"cuda:{providers[0][1]['device_id']}"
    if config.device != "auto":
        raise UsageError(f"--device {config.device}: ONNX Runtime could not start its CUDA provider here")
    log.warning("ONNX Runtime could not start its CUDA provider; running on the CPU")
    return session, "cpu"


def _providers(ort: Any, device: str) -> list[Any]:
    """``auto``: CUDA when this onnxruntime has it, else CPU; ``cpu``; ``cuda``/``cuda:N`` (GPU N)."""
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cpu" or (device == "auto" and not has_cuda):
        return ["CPUExecutionProvider"]
    index = 0
    if device not in ("auto", "cuda"):
        prefix, _, number = device.partition(":")
        if prefix != "cuda" or not number.isdigit():
            raise UsageError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
        index = int(number)
    if not has_cuda:
        raise UsageError(f"--device {device}: this onnxruntime has no CUDA provider "
                         "(pip install onnxruntime-gpu), or use --device cpu")
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def graph_categories(meta: Mapping[str, str], model: str | bytes, config: ModelConfig,
                source: str) -> tuple[list[Category], int]:
    """Categories and classifier width: from maskseg's metadata, else ``--labels``, else the graph's
    classifier weight (91 rows: torchvision's COCO layout; otherwise ``class_<i>``)."""
    if meta.get("categories"):
        try:
            items = json.loads(meta["categories"])
            categories = [Category(int(c["label"]), int(c["id"]), str(c["name"])) for c in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{source}: unreadable categories in its metadata ({exc})") from None
        width = meta_int(meta.get("num_classes")) or max((c.label for c in categories), default=0) + 1
        return categories, width
    width = _classifier_width(model)
    if config.labels:
        from ..labelmap import read_label_map

        categories = [Category(i.id, i.id, i.label) for i in read_label_map(config.labels)]
        return categories, width or max((c.label for c in categories), default=0) + 1
    if width == 91:
        from ..models import coco_categories

        return coco_categories(), width
    if width:
        return [Category(i, i, f"class_{i}") for i in range(1, width)], width
    raise WeightsError(f"{source}: no class names (no maskseg metadata, no {CLS_SCORE_WEIGHT}); "
                       "pass --labels label_map.pbtxt, or export with `maskseg export --format onnx`")


def _classifier_width(model: str | bytes) -> int | None:
    """Rows of the graph's box classifier weight (classes with background), when it has one by name."""
    try:
        import onnx
    except ImportError:
        return None
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    for init in proto.graph.initializer:
        if init.name == CLS_SCORE_WEIGHT and init.dims:
            return int(init.dims[0])
    return None


def meta_int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "", "None") else None
    except ValueError:
        return None
