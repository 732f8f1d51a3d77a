"""`maskseg eval`: options -> EvalConfig -> maskseg.evaluation.evaluate -> rich tables (and --json, --plot)."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .. import config as cfg
from .options import (
    INPUTS,
    OUTPUTS,
    BatchSize,
    Device,
    MaxSize,
    MinSize,
    OptionalModel,
    Overwrite,
    Precision,
    Quiet,
    ScoreThresh,
    Verbose,
    Weights,
    comma_list,
    model_config,
)

if TYPE_CHECKING:
    from ..evaluation import EvalReport

log = logging.getLogger("maskseg")

_V = cfg.EvalConfig()
_P = _V.predict
_M = _P.model
METRICS = "Metrics"


def eval_command(
    coco: Annotated[Path, typer.Option(
        metavar="ANN", rich_help_panel=INPUTS, show_default=False,
        help="Ground truth: a COCO instances JSON (ANN).")],
    results: Annotated[Optional[Path], typer.Option(  # noqa: UP045 - Typer needs Optional here
        metavar="FILE", rich_help_panel=INPUTS,
        help="A COCO results file (from maskseg or any other tool), or maskseg's predictions.json. Results may "
             "name images by file name instead of id.")] = None,
    images: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="DIR", rich_help_panel=INPUTS,
        help="Instead of --results: run the model (the Model, Thresholds and Run options) over ANN's images in "
             "this folder (the folder ANN's file_name entries are relative to) and evaluate what it finds.")] = None,
    model: OptionalModel = None,
    weights: Weights = None,
    min_size: MinSize = None,
    max_size: MaxSize = None,
    score_thresh: ScoreThresh = _M.score_thresh,
    iou_type: Annotated[str, typer.Option(
        metavar="TYPES", rich_help_panel=METRICS, help="IoU types, comma-separated: bbox, segm.")
    ] = ",".join(_V.iou_types),
    max_dets: Annotated[int, typer.Option(
        min=10, metavar="N", rich_help_panel=METRICS,
        help="COCOeval's largest maxDets (detections per image); with --images also the model's.")] = _V.max_dets,
    fail_under: Annotated[Optional[float], typer.Option(  # noqa: UP045
        min=0.0, max=1.0, metavar="AP", rich_help_panel=METRICS,
        help="Exit 3 when --fail-metric is below this (for CI).")] = None,
    fail_metric: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="METRIC", rich_help_panel=METRICS, show_default=False,
        help="TYPE or TYPE/STAT for --fail-under, e.g. segm, bbox, segm/AP50, bbox/AR100 "
             "\\[default: segm AP, or bbox AP when segm is not evaluated].")] = None,
    json_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--json", metavar="FILE", rich_help_panel=OUTPUTS,
        help="Write every number (stats, per-class AP, PR curves, warnings) to this JSON file.")] = None,
    plot: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="DIR", rich_help_panel=OUTPUTS,
        help="Write precision-recall curves, one PNG per IoU type, into this folder.")] = None,
    out: Annotated[Path, typer.Option(
        "-o", "--out", metavar="DIR", rich_help_panel=OUTPUTS,
        help="--images: folder for the model's outputs (predictions.json, results.json, eval_results.json); "
             "reruns resume in it.")] = Path("out-eval"),
    overwrite: Overwrite = _P.overwrite,
    device: Device = _M.device,
    precision: Precision = _M.precision,
    batch_size: BatchSize = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """COCO bbox and segm AP (pycocotools' COCOeval) of a results file, or of a model run over ANN's images."""
    from ..errors import Interrupted
    from .progress import install_stop_handlers, run_progress, setup_logging

    setup_logging(quiet=quiet, verbose=verbose)
    if (results is None) == (images is None):
        raise typer.BadParameter("give --results FILE, or --images DIR to run a model (one of them)",
                                 param_hint="--results / --images")
    if results is not None and (weights is not None or model is not None):
        raise typer.BadParameter("--weights and --model run a model: use them with --images, not --results",
                                 param_hint="--weights / --model")
    config = cfg.EvalConfig(
        iou_types=comma_list(iou_type.lower()), max_dets=max_dets, fail_under=fail_under, fail_metric=fail_metric,
        predict=replace(_P, batch_size=cfg.parse_batch_size(batch_size), overwrite=overwrite, model=model_config(
            model or _M.name, weights, base=_M, device=device, score_thresh=score_thresh, max_dets=max_dets,
            min_size=min_size, max_size=max_size, precision=precision)),
    )
    from ..evaluation import evaluate

    progress = stop = None
    caught: list[int] = []
    if images is not None:
        progress = run_progress(quiet)
        stop = threading.Event()
        install_stop_handlers(stop, caught, finishing="the current batch")
    try:
        report = evaluate(coco, results, images=images, out=out if images is not None else None, config=config,
                          progress=progress, stop=stop)
    except Interrupted:
        log.warning("interrupted; outputs are consistent, run the same command again to resume")
        raise typer.Exit(128 + (caught[0] if caught else 2)) from None
    finally:
        if progress is not None:
            progress.close()
    _write_outputs(report, json_file, plot)
    if not quiet:
        _print_report(report)
    if report.gate is not None and not report.gate.passed:
        g = report.gate
        log.error("%s %.4f is below --fail-under %g", g.metric, g.value, g.threshold)
        raise typer.Exit(3)


def _write_outputs(report: EvalReport, json_file: Path | None, plot: Path | None) -> None:
    from ..atomic import atomic_write_bytes
    from ..errors import OutputError

    if json_file is not None:
        try:
            atomic_write_bytes(json_file, report.to_json().encode())
        except OSError as exc:
            raise OutputError(f"{json_file}: cannot write: {exc.strerror}") from None
    if plot is not None:
        from ..evaluation import plot_pr_curves

        for path in plot_pr_curves(report, plot):
            log.info("wrote %s", path)


def _print_report(report: EvalReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=False)
    types = [m.iou_type for m in report.metrics]
    table = Table(title=f"COCO metrics (pycocotools {report.pycocotools_version})", title_justify="left")
    for name in ("metric", "IoU", "area", "maxDets"):
        table.add_column(name)
    for t in types:
        table.add_column(t, justify="right")
    first = report.metrics[0]
    for i, s in enumerate(first.stats):
        table.add_row(f"{s.title} ({s.key})", s.iou, s.area, str(s.max_dets),
                      *(f"{m.stats[i].value:0.3f}" for m in report.metrics))
    console.print(table)

    per_class = Table(title="Per-class AP (IoU=0.50:0.95 and 0.50, area all)", title_justify="left")
    for name in ("class", "id", "objects", "detections"):
        per_class.add_column(name, justify="left" if name == "class" else "right")
    for t in types:
        per_class.add_column(f"{t} AP", justify="right")
        per_class.add_column(f"{t} AP50", justify="right")
    for k, c in enumerate(first.per_class):
        cells = []
        for m in report.metrics:
            cells += [_ap(m.per_class[k].ap), _ap(m.per_class[k].ap50)]
        per_class.add_row(c.name, str(c.category_id), str(c.instances), str(c.detections), *cells)
    console.print(per_class)
    line = (f"{report.images} images, {report.instances} objects, {report.detections} detections evaluated "
            f"(results: {report.results})")
    if report.gate is not None:
        g = report.gate
        line += f"; {g.metric} {g.value:.4f} {'>=' if g.passed else '<'} --fail-under {g.threshold:g}"
    console.print(line, highlight=False)


def _ap(value: float) -> str:
    return f"{value:0.3f}" if value >= 0 else "n/a"
