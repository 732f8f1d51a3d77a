"""Fine-tuning loop and checkpoints: torchvision's Mask R-CNN losses, schedule, validation, resume.

The loop is torchvision's reference one (``references/detection/engine.py``): ``loss_dict =
model(images, targets)``, summed, backward, step, with warm-up, gradient clipping, AMP on CUDA and
DistributedDataParallel under ``torchrun``. Around it: deterministic batch order per (seed, epoch), so
``resume`` restarts mid-epoch where the last checkpoint left off; a metrics file; best/last checkpoints
that ``maskseg predict --weights`` uses unaided. No argument parsing here (cli_train.py does that).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

from .atomic import atomic_write_bytes, atomic_write_with
from .config import TrainConfig
from .errors import MasksegError, OutputError, UsageError, WeightsError
from .models import CHECKPOINT_FORMAT, MODELS, save_checkpoint
from .train_data import Augment, CocoDetection, CocoSet, collate, read_coco

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
LAST, BEST, BEST_INT8 = "last.pt", "best.pt", "best-int8.pt"
_RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


class TrainProgress(Protocol):
    """Receives a run's progress; the CLI draws it. ``step``/``epoch`` get the metrics records."""

    def start(self, total_steps: int, start_step: int, images_per_step: int) -> None: ...

    def step(self, record: dict) -> None: ...

    def epoch(self, record: dict) -> None: ...


class _Silent:
    def start(self, total_steps: int, start_step: int, images_per_step: int) -> None:
        pass

    def step(self, record: dict) -> None:
        pass

    def epoch(self, record: dict) -> None:
        pass


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
class _Data:
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
    data = _Data(str(coco), str(images), str(val_coco) if val_coco else None, str(val_images) if val_images else None)
    return _Trainer(run, config, data, progress, stop).run(None)


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
    from .models import read_weights_file

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
    data = _Data(**saved["data"])
    return _Trainer(run, config, data, progress, stop).run(state)


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from its ``asdict`` form (lists back to tuples, unknown keys ignored)."""
    known = {f.name for f in fields(TrainConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    return TrainConfig(**kwargs)


class _Trainer:
    """One run's state; ``run`` is the loop. Only rank 0 writes files, evaluates and reports."""

    def __init__(self, run: Path, config: TrainConfig, data: _Data, progress: TrainProgress | None,
                 stop: threading.Event | None) -> None:
        _check_config(config)
        self.run_dir, self.config, self.data, self.stop = run, config, data, stop
        self.dist = _Distributed.from_env()
        self.progress = (progress or _Silent()) if self.dist.rank == 0 else _Silent()

    def run(self, resume_state: dict | None) -> TrainSummary:
        import torch

        started = time.monotonic()
        cfg = self.config
        train_set, val_set = self._datasets()
        self.categories = train_set.categories
        device = self.dist.device(cfg.device)
        torch.manual_seed(cfg.seed + self.dist.rank)
        if self.dist.rank == 0:
            self._prepare_run_dir(train_set, val_set, resume_state)
        self.module, self.arch, self.arch_kwargs, source = self._model(resume_state)
        self.eval_size = cfg.min_size or int(self.module.transform.min_size[-1])
        self.module.to(device)
        model = self.dist.wrap(self.module, device)
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = _optimizer(params, cfg)
        steps_per_epoch = math.ceil(len(train_set.images) / (cfg.batch_size * self.dist.world))
        total = steps_per_epoch * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch, total))
        use_amp = cfg.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        step, best_ap, best_epoch = 0, -1.0, None
        if resume_state is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            if resume_state.get("scaler"):
                scaler.load_state_dict(resume_state["scaler"])
            saved = resume_state["train"]
            step, best_ap, best_epoch = int(saved["step"]), float(saved["best_ap"]), saved["best_epoch"]
            _set_rng(resume_state.get("rng", {}), self.dist.rank)
            # The schedule is a function of the step: a changed --epochs takes effect from here on.
            scheduler.lr_lambdas[0] = _lr_lambda(cfg, steps_per_epoch, total)
            log.info("resuming %s at step %d of %d (epoch %d)", self.run_dir, step, total,
                     step // steps_per_epoch + 1)
        log.info("training %s (%s) on %d images, %d instances, %d classes; %d epochs x %d steps of %d images on %s%s",
                 self.arch, source, len(train_set.images), train_set.num_instances, len(self.categories),
                 cfg.epochs, steps_per_epoch, cfg.batch_size * self.dist.world, device,
                 ", mixed precision" if use_amp else "")
        dataset = CocoDetection(train_set, self.data.images, Augment(cfg.hflip, cfg.vflip, cfg.transpose,
                                                                     cfg.color_jitter, cfg.copy_paste))
        summary = TrainSummary(str(self.run_dir), best=str(self.run_dir / BEST), last=str(self.run_dir / LAST))
        self.progress.start(total, step, cfg.batch_size * self.dist.world)
        try:
            step = self._loop(model, dataset, val_set, optimizer, scheduler, scaler, device, step, steps_per_epoch,
                              total, best_ap, best_epoch, summary)
        finally:
            self.dist.close()
        summary.steps, summary.epochs = step, step // steps_per_epoch
        summary.seconds = round(time.monotonic() - started, 3)
        if self.dist.rank == 0 and not summary.interrupted:
            self._finish(summary)
        return summary

    def _loop(self, model: Any, dataset: CocoDetection, val_set: CocoSet | None, optimizer: Any, scheduler: Any,
              scaler: Any, device: Any, step: int, steps_per_epoch: int, total: int, best_ap: float,
              best_epoch: int | None, summary: TrainSummary) -> int:
        import torch

        cfg = self.config
        sizes = tuple(cfg.train_sizes) or (self.eval_size,)
        use_amp = scaler.is_enabled()
        params = [p for p in self.module.parameters() if p.requires_grad]
        summary.best_epoch = best_epoch
        while step < total:
            epoch = step // steps_per_epoch
            batches = self._batches(len(dataset), epoch)[step - epoch * steps_per_epoch:]
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.workers,
                persistent_workers=False, pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 31 + self.dist.rank))
            model.train()
            self.module.transform.min_size = sizes
            t_last = time.monotonic()
            for images, targets in loader:
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in t.items()}
                           for t in targets]
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    losses = model(images, targets)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise MasksegError(f"training diverged at step {step + 1}: loss is {float(loss)} "
                                       f"({', '.join(f'{k} {float(v):.3g}' for k, v in losses.items())}); "
                                       f"lower --lr or raise --warmup-iters")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                now = time.monotonic()
                values = self.dist.mean({k: float(v.detach()) for k, v in losses.items()}, device)
                record = {"kind": "step", "step": step, "epoch": epoch + 1, "loss": round(sum(values.values()), 5),
                          **{k: round(v, 5) for k, v in values.items()}, "lr": lr,
                          "images_per_s": round(len(images) * self.dist.world / max(now - t_last, 1e-9), 3)}
                t_last = now
                self._append_metrics(record)
                self.progress.step(record)
                stopping = self.stop is not None and self.stop.is_set()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not stopping:
                    self._save_last(optimizer, scheduler, scaler, step, best_ap, summary.best_epoch)
                if stopping:
                    self._save_last(optimizer, scheduler, scaler, step, best_ap, summary.best_epoch)
                    summary.interrupted = True
                    log.warning("stopped at step %d; %s written, resume with --resume %s", step,
                                self.run_dir / LAST, self.run_dir)
                    return step
            record = {"kind": "epoch", "step": step, "epoch": epoch + 1, **self._epoch_losses(epoch + 1)}
            if val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or step >= total):
                if self.dist.rank == 0:
                    metrics = evaluate_module(self.module, val_set, self.data.val_images or self.data.images,
                                              device, self.eval_size, score_thresh=cfg.eval_score_thresh,
                                              mask_thresh=cfg.mask_thresh)
                    record.update(metrics)
                    if metrics["segm_AP"] > best_ap:
                        best_ap, summary.best_epoch = metrics["segm_AP"], epoch + 1
                        self._save(self.run_dir / BEST, step, best_ap, summary.best_epoch, metrics)
                self.dist.barrier()
            self._append_metrics(record)
            self.progress.epoch(record)
            summary.metrics = record
            self._save_last(optimizer, scheduler, scaler, step, best_ap, summary.best_epoch)
        return step

    def _batches(self, n: int, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``: a permutation fixed by (seed, epoch), padded by wrapping so
        every rank gets whole batches (as DistributedSampler pads), ranks taking interleaved slices."""
        import torch

        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        per_step = self.config.batch_size * self.dist.world
        steps = math.ceil(n / per_step)
        order = (order * math.ceil(steps * per_step / n))[: steps * per_step]
        return [order[s * per_step:(s + 1) * per_step][self.dist.rank::self.dist.world] for s in range(steps)]

    def _datasets(self) -> tuple[CocoSet, CocoSet | None]:
        train_set = read_coco(self.data.coco)
        val_set = None
        if self.data.val_coco:
            val_set = read_coco(self.data.val_coco)
            if [c.id for c in val_set.categories] != [c.id for c in train_set.categories]:
                raise UsageError(f"{self.data.val_coco}: categories {[c.id for c in val_set.categories]} differ "
                                 f"from {self.data.coco}'s {[c.id for c in train_set.categories]}")
        elif self.config.val_split:
            train_set, val_set = train_set.split(self.config.val_split)
        if not train_set.images:
            raise UsageError(f"{self.data.coco}: no images to train on")
        return train_set, val_set

    def _prepare_run_dir(self, train_set: CocoSet, val_set: CocoSet | None, resume_state: dict | None) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_state is None:
                for name in (METRICS_FILE, LAST, BEST, BEST_INT8, PLOT_FILE):
                    (self.run_dir / name).unlink(missing_ok=True)
                atomic_write_bytes(self.run_dir / "train.json", json.dumps(train_set.data).encode())
                if val_set is not None:
                    atomic_write_bytes(self.run_dir / "val.json", json.dumps(val_set.data).encode())
            else:
                self._trim_metrics(int(resume_state["train"]["step"]))
        except OSError as exc:
            raise OutputError(f"{self.run_dir}: cannot write the run folder ({exc.strerror or exc})") from None

    def _model(self, resume_state: dict | None) -> tuple[Any, str, dict, str]:
        cfg = self.config
        size_kwargs = {k: v for k, v in (("min_size", cfg.min_size), ("max_size", cfg.max_size)) if v}
        if resume_state is not None:
            arch = resume_state["arch"]
            kwargs = dict(arch["kwargs"])
            module = MODELS[arch["name"]].build(len(self.categories) + 1, **kwargs, min_size=resume_state["min_size"],
                                                max_size=resume_state["max_size"])
            module.load_state_dict(resume_state["state_dict"])
            return module, arch["name"], kwargs, "resumed"
        module, arch, kwargs, source = build_for_training(cfg.model, cfg.weights, len(self.categories) + 1,
                                                          dict(cfg.arch_kwargs), size_kwargs)
        set_trainable(module, cfg.trainable_layers if cfg.trainable_layers is not None else
                      (5 if cfg.weights is None else 3), freeze_backbone=cfg.freeze_backbone)
        return module, arch, kwargs, source

    def _checkpoint_extra(self, step: int, best_ap: float, best_epoch: int | None) -> dict:
        return {
            "thresholds": {"score": self.config.score_thresh, "mask": self.config.mask_thresh},
            "train": {"config": asdict(self.config), "data": asdict(self.data), "step": step,
                      "best_ap": best_ap, "best_epoch": best_epoch, "world_size": self.dist.world},
        }

    def _save(self, path: Path, step: int, best_ap: float, best_epoch: int | None, metrics: dict | None = None,
              extra: dict | None = None) -> None:
        payload = self._checkpoint_extra(step, best_ap, best_epoch)
        if metrics:
            payload["metrics"] = metrics
        try:
            save_checkpoint(path, self.module, arch=self.arch, arch_kwargs=self.arch_kwargs,
                            categories=self.categories, min_size=self.eval_size,
                            max_size=int(self.module.transform.max_size), extra={**payload, **(extra or {})})
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})") from None

    def _save_last(self, optimizer: Any, scheduler: Any, scaler: Any, step: int, best_ap: float,
                   best_epoch: int | None) -> None:
        if self.dist.rank == 0:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng": _get_rng()}
            self._save(self.run_dir / LAST, step, best_ap, best_epoch, extra=state)
        self.dist.barrier()

    def _append_metrics(self, record: dict) -> None:
        if self.dist.rank != 0:
            return
        try:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise OutputError(f"{self.run_dir / METRICS_FILE}: cannot append ({exc.strerror or exc})") from None

    def _trim_metrics(self, step: int) -> None:
        """Drop records after the step being resumed from (they are about to be redone)."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())

    def _epoch_losses(self, epoch: int) -> dict:
        if self.dist.rank != 0:
            return {}
        records = [r for r in read_metrics(self.run_dir) if r.get("kind") == "step" and r.get("epoch") == epoch]
        return {"loss": round(sum(r["loss"] for r in records) / len(records), 5)} if records else {}

    def _finish(self, summary: TrainSummary) -> None:
        if summary.best_epoch is None:
            # No validation: the last model is the one to use; best.pt is a lean copy of it.
            state = self._lean(self.run_dir / LAST)
            atomic_write_with(self.run_dir / BEST, lambda fh: _torch_save(state, fh))
        if self.config.export_int8:
            export_int8(self.run_dir / BEST, self.run_dir / BEST_INT8)
        try:
            plot_metrics(self.run_dir)
        except Exception as exc:
            log.warning("could not draw %s: %s", self.run_dir / PLOT_FILE, exc)

    @staticmethod
    def _lean(path: Path) -> dict:
        from .models import read_weights_file

        state = dict(read_weights_file(path))
        for key in ("optimizer", "scheduler", "scaler", "rng"):
            state.pop(key, None)
        return state


def _torch_save(obj: Any, fh: Any) -> None:
    import torch

    torch.save(obj, fh)


def _check_config(cfg: TrainConfig) -> None:
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


def build_for_training(name: str, weights: str | None, num_classes: int, arch_kwargs: dict,
                       size_kwargs: dict) -> tuple[Any, str, dict, str]:
    """(module, arch name, arch kwargs, weights source) ready to train with ``num_classes`` (background
    included). ``weights``: None (from scratch), ``"torchvision"`` (the model's COCO weights) or a file.
    Predictors are replaced when the weights' class count differs; torchvision's ResNet-50 models get
    FrozenBatchNorm2d when starting from weights (batch statistics of 2 images would ruin them)."""
    from .models import default_weights_file, num_classes_in, read_weights_file, state_dict_of

    if weights is None:
        module = MODELS[name].build(num_classes, **arch_kwargs, **size_kwargs)
        return module, name, arch_kwargs, "from scratch"
    if weights == "torchvision":
        spec = MODELS[name]
        if spec.default_weights is None:
            raise WeightsError(f"model {name} has no published weights; train it from scratch or pass a file")
        state, source = default_weights_file(spec)
    else:
        obj = read_weights_file(weights)
        state, source = state_dict_of(obj, weights), weights
        if obj.get("format") == CHECKPOINT_FORMAT:
            name = obj["arch"]["name"]
            arch_kwargs = dict(obj["arch"]["kwargs"])
            for key in ("min_size", "max_size"):
                if obj.get(key) and key not in size_kwargs:
                    size_kwargs = {**size_kwargs, key: obj[key]}
    have = num_classes_in(state, source)
    module = MODELS[name].build(have, **arch_kwargs, **size_kwargs)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: the weights do not fit {name} ({str(exc).splitlines()[0][:200]})") from None
    if have != num_classes:
        replace_predictors(module, num_classes)
        log.info("%s: box and mask predictors replaced (%d classes -> %d)", source, have, num_classes)
    if name.startswith("maskrcnn_resnet50"):
        freeze_batch_norm(module)
    return module, name, arch_kwargs, source


def replace_predictors(module: Any, num_classes: int) -> None:
    """New box and mask predictors for ``num_classes`` (background included), as torchvision's
    fine-tuning tutorial does; their widths are read from the heads they sit on."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    heads = module.roi_heads
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    conv = heads.mask_predictor.conv5_mask
    heads.mask_predictor = MaskRCNNPredictor(conv.in_channels, conv.out_channels, num_classes)


def freeze_batch_norm(module: Any) -> None:
    """Swap every BatchNorm2d for a FrozenBatchNorm2d holding the same statistics and affine terms."""
    import torch.nn as nn
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)


def set_trainable(module: Any, layers: int, *, freeze_backbone: bool = False) -> None:
    """Train the top ``layers`` ResNet stages (layer4 first ... conv1 last) and freeze the others, as
    torchvision's ``trainable_backbone_layers``; ``freeze_backbone`` also freezes the FPN."""
    body = module.backbone.body
    trainable = set(_RESNET_STAGES[:0 if freeze_backbone else layers])
    for name, param in body.named_parameters():
        stage = "conv1" if name.startswith(("conv1", "bn1")) else name.split(".")[0]
        param.requires_grad_(stage in trainable)
    for param in module.backbone.fpn.parameters():
        param.requires_grad_(not freeze_backbone)


def _optimizer(params: list, cfg: TrainConfig) -> Any:
    import torch

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int, total: int) -> Any:
    """lr multiplier of the step: linear warm-up from ``warmup_factor``, then step or cosine decay."""
    warmup = min(cfg.warmup_iters, max(total - 1, 0))
    milestones = [e * steps_per_epoch for e in (cfg.lr_steps or (round(cfg.epochs * 2 / 3), round(cfg.epochs * 8 / 9)))]
    schedule, gamma, factor = cfg.lr_schedule, cfg.lr_gamma, cfg.warmup_factor
    return _LrLambda(warmup, factor, schedule, tuple(milestones), gamma, total)


@dataclass(frozen=True)
class _LrLambda:
    warmup: int
    factor: float
    schedule: str
    milestones: tuple[int, ...]
    gamma: float
    total: int

    def __call__(self, step: int) -> float:
        warm = 1.0
        if step < self.warmup:
            alpha = step / self.warmup
            warm = self.factor * (1 - alpha) + alpha
        if self.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, self.total) / max(self.total, 1)))
        if self.schedule == "step":
            return warm * self.gamma ** sum(step >= m for m in self.milestones)
        return warm


def _get_rng() -> dict:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict, rank: int) -> None:
    import torch

    if "torch" in state and rank == 0:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Distributed:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) or a single process."""

    def __init__(self, world: int, rank: int, local_rank: int) -> None:
        self.world, self.rank, self.local_rank = world, rank, local_rank

    @classmethod
    def from_env(cls) -> _Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(1, 0, 0)
        return cls(world, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, spec: str) -> Any:
        import torch
        import torch.distributed as dist

        from .models import resolve_device

        device = resolve_device(spec)
        if self.world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def wrap(self, module: Any, device: Any) -> Any:
        if self.world <= 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def mean(self, values: dict[str, float], device: Any) -> dict[str, float]:
        if self.world <= 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist(), strict=True))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def evaluate_module(module: Any, coco: CocoSet, image_dir: str | Path, device: Any, min_size: int, *,
                    score_thresh: float = 0.05, mask_thresh: float = 0.5) -> dict[str, float]:
    """COCO bbox and segm AP/AP50/AP75 (pycocotools COCOeval) of ``module`` on ``coco``'s images.

    Runs torchvision's own forward and postprocess (full-image masks, as its reference evaluation does)
    at short side ``min_size``; the module is left in train mode with its thresholds restored.
    """
    import numpy as np
    import torch
    from pycocotools import mask as mask_utils

    label_to_id = {c.label: c.id for c in coco.categories}
    dataset = CocoDetection(coco, image_dir)
    heads, transform = module.roi_heads, module.transform
    saved = (heads.score_thresh, heads.detections_per_img, transform.min_size)
    heads.score_thresh, heads.detections_per_img, transform.min_size = score_thresh, 100, (min_size,)
    results: list[dict] = []
    module.eval()
    try:
        with torch.inference_mode():
            for index in range(len(dataset)):
                image, _ = dataset.load(index)
                out = module([image.to(device).float().div_(255.0)])[0]
                masks = (out["masks"][:, 0] > mask_thresh).cpu().numpy().astype(np.uint8)
                rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
                for k, (box, score, label) in enumerate(zip(out["boxes"].tolist(), out["scores"].tolist(),
                                                            out["labels"].tolist(), strict=True)):
                    rle = rles[k]
                    rle["counts"] = rle["counts"].decode("ascii")
                    results.append({"image_id": coco.images[index].id, "category_id": label_to_id[int(label)],
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    "score": float(score), "segmentation": rle})
    finally:
        heads.score_thresh, heads.detections_per_img, transform.min_size = saved
        module.train()
    return coco_ap(coco.data, results)


def coco_ap(gt: dict, results: list[dict]) -> dict[str, float]:
    """pycocotools COCOeval on a ground-truth dict and a results list -> {bbox,segm}_{AP,AP50,AP75}
    (0.0 when there are no detections). COCOeval's printed tables are kept off stdout.

    Annotation ids are renumbered from 1 (COCOeval marks matches by id, so an id 0 would count its
    match as a false positive), and a missing ``area``/``bbox`` is computed from the mask."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = {**gt, "annotations": [{**a, "id": k} for k, a in enumerate(gt["annotations"], start=1)]}
        ground.createIndex()
        for ann in ground.dataset["annotations"]:
            if "area" not in ann or "bbox" not in ann:
                rle = ground.annToRLE(ann)
                ann.setdefault("area", float(mask_utils.area(rle)))
                ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
        for iou_type in ("bbox", "segm"):
            if not results:
                out.update({f"{iou_type}_AP": 0.0, f"{iou_type}_AP50": 0.0, f"{iou_type}_AP75": 0.0})
                continue
            dets = ground.loadRes([dict(r) for r in results])
            ev = COCOeval(ground, dets, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats = [max(float(s), 0.0) for s in ev.stats[:3]]
            out.update({f"{iou_type}_AP": round(stats[0], 5), f"{iou_type}_AP50": round(stats[1], 5),
                        f"{iou_type}_AP75": round(stats[2], 5)})
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` in order (step and epoch records)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def plot_metrics(run_dir: str | Path) -> Path:
    """Draw ``RUN/training.png``: training loss per step (and its moving average), validation AP per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch" and "segm_AP" in r]
    fig, axes = plt.subplots(1, 2 if epochs else 1, figsize=(11 if epochs else 6, 4), squeeze=False)
    ax = axes[0][0]
    xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
    ax.plot(xs, ys, lw=0.6, alpha=0.4, label="loss")
    window = max(1, len(ys) // 30)
    if len(ys) > window > 1:
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, lw=1.5, label=f"moving average ({window} steps)")
    ax.set(xlabel="step", ylabel="training loss", title="loss", yscale="log")
    ax.legend()
    if epochs:
        ax = axes[0][1]
        for key in ("bbox_AP", "segm_AP", "segm_AP50"):
            ax.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], marker="o", ms=3, label=key)
        ax.set(xlabel="epoch", ylabel="COCO AP (validation)", title="validation", ylim=(0, 1))
        ax.legend()
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    atomic_write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
    return path


def export_int8(src: str | Path, dst: str | Path) -> Path:
    """Write a compact copy of checkpoint ``src``: every weight with 2+ dims as int8 with one float32
    scale per output channel (symmetric), the rest float16. ``maskseg.models`` dequantizes it on load;
    it stays a plain-tensor file that ``torch.load(weights_only=True)`` accepts."""
    import torch

    from .models import read_weights_file

    state = dict(read_weights_file(src))
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        state.pop(key, None)
    q, scales, rest = {}, {}, {}
    for name, t in state.pop("state_dict").items():
        t = t.float()
        if t.ndim >= 2 and t.is_floating_point():
            scale = t.abs().flatten(1).amax(1).clamp(min=1e-12) / 127.0
            q[name] = torch.round(t / scale.view(-1, *[1] * (t.ndim - 1))).clamp(-127, 127).to(torch.int8)
            scales[name] = scale
        else:
            rest[name] = t.half() if t.is_floating_point() else t
    state.update({"state_dict": rest, "int8": q, "int8_scales": scales})
    atomic_write_with(Path(dst), lambda fh: torch.save(state, fh))
    return Path(dst)
