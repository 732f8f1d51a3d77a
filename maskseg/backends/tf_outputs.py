"""TensorFlow exports' signature outputs -> RawDetections, for the two export layouts maskseg reads.

- ``"od_api"``, the TF Object Detection API (``exporter_main_v2.py``): ``detection_boxes`` [1, K, 4]
  NORMALISED (ymin, xmin, ymax, xmax) of the image fed; ``detection_classes`` 1-based floats;
  ``detection_masks`` [1, K, M, M] over each box exactly ("box" layout) or [1, K, H, W] full-image.
  The class count comes from a per-class score output or ``pipeline.config`` (background excluded).
- ``"model_garden"``, TF Model Garden (``official.vision`` ``export_saved_model_lib``): recognised by
  its ``image_info`` output [1, 4, 2] = (original H, W), (desired H, W), (y, x scale), (y, x offset).
  ``detection_boxes`` are (ymin, xmin, ymax, xmax) IN PIXELS of the resized canvas; they map back to
  the image fed as Model Garden's own evaluator maps them, ``(box + offset) / scale`` (the offset is 0
  at serving time, so this is its division by ``image_info[2]``). ``detection_classes`` are int32 ids
  as they are; ``detection_masks`` [1, K, 28, 28] sit on their boxes the torchvision/Detectron way
  ("roi" layout: padded one cell, box scaled by 30/28). ``params.yaml`` beside ``saved_model/``
  holds ``task.model.num_classes`` (background included).

Boxes are NOT clipped here: a mask is pasted onto its whole box, and box and mask are clipped to the
image afterwards (``postprocess``), so a box that runs past the image edge keeps its mask unsqueezed.
Values no such export can hold (normalised boxes outside [0, 1], NaNs, scores outside [0, 1]) raise
``ModelOutputError``, which ends the run: an export maskseg misreads must never write zero-area boxes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ModelOutputError
from .base import MaskLayout, RawDetections

ExportLayout = Literal["od_api", "model_garden"]

REQUIRED_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes")
CLASS_SCORE_OUTPUTS = ("detection_multiclass_scores", "raw_detection_scores")
MODEL_GARDEN_INFO = "image_info"
# The outputs the adapters read (the rest of a signature's outputs are not fetched).
READ_OUTPUTS = (*REQUIRED_OUTPUTS, "num_detections", "detection_masks", MODEL_GARDEN_INFO)
# Normalised boxes a little past [0, 1] are float noise; past this, they are not normalised at all.
NORMALISED_SLACK = 0.01
# Pixel boxes of a Model Garden canvas may run past it by rounding; past this fraction of its side, they are wrong.
CANVAS_SLACK = 0.05
PROBABILITY_SLACK = 1e-3


def export_layout(output_names: set[str] | Mapping[str, object]) -> ExportLayout:
    """Which layout a signature's outputs follow: Model Garden when it has ``image_info``, else the OD API's."""
    return "model_garden" if MODEL_GARDEN_INFO in output_names else "od_api"


def to_raw_detections(
    outputs: Mapping[str, np.ndarray],
    image_size: tuple[int, int],
    *,
    score_thresh: float,
    max_dets: int,
    fed_size: tuple[int, int] | None = None,
    source: str = "the SavedModel",
) -> RawDetections:
    """One image's Object Detection API outputs (batch of 1, as numpy) -> RawDetections in original pixels.

    ``detection_boxes`` [1, K, 4] normalised (ymin, xmin, ymax, xmax) become XYXY float pixels of
    ``image_size`` (H, W); ``detection_classes`` [1, K] floats become int64 ids as they are; only the
    first ``num_detections`` rows count. Detections scoring at least ``score_thresh`` are kept, best
    first, at most ``max_dets``. ``detection_masks`` [1, K, h, w] in [0, 1] are full-image masks when
    (h, w) equals ``fed_size`` (the tensor fed, default ``image_size``; resized to ``image_size`` when it
    differs), else masks over their boxes. ``source`` names the export in errors.
    """
    height, width = image_size
    fed_size = fed_size or image_size
    boxes, scores, classes, count = _rows(outputs)
    _check_finite_and_within(boxes[:count], -NORMALISED_SLACK, 1 + NORMALISED_SLACK, "detection_boxes", source,
                             "normalised [0, 1] boxes (ymin, xmin, ymax, xmax), as the TF Object Detection API "
                             "exports them")
    _check_common(scores[:count], classes[:count], source)
    keep = _kept(scores, count, score_thresh, max_dets)
    ymin, xmin, ymax, xmax = boxes[keep].T
    pixel_boxes = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=1)
    masks, layout = _masks(outputs, keep, source), "box"
    if masks is not None and tuple(masks.shape[1:]) == tuple(fed_size):
        layout = "image"
        if tuple(fed_size) != tuple(image_size):
            masks = _resize_masks(masks, image_size)
    return _raw(pixel_boxes, scores[keep], classes[keep], masks, layout)


def model_garden_to_raw_detections(
    outputs: Mapping[str, np.ndarray],
    image_size: tuple[int, int],
    *,
    score_thresh: float,
    max_dets: int,
    fed_size: tuple[int, int] | None = None,
    source: str = "the SavedModel",
) -> RawDetections:
    """One image's Model Garden outputs (batch of 1, as numpy) -> RawDetections in original pixels.

    ``detection_boxes`` [1, K, 4] (ymin, xmin, ymax, xmax) in pixels of the resized canvas map back by
    ``image_info`` ((box + offset) / scale, as Model Garden's evaluator does) to the image fed
    (``fed_size``, default ``image_size``), then to ``image_size``; XYXY, unclipped. Masks [1, K, M, M]
    stay in the "roi" layout. Thresholds and order as ``to_raw_detections``.
    """
    height, width = image_size
    fed_h, fed_w = fed_size or image_size
    info = np.asarray(outputs[MODEL_GARDEN_INFO], dtype=np.float64)
    if info.size != 8 or not np.isfinite(info).all():
        raise ModelOutputError(f"{source}: {MODEL_GARDEN_INFO} is {info.reshape(-1).tolist()[:8]} (shape "
                               f"{list(info.shape)}); expected [1, 4, 2] finite rows (original H, W), (desired H, W), "
                               "(y, x scale), (y, x offset), as TF Model Garden exports it")
    (orig_h, orig_w), (canvas_h, canvas_w), (y_scale, x_scale), (y_off, x_off) = info.reshape(4, 2)
    if abs(orig_h - fed_h) > 0.5 or abs(orig_w - fed_w) > 0.5 or y_scale <= 0 or x_scale <= 0:
        raise ModelOutputError(f"{source}: {MODEL_GARDEN_INFO} says the image is {orig_w:g}x{orig_h:g} with scale "
                               f"({y_scale:g}, {x_scale:g}), but a {fed_w}x{fed_h} image was fed; these outputs "
                               "cannot be mapped back onto it")
    boxes, scores, classes, count = _rows(outputs)
    for column, side, axis in ((0, canvas_h, "y"), (1, canvas_w, "x"), (2, canvas_h, "y"), (3, canvas_w, "x")):
        slack = CANVAS_SLACK * side
        _check_finite_and_within(boxes[:count, column], -slack, side + slack, "detection_boxes", source,
                                 f"pixel boxes on Model Garden's {canvas_w:g}x{canvas_h:g} canvas ({axis} within "
                                 f"0..{side:g})")
    _check_common(scores[:count], classes[:count], source)
    keep = _kept(scores, count, score_thresh, max_dets)
    ymin, xmin, ymax, xmax = boxes[keep].T
    fy, fx = height / fed_h, width / fed_w
    pixel_boxes = np.stack([(xmin + x_off) / x_scale * fx, (ymin + y_off) / y_scale * fy,
                            (xmax + x_off) / x_scale * fx, (ymax + y_off) / y_scale * fy], axis=1)
    return _raw(pixel_boxes, scores[keep], classes[keep], _masks(outputs, keep, source), "roi")


def pipeline_num_classes(model_dir: Path) -> int | None:
    """``num_classes`` (background excluded) from the ``pipeline.config`` the Object Detection API
    exports beside the SavedModel folder (or inside it); None when there is none."""
    for config in (model_dir.parent / "pipeline.config", model_dir / "pipeline.config"):
        if config.is_file():
            try:
                m = re.search(r"\bnum_classes\s*:\s*(\d+)", config.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
            if m:
                return int(m.group(1))
    return None


def params_num_classes(model_dir: Path) -> int | None:
    """Classes (background excluded) from ``task.model.num_classes`` of the ``params.yaml`` Model Garden
    exports beside the SavedModel folder (or inside it), which counts the background; None when absent."""
    for params in (model_dir.parent / "params.yaml", model_dir / "params.yaml"):
        if params.is_file():
            try:
                text = params.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            value = yaml_scalar(text, ("task", "model", "num_classes"))
            if value is not None and re.fullmatch(r"\d+", value) and int(value) > 1:
                return int(value) - 1
    return None


def yaml_scalar(text: str, path: tuple[str, ...]) -> str | None:
    """The scalar at ``path`` of a block-style YAML mapping, as text; None when it is not there.

    By hand because PyYAML is not a dependency of maskseg (nor of TensorFlow), and one integer at a
    known path of Model Garden's own ``params.yaml`` (plain nested mappings) is all that is read.
    """
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_][\w.-]*)\s*:(?:\s+(.*?))?\s*(?:#.*)?$", line)
        if m is None:
            continue
        indent, key, value = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if (*(k for _, k in stack), key) == path:
            return value.strip("'\"") if value else None
        stack.append((indent, key))
    return None


def _rows(outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Boxes [K, 4] float64, scores [K] float32, classes [K] float64 and how many rows count."""
    boxes = np.asarray(outputs["detection_boxes"], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(outputs["detection_scores"], dtype=np.float32).reshape(-1)
    classes = np.asarray(outputs["detection_classes"], dtype=np.float64).reshape(-1)
    count = len(scores)
    if "num_detections" in outputs:
        count = min(count, int(np.asarray(outputs["num_detections"]).reshape(-1)[0]))
    return boxes, scores, classes, max(count, 0)


def _kept(scores: np.ndarray, count: int, score_thresh: float, max_dets: int) -> np.ndarray:
    """Row indices scoring at least ``score_thresh`` among the first ``count``, best first, at most ``max_dets``."""
    order = np.argsort(-scores[:count], kind="stable")
    return order[scores[order] >= score_thresh][:max_dets]


def _masks(outputs: Mapping[str, np.ndarray], keep: np.ndarray, source: str) -> np.ndarray | None:
    if "detection_masks" not in outputs:
        return None
    all_masks = np.asarray(outputs["detection_masks"], dtype=np.float32)
    all_masks = all_masks.reshape(-1, *all_masks.shape[-2:])
    masks = all_masks[keep]
    _check_finite_and_within(masks, -PROBABILITY_SLACK, 1 + PROBABILITY_SLACK, "detection_masks", source,
                             "mask probabilities in [0, 1]")
    return masks


def _check_common(scores: np.ndarray, classes: np.ndarray, source: str) -> None:
    _check_finite_and_within(scores, -PROBABILITY_SLACK, 1 + PROBABILITY_SLACK, "detection_scores", source,
                             "scores in [0, 1]")
    _check_finite_and_within(classes, 0, np.inf, "detection_classes", source, "class ids of 0 or more")


def _check_finite_and_within(values: np.ndarray, low: float, high: float, output: str, source: str,
                             expected: str) -> None:
    """``ModelOutputError`` naming ``output`` when any value is NaN/inf or outside [low, high]."""
    if values.size == 0:
        return
    finite = np.isfinite(values)
    if not finite.all():
        raise ModelOutputError(f"{source}: {output} holds {int((~finite).sum())} NaN or infinite values; "
                               f"expected {expected}")
    lo, hi = float(values.min()), float(values.max())
    if lo < low or hi > high:
        raise ModelOutputError(f"{source}: {output} holds values from {lo:g} to {hi:g}, where {expected}; "
                               "maskseg reads TF Object Detection API and TF Model Garden exports, and this one "
                               "is not laid out as either (see README: TensorFlow exports)")


def _raw(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, masks: np.ndarray | None,
         layout: MaskLayout) -> RawDetections:
    return RawDetections(
        boxes=boxes.astype(np.float32).reshape(-1, 4),
        scores=scores,
        labels=np.rint(classes).astype(np.int64),
        masks=masks,
        mask_layout=layout,
    )


def _resize_masks(masks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """[N, h, w] full-image probabilities at the fed size -> [N, H, W] at the original size."""
    import cv2

    height, width = image_size
    out = np.empty((len(masks), height, width), dtype=np.float32)
    for i, m in enumerate(masks):
        out[i] = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    return out
