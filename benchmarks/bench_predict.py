"""Speed and memory of maskseg against the hand-written torchvision loop, measured in ONE run.

Same images (real photos resized to 640x480, 1024x768 and 1920x1080), same weights (a torchvision
ResNet-50 FPN state dict with random weights whose classifier yields 100 detections per image with
well-spread scores, made here, and maskseg's ONNX export of it for the ONNX Runtime and OpenVINO rows),
each variant in its own process so peak RSS is its own, rounds interleaved (a b c ... a b c ...)
because the machine may be shared. The CPU's model and its bf16/int8 flags are printed first.

  loop       what users write: cv2 decode, model([img]) (torchvision pastes N x H x W float masks),
             threshold, pycocotools encode, one JSON at the end; fp32
  loop-bf16  the same under ``torch.autocast("cpu", torch.bfloat16)`` (what a user would try); only on
             a CPU with bf16 instructions (elsewhere it is hundreds of times slower: the row says so)
  api        maskseg's Python API, ``maskseg.predict(...)``, fp32, the network's forward timed inside it
  api-auto   the same with ``precision="auto"``
  cli        ``python -m maskseg predict ...`` as a user runs it, default precision
  cli-auto   the CLI with ``--precision auto`` (bf16 where the CPU runs it natively)
  ov         the CLI with ``--backend openvino`` on the ONNX export, OpenVINO's own precision choice
  ov-fp32    the same with ``--precision fp32``
  ort        the CLI with ``--backend onnxruntime`` on the ONNX export

Columns: ``s/image`` is the time per image once the model is ready (imports and model load excluded:
the loop and the API time themselves, the CLI from its model-ready log line to its exit, final JSON
included); ``e2e s/image`` is each process's wall time from start to exit over the images. Speed-ups
and RSS ratios are per round against that round's loop (paired), then the median [min-max] over
rounds. ``outside fwd`` is the share of the API's time not spent in the network's forward (decode,
paste, RLE, JSON, journal). Agreement: per image, detections matched by class and box, and the mask
IoU of matched pairs; fidelity of the reduced-precision rows against fp32 at box IoU >= 0.9. Usage:
    python benchmarks/bench_predict.py [--images N_PER_SIZE] [--rounds R] [--threads T] [--keep DIR]
                                       [--variants loop,cli,cli-auto,...]
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
    RPN's objectness logits are spread 1.5x wider than at random init (std 0.01): with hundreds of near
    ties, which proposals and detections are kept would depend on the last bits of float rounding. (30x,
    used before, overshot: logits up to ~237 made most proposals score exactly 1.0 in float32, and tie
    order, not the model, chose which 1000 the RPN kept.)
    """
    import torch

    from maskseg.models import coco_categories
    from maskseg.synth import random_maskrcnn

    model = random_maskrcnn("maskrcnn_resnet50_fpn", num_classes=91, min_size=800, max_size=1333, class_bias=2.0)
    real = {c.label for c in coco_categories()}
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.mul_(1.5)
        cls = model.roi_heads.box_predictor.cls_score
        cls.weight.mul_(0.2)
        for i in range(1, 91):
            if i not in real:  # COCO's N/A slots: never detected, so every output keeps all 100
                cls.bias[i] = -20.0
    torch.save(model.state_dict(), path)


# ---- the three variants, each run in a child process ------------------------------------------------

def role_loop(weights: str, images: list[str], out: str, bf16: bool = False) -> dict:
    """The hand-written loop; ``bf16``: its forward under ``torch.autocast("cpu", torch.bfloat16)``."""
    import contextlib

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
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            pred = model([x])[0]
        pred = {k: v.float() if v.is_floating_point() else v for k, v in pred.items()}
        masks = (pred["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        for j in range(len(pred["scores"])):
            rle = mask_utils.encode(np.asfortranarray(masks[j]))
            x1, y1, x2, y2 = pred["boxes"][j].tolist()
            results.append({"file_name": os.path.basename(path), "category_id": int(pred["labels"][j]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(pred["scores"][j]),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    Path(out).write_text(json.dumps(results))
    return {"seconds": time.perf_counter() - t0}


def role_api(weights: str, images: list[str], out: str, precision: str = "fp32") -> dict:
    """``maskseg.predict``; the network's forward (TorchBackend.infer) and model load timed inside."""
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
                                             max_dets=MAX_DETS, precision=precision), writers=("coco", "results"))
    t0 = time.perf_counter()
    summary = predict(images, out, config)
    total = time.perf_counter() - t0 - timed["load"]
    if summary.done != len(images):
        raise RuntimeError(f"api: {summary.done} of {len(images)} images done")
    return {"seconds": total, "forward_seconds": timed["forward"], "load_seconds": timed["load"]}


# The CLI's log lines once its model is loaded and prepared (torch, onnxruntime, openvino).
READY_LINES = ("inference rewrites", "onnxruntime model", "openvino model")


def _spawn(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``: wall seconds, peak RSS (MB), the JSON its last stdout line holds (if any), and
    ``ready``: seconds from start until a stderr line containing one of READY_LINES arrived (None if none)."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
        err_lines: list[str] = []
        ready: list[float] = []

        def read_stderr() -> None:
            for line in proc.stderr:
                if not ready and any(marker in line for marker in READY_LINES):
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


# name -> (row label, how it runs: a role function of this file, or the CLI with these extra arguments)
VARIANTS: dict[str, tuple[str, str | list[str]]] = {
    "loop": ("hand-written loop, fp32", "loop"),
    "loop-bf16": ("loop, autocast bf16", "loop_bf16"),
    "api": ("maskseg.predict API, fp32", "api"),
    "api-auto": ("maskseg.predict API, auto", "api_auto"),
    "cli": ("maskseg predict (default)", []),
    "cli-auto": ("maskseg --precision auto", ["--precision", "auto"]),
    "ov": ("OpenVINO, its default", ["--backend", "openvino", "--precision", "auto"]),
    "ov-fp32": ("OpenVINO fp32", ["--backend", "openvino", "--precision", "fp32"]),
    "ort": ("ONNX Runtime", ["--backend", "onnxruntime"]),
}
ONNX_VARIANTS = ("ov", "ov-fp32", "ort")


def run_variant(name: str, weights: str, onnx: str | None, images: list[str], out: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    how = VARIANTS[name][1]
    if isinstance(how, list):
        model = onnx if name in ONNX_VARIANTS else weights
        cmd = [sys.executable, "-m", "maskseg", "predict", *images, "-o", out, "--weights", model,
               "--device", "cpu", "--score-thresh", str(SCORE_THRESH), "--max-dets", str(MAX_DETS),
               "--threads", str(threads), "--writers", "coco,results", "--overwrite", *how]
    else:
        variants = {"loop_bf16": ("loop", ", bf16=True"), "api_auto": ("api", ", precision='auto'")}
        role, extra = variants.get(how, (how, ""))
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); "
                f"import torch; torch.set_num_threads({threads}); "
                f"from benchmarks.bench_predict import role_{role}; "
                f"r = role_{role}({weights!r}, {images!r}, {out!r}{extra}); "
                "print(json.dumps(r))")
        cmd = [sys.executable, "-c", code]
    result = _spawn(cmd, env)
    if "seconds" not in result:
        raise SystemExit(f"{name}: no in-run time (for the CLI: no model-ready log line on stderr)")
    return result


def export_onnx(weights: Path, out: Path) -> str | None:
    """maskseg's ONNX export of ``weights`` (made once), or None when the onnx extra is missing."""
    if out.exists():
        return str(out)
    proc = subprocess.run([sys.executable, "-m", "maskseg", "export", "--format", "onnx", "-o", str(out),
                           "--weights", str(weights), "--max-dets", str(MAX_DETS)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        print(f"ONNX export failed, rows {', '.join(ONNX_VARIANTS)} left out: {proc.stderr.strip()[-300:]}")
        return None
    return str(out)


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


def agreement(a: list[dict], b: list[dict], match_iou: float = 0.99) -> dict:
    """Per image: same count?; detections of ``a`` matched in ``b`` (same class, box IoU >= ``match_iou``
    or every coordinate within 0.05 px: maskseg rounds boxes to 0.01 px, which moves the IoU of
    sub-pixel-wide boxes); the mask IoU of matched pairs (two empty masks agree)."""
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
            if (iou[i, j] >= match_iou or diff <= 0.05) and other[j]["category_id"] == r["category_id"]:
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


def cpu_line() -> str:
    from maskseg.precision import INT8_CPU_FLAGS, cpu_bf16_flags, cpu_info, cpu_summary

    bf16 = cpu_bf16_flags()
    int8 = [f for f in INT8_CPU_FLAGS if f in cpu_info()[1]]
    return (f"CPU: {cpu_summary()}\n  bf16 in hardware: {'yes (' + '/'.join(bf16) + ')' if bf16 else 'NO'}; "
            f"int8 in hardware: {'yes (' + '/'.join(int8) + ')' if int8 else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1, help="images per size (3 sizes)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--keep", type=Path, help="keep inputs, weights and outputs in this folder")
    args = parser.parse_args()
    from maskseg.precision import BF16_CPU_FLAGS, cpu_bf16_flags

    print(cpu_line(), flush=True)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown or "loop" not in wanted:
        raise SystemExit(f"--variants: unknown {unknown}; 'loop' (the baseline) must be among them")
    if "loop-bf16" in wanted and not cpu_bf16_flags():
        wanted.remove("loop-bf16")
        print(f"  loop-bf16 left out: it needs {' or '.join(BF16_CPU_FLAGS)} (emulated bf16 is hundreds of "
              "times slower); cli-auto runs fp32 here")
    work = args.keep or Path(tempfile.mkdtemp(prefix="maskseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    images = [str(p) for p in make_inputs(work / "images", args.images)]
    weights = work / "r50_random.pth"
    if not weights.exists():
        make_weights(weights)
    onnx = export_onnx(weights, work / "r50_random.onnx") if set(wanted) & set(ONNX_VARIANTS) else None
    if onnx is None:
        wanted = [v for v in wanted if v not in ONNX_VARIANTS]
    n = len(images)
    load = os.getloadavg()[0]
    print(f"{n} images ({', '.join(f'{w}x{h}' for w, h in SIZES)}, {args.images} each), threads "
          f"{args.threads}, {os.cpu_count()} CPUs, load average {load:.1f} at start, {args.rounds} rounds",
          flush=True)

    runs: dict[str, list[dict]] = {v: [] for v in wanted}
    for r in range(args.rounds):
        for name in runs:
            out = work / f"{name}_out{'.json' if name.startswith('loop') else ''}"
            if out.is_dir():
                shutil.rmtree(out)
            res = run_variant(name, str(weights), onnx, images, str(out), args.threads)
            runs[name].append(res)
            print(f"  round {r + 1} {name:9s}: wall {res['wall']:.1f} s, in-run {res['seconds']:.1f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    load_end = os.getloadavg()[0]

    def per_image(name: str, key: str) -> tuple[float, float, float]:
        return _med([x[key] / n for x in runs[name]])

    def ratio(name: str, key: str, base: str = "loop") -> tuple[float, float, float]:  # per round, paired
        return _med([a[key] / b[key] for a, b in zip(runs[base], runs[name], strict=True)])

    def rss_ratio(name: str) -> tuple[float, float, float]:
        return _med([b["peak_rss_mb"] / a["peak_rss_mb"] for a, b in zip(runs["loop"], runs[name], strict=True)])

    print(f"\n{'variant':27s} {'s/image':>17s} {'vs loop':>17s} {'e2e s/image':>17s} {'vs loop':>17s} "
          f"{'peak RSS MB':>11s} {'RSS vs loop':>17s}")
    for name in runs:
        s_, e_, r_ = per_image(name, "seconds"), per_image(name, "wall"), ratio(name, "seconds")
        re_, m_ = ratio(name, "wall"), rss_ratio(name)
        rss = statistics.median(x["peak_rss_mb"] for x in runs[name])
        print(f"{name + ': ' + VARIANTS[name][0]:27s} {_fmt(s_, 'f')} {_fmt(r_, 'x')} {_fmt(e_, 'f')} "
              f"{_fmt(re_, 'x')} {rss:11.0f} {_fmt(m_, 'x')}")
    outside = [1 - x["forward_seconds"] / x["seconds"] for x in runs.get("api", [])]
    for name in ("api", "api-auto"):
        shares = [1 - x["forward_seconds"] / x["seconds"] for x in runs.get(name, [])]
        if shares:
            print(f"\n{name}: share of in-run time outside the network's forward (decode, paste, RLE, JSON, "
                  f"journal): {100 * statistics.median(shares):.1f}% [{100 * min(shares):.1f}-{100 * max(shares):.1f}]")
    print("s/image: after imports and model load (the CLI: from its model-ready log line to exit); e2e: the "
          "whole process. Ratios are per round against the loop of that round (paired), speed as loop/variant, "
          "RSS as variant/loop; median [min-max] over rounds.")

    def results_of(name: str) -> list[dict]:
        path = work / f"{name}_out"
        return json.loads(path.with_suffix(".json").read_text()) if name.startswith("loop") else maskseg_results(path)

    def describe(ag: dict) -> str:
        return (f"{ag['count_a']} vs {ag['count_b']} detections, {ag['matched_pct']:.1f}% matched, mask IoU of "
                f"matches median {ag['mask_iou_median']:.4f}, min {ag['mask_iou_min']:.4f}")

    loop = results_of("loop")
    print("\nagreement with the fp32 loop (same class, box IoU >= 0.99 or within 0.05 px):")
    for name in runs:
        if name in ("api", "cli", "ov-fp32", "ort"):
            print(f"  {name:9s}: {describe(agreement(loop, results_of(name)))}")
    print("fidelity of reduced precision against fp32 of the same runtime (targets: >= 97% of fp32 detections "
          "matched at box IoU >= 0.9 and the same class, median mask IoU >= 0.95):")
    for low, ref in (("cli-auto", "cli"), ("loop-bf16", "loop"), ("ov", "ov-fp32")):
        if low in runs and ref in runs:
            ag = agreement(results_of(ref), results_of(low), match_iou=0.9)
            ok = ag["matched_pct"] >= 97 and ag["mask_iou_median"] >= 0.95
            print(f"  {low:9s} vs {ref:7s}: {describe(ag)} -> {'met' if ok else 'NOT met'}")

    print("\ntargets (CPU):")
    if "cli" in runs:
        speed, rss = ratio("cli", "seconds")[0], rss_ratio("cli")[0]
        print(f"  maskseg default (cli) vs the fp32 loop: {speed:.2f}x faster (>= 3.5x on an AMX CPU: "
              f"{'met' if speed >= 3.5 else 'NOT met'}), peak RSS {rss:.2f}x "
              f"(<= 0.5x: {'met' if rss <= 0.5 else 'NOT met'})")
    if "cli-auto" in runs:
        print(f"  maskseg --precision auto vs the fp32 loop: {ratio('cli-auto', 'seconds')[0]:.2f}x faster, "
              f"peak RSS {rss_ratio('cli-auto')[0]:.2f}x")
        if "ov" in runs:
            vs_ov = ratio("cli-auto", "seconds", base="ov")[0]
            print(f"  maskseg --precision auto vs OpenVINO's default: {vs_ov:.2f}x (>= 1.3x: "
                  f"{'met' if vs_ov >= 1.3 else 'NOT met'})")
    if "cli" in runs and "ov" in runs:
        vs_ov = ratio("cli", "seconds", base="ov")[0]
        print(f"  maskseg default vs OpenVINO's default: {vs_ov:.2f}x "
              f"(>= 1.3x: {'met' if vs_ov >= 1.3 else 'NOT met'})")
    if outside:
        share = statistics.median(outside)
        print(f"  outside-forward share (api) <= 5%: {100 * share:.1f}% {'met' if share <= 0.05 else 'NOT met'}")
    print(f"load average {load:.1f} at start, {load_end:.1f} at end; inputs and outputs in {work}")


if __name__ == "__main__":
    main()
