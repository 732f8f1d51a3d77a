"""Sliced inference on large images: maskseg --tile against no tiling and against SAHI, same weights.

Generates a scene set: objects cut out of the fruits_nuts photos (tests/data/fruits_nuts, MIT licence,
by their polygon annotations), scaled by ``--object-scale`` and pasted without overlap onto large plain
canvases; the generator writes the COCO ground truth (RLE masks) as it pastes. Then, each in its own
process (peak RSS from ``wait4``, wall time of the whole process including model loading):

- ``maskseg predict`` without tiling (the model resizes each whole canvas to its max size),
- ``maskseg predict --tile T`` (``--tile-overlap 0.2``),
- SAHI ``get_sliced_prediction`` with slices of T, overlap 0.2 and its default merge settings (GREEDYNMM /
  IOS 0.5, which it switches itself to NMS / box IoU 0.5 at a score threshold under 0.1, as here), on
  the same torchvision module with the same weights (the bundled demo model) and score threshold,

and ``maskseg eval`` gives each one's COCO segm and bbox AP against the ground truth. Usage:

    python benchmarks/bench_tiles.py [--scenes 3] [--size 4096] [--objects 40] [--tile 1024]
    python benchmarks/bench_tiles.py --scenes 1 --size 20000 --objects 400 --no-sahi   # the huge check
    python benchmarks/bench_tiles.py --scenes 1 --size 20000 --objects 400 --tiff --no-sahi --no-whole

``--tiff`` writes each scene as a tiled TIFF (512 px tiles, deflate; written tile by tile from a
generator, so making it never holds the canvas) and compares ``--tile T`` reading it by region (at the
default ``--max-pixels``, which a region read is not held to) with ``--tile T --no-tiff-regions``
(the same file decoded whole, ``--max-pixels`` raised to let it through): the benchmark switch.

The demo model was trained on all fruits_nuts photos but the last 20%: absolute AP is optimistic (the
objects were seen in training); the comparison between methods is what the benchmark is for.
Needs ``pip install 'maskseg[sahi]'`` for the SAHI column (``--no-sahi`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRUITS = ROOT / "tests" / "data" / "fruits_nuts"
SCORE = 0.05  # COCO evaluation wants the low-score tail (EVAL_SCORE_THRESH)


def cut_objects(scale: float) -> list[tuple[int, object, object]]:
    """(category_id, BGR patch, bool mask) for every fruits_nuts annotation, resized by ``scale``."""
    import cv2
    import numpy as np
    from pycocotools import mask as mask_utils

    data = json.loads((FRUITS / "trainval.json").read_text())
    files = {im["id"]: im for im in data["images"]}
    photos: dict[int, np.ndarray] = {}
    out = []
    for ann in data["annotations"]:
        im = files[ann["image_id"]]
        if im["id"] not in photos:
            photos[im["id"]] = cv2.imread(str(FRUITS / "images" / im["file_name"]))
        photo = photos[im["id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"]))
        full = mask_utils.decode(rle).astype(bool)
        ys, xs = np.nonzero(full)
        if len(xs) < 50:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        patch, m = photo[y0:y1, x0:x1], full[y0:y1, x0:x1]
        size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
        patch = cv2.resize(patch, size, interpolation=cv2.INTER_LINEAR)
        m = cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        out.append((ann["category_id"], patch, m))
    return out


def place_objects(rng, cut: list, size: int, objects: int) -> list[tuple[int, int, int, object, object]]:
    """Up to ``objects`` (category_id, x, y, BGR patch, bool mask) drawn from ``cut`` (half of them mirrored)
    at random places on a ``size`` x ``size`` canvas, 8 px apart; gives up after ``objects * 50`` tries."""
    import numpy as np

    placed: list[tuple[int, int, int, object, object]] = []
    tries = 0
    while len(placed) < objects and tries < objects * 50:
        tries += 1
        cat, patch, m = cut[int(rng.integers(len(cut)))]
        if rng.random() < 0.5:
            patch, m = patch[:, ::-1], m[:, ::-1]
        h, w = m.shape
        if w >= size or h >= size:
            continue
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        if any(x < px + pm.shape[1] + 8 and px < x + w + 8 and y < py + pm.shape[0] + 8 and py < y + h + 8
               for _, px, py, _, pm in placed):
            continue
        placed.append((int(cat), x, y, patch, np.ascontiguousarray(m)))
    return placed


def _annotation(ann_id: int, image_id: int, cat: int, x: int, y: int, m, size: int) -> dict:
    """The COCO ground-truth annotation of mask ``m`` pasted at (``x``, ``y``), RLE over the canvas."""
    import numpy as np

    from maskseg.detections import BoxMask

    ys, xs = np.nonzero(m)
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0, "area": int(m.sum()),
            "segmentation": BoxMask(x, y, m, (size, size)).rle(),
            "bbox": [x + int(xs.min()), y + int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]}


def make_scenes(folder: Path, n: int, size: int, objects: int, scale: float, seed: int = 0) -> Path:
    """``n`` JPEG canvases of ``size`` x ``size`` with ``objects`` pasted objects each; returns gt.json."""
    import cv2
    import numpy as np


    folder.mkdir(parents=True, exist_ok=True)
    gt_path = folder / "gt.json"
    if gt_path.exists():
        return gt_path
    rng = np.random.default_rng(seed)
    cut = cut_objects(scale)
    # The photos' own background colour (a light table), with a gentle gradient so the canvas is not flat.
    base = np.array([196, 206, 214], np.float32)
    images, anns = [], []
    for k in range(n):
        canvas = np.empty((size, size, 3), np.uint8)
        ramp = np.linspace(-12, 12, size, dtype=np.float32)
        for row in range(0, size, 1024):  # row bands, so a 20000 x 20000 canvas never needs a float copy
            r = ramp[row : row + 1024, None, None] + ramp[None, :, None] * 0.5
            canvas[row : row + 1024] = np.clip(base + r, 0, 255).astype(np.uint8)
        for cat, x, y, patch, m in place_objects(rng, cut, size, objects):
            region = canvas[y : y + m.shape[0], x : x + m.shape[1]]
            region[m] = patch[m]
            anns.append(_annotation(len(anns) + 1, k + 1, cat, x, y, m, size))
        name = f"scene{k:02d}.jpg"
        cv2.imwrite(str(folder / name), canvas, [cv2.IMWRITE_JPEG_QUALITY, 92])
        del canvas
        images.append({"id": k + 1, "file_name": name, "height": size, "width": size})
    cats = [{"id": 1, "name": "date"}, {"id": 2, "name": "fig"}, {"id": 3, "name": "hazelnut"}]
    gt_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return gt_path


def make_tiff_scenes(folder: Path, n: int, size: int, objects: int, scale: float, seed: int = 0,
                     block: int = 512) -> Path:
    """``make_scenes`` as tiled TIFFs (``block`` px tiles, deflate), each written tile by tile: objects are
    placed first, then every TIFF tile is drawn (background, then the objects over it) as tifffile asks
    for it, so only one tile of the canvas exists at a time. Returns gt.json."""
    import numpy as np
    import tifffile


    folder.mkdir(parents=True, exist_ok=True)
    gt_path = folder / "gt.json"
    if gt_path.exists():
        return gt_path
    rng = np.random.default_rng(seed)
    cut = cut_objects(scale)
    base = np.array([214, 206, 196], np.float32)  # make_scenes' background, RGB
    ramp = np.linspace(-12, 12, size, dtype=np.float32)
    images, anns = [], []
    for k in range(n):
        placed = []  # x, y, RGB patch, mask
        for cat, x, y, patch, m in place_objects(rng, cut, size, objects):
            placed.append((x, y, np.ascontiguousarray(patch[:, :, ::-1]), m))
            anns.append(_annotation(len(anns) + 1, k + 1, cat, x, y, m, size))
        by_block: dict[tuple[int, int], list[int]] = {}
        for i, (x, y, _, m) in enumerate(placed):
            for by in range(y // block, (y + m.shape[0] - 1) // block + 1):
                for bx in range(x // block, (x + m.shape[1] - 1) // block + 1):
                    by_block.setdefault((by, bx), []).append(i)

        def tiles(by_block=by_block, placed=placed):
            for ty in range(0, size, block):
                for tx in range(0, size, block):
                    r = ramp[ty : ty + block, None, None] + ramp[None, tx : tx + block, None] * 0.5
                    tile = np.zeros((block, block, 3), np.uint8)  # edge tiles: padded to the full tile
                    tile[: r.shape[0], : r.shape[1]] = np.clip(base + r, 0, 255).astype(np.uint8)
                    for i in by_block.get((ty // block, tx // block), ()):
                        x, y, patch, m = placed[i]
                        y0, y1 = max(y, ty), min(y + m.shape[0], ty + block, size)
                        x0, x1 = max(x, tx), min(x + m.shape[1], tx + block, size)
                        sel = m[y0 - y : y1 - y, x0 - x : x1 - x]
                        tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx][sel] = patch[y0 - y : y1 - y, x0 - x : x1 - x][sel]
                    yield tile

        name = f"scene{k:02d}.tif"
        tifffile.imwrite(folder / name, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(block, block),
                         compression="zlib", photometric="rgb", bigtiff=size * size * 3 > 2**31)
        images.append({"id": k + 1, "file_name": name, "height": size, "width": size})
    cats = [{"id": 1, "name": "date"}, {"id": 2, "name": "fig"}, {"id": 3, "name": "hazelnut"}]
    gt_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return gt_path


def run_measured(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess | None]:
    """Run ``cmd``; (wall seconds, peak RSS in MiB of that process, None on success or the failure)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env=dict(os.environ, PYTHONWARNINGS="ignore"))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        failed = None
        if code != 0:
            err.seek(0)
            failed = subprocess.CompletedProcess(cmd, code, "", err.read().decode(errors="replace")[-3000:])
    return wall, usage.ru_maxrss / 1024, failed


def evaluate(gt: Path, results: Path, out_json: Path, max_dets: int) -> dict[str, float]:
    if json.loads(results.read_text()) == []:  # no detections at all (maskseg eval refuses an empty list): AP 0
        return {"segm": 0.0, "bbox": 0.0}
    r = subprocess.run([sys.executable, "-m", "maskseg", "eval", "--coco", str(gt), "--results", str(results),
                        "--json", str(out_json), "--max-dets", str(max_dets)], capture_output=True, text=True)
    if r.returncode not in (0,):
        raise SystemExit(f"maskseg eval failed: {r.stderr[-2000:]}")
    metrics = json.loads(out_json.read_text())["metrics"]
    return {t: metrics[t]["stats"]["AP"]["value"] for t in ("segm", "bbox") if t in metrics}


def sahi_worker(folder: str, gt: str, out: str, tile: int, overlap: float) -> None:
    """In its own process: SAHI sliced prediction over the scenes with the demo model's torch module."""
    import cv2
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction

    from maskseg.config import ModelConfig
    from maskseg.models import load_model

    loaded = load_model(ModelConfig(name="demo", device="cpu", score_thresh=SCORE))
    mapping = {str(c.label): c.name for c in loaded.categories}
    model = TorchVisionDetectionModel(model=loaded.module, confidence_threshold=SCORE, category_mapping=mapping,
                                      device="cpu", load_at_init=True)
    results = []
    for im in json.loads(Path(gt).read_text())["images"]:
        rgb = cv2.cvtColor(cv2.imread(str(Path(folder) / im["file_name"])), cv2.COLOR_BGR2RGB)
        pred = get_sliced_prediction(rgb, model, slice_height=tile, slice_width=tile, overlap_height_ratio=overlap,
                                     overlap_width_ratio=overlap, perform_standard_pred=False, verbose=0)
        for r in pred.to_coco_predictions(image_id=im["id"]):
            r["category_id"] = int(r["category_id"])
            results.append(r)
    Path(out).write_text(json.dumps(results, default=float))


def _methods(args: argparse.Namespace, work: Path) -> list[tuple[str, object]]:
    """(name, command maker) per method; a maker takes (scenes folder, gt.json, tag) -> argv."""
    def maskseg(extra: list[str], name: str, *, max_pixels: bool = True):
        def cmd(scenes: Path, gt: Path, tag: str) -> list[str]:
            size = json.loads(gt.read_text())["images"][0]["width"]
            limit = ["--max-pixels", str(size * size + 1)] if max_pixels else []  # else the default
            return [sys.executable, "-m", "maskseg", "predict", str(scenes), "--model", "demo", "--device", "cpu",
                    "--score-thresh", str(SCORE), "--writers", "coco,results", "--workers", "0", *limit,
                    "--overwrite", "-q", "-o", str(work / f"{_slug(name)}-{tag}"), *extra]
        return name, cmd

    def sahi(scenes: Path, gt: Path, tag: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--sahi-worker", str(scenes), str(gt),
                str(work / f"{_slug(sahi_name)}-{tag}.json"), str(args.tile), str(args.overlap)]

    sahi_name = f"SAHI {args.tile} slices"
    methods = []
    if not args.no_whole:
        methods.append(maskseg([], "maskseg, whole image"))
    tile = ["--tile", str(args.tile), "--tile-overlap", str(args.overlap)]
    if args.tiff:
        methods.append(maskseg(tile, f"maskseg --tile {args.tile}, TIFF read by region", max_pixels=False))
        methods.append(maskseg([*tile, "--no-tiff-regions"], f"maskseg --tile {args.tile}, TIFF decoded whole"))
    else:
        # fp32 (what SAHI runs) and auto (bf16 where the CPU has it): the comparison both ways
        methods.append(maskseg([*tile, "--precision", "fp32"], f"maskseg --tile {args.tile}"))
        methods.append(maskseg([*tile, "--precision", "auto"], f"maskseg --tile {args.tile} --precision auto"))
    if not args.no_sahi:
        methods.append((sahi_name, sahi))
    return methods


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _results_of(work: Path, name: str, tag: str) -> Path:
    if name.startswith("SAHI"):
        return work / f"{_slug(name)}-{tag}.json"
    return work / f"{_slug(name)}-{tag}" / "results.json"


def cpu_line() -> tuple[str, str]:
    """('<model> (flags: ...)', what ``--precision auto`` runs here and why) for the header."""
    from maskseg.precision import cpu_bf16_flags, cpu_summary, resolve_precision

    auto = resolve_precision("auto", backend="torch", device_type="cpu")
    bf16 = cpu_bf16_flags()
    return (f"CPU: {cpu_summary()}, {os.cpu_count()} cores; bf16 in hardware: "
            f"{'yes (' + '/'.join(bf16) + ')' if bf16 else 'NO'}"), f"--precision auto runs {auto.name} ({auto.reason})"


# Issue 17's target for maskseg --tile against SAHI: AP at least SAHI's, at most half its peak RSS, 1.5x its speed.
TARGET_RSS, TARGET_SPEED = 0.5, 1.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--objects", type=int, default=40)
    ap.add_argument("--object-scale", type=float, default=1.5)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--overlap", type=float, default=0.2)
    ap.add_argument("--no-sahi", action="store_true")
    ap.add_argument("--no-whole", action="store_true", help="skip the run without tiling")
    ap.add_argument("--tiff", action="store_true",
                    help="scenes as tiled TIFFs; compare reading them by region with decoding them whole")
    ap.add_argument("--workdir", type=Path, default=None, help="keep scenes and outputs here (default: a temp dir)")
    ap.add_argument("--sahi-worker", nargs=5, metavar=("FOLDER", "GT", "OUT", "TILE", "OVERLAP"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sahi_worker:
        folder, gt, out, tile, overlap = args.sahi_worker
        sahi_worker(folder, gt, out, int(tile), float(overlap))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tiles_"))
    kind = "tiff" if args.tiff else "jpeg"
    scenes = work / f"scenes_{args.scenes}x{args.size}_{args.objects}_{args.object_scale}_{kind}"
    make = make_tiff_scenes if args.tiff else make_scenes
    t0 = time.perf_counter()
    gt = make(scenes, args.scenes, args.size, args.objects, args.object_scale)
    n_gt = len(json.loads(gt.read_text())["annotations"])
    cpu, auto = cpu_line()
    print(f"# {args.scenes} scene(s) of {args.size}x{args.size}, {n_gt} objects (fruits_nuts x{args.object_scale}), "
          f"generated in {time.perf_counter() - t0:.0f} s\n# {cpu}\n# {auto}", flush=True)
    if not auto.startswith("--precision auto runs bf16"):
        print("# (so the --precision auto row runs what the fp32 row runs: it equals it but for timing noise)")
    tiny = make(work / f"startup_{kind}", 1, 512, 1, args.object_scale)  # one 512 px image: startup cost
    rows = []
    for name, make_cmd in _methods(args, work):
        wall, rss, failed = run_measured(make_cmd(scenes, gt, "run"))
        if failed is not None:
            print(f"{name}: exit {failed.returncode}\n{failed.stderr}")
            continue
        startup, _, _ = run_measured(make_cmd(tiny.parent, tiny, "startup"))
        results = _results_of(work, name, "run")
        # COCOeval counts at most max_dets per image: room for every object (400 on the 20000 px canvas)
        ap_ = evaluate(gt, results, work / f"eval_{len(rows)}.json", max(100, 3 * args.objects))
        rows.append((name, ap_.get("segm", float("nan")), ap_.get("bbox", float("nan")), wall / args.scenes,
                     max(0.0, wall - startup) / args.scenes, rss))
        print(f"  {name}: done in {wall:.0f} s (startup {startup:.0f} s)", flush=True)
    print("| method | segm AP | bbox AP | s/image | s/image after startup | peak RSS MiB |\n"
          "|---|---|---|---|---|---|")
    for name, segm, bbox, spi, net, rss in rows:
        print(f"| {name} | {segm:.3f} | {bbox:.3f} | {spi:.1f} | {net:.1f} | {rss:.0f} |")
    tiled = next((r for r in rows if r[0].startswith("maskseg --tile")), None)
    whole_tiff = next((r for r in rows if r[0].endswith("TIFF decoded whole")), None)
    if tiled and whole_tiff and tiled is not whole_tiff:
        print(f"TIFF read by region vs decoded whole: peak RSS {tiled[5]:.0f} vs {whole_tiff[5]:.0f} MiB "
              f"({tiled[5] / whole_tiff[5]:.2f}x), s/image {tiled[3]:.1f} vs {whole_tiff[3]:.1f}")
    sahi = next((r for r in rows if r[0].startswith("SAHI")), None)
    for row in rows if sahi else []:
        if not row[0].startswith("maskseg --tile"):
            continue
        name, segm, _, spi, net, rss = row
        speed, speed_net, mem = sahi[3] / spi, sahi[4] / max(net, 1e-9), rss / sahi[5]
        met = [f"AP {'met' if segm >= sahi[1] else 'MISSED'}",
               f"speed {'met' if speed >= TARGET_SPEED else 'MISSED'}",
               f"RSS {'met' if mem <= TARGET_RSS else 'MISSED'}"]
        print(f"{name} vs SAHI: segm AP {segm:.3f} vs {sahi[1]:.3f}; speed {speed:.2f}x ({speed_net:.2f}x after "
              f"startup; target >= {TARGET_SPEED}x); peak RSS {mem:.2f}x ({rss:.0f} vs {sahi[5]:.0f} MiB; target "
              f"<= {TARGET_RSS}x); {', '.join(met)}")
    print(f"(outputs in {work})")


if __name__ == "__main__":
    main()
