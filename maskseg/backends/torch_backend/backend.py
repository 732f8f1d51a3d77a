"""The torchvision backend: torchvision's own chain (transform -> backbone -> rpn -> roi_heads), stopped
before ``transform.postprocess`` so masks can be pasted box-locally instead of as full-image floats."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...config import ModelConfig
from ...models import LoadedModel, load_model, resolve_device
from ..base import RawDetections

log = logging.getLogger(__name__)

class TorchBackend:
    """A ``LoadedModel`` run under inference mode; boxes are mapped back to original-image pixels.

    ``precision``: ``fp32``; ``bf16`` (on the CPU the network in bf16 with bf16 weights, ``bf16.to_bf16``;
    on CUDA autocast) or ``fp16`` (CUDA autocast).
    """

    def __init__(self, loaded: LoadedModel, *, release_memory: bool = False, precision: str = "fp32") -> None:
        self.loaded = loaded
        self.release_memory = release_memory
        self.precision = precision
        self.name = loaded.name
        self.categories = loaded.categories
        self.device = loaded.device
        from .roi_pools import pools_read_channels_last

        # torchvision's RoIAlign reads NCHW: channels_last pyramids are converted once per image for it.
        self._pools_need_nchw = loaded.channels_last and not pools_read_channels_last(loaded.module.roi_heads)
        self._cpu_bf16 = precision == "bf16" and self.device.type == "cpu"

    @classmethod
    def load(cls, config: ModelConfig) -> TorchBackend:
        """Load the model and apply ``backends.torch_backend.optimize``'s inference rewrites (same results,
        faster), then, for bf16 on the CPU, ``bf16.to_bf16``.

        Done here rather than in ``load_model``, whose plain torchvision module training, inspection
        and export need. ``config.precision`` may be ``auto``: resolved here for this device."""
        from ...precision import bf16_hint, resolve_precision

        device = resolve_device(config.device)
        precision = resolve_precision(config.precision, backend="torch", device_type=device.type,
                                      cuda_bf16=cuda_supports_bf16(device))
        loaded = load_model(config)  # first: it imports torchvision without torch._dynamo, before optimize does
        from .optimize import prepare_for_inference

        applied = prepare_for_inference(loaded.module, loaded.device, threads=config.threads)
        if precision.name == "bf16" and device.type == "cpu":
            from .bf16 import to_bf16

            applied += to_bf16(loaded.module)
        if config.compile:
            import torch

            # Static shapes: each new input size compiles once (tens of seconds on a CPU), then runs from cache.
            loaded.module.backbone = torch.compile(loaded.module.backbone, dynamic=False)
            applied.append("backbone compiled (torch.compile) at its first image of each size")
        loaded.extra["optimizations"] = applied
        loaded.extra["precision"] = precision.name
        log.info("inference rewrites: %s", "; ".join(applied) or "none")
        log.info("precision %s (%s)", precision.name, precision.reason)
        hint = bf16_hint(precision, device.type)
        if hint:
            log.info(hint)
        return cls(loaded, release_memory=True, precision=precision.name)

    @property
    def num_classes(self) -> int:
        return int(self.loaded.module.roi_heads.box_predictor.cls_score.out_features)

    def to_tensors(self, images: Sequence[np.ndarray]) -> list[Any]:
        """[H, W, 3] uint8 RGB arrays -> [3, H, W] float tensors in [0, 1] on the model's device."""
        import torch

        out = []
        for rgb in images:
            t = torch.from_numpy(rgb)
            if self.device.type == "cuda":  # uint8 goes up (4x less than float), from pinned memory, async
                t = t.pin_memory().to(self.device, non_blocking=True)
            out.append(t.permute(2, 0, 1).float().div_(255.0))
        return out

    def _backbone(self, backbone: Any, x: Any) -> Any:
        """``backbone(x)``; for torchvision's BackboneWithFPN the trunk and the FPN are run apart, with
        freed memory handed back after each (the largest transients of the whole pass)."""
        from torchvision.models.detection.backbone_utils import BackboneWithFPN

        if not self.release_memory or type(backbone) is not BackboneWithFPN:
            return backbone(x)
        features = backbone.body(x)
        self._release()
        features = backbone.fpn(features)
        self._release()
        return features

    def _release(self) -> None:
        """Hand memory freed by the pass back to the OS (``optimize.release_freed_memory``): without it
        glibc keeps the holes the activations leave resident, and peak RSS ran ~250 MB higher."""
        if self.release_memory:
            from .optimize import release_freed_memory

            release_freed_memory()

    def infer(self, images: Sequence[np.ndarray]) -> list[RawDetections]:
        """torchvision's chain, with the RoI heads run by ``optimize.roi_heads_inference`` (what
        ``roi_heads`` returns in eval mode, lighter); boxes mapped back to original-image pixels."""
        import torch
        from torchvision.models.detection.transform import resize_boxes

        from .optimize import roi_heads_inference
        from .roi_pools import to_nchw

        if not images:
            return []
        net = self.loaded.module
        with torch.inference_mode(), self._autocast():
            tensors = self.to_tensors(images)
            original_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
            batch, _ = net.transform(tensors)
            del tensors
            if self.loaded.channels_last:
                batch.tensors = batch.tensors.contiguous(memory_format=torch.channels_last)
            if self._cpu_bf16:  # normalised in float32 by the transform, then the network in bf16
                batch.tensors = batch.tensors.to(torch.bfloat16)
            features = self._backbone(net.backbone, batch.tensors)
            proposals, _ = net.rpn(batch, features)
            if self._cpu_bf16:
                from .bf16 import features_to_float

                features = features_to_float(features)
            if self._pools_need_nchw:  # each level converted once, for both heads
                features = {k: to_nchw(v) for k, v in features.items()}
            image_sizes = batch.image_sizes
            del batch
            raw = roi_heads_inference(net.roi_heads, features, proposals, image_sizes)
            del features, proposals
        self._release()
        out = []
        for r, resized, original in zip(raw, image_sizes, original_sizes, strict=True):
            # To the CPU in one copy per tensor (the box-local paste then costs no GPU round trips), float32.
            masks = r.get("masks")
            out.append(RawDetections(
                boxes=resize_boxes(r["boxes"].float(), resized, original).cpu(),
                scores=r["scores"].float().cpu(),
                labels=r["labels"].cpu(),
                masks=masks[:, 0].float().cpu() if masks is not None else None,
                mask_layout="roi",
            ))
        return out

    def _autocast(self) -> Any:
        """Mixed precision on CUDA when asked for (``--precision fp16|bf16``); nothing otherwise."""
        import torch

        if self.precision not in ("fp16", "bf16") or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)


def cuda_supports_bf16(device: Any) -> bool:
    """Whether ``device`` is a CUDA GPU that runs bf16 (False for the CPU)."""
    if device.type != "cuda":
        return False
    import torch

    return bool(torch.cuda.is_bf16_supported())
