"""Which arithmetic precision a run uses: ``--precision auto|fp32|bf16|fp16|int8`` resolved for one backend
on one device, with the reason in words for the log and ``run.json``.

bf16 pays only where the hardware runs it natively: a CPU with AMX-BF16 or AVX512-BF16 (Intel Sapphire
Rapids and later, AMD Zen 4 and later) runs a bf16 convolution 3-7x faster than fp32; a CPU without
them emulates it, hundreds of times slower. So the CPU's own flags decide, read at run time, never the
vendor or the model name. Nothing here imports torch unless a CUDA device has to be asked.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# CPU flags (Linux /proc/cpuinfo names) that run bf16 matrix arithmetic in hardware.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
# The flags benchmarks and logs report.
REPORTED_CPU_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


@dataclass(frozen=True)
class ResolvedPrecision:
    """``name``: what runs (fp32, bf16, fp16, or ``auto`` where OpenVINO picks its own);
    ``reason``: why, in words; ``requested``: what the user asked for."""

    name: str
    reason: str
    requested: str


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's CPU from /proc/cpuinfo; ("", empty) where there is none."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if flags and key == "model name":
            break
    return model, flags


def cpu_summary() -> str:
    """'<model> (flags: amx_bf16 avx512_bf16 ...)' with the precision-relevant flags this CPU has."""
    model, flags = cpu_info()
    have = [f for f in REPORTED_CPU_FLAGS if f in flags]
    return f"{model} (flags: {' '.join(have) or 'none of ' + ' '.join(REPORTED_CPU_FLAGS)})"


def cpu_bf16_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The bf16 hardware flags this CPU has (empty: bf16 would be emulated, far slower)."""
    flags = cpu_info()[1] if flags is None else flags
    return [f for f in BF16_CPU_FLAGS if f in flags]


def resolve_precision(requested: str, *, backend: str, device_type: str, cuda_bf16: bool = False,
                      cpu_flags: frozenset[str] | None = None) -> ResolvedPrecision:
    """Resolve ``--precision`` for ``backend`` ('torch', 'openvino', ...) on ``device_type`` ('cpu', 'cuda').

    ``auto``: bf16 on a CPU with bf16 instructions or a CUDA GPU that supports it, else fp32; for
    runtimes other than torch and OpenVINO, their own float32. Raises ``UsageError`` for a precision
    the backend or device cannot run.
    """
    if requested not in PRECISIONS:
        raise UsageError(f"--precision {requested}: expected one of {', '.join(PRECISIONS)}")
    bf16_flags = cpu_bf16_flags(cpu_flags)
    if backend not in ("torch", "openvino"):
        if requested in ("auto", "fp32"):
            return ResolvedPrecision("fp32", f"--backend {backend} runs float32", requested)
        raise UsageError(f"--precision {requested} runs with the torch backend only (openvino: auto, fp32 or "
                         f"bf16), not --backend {backend}")
    if requested == "int8":
        raise UsageError("--precision int8: not offered (measured: static int8 did not hold the accuracy bar "
                         "or the speed-up over bf16; see README, Speed and memory); use auto or bf16")
    if backend == "openvino":
        if requested == "fp16":
            raise UsageError("--precision fp16: the openvino backend runs auto (its own choice), fp32 or bf16")
        if requested == "auto":
            return ResolvedPrecision("auto", "OpenVINO's own choice for this CPU "
                                     f"({'bf16' if bf16_flags else 'f32'} expected)", requested)
        if requested == "bf16" and not bf16_flags:
            raise UsageError(_no_bf16_message())
        return ResolvedPrecision(requested, "as asked", requested)
    if device_type == "cuda":
        if requested == "auto":
            if cuda_bf16:
                return ResolvedPrecision("bf16", "auto: this GPU supports bf16 (autocast)", requested)
            return ResolvedPrecision("fp32", "auto: this GPU lacks bf16", requested)
        return ResolvedPrecision(requested, "as asked (autocast on the GPU)" if requested != "fp32" else "as asked",
                                 requested)
    if requested == "fp16":
        raise UsageError("--precision fp16: runs on a CUDA GPU only; on a CPU use auto, bf16 or fp32")
    if requested == "auto":
        if bf16_flags:
            return ResolvedPrecision("bf16", f"auto: this CPU has {'/'.join(bf16_flags)}", requested)
        return ResolvedPrecision("fp32", "auto: this CPU has no bf16 instructions", requested)
    if requested == "bf16" and not bf16_flags:
        raise UsageError(_no_bf16_message())
    return ResolvedPrecision(requested, "as asked", requested)


def _no_bf16_message() -> str:
    model = cpu_info()[0] or "this CPU"
    return (f"--precision bf16: {model} has no bf16 instructions ({' or '.join(BF16_CPU_FLAGS)}), where bf16 "
            "runs hundreds of times slower than fp32; use --precision auto or fp32")


def bf16_hint(resolved: ResolvedPrecision, device_type: str) -> str | None:
    """A suggestion for the log when fp32 was asked for on a CPU that runs bf16 natively, else None."""
    flags = cpu_bf16_flags()
    if device_type != "cpu" or resolved.requested != "fp32" or not flags:
        return None
    return (f"this CPU has {'/'.join(flags)}: --precision auto runs the network in bf16, 2-3x faster here, with "
            "slightly different outputs (README: Precision)")
