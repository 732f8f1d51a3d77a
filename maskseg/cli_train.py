"""`maskseg train`: options -> TrainConfig -> one call of maskseg.training.train (and the progress it draws)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import config as cfg

log = logging.getLogger("maskseg")

_T = cfg.TrainConfig()


def _ints(text: str | None, option: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None


def _arch_kwargs(text: str | None) -> dict:
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--arch-kwargs") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("expected a JSON object", param_hint="--arch-kwargs")
    return value


def train_command(
    coco: Annotated[Optional[Path], typer.Option(help="COCO instances JSON to train on.")] = None,  # noqa: UP045
    images: Annotated[Optional[Path], typer.Option(help="Folder the file_names of --coco are relative to.")  # noqa: UP045
                      ] = None,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Run folder: checkpoints, metrics, plot.")  # noqa: UP045
                   ] = None,
    resume: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Continue the run in this folder from its last.pt (model, optimizer, schedule, step, RNG) with "
             "its saved settings; --epochs, --device, --workers may be given to change them.")] = None,
    val_coco: Annotated[Optional[Path], typer.Option(help="COCO JSON to validate on (AP after each epoch).")  # noqa: UP045
                        ] = None,
    val_images: Annotated[Optional[Path], typer.Option(help="Images of --val-coco (default: --images).")  # noqa: UP045
                          ] = None,
    val_split: Annotated[float, typer.Option(min=0.0, max=0.95, help=(
        "Hold out this fraction of --coco's images for validation: the last ones in the file's order "
        "(deterministic). Written to RUN/train.json and RUN/val.json."))] = _T.val_split,
    model: Annotated[str, typer.Option(help="Architecture: maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2, small.")
                     ] = _T.model,
    arch_kwargs: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        'Builder arguments as JSON, e.g. \'{"trunk": "resnet34"}\' for small.'))] = None,
    weights: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        "Start from: a weights file (torchvision state dict or maskseg checkpoint), 'torchvision' (the "
        "model's COCO weights, downloaded once), or nothing (from scratch). Predictors are replaced when "
        "the class count differs."))] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help=f"Passes over the data [default: {_T.epochs}].")  # noqa: UP045
                      ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step (per GPU under torchrun).")] = _T.batch_size,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (momentum 0.9).")] = _T.optimizer,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = _T.lr,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="Weight decay.")] = _T.weight_decay,
    warmup_iters: Annotated[int, typer.Option(min=0, help="Linear lr warm-up, in steps.")] = _T.warmup_iters,
    lr_schedule: Annotated[str, typer.Option(help="cosine, step (x --lr-gamma at --lr-steps) or constant.")
                           ] = _T.lr_schedule,
    lr_steps: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        "Epochs at which the step schedule decays, comma-separated (default: 2/3 and 8/9 of --epochs)."))] = None,
    lr_gamma: Annotated[float, typer.Option(help="Step schedule factor.")] = _T.lr_gamma,
    clip_grad: Annotated[float, typer.Option(min=0.0, help="Clip the gradient norm to this (0: off).")
                         ] = _T.clip_grad or 0.0,
    hflip: Annotated[float, typer.Option(min=0.0, max=1.0, help="Horizontal flip probability.")] = _T.hflip,
    vflip: Annotated[float, typer.Option(min=0.0, max=1.0, help="Vertical flip probability.")] = _T.vflip,
    transpose: Annotated[float, typer.Option(min=0.0, max=1.0, help="Transpose (swap x, y) probability.")
                         ] = _T.transpose,
    color_jitter: Annotated[float, typer.Option(min=0.0, max=1.0, help="Brightness/contrast/saturation jitter.")
                            ] = _T.color_jitter,
    copy_paste: Annotated[float, typer.Option(min=0.0, max=1.0, help=(
        "Probability of pasting 1-6 instances of another training image onto an image."))] = _T.copy_paste,
    train_sizes: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        "Scale jitter: short sides picked at random per image, comma-separated (e.g. 320,384,448)."))] = None,
    min_size: Annotated[Optional[int], typer.Option(min=32, help=(  # noqa: UP045
        "Short side for validation and, saved in the checkpoint, for predict (default: the model's)."))] = None,
    max_size: Annotated[Optional[int], typer.Option(min=32, help="Cap on the long side (default: the model's).")  # noqa: UP045
                        ] = None,
    trainable_layers: Annotated[Optional[int], typer.Option(min=0, max=5, help=(  # noqa: UP045
        "ResNet stages to train, from the top (default: 5 from scratch, 3 from weights)."))] = None,
    freeze_backbone: Annotated[bool, typer.Option(help="Freeze the whole backbone (trunk and FPN).")
                               ] = _T.freeze_backbone,
    seed: Annotated[int, typer.Option(help="Seed of the batch order, augmentations and initial weights.")] = _T.seed,
    device: Annotated[Optional[str], typer.Option(help="auto (GPU if present), cpu, cuda or cuda:N.")  # noqa: UP045
                      ] = None,
    amp: Annotated[bool, typer.Option(help="Mixed precision (float16 autocast) on CUDA.")] = _T.amp,
    workers: Annotated[Optional[int], typer.Option(min=0, help=(  # noqa: UP045
        f"Data loading processes [default: {_T.workers}]."))] = None,
    eval_every: Annotated[int, typer.Option(min=1, help="Validate every N epochs (and after the last).")
                          ] = _T.eval_every,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Also write last.pt every N steps (0: per epoch).")
                                ] = _T.checkpoint_every,
    export_int8: Annotated[bool, typer.Option(help=(
        "Also write RUN/best-int8.pt: int8 weights, a quarter of the size (what the bundled demo is)."))
                           ] = _T.export_int8,
    overwrite: Annotated[bool, typer.Option(help="Start afresh in a run folder that holds a run.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress; warnings and errors only.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging.")] = False,
) -> None:
    """Train a Mask R-CNN on COCO-format data into RUN: best.pt and last.pt (use with `maskseg predict
    --weights RUN/best.pt`), metrics.jsonl, training.png. Multi-GPU: `torchrun --nproc_per_node N -m
    maskseg train ...` with the same options."""
    from .console import install_stop_handlers, setup_logging

    quiet = quiet or os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 reports
    setup_logging(quiet=quiet, verbose=verbose)
    progress = None if quiet else RichTrainProgress() if sys.stderr.isatty() else LogTrainProgress()
    stop = threading.Event()
    caught: list[int] = []
    install_stop_handlers(stop, caught, finishing="this step and writing last.pt")
    from .training import resume as resume_run
    from .training import train

    try:
        if resume is not None:
            summary = resume_run(resume, epochs=epochs, device=device, workers=workers, progress=progress,
                                      stop=stop)
        else:
            if coco is None or images is None or out is None:
                raise typer.BadParameter("give --coco, --images and -o RUN (or --resume RUN)", param_hint="--coco")
            config = replace(
                _T, model=model, arch_kwargs=_arch_kwargs(arch_kwargs), weights=weights,
                epochs=epochs or _T.epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                weight_decay=weight_decay, warmup_iters=warmup_iters, lr_schedule=lr_schedule,
                lr_steps=_ints(lr_steps, "--lr-steps"), lr_gamma=lr_gamma, clip_grad=clip_grad or None,
                hflip=hflip, vflip=vflip, transpose=transpose, color_jitter=color_jitter, copy_paste=copy_paste,
                train_sizes=_ints(train_sizes, "--train-sizes"), min_size=min_size, max_size=max_size,
                trainable_layers=trainable_layers, freeze_backbone=freeze_backbone, seed=seed,
                device=device or _T.device, amp=amp, workers=_T.workers if workers is None else workers,
                val_split=val_split, eval_every=eval_every, checkpoint_every=checkpoint_every,
                export_int8=export_int8,
            )
            summary = train(coco, images, out, config, val_coco=val_coco, val_images=val_images,
                                     overwrite=overwrite, progress=progress, stop=stop)
    finally:
        if progress is not None:
            progress.close()
    if summary.interrupted:
        signum = caught[0] if caught else signal.SIGINT
        raise typer.Exit(128 + int(signum))
    if not quiet:
        ap = summary.metrics
        scores = (f"; validation bbox AP {ap['bbox_AP']:.3f}, segm AP {ap['segm_AP']:.3f} (best epoch "
                  f"{summary.best_epoch})" if "segm_AP" in ap else "")
        log.info("done: %d steps, %d epochs in %.0f s%s -> %s (predict with: maskseg predict IMAGES -o OUT "
                 "--weights %s)", summary.steps, summary.epochs, summary.seconds, scores, summary.run_dir,
                 summary.best)


# torchvision's loss names, shortened for the live display.
_SHORT = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask", "loss_objectness": "obj",
          "loss_rpn_box_reg": "rpn"}


class RichTrainProgress:
    """A live bar with losses, lr, images/s and ETA (used when stderr is a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]training"), TextColumn("epoch {task.fields[epoch]}"), BarColumn(bar_width=24),
            MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[losses]}"),
            console=Console(stderr=True), transient=False,
        )
        self._task: Any = None

    def start(self, total_steps: int, start_step: int, images_per_step: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, epoch="-",
                                             losses="", lr="", rate="")

    def step(self, record: dict) -> None:
        parts = [f"{_SHORT.get(k, k)} {v:.3f}" for k, v in record.items() if k.startswith("loss_")]
        losses = f"loss {record['loss']:.3f} ({' '.join(parts)})"
        self._progress.update(self._task, completed=record["step"], epoch=record["epoch"], losses=losses,
                              lr=f"{record['lr']:.2e}", rate=f"{record['images_per_s']:.2f} img/s")

    def epoch(self, record: dict) -> None:
        _log_epoch(record)

    def close(self) -> None:
        self._progress.stop()


class LogTrainProgress:
    """Plain log lines every ``every`` seconds and after each epoch (cron, pipes, CI logs)."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self.total = self.start_step = 0
        self._t0 = self._last = time.monotonic()

    def start(self, total_steps: int, start_step: int, images_per_step: int) -> None:
        self.total, self.start_step = total_steps, start_step
        self._t0 = self._last = time.monotonic()

    def step(self, record: dict) -> None:
        now = time.monotonic()
        if now - self._last < self.every and record["step"] != self.total:
            return
        self._last = now
        done = record["step"] - self.start_step
        per_step = (now - self._t0) / max(done, 1)
        losses = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
        log.info("step %d/%d epoch %d: loss %.3f (%s), lr %.2e, %.2f img/s, %.1f s/step, ETA %.0f s",
                 record["step"], self.total, record["epoch"], record["loss"], losses, record["lr"],
                 record["images_per_s"], per_step, per_step * (self.total - record["step"]))

    def epoch(self, record: dict) -> None:
        _log_epoch(record)

    def close(self) -> None:
        pass


def _log_epoch(record: dict) -> None:
    ap = (f", validation bbox AP {record['bbox_AP']:.3f}, segm AP {record['segm_AP']:.3f} "
          f"(AP50 {record['segm_AP50']:.3f})" if "segm_AP" in record else "")
    log.info("epoch %d done at step %d: mean loss %.3f%s", record["epoch"], record["step"], record.get("loss", 0.0), ap)
