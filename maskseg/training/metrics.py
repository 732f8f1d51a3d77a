"""A run's metrics file (``metrics.jsonl``: one step or epoch record a line) and its plot (``training.png``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_bytes, atomic_write_with
from ..errors import OutputError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` in order (step and epoch records)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def append_metrics(run_dir: Path, record: dict) -> None:
    """Add one record to ``RUN/metrics.jsonl``."""
    try:
        with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise OutputError(f"{run_dir / METRICS_FILE}: cannot append ({exc.strerror or exc})") from None


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop records after the step being resumed from (they are about to be redone)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())


def epoch_loss(run_dir: Path, epoch: int) -> dict:
    """``{"loss": mean}`` of the step records of ``epoch`` (1-based) in the file; {} when there are none."""
    records = [r for r in read_metrics(run_dir) if r.get("kind") == "step" and r.get("epoch") == epoch]
    return {"loss": round(sum(r["loss"] for r in records) / len(records), 5)} if records else {}


def plot_metrics(run_dir: str | Path) -> Path:
    """Draw ``RUN/training.png``: training loss per step (and its moving average), validation AP per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch" and "segm_AP" in r]
    fig, axes = plt.subplots(1, 2 if epochs else 1, figsize=(11 if epochs else 6, 4), squeeze=False)
    ax = axes[0][0]
    xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
    ax.plot(xs, ys, lw=0.6, alpha=0.4, label="loss")
    window = max(1, len(ys) // 30)
    if len(ys) > window > 1:
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, lw=1.5, label=f"moving average ({window} steps)")
    ax.set(xlabel="step", ylabel="training loss", title="loss", yscale="log")
    ax.legend()
    if epochs:
        ax = axes[0][1]
        for key in ("bbox_AP", "segm_AP", "segm_AP50"):
            ax.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], marker="o", ms=3, label=key)
        ax.set(xlabel="epoch", ylabel="COCO AP (validation)", title="validation", ylim=(0, 1))
        ax.legend()
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    atomic_write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
    return path
