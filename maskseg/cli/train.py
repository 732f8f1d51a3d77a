"""`maskseg train`: options -> TrainConfig -> one call of maskseg.training.train (or resume)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import config as cfg
from .options import (
    AUGMENTATION,
    INPUTS,
    MODEL,
    OUTPUTS,
    RUN,
    TRAINING,
    MaxSize,
    MinSize,
    Model,
    OptionalDevice,
    Overwrite,
    Quiet,
    Verbose,
)

log = logging.getLogger("maskseg")

_T = cfg.TrainConfig()
BACKBONE = "Backbone"


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


def _probability(help: str) -> Any:
    return typer.Option(min=0.0, max=1.0, metavar="P", rich_help_panel=AUGMENTATION, help=help)


def train_command(
    coco: Annotated[Optional[Path], typer.Option(  # noqa: UP045 - Typer needs Optional here
        metavar="ANN", rich_help_panel=INPUTS, help="COCO instances JSON to train on.")] = None,
    images: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="DIR", rich_help_panel=INPUTS, help="Folder the file_names of --coco are relative to.")] = None,
    yolo: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="DATA.yaml", rich_help_panel=INPUTS,
        help="Instead of --coco/--images: an Ultralytics YOLO-seg dataset (its train split), e.g. the yolo "
             "writer's OUT/yolo/data.yaml.")] = None,
    val_coco: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="ANN", rich_help_panel=INPUTS,
        help="COCO JSON (or YOLO data.yaml) to validate on (AP after each epoch).")] = None,
    val_images: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="DIR", rich_help_panel=INPUTS, help="Images of --val-coco (default: --images).")] = None,
    val_split: Annotated[float, typer.Option(
        min=0.0, max=0.95, metavar="X", rich_help_panel=INPUTS,
        help="Hold out this fraction of --coco's images for validation: the last ones in the file's order "
             "(deterministic). Written to RUN/train.json and RUN/val.json.")] = _T.val_split,
    resume: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="RUN", rich_help_panel=INPUTS,
        help="Continue the run in this folder from its last.pt (model, optimizer, schedule, step, RNG) with "
             "its saved settings; --epochs, --device, --workers may be given to change them.")] = None,
    model: Model = _T.model,
    arch_kwargs: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="JSON", rich_help_panel=MODEL,
        help='Builder arguments as JSON, e.g. \'{"trunk": "resnet34"}\' for small.')] = None,
    weights: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="PATH", rich_help_panel=MODEL,
        help="Start from: a weights file (torchvision state dict or maskseg checkpoint), 'torchvision' (the "
             "model's COCO weights, downloaded once), or nothing (from scratch). Predictors are replaced when "
             "the class count differs.")] = None,
    trainable_layers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=0, max=5, metavar="N", rich_help_panel=MODEL,
        help="ResNet stages to train, from the top (default: 5 from scratch, 3 from weights).")] = None,
    min_size: MinSize = None,
    max_size: MaxSize = None,
    epochs: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, metavar="N", rich_help_panel=TRAINING, help=f"Passes over the data \\[default: {_T.epochs}].")
    ] = None,
    batch_size: Annotated[int, typer.Option(
        min=1, metavar="N", rich_help_panel=TRAINING, help="Images per step (per GPU under torchrun).")
    ] = _T.batch_size,
    optimizer: Annotated[str, typer.Option(
        metavar="NAME", rich_help_panel=TRAINING, help="adamw or sgd (momentum 0.9).")] = _T.optimizer,
    lr: Annotated[float, typer.Option(
        min=0.0, metavar="X", rich_help_panel=TRAINING, help="Peak learning rate.")] = _T.lr,
    weight_decay: Annotated[float, typer.Option(
        min=0.0, metavar="X", rich_help_panel=TRAINING, help="Weight decay.")] = _T.weight_decay,
    warmup_iters: Annotated[int, typer.Option(
        min=0, metavar="N", rich_help_panel=TRAINING, help="Linear lr warm-up, in steps.")] = _T.warmup_iters,
    lr_schedule: Annotated[str, typer.Option(
        metavar="NAME", rich_help_panel=TRAINING, help="cosine, step (x --lr-gamma at --lr-steps) or constant.")
    ] = _T.lr_schedule,
    lr_steps: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="EPOCHS", rich_help_panel=TRAINING,
        help="Epochs at which the step schedule decays, comma-separated (default: 2/3 and 8/9 of --epochs).")
    ] = None,
    lr_gamma: Annotated[float, typer.Option(
        metavar="X", rich_help_panel=TRAINING, help="Step schedule factor.")] = _T.lr_gamma,
    clip_grad: Annotated[float, typer.Option(
        min=0.0, metavar="X", rich_help_panel=TRAINING, help="Clip the gradient norm to this (0: off).")
    ] = _T.clip_grad or 0.0,
    eval_every: Annotated[int, typer.Option(
        min=1, metavar="N", rich_help_panel=TRAINING, help="Validate every N epochs (and after the last).")
    ] = _T.eval_every,
    checkpoint_every: Annotated[int, typer.Option(
        min=0, metavar="N", rich_help_panel=TRAINING, help="Also write last.pt every N steps (0: per epoch).")
    ] = _T.checkpoint_every,
    seed: Annotated[int, typer.Option(
        metavar="N", rich_help_panel=TRAINING, help="Seed of the batch order, augmentations and initial weights.")
    ] = _T.seed,
    freeze_backbone: Annotated[bool, typer.Option(
        metavar="", rich_help_panel=BACKBONE, help="Freeze the whole backbone (trunk and FPN).")
    ] = _T.freeze_backbone,
    hflip: Annotated[float, _probability("Horizontal flip probability.")] = _T.hflip,
    vflip: Annotated[float, _probability("Vertical flip probability.")] = _T.vflip,
    transpose: Annotated[float, _probability("Transpose (swap x, y) probability.")] = _T.transpose,
    color_jitter: Annotated[float, _probability("Brightness/contrast/saturation jitter.")] = _T.color_jitter,
    copy_paste: Annotated[float, _probability(
        "Probability of pasting 1-6 instances of another training image onto an image.")] = _T.copy_paste,
    train_sizes: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="PX,...", rich_help_panel=AUGMENTATION,
        help="Scale jitter: short sides picked at random per image, comma-separated (e.g. 320,384,448).")] = None,
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "-o", "--out", metavar="RUN", rich_help_panel=OUTPUTS, help="Run folder: checkpoints, metrics, plot.")
    ] = None,
    export_int8: Annotated[bool, typer.Option(
        metavar="", rich_help_panel=OUTPUTS,
        help="Also write RUN/best-int8.pt: int8 weights, a quarter of the size (what the bundled demo is).")
    ] = _T.export_int8,
    overwrite: Overwrite = False,
    device: OptionalDevice = None,
    amp: Annotated[bool, typer.Option(
        metavar="", rich_help_panel=RUN, help="Mixed precision (float16 autocast) on CUDA.")] = _T.amp,
    workers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=0, metavar="N", rich_help_panel=RUN, help=f"Data loading processes \\[default: {_T.workers}].")
    ] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Train a Mask R-CNN on COCO-format data into RUN: best.pt, last.pt, metrics.jsonl and training.png.

    Predict with `maskseg predict --weights RUN/best.pt`.
    Multi-GPU: `torchrun --nproc_per_node N -m maskseg train ...` with the same options.
    """
    from .progress import install_stop_handlers, setup_logging, train_progress

    quiet = quiet or os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 reports
    setup_logging(quiet=quiet, verbose=verbose)
    progress = train_progress(quiet)
    stop = threading.Event()
    caught: list[int] = []
    install_stop_handlers(stop, caught, finishing="this step and writing last.pt")
    from ..training import resume as resume_run
    from ..training import train

    try:
        if resume is not None:
            summary = resume_run(resume, epochs=epochs, device=device, workers=workers, progress=progress,
                                 stop=stop)
        else:
            if yolo is not None:
                if coco is not None:
                    raise typer.BadParameter("give --coco or --yolo, not both", param_hint="--yolo")
                from ..training import yolo_root

                coco, images = yolo, images or yolo_root(yolo)
            if val_coco is not None and val_images is None and str(val_coco).endswith((".yaml", ".yml")):
                from ..training import yolo_root

                val_images = yolo_root(val_coco)
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
