"""Model names -> torchvision Mask R-CNN builders + weights; checkpoints; device choice.

Like torchvision's weights enums, a model name carries what it needs: the builder, where its default
weights come from and its category names. Weights are loaded with ``torch.load(weights_only=True)``
only: a weights file never runs code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .detections import Category
from .errors import UsageError, WeightsError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "maskseg.checkpoint"


@dataclass(frozen=True)
class ModelSpec:
    """A model name: how to build it and where its default weights live."""

    name: str
    description: str
    build: Callable[..., Any]
    default_weights: Callable[[], Any] | None = None


@dataclass
class LoadedModel:
    """A ready-to-run network (eval mode, on ``device``) and the categories its labels mean."""

    name: str
    module: Any  # torchvision.models.detection.MaskRCNN
    categories: list[Category]
    device: Any  # torch.device
    weights_source: str
    channels_last: bool = False
    extra: dict = field(default_factory=dict)

    def category_id(self, label: int) -> int:
        return self._by_label().get(label, (label, f"class_{label}"))[0]

    def category_name(self, label: int) -> str:
        return self._by_label().get(label, (label, f"class_{label}"))[1]

    def _by_label(self) -> dict[int, tuple[int, str]]:
        cached = self.extra.get("_by_label")
        if cached is None:
            cached = {c.label: (c.id, c.name) for c in self.categories}
            self.extra["_by_label"] = cached
        return cached


def _build_resnet50_fpn(num_classes: int, **kwargs: Any) -> Any:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def _build_resnet50_fpn_v2(num_classes: int, **kwargs: Any) -> Any:
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def build_small(
    num_classes: int,
    *,
    trunk: str = "resnet18",
    fpn_channels: int = 128,
    representation: int = 256,
    mask_convs: int = 2,
    norm: str = "group",
    **kwargs: Any,
) -> Any:
    """A lighter Mask R-CNN (ResNet-18/34 trunk, narrow FPN and heads) that trains from scratch on CPU.

    ``norm="group"`` uses GroupNorm so the trunk can learn without pretrained statistics;
    ``"frozen"`` uses torchvision's FrozenBatchNorm2d (fast, for random test models).
    """
    import torch.nn as nn
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import FrozenBatchNorm2d

    if trunk not in ("resnet18", "resnet34"):
        raise UsageError(f"small model trunk must be resnet18 or resnet34, not {trunk!r}")

    def group_norm(channels: int) -> nn.Module:
        return nn.GroupNorm(min(32, channels // 4), channels)

    norm_layer = group_norm if norm == "group" else FrozenBatchNorm2d
    body = getattr(torchvision.models, trunk)(weights=None, norm_layer=norm_layer)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512],
        out_channels=fpn_channels,
    )
    c = fpn_channels
    return MaskRCNN(
        backbone,
        num_classes=None,
        box_head=TwoMLPHead(c * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
        mask_head=MaskRCNNHeads(c, [c] * mask_convs, 1),
        mask_predictor=MaskRCNNPredictor(c, c, num_classes),
        **kwargs,
    )


def _coco_v1() -> Any:
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return MaskRCNN_ResNet50_FPN_Weights.COCO_V1


def _coco_v1_v2() -> Any:
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

    return MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1


MODELS: dict[str, ModelSpec] = {
    "maskrcnn_resnet50_fpn": ModelSpec(
        "maskrcnn_resnet50_fpn", "torchvision Mask R-CNN, ResNet-50 FPN (COCO box AP 37.9, mask AP 34.6)",
        _build_resnet50_fpn, _coco_v1),
    "maskrcnn_resnet50_fpn_v2": ModelSpec(
        "maskrcnn_resnet50_fpn_v2", "torchvision Mask R-CNN v2, ResNet-50 FPN (COCO box AP 47.4, mask AP 41.8)",
        _build_resnet50_fpn_v2, _coco_v1_v2),
    "small": ModelSpec(
        "small", "maskseg's light Mask R-CNN (ResNet-18 FPN, narrow heads); needs --weights", build_small),
    "demo": ModelSpec(
        "demo", "bundled demo (small, trained on fruits_nuts: date, fig, hazelnut); works offline", build_small),
}

DEMO_MODEL = "demo"
DEMO_WEIGHTS = Path(__file__).resolve().parent / "data" / "demo_fruits_nuts.pt"


def coco_categories() -> list[Category]:
    """torchvision's 91-slot COCO layout (index = COCO category id), without the N/A gaps."""
    names = _coco_v1().meta["categories"]
    return [Category(i, i, n) for i, n in enumerate(names) if i > 0 and n != "N/A"]


def resolve_device(spec: str) -> Any:
    """``auto`` -> the first GPU when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as named."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) present")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    return device


def read_weights_file(path: str | Path) -> dict:
    """Load a weights file safely (``weights_only=True``); refuse pickles that carry code."""
    import pickle
    import zipfile

    import torch

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{path}: weights file not found")
    # mmap avoids a second in-memory copy, but only the zip format (torch >= 1.6) supports it.
    use_mmap = zipfile.is_zipfile(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln]
        detail = lines[0][:200] if lines else type(exc).__name__
        raise WeightsError(
            f"{path}: refused: not a file of plain tensors; a safe load (weights_only=True) stopped at "
            f"'{detail}'. Weights files must not carry Python objects, which could run code"
        ) from None
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict or a maskseg checkpoint, found {type(obj).__name__}")
    return obj


def state_dict_of(obj: dict, path: str) -> dict:
    import torch

    if obj.get("format") == CHECKPOINT_FORMAT:
        return _dequantized(obj) if "int8" in obj else obj["state_dict"]
    for key in ("model", "state_dict", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise WeightsError(f"{path}: no model state dict found (keys: {', '.join(list(obj)[:8])})")


def _dequantized(obj: dict) -> dict:
    """A compact checkpoint (``maskseg.training.export_int8``) -> float32 state dict: int8 weights times
    their per-output-channel scales, the float16 rest widened."""
    import torch

    state = {k: v.float() if v.is_floating_point() else v for k, v in obj["state_dict"].items()}
    for name, q in obj["int8"].items():
        scale = obj["int8_scales"][name].float()
        state[name] = q.float() * scale.view(-1, *[1] * (q.ndim - 1))
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}


def num_classes_in(state: dict, path: str) -> int:
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise WeightsError(f"{path}: not a Mask R-CNN state dict (no {key})")
    return int(state[key].shape[0])


def default_weights_file(spec: ModelSpec) -> tuple[dict, str]:
    """torchvision's COCO weights: the torch hub cache if present, else downloaded into it."""
    import torch

    weights = spec.default_weights()
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cache.is_file():
        return read_weights_file(cache), str(cache)
    try:
        log.info("downloading %s into %s", weights.url, cache.parent)
        state = torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True,
                                                   weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"no weights for {spec.name}: could not download {weights.url} ({type(exc).__name__}). "
            f"Fetch that file on a machine with internet and put it at {cache}, or pass --weights FILE "
            f"(or --model demo: the bundled demo model, dates/figs/hazelnuts only)"
        ) from None
    return state, str(cache)


def import_torchvision() -> Any:
    """``import torchvision`` (with its detection models and ops) without importing ``torch._dynamo``.

    torchvision's ``ops.roi_align`` imports ``torch._dynamo.utils`` at module level for one function,
    ``is_compile_supported``, called only where torchvision's compiled ops are missing (or under
    deterministic CUDA). That import pulls in dynamo, inductor, sympy and triton: ~150 MiB of RSS
    here (torch 510 MiB, torchvision then 677 MiB; 527 MiB without it), for code inference never runs.
    So, for the length of the import only, ``torch._dynamo.utils`` is a stand-in whose
    ``is_compile_supported`` imports the real one when called; afterwards the stand-in is gone and
    ``torch._dynamo`` (``torch.compile``, ``--compile``) imports as usual. Already imported (or a
    torchvision that wants more from it): the plain import.
    """
    import sys
    import types

    if "torchvision" in sys.modules or "torch._dynamo" in sys.modules:
        return _torchvision_modules()
    import torch  # noqa: F401  (the real package first: the stand-ins sit inside it)

    def is_compile_supported(device_type: Any) -> Any:
        from torch._dynamo.utils import is_compile_supported as real

        return real(device_type)

    package = types.ModuleType("torch._dynamo")
    package.__path__ = []
    utils = types.ModuleType("torch._dynamo.utils")
    utils.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
    stand_ins = {"torch._dynamo": package, "torch._dynamo.utils": utils}
    sys.modules.update(stand_ins)
    try:
        return _torchvision_modules()
    except Exception:  # it wanted more than the stand-in has (an import or an attribute): the plain way, below
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    finally:
        _drop(stand_ins)
    return _torchvision_modules()


def _torchvision_modules() -> Any:
    """``torchvision`` with the submodules maskseg's models use imported."""
    import torchvision
    import torchvision.models.detection
    import torchvision.ops

    return torchvision


def _skip_meta_normal_init() -> Any:
    """A torch function mode in which ``torch.nn.init``'s functions and ``Tensor.normal_`` leave a meta
    tensor as it is.

    A meta tensor has no values to fill, but torch's meta ``normal_`` (under the ``kaiming_normal_`` and
    ``normal_`` inits of torchvision's constructors) runs through ``torch._refs``, which imports
    ``torch._dynamo`` on first use (~150 MiB of RSS; see ``import_torchvision``). Weights are assigned
    after the build and any tensor left on meta is refused, so skipping the init changes nothing.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipMetaNormal(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            init = func is torch.Tensor.normal_ or getattr(func, "__module__", None) == "torch.nn.init"
            tensor = args[0] if args else (kwargs or {}).get("tensor")  # nn.init passes it by keyword
            if init and getattr(tensor, "is_meta", False):
                return tensor
            return func(*args, **(kwargs or {}))

    return SkipMetaNormal()


def _drop(stand_ins: dict[str, Any]) -> None:
    import sys

    for name, module in stand_ins.items():
        if sys.modules.get(name) is module:
            del sys.modules[name]


def load_model(config: ModelConfig) -> LoadedModel:
    """Build the network named by ``config`` and load its weights, ready for inference.

    A maskseg checkpoint names its own architecture, categories and input size; a plain torchvision
    state dict is loaded into ``config.name``'s architecture with as many classes as it holds.
    """
    import_torchvision()
    import torch

    device = resolve_device(config.device)
    checkpoint: dict = {}
    if config.weights:
        obj = read_weights_file(config.weights)
        state = state_dict_of(obj, config.weights)
        source = config.weights
        if obj.get("format") == CHECKPOINT_FORMAT:
            checkpoint = obj
    else:
        spec = _spec(config.name)
        if spec.name == DEMO_MODEL:
            checkpoint = read_weights_file(DEMO_WEIGHTS)
            state, source = state_dict_of(checkpoint, str(DEMO_WEIGHTS)), f"{DEMO_WEIGHTS} (bundled demo)"
        elif spec.default_weights is None:
            raise WeightsError(f"model {config.name} has no published weights; pass --weights FILE")
        else:
            state, source = default_weights_file(spec)

    name = checkpoint.get("arch", {}).get("name", config.name) if checkpoint else config.name
    spec = _spec(name)
    arch_kwargs = dict(checkpoint.get("arch", {}).get("kwargs", {})) if checkpoint else {}
    num_classes = num_classes_in(state, source)
    build_kwargs: dict[str, Any] = {
        "box_score_thresh": config.score_thresh,
        "box_detections_per_img": config.max_dets,
    }
    min_size = config.min_size or checkpoint.get("min_size")
    max_size = config.max_size or checkpoint.get("max_size")
    if min_size:
        build_kwargs["min_size"] = int(min_size)
    if max_size:
        build_kwargs["max_size"] = int(max_size)
    # Built on the meta device and filled with assign=True: no random init, no second copy of the weights.
    with torch.device("meta"), _skip_meta_normal_init():
        module = spec.build(num_classes, **arch_kwargs, **build_kwargs)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        detail = lines[0][:300] if lines else str(exc)[:300]
        raise WeightsError(f"{source}: the weights do not fit {name} with {num_classes} classes ({detail})") from None
    del state
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise WeightsError(f"{source}: the weights leave {', '.join(leftover[:3])} unset")
    module.eval()
    channels_last = config.channels_last and device.type == "cpu"
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    module = module.to(device)
    categories = _categories(checkpoint, num_classes)
    log.info("model %s (%d classes) with weights %s on %s", name, num_classes, source, device)
    # The checkpoint's metadata only: a weight tensor kept here (a compact checkpoint's int8 weights) would
    # keep the whole file mapped from torch.load(mmap=True), resident (13.5 MiB for the demo model).
    return LoadedModel(name, module, categories, device, source, channels_last, {"checkpoint": {
        k: v for k, v in checkpoint.items() if k not in _WEIGHT_KEYS}})


_WEIGHT_KEYS = ("state_dict", "int8", "int8_scales", "optimizer", "scheduler")


def _categories(checkpoint: dict, num_classes: int) -> list[Category]:
    if checkpoint.get("categories"):
        return [Category(int(c["label"]), int(c["id"]), str(c["name"])) for c in checkpoint["categories"]]
    if num_classes == 91:
        return coco_categories()
    return [Category(i, i, f"class_{i}") for i in range(1, num_classes)]


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def save_checkpoint(
    path: str | Path,
    module: Any,
    *,
    arch: str,
    arch_kwargs: dict | None = None,
    categories: list[Category],
    min_size: int | None = None,
    max_size: int | None = None,
    extra: dict | None = None,
) -> None:
    """Write a maskseg checkpoint atomically: state dict + what predict needs to use it unaided."""
    import torch
    import torchvision

    from .atomic import atomic_write_with

    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "arch": {"name": arch, "kwargs": dict(arch_kwargs or {})},
        "categories": [{"label": c.label, "id": c.id, "name": c.name} for c in categories],
        "min_size": min_size,
        "max_size": max_size,
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        **(extra or {}),
    }
    atomic_write_with(Path(path), lambda fh: torch.save(payload, fh))
