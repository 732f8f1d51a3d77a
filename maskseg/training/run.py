"""``train`` and ``resume``: one fine-tuning run of torchvision's Mask R-CNN into a run folder.

Sets the run up (config checks, data, model, optimizer, schedule, DistributedDataParallel under
``torchrun``), hands it to the ``Trainer`` with its hooks, and leaves behind a metrics file and best/last
checkpoints that ``maskseg predict --weights`` uses unaided. No argument parsing here (cli/train.py does that).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..config import TrainConfig
from ..errors import OutputError, UsageError, WeightsError
from ..models import CHECKPOINT_FORMAT, MODELS
from .checkpoint import BEST, BEST_INT8, LAST, CheckpointWriter, restore_rng, write_lean_copy
from .data import Augment, CocoDetection, CocoSet, read_coco
from .distributed import Distributed
from .finetune import build_for_training, set_trainable
from .hooks import (
    CheckpointHook,
    MetricsHook,
    ProgressHook,
    SilentTrainProgress,
    StopHook,
    TrainProgress,
    ValidationHook,
)
from .metrics import METRICS_FILE, PLOT_FILE, plot_metrics, trim_metrics
from .quantize import export_int8
from .schedule import lr_lambda, make_optimizer
from .trainer import LoopState, Trainer, TrainHook
from .yolo import is_yolo_yaml, read_yolo

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What a ``train`` run did. ``best`` is the checkpoint with the highest validation segm AP (the last
    one without validation); ``metrics`` the last epoch record."""

    run_dir: str
    steps: int = 0
    epochs: int = 0
    best: str = ""
    last: str = ""
    best_epoch: int | None = None
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False


@dataclass(frozen=True)
class RunData:
    """The COCO files and image folders of a run, as ``last.pt`` records them for ``resume``."""

    coco: str
    images: str
    val_coco: str | None
    val_images: str | None


def train(
    coco: str | Path,
    images: str | Path,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    val_coco: str | Path | None = None,
    val_images: str | Path | None = None,
    overwrite: bool = False,
    progress: TrainProgress | None = None,
    stop: threading.Event | None = None,
) -> TrainSummary:
    """Train a Mask R-CNN on a COCO instances file (``coco``, images under ``images``) into ``run_dir``.

    Validation (COCO bbox + segm AP after every ``eval_every`` epochs) uses ``val_coco``/``val_images``
    or, with ``config.val_split``, the last images of ``coco``. Writes ``last.pt`` (with optimizer,
    scheduler, step and RNG for ``resume``), ``best.pt``, ``metrics.jsonl``, ``training.png``, and the
    split used (``train.json``/``val.json``). Setting ``stop`` ends the run after the step in flight
    with ``last.pt`` written. Raises ``MasksegError`` subclasses for problems the user can fix.
    """
    config = config or TrainConfig()
    run = Path(run_dir)
    if (run / LAST).exists() and not overwrite:
        raise UsageError(f"{run}: holds a training run already; resume it with --resume {run} or pass --overwrite")
    if val_coco is not None and val_images is None:
        val_images = images
    data = RunData(str(coco), str(images), str(val_coco) if val_coco else None, str(val_images) if val_images else None)
    return _run(run, config, data, progress, stop, None)


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    progress: TrainProgress | None = None,
    stop: threading.Event | None = None,
) -> TrainSummary:
    """Continue the run in ``run_dir`` from its ``last.pt``: model, optimizer, scheduler, step and RNG,
    with the settings and data it was started with (``epochs``, ``device``, ``workers`` may change)."""
    from ..models import read_weights_file

    run = Path(run_dir)
    if not (run / LAST).is_file():
        raise UsageError(f"{run}: no {LAST} to resume from (is it a maskseg train run folder?)")
    state = read_weights_file(run / LAST)
    saved = state.get("train")
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(saved, dict) or "optimizer" not in state:
        raise WeightsError(f"{run / LAST}: not a resumable maskseg training checkpoint")
    config = config_from_dict(saved["config"])
    overrides = {k: v for k, v in (("epochs", epochs), ("device", device), ("workers", workers)) if v is not None}
    if overrides:
        config = replace(config, **overrides)
    data = RunData(**saved["data"])
    return _run(run, config, data, progress, stop, state)


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from its ``asdict`` form (lists back to tuples, unknown keys ignored)."""
    known = {f.name for f in fields(TrainConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    return TrainConfig(**kwargs)


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse settings ``train`` cannot run with, naming the option (``UsageError``)."""
    if cfg.model not in MODELS or cfg.model == "demo":
        raise UsageError(f"--model {cfg.model}: choose from {', '.join(m for m in MODELS if m != 'demo')}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise UsageError(f"--optimizer {cfg.optimizer}: expected sgd or adamw")
    if cfg.lr_schedule not in ("cosine", "step", "constant"):
        raise UsageError(f"--lr-schedule {cfg.lr_schedule}: expected cosine, step or constant")
    if cfg.trainable_layers is not None and not 0 <= cfg.trainable_layers <= 5:
        raise UsageError(f"--trainable-layers {cfg.trainable_layers}: expected 0 to 5")
    if not 0.0 <= cfg.val_split < 1.0:
        raise UsageError(f"--val-split {cfg.val_split}: expected a fraction in [0, 1)")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.eval_every < 1:
        raise UsageError("--epochs, --batch-size and --eval-every must be at least 1")


def _run(run: Path, cfg: TrainConfig, data: RunData, progress: TrainProgress | None,
         stop: threading.Event | None, resume_state: dict | None) -> TrainSummary:
    """One run, from ``resume_state`` (a ``last.pt``) or from the start. Only rank 0 writes files,
    evaluates and reports."""
    check_train_config(cfg)
    dist = Distributed.from_env()
    progress = (progress or SilentTrainProgress()) if dist.rank == 0 else SilentTrainProgress()
    import torch

    started = time.monotonic()
    train_set, val_set = _datasets(data, cfg)
    categories = train_set.categories
    device = dist.device(cfg.device)
    torch.manual_seed(cfg.seed + dist.rank)
    if dist.rank == 0:
        prepare_run_dir(run, train_set, val_set, None if resume_state is None else int(resume_state["train"]["step"]))
    module, arch, arch_kwargs, source = _model(cfg, len(categories) + 1, resume_state)
    eval_size = cfg.min_size or int(module.transform.min_size[-1])
    module = module.to(device)
    model = dist.wrap(module, device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    steps_per_epoch = math.ceil(len(train_set.images) / (cfg.batch_size * dist.world))
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch, total))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = LoopState(0, steps_per_epoch, total)
    if resume_state is not None:
        _restore(resume_state, optimizer, scheduler, scaler, state, dist.rank)
        # The schedule is a function of the step: a changed --epochs takes effect from here on.
        scheduler.lr_lambdas[0] = lr_lambda(cfg, steps_per_epoch, total)
        log.info("resuming %s at step %d of %d (epoch %d)", run, state.step, total, state.step // steps_per_epoch + 1)
    log.info("training %s (%s) on %d images, %d instances, %d classes; %d epochs x %d steps of %d images on %s%s",
             arch, source, len(train_set.images), train_set.num_instances, len(categories),
             cfg.epochs, steps_per_epoch, cfg.batch_size * dist.world, device, ", mixed precision" if use_amp else "")
    dataset = CocoDetection(train_set, data.images, Augment(cfg.hflip, cfg.vflip, cfg.transpose,
                                                            cfg.color_jitter, cfg.copy_paste))
    checkpoints = CheckpointWriter(run, module, arch=arch, arch_kwargs=arch_kwargs, categories=categories,
                                   min_size=eval_size, config=cfg, data=asdict(data), world_size=dist.world)
    hooks: list[TrainHook] = [MetricsHook(run)] if dist.rank == 0 else []
    hooks += [ProgressHook(progress), StopHook(stop)]
    if val_set is not None:
        hooks.append(ValidationHook(module, val_set, data.val_images or data.images, device, eval_size, cfg, dist,
                                    checkpoints))
    hooks.append(CheckpointHook(checkpoints, optimizer, scheduler, scaler, dist, cfg.checkpoint_every))
    trainer = Trainer(model, module, dataset, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=device,
                      dist=dist, config=cfg, train_sizes=tuple(cfg.train_sizes) or (eval_size,), hooks=hooks)
    summary = TrainSummary(str(run), best=str(run / BEST), last=str(run / LAST), best_epoch=state.best_epoch)
    progress.start(total, state.step, cfg.batch_size * dist.world)
    try:
        trainer.train(state)
    finally:
        dist.close()
    summary.steps, summary.epochs = state.step, state.step // steps_per_epoch
    summary.best_epoch, summary.metrics, summary.interrupted = state.best_epoch, state.metrics, state.interrupted
    summary.seconds = round(time.monotonic() - started, 3)
    if dist.rank == 0 and not summary.interrupted:
        _finish(run, cfg, summary)
    return summary


def _restore(resume_state: dict, optimizer: Any, scheduler: Any, scaler: Any, state: LoopState, rank: int) -> None:
    optimizer.load_state_dict(resume_state["optimizer"])
    scheduler.load_state_dict(resume_state["scheduler"])
    if resume_state.get("scaler"):
        scaler.load_state_dict(resume_state["scaler"])
    saved = resume_state["train"]
    state.step, state.best_ap, state.best_epoch = int(saved["step"]), float(saved["best_ap"]), saved["best_epoch"]
    restore_rng(resume_state.get("rng", {}), rank)


def read_dataset(path: str) -> CocoSet:
    """A COCO instances JSON, or a YOLO-seg dataset's data.yaml (its train split)."""
    return read_yolo(path) if is_yolo_yaml(path) else read_coco(path)


def _datasets(data: RunData, cfg: TrainConfig) -> tuple[CocoSet, CocoSet | None]:
    train_set = read_dataset(data.coco)
    val_set = None
    if data.val_coco:
        val_set = read_dataset(data.val_coco)
        if [c.id for c in val_set.categories] != [c.id for c in train_set.categories]:
            raise UsageError(f"{data.val_coco}: categories {[c.id for c in val_set.categories]} differ "
                             f"from {data.coco}'s {[c.id for c in train_set.categories]}")
    elif cfg.val_split:
        train_set, val_set = train_set.split(cfg.val_split)
    if not train_set.images:
        raise UsageError(f"{data.coco}: no images to train on")
    return train_set, val_set


def prepare_run_dir(run: Path, train_set: CocoSet, val_set: CocoSet | None, resume_step: int | None) -> None:
    """Make the run folder: a fresh run clears an old run's files and writes the split used
    (``train.json``/``val.json``); a resumed one drops the metrics after ``resume_step``."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for name in (METRICS_FILE, LAST, BEST, BEST_INT8, PLOT_FILE):
                (run / name).unlink(missing_ok=True)
            atomic_write_bytes(run / "train.json", json.dumps(train_set.data).encode())
            if val_set is not None:
                atomic_write_bytes(run / "val.json", json.dumps(val_set.data).encode())
        else:
            trim_metrics(run, resume_step)
    except OSError as exc:
        raise OutputError(f"{run}: cannot write the run folder ({exc.strerror or exc})") from None


def _model(cfg: TrainConfig, num_classes: int, resume_state: dict | None) -> tuple[Any, str, dict, str]:
    size_kwargs = {k: v for k, v in (("min_size", cfg.min_size), ("max_size", cfg.max_size)) if v}
    if resume_state is not None:
        arch = resume_state["arch"]
        kwargs = dict(arch["kwargs"])
        module = MODELS[arch["name"]].build(num_classes, **kwargs, min_size=resume_state["min_size"],
                                            max_size=resume_state["max_size"])
        module.load_state_dict(resume_state["state_dict"])
        return module, arch["name"], kwargs, "resumed"
    module, arch, kwargs, source = build_for_training(cfg.model, cfg.weights, num_classes, dict(cfg.arch_kwargs),
                                                      size_kwargs)
    set_trainable(module, cfg.trainable_layers if cfg.trainable_layers is not None else
                  (5 if cfg.weights is None else 3), freeze_backbone=cfg.freeze_backbone)
    return module, arch, kwargs, source


def _finish(run: Path, cfg: TrainConfig, summary: TrainSummary) -> None:
    if summary.best_epoch is None:
        # No validation: the last model is the one to use; best.pt is a lean copy of it.
        write_lean_copy(run / LAST, run / BEST)
    if cfg.export_int8:
        export_int8(run / BEST, run / BEST_INT8)
    try:
        plot_metrics(run)
    except Exception as exc:
        log.warning("could not draw %s: %s", run / PLOT_FILE, exc)
