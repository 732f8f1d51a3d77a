"""The bf16 CPU path, run on every CPU: where the CPU lacks bf16 instructions the flags are faked so the
path still runs (slowly: hence a small model and a small input), never skipped.

Tolerances, against the same weights in fp32 on a real photo with the trained demo model: every fp32
detection scoring >= 0.6 is found again (same class, box IoU >= 0.9), scores within 0.03, mask
probabilities within 0.03 on average; geometry (anchors, boxes, masks out) stays float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from maskseg import precision as prec
from maskseg.backends.torch_backend import TorchBackend
from maskseg.backends.torch_backend.bf16 import Bf16Stage, Float32Anchors
from maskseg.backends.torch_backend.optimize import FusedConv2d
from maskseg.config import ModelConfig
from maskseg.decode import decode_bytes

from ...conftest import SAMPLES


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU as one with AMX-BF16 (its own model name kept), so --precision bf16 is accepted."""
    model, flags = prec.cpu_info()
    monkeypatch.setattr(prec, "cpu_info", lambda: (model, flags | {"amx_bf16"}))


@pytest.fixture(scope="module")
def fruit_photo():
    return decode_bytes((SAMPLES / "fruits_nuts" / "7.jpg").read_bytes(), "7.jpg")


def _demo(precision: str) -> TorchBackend:
    return TorchBackend.load(ModelConfig(name="demo", device="cpu", precision=precision, min_size=320, max_size=427))


def test_bf16_finds_what_fp32_finds_with_the_demo_model(bf16_cpu, fruit_photo):
    [ref] = _demo("fp32").infer([fruit_photo])
    backend = _demo("bf16")
    assert backend.loaded.extra["precision"] == "bf16"
    assert any("bf16 weights" in a for a in backend.loaded.extra["optimizations"])
    [got] = backend.infer([fruit_photo])
    assert got.boxes.dtype == got.scores.dtype == got.masks.dtype == torch.float32
    strong = ref.scores >= 0.6
    assert int(strong.sum()) >= 5
    iou = box_iou(ref.boxes[strong], got.boxes)
    iou[ref.labels[strong][:, None] != got.labels[None, :]] = 0
    best, match = iou.max(1)
    assert bool((best >= 0.9).all()), best
    assert float((ref.scores[strong] - got.scores[match]).abs().max()) <= 0.03
    assert float((ref.masks[strong] - got.masks[match]).abs().mean()) <= 0.03
    assert abs(len(got.scores) - len(ref.scores)) <= 2


def test_the_weights_are_bf16_where_the_arithmetic_is_and_float32_where_the_geometry_is(bf16_cpu):
    net = _demo("bf16").loaded.module
    for part in (net.backbone, net.rpn.head, net.roi_heads.box_head, net.roi_heads.mask_head):
        weights = [m.weight for m in part.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, FusedConv2d))]
        assert weights and all(w.dtype == torch.bfloat16 for w in weights)
    assert net.roi_heads.box_predictor.cls_score.weight.dtype == torch.float32
    assert net.roi_heads.box_predictor.bbox_pred.weight.dtype == torch.float32
    assert net.roi_heads.mask_predictor.mask_fcn_logits.weight.dtype == torch.float32
    assert isinstance(net.rpn.anchor_generator, Float32Anchors)


def test_anchors_stay_float32_beside_bf16_features(tiny_model):
    from torchvision.models.detection.image_list import ImageList

    generator = tiny_model.rpn.anchor_generator
    images = ImageList(torch.zeros(1, 3, 800, 1088, dtype=torch.bfloat16), [(800, 1088)])
    maps = [torch.zeros(1, 8, 800 // s, 1088 // s, dtype=torch.bfloat16) for s in (4, 8, 16, 32, 64)]
    [ref] = generator(images, [m.float() for m in maps])
    [got] = Float32Anchors(generator)(images, maps)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    [rounded] = generator(images, maps)  # what torchvision alone would give: anchors off by pixels
    assert rounded.dtype == torch.bfloat16 and float((rounded.float() - ref).abs().max()) >= 1.0


def test_fused_conv_runs_bf16_and_a_stage_casts_at_its_edges():
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 12, 12, generator=gen).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(1, 16, 12, 12, generator=gen)
    ref = F.relu(conv(x) + residual).detach()
    stage = Bf16Stage(FusedConv2d(conv, relu=True))
    with torch.inference_mode():
        out = stage(x, residual)
    assert stage.module.weight.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert float((out - ref).abs().max()) <= 0.02 * float(ref.abs().max())
