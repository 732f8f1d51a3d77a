"""maskseg.backends.torch_backend.optimize: each inference rewrite gives what the plain torchvision module gives."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from maskseg.backends.torch_backend.optimize import (
    FusedBottleneck,
    FusedFPN,
    FusedTwoMLPHead,
    box_head_in_chunks,
    fold_batchnorm,
    fuse_convs,
    pointwise_conv_available,
    pointwise_linear_available,
    prepare_for_inference,
    roi_heads_inference,
)


def _resnet50_with_stats() -> nn.Module:
    """A random ResNet-50 trunk as the detector holds it (IntermediateLayerGetter, stem to layer4) in
    eval mode, whose BatchNorms have non-trivial statistics and affine terms."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return IntermediateLayerGetter(net, {"layer2": "c3", "layer4": "c5"}).eval()


def test_folding_batchnorm_keeps_resnet50_outputs():
    plain = _resnet50_with_stats()
    folded = copy.deepcopy(plain)
    assert fold_batchnorm(folded) == 53
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(1, 3, 96, 128)
    with torch.inference_mode():
        ref, out = plain(x), folded(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)


def test_folding_frozen_batchnorm_in_the_tiny_detector(tiny_model):
    plain = copy.deepcopy(tiny_model)
    folded = copy.deepcopy(tiny_model)
    frozen = sum(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in plain.modules())
    assert fold_batchnorm(folded) == frozen > 0
    x = torch.rand(1, 3, 128, 160)
    with torch.inference_mode():
        ref, out = plain.backbone(x), folded.backbone(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)


def test_batchnorm_in_training_mode_is_left_alone():
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_batchnorm(block) == 0 and isinstance(block[1], nn.BatchNorm2d)


@pytest.mark.skipif(not pointwise_conv_available(), reason="this torch build has no oneDNN fused convolutions")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv_relu_equals_folded_resnet50(channels_last):
    folded = _resnet50_with_stats()
    fold_batchnorm(folded)
    fused = copy.deepcopy(folded)
    assert fuse_convs(fused) == 49  # 16 bottlenecks x 3 convs (downsamples have no ReLU) + the stem
    assert sum(isinstance(m, FusedBottleneck) for m in fused.modules()) == 16
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    folded, fused = folded.to(memory_format=fmt), fused.to(memory_format=fmt)
    x = torch.rand(2, 3, 96, 128).contiguous(memory_format=fmt)
    with torch.inference_mode():
        ref, out = folded(x), fused(x)
    with torch.enable_grad():  # with autograd on, the fused modules fall back to plain ops
        fallback = fused(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fallback[k], ref[k], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not pointwise_conv_available(), reason="this torch build has no oneDNN fused convolutions")
def test_fused_fpn_equals_torchvision_fpn():
    torch.manual_seed(0)
    fpn = FeaturePyramidNetwork([16, 32, 64], 24, extra_blocks=LastLevelMaxPool()).eval()
    holder = nn.Sequential(copy.deepcopy(fpn))  # rewrites replace children, as in BackboneWithFPN
    assert fuse_convs(holder) == 3 and isinstance(holder[0], FusedFPN)
    x = {"a": torch.randn(1, 16, 40, 52), "b": torch.randn(1, 32, 20, 26), "c": torch.randn(1, 64, 10, 13)}
    with torch.inference_mode():
        ref, out = fpn(x), holder[0](dict(x))
    assert list(out) == list(ref) == ["a", "b", "c", "pool"]
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6)


def test_roi_heads_inference_equals_torchvision_roi_heads(tiny_model):
    net = tiny_model
    torch.manual_seed(1)
    with torch.inference_mode():
        batch, _ = net.transform([torch.rand(3, 200, 240), torch.rand(3, 180, 260)])
        features = net.backbone(batch.tensors)
        proposals, _ = net.rpn(batch, features)
        ref, _ = net.roi_heads(features, proposals, batch.image_sizes)
        out = roi_heads_inference(net.roi_heads, dict(features), proposals, batch.image_sizes)
    assert sum(len(r["scores"]) for r in ref) > 0
    for r, o in zip(ref, out, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(o[key], r[key])
        assert o["masks"].shape == r["masks"].shape
        torch.testing.assert_close(o["masks"], r["masks"], rtol=0, atol=1e-6)


def test_prepare_for_inference_keeps_the_detections(tiny_model):
    plain = copy.deepcopy(tiny_model)
    fast = copy.deepcopy(tiny_model)
    applied = prepare_for_inference(fast, torch.device("cpu"))
    assert any("folded" in a for a in applied) and any("RoIAlign" in a for a in applied)
    torch.manual_seed(0)
    images = [torch.rand(3, 200, 240), torch.rand(3, 180, 260)]
    with torch.inference_mode():
        ref, out = plain(images), fast(images)
    for r, o in zip(ref, out, strict=True):
        assert len(o["scores"]) == len(r["scores"]) > 0
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(o["scores"], r["scores"], rtol=0, atol=1e-5)
        assert torch.equal(o["labels"], r["labels"])


@pytest.mark.skipif(not pointwise_linear_available(), reason="this torch build has no oneDNN fused linear")
def test_fused_box_head_equals_torchvision_two_mlp_head():
    torch.manual_seed(0)
    head = TwoMLPHead(256 * 7 * 7, 1024)
    fused = FusedTwoMLPHead(head)
    x = torch.randn(300, 256, 7, 7)
    with torch.inference_mode():
        ref, out = head(x), fused(x)
    assert out.shape == (300, 1024) and (ref > 0).any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # autograd takes torchvision's ops
        assert torch.equal(fused(x), head(x))


@pytest.mark.parametrize("fast_pools", [False, True])
def test_box_head_in_chunks_equals_one_pass(tiny_model, fast_pools):
    net = copy.deepcopy(tiny_model)
    if fast_pools:
        prepare_for_inference(net, torch.device("cpu"))
    torch.manual_seed(2)
    with torch.inference_mode():
        batch, _ = net.transform([torch.rand(3, 200, 240), torch.rand(3, 180, 260)])
        features = net.backbone(batch.tensors)
        proposals, _ = net.rpn(batch, features)
        proposals = [proposals[0][:300], proposals[1][:41]]  # uneven, neither a multiple of the chunk
        whole = box_head_in_chunks(net.roi_heads, features, proposals, batch.image_sizes, chunk=1000)
        chunked = box_head_in_chunks(net.roi_heads, features, proposals, batch.image_sizes, chunk=64)
        ref = net.roi_heads.box_head(net.roi_heads.box_roi_pool(features, proposals, batch.image_sizes))
    assert len(proposals[0]) == 300 and chunked.shape == ref.shape == (341, ref.shape[1])
    torch.testing.assert_close(whole, ref, rtol=0, atol=0)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)
