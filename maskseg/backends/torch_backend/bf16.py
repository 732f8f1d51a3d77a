"""The bf16 inference path on the CPU: the network's arithmetic in bf16, its geometry in float32.

``to_bf16`` changes a model already prepared by ``optimize.prepare_for_inference`` (batch norms folded,
convolutions fused, RoI pools replaced) so that

- every convolution and linear of the backbone, FPN, RPN head, box head and mask head holds bf16
  weights, made once here (the fused oneDNN kernels take bf16 input and weights and run it on
  AMX/AVX512-BF16; ``torch.autocast`` would cast the weights again on every call and does not reach
  the fused kernels at all);
- what bf16 would spoil stays float32: anchors, box decoding, clipping, NMS and score thresholds (the
  RPN head's and the box predictor's outputs are float32), RoIAlign's sample coordinates and weights,
  the per-class mask logits and their sigmoid, the paste and RLE (bf16 keeps 8 mantissa bits: a
  coordinate near 1000 px would move by 4-8 px).

RoIAlign reads the bf16 pyramid made float32 once per image (``features_to_float``): MKL's sparse
product, which the fast pools use, has no bf16 kernel, and the conversion costs about 1% of a pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

BF16 = torch.bfloat16


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``value`` (a tensor, or lists/tuples/dicts of them) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _cast(v, dtype)) for k, v in value.items())
    return value


class Bf16Stage(nn.Module):
    """Runs ``module`` (its weights made bf16) on bf16 input; its outputs cast to ``out_dtype``
    (None: left in bf16, for a next stage that is bf16 too)."""

    def __init__(self, module: nn.Module, out_dtype: torch.dtype | None = torch.float32) -> None:
        super().__init__()
        self.module = module.to(BF16)
        self.out_dtype = out_dtype

    def forward(self, *args: Any) -> Any:
        out = self.module(*_cast(args, BF16))
        return out if self.out_dtype is None else _cast(out, self.out_dtype)


class Float32Anchors(nn.Module):
    """The RPN's anchor generator, fed float32 stand-ins of the feature maps: torchvision makes the
    anchors in the features' dtype, and bf16 anchors would be off by pixels. The stand-ins are
    zero-stride views of one scalar (shape and device only; no memory)."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, image_list: Any, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        stand_ins = [torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps]
        return self.generator(image_list, stand_ins)


def to_bf16(module: nn.Module) -> list[str]:
    """Make a prepared torchvision MaskRCNN (eval mode, on the CPU) run its network in bf16.

    The backbone (trunk and FPN) takes bf16 input (the caller casts the normalised batch) and gives
    bf16 features; the heads are wrapped in ``Bf16Stage``. Returns what was done, in words.
    """
    module.backbone.to(BF16)
    rpn = module.rpn
    rpn.head = Bf16Stage(rpn.head)
    if type(rpn.anchor_generator) is not Float32Anchors:
        rpn.anchor_generator = Float32Anchors(rpn.anchor_generator)
    heads = module.roi_heads
    heads.box_head = Bf16Stage(heads.box_head)
    if heads.mask_head is not None:
        heads.mask_head = Bf16Stage(heads.mask_head, out_dtype=None)
        predictor = heads.mask_predictor
        first = getattr(predictor, "conv5_mask", None)
        if isinstance(first, nn.Module):  # the 2x upsampling runs in bf16; the per-class logits in float32
            predictor.conv5_mask = Bf16Stage(first)
        else:
            heads.mask_predictor = Bf16Stage(predictor)
    return ["bf16 weights for the backbone, FPN, RPN head, box head and mask head (geometry in float32)"]


def features_to_float(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pyramid as float32 (same memory layout) for the RoI pools; float32 maps pass through."""
    return {k: v.float() if v.dtype == BF16 else v for k, v in features.items()}
