"""One image through Mask R-CNN stage by stage: the forward pass, the training-time targets and pictures."""

from .draw import (
    draw_all,
    mask_logits_png,
    objectness_png,
    overlay_jpg,
    proposals_png,
    roi_levels_png,
    target_anchors_png,
    target_masks_png,
)
from .forward import inspect_image, level_names
from .records import (
    DEFAULT_TOP,
    ImageTargets,
    InputInfo,
    LevelInfo,
    Stage,
    StageOutputs,
    TargetView,
    TensorStat,
    jsonable,
    label_histogram,
)
from .targets import load_ground_truth, locate_image, training_view

__all__ = [
    "DEFAULT_TOP",
    "ImageTargets",
    "InputInfo",
    "LevelInfo",
    "Stage",
    "StageOutputs",
    "TargetView",
    "TensorStat",
    "draw_all",
    "inspect_image",
    "jsonable",
    "label_histogram",
    "level_names",
    "load_ground_truth",
    "locate_image",
    "mask_logits_png",
    "objectness_png",
    "overlay_jpg",
    "proposals_png",
    "roi_levels_png",
    "target_anchors_png",
    "target_masks_png",
    "training_view",
]
