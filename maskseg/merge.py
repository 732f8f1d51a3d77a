"""Merge the output folders of sharded runs (``--shard K/N``) into one maskseg OUT.

The merged OUT is an ordinary one: a journal and run.json (the settings without the shard), from
which the same writers rebuild predictions.json, results.json and failures.jsonl; overlay and mask
files are linked (or copied) in atomically. New images get ids in sorted relative-path order, as a
first plain run gives them, so merging the N shards of a run equals running it unsharded. Merging
again into the same OUT (after shards picked up new files) keeps the ids it gave before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .atomic import TEMP_MARK, stale_temp_files
from .errors import OutputError, UsageError
from .journal import JOURNAL_NAME, Journal, OutputLock
from .outdir import (
    FAILURES_FILE,
    RUN_FILE,
    categories_of,
    checkpoint,
    clear_outputs,
    prepare_out_dir,
    write_run_file,
)
from .writers import RunContext, load_writers

log = logging.getLogger(__name__)

# Writers whose outputs are rebuilt from the merged journal; overlay and mask files are carried over.
JOURNAL_WRITERS = ("coco", "results")
FILE_FOLDERS = ("overlays", "masks")
_FLUSH_EVERY = 1000


@dataclass
class MergeSummary:
    """What ``merge_outputs`` did: ``added`` journal records new to OUT, ``images``/``failed_total``
    what OUT holds afterwards, ``files`` overlay and mask files placed."""

    out_dir: str
    inputs: int = 0
    added: int = 0
    images: int = 0
    failed_total: int = 0
    files: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Latest(NamedTuple):
    """The latest journal record of one relative path in one input."""

    source: int  # index into the inputs
    offset: int
    kind: str
    size: int | None
    mtime_ns: int | None
    reason: str | None
    writers: tuple[str, ...]
    etag: str | None = None  # an object's version (object storage inputs)


def merge_outputs(inputs: Sequence[str | Path], out_dir: str | Path, *, overwrite: bool = False) -> MergeSummary:
    """Merge maskseg output folders ``inputs`` into ``out_dir``.

    Refuses (``UsageError``) inputs that are not maskseg outputs, that were made with other settings
    (the shard aside) or categories, that hold the same relative path twice, or that include OUT.
    Each input's lock is taken too, so a shard still running is never merged half-done (exit 75).
    """
    sources = _check_paths([Path(p) for p in inputs], Path(out_dir))
    out = prepare_out_dir(Path(out_dir))
    summary = MergeSummary(out_dir=str(out), inputs=len(sources))
    with contextlib.ExitStack() as stack:
        for folder in (out, *sources):
            stack.enter_context(OutputLock(folder))
        run_file = _merged_run_file(sources)
        index = _index_inputs(sources)
        if overwrite:
            clear_outputs(out)
        for tmp in stale_temp_files(out):
            tmp.unlink(missing_ok=True)
        before = _read_run(out)
        _check_out_run_file(out, before, run_file)
        if run_file is not None and run_file != before:  # first, as predict does: no journal without settings
            write_run_file(out, run_file)
        journal = Journal(out)
        try:
            summary.added = _merge_journals(sources, index, journal)
            summary.files = sum(_place_files(src, out) for src in sources)
            _rebuild(out, journal, run_file or before or {})
            summary.images, summary.failed_total = journal.counts
        finally:
            journal.close()
    return summary


def _check_paths(sources: list[Path], out: Path) -> list[Path]:
    if not sources:
        raise UsageError("merge: give the output folders to merge")
    out_real = os.path.realpath(out)
    seen: dict[str, Path] = {}
    for src in sources:
        if not (src / JOURNAL_NAME).is_file():
            raise UsageError(f"{src}: not a maskseg output folder (no {JOURNAL_NAME})")
        real = os.path.realpath(src)
        if real in seen:
            raise UsageError(f"{src}: given twice (also as {seen[real]})")
        seen[real] = src
        if _within(out_real, real) or _within(real, out_real):
            raise UsageError(f"{out}: the merged output folder must not be, contain or lie inside an input ({src})")
    return sources


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _read_run(folder: Path) -> dict | None:
    path = folder / RUN_FILE
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable run record ({type(exc).__name__})") from None
    if not isinstance(run, dict) or not isinstance(run.get("settings"), dict) or "categories" not in run:
        raise UsageError(f"{path}: not a maskseg run record (no settings or categories)")
    return run


def _merged_run_file(sources: list[Path]) -> dict | None:
    """run.json for the merged OUT: the inputs' settings without ``shard``; None if no input made one
    (inputs holding no finished image)."""
    merged: dict | None = None
    first: Path | None = None
    shards: set[str] = set()
    for src in sources:
        run = _read_run(src)
        if run is None:
            continue
        settings = dict(run["settings"])
        if "shard" in settings:
            shards.add(str(settings.pop("shard")))
        this = {"settings": settings, "model_name": run.get("model_name"), "categories": run["categories"]}
        if merged is None:
            merged, first = this, src
            continue
        if this["categories"] != merged["categories"]:
            raise UsageError(f"{src}: made with other categories than {first}; refusing to merge")
        want = merged["settings"]
        diff = [f"{k} {want.get(k)!r} in {first}, {settings.get(k)!r} here"
                for k in sorted(set(settings) | set(want)) if settings.get(k) != want.get(k)]
        if diff or this["model_name"] != merged["model_name"]:
            detail = "; ".join(diff) or f"model {merged['model_name']!r} in {first}, {this['model_name']!r} here"
            raise UsageError(f"{src}: made with other settings ({detail}); refusing to merge")
    _warn_missing_shards(shards)
    return merged


def _warn_missing_shards(shards: set[str]) -> None:
    counts = {s.split("/")[1] for s in shards}
    if len(counts) == 1:
        n = int(counts.pop())
        missing = sorted(set(range(1, n + 1)) - {int(s.split("/")[0]) for s in shards})
        if missing:
            log.warning("merging shards without %s of %d", ", ".join(map(str, missing)), n)


def _check_out_run_file(out: Path, before: dict | None, run_file: dict | None) -> None:
    if before is None or run_file is None:
        return
    if before["settings"] != run_file["settings"] or before["categories"] != run_file["categories"]:
        raise UsageError(f"{out} holds results made with other settings or categories than the inputs; "
                         "use --overwrite to start afresh, or another output folder")


def _index_inputs(sources: list[Path]) -> dict[str, _Latest]:
    """The latest record of every relative path across the inputs; a path in two inputs is refused."""
    index: dict[str, _Latest] = {}
    for n, src in enumerate(sources):
        for rel, latest in _journal_index(src / JOURNAL_NAME, n).items():
            other = index.get(rel)
            if other is not None:
                raise UsageError(f"{rel}: in both {sources[other.source]} and {src}; "
                                 "merge inputs must not overlap")
            index[rel] = latest
    return index


def _journal_index(path: Path, source: int) -> dict[str, _Latest]:
    """Read-only index of one journal (a torn last line, left by a kill, is ignored)."""
    latest: dict[str, _Latest] = {}
    offset = 0
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                try:
                    r = json.loads(line)
                    latest[r["rel_path"]] = _Latest(source, offset, r["kind"], r.get("size"), r.get("mtime_ns"),
                                                    r.get("reason"), tuple(r.get("writers", ())), r.get("etag"))
                except (ValueError, KeyError, TypeError):
                    log.warning("%s: unreadable record at byte %d ignored", path, offset)
                offset += len(line)
    except OSError as exc:
        raise OutputError(f"{path}: cannot read: {exc.strerror}") from None
    return latest


def _merge_journals(sources: list[Path], index: dict[str, _Latest], journal: Journal) -> int:
    """Append the inputs' latest records to OUT's journal; returns how many were new to it."""
    ids: dict[str, int | None] = {}
    for rel in sorted(index):  # new images are numbered in path order, as a first plain run numbers them
        latest = index[rel]
        if not _unchanged(journal, rel, latest):
            ids[rel] = journal.image_id(rel) if latest.kind == "done" else None
    by_source: dict[int, list[tuple[int, str]]] = {}
    for rel in ids:
        by_source.setdefault(index[rel].source, []).append((index[rel].offset, rel))
    for n, rows in sorted(by_source.items()):
        for k, record in enumerate(_read_records(sources[n] / JOURNAL_NAME, sorted(rows)), 1):
            image_id = ids[record["rel_path"]]
            if image_id is None:
                record.pop("image_id", None)
            else:
                record["image_id"] = image_id
            journal.add(record)
            if k % _FLUSH_EVERY == 0:
                journal.flush()
    journal.flush()
    return len(ids)


def _unchanged(journal: Journal, rel: str, latest: _Latest) -> bool:
    e = journal.entry(rel)
    return (e is not None and e.kind == latest.kind and e.size == latest.size and e.mtime_ns == latest.mtime_ns
            and e.etag == latest.etag and e.reason == latest.reason and set(latest.writers) <= set(e.writers))


def _read_records(path: Path, rows: list[tuple[int, str]]) -> Iterator[dict]:
    with open(path, "rb") as fh:
        for offset, _rel in rows:
            fh.seek(offset)
            yield json.loads(fh.readline())


def _place_files(src: Path, out: Path) -> int:
    """Carry ``src``'s overlay and mask files into OUT (hard links where possible), each atomically.
    A mask folder in OUT ends up with exactly the instance PNGs of the input's."""
    placed = 0
    for name in FILE_FOLDERS:
        top = src / name
        for root, _dirs, files in os.walk(top):
            rel_root = Path(root).relative_to(src)
            wanted = {f for f in files if not f.startswith(TEMP_MARK)}
            target = out / rel_root
            if name == "masks" and wanted and target.is_dir():
                for old in target.glob("*.png"):
                    if old.name not in wanted:
                        old.unlink()
            for f in sorted(wanted):
                placed += _place(Path(root) / f, target / f)
    return placed


def _place(src: Path, dst: Path) -> int:
    """Link or copy ``src`` to ``dst`` via a temp name and ``os.replace``; 0 when already the same."""
    try:
        st = src.stat()
        if dst.exists():
            dt = dst.stat()
            if (dt.st_ino, dt.st_dev) == (st.st_ino, st.st_dev) or (
                    dt.st_size == st.st_size and dt.st_mtime_ns == st.st_mtime_ns):
                return 0
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}-{dst.name}")
        try:
            try:
                os.link(src, tmp)
            except OSError:  # another file system, or links not allowed: copy (keeping the mtime)
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputError(f"{dst}: cannot place {src}: {exc.strerror}") from None
    return 1


def _rebuild(out: Path, journal: Journal, run_file: dict) -> None:
    """predictions.json / results.json (by the same writers as predict) and failures.jsonl."""
    named = journal.writers_used()
    for other in sorted(named - set(JOURNAL_WRITERS) - {"overlay", "masks"}):
        log.warning("writer %s: its outputs are not merged (merge rebuilds coco and results, and carries "
                    "overlay and masks files)", other)
    writers = load_writers([w for w in JOURNAL_WRITERS if w in named])
    context = RunContext(out, journal, categories_of(run_file), run_file.get("model_name") or "")
    context.changed = journal.appended > 0 or not (out / FAILURES_FILE).exists()
    for w in writers:
        w.open(context)
    checkpoint(writers, journal, out, context, final=True)
