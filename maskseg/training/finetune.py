"""Fine-tuning surgery: a model built for training from scratch, torchvision's weights or a file; new
predictors for another class count; frozen batch norm; which ResNet stages train."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import WeightsError
from ..models import CHECKPOINT_FORMAT, MODELS

log = logging.getLogger(__name__)

_RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


def build_for_training(name: str, weights: str | None, num_classes: int, arch_kwargs: dict,
                       size_kwargs: dict) -> tuple[Any, str, dict, str]:
    """(module, arch name, arch kwargs, weights source) ready to train with ``num_classes`` (background
    included). ``weights``: None (from scratch), ``"torchvision"`` (the model's COCO weights) or a file.
    Predictors are replaced when the weights' class count differs; torchvision's ResNet-50 models get
    FrozenBatchNorm2d when starting from weights (batch statistics of 2 images would ruin them)."""
    from ..models import default_weights_file, num_classes_in, read_weights_file, state_dict_of

    if weights is None:
        module = MODELS[name].build(num_classes, **arch_kwargs, **size_kwargs)
        return module, name, arch_kwargs, "from scratch"
    if weights == "torchvision":
        spec = MODELS[name]
        if spec.default_weights is None:
            raise WeightsError(f"model {name} has no published weights; train it from scratch or pass a file")
        state, source = default_weights_file(spec)
    else:
        obj = read_weights_file(weights)
        state, source = state_dict_of(obj, weights), weights
        if obj.get("format") == CHECKPOINT_FORMAT:
            name = obj["arch"]["name"]
            arch_kwargs = dict(obj["arch"]["kwargs"])
            for key in ("min_size", "max_size"):
                if obj.get(key) and key not in size_kwargs:
                    size_kwargs = {**size_kwargs, key: obj[key]}
    have = num_classes_in(state, source)
    module = MODELS[name].build(have, **arch_kwargs, **size_kwargs)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: the weights do not fit {name} ({str(exc).splitlines()[0][:200]})") from None
    if have != num_classes:
        replace_predictors(module, num_classes)
        log.info("%s: box and mask predictors replaced (%d classes -> %d)", source, have, num_classes)
    if name.startswith("maskrcnn_resnet50"):
        freeze_batch_norm(module)
    return module, name, arch_kwargs, source


def replace_predictors(module: Any, num_classes: int) -> None:
    """New box and mask predictors for ``num_classes`` (background included), as torchvision's
    fine-tuning tutorial does; their widths are read from the heads they sit on."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    heads = module.roi_heads
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    conv = heads.mask_predictor.conv5_mask
    heads.mask_predictor = MaskRCNNPredictor(conv.in_channels, conv.out_channels, num_classes)


def freeze_batch_norm(module: Any) -> None:
    """Swap every BatchNorm2d for a FrozenBatchNorm2d holding the same statistics and affine terms."""
    import torch.nn as nn
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)


def set_trainable(module: Any, layers: int, *, freeze_backbone: bool = False) -> None:
    """Train the top ``layers`` ResNet stages (layer4 first ... conv1 last) and freeze the others, as
    torchvision's ``trainable_backbone_layers``; ``freeze_backbone`` also freezes the FPN."""
    body = module.backbone.body
    trainable = set(_RESNET_STAGES[:0 if freeze_backbone else layers])
    for name, param in body.named_parameters():
        stage = "conv1" if name.startswith(("conv1", "bn1")) else name.split(".")[0]
        param.requires_grad_(stage in trainable)
    for param in module.backbone.fpn.parameters():
        param.requires_grad_(not freeze_backbone)
