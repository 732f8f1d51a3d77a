"""`maskseg eval`: options -> EvalConfig -> maskseg.evaluation.evaluate -> rich tables (and --json, --plot)."""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from . import config as cfg

if TYPE_CHECKING:
    from .evaluation import EvalReport

log = logging.getLogger("maskseg")

_V = cfg.EvalConfig()
_P = _V.predict
_M = _P.model


def eval_command(
    coco: Annotated[Path, typer.Option(help="Ground truth: a COCO instances JSON (ANN).", show_default=False)],
    results: Annotated[Optional[Path], typer.Option(help=(  # noqa: UP045 - Typer needs Optional here
        "A COCO results file (from maskseg or any other tool), or maskseg's predictions.json. Results may "
        "name images by file name instead of id."))] = None,
    images: Annotated[Optional[Path], typer.Option(help=(  # noqa: UP045
        "Instead of --results: run the model over ANN's images in this folder (the folder ANN's file_name "
        "entries are relative to) and evaluate what it finds."))] = None,
    weights: Annotated[Optional[Path], typer.Option(help=(  # noqa: UP045
        "--images: local weights (torchvision state dict or maskseg checkpoint). Default: torchvision's "
        "COCO weights."))] = None,
    model: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        f"--images: architecture (`maskseg models`) \\[default: {_M.name}]."), show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help=(
        "--images: folder for the model's outputs (predictions.json, results.json, eval_results.json); "
        "reruns resume in it."))] = Path("out-eval"),
    device: Annotated[str, typer.Option(help="--images: auto (GPU if present), cpu, cuda or cuda:N.")] = _M.device,
    batch_size: Annotated[str, typer.Option(help=(
        "--images: images per forward pass, or auto (1 on a CPU, up to 8 on a GPU).")) ] = "auto",
    score_thresh: Annotated[float, typer.Option(min=0.0, max=1.0, help=(
        "--images: keep detections scoring at least this (AP wants the low-score tail)."))] = _M.score_thresh,
    min_size: Annotated[Optional[int], typer.Option(min=32, help=(  # noqa: UP045
        "--images: resize the short side to this (default: the model's)."))] = None,
    max_size: Annotated[Optional[int], typer.Option(min=32, help=(  # noqa: UP045
        "--images: cap the long side at this (default: the model's)."))] = None,
    overwrite: Annotated[bool, typer.Option(help="--images: discard OUT's earlier results and start afresh.")
                         ] = _P.overwrite,
    iou_type: Annotated[str, typer.Option(help="IoU types, comma-separated: bbox, segm.")] = ",".join(_V.iou_types),
    max_dets: Annotated[int, typer.Option(min=10, help="COCOeval's largest maxDets (detections per image).")
                        ] = _V.max_dets,
    json_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--json", help="Write every number (stats, per-class AP, PR curves, warnings) to this JSON file.")] = None,
    plot: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Write precision-recall curves, one PNG per IoU type, into this folder.")] = None,
    fail_under: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help=(  # noqa: UP045
        "Exit 3 when --fail-metric is below this (for CI)."))] = None,
    fail_metric: Annotated[Optional[str], typer.Option(help=(  # noqa: UP045
        "TYPE or TYPE/STAT for --fail-under, e.g. segm, bbox, segm/AP50, bbox/AR100 "
        "\\[default: segm AP, or bbox AP when segm is not evaluated]."), show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No tables or progress; warnings and errors only.")
                     ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging (pycocotools' own output too).")
                       ] = False,
) -> None:
    """COCO bbox and segm AP (pycocotools' COCOeval) of a results file, or of a model run over ANN's images."""
    from .console import setup_logging
    from .errors import Interrupted

    setup_logging(quiet=quiet, verbose=verbose)
    if (results is None) == (images is None):
        raise typer.BadParameter("give --results FILE, or --images DIR to run a model (one of them)",
                                 param_hint="--results / --images")
    if results is not None and (weights is not None or model is not None):
        raise typer.BadParameter("--weights and --model run a model: use them with --images, not --results",
                                 param_hint="--weights / --model")
    config = cfg.EvalConfig(
        iou_types=tuple(t.strip().lower() for t in iou_type.split(",") if t.strip()),
        max_dets=max_dets, fail_under=fail_under, fail_metric=fail_metric,
        predict=replace(_P, batch_size=cfg.parse_batch_size(batch_size), overwrite=overwrite, model=replace(
            _M, name=model or _M.name, weights=str(weights) if weights else None, device=device,
            score_thresh=score_thresh, max_dets=max_dets, min_size=min_size, max_size=max_size)),
    )
    from .evaluation import evaluate

    progress = stop = None
    caught: list[int] = []
    if images is not None:
        from .console import LogProgress, RichProgress, install_stop_handlers

        progress = None if quiet else RichProgress() if sys.stderr.isatty() else LogProgress()
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
    from .atomic import atomic_write_bytes
    from .errors import OutputError

    if json_file is not None:
        try:
            atomic_write_bytes(json_file, report.to_json().encode())
        except OSError as exc:
            raise OutputError(f"{json_file}: cannot write: {exc.strerror}") from None
    if plot is not None:
        from .evaluate_plot import plot_pr_curves

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
