"""Options more than one command takes, defined once: their help, metavar and help panel.

Each alias carries everything but the default, which the command gives from ``config.py``
(``model: Model = ModelConfig().name``). Where a command must tell "not given" from the default
(eval's --model, train's --device), it uses the ``Optional`` alias of the same option.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import config as cfg

# Help panels, in the order the commands list their options.
INPUTS = "Inputs"
MODEL = "Model"
THRESHOLDS = "Thresholds"
OUTPUTS = "Outputs"
RUN = "Run and scale"
TRAINING = "Training"
AUGMENTATION = "Augmentation"

_MODEL = cfg.ModelConfig()

MODEL_OPTION = typer.Option(
    "--model", metavar="NAME", rich_help_panel=MODEL, show_default=False,
    help="Architecture: maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2, small, or demo (the bundled "
         "fruits-and-nuts model, offline; not for train); `maskseg models` lists them "
         f"\\[default: {cfg.DEFAULT_MODEL}].")
DEVICE_OPTION = typer.Option(
    "--device", metavar="DEVICE", rich_help_panel=RUN, show_default=False,
    help=f"auto (GPU if present), cpu, cuda or cuda:N \\[default: {_MODEL.device}].")

Model = Annotated[str, MODEL_OPTION]
OptionalModel = Annotated[Optional[str], MODEL_OPTION]  # noqa: UP045 - Typer needs Optional here
Device = Annotated[str, DEVICE_OPTION]
OptionalDevice = Annotated[Optional[str], DEVICE_OPTION]  # noqa: UP045
Weights = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    metavar="PATH", rich_help_panel=MODEL,
    help="Local weights: a torchvision state dict as it is, or a maskseg checkpoint (carries its classes); "
         "for `predict --backend onnxruntime|openvino` an .onnx file, for `--backend tensorflow` a SavedModel folder. "
         "Default: torchvision's COCO weights (downloaded once into the torch cache).")]
Precision = Annotated[str, typer.Option(
    metavar="NAME", rich_help_panel=RUN,
    help="auto: bf16 where the hardware runs it natively (a CPU with AMX-BF16 or AVX512-BF16, a CUDA GPU with "
         "bf16), else fp32; fp32; bf16 (on the CPU the network in bf16, boxes and masks in float32); fp16 (CUDA). "
         "Outputs differ slightly from fp32 (README: Precision); run.json records the one used.")]
MinSize = Annotated[Optional[int], typer.Option(  # noqa: UP045
    min=32, metavar="PX", rich_help_panel=MODEL,
    help="Resize the short side to this (default: the model's, 800 for torchvision's); train and export "
         "store it with the model for predict.")]
MaxSize = Annotated[Optional[int], typer.Option(  # noqa: UP045
    min=32, metavar="PX", rich_help_panel=MODEL,
    help="Cap the long side at this (default: the model's, 1333 for torchvision's).")]

ScoreThresh = Annotated[float, typer.Option(
    min=0.0, max=1.0, metavar="P", rich_help_panel=THRESHOLDS, help="Keep detections scoring at least this.")]
MaskThresh = Annotated[float, typer.Option(
    min=0.0, max=1.0, metavar="P", rich_help_panel=THRESHOLDS, help="Mask probability threshold.")]
MaxDets = Annotated[int, typer.Option(
    min=1, metavar="N", rich_help_panel=THRESHOLDS, help="At most this many detections per image.")]

MaxPixels = Annotated[int, typer.Option(
    min=1, metavar="N", rich_help_panel=INPUTS, help="Refuse images with more pixels (decompression bombs).")]
BatchSize = Annotated[str, typer.Option(
    metavar="N|auto", rich_help_panel=RUN,
    help="Images per forward pass, or auto: 1 on a CPU (fastest there), on a GPU as many as half its free "
         "memory holds, up to 8.")]
Overwrite = Annotated[bool, typer.Option(
    metavar="", rich_help_panel=OUTPUTS, help="Discard OUT's earlier results and start afresh.")]
# No panel: these two join -h/--help in the general "Options" panel every command shows first.
Quiet = Annotated[bool, typer.Option(
    "-q", "--quiet", metavar="", help="Warnings and errors only: no progress, tables or summary.")]
Verbose = Annotated[bool, typer.Option(
    "-v", "--verbose", metavar="", help="Debug logging (eval: pycocotools' own output too).")]


def model_config(model: str, weights: Path | str | None, *, base: cfg.ModelConfig = _MODEL,
                 **fields: Any) -> cfg.ModelConfig:
    """The ModelConfig the model options describe: ``base`` with ``name``, ``weights`` (as str) and ``fields``."""
    return replace(base, name=model, weights=str(weights) if weights else None, **fields)


def comma_list(text: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; None or empty -> ``()``."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())
