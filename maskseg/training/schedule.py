"""The optimizer and the learning-rate schedule: linear warm-up, then step or cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import TrainConfig


def make_optimizer(params: list, cfg: TrainConfig) -> Any:
    """SGD with momentum or AdamW over ``params`` with the config's lr and weight decay."""
    import torch

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int, total: int) -> Any:
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
