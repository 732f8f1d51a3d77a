"""The loop: torchvision's reference one (``references/detection/engine.py``) in detectron2's shape.

``run_step`` is one batch: ``loss_dict = model(images, targets)``, summed, backward, step, with gradient
clipping and AMP on CUDA. ``train`` runs the steps left, in a batch order fixed per (seed, epoch), so a
resumed run restarts mid-epoch where its last checkpoint left off; what happens after a step or an
epoch (metrics file, progress, checkpoints, validation) is the hooks' job, called in list order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import TrainConfig
from ..errors import MasksegError
from .data import CocoDetection, collate
from .distributed import Distributed


@dataclass
class LoopState:
    """Where a run stands: ``step`` steps done of ``total``; ``epoch`` the 0-based epoch under way; the best
    validation segm AP so far and its (1-based) epoch; ``metrics`` the last epoch record."""

    step: int
    steps_per_epoch: int
    total: int
    epoch: int = 0
    best_ap: float = -1.0
    best_epoch: int | None = None
    interrupted: bool = False
    metrics: dict = field(default_factory=dict)


class TrainHook:
    """A duty around the loop (as detectron2's ``HookBase``); every method does nothing unless overridden."""

    def after_step(self, state: LoopState, record: dict) -> None:
        """Called after each step with its metrics record; may set ``state.interrupted``."""

    def epoch_values(self, state: LoopState) -> dict:
        """Values this hook adds to the record of the epoch that just ended."""
        return {}

    def after_epoch(self, state: LoopState, record: dict) -> None:
        """Called after each epoch with its complete record."""


class Trainer:
    """Runs the steps of one rank: ``model`` (``module``, perhaps wrapped for DDP) on ``dataset``."""

    def __init__(self, model: Any, module: Any, dataset: CocoDetection, *, optimizer: Any, scheduler: Any,
                 scaler: Any, device: Any, dist: Distributed, config: TrainConfig, train_sizes: tuple[int, ...],
                 hooks: list[TrainHook]) -> None:
        self.model, self.module, self.dataset = model, module, dataset
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.device, self.dist, self.config, self.train_sizes, self.hooks = device, dist, config, train_sizes, hooks
        self.params = [p for p in module.parameters() if p.requires_grad]

    def train(self, state: LoopState) -> LoopState:
        """Run from ``state.step`` to ``state.total`` (or until a hook sets ``state.interrupted``)."""
        while state.step < state.total:
            state.epoch = state.step // state.steps_per_epoch
            loader = self.loader(state)
            self.model.train()
            self.module.transform.min_size = self.train_sizes
            t_last = time.monotonic()
            for images, targets in loader:
                losses, lr = self.run_step(images, targets, state.step)
                state.step += 1
                now = time.monotonic()
                values = self.dist.mean({k: float(v.detach()) for k, v in losses.items()}, self.device)
                record = {"kind": "step", "step": state.step, "epoch": state.epoch + 1,
                          "loss": round(sum(values.values()), 5), **{k: round(v, 5) for k, v in values.items()},
                          "lr": lr, "images_per_s": round(len(images) * self.dist.world / max(now - t_last, 1e-9), 3)}
                t_last = now
                for hook in self.hooks:
                    hook.after_step(state, record)
                if state.interrupted:
                    return state
            record = {"kind": "epoch", "step": state.step, "epoch": state.epoch + 1}
            for hook in self.hooks:
                record.update(hook.epoch_values(state))
            state.metrics = record
            for hook in self.hooks:
                hook.after_epoch(state, record)
        return state

    def run_step(self, images: list[Any], targets: list[dict], step: int) -> tuple[dict[str, Any], float]:
        """One batch (``step`` steps done before it): forward, losses, backward, optimizer and schedule step.
        Returns the loss dict and the lr the step used."""
        import torch

        cfg, device = self.config, self.device
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in t.items()}
                   for t in targets]
        with torch.autocast(device.type, dtype=torch.float16, enabled=self.scaler.is_enabled()):
            losses = self.model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise MasksegError(f"training diverged at step {step + 1}: loss is {float(loss)} "
                               f"({', '.join(f'{k} {float(v):.3g}' for k, v in losses.items())}); "
                               f"lower --lr or raise --warmup-iters")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return losses, lr

    def loader(self, state: LoopState) -> Any:
        """A DataLoader over the batches of ``state.epoch`` not yet done."""
        import torch

        cfg = self.config
        batches = self.batches(len(self.dataset), state.epoch)[state.step - state.epoch * state.steps_per_epoch:]
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.workers,
            persistent_workers=False, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step * 31 + self.dist.rank))

    def batches(self, n: int, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``: a permutation fixed by (seed, epoch), padded by wrapping so
        every rank gets whole batches (as DistributedSampler pads), ranks taking interleaved slices."""
        import torch

        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        per_step = self.config.batch_size * self.dist.world
        steps = math.ceil(n / per_step)
        order = (order * math.ceil(steps * per_step / n))[: steps * per_step]
        return [order[s * per_step:(s + 1) * per_step][self.dist.rank::self.dist.world] for s in range(steps)]
