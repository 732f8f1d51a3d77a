"""`maskseg export`: options -> ExportConfig -> one call of maskseg.export.export_onnx."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import config as cfg
from .options import (
    OUTPUTS,
    MaxDets,
    MaxSize,
    MinSize,
    Model,
    Quiet,
    ScoreThresh,
    Verbose,
    Weights,
    model_config,
)

log = logging.getLogger("maskseg")

_X = cfg.ExportConfig()
_M = cfg.ModelConfig()
CHECK = "Check"


def export_command(
    out: Annotated[Path, typer.Option(
        "-o", "--out", metavar="FILE", rich_help_panel=OUTPUTS, help="The model file to write (e.g. model.onnx).")],
    format: Annotated[str, typer.Option(
        "--format", metavar="NAME", rich_help_panel=OUTPUTS, help="Output format: onnx.")] = _X.format,
    opset: Annotated[int, typer.Option(
        min=17, metavar="N", rich_help_panel=OUTPUTS, help="ONNX opset (17 or newer).")] = _X.opset,
    model: Model = _M.name,
    weights: Weights = None,
    min_size: MinSize = None,
    max_size: MaxSize = None,
    score_thresh: ScoreThresh = _M.score_thresh,
    max_dets: MaxDets = _M.max_dets,
    check: Annotated[bool, typer.Option(
        metavar="", rich_help_panel=CHECK, help="Compare the export with torch before writing it.")] = _X.check,
    check_image: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045 - Typer needs Optional here
        metavar="FILE", rich_help_panel=CHECK,
        help="A real photo to run the export on and compare with torch (repeatable); default: "
             "sample_images/astronaut.png of a source checkout.")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Export a Mask R-CNN to ONNX, checked against torch on a real photo.

    Class names and input size go in its metadata.
    Run it with `maskseg predict --backend onnxruntime --weights OUT` (or `--backend openvino`).
    --score-thresh is the check's: predict feeds its own to the graph.
    """
    from ..export import export_onnx
    from .progress import setup_logging

    setup_logging(quiet=quiet, verbose=verbose)
    config = replace(_X, format=format, opset=opset, check=check,
                     check_images=tuple(str(p) for p in check_image or ()),
                     model=model_config(model, weights, min_size=min_size, max_size=max_size, max_dets=max_dets,
                                        score_thresh=score_thresh))
    report = export_onnx(out, config)
    checked = f"; checked on {len(report.checks)} photo(s), all within tolerance" if report.checks else "; not checked"
    log.info("wrote %s (%.1f MB, opset %d) in %.1f s%s", report.path, report.bytes / 1e6, report.opset,
             report.export_seconds + report.check_seconds, checked)
