"""--precision resolved from the CPU's own flags: auto picks bf16 only where it runs natively, what a
backend or device cannot run is refused with a message naming the choices."""

from __future__ import annotations

import pytest

from maskseg import precision as prec
from maskseg.errors import UsageError
from maskseg.precision import resolve_precision

AMX = frozenset({"avx512f", "amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni"})
ZEN4 = frozenset({"avx512f", "avx512_bf16", "avx512_vnni"})  # AVX512-BF16 without AMX
NO_BF16 = frozenset({"avx2", "fma"})  # e.g. an AMD EPYC Zen 3


@pytest.mark.parametrize(("flags", "expected", "why"), [
    (AMX, "bf16", "amx_bf16/avx512_bf16"),
    (ZEN4, "bf16", "avx512_bf16"),
    (NO_BF16, "fp32", "no bf16 instructions"),
])
def test_auto_on_the_cpu_follows_the_flags(flags, expected, why):
    r = resolve_precision("auto", backend="torch", device_type="cpu", cpu_flags=flags)
    assert (r.name, r.requested) == (expected, "auto") and why in r.reason


def test_bf16_is_refused_on_a_cpu_that_would_emulate_it(monkeypatch):
    monkeypatch.setattr(prec, "cpu_info", lambda: ("AMD EPYC 7B13", NO_BF16))
    with pytest.raises(UsageError, match=r"--precision bf16: AMD EPYC 7B13 has no bf16 instructions.*auto or fp32"):
        resolve_precision("bf16", backend="torch", device_type="cpu")
    assert resolve_precision("bf16", backend="torch", device_type="cpu", cpu_flags=AMX).name == "bf16"


@pytest.mark.parametrize("requested", ["fp16", "int8", "fp64"])
def test_what_the_cpu_does_not_offer_is_refused(requested):
    with pytest.raises(UsageError, match=f"--precision {requested}"):
        resolve_precision(requested, backend="torch", device_type="cpu", cpu_flags=AMX)


def test_cuda_auto_depends_on_the_gpu():
    assert resolve_precision("auto", backend="torch", device_type="cuda", cuda_bf16=True).name == "bf16"
    assert resolve_precision("auto", backend="torch", device_type="cuda", cuda_bf16=False).name == "fp32"
    assert resolve_precision("fp16", backend="torch", device_type="cuda").name == "fp16"


def test_other_backends():
    ort = resolve_precision("auto", backend="onnxruntime", device_type="cpu", cpu_flags=AMX)
    assert ort.name == "fp32"
    with pytest.raises(UsageError, match="torch backend only"):
        resolve_precision("bf16", backend="tensorflow", device_type="cpu", cpu_flags=AMX)
    ov = resolve_precision("auto", backend="openvino", device_type="cpu", cpu_flags=AMX)
    assert ov.name == "auto" and "OpenVINO's own choice" in ov.reason
    assert resolve_precision("fp32", backend="openvino", device_type="cpu", cpu_flags=AMX).name == "fp32"
    with pytest.raises(UsageError, match="openvino backend runs auto"):
        resolve_precision("fp16", backend="openvino", device_type="cpu", cpu_flags=AMX)


def test_the_hint_for_fp32_on_a_bf16_cpu(monkeypatch):
    fp32 = resolve_precision("fp32", backend="torch", device_type="cpu", cpu_flags=AMX)
    monkeypatch.setattr(prec, "cpu_info", lambda: ("Xeon", AMX))
    assert "--precision auto" in prec.bf16_hint(fp32, "cpu")
    assert prec.bf16_hint(fp32, "cuda") is None
    monkeypatch.setattr(prec, "cpu_info", lambda: ("EPYC", NO_BF16))
    assert prec.bf16_hint(fp32, "cpu") is None


def test_this_machines_cpu_is_read():
    prec.cpu_info.cache_clear()
    model, flags = prec.cpu_info()
    summary = prec.cpu_summary()
    assert model and summary.startswith(model)
    assert set(prec.cpu_bf16_flags()) <= flags
