"""Segmenter: a loaded backend applied to batches of decoded images, yielding Detections.

The backend runs the network (torchvision by default, ONNX Runtime or TensorFlow on request); the
Segmenter filters classes, pastes masks box-locally and maps model labels to category ids, the same
way for every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .backends import Backend, RawDetections, load_backend
from .config import ModelConfig
from .detections import Detections
from .errors import UsageError
from .models import LoadedModel
from .postprocess import agnostic_nms, raw_to_detections


class Segmenter:
    """Build once, call on lists of images.

    >>> seg = Segmenter(ModelConfig(weights="model.pth", device="cpu"))
    >>> [dets] = seg([rgb])            # rgb: [H, W, 3] uint8
    >>> dets.boxes, dets.scores, dets.labels, dets.masks
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        *,
        mask_thresh: float = 0.5,
        classes: Sequence[str] = (),
        loaded: LoadedModel | None = None,
        backend: Backend | None = None,
        agnostic_nms: float | None = None,
    ) -> None:
        if backend is None and loaded is not None:
            from .backends.torch_backend import TorchBackend

            backend = TorchBackend(loaded)
        self.backend: Backend = backend if backend is not None else load_backend(model or ModelConfig())
        self.mask_thresh = mask_thresh
        self.agnostic_nms = agnostic_nms
        self.keep_labels = self._labels_for(classes)
        self._ids = {c.label: c.id for c in self.backend.categories}

    @property
    def model(self) -> LoadedModel:
        """The torch model behind the ``torch`` backend (``.module`` is torchvision's MaskRCNN)."""
        loaded = getattr(self.backend, "loaded", None)
        if loaded is None:
            raise AttributeError(f"the {type(self.backend).__name__} backend has no torch model")
        return loaded

    @property
    def device(self) -> Any:
        return self.backend.device

    def _labels_for(self, classes: Sequence[str]) -> set[int] | None:
        """Labels to keep: the named classes, or every real category (torchvision's COCO layout has
        N/A slots that no category stands for: detections there are dropped); None keeps all."""
        categories = self.backend.categories
        if not classes:
            known = {c.label for c in categories}
            return None if known >= set(range(1, self.backend.num_classes)) else known
        by_name = {c.name.lower(): c.label for c in categories}
        unknown = [c for c in classes if c.lower() not in by_name]
        if unknown:
            names = ", ".join(sorted(by_name))
            raise UsageError(f"--classes: unknown class {', '.join(unknown)}; the model knows: {names}")
        return {by_name[c.lower()] for c in classes}

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Segment a batch of [H, W, 3] uint8 RGB images; one Detections per image, in order."""
        return [self.finish(raw, rgb) for raw, rgb in zip(self.infer(images), images, strict=True)]

    def infer(self, images: Sequence[np.ndarray]) -> list[RawDetections]:
        """The network's part of ``__call__``: the backend's raw detections (masks not pasted yet)."""
        return self.backend.infer(images) if len(images) else []

    def finish(self, raw: RawDetections, rgb: np.ndarray) -> Detections:
        """The CPU's part of ``__call__`` for one image: classes filtered, masks pasted inside their
        boxes, cross-class overlaps dropped (when ``agnostic_nms`` is set), model labels mapped to
        category ids."""
        dets = raw_to_detections(raw, (int(rgb.shape[0]), int(rgb.shape[1])), mask_thresh=self.mask_thresh,
                                 keep_labels=self.keep_labels)
        if self.agnostic_nms is not None:
            dets = agnostic_nms(dets, self.agnostic_nms)
        return self.to_category_ids(dets)

    def to_category_ids(self, dets: Detections) -> Detections:
        """Replace model labels by the category ids they stand for (the same for torchvision's COCO)."""
        if not len(dets) or all(label == cid for label, cid in self._ids.items()):
            return dets
        ids = np.array([self._ids.get(int(x), int(x)) for x in dets.labels], dtype=np.int64)
        return Detections(dets.boxes, dets.scores, ids, dets.masks, dets.image_size)
