"""The ``maskseg`` command: options -> config -> one api call. The one place errors become exit codes.

Exit codes: 0 all done; 1 fatal error (weights, disk, output); 2 usage error; 3 finished but some
inputs failed (OUT/failures.jsonl); 75 another run holds OUT's lock; 130/143 interrupted.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import config as cfg
from .errors import MasksegError

log = logging.getLogger("maskseg")

EXIT_CODES_HELP = (
    "Exit codes: 0 all done; 1 fatal error (weights, disk, output folder); 2 usage error; "
    "3 finished but some inputs failed (listed in OUT/failures.jsonl); 75 another run holds OUT's lock "
    "(try later); 130/143 interrupted (outputs consistent, rerun to resume)."
)

app = typer.Typer(
    help="Batch instance segmentation with Mask R-CNN: folders in, COCO JSON, overlays and masks out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_D = cfg.PredictConfig()
_M = cfg.ModelConfig()
_E = cfg.EngineConfig()


@app.command(epilog=EXIT_CODES_HELP)
def predict(
    inputs: Annotated[Optional[list[str]], typer.Argument(  # noqa: UP045 - Typer needs Optional here
        help="Folders (recursive), image files, quoted globs ('shots/**/*.jpg'), @LIST files or - (paths on stdin).",
        show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (created; reruns resume in it).")
                   ] = Path("out"),
    list_file: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045
        "--list", help="A file listing image paths, one a line, relative to the list file. Repeatable.")] = None,
    model: Annotated[str, typer.Option(help=(
        "Architecture: maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2, small, or demo (the bundled fruits-and-nuts "
        "model, offline); `maskseg models` lists them."))] = _M.name,
    weights: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Local weights: a torchvision state dict as it is, or a maskseg checkpoint (carries its classes); "
             "an .onnx file (--backend onnxruntime) or a SavedModel folder (--backend tensorflow). "
             "Default: torchvision's COCO weights (downloaded once into the torch cache).")] = None,
    backend: Annotated[str, typer.Option(help=(
        "What runs the network: torch (torchvision), onnxruntime (a model from `maskseg export`) or "
        "tensorflow (a TF Object Detection API SavedModel)."))] = _M.backend,
    labels: Annotated[Optional[Path], typer.Option(help=(  # noqa: UP045
        "Class names for --backend tensorflow: a TF label map (.pbtxt)."))] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help=(  # noqa: UP045
        "Threads the backend may use for the network (default: the runtime's own choice)."))] = None,
    device: Annotated[str, typer.Option(help="auto (GPU if present), cpu, cuda or cuda:N.")] = _M.device,
    precision: Annotated[str, typer.Option(help=(
        "fp32, or fp16/bf16: mixed precision on a CUDA GPU (faster there; outputs differ slightly). The CPU "
        "runs fp32."))] = _M.precision,
    compile_backbone: Annotated[bool, typer.Option("--compile", help=(
        "torch.compile the backbone, for long runs on a GPU: each new input size compiles once (seconds to "
        "minutes). On a CPU maskseg's own rewrites already do what it does (measured: no gain)."))] = False,
    batch_size: Annotated[str, typer.Option(help=(
        "Images per forward pass, or auto: 1 on a CPU (fastest there), on a GPU as many as half its free memory "
        "holds, up to 8."))] = "auto",
    score_thresh: Annotated[float, typer.Option(min=0.0, max=1.0, help="Keep detections scoring at least this.")
                            ] = _M.score_thresh,
    mask_thresh: Annotated[float, typer.Option(min=0.0, max=1.0, help="Mask probability threshold.")
                           ] = _D.mask_thresh,
    max_dets: Annotated[int, typer.Option(min=1, help="At most this many detections per image.")] = _M.max_dets,
    min_size: Annotated[Optional[int], typer.Option(min=32, help=(  # noqa: UP045
        "Resize the short side to this (default: the model's, 800 for torchvision's)."))] = None,
    max_size: Annotated[Optional[int], typer.Option(min=32, help=(  # noqa: UP045
        "Cap the long side at this (default: the model's, 1333 for torchvision's)."))] = None,
    classes: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Keep only these class names, comma-separated (e.g. 'person,dog').")] = None,
    writers: Annotated[str, typer.Option(help="Writers to run, comma-separated (see `maskseg writers`).")
                       ] = ",".join(_D.writers),
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse images with more pixels (decompression bombs).")
                          ] = _D.max_pixels,
    workers: Annotated[Optional[int], typer.Option(min=0, help=(  # noqa: UP045
        f"Decoding threads ahead of the model (0: decode inline) [default: {_D.decode_workers}]; with --engine ray, "
        f"model workers [default: {_E.workers}]."), show_default=False)] = None,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (a Ray cluster, pip install 'maskseg[ray]').")
                      ] = _E.name,
    ray_address: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        "--engine ray: the cluster to join (auto, or HEAD:6379), run from one of its nodes; default: start "
        "a local Ray."))] = None,
    gpus_per_worker: Annotated[float, typer.Option(min=0.0, help="--engine ray: GPUs per model worker.")
                               ] = _E.gpus_per_worker,
    threads_per_worker: Annotated[int, typer.Option(min=1, help="--engine ray: torch threads per model worker.")
                                  ] = _E.threads_per_worker,
    shard: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        "K/N: take only shard K of N (1-based) of the inputs, split by a hash of each relative path, for job "
        "arrays; combine shard outputs with `maskseg merge`."))] = None,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders of folder inputs.")] = _D.recursive,
    overwrite: Annotated[bool, typer.Option(help="Discard OUT's earlier results and start afresh.")
                         ] = _D.overwrite,
    checkpoint_every: Annotated[float, typer.Option(min=0.0, help=(
        "Refresh predictions.json, results.json and failures.jsonl every this many seconds during a run "
        "(0: after every batch); they are always written at the end."))] = _D.checkpoint_seconds,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress or summary; warnings and errors only.")
                     ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging.")] = False,
) -> None:
    """Segment images into OUT: predictions.json (COCO dataset), results.json (COCO results),
    overlays/, masks/, failures.jsonl. Reruns skip finished images and pick up new ones."""
    from .console import LogProgress, RichProgress, install_stop_handlers, setup_logging

    setup_logging(quiet=quiet, verbose=verbose)
    sources = list(inputs or []) + [f"@{p}" for p in (list_file or [])]
    if not sources:
        raise typer.BadParameter("give at least one INPUT (folder, file, glob, @list or -)", param_hint="INPUTS")
    engine_config = replace(_E, name=engine, address=ray_address, gpus_per_worker=gpus_per_worker,
                            threads_per_worker=threads_per_worker,
                            workers=workers if workers is not None and engine == "ray" else _E.workers)
    config = cfg.PredictConfig(
        model=replace(_M, name=model, weights=str(weights) if weights else None, device=device,
                      score_thresh=score_thresh, max_dets=max_dets, min_size=min_size, max_size=max_size,
                      backend=backend, labels=str(labels) if labels else None, threads=threads,
                      precision=precision, compile=compile_backbone),
        engine=engine_config, shard=_parse_shard(shard),
        batch_size=cfg.parse_batch_size(batch_size), mask_thresh=mask_thresh,
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else (),
        writers=tuple(w.strip() for w in writers.split(",") if w.strip()),
        decode_workers=workers if workers is not None and engine != "ray" else _D.decode_workers,
        max_pixels=max_pixels, recursive=recursive, overwrite=overwrite, checkpoint_seconds=checkpoint_every,
    )
    progress = None if quiet else RichProgress() if sys.stderr.isatty() else LogProgress()
    stop = threading.Event()
    caught: list[int] = []
    install_stop_handlers(stop, caught, finishing="the current batch")
    from .api import predict as run_predict

    try:
        summary = run_predict(sources, out, config, progress=progress, stop=stop)
    except KeyboardInterrupt:  # a second signal: stopped at once; the journal keeps what was finished
        log.warning("stopped at once; run the same command again to resume")
        raise typer.Exit(128 + int(caught[-1] if caught else signal.SIGINT)) from None
    finally:
        if progress is not None:
            progress.close()
    if not quiet:
        log.info("done %d, skipped %d (already done), failed %d%s, detections %d, %.1f s -> %s",
                 summary.done, summary.skipped, summary.failed,
                 f" ({summary.failed_total} in failures.jsonl)" if summary.failed_total else "",
                 summary.detections, summary.seconds, summary.out_dir)
    if summary.interrupted is not None or caught:  # a signal that came late still says "interrupted"
        signum = caught[0] if caught else signal.SIGINT
        log.warning("interrupted; outputs are consistent, run the same command again to resume")
        raise typer.Exit(128 + int(signum))
    if summary.failed_total:
        raise typer.Exit(3)


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> (K, N) with 1 <= K <= N; None stays None."""
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected K/N, e.g. 2/3", param_hint="--shard") from None
    if not 1 <= k <= n:
        raise typer.BadParameter(f"{text!r}: K must be between 1 and N", param_hint="--shard")
    return k, n


@app.command("writers")
def list_writers() -> None:
    """List the installed writers (built-in and third-party, from the maskseg.writers entry points)."""
    from .writers import available_writers

    for name in available_writers():
        typer.echo(name)


@app.command("models")
def list_models() -> None:
    """List the model architectures --model accepts."""
    from .models import MODELS

    for spec in MODELS.values():
        typer.echo(f"{spec.name:28s} {spec.description}")


# Commands with their own option sets live in cli_<name>.py (options -> config -> one api call each).
from .cli_eval import eval_command  # noqa: E402
from .cli_export import export_command  # noqa: E402
from .cli_inspect import inspect_command  # noqa: E402
from .cli_merge import merge_command  # noqa: E402
from .cli_train import train_command  # noqa: E402

app.command("eval", epilog="Exit codes: 0 ok; 1 fatal error; 2 usage error; 3 AP below --fail-under.")(eval_command)
app.command("train", epilog=EXIT_CODES_HELP)(train_command)
app.command("inspect")(inspect_command)
app.command("export")(export_command)
app.command("merge", epilog=EXIT_CODES_HELP)(merge_command)


def main() -> None:
    """Console-script entry point: the one place a MasksegError becomes a message and an exit code."""
    try:
        app()
    except MasksegError as exc:
        typer.echo(f"maskseg: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("maskseg: interrupted", err=True)
        sys.exit(130)
    finally:
        # The process ends here: with every object frozen, the interpreter's last collections skip
        # torch's and the model's millions of objects (measured: exit 0.9 s -> 0.2 s on 2 cores).
        gc.freeze()


if __name__ == "__main__":
    main()
