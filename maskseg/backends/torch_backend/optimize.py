"""Inference-only rewrites of a loaded torchvision Mask R-CNN that keep its results.

- ``fold_batchnorm``: each BatchNorm (eval mode) or FrozenBatchNorm2d that follows a convolution is folded
  into that convolution's weights and bias (ResNet-50 has 53: one full read and write of a feature map each).
- ``fuse_convs``: on the CPU, convolution + ReLU, ResNet's convolution + residual add + ReLU and the FPN's
  lateral convolution + top-down add each run as one oneDNN call (the kernels ``torch.compile`` uses on
  CPU) instead of two or three passes over memory.
- ``fuse_box_head``: on the CPU, the box head's linear + ReLU pairs as oneDNN calls.
- RoI pools (``maskseg.roi_pools``): RoIAlign as sparse-matrix products over channels_last features, or
  torchvision's one-core CPU kernel over several threads.

``prepare_for_inference`` applies what fits the module and the device and returns what it applied.
The module is changed in place and is for inference only afterwards (no gradients, no training, no
export: ``maskseg.models.load_model`` alone gives the plain torchvision module).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from itertools import pairwise

# Imported only when the torch backend loads a model, never for `maskseg --help`.
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .roi_pools import use_fast_roi_pools

log = logging.getLogger(__name__)

# RoIs pooled for the box head at a time (``box_head_in_chunks``): 256 x 256 x 7 x 7 float32 is 12.8 MB.
BOX_POOL_CHUNK = 256


def prepare_for_inference(module: nn.Module, device: torch.device, *, threads: int | None = None) -> list[str]:
    """Apply the rewrites that fit ``module`` (torchvision MaskRCNN in eval mode) on ``device``.

    ``threads``: torch's intra-op threads (None keeps torch's default, one per core); the RoI pools
    use as many. Returns what was applied, in words, for the log.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    for p in module.parameters():
        p.requires_grad_(False)
    applied = []
    folded = fold_batchnorm(module)
    if folded:
        applied.append(f"{folded} batch norms folded into convs")
    if device.type == "cpu":
        fused = fuse_convs(module)
        if fused:
            applied.append(f"{fused} convs fused with their ReLU or add")
        if fuse_box_head(module):
            applied.append("box head linears fused with their ReLU")
        pools = use_fast_roi_pools(module, torch.get_num_threads())
        if pools:
            applied.append(pools)
        own_weights(module)
        release_freed_memory()
    log.debug("inference rewrites: %s", "; ".join(applied) or "none")
    return applied


def own_weights(module: nn.Module) -> None:
    """Give every parameter and buffer its own memory (ties kept).

    ``load_model`` maps the weights file (``torch.load(mmap=True)``); tensors left in that mapping keep
    the whole file mapped, and every page read from it counts in RSS (118 MB of a 178 MB file for
    ResNet-50, on top of the converted copies).
    """
    copies: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for store, as_param in ((m._parameters, True), (m._buffers, False)):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in copies:
                    data = t.detach().clone(memory_format=torch.preserve_format)
                    copies[id(t)] = nn.Parameter(data, requires_grad=False) if as_param else data
                store[name] = copies[id(t)]


def release_freed_memory() -> None:
    """Hand memory freed inside glibc's heaps back to the OS (``malloc_trim``); a no-op elsewhere.

    A forward pass frees hundreds of MB of activations of many sizes; glibc keeps most of it mapped,
    fragmented, so RSS grows image after image and the next pass peaks higher. Trimming once per batch
    kept peak RSS about 300 MB lower here at ~1% of the time (pages faulted in again). The alternative,
    a low fixed ``M_MMAP_THRESHOLD``, kept it lower still but cost ~10% in page faults.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)


# ---- conv + BatchNorm folding ---------------------------------------------------------------------

def _is_foldable_bn(m: nn.Module | None) -> bool:
    if isinstance(m, FrozenBatchNorm2d):
        return True
    return (isinstance(m, nn.BatchNorm2d) and not m.training and m.track_running_stats
            and m.running_mean is not None)


def _fold_into(conv: nn.Conv2d, bn: nn.Module) -> None:
    """conv <- bn(conv(.)): weights times s per output channel, bias (b - mean) * s + beta, with
    s = gamma / sqrt(var + eps); computed in float64, stored in the conv's dtype and memory format."""
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + float(bn.eps))
    w = conv.weight.detach()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    fmt = torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    new_w = (w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype).contiguous(memory_format=fmt)
    new_b = ((bias - bn.running_mean.detach().double()) * scale + beta).to(w.dtype)
    conv.weight = nn.Parameter(new_w, requires_grad=False)
    conv.bias = nn.Parameter(new_b, requires_grad=False)


def _runs_in_order(parent: nn.Module) -> bool:
    """Containers whose forward runs their children one after another, in registration order."""
    return isinstance(parent, (nn.Sequential, IntermediateLayerGetter))


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) child names of ``parent`` where the BN directly follows the conv.

    In containers run in order that is adjacency; in torchvision's ResNet blocks it is the
    ``convK``/``bnK`` naming their forward relies on.
    """
    children = parent._modules
    names = list(children)
    if _runs_in_order(parent):
        return [(a, b) for a, b in pairwise(names)
                if type(children[a]) is nn.Conv2d and _is_foldable_bn(children[b])]
    if type(parent) not in (Bottleneck, BasicBlock):
        return []
    return [(n, "bn" + n[4:]) for n in names
            if n.startswith("conv") and type(children[n]) is nn.Conv2d and _is_foldable_bn(children.get("bn" + n[4:]))]


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every inference-mode BatchNorm2d or FrozenBatchNorm2d that directly follows a Conv2d into
    it (the BN becomes Identity); returns how many were folded."""
    count = 0
    for parent in list(module.modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            _fold_into(parent._modules[conv_name], parent._modules[bn_name])
            parent._modules[bn_name] = nn.Identity()
            count += 1
    return count


# ---- conv + ReLU (+ residual) fusion on the CPU ---------------------------------------------------

def pointwise_conv_available() -> bool:
    """Whether this torch build has oneDNN's fused conv kernels and they agree with conv + ReLU."""
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 6, 6, generator=gen)
        w = torch.randn(4, 4, 3, 3, generator=gen)
        b = torch.randn(4, generator=gen)
        with torch.inference_mode():
            ref = F.relu(F.conv2d(x, w, b, padding=1))
            out = op(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            res = op.binary(x, x, w, b, [1, 1], [1, 1], [1, 1], 1, "add", None, "relu", [], "")
            ref_res = F.relu(F.conv2d(x, w, b, padding=1) + x)
        return bool(torch.allclose(out, ref, atol=1e-5) and torch.allclose(res, ref_res, atol=1e-5))
    except (RuntimeError, TypeError, AttributeError):
        return False


# What the fused oneDNN kernels take: float32, and bf16 with bf16 weights (``bf16.to_bf16``).
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class FusedConv2d(nn.Module):
    """``relu(conv(x) [+ residual])`` as one oneDNN call for float32 or bf16 CPU tensors (input and weights
    of one dtype) without autograd; the same thing in plain ops otherwise (another device, gradients on).

    ``inplace=True`` writes the result into ``residual`` (and returns it): one full-size allocation
    fewer, for callers that own ``residual`` and need it no more.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups, self.relu = list(conv.dilation), conv.groups, relu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, inplace: bool = False) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and x.dtype == self.weight.dtype \
                and not torch.is_grad_enabled():
            args = (self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if self.relu else "none", [], "")
            if inplace and residual.dtype == x.dtype:
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    residual, x, *args, "add", None, "relu" if self.relu else None, [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, *args, "add", None, "relu" if self.relu else None, [], "")
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            out = out + residual
        return F.relu(out) if self.relu else out


class FusedBottleneck(nn.Module):
    """torchvision's ResNet Bottleneck with its BNs folded: three fused convs, the last adds the skip.

    The skip is added in place into the downsample's output, or, for a block that is not the first
    of its stage, into the block's input: the previous block's output, which nothing else holds.
    """

    def __init__(self, block: Bottleneck, *, consume_input: bool = False) -> None:
        super().__init__()
        self.conv1 = FusedConv2d(block.conv1, relu=True)
        self.conv2 = FusedConv2d(block.conv2, relu=True)
        self.conv3 = FusedConv2d(block.conv3, relu=True)
        self.downsample = block.downsample
        self.consume_input = consume_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        inplace = self.downsample is not None or self.consume_input
        return self.conv3(self.conv2(self.conv1(x)), residual=identity, inplace=inplace)


class FusedBasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock with its BNs folded: two fused convs, the second adds the skip
    (in place, as in ``FusedBottleneck``)."""

    def __init__(self, block: BasicBlock, *, consume_input: bool = False) -> None:
        super().__init__()
        self.conv1 = FusedConv2d(block.conv1, relu=True)
        self.conv2 = FusedConv2d(block.conv2, relu=True)
        self.downsample = block.downsample
        self.consume_input = consume_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        inplace = self.downsample is not None or self.consume_input
        return self.conv2(self.conv1(x), residual=identity, inplace=inplace)


class FusedFPN(nn.Module):
    """torchvision's FeaturePyramidNetwork with each lateral 1x1 conv and its top-down add in one call;
    the same ops in the same order.

    It consumes its input: the dict is emptied and each level is let go as soon as it has been used,
    so at the finest level (the memory peak of the whole network) three full-resolution maps fewer are
    alive than in torchvision's forward.
    """

    def __init__(self, fpn: FeaturePyramidNetwork) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(FusedConv2d(_only_conv(b), relu=False) for b in fpn.inner_blocks)
        self.layer_blocks = fpn.layer_blocks
        self.extra_blocks = fpn.extra_blocks

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names, feats = list(x.keys()), list(x.values())
        x.clear()
        shapes = [f.shape[-2:] for f in feats]
        last_inner = self.laterals[-1](feats.pop())
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(shapes) - 2, -1, -1):
            top_down = F.interpolate(last_inner, size=shapes[idx], mode="nearest")
            del last_inner
            last_inner = self.laterals[idx](feats.pop(), residual=top_down, inplace=True)
            del top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        del last_inner
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, [], names)
        return OrderedDict(zip(names, results, strict=True))


def _only_conv(block: nn.Module) -> nn.Conv2d | None:
    """The one conv of a block that is a conv alone (a Sequential of it and Identities), else None."""
    if _plain_conv(block):
        return block
    if not isinstance(block, nn.Sequential):
        return None
    convs = [m for m in block if type(m) is not nn.Identity]
    return convs[0] if len(convs) == 1 and _plain_conv(convs[0]) else None


def _fusable_fpn(fpn: nn.Module) -> bool:
    """A torchvision FPN whose lateral blocks are 1x1 stride-1 convs alone (BNs, if any, folded) and
    whose extra block, if any, is Mask R-CNN's max pool (which reads only the FPN's own outputs)."""
    if type(fpn) is not FeaturePyramidNetwork or not (fpn.extra_blocks is None
                                                      or type(fpn.extra_blocks) is LastLevelMaxPool):
        return False
    convs = [_only_conv(b) for b in fpn.inner_blocks]
    return all(c is not None and tuple(c.kernel_size) == (1, 1) and tuple(c.stride) == (1, 1)
               and tuple(c.padding) == (0, 0) for c in convs)


def _plain_conv(m: nn.Module | None) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and m.weight.dtype == torch.float32)


def _folded_block(block: nn.Module, n_convs: int) -> bool:
    return type(getattr(block, "relu", None)) is nn.ReLU and all(
        _plain_conv(getattr(block, f"conv{i}", None)) and type(getattr(block, f"bn{i}", None)) is nn.Identity
        for i in range(1, n_convs + 1))


def _fuse_in_order(parent: nn.Module) -> int:
    """In a container run in order: a plain conv followed by ReLU (Identity between allowed) -> fused."""
    children = parent._modules
    names = list(children)
    count = 0
    for i, name in enumerate(names):
        if not _plain_conv(children[name]):
            continue
        j = i + 1
        while j < len(names) and type(children[names[j]]) is nn.Identity:
            j += 1
        if j < len(names) and type(children[names[j]]) is nn.ReLU:
            children[name] = FusedConv2d(children[name], relu=True)
            children[names[j]] = nn.Identity()
            count += 1
    return count


def fuse_convs(module: nn.Module) -> int:
    """Fuse conv + ReLU, ResNet's conv + residual + ReLU and the FPN's lateral conv + top-down add into
    oneDNN calls; returns how many convs were fused.

    ResNet blocks are fused only once their BNs are folded (``fold_batchnorm``); elsewhere a conv
    directly followed by a ReLU in a Sequential or an ordered ModuleDict. Does nothing when this torch
    build lacks the fused kernels.
    """
    if not pointwise_conv_available():
        log.debug("oneDNN fused convolutions unavailable; conv+ReLU left as they are")
        return 0
    count = 0
    for parent in list(module.modules()):
        for i, (name, child) in enumerate(list(parent._modules.items())):
            # A block after the first in a Sequential stage gets the previous block's output: its own.
            consume = type(parent) is nn.Sequential and i > 0
            if type(child) is Bottleneck and _folded_block(child, 3):
                parent._modules[name] = FusedBottleneck(child, consume_input=consume)
                count += 3
            elif type(child) is BasicBlock and _folded_block(child, 2):
                parent._modules[name] = FusedBasicBlock(child, consume_input=consume)
                count += 2
            elif _fusable_fpn(child):
                parent._modules[name] = FusedFPN(child)
                count += len(child.inner_blocks)
        if _runs_in_order(parent):
            count += _fuse_in_order(parent)
    return count


# ---- the box head's two linears + ReLU on the CPU ---------------------------------------------------

def pointwise_linear_available() -> bool:
    """Whether this torch build has oneDNN's fused linear kernel and it agrees with linear + ReLU."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((5, 12), (7, 12), (7,)))
        with torch.inference_mode():
            return bool(torch.allclose(op(x, w, b, "relu", [], ""), F.relu(F.linear(x, w, b)), atol=1e-5))
    except (RuntimeError, TypeError, AttributeError):
        return False


class FusedTwoMLPHead(nn.Module):
    """torchvision's ``TwoMLPHead`` (flatten, fc6 + ReLU, fc7 + ReLU) with each linear + ReLU as one oneDNN
    call for float32 or bf16 CPU tensors without autograd (fc6 on 1000 RoIs: 124 ms instead of 162 ms here);
    torchvision's ops otherwise."""

    def __init__(self, head: TwoMLPHead) -> None:
        super().__init__()
        self.fc6, self.fc7 = head.fc6, head.fc7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=1)
        if (x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and x.dtype == self.fc6.weight.dtype
                and not torch.is_grad_enabled()):
            for fc in (self.fc6, self.fc7):
                x = torch.ops.mkldnn._linear_pointwise(x, fc.weight, fc.bias, "relu", [], "")
            return x
        return F.relu(self.fc7(F.relu(self.fc6(x))))


def fuse_box_head(module: nn.Module) -> bool:
    """Replace ``roi_heads.box_head`` by ``FusedTwoMLPHead`` when it is a ``TwoMLPHead`` and the kernel
    checks out; returns whether it did."""
    roi_heads = getattr(module, "roi_heads", None)
    if type(getattr(roi_heads, "box_head", None)) is not TwoMLPHead or not pointwise_linear_available():
        return False
    roi_heads.box_head = FusedTwoMLPHead(roi_heads.box_head)
    return True


# ---- the RoI heads at inference -------------------------------------------------------------------

def roi_heads_inference(roi_heads: RoIHeads, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                        image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """torchvision's ``RoIHeads.forward`` in eval mode, lighter: what it returns, per image ``boxes``
    [N, 4], ``scores`` [N], ``labels`` [N] and ``masks`` [N, 1, M, M] probabilities.

    ``features`` is consumed (emptied once the masks are pooled, freeing the pyramid before the mask
    head runs), and the mask classifier (a 1x1 conv over every class) is evaluated only for each
    detection's own class: the same values up to float rounding, without the [N, classes, M, M] logits
    and their sigmoid. Models with keypoint heads, or in training mode, take torchvision's path.
    """
    if roi_heads.training or roi_heads.keypoint_predictor is not None:
        result, _ = roi_heads(features, proposals, image_shapes)
        return result
    box_features = box_head_in_chunks(roi_heads, features, proposals, image_shapes)
    class_logits, box_regression = roi_heads.box_predictor(box_features)
    del box_features
    boxes, scores, labels = roi_heads.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
    result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels, strict=True)]
    if not roi_heads.has_mask():
        return result
    mask_features = roi_heads.mask_roi_pool(features, boxes, image_shapes)
    features.clear()
    mask_features = roi_heads.mask_head(mask_features)
    probs = _mask_probs(roi_heads.mask_predictor, mask_features, torch.cat(labels))
    for r, p in zip(result, probs.split([len(b) for b in boxes]), strict=True):
        r["masks"] = p
    return result


def box_head_in_chunks(roi_heads: RoIHeads, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                       image_shapes: list[tuple[int, int]], chunk: int = BOX_POOL_CHUNK) -> torch.Tensor:
    """``roi_heads.box_head(roi_heads.box_roi_pool(features, proposals, image_shapes))``, [sum of
    proposals, representation size], pooling at most ``chunk`` RoIs at a time.

    Each RoI is pooled and run through the head alone, so chunks give the same rows in the same order
    (image by image) up to float rounding; what changes is the pooled tensor held at once: 1000
    proposals x 256 x 7 x 7 float32 is 50 MB, and its pooling transients about as much again.
    """
    if sum(len(p) for p in proposals) <= chunk:
        return roi_heads.box_head(roi_heads.box_roi_pool(features, proposals, image_shapes))
    empty = [p[:0] for p in proposals]
    out = []
    for i, p in enumerate(proposals):
        for start in range(0, len(p), chunk):
            boxes = [*empty[:i], p[start : start + chunk], *empty[i + 1 :]]
            out.append(roi_heads.box_head(roi_heads.box_roi_pool(features, boxes, image_shapes)))
    return torch.cat(out)


def _mask_probs(predictor: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, 1, M, M] sigmoid of the mask logits of each RoI's class (``maskrcnn_inference``'s output)."""
    if type(predictor) is not MaskRCNNPredictor or type(predictor.mask_fcn_logits) is not nn.Conv2d:
        return torch.cat(maskrcnn_inference(predictor(x), [labels]))
    x = predictor.relu(predictor.conv5_mask(x))
    conv = predictor.mask_fcn_logits
    w = conv.weight.flatten(1)[labels]  # [N, C]: each RoI's own class row of the 1x1 conv
    n, c, h, wd = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        logits = torch.bmm(x.permute(0, 2, 3, 1).reshape(n, h * wd, c), w[:, :, None])  # [N, HW, 1]
    else:
        logits = torch.bmm(w[:, None, :], x.contiguous().view(n, c, h * wd))  # [N, 1, HW]
    if conv.bias is not None:
        logits = logits + conv.bias[labels].view(n, 1, 1)
    return logits.view(n, 1, h, wd).sigmoid()
