"""What every backend gives: ``RawDetections`` per image, and the ``Backend`` protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ..detections import Category

MaskLayout = Literal["roi", "box", "image"]


@dataclass(frozen=True)
class RawDetections:
    """One image's network output, before masks are pasted.

    ``boxes``: [N, 4] float XYXY pixels in the ORIGINAL image (torch tensor or ndarray).
    ``scores``: [N] float in [0, 1]. ``labels``: [N] int64, the model's own label ids (not yet mapped to
    category ids). ``masks``: [N, M, M] float probabilities relative to each box, or None.
    ``mask_layout``: how an M x M mask sits on its box: ``"roi"`` is torchvision's (the mask is padded
    by one cell and the box scaled to match, as ``paste_masks_in_image`` does); ``"box"`` maps the mask
    exactly onto the box (TF Object Detection API's ``detection_masks``); ``"image"`` means ``masks`` is
    [N, H, W], already pasted into the whole original image (thresholded, then kept only inside the box).
    """

    boxes: Any
    scores: Any
    labels: Any
    masks: Any | None
    mask_layout: MaskLayout = "roi"


@runtime_checkable
class Backend(Protocol):
    """A loaded network: ``name`` for logs and run.json, ``categories`` (label -> id, name), ``device``."""

    name: str
    categories: list[Category]
    device: Any

    @property
    def num_classes(self) -> int:
        """Classifier width including background (label ids are 1..num_classes-1)."""
        ...

    def infer(self, images: Sequence[np.ndarray]) -> list[RawDetections]:
        """Run the network on [H, W, 3] uint8 RGB arrays; one RawDetections per image, in order."""
        ...
