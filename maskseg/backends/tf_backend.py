"""The TensorFlow backend: Mask R-CNN SavedModels exported by the TF Object Detection API or by TF
Model Garden, run through their ``serving_default`` signature one image at a time.

The signature's image input is found by inspection: a rank-4 [1 or None, H, W, 3] tensor, uint8 (fed
as decoded) or floating point (fed as float 0..255, the Object Detection API convention, not 0..1).
A signature with a fixed H, W gets the image resized to it. Which export layout the outputs follow
(an ``image_info`` output means Model Garden's) and how each maps onto the original image is
``tf_outputs``' job, the one adapter; masks are pasted by ``maskseg.postprocess`` like every other
backend's.

Class ids are the model's own (label == category id, never shifted). Names come from ``--labels``
(a label map); without one the model's class count is read from the signature's
``detection_multiclass_scores``/``raw_detection_scores`` width (background included), from the
``pipeline.config`` the Object Detection API exports beside the SavedModel, or from Model Garden's
``params.yaml`` (``task.model.num_classes``, background included), and classes are named ``class_<id>``.
TensorFlow's own loader warnings stay out of the log unless ``-v``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..detections import Category
from ..errors import UsageError, WeightsError
from ..labelmap import LabelMapItem, read_label_map
from .base import RawDetections
from .tf_outputs import (
    CLASS_SCORE_OUTPUTS,
    READ_OUTPUTS,
    REQUIRED_OUTPUTS,
    ExportLayout,
    export_layout,
    model_garden_to_raw_detections,
    params_num_classes,
    pipeline_num_classes,
    to_raw_detections,
)

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INSTALL_HINT = "--backend tensorflow needs TensorFlow: pip install 'maskseg[tensorflow]'"


@dataclass(frozen=True)
class ImageInput:
    """The signature's image input: its keyword, dtype name and fixed (H, W) if it has one."""

    name: str
    dtype: str
    size: tuple[int, int] | None = None


def find_saved_model(path: str | Path) -> Path:
    """The SavedModel folder for ``--weights``: the folder holding ``saved_model.pb``, the export folder
    above it (``exported_model/`` with ``saved_model/`` inside), or the ``saved_model.pb`` file itself."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: SavedModel folder not found")
    if p.is_file():
        if p.name in ("saved_model.pb", "saved_model.pbtxt"):
            return p.parent
        raise WeightsError(f"{p}: --backend tensorflow expects a SavedModel folder (holding saved_model.pb), "
                           "not a file")
    for folder in (p, p / "saved_model"):
        if (folder / "saved_model.pb").is_file() or (folder / "saved_model.pbtxt").is_file():
            return folder
    raise WeightsError(f"{p}: not a SavedModel folder (no saved_model.pb in it or in {p / 'saved_model'})")


def import_tensorflow(threads: int | None = None, *, quiet: bool = True) -> Any:
    """Import TensorFlow with its C++ logging quieted; UsageError naming the extra when it is missing.

    ``threads`` sets TF's intra- and inter-op pools (only possible before TF's runtime starts).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # torchvision's C extension segfaults when first loaded after TensorFlow (seen with TF 2.20 and
    # torchvision 0.29); the mask paste needs it, so it is loaded first.
    import torchvision.ops  # noqa: F401

    try:
        tf = _import_quietly() if quiet else __import__("tensorflow")
    except ImportError as exc:
        log.debug("importing tensorflow failed: %s", exc)
        raise UsageError(INSTALL_HINT) from None
    if quiet:
        # TF's Python-side warnings (hundreds of "Importing a function ... with ops with unsaved custom
        # gradients" lines while loading a Model Garden export) would otherwise reach maskseg's log.
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            log.warning("TensorFlow is already running in this process; --threads %d is not applied", threads)
    return tf


def _import_quietly() -> Any:
    """``import tensorflow`` with file descriptor 2 pointed at /dev/null for the import only.

    TF 2.19+ logs oneDNN notices through absl before its logging is set up, and those ignore
    TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442); unattended runs should not mail them to cron.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return tf


def _image_input(signature: Any, model_dir: Path) -> ImageInput:
    """Find the signature's one image input: rank 4, batch 1 or None, 3 channels, uint8 or float."""
    _, kwargs = signature.structured_input_signature
    specs = dict(kwargs)
    found = [(name, spec) for name, spec in specs.items()
             if spec.shape.rank == 4 and spec.shape[-1] in (3, None)
             and (spec.dtype.is_floating or spec.dtype.name == "uint8")]
    described = ", ".join(f"{n}: {s.dtype.name} {s.shape.as_list() if s.shape.rank is not None else '?'}"
                          for n, s in specs.items()) or "none"
    if len(found) != 1 or len(specs) != 1:
        raise WeightsError(
            f"{model_dir}: the {SIGNATURE} signature must take one image tensor [1, H, W, 3] (uint8 or float); "
            f"it takes {described}. Export with --input_type image_tensor")
    name, spec = found[0]
    if spec.shape[0] not in (1, None):
        raise WeightsError(f"{model_dir}: the image input {name} takes batches of {spec.shape[0]}; maskseg feeds 1")
    h, w = spec.shape[1], spec.shape[2]
    return ImageInput(name, spec.dtype.name, (int(h), int(w)) if h is not None and w is not None else None)


def _signature(loaded: Any, model_dir: Path) -> Any:
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if SIGNATURE in signatures:
        return signatures[SIGNATURE]
    if len(signatures) == 1:
        return next(iter(signatures.values()))
    raise WeightsError(f"{model_dir}: no {SIGNATURE} signature (it has: {', '.join(signatures) or 'none'})")


def _class_count(outputs: Mapping[str, Any]) -> int | None:
    """Classes the model scores (background excluded), from a per-class score output's static width."""
    for key in CLASS_SCORE_OUTPUTS:
        spec = outputs.get(key)
        if spec is not None and spec.shape.rank and spec.shape[-1] is not None and int(spec.shape[-1]) > 1:
            return int(spec.shape[-1]) - 1
    return None


def tf_categories(items: list[LabelMapItem] | None, labels_file: str | None, model_dir: Path,
                  scored: int | None) -> list[Category]:
    """Categories from the label map's items (label = id = the item's id), else ``class_<id>`` for
    ids 1..N with N from the signature (``scored``) or pipeline.config."""
    if items:
        top = items[-1].id
        if scored is not None and top > scored:
            log.warning("%s has ids up to %d but the model scores %d classes", labels_file, top, scored)
        return [Category(i.id, i.id, i.label) for i in items]
    count = scored if scored is not None else pipeline_num_classes(model_dir) or params_num_classes(model_dir)
    if not count:
        raise UsageError(
            f"{model_dir}: cannot tell how many classes the model has (no {' or '.join(CLASS_SCORE_OUTPUTS)} "
            "output, no pipeline.config or params.yaml beside it); pass --labels label_map.pbtxt")
    return [Category(i, i, f"class_{i}") for i in range(1, count + 1)]


class TensorFlowBackend:
    """A loaded SavedModel's serving signature, fed one image at a time (TF OD API exports take batch 1)."""

    def __init__(self, tf: Any, loaded: Any, model_dir: Path, image_input: ImageInput,
                 categories: list[Category], device: str, scored: int | None, config: ModelConfig,
                 layout: ExportLayout = "od_api") -> None:
        self.tf = tf
        self.loaded = loaded  # owns the variables the signature reads
        self.signature = _signature(loaded, model_dir)
        self.model_dir = model_dir
        self.image_input = image_input
        self.categories = categories
        self.device = device
        self.score_thresh = config.score_thresh
        self.max_dets = config.max_dets
        self.labels_file = config.labels
        self.layout = layout
        self._known = {c.label for c in categories}
        self._num_classes = max([*self._known, scored or 0]) + 1
        self._warned: set[int] = set()
        name = model_dir.parent.name if model_dir.name == "saved_model" else model_dir.name
        self.name = f"tensorflow:{name or model_dir.resolve().name}"

    @classmethod
    def load(cls, config: ModelConfig) -> TensorFlowBackend:
        """Import TF, load ``config.weights`` (a SavedModel folder) and inspect its serving signature."""
        if not config.weights:
            raise UsageError("--backend tensorflow needs --weights SAVED_MODEL_DIR (the folder holding saved_model.pb)")
        model_dir = find_saved_model(config.weights)
        items = None
        if config.labels:
            items = read_label_map(config.labels)  # a bad label map fails before the slow TF import
        if config.min_size or config.max_size:
            log.warning("--min-size/--max-size do not apply to --backend tensorflow: the SavedModel resizes itself")
        tf = import_tensorflow(config.threads, quiet=not log.isEnabledFor(logging.DEBUG))
        device = _device(tf, config.device)
        try:
            with tf.device(device):  # variables are restored onto the chosen device
                loaded = tf.saved_model.load(str(model_dir))
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise WeightsError(f"{model_dir}: TensorFlow cannot load this SavedModel ({type(exc).__name__}: "
                               f"{detail})") from None
        signature = _signature(loaded, model_dir)
        outputs = dict(signature.structured_outputs)
        missing = [k for k in REQUIRED_OUTPUTS if k not in outputs]
        if missing:
            raise WeightsError(f"{model_dir}: the signature has no {', '.join(missing)} output (it has: "
                               f"{', '.join(sorted(outputs))}); expected a TF Object Detection API or TF Model "
                               "Garden export")
        if "detection_masks" not in outputs:
            log.warning("%s: the signature has no detection_masks output; results will carry boxes only", model_dir)
        image_input = _image_input(signature, model_dir)
        scored = _class_count(outputs)
        categories = tf_categories(items, config.labels, model_dir, scored)
        layout = export_layout(outputs)
        backend = cls(tf, loaded, model_dir, image_input, categories, device, scored, config, layout)
        log.info("SavedModel %s (%s export): input %s %s%s, %d classes, on %s", model_dir,
                 "TF Model Garden" if layout == "model_garden" else "TF Object Detection API", image_input.name,
                 image_input.dtype, f" {image_input.size[0]}x{image_input.size[1]}" if image_input.size else "",
                 len(backend.categories), device)
        return backend

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def infer(self, images: Sequence[np.ndarray]) -> list[RawDetections]:
        """Run the signature on each [H, W, 3] uint8 RGB image in turn; one RawDetections per image."""
        return [self._infer_one(rgb) for rgb in images]

    def _infer_one(self, rgb: np.ndarray) -> RawDetections:
        tf = self.tf
        image_size = (int(rgb.shape[0]), int(rgb.shape[1]))
        fed = rgb
        if self.image_input.size is not None and self.image_input.size != image_size:
            import cv2

            fed = cv2.resize(rgb, (self.image_input.size[1], self.image_input.size[0]), interpolation=cv2.INTER_LINEAR)
        tensor = tf.convert_to_tensor(fed[None])
        if self.image_input.dtype != "uint8":
            tensor = tf.cast(tensor, self.image_input.dtype)  # 0..255 floats: the Object Detection API convention
        try:
            with tf.device(self.device):
                outputs = self.signature(**{self.image_input.name: tensor})
        except (tf.errors.OpError, ValueError, TypeError) as exc:
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"{self.model_dir}: the SavedModel failed on a {image_size[1]}x{image_size[0]} "
                               f"image ({detail})") from None
        arrays = {k: v.numpy() for k, v in outputs.items() if k in READ_OUTPUTS}
        adapter = model_garden_to_raw_detections if self.layout == "model_garden" else to_raw_detections
        raw = adapter(arrays, image_size, score_thresh=self.score_thresh, max_dets=self.max_dets,
                      fed_size=(int(fed.shape[0]), int(fed.shape[1])), source=f"{self.model_dir}")
        return self._known_only(raw)

    def _known_only(self, raw: RawDetections) -> RawDetections:
        """Drop labels no category stands for (ids the label map skips), saying so once per id."""
        labels = np.asarray(raw.labels)
        keep = np.isin(labels, list(self._known))
        if keep.all():
            return raw
        for label in sorted(set(labels[~keep].tolist()) - self._warned):
            self._warned.add(label)
            where = self.labels_file or "the model's classes"
            log.warning("class id %d is not in %s; its detections are dropped", label, where)
        return RawDetections(raw.boxes[keep], raw.scores[keep], labels[keep],
                             raw.masks[keep] if raw.masks is not None else None, raw.mask_layout)


def _device(tf: Any, spec: str) -> str:
    """``auto`` -> the first GPU TF sees, else the CPU; ``cpu``; ``cuda``/``cuda:N`` -> ``/GPU:N``."""
    gpus = tf.config.list_physical_devices("GPU")
    if spec == "auto":
        return "/GPU:0" if gpus else "/CPU:0"
    if spec == "cpu":
        if gpus:
            try:
                tf.config.set_visible_devices([], "GPU")  # keeps TF from taking GPU memory it will not use
            except RuntimeError:
                log.debug("TensorFlow is already running; its GPUs stay visible")
        return "/CPU:0"
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m is None:
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    index = int(m.group(1) or 0)
    if index >= len(gpus):
        raise UsageError(f"--device {spec}: TensorFlow sees {len(gpus)} GPU(s) here; use --device cpu")
    return f"/GPU:{index}"
