"""Training speed of ``maskseg.training`` against torchvision's reference loop, measured in ONE run.

Same model (maskseg's ``small`` Mask R-CNN, random initial weights from one seed), same data (the
fruits_nuts training photos, ids 0-13, through the same dataset and collate, no augmentation), same
optimizer (AdamW, warm-up), same batch size, same input sizes. Each variant runs in its own process,
rounds interleaved (a b a b ...) because the machine may be shared:

  (a) reference  torchvision's ``references/detection/engine.py`` loop as users copy it: per epoch
                 ``train_one_epoch`` (loss_dict = model(images, targets); sum; zero_grad; backward;
                 step; warm-up scheduler) and a checkpoint {model, optimizer, lr_scheduler, epoch}
  (b) maskseg    ``maskseg.training.train`` with the same settings: its loop, metrics file, gradient
                 clipping, atomic last.pt per epoch (model + optimizer + scheduler + RNG) and the plot

``images/s`` is images trained over the wall time of the training (model built, data read, every
epoch and its checkpoint; imports excluded); ``images/cpu-s`` the same over the process's CPU time,
steadier when other jobs share the machine. Ratios are (b) / (a). Usage:
    python benchmarks/bench_train.py [--epochs E] [--rounds R] [--size S] [--arch tiny|small] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRUITS = ROOT / "tests" / "data" / "fruits_nuts"
TRAIN_IDS = set(range(14))


def _config(args: argparse.Namespace) -> object:
    from maskseg.config import TrainConfig
    from maskseg.synth import TINY_ARCH

    arch = dict(TINY_ARCH) if args.arch == "tiny" else {}
    return TrainConfig(model="small", arch_kwargs=arch, epochs=args.epochs, batch_size=2, lr=1e-3, warmup_iters=10,
                       lr_schedule="constant", clip_grad=None, hflip=0.0, min_size=args.size,
                       max_size=round(args.size * 4 / 3), workers=0, seed=0, device="cpu")


def _train_json(folder: Path) -> Path:
    data = json.loads((FRUITS / "trainval.json").read_text())
    data["images"] = [im for im in data["images"] if im["id"] in TRAIN_IDS]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in TRAIN_IDS]
    path = folder / "train.json"
    path.write_text(json.dumps(data))
    return path


def run_reference(args: argparse.Namespace, work: Path) -> dict:
    """torchvision's reference detection loop (engine.train_one_epoch + per-epoch checkpoint)."""
    import torch

    from maskseg.models import MODELS
    from maskseg.training.data import CocoDetection, collate, read_coco

    cfg = _config(args)
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    coco = read_coco(_train_json(work))
    model = MODELS["small"].build(len(coco.categories) + 1, **cfg.arch_kwargs, min_size=cfg.min_size,
                                  max_size=cfg.max_size)
    dataset = CocoDetection(coco, FRUITS / "images")
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=cfg.workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = 0
    for epoch in range(cfg.epochs):
        model.train()
        warmup = None
        if epoch == 0:
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=cfg.warmup_factor,
                                                       total_iters=min(cfg.warmup_iters, len(loader) - 1))
        for batch, targets in loader:
            loss_dict = model(list(batch), list(targets))
            losses = sum(loss for loss in loss_dict.values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            if warmup is not None:
                warmup.step()
            images += len(batch)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "lr_scheduler": warmup.state_dict() if warmup else None, "epoch": epoch},
                   work / f"model_{epoch}.pth")
    seconds = time.monotonic() - started
    return {"images": images, "seconds": seconds, "loss": float(losses)}


def run_maskseg(args: argparse.Namespace, work: Path) -> dict:
    from maskseg.training import read_metrics, train

    started = time.monotonic()
    summary = train(_train_json(work), FRUITS / "images", work / "run", _config(args))
    seconds = time.monotonic() - started
    steps = [r for r in read_metrics(work / "run") if r["kind"] == "step"]
    return {"images": summary.steps * 2, "seconds": seconds, "loss": steps[-1]["loss"]}


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cpu = _cpu_seconds()
        result = (run_reference if args.child == "reference" else run_maskseg)(args, Path(tmp))
        result["cpu_seconds"] = _cpu_seconds() - cpu
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of 7 steps x 2 images each")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="short side of the training inputs")
    parser.add_argument("--arch", choices=("tiny", "small"), default="tiny",
                        help="tiny: FPN 32 test model; small: the demo model's architecture")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--child", choices=("reference", "maskseg"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rates: dict[str, list[float]] = {"reference": [], "maskseg": []}
    cpu_rates: dict[str, list[float]] = {"reference": [], "maskseg": []}
    common = ["--epochs", str(args.epochs), "--size", str(args.size), "--arch", args.arch,
              "--threads", str(args.threads)]
    for r in range(args.rounds):
        for name in rates:
            out = subprocess.run([sys.executable, __file__, "--child", name, *common], capture_output=True,
                                 text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rate = result["images"] / result["seconds"]
            rates[name].append(rate)
            cpu_rates[name].append(result["images"] / result["cpu_seconds"])
            print(f"round {r + 1} {name:9s} {result['images']} images in {result['seconds']:.1f} s = "
                  f"{rate:.2f} images/s, {result['cpu_seconds']:.1f} cpu-s (last loss {result['loss']:.3f})",
                  flush=True)
    ref, ours = statistics.median(rates["reference"]), statistics.median(rates["maskseg"])
    cref, cours = statistics.median(cpu_rates["reference"]), statistics.median(cpu_rates["maskseg"])
    print(f"\n{args.arch} model, inputs {args.size}px, batch 2, {args.epochs} epochs of 7 steps, "
          f"{args.rounds} rounds (medians)")
    print(f"{'variant':12s} {'images/s':>9s} {'ratio':>6s} {'images/cpu-s':>13s} {'ratio':>6s}")
    print(f"{'reference':12s} {ref:9.2f} {1.0:6.2f} {cref:13.2f} {1.0:6.2f}")
    print(f"{'maskseg':12s} {ours:9.2f} {ours / ref:6.2f} {cours:13.2f} {cours / cref:6.2f}")


if __name__ == "__main__":
    main()
