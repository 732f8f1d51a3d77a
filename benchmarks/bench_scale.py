"""Resume at scale: the journal's index and the resume check over millions of done images, no model.

Writes a recorded journal of N synthetic done records (each with two detections, RLE masks included,
as ``api.finish_image`` writes them), then, in a fresh process per step so RSS is the step's own:

- ``rebuild``: the first open of that journal (no index yet: every record is read once into
  ``journal.index``);
- ``resume``: a later run's start: open the journal (index current) and check N refs, generated one at
  a time, with ``Journal.pending`` as ``api.predict`` does; prints its start-up time, peak RSS and the
  resident growth per image over the process's RSS after imports;
- ``dict`` (baseline, measured in the same run): the in-memory index the journal had before
  (one ``Entry`` per path in a dict), built from the same records;
- ``refs``: what a scan held per image before it streamed (a list of N ``ImageRef``), for comparison.

``--scan-list N`` scans N real (empty) files the way ``maskseg predict @list.txt`` does, then checks them
against a journal that has them all done (``Journal.pending``, as ``api.predict``) and reads what is left
to do, as an engine would: time, peak RSS and resident growth per image after the scan and at the end.
``--baseline-src DIR`` runs the same steps with the maskseg found in DIR (e.g. ``git archive main``
unpacked there: the scan that held its refs in memory), each in its own process, in the same run.

Usage: python benchmarks/bench_scale.py [--images 1000000 5000000] [--keep DIR]
       python benchmarks/bench_scale.py --images --scan-list 1000000 --baseline-src /tmp/maskseg-main
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("MASKSEG_BENCH_SRC") or str(ROOT))
# The mtime of every file of a --scan-list tree, so the journal written beside it can say they are done.
TREE_MTIME_NS = 1_700_000_000_000_000_000


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rel_path(i: int) -> str:
    """The i-th path in path order (as a scan hands them over): 1,000 frames a folder."""
    return f"site-{i // 1_000_000:02d}/camera-{i // 1000 % 1000:03d}/frame_{i:09d}.jpg"


def write_journal(out: Path, n: int, *, rel_of=rel_path, size_of=lambda i: 100_000 + i % 5000,
                  mtime_of=lambda i: 1_700_000_000_000_000_000 + i) -> None:
    """N done records, written the way ``Journal.add`` writes them (compact JSON, one per line)."""
    det = {"bbox": [10.5, 20.25, 30.0, 40.75], "score": 0.9, "category_id": 1, "area": 1200,
           "segmentation": {"size": [600, 800], "counts": "eNpjYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGA="}}
    tail = json.dumps({"writers": ["coco"], "detections": [det, det]}, separators=(",", ":"))[1:]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "journal.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            rel = rel_of(i)
            head = json.dumps({"kind": "done", "image_id": i + 1, "rel_path": rel, "path": "/data/" + rel,
                               "size": size_of(i), "mtime_ns": mtime_of(i),
                               "width": 800, "height": 600}, separators=(",", ":"))
            fh.write(head[:-1] + "," + tail + "\n")


def make_scan_tree(top: Path, n: int) -> Path:
    """N empty .jpg files (1,000 a folder, mtime ``TREE_MTIME_NS``), ``list.txt`` naming them (relative to
    it, in reverse order: the scan sorts), and ``out/`` with a journal that has every one of them done."""
    tree = top / f"scan-{n}"
    if (tree / "out" / "journal.jsonl").exists():
        return tree
    for i in range(n):
        p = tree / rel_path(i)
        if i % 1000 == 0:
            p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
        os.utime(p, ns=(TREE_MTIME_NS, TREE_MTIME_NS))
    with open(tree / "list.txt", "w", encoding="utf-8") as fh:
        fh.writelines(rel_path(i) + "\n" for i in reversed(range(n)))
    # rel_path as predict names them: relative to the listed files' common folder.
    common = os.path.commonpath([os.path.dirname(rel_path(0)), os.path.dirname(rel_path(n - 1))])
    write_journal(tree / "out", n, rel_of=lambda i: os.path.relpath(rel_path(i), common),
                  size_of=lambda i: 0, mtime_of=lambda i: TREE_MTIME_NS)
    return tree


def rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def step(name: str, out: Path, n: int) -> dict:
    """One measurement, in this (fresh) process."""
    import maskseg
    from maskseg.journal import Journal
    from maskseg.sources import ImageRef

    base = rss_kb()
    t0 = time.perf_counter()
    result: dict = {"step": name, "images": n, "maskseg": os.path.dirname(maskseg.__file__)}
    if name == "rebuild":
        (out / "journal.index").unlink(missing_ok=True)
        j = Journal(out)
        result["open_s"] = time.perf_counter() - t0
        result["counts"] = j.counts
        j.close()
    elif name == "resume":
        j = Journal(out)
        result["open_s"] = time.perf_counter() - t0
        refs = (ImageRef("/data/" + rel, rel, rel[:-4], 100_000 + i % 5000, 1_700_000_000_000_000_000 + i)
                for i, rel in ((i, rel_path(i)) for i in range(n)))
        todo, skipped = j.pending(refs, ("coco",))  # as api.predict checks a scan's refs
        result["todo"] = len(todo)
        assert skipped == n, skipped
        result["start_s"] = time.perf_counter() - t0
        j.close()
    elif name == "dict":
        from maskseg.journal import Entry

        entries: dict[str, Entry] = {}
        offset = 0
        with open(out / "journal.jsonl", "rb") as fh:
            for line in fh:
                r = json.loads(line)
                entries[r["rel_path"]] = Entry("done", r["size"], r["mtime_ns"], offset, r["image_id"],
                                               writers=tuple(r["writers"]))
                offset += len(line)
        result["open_s"] = time.perf_counter() - t0
    elif name == "scan":  # out is a folder tree of n empty .jpg files: scan_sources as predict runs it
        from maskseg.sources import scan_sources

        scan = scan_sources([str(out)])
        result["open_s"] = time.perf_counter() - t0
        assert len(scan.refs) == n, len(scan.refs)
    elif name == "scan-list":  # out is a make_scan_tree folder: scan, resume check, what is left, as predict
        from maskseg.sources import scan_sources

        try:  # as api.predict scans: OUT never read from, the scan's database spilled into it
            scan = scan_sources([f"@{out / 'list.txt'}"], exclude=str(out / "out"), spill_dir=str(out / "out"))
        except TypeError:  # a --baseline-src from before spill_dir
            scan = scan_sources([f"@{out / 'list.txt'}"], exclude=str(out / "out"))
        assert len(scan.refs) == n, len(scan.refs)
        result["open_s"] = time.perf_counter() - t0
        result["scan_growth_b_per_image"] = (rss_kb() - base) * 1024 / n
        result["scan_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        j = Journal(out / "out")
        todo, skipped = j.pending(scan.refs, ("coco",))
        assert skipped == n and len(todo) == 0, (skipped, len(todo))
        result["start_s"] = time.perf_counter() - t0
        result["todo"] = sum(1 for _ in todo)  # what an engine would read
        j.close()
    elif name == "refs":
        refs = []
        for i in range(n):
            rel = rel_path(i)
            refs.append(ImageRef("/data/" + rel, rel, rel[:-4], 100_000 + i % 5000, 1_700_000_000_000_000_000 + i))
        result["open_s"] = time.perf_counter() - t0
    result["rss_after_mb"] = rss_kb() / 1024
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["growth_b_per_image"] = (rss_kb() - base) * 1024 / n
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="*", default=[1_000_000, 5_000_000])
    ap.add_argument("--keep", type=Path, help="folder to keep the journals in (default: a temp folder)")
    ap.add_argument("--baseline-max", type=int, default=1_000_000,
                    help="measure the dict baseline and the refs list only up to this many images")
    ap.add_argument("--scan-files", type=int, default=0,
                    help="also scan a tree of this many empty .jpg files (made once under --keep)")
    ap.add_argument("--scan-list", type=int, nargs="*", default=[],
                    help="scan a list of this many empty files and resume them all done (made once under --keep)")
    ap.add_argument("--baseline-src", type=Path,
                    help="also run --scan-list with the maskseg package found in this folder (the code before)")
    ap.add_argument("--step", nargs=3, metavar=("NAME", "OUT", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step(args.step[0], Path(args.step[1]), int(args.step[2]))))
        return
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); Python {platform.python_version()}")
    top = args.keep or Path(tempfile.mkdtemp(prefix="maskseg-scale-"))
    if args.scan_files:
        n, tree = args.scan_files, top / f"tree-{args.scan_files}"
        if not tree.exists():
            for i in range(n):
                p = tree / rel_path(i)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
        r = subprocess.run([sys.executable, __file__, "--step", "scan", str(tree), str(n)], capture_output=True,
                           text=True, check=True)
        res = json.loads(r.stdout.splitlines()[-1])
        print(f"\nscan of {n:,} files: {res['open_s']:.2f} s; peak RSS {res['peak_rss_mb']:.1f} MiB, "
              f"resident growth {res['growth_b_per_image']:.1f} B/image (the refs a run holds)")
    for n in args.scan_list:
        t0 = time.perf_counter()
        tree = make_scan_tree(top, n)
        subprocess.run([sys.executable, __file__, "--step", "rebuild", str(tree / "out"), str(n)], check=True,
                       capture_output=True)  # the index a later run finds
        print(f"\nlist of {n:,} files, all done in the journal (made in {time.perf_counter() - t0:.1f} s):")
        runs = {"streamed (this tree)": None}
        if args.baseline_src:
            runs = {"--baseline-src": str(args.baseline_src.resolve()), **runs}
        for label, src in runs.items():
            env = dict(os.environ, MASKSEG_BENCH_SRC=src) if src else dict(os.environ, MASKSEG_BENCH_SRC="")
            r = subprocess.run([sys.executable, __file__, "--step", "scan-list", str(tree), str(n)],
                               capture_output=True, text=True, check=True, env=env)
            res = json.loads(r.stdout.splitlines()[-1])
            assert res["maskseg"].startswith(src or str(ROOT)), res["maskseg"]
            print(f"  {label:21} scan {res['open_s']:6.2f} s, start (scan + check {n:,} refs) {res['start_s']:6.2f} s; "
                  f"after the scan: peak RSS {res['scan_peak_rss_mb']:7.1f} MiB, resident growth "
                  f"{res['scan_growth_b_per_image']:6.1f} B/image; at the end: peak RSS {res['peak_rss_mb']:7.1f} MiB, "
                  f"resident growth {res['growth_b_per_image']:6.1f} B/image")
    for n in args.images:
        out = top / f"out-{n}"
        t0 = time.perf_counter()
        if not (out / "journal.jsonl").exists():
            write_journal(out, n)
        size_mb = (out / "journal.jsonl").stat().st_size / 2**20
        print(f"\n{n:,} done records: journal.jsonl {size_mb:,.0f} MiB (written in {time.perf_counter() - t0:.1f} s)")
        steps = ["rebuild", "resume"] + (["dict", "refs"] if n <= args.baseline_max else [])
        results = {}
        for name in steps:
            r = subprocess.run([sys.executable, __file__, "--step", name, str(out), str(n)], capture_output=True,
                               text=True, check=True)
            results[name] = res = json.loads(r.stdout.splitlines()[-1])
            extra = f", start (open + check {n:,} refs) {res['start_s']:.2f} s, todo {res['todo']}" \
                if name == "resume" else ""
            print(f"  {name:8} open {res['open_s']:6.2f} s{extra}; peak RSS {res['peak_rss_mb']:7.1f} MiB, "
                  f"resident growth {res['growth_b_per_image']:6.1f} B/image")
        index_mb = (out / "journal.index").stat().st_size / 2**20
        print(f"  journal.index on disk: {index_mb:,.0f} MiB ({index_mb * 2**20 / n:.0f} B/image)")
        if "dict" in results:
            ratio = results["dict"]["growth_b_per_image"] / max(results["resume"]["growth_b_per_image"], 1)
            print(f"  resident growth: dict baseline / index = {ratio:.0f}x")


if __name__ == "__main__":
    main()
