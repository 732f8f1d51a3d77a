"""`maskseg merge`: options -> one library call (``maskseg.merge.merge_outputs``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from .options import OUTPUTS, Overwrite, Quiet, Verbose

log = logging.getLogger("maskseg")


def merge_command(
    inputs: Annotated[list[Path], typer.Argument(
        help="Output folders of `maskseg predict --shard K/N` runs (or any maskseg outputs that do not overlap).",
        metavar="DIRS", show_default=False)],
    out: Annotated[Path, typer.Option(
        "-o", "--out", metavar="DIR", rich_help_panel=OUTPUTS, show_default=False,
        help="The merged output folder (created; merging again into it adds new images and keeps ids).")],
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Merge shard outputs into one OUT, with image and annotation ids as one unsharded run gives them.

    OUT gets one predictions.json / results.json, failures.jsonl, overlays/ and masks/.
    Refuses inputs made with other settings or classes, inputs that share an image, and OUT among them.
    """
    from ..merge import merge_outputs
    from .progress import setup_logging

    setup_logging(quiet=quiet, verbose=verbose)
    summary = merge_outputs(inputs, out, overwrite=overwrite)
    log.info("merged %d folders: %d records new, %d images, %d failed, %d files placed -> %s",
             summary.inputs, summary.added, summary.images, summary.failed_total, summary.files, summary.out_dir)
    if summary.failed_total:
        raise typer.Exit(3)
