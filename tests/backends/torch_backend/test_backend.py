"""The torch backend: rewrites applied on load, what precision the CPU can run, mixed precision on CUDA."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from maskseg import precision as prec
from maskseg.backends import load_backend
from maskseg.backends.torch_backend import TorchBackend
from maskseg.config import ModelConfig
from maskseg.decode import decode_bytes
from maskseg.errors import UsageError

from ...conftest import SAMPLES


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_precision_the_cpu_cannot_run_is_refused(tiny_checkpoint, precision, monkeypatch):
    monkeypatch.setattr(prec, "cpu_info", lambda: ("AMD EPYC 7B13", frozenset({"avx2"})))  # no bf16 instructions
    with pytest.raises(UsageError, match=f"--precision {precision}"):
        TorchBackend.load(ModelConfig(weights=str(tiny_checkpoint), device="cpu", precision=precision))


def test_auto_on_a_cpu_without_bf16_runs_fp32(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(prec, "cpu_info", lambda: ("AMD EPYC 7B13", frozenset({"avx2"})))
    backend = TorchBackend.load(ModelConfig(weights=str(tiny_checkpoint), device="cpu", precision="auto"))
    assert backend.precision == backend.loaded.extra["precision"] == "fp32"
    assert not any("bf16" in a for a in backend.loaded.extra["optimizations"])


def test_load_applies_the_rewrites_and_returns_cpu_float_outputs(tiny_checkpoint):
    backend = TorchBackend.load(ModelConfig(weights=str(tiny_checkpoint), device="cpu"))
    assert any("folded" in a for a in backend.loaded.extra["optimizations"])
    rgb = decode_bytes((SAMPLES / "chelsea.png").read_bytes(), "chelsea.png")
    [raw] = backend.infer([rgb])
    assert len(raw.scores) > 0 and raw.masks.shape[1:] == (28, 28)
    assert raw.boxes.dtype == raw.masks.dtype == torch.float32 and raw.masks.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda_finds_what_fp32_finds(tiny_checkpoint, precision):
    rgb = decode_bytes((SAMPLES / "chelsea.png").read_bytes(), "chelsea.png")
    config = ModelConfig(weights=str(tiny_checkpoint), device="cuda")
    [ref] = TorchBackend.load(config).infer([rgb])
    [amp] = TorchBackend.load(replace(config, precision=precision)).infer([rgb])
    assert amp.masks.dtype == torch.float32 and amp.masks.device.type == "cpu"
    assert abs(len(amp.scores) - len(ref.scores)) <= max(1, len(ref.scores) // 10)
    np.testing.assert_allclose(amp.scores[:5].numpy(), ref.scores[:5].numpy(), atol=0.05)


def test_compile_finds_what_the_eager_backbone_finds(tiny_checkpoint):
    rgb = decode_bytes((SAMPLES / "chelsea.png").read_bytes(), "chelsea.png")
    config = ModelConfig(weights=str(tiny_checkpoint), device="cpu")
    [ref] = TorchBackend.load(config).infer([rgb])
    compiled = TorchBackend.load(replace(config, compile=True))
    assert any("compiled" in a for a in compiled.loaded.extra["optimizations"])
    [out] = compiled.infer([rgb])
    assert len(out.scores) == len(ref.scores) > 0
    torch.testing.assert_close(out.scores, ref.scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.boxes, ref.boxes, rtol=0, atol=1e-2)


@pytest.mark.parametrize("flag", [{"compile": True}, {"precision": "fp16"}])
def test_torch_only_options_are_refused_for_other_backends(flag):
    with pytest.raises(UsageError, match="torch backend only"):
        load_backend(ModelConfig(backend="onnxruntime", weights="model.onnx", **flag))
