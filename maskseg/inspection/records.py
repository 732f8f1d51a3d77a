"""The records ``inspect_image`` returns: one tensor's statistics, a stage's rows, the input and FPN
levels, the whole forward pass (``StageOutputs``) and the training-time view (``TargetView``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..detections import Detections

DEFAULT_TOP = 100


@dataclass(frozen=True)
class TensorStat:
    """One tensor of one stage: its name, shape, dtype and min/mean/max (None when it is empty)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    min: float | None
    mean: float | None
    max: float | None
    note: str = ""

    @classmethod
    def of(cls, name: str, tensor: Any, note: str = "") -> TensorStat:
        """Statistics of a torch tensor or numpy array (bool: mean is the fraction that is true)."""
        shape = tuple(int(s) for s in tensor.shape)
        if isinstance(tensor, np.ndarray):
            dtype = str(tensor.dtype)
            if tensor.size == 0:
                return cls(name, shape, dtype, None, None, None, note)
            return cls(name, shape, dtype, float(tensor.min()), float(tensor.mean(dtype=np.float64)),
                       float(tensor.max()), note)
        import torch

        t = tensor.detach()
        dtype = str(t.dtype).removeprefix("torch.")
        if t.numel() == 0:
            return cls(name, shape, dtype, None, None, None, note)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        lo, hi = torch.aminmax(t)
        mean = t.mean(dtype=torch.float64) if t.is_floating_point() else t.to(torch.float64).mean()
        return cls(name, shape, dtype, float(lo), float(mean), float(hi), note)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "min": self.min,
                "mean": self.mean, "max": self.max, "note": self.note}


@dataclass(frozen=True)
class Stage:
    """A step of the model: its rows (one per tensor) and facts (settings and counts that explain them)."""

    key: str
    title: str
    rows: tuple[TensorStat, ...]
    facts: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> TensorStat:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"stage {self.key} has no tensor {name!r}; it has {[r.name for r in self.rows]}")

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "rows": [r.as_dict() for r in self.rows],
                "facts": jsonable(self.facts)}


@dataclass(frozen=True)
class InputInfo:
    """Sizes are (height, width). ``scale_factor`` is torchvision's resize factor
    min(min_size / short side, max_size / long side); ``padded_size`` is the batch tensor's size,
    rounded up to a multiple of ``size_divisible``."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    padded_size: tuple[int, int]
    scale_factor: float | None
    min_size: int
    max_size: int
    size_divisible: int


@dataclass(frozen=True)
class LevelInfo:
    """One FPN level as the RPN sees it: torchvision key ('0'..'3', 'pool'), name (P2..P6), nominal
    stride (2 ** level), ``anchor_step`` (the anchor generator's own spacing, padded size // grid size:
    61 rather than 64 for P6's 13 cells on 800 pixels), anchors and how many proposals it contributes
    at each filtering step; ``rois`` is how many RoIs the box head pooled from it."""

    key: str
    name: str
    stride: int
    anchor_step: tuple[int, int]
    feature_shape: tuple[int, ...]
    anchors_per_location: int
    anchor_count: int
    anchor_sizes: tuple[float, ...]
    aspect_ratios: tuple[float, ...]
    pre_nms: int
    after_filters: int
    after_nms: int
    proposals: int
    rois: int


@dataclass(frozen=True)
class StageOutputs:
    """Everything ``inspect_image`` saw. ``stages`` are the rows of the table; ``tensors`` the tensors
    themselves (per-proposal, per-RoI and per-detection arrays bounded by ``top``), for ``save_npz``
    and the pictures; ``detections`` are what ``predict`` gives for the same image and settings."""

    image: str
    model: str
    weights: str
    device: str
    input: InputInfo
    levels: tuple[LevelInfo, ...]
    stages: tuple[Stage, ...]
    detections: Detections
    category_names: dict[int, str]
    label_names: dict[int, str]
    tensors: dict[str, np.ndarray] = field(repr=False)
    rgb: np.ndarray = field(repr=False)
    top: int = DEFAULT_TOP
    proposal_levels_checked: bool = True
    targets: TargetView | None = None

    def stage(self, key: str) -> Stage:
        for s in self.all_stages():
            if s.key == key:
                return s
        raise KeyError(f"no stage {key!r}; stages: {[s.key for s in self.all_stages()]}")

    def all_stages(self) -> tuple[Stage, ...]:
        return self.stages + (self.targets.stages if self.targets is not None else ())

    def level_name(self, index: int) -> str:
        return self.levels[index].name

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        dets = self.detections
        return jsonable({
            "image": self.image, "model": self.model, "weights": self.weights, "device": self.device,
            "input": asdict(self.input), "levels": [asdict(lv) for lv in self.levels],
            "stages": [s.as_dict() for s in self.stages],
            "detections": [
                {"box_xyxy": [round(float(v), 2) for v in dets.boxes[i]], "score": float(dets.scores[i]),
                 "category_id": int(dets.labels[i]),
                 "name": self.category_names.get(int(dets.labels[i]), str(int(dets.labels[i]))),
                 "mask_area": int(dets.masks[i].area) if dets.masks is not None else None}
                for i in range(len(dets))],
            "targets": self.targets.as_dict() if self.targets is not None else None,
            "dump_top": self.top,
        })

    def save_json(self, path: str | Path) -> Path:
        from ..atomic import atomic_write_bytes

        path = Path(path)
        atomic_write_bytes(path, (json.dumps(self.as_dict(), indent=1) + "\n").encode())
        return path

    def save_npz(self, path: str | Path) -> Path:
        """The tensors as one .npz (keys like ``rpn/objectness/P2``; ``np.load`` needs no pickle)."""
        from ..atomic import atomic_write_with

        path = Path(path)
        arrays = dict(self.tensors)
        if self.targets is not None:
            arrays.update(self.targets.tensors)
        atomic_write_with(path, lambda fh: np.savez(fh, **arrays))
        return path


@dataclass(frozen=True)
class TargetView:
    """The training-time view of one image. Boxes are in the resized image the losses see.

    RPN: ``anchor_labels`` [A] (1 positive, 0 negative, -1 ignored: the Matcher's verdict),
    ``rpn_sampled_pos`` / ``rpn_sampled_neg`` (anchor indices the sampler drew), ``gt_best_anchor`` [G]
    (each ground truth's highest-IoU anchor), ``rpn_regression_targets`` [P, 4] (dx, dy, dw, dh of the
    sampled positives). RoI heads: ``roi_labels`` [R] class targets of the sampled RoIs (0 background),
    ``mask_targets`` [P, M, M] for their positives. ``losses``: torchvision's five loss values.
    """

    annotation_file: str
    image_id: int
    file_name: str
    skipped: tuple[str, ...]
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_category_ids: np.ndarray
    anchors: np.ndarray
    anchor_labels: np.ndarray
    gt_best_anchor: np.ndarray
    gt_best_iou: np.ndarray
    rpn_sampled_pos: np.ndarray
    rpn_sampled_neg: np.ndarray
    rpn_batch_size: int
    rpn_positive_fraction: float
    rpn_regression_targets: np.ndarray
    roi_proposals: int
    roi_matched: dict[str, int]
    roi_boxes: np.ndarray
    roi_labels: np.ndarray
    roi_batch_size: int
    roi_positive_fraction: float
    mask_targets: np.ndarray
    losses: dict[str, float]
    resized_size: tuple[int, int]
    original_size: tuple[int, int]
    stages: tuple[Stage, ...]
    tensors: dict[str, np.ndarray] = field(repr=False)

    @property
    def counts(self) -> dict[str, int]:
        lab = self.anchor_labels
        return {"anchors": int(lab.size), "positive": int((lab == 1).sum()), "negative": int((lab == 0).sum()),
                "ignored": int((lab == -1).sum()), "sampled_positive": int(self.rpn_sampled_pos.size),
                "sampled_negative": int(self.rpn_sampled_neg.size),
                "roi_sampled": int(self.roi_labels.size), "roi_sampled_positive": int((self.roi_labels > 0).sum())}

    def as_dict(self) -> dict[str, Any]:
        return jsonable({
            "annotation_file": self.annotation_file, "image_id": self.image_id, "file_name": self.file_name,
            "skipped": list(self.skipped), "gt": [
                {"box_xyxy_resized": [round(float(v), 2) for v in b], "label": int(lab), "category_id": int(c)}
                for b, lab, c in zip(self.gt_boxes, self.gt_labels, self.gt_category_ids, strict=True)],
            "rpn": {**self.counts, "batch_size_per_image": self.rpn_batch_size,
                    "positive_fraction": self.rpn_positive_fraction,
                    "gt_best_anchor_iou": [round(float(v), 4) for v in self.gt_best_iou]},
            "roi_heads": {"proposals": self.roi_proposals, "matched": self.roi_matched,
                          "sampled": int(self.roi_labels.size), "batch_size_per_image": self.roi_batch_size,
                          "positive_fraction": self.roi_positive_fraction,
                          "class_targets": label_histogram(self.roi_labels)},
            "losses": self.losses, "stages": [s.as_dict() for s in self.stages],
        })


@dataclass(frozen=True)
class ImageTargets:
    """One image's ground truth read from a COCO file: torchvision's target dict and what was left out."""

    annotation_file: str
    info: dict
    target: dict
    skipped: tuple[str, ...]
    category_ids: np.ndarray



def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays as Python values, keys as str, NaN and infinities as None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def label_histogram(labels: np.ndarray) -> dict[str, int]:
    """How many times each label occurs, keyed by the label as str (for JSON)."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {str(int(k)): int(n) for k, n in zip(values, counts, strict=True)}
