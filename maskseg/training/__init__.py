"""Fine-tuning Mask R-CNN: ``train``/``resume`` a run folder, its metrics, checkpoints and int8 export.

The parts: ``run`` (entry points, run folder), ``trainer`` (the loop), ``hooks`` (its after-step and
after-epoch duties), ``data`` (COCO -> samples), ``yolo`` (a YOLO-seg dataset read as COCO),
``finetune`` (model surgery), ``schedule``, ``distributed``,
``validate`` (COCOeval), ``metrics`` (metrics.jsonl and its plot), ``checkpoint``, ``quantize``.
"""

from .checkpoint import BEST, BEST_INT8, LAST, CheckpointWriter
from .data import (
    Augment,
    CocoDetection,
    CocoImage,
    CocoSet,
    annotation_mask,
    collate,
    copy_paste,
    flip_and_jitter,
    read_coco,
)
from .distributed import Distributed
from .finetune import build_for_training, freeze_batch_norm, replace_predictors, set_trainable
from .hooks import SilentTrainProgress, TrainProgress
from .metrics import METRICS_FILE, PLOT_FILE, plot_metrics, read_metrics
from .quantize import export_int8
from .run import RunData, TrainSummary, check_train_config, config_from_dict, resume, train
from .trainer import LoopState, Trainer, TrainHook
from .validate import coco_ap, evaluate_module
from .yolo import read_yolo, yolo_root

__all__ = [
    "BEST", "BEST_INT8", "LAST", "METRICS_FILE", "PLOT_FILE", "Augment", "CheckpointWriter", "CocoDetection",
    "CocoImage", "CocoSet", "Distributed", "LoopState", "RunData", "SilentTrainProgress", "TrainHook",
    "TrainProgress", "TrainSummary", "Trainer", "annotation_mask", "build_for_training", "check_train_config",
    "coco_ap", "collate", "config_from_dict", "copy_paste", "evaluate_module", "export_int8", "flip_and_jitter",
    "freeze_batch_norm", "plot_metrics", "read_coco", "read_metrics", "read_yolo", "replace_predictors", "resume",
    "set_trainable", "train", "yolo_root",
]
