"""What a run does after each step and epoch: metrics file, progress, stop, validation, checkpoints.

``run.py`` puts them in this order (it matters: the epoch's loss is read before validation adds its AP,
and a stop is seen before the checkpoint hook decides whether to write ``last.pt``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Protocol

from ..config import TrainConfig
from .checkpoint import BEST, LAST, CheckpointWriter
from .data import CocoSet
from .distributed import Distributed
from .metrics import append_metrics, epoch_loss
from .trainer import LoopState, TrainHook
from .validate import evaluate_module

log = logging.getLogger(__name__)


class TrainProgress(Protocol):
    """Receives a run's progress; the CLI draws it. ``step``/``epoch`` get the metrics records."""

    def start(self, total_steps: int, start_step: int, images_per_step: int) -> None: ...

    def step(self, record: dict) -> None: ...

    def epoch(self, record: dict) -> None: ...


class SilentTrainProgress:
    """A ``TrainProgress`` that shows nothing (no progress given, or a rank other than 0)."""

    def start(self, total_steps: int, start_step: int, images_per_step: int) -> None:
        pass

    def step(self, record: dict) -> None:
        pass

    def epoch(self, record: dict) -> None:
        pass


class MetricsHook(TrainHook):
    """Appends every step and epoch record to ``RUN/metrics.jsonl``; gives the epoch its mean loss (rank 0)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def after_step(self, state: LoopState, record: dict) -> None:
        append_metrics(self.run_dir, record)

    def epoch_values(self, state: LoopState) -> dict:
        return epoch_loss(self.run_dir, state.epoch + 1)

    def after_epoch(self, state: LoopState, record: dict) -> None:
        append_metrics(self.run_dir, record)


class ProgressHook(TrainHook):
    """Hands the records to a ``TrainProgress``."""

    def __init__(self, progress: TrainProgress) -> None:
        self.progress = progress

    def after_step(self, state: LoopState, record: dict) -> None:
        self.progress.step(record)

    def after_epoch(self, state: LoopState, record: dict) -> None:
        self.progress.epoch(record)


class StopHook(TrainHook):
    """Ends the run after the step in flight once ``stop`` is set."""

    def __init__(self, stop: threading.Event | None) -> None:
        self.stop = stop

    def after_step(self, state: LoopState, record: dict) -> None:
        if self.stop is not None and self.stop.is_set():
            state.interrupted = True


class ValidationHook(TrainHook):
    """COCO bbox and segm AP on ``val_set`` every ``eval_every`` epochs and at the end (rank 0); a better
    segm AP than before writes ``best.pt``."""

    def __init__(self, module: Any, val_set: CocoSet, image_dir: str, device: Any, eval_size: int,
                 config: TrainConfig, dist: Distributed, checkpoints: CheckpointWriter) -> None:
        self.module, self.val_set, self.image_dir, self.device = module, val_set, image_dir, device
        self.eval_size, self.config, self.dist, self.checkpoints = eval_size, config, dist, checkpoints

    def epoch_values(self, state: LoopState) -> dict:
        cfg = self.config
        if not ((state.epoch + 1) % cfg.eval_every == 0 or state.step >= state.total):
            return {}
        metrics: dict = {}
        if self.dist.rank == 0:
            metrics = evaluate_module(self.module, self.val_set, self.image_dir, self.device, self.eval_size,
                                      score_thresh=cfg.eval_score_thresh, mask_thresh=cfg.mask_thresh)
            if metrics["segm_AP"] > state.best_ap:
                state.best_ap, state.best_epoch = metrics["segm_AP"], state.epoch + 1
                self.checkpoints.save(self.checkpoints.run_dir / BEST, state.step, state.best_ap, state.best_epoch,
                                      metrics)
        self.dist.barrier()
        return metrics


class CheckpointHook(TrainHook):
    """Writes ``last.pt`` (rank 0) every ``every`` steps (0: never), after every epoch and when stopped."""

    def __init__(self, checkpoints: CheckpointWriter, optimizer: Any, scheduler: Any, scaler: Any,
                 dist: Distributed, every: int) -> None:
        self.checkpoints, self.optimizer, self.scheduler, self.scaler = checkpoints, optimizer, scheduler, scaler
        self.dist, self.every = dist, every

    def after_step(self, state: LoopState, record: dict) -> None:
        if state.interrupted or (self.every and state.step % self.every == 0):
            self._save_last(state)
        if state.interrupted:
            run_dir = self.checkpoints.run_dir
            log.warning("stopped at step %d; %s written, resume with --resume %s", state.step, run_dir / LAST,
                        run_dir)

    def after_epoch(self, state: LoopState, record: dict) -> None:
        self._save_last(state)

    def _save_last(self, state: LoopState) -> None:
        if self.dist.rank == 0:
            self.checkpoints.save_last(self.optimizer, self.scheduler, self.scaler, state.step, state.best_ap,
                                       state.best_epoch)
        self.dist.barrier()
