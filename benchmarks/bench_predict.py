"""Speed and memory of maskseg against the hand-written torchvision loop, measured in ONE run.

Same images (real photos resized to 640x480, 1024x768 and 1920x1080), same weights (a torchvision
ResNet-50 FPN state dict with random weights whose classifier yields 100 detections per image with
well-spread scores, made here), each variant in its own process so peak RSS is its own, rounds
interleaved (a b c a b c ...) because the machine may be shared:

  (a) loop  what users write: cv2 decode, model([img]) (torchvision pastes N x H x W float masks),
            threshold, pycocotools encode, one JSON at the end
  (b) api   maskseg's Python API, ``maskseg.predict(...)`` (decode threads, box-local paste and RLE,
            journal, COCO writers), the network's forward timed inside it
  (c) cli   ``python -m maskseg predict ... --writers coco,results`` as a user runs it

Columns: ``s/image`` is the time per image once the model is ready (imports and model load excluded:
(a) and (b) time themselves, (c) from its "inference rewrites" log line to its exit, final JSON
included); ``e2e s/image`` is each process's wall time from start to exit over the images. Speed-ups
and RSS ratios are per round against that round's loop (paired), then the median [min-max] over
rounds. ``outside fwd`` is the share of (b)'s time not spent in the network's forward (decode, paste,
RLE, JSON, journal). Agreement: per image, same count, detections matched by class and box, and the
mask IoU of matched pairs. Usage:
    python benchmarks/bench_predict.py [--images N_PER_SIZE] [--rounds R] [--threads T] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(640, 480), (1024, 768), (1920, 1080)]
PHOTOS = ["rocket.jpg", "astronaut.png", "fruits_nuts/7.jpg", "coffee.png", "chelsea.png", "fruits_nuts/9.jpg"]
SCORE_THRESH = 0.05  # torchvision's default, which the hand-written loop keeps
MAX_DETS = 100


def make_inputs(folder: Path, per_size: int) -> list[Path]:
    """Real photos from sample_images/, resized to each size and saved as JPEG (quality 92)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    k = 0
    for w, h in SIZES:
        for _ in range(per_size):
            p = folder / f"img{k + 1:02d}_{w}x{h}.jpg"
            if not p.exists():
                src = cv2.imread(str(ROOT / "sample_images" / PHOTOS[k % len(PHOTOS)]))
                cv2.imwrite(str(p), cv2.resize(src, (w, h), interpolation=cv2.INTER_CUBIC),
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
            paths.append(p)
            k += 1
    return paths


def make_weights(path: Path) -> None:
    """A torchvision-format ResNet-50 FPN state dict (91 COCO slots) giving 100 detections per image.

    The classifier is scaled so scores spread over (0.05, 0.9) instead of saturating at 1.0, and the
    RPN's objectness logits are spread 30x wider than at random init (std 0.01): with hundreds of near
    ties, which proposals and detections are kept would depend on the last bits of float rounding.
    """
    import torch

    from maskseg.models import coco_categories
    from maskseg.synth import random_maskrcnn

    model = random_maskrcnn("maskrcnn_resnet50_fpn", num_classes=91, min_size=800, max_size=1333, class_bias=2.0)
    real = {c.label for c in coco_categories()}
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.mul_(30.0)
        cls = model.roi_heads.box_predictor.cls_score
        cls.weight.mul_(0.2)
        for i in range(1, 91):
            if i not in real:  # COCO's N/A slots: never detected, so every output keeps all 100
                cls.bias[i] = -20.0
    torch.save(model.state_dict(), path)


# ---- the three variants, each run in a child process ------------------------------------------------

def role_loop(weights: str, images: list[str], out: str) -> dict:
    """(a) The hand-written loop."""
    import cv2
    import numpy as np
    import torch
    import torchvision
    from pycocotools import mask as mask_utils

    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    results = []
    t0 = time.perf_counter()
    for path in images:
        bgr = cv2.imread(path)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            pred = model([x])[0]
        masks = (pred["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        for j in range(len(pred["scores"])):
            rle = mask_utils.encode(np.asfortranarray(masks[j]))
            x1, y1, x2, y2 = pred["boxes"][j].tolist()
            results.append({"file_name": os.path.basename(path), "category_id": int(pred["labels"][j]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(pred["scores"][j]),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    Path(out).write_text(json.dumps(results))
    return {"seconds": time.perf_counter() - t0}


def role_api(weights: str, images: list[str], out: str) -> dict:
    """(b) ``maskseg.predict``; the network's forward (TorchBackend.infer) and model load timed inside."""
    from maskseg import ModelConfig, PredictConfig, predict
    from maskseg.backends import torch_backend

    timed = {"forward": 0.0, "load": 0.0}
    infer, load = torch_backend.TorchBackend.infer, torch_backend.TorchBackend.load.__func__

    def timed_infer(self, imgs):
        t = time.perf_counter()
        try:
            return infer(self, imgs)
        finally:
            timed["forward"] += time.perf_counter() - t

    def timed_load(cls, config):
        t = time.perf_counter()
        try:
            return load(cls, config)
        finally:
            timed["load"] += time.perf_counter() - t

    torch_backend.TorchBackend.infer = timed_infer
    torch_backend.TorchBackend.load = classmethod(timed_load)
    config = PredictConfig(model=ModelConfig(weights=weights, device="cpu", score_thresh=SCORE_THRESH,
                                             max_dets=MAX_DETS), writers=("coco", "results"))
    t0 = time.perf_counter()
    summary = predict(images, out, config)
    total = time.perf_counter() - t0 - timed["load"]
    if summary.done != len(images):
        raise RuntimeError(f"api: {summary.done} of {len(images)} images done")
    return {"seconds": total, "forward_seconds": timed["forward"], "load_seconds": timed["load"]}


READY_LINE = "inference rewrites"  # the CLI's log line once its model is loaded and prepared


def _spawn(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``: wall seconds, peak RSS (MB), the JSON its last stdout line holds (if any), and
    ``ready``: seconds from start until a stderr line containing READY_LINE arrived (None if none)."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
        err_lines: list[str] = []
        ready: list[float] = []

        def read_stderr() -> None:
            for line in proc.stderr:
                if READY_LINE in line and not ready:
                    ready.append(time.perf_counter() - t0)
                err_lines.append(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS)
        wall = time.perf_counter() - t0
        reader.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{''.join(err_lines)[-3000:]}")
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    result["wall"] = wall
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    if ready:
        result["seconds"] = wall - ready[0]  # the CLI's time after its model was ready
    return result


def run_role(role: str, weights: str, images: list[str], out: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    if role == "cli":
        cmd = [sys.executable, "-m", "maskseg", "predict", *images, "-o", out, "--weights", weights,
               "--device", "cpu", "--score-thresh", str(SCORE_THRESH), "--max-dets", str(MAX_DETS),
               "--writers", "coco,results", "--overwrite"]
    else:
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); "
                f"import torch; torch.set_num_threads({threads}); "
                f"from benchmarks.bench_predict import role_{role}; "
                f"r = role_{role}({weights!r}, {images!r}, {out!r}); "
                "print(json.dumps(r))")
        cmd = [sys.executable, "-c", code]
    result = _spawn(cmd, env)
    if "seconds" not in result:
        raise SystemExit(f"{role}: no in-run time (for the CLI: no '{READY_LINE}' log line on stderr)")
    return result


# ---- agreement ----------------------------------------------------------------------------------------

def _by_file(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["file_name"], []).append(r)
    return out


def maskseg_results(out_dir: Path) -> list[dict]:
    """results.json rows with ``file_name`` from predictions.json's images."""
    preds = json.loads((out_dir / "predictions.json").read_text())
    names = {img["id"]: Path(img["file_name"]).name for img in preds["images"]}
    return [{**r, "file_name": names[r["image_id"]]} for r in json.loads((out_dir / "results.json").read_text())]


def agreement(a: list[dict], b: list[dict]) -> dict:
    """Per image: same count?; detections of ``a`` matched in ``b`` (same class, box IoU >= 0.99 or every
    coordinate within 0.05 px: maskseg rounds boxes to 0.01 px, which moves the IoU of sub-pixel-wide
    boxes); the mask IoU of matched pairs (two empty masks agree)."""
    import numpy as np
    import torch
    from pycocotools import mask as mask_utils
    from torchvision.ops import box_iou

    def xyxy(rows):
        return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)]).reshape(-1, 4)

    def rle(row):
        return {"size": row["segmentation"]["size"], "counts": row["segmentation"]["counts"].encode()}

    ga, gb = _by_file(a), _by_file(b)
    same_count = set(ga) == set(gb) and all(len(ga[k]) == len(gb[k]) for k in ga)
    matched, mask_ious, box_diff = 0, [], 0.0
    for name, rows in ga.items():
        other = gb.get(name, [])
        if not other:
            continue
        ba, bb = xyxy(rows), xyxy(other)
        iou = box_iou(ba, bb).numpy()
        for i, r in enumerate(rows):
            j = int(np.argmax(iou[i]))
            diff = float((ba[i] - bb[j]).abs().max())
            if (iou[i, j] >= 0.99 or diff <= 0.05) and other[j]["category_id"] == r["category_id"]:
                matched += 1
                box_diff = max(box_diff, diff)
                ra, rb = rle(r), rle(other[j])
                empty = mask_utils.area([ra, rb]).max() == 0
                mask_ious.append(1.0 if empty else float(mask_utils.iou([ra], [rb], [0])[0, 0]))
    return {"count_a": len(a), "count_b": len(b), "same_count": same_count,
            "matched_pct": 100.0 * matched / max(len(a), 1), "box_max_diff": box_diff,
            "mask_iou_median": statistics.median(mask_ious) if mask_ious else float("nan"),
            "mask_iou_min": min(mask_ious) if mask_ious else float("nan"),
            "mask_iou_below_098": sum(v < 0.98 for v in mask_ious)}


# ---- report ---------------------------------------------------------------------------------------------

def _med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _fmt(v: tuple[float, float, float], unit: str) -> str:
    """``median [min-max]`` in 17 characters; ``unit`` 'x' appends x to the median."""
    mid = f"{v[0]:.2f}x" if unit == "x" else f"{v[0]:.2f}"
    return f"{mid:>6s} [{v[1]:.2f}-{v[2]:.2f}]".rjust(17)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2, help="images per size (3 sizes)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (a b c) x R; medians reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", type=Path, help="keep inputs, weights and outputs in this folder")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="maskseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    images = [str(p) for p in make_inputs(work / "images", args.images)]
    weights = work / "r50_random.pth"
    if not weights.exists():
        make_weights(weights)
    n = len(images)
    load = os.getloadavg()[0]
    print(f"{n} images ({', '.join(f'{w}x{h}' for w, h in SIZES)}, {args.images} each), torch threads "
          f"{args.threads}, {os.cpu_count()} CPUs, load average {load:.1f} at start, {args.rounds} rounds",
          flush=True)

    runs: dict[str, list[dict]] = {"loop": [], "api": [], "cli": []}
    for r in range(args.rounds):
        for role in runs:
            out = work / f"{role}_out{'.json' if role == 'loop' else ''}"
            if out.is_dir():
                shutil.rmtree(out)
            res = run_role(role, str(weights), images, str(out), args.threads)
            runs[role].append(res)
            in_run = res.get("seconds", res["wall"])
            print(f"  round {r + 1} {role:4s}: wall {res['wall']:.1f} s, in-run {in_run:.1f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    load_end = os.getloadavg()[0]

    def per_image(role: str, key: str) -> tuple[float, float, float]:
        return _med([x[key] / n for x in runs[role]])

    def ratio(role: str, key: str) -> tuple[float, float, float]:  # per round: loop / variant, paired
        return _med([a[key] / b[key] for a, b in zip(runs["loop"], runs[role], strict=True)])

    def rss_ratio(role: str) -> tuple[float, float, float]:
        return _med([b["peak_rss_mb"] / a["peak_rss_mb"] for a, b in zip(runs["loop"], runs[role], strict=True)])

    names = {"loop": "(a) hand-written loop", "api": "(b) maskseg.predict API", "cli": "(c) maskseg predict CLI"}
    print(f"\n{'variant':25s} {'s/image':>17s} {'speed-up':>17s} {'e2e s/image':>17s} {'speed-up':>17s} "
          f"{'peak RSS MB':>11s} {'RSS ratio':>17s}")
    for role, name in names.items():
        s_, e_, r_ = per_image(role, "seconds"), per_image(role, "wall"), ratio(role, "seconds")
        re_, m_ = ratio(role, "wall"), rss_ratio(role)
        rss = statistics.median(x["peak_rss_mb"] for x in runs[role])
        print(f"{name:25s} {_fmt(s_, 'f')} {_fmt(r_, 'x')} {_fmt(e_, 'f')} {_fmt(re_, 'x')} {rss:11.0f} "
              f"{_fmt(m_, 'x')}")
    outside = [1 - x["forward_seconds"] / x["seconds"] for x in runs["api"]]
    print(f"\n(b) share of in-run time outside the network's forward (decode, paste, RLE, JSON, journal): "
          f"{100 * statistics.median(outside):.1f}% [{100 * min(outside):.1f}-{100 * max(outside):.1f}]")
    print("s/image: after imports and model load (the CLI: from its model-ready log line to exit); e2e: the "
          "whole process. Speed-ups and RSS ratios are per round against the loop of that round (paired); "
          "median [min-max] over rounds.")
    a = json.loads((work / "loop_out.json").read_text())
    for role in ("api", "cli"):
        ag = agreement(a, maskseg_results(work / f"{role}_out"))
        print(f"agreement loop vs {role}: {ag['count_a']} vs {ag['count_b']} detections, same count per image: "
              f"{'yes' if ag['same_count'] else 'NO'}, {ag['matched_pct']:.1f}% matched (same class, box IoU >= "
              f"0.99 or within 0.05 px; largest box difference {ag['box_max_diff']:.3f} px), mask IoU of "
              f"matches median {ag['mask_iou_median']:.4f}, min {ag['mask_iou_min']:.4f}, "
              f"{ag['mask_iou_below_098']} below 0.98")

    speed, speed_e2e, rss = ratio("cli", "seconds")[0], ratio("cli", "wall")[0], rss_ratio("cli")[0]
    share = statistics.median(outside)
    print("\ntargets (CPU), for (c) the CLI against (a) the loop:")
    print(f"  s/image >= 1.5x faster: {speed:.2f}x {'met' if speed >= 1.5 else 'NOT met'} "
          f"(end to end with ~4 s of imports and model load on both sides: {speed_e2e:.2f}x)")
    print(f"  peak RSS <= 0.5x: {rss:.2f}x {'met' if rss <= 0.5 else 'NOT met'}")
    print(f"  outside-forward share <= 5%: {100 * share:.1f}% {'met' if share <= 0.05 else 'NOT met'}")
    print(f"load average {load:.1f} at start, {load_end:.1f} at end; inputs and outputs in {work}")


if __name__ == "__main__":
    main()
