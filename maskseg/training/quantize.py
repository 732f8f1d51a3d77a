"""A compact int8 copy of a checkpoint (``best-int8.pt``) that ``maskseg.models`` dequantizes on load."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write_with


def export_int8(src: str | Path, dst: str | Path) -> Path:
    """Write a compact copy of checkpoint ``src``: every weight with 2+ dims as int8 with one float32
    scale per output channel (symmetric), the rest float16. ``maskseg.models`` dequantizes it on load;
    it stays a plain-tensor file that ``torch.load(weights_only=True)`` accepts."""
    import torch

    from ..models import read_weights_file

    state = dict(read_weights_file(src))
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        state.pop(key, None)
    q, scales, rest = {}, {}, {}
    for name, t in state.pop("state_dict").items():
        t = t.float()
        if t.ndim >= 2 and t.is_floating_point():
            scale = t.abs().flatten(1).amax(1).clamp(min=1e-12) / 127.0
            q[name] = torch.round(t / scale.view(-1, *[1] * (t.ndim - 1))).clamp(-127, 127).to(torch.int8)
            scales[name] = scale
        else:
            rest[name] = t.half() if t.is_floating_point() else t
    state.update({"state_dict": rest, "int8": q, "int8_scales": scales})
    atomic_write_with(Path(dst), lambda fh: torch.save(state, fh))
    return Path(dst)
