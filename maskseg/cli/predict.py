"""`maskseg predict`: options -> PredictConfig -> one call of maskseg.api.predict."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import config as cfg
from .options import (
    INPUTS,
    MODEL,
    OUTPUTS,
    RUN,
    THRESHOLDS,
    BatchSize,
    Device,
    MaskThresh,
    MaxDets,
    MaxSize,
    MinSize,
    Model,
    Overwrite,
    Precision,
    Quiet,
    ScoreThresh,
    Verbose,
    Weights,
    comma_list,
    model_config,
)

log = logging.getLogger("maskseg")

_D = cfg.PredictConfig()
_M = cfg.ModelConfig()
_E = cfg.EngineConfig()
_T = cfg.TileConfig()
_F = cfg.FrameSelect()
_W = cfg.WriterOptions()


def predict_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(  # noqa: UP045 - Typer needs Optional here
        help="Folders (recursive), image files, quoted globs ('shots/**/*.jpg'), @LIST files, - (paths on stdin), "
             "or object storage URLs (s3://bucket/prefix/, gs://...; needs maskseg[s3]).",
        metavar="INPUTS", show_default=False)] = None,
    list_file: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045
        "--list", metavar="FILE", rich_help_panel=INPUTS,
        help="A file listing image paths, one a line, relative to the list file. Repeatable.")] = None,
    recursive: Annotated[bool, typer.Option(
        metavar="", rich_help_panel=INPUTS, help="Descend into sub-folders of folder inputs.")] = _D.recursive,
    shard: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="K/N", rich_help_panel=INPUTS,
        help="Take only shard K of N (1-based) of the inputs, split by a hash of each relative path, for job "
             "arrays; combine shard outputs with `maskseg merge`.")] = None,
    max_pixels: Annotated[int, typer.Option(
        min=1, metavar="N", rich_help_panel=INPUTS,
        help="Refuse images with more pixels (decompression bombs). With --tile, a TIFF stored in tiles (or "
             "small strips) is read by region, never decoded whole, and is not held to it; every other image "
             "is: raise it for huge images decoded whole.")] = _D.max_pixels,
    uint16: Annotated[str, typer.Option(
        metavar="MODE", rich_help_panel=INPUTS,
        help="16-bit images to 8 bits: range (the top 8 bits of the bit depth the data uses: 12-bit data is "
             "not darkened), shift (the top 8 of 16 bits) or percentile (0.5-99.5% stretched per image).")
    ] = _D.uint16,
    tiff_pages: Annotated[bool, typer.Option(
        "--tiff-pages", metavar="", rich_help_panel=INPUTS,
        help="Segment every page of multi-page TIFFs as its own image (scan.tif/p0001, ...); default: the "
             "first page.")] = _D.tiff_pages,
    frame_stride: Annotated[int, typer.Option(
        metavar="N", rich_help_panel=INPUTS,
        help="Videos (mp4, mkv, mov, avi, webm; pip install 'maskseg\\[video]'): segment every Nth frame.")
    ] = _F.stride,
    fps: Annotated[Optional[float], typer.Option(  # noqa: UP045
        metavar="F", rich_help_panel=INPUTS, show_default=False,
        help="Videos: segment about F frames per second of video time (instead of --frame-stride).")] = None,
    model: Model = _M.name,
    weights: Weights = None,
    backend: Annotated[str, typer.Option(
        metavar="NAME", rich_help_panel=MODEL,
        help="What runs the network: torch (torchvision), onnxruntime or openvino (a model from `maskseg export "
             "--format onnx`), or tensorflow (a TF Object Detection API or TF Model Garden SavedModel).")] = _M.backend,
    labels: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="FILE", rich_help_panel=MODEL,
        help="Class names for --backend tensorflow: a TF label map (.pbtxt).")] = None,
    min_size: MinSize = None,
    max_size: MaxSize = None,
    score_thresh: ScoreThresh = _M.score_thresh,
    mask_thresh: MaskThresh = _D.mask_thresh,
    max_dets: MaxDets = _M.max_dets,
    classes: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="NAMES", rich_help_panel=THRESHOLDS,
        help="Keep only these class names, comma-separated (e.g. 'person,dog').")] = None,
    agnostic_nms: Annotated[Optional[float], typer.Option(  # noqa: UP045
        min=0.0, max=1.0, metavar="IOU", rich_help_panel=THRESHOLDS,
        help="Drop a detection whose mask overlaps a higher-scoring one of another class by mask IoU >= IOU "
             "(default: off, outputs as the model gives them).")] = _D.agnostic_nms,
    out: Annotated[Path, typer.Option(
        "-o", "--out", metavar="DIR", rich_help_panel=OUTPUTS,
        help="Output folder (created; reruns resume in it).")] = Path("out"),
    writers: Annotated[str, typer.Option(
        metavar="NAMES", rich_help_panel=OUTPUTS,
        help="Writers to run, comma-separated (see `maskseg writers`).")] = ",".join(_D.writers),
    polygon_tolerance: Annotated[float, typer.Option(
        min=0.0, metavar="PX", rich_help_panel=OUTPUTS,
        help="Simplify the polygons of the polygons, yolo and labelstudio writers by this distance in pixels "
             "(0: exact pixel outlines).")] = _W.polygon_tolerance,
    labelstudio_root: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="DIR", rich_help_panel=OUTPUTS,
        help="labelstudio writer: Label Studio's LOCAL_FILES_DOCUMENT_ROOT; image URLs are paths relative to it "
             "(default: the folder above the inputs' common folder).")] = None,
    overwrite: Overwrite = _D.overwrite,
    device: Device = _M.device,
    precision: Precision = _M.precision,
    compile_backbone: Annotated[bool, typer.Option(
        "--compile", metavar="", rich_help_panel=RUN,
        help="torch.compile the backbone, for long runs on a GPU: each new input size compiles once (seconds to "
             "minutes). On a CPU maskseg's own rewrites already do what it does (measured: no gain).")] = False,
    threads: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, metavar="N", rich_help_panel=RUN,
        help="Threads the backend may use for the network (default: the runtime's own choice).")] = None,
    batch_size: BatchSize = "auto",
    workers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=0, metavar="N", rich_help_panel=RUN, show_default=False,
        help=f"Decoding threads ahead of the model (0: decode inline) \\[default: {_D.decode_workers}]; with "
             f"--engine ray, model workers \\[default: {_E.workers}].")] = None,
    engine: Annotated[str, typer.Option(
        metavar="NAME", rich_help_panel=RUN,
        help="local (this process) or ray (a Ray cluster, pip install 'maskseg\\[ray]').")] = _E.name,
    ray_address: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="ADDRESS", rich_help_panel=RUN,
        help="--engine ray: the cluster to join (auto, or HEAD:6379), run from one of its nodes; default: start "
             "a local Ray (RAY_ADDRESS is not read).")] = None,
    gpus_per_worker: Annotated[float, typer.Option(
        min=0.0, metavar="X", rich_help_panel=RUN, help="--engine ray: GPUs per model worker.")
    ] = _E.gpus_per_worker,
    threads_per_worker: Annotated[int, typer.Option(
        min=1, metavar="N", rich_help_panel=RUN, help="--engine ray: torch threads per model worker.")
    ] = _E.threads_per_worker,
    tile: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="PX|auto", rich_help_panel=RUN, show_default=False,
        help=f"Sliced inference for large images: cut each image into PX x PX tiles run through the model like "
             f"images, then merge the detections (objects cut by a tile edge are joined; an object seen in two "
             f"tiles is kept once, with its best whole view). auto: tiles of "
             f"{cfg.AUTO_TILE_SIZE} for images whose long side passes {cfg.AUTO_TILE_TRIGGER} px.")] = None,
    tile_overlap: Annotated[float, typer.Option(
        metavar="F", rich_help_panel=RUN,
        help="--tile: fraction of a tile shared with its neighbour, 0 to 0.9.")] = _T.overlap,
    tile_full: Annotated[bool, typer.Option(
        "--tile-full", metavar="", rich_help_panel=RUN,
        help=f"--tile: also run the whole image downscaled to {cfg.TILE_FULL_SIDE} px, so objects larger than a "
             "tile are found too.")] = _T.full,
    no_tiff_regions: Annotated[bool, typer.Option(
        "--no-tiff-regions", metavar="", rich_help_panel=RUN,
        help="--tile: decode TIFFs stored in tiles whole like other images, instead of reading them by region "
             "(a comparison switch for benchmarks).")] = not _D.tiff_regions,
    checkpoint_every: Annotated[float, typer.Option(
        min=0.0, metavar="SEC", rich_help_panel=RUN,
        help="Refresh predictions.json, results.json and failures.jsonl every this many seconds during a run "
             "(0: after every batch); they are always written at the end.")] = _D.checkpoint_seconds,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Segment images into OUT; reruns skip finished images and pick up new ones.

    OUT gets predictions.json (COCO dataset), results.json (COCO results), overlays/, masks/ and failures.jsonl;
    polygons, yolo, labelstudio and json writers add predictions_polygons.json, yolo/, labelstudio_tasks.json
    and json/.
    """
    from .progress import install_stop_handlers, run_progress, setup_logging

    setup_logging(quiet=quiet, verbose=verbose)
    sources = list(inputs or []) + [f"@{p}" for p in (list_file or [])]
    if not sources:
        raise typer.BadParameter("give at least one INPUT (folder, file, glob, @list or -)", param_hint="INPUTS")
    if agnostic_nms is not None and agnostic_nms <= 0:
        raise typer.BadParameter("expected a mask IoU above 0 and at most 1", param_hint="--agnostic-nms")
    engine_config = replace(_E, name=engine, address=ray_address, gpus_per_worker=gpus_per_worker,
                            threads_per_worker=threads_per_worker,
                            workers=workers if workers is not None and engine == "ray" else _E.workers)
    config = cfg.PredictConfig(
        model=model_config(model, weights, device=device, score_thresh=score_thresh, max_dets=max_dets,
                           min_size=min_size, max_size=max_size, backend=backend,
                           labels=str(labels) if labels else None, threads=threads, precision=precision,
                           compile=compile_backbone),
        engine=engine_config, shard=_parse_shard(shard),
        batch_size=cfg.parse_batch_size(batch_size), mask_thresh=mask_thresh,
        classes=comma_list(classes), writers=comma_list(writers),
        decode_workers=workers if workers is not None and engine != "ray" else _D.decode_workers,
        max_pixels=max_pixels, recursive=recursive, overwrite=overwrite, checkpoint_seconds=checkpoint_every,
        tile=cfg.TileConfig(size=cfg.parse_tile(tile), overlap=tile_overlap, full=tile_full),
        frames=cfg.FrameSelect(stride=frame_stride, fps=fps), uint16=cfg.parse_uint16(uint16),
        tiff_pages=tiff_pages, tiff_regions=not no_tiff_regions,
        writer_options=replace(_W, polygon_tolerance=polygon_tolerance,
                               labelstudio_root=str(labelstudio_root.resolve()) if labelstudio_root else None),
        agnostic_nms=agnostic_nms,
    )
    progress = run_progress(quiet)
    stop = threading.Event()
    caught: list[int] = []
    install_stop_handlers(stop, caught, finishing="the current batch")
    from ..api import predict

    try:
        summary = predict(sources, out, config, progress=progress, stop=stop)
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
