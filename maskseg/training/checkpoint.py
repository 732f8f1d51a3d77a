"""A run's checkpoints: ``best.pt`` and ``last.pt`` as ``maskseg predict --weights`` reads them, plus what
``resume`` needs (config, data, step, best AP; in ``last.pt`` optimizer, scheduler, scaler and RNG)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_with
from ..config import TrainConfig
from ..detections import Category
from ..errors import OutputError
from ..models import save_checkpoint

LAST, BEST, BEST_INT8 = "last.pt", "best.pt", "best-int8.pt"


class CheckpointWriter:
    """Writes one run's checkpoints of ``module`` (``data``: the run's data paths, in ``asdict`` form)."""

    def __init__(self, run_dir: Path, module: Any, *, arch: str, arch_kwargs: dict, categories: list[Category],
                 min_size: int, config: TrainConfig, data: dict, world_size: int) -> None:
        self.run_dir, self.module, self.arch, self.arch_kwargs = run_dir, module, arch, arch_kwargs
        self.categories, self.min_size, self.config, self.data = categories, min_size, config, data
        self.world_size = world_size

    def save(self, path: Path, step: int, best_ap: float, best_epoch: int | None, metrics: dict | None = None,
             extra: dict | None = None) -> None:
        """Write the model at ``path`` with the run's settings and progress (and ``metrics``, ``extra``)."""
        payload = self._train_extra(step, best_ap, best_epoch)
        if metrics:
            payload["metrics"] = metrics
        try:
            save_checkpoint(path, self.module, arch=self.arch, arch_kwargs=self.arch_kwargs,
                            categories=self.categories, min_size=self.min_size,
                            max_size=int(self.module.transform.max_size), extra={**payload, **(extra or {})})
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})") from None

    def save_last(self, optimizer: Any, scheduler: Any, scaler: Any, step: int, best_ap: float,
                  best_epoch: int | None) -> None:
        """Write ``last.pt``: the model and everything ``resume`` restores."""
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng": rng_state()}
        self.save(self.run_dir / LAST, step, best_ap, best_epoch, extra=state)

    def _train_extra(self, step: int, best_ap: float, best_epoch: int | None) -> dict:
        return {
            "thresholds": {"score": self.config.score_thresh, "mask": self.config.mask_thresh},
            "train": {"config": asdict(self.config), "data": self.data, "step": step,
                      "best_ap": best_ap, "best_epoch": best_epoch, "world_size": self.world_size},
        }


def write_lean_copy(src: Path, dst: Path) -> None:
    """Copy checkpoint ``src`` to ``dst`` without its optimizer, scheduler, scaler and RNG state."""
    import torch

    from ..models import read_weights_file

    state = dict(read_weights_file(src))
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        state.pop(key, None)
    atomic_write_with(dst, lambda fh: torch.save(state, fh))


def rng_state() -> dict:
    """torch's (and CUDA's) random generator states, for ``last.pt``."""
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, rank: int) -> None:
    """Put back what ``rng_state`` saved (torch's on rank 0 only; CUDA's when the device count matches)."""
    import torch

    if "torch" in state and rank == 0:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
