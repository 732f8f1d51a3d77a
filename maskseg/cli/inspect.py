"""`maskseg inspect IMAGE`: options -> config -> one ``inspect_image`` call -> table, JSON, dump, pictures."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .. import config as cfg
from .options import (
    OUTPUTS,
    Device,
    MaskThresh,
    MaxDets,
    MaxPixels,
    MaxSize,
    MinSize,
    Model,
    Quiet,
    ScoreThresh,
    Verbose,
    Weights,
    model_config,
)

if TYPE_CHECKING:
    from ..inspection import StageOutputs

log = logging.getLogger("maskseg")

_M = cfg.ModelConfig()
_P = cfg.PredictConfig()
TRAINING_VIEW = "Training view"


def inspect_command(
    image: Annotated[Path, typer.Argument(
        metavar="IMAGE", show_default=False, help="One image file (any format predict reads).")],
    max_pixels: MaxPixels = _P.max_pixels,
    model: Model = _M.name,
    weights: Weights = None,
    min_size: MinSize = None,
    max_size: MaxSize = None,
    score_thresh: ScoreThresh = _M.score_thresh,
    mask_thresh: MaskThresh = _P.mask_thresh,
    max_dets: MaxDets = _M.max_dets,
    targets: Annotated[Optional[Path], typer.Option(  # noqa: UP045 - Typer needs Optional here
        metavar="ANN", rich_help_panel=TRAINING_VIEW,
        help="A COCO annotation file holding this image (matched by file name): adds the training-time view "
             "(anchor labels, samples, regression and mask targets, losses).")] = None,
    seed: Annotated[int, typer.Option(
        metavar="N", rich_help_panel=TRAINING_VIEW, help="Seed of the samplers in the --targets view.")] = 0,
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "-o", "--out", metavar="DIR", rich_help_panel=OUTPUTS,
        help="Folder for the pictures, inspect.json and tensors.npz (created).")] = None,
    json_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--json", metavar="FILE", rich_help_panel=OUTPUTS, show_default=False,
        help="Write every stage (shapes, dtypes, stats, facts) as JSON here (default with -o: OUT/inspect.json).")
    ] = None,
    dump: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="FILE", rich_help_panel=OUTPUTS, show_default=False,
        help="Write the tensors themselves as .npz here (default with -o: OUT/tensors.npz).")] = None,
    top: Annotated[int, typer.Option(
        min=1, metavar="N", rich_help_panel=OUTPUTS,
        help="Keep at most this many proposals, RoIs and detections per array in the dump and the proposal "
             "picture.")] = 100,
    device: Device = _M.device,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run one image through Mask R-CNN stage by stage, showing each tensor's shape, dtype and min/mean/max.

    The stages: transform, backbone + FPN, RPN, proposals, RoI heads, masks.
    With -o, also pictures of each stage, the JSON and the tensors.
    The final detections are predict's for the same settings.
    """
    from ..inspection import inspect_image
    from .progress import setup_logging

    setup_logging(quiet=quiet, verbose=verbose)
    model_settings = model_config(model, weights, device=device, score_thresh=score_thresh, max_dets=max_dets,
                                  min_size=min_size, max_size=max_size)
    result = inspect_image(image, model_settings, mask_thresh=mask_thresh, top=top, targets=targets, seed=seed,
                           max_pixels=max_pixels)
    if not quiet:
        print_tables(result)
    json_file = json_file or (out / "inspect.json" if out else None)
    dump = dump or (out / "tensors.npz" if out else None)
    written = []
    if json_file:
        written.append(result.save_json(json_file))
    if dump:
        written.append(result.save_npz(dump))
    if out:
        from ..inspection import draw_all

        written += draw_all(result, out, proposals=top)
    for path in written:
        log.info("wrote %s", path)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def print_tables(result: StageOutputs, console: Any = None) -> None:
    """The stages as rich tables: one row per tensor, the facts that explain them under each."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=160)
    inp = result.input
    (oh, ow), (rh, rw), (ph, pw) = inp.original_size, inp.resized_size, inp.padded_size
    scale = f", scale factor {inp.scale_factor:.4g}" if inp.scale_factor else ""
    console.print(f"[bold]{result.image}[/bold]: {result.model} ({result.weights}) on {result.device}; "
                  f"{ow}x{oh} -> resized {rw}x{rh} -> padded batch {pw}x{ph}{scale} "
                  f"(min_size {inp.min_size}, max_size {inp.max_size})", highlight=False)
    for stage in result.all_stages():
        table = Table(title=stage.title, title_justify="left", title_style="bold", show_lines=False)
        for col, just in (("tensor", "left"), ("shape", "left"), ("dtype", "left"), ("min", "right"),
                          ("mean", "right"), ("max", "right"), ("note", "left")):
            table.add_column(col, justify=just, overflow="fold")
        for r in stage.rows:
            if r.shape == ():  # a scalar (the losses): its value once
                table.add_row(r.name, _shape(r.shape), r.dtype, "", _num(r.mean), "", r.note)
            else:
                table.add_row(r.name, _shape(r.shape), r.dtype, _num(r.min), _num(r.mean), _num(r.max), r.note)
        console.print(table)
        if stage.key == "rpn":
            console.print(_levels_table(result))
        facts = {k: v for k, v in stage.facts.items() if k not in ("per_level",)}
        if facts:
            console.print("  " + "; ".join(f"{k} {_fact(v)}" for k, v in facts.items()), style="dim",
                          highlight=False)
    if result.targets is not None and result.targets.skipped:
        for line in result.targets.skipped:
            console.print(f"  skipped {line}", style="dim", highlight=False)


def _fact(v: Any) -> str:
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fact(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fact(x) for x in v) + ")"
    return str(v)


def _levels_table(result: StageOutputs) -> Any:
    from rich.table import Table

    table = Table(title="FPN levels: anchors and proposals", title_justify="left", title_style="bold")
    for col in ("level", "key", "stride", "anchor step", "features", "anchors/loc", "anchors", "sizes", "ratios",
                "top-k pre-NMS", "after NMS", "proposals", "RoIs pooled"):
        table.add_column(col, justify="left" if col in ("level", "key", "features", "sizes", "ratios") else "right")
    for lv in result.levels:
        step = str(lv.anchor_step[0]) if lv.anchor_step[0] == lv.anchor_step[1] else _fact(lv.anchor_step)
        table.add_row(lv.name, repr(lv.key), str(lv.stride), step, _shape(lv.feature_shape),
                      str(lv.anchors_per_location), str(lv.anchor_count), _fact(lv.anchor_sizes),
                      _fact(lv.aspect_ratios), str(lv.pre_nms), str(lv.after_nms), str(lv.proposals), str(lv.rois))
    return table
