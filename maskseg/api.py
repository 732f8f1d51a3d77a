"""The Python API: ``predict`` runs sources -> decode -> batches -> model -> detections -> writers.

Everything the CLI does is a call into this module; it never prints (progress goes to the
``ProgressReporter`` it is given, diagnostics to ``logging``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from .atomic import atomic_write_bytes, stale_temp_files
from .batching import Failure
from .config import PredictConfig
from .decode import DecodedImage
from .engine import ModelInfo, make_engine
from .errors import OutputError, UsageError
from .journal import JOURNAL_NAME, Journal, OutputLock, output_error
from .jsonio import dumps as json_dumps
from .shard import shard_scan
from .sources import ImageRef, SourceScan, scan_sources
from .writers import ImageRecord, RunContext, load_writers

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
FAILURES_FILE = "failures.jsonl"
_OWNED_OUTPUTS = (JOURNAL_NAME, RUN_FILE, FAILURES_FILE, "predictions.json", "results.json", "overlays", "masks")
# Write errors that belong to one image's output names (too long, or not allowed on OUT's file system):
# that image fails and the run goes on. Any other write error (disk full, read-only...) ends the run.
_IMAGE_WRITE_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ})


class ProgressReporter(Protocol):
    """Receives a run's progress; the CLI draws it, the API default ignores it."""

    def start(self, total: int, skipped: int) -> None: ...

    def advance(self, images: int, detections: int) -> None: ...

    def failure(self, path: str, reason: str) -> None: ...


class _Silent:
    def start(self, total: int, skipped: int) -> None:
        pass

    def advance(self, images: int, detections: int) -> None:
        pass

    def failure(self, path: str, reason: str) -> None:
        pass


@dataclass
class RunSummary:
    """What a ``predict`` run did. ``failed`` counts this run's new failures; ``failed_total`` all
    inputs whose latest attempt failed (the lines of failures.jsonl)."""

    out_dir: str
    found: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failed_total: int = 0
    detections: int = 0
    seconds: float = 0.0
    interrupted: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict(
    inputs: list[str] | tuple[str, ...],
    out_dir: str | Path,
    config: PredictConfig | None = None,
    *,
    progress: ProgressReporter | None = None,
    stop: threading.Event | None = None,
    stdin: Any = None,
) -> RunSummary:
    """Segment every image named by ``inputs`` into ``out_dir``, resuming what an earlier run did.

    ``inputs`` are folders, files, globs, ``@list`` files or ``-`` (paths on ``stdin``). Setting
    ``stop`` ends the run after the batch in flight, with consistent outputs
    (``RunSummary.interrupted`` is then set by the caller's signal number, or -1).
    Raises ``MasksegError`` subclasses for problems the user can fix.
    """
    config = config or PredictConfig()
    progress = progress or _Silent()
    started = time.monotonic()
    out = _prepare_out_dir(Path(out_dir))
    summary = RunSummary(out_dir=str(out))
    try:
        _locked_run(inputs, out, config, summary, progress, stop, stdin)
    except OSError as exc:  # anything not turned into a message closer to where it happened
        raise output_error(Path(exc.filename) if exc.filename else out, exc) from None
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _locked_run(
    inputs: list[str] | tuple[str, ...],
    out: Path,
    config: PredictConfig,
    summary: RunSummary,
    progress: ProgressReporter,
    stop: threading.Event | None,
    stdin: Any,
) -> None:
    with OutputLock(out):
        if config.overwrite:
            _clear_outputs(out)
        for tmp in stale_temp_files(out):
            tmp.unlink(missing_ok=True)
        scan = scan_sources(inputs, recursive=config.recursive, exclude=str(out), stdin=stdin)
        summary.found = len(scan.refs)
        if not scan.refs and not scan.problems:
            log.warning("no images found in %s", " ".join(inputs))
        if config.shard is not None:
            scan = shard_scan(scan, *config.shard)
            summary.found = len(scan.refs)
        run_file = _check_settings(out, config)
        journal = Journal(out)
        try:
            _run(scan, journal, out, config, run_file, summary, progress, stop)
        finally:
            journal.close()


def _run(
    scan: SourceScan,
    journal: Journal,
    out: Path,
    config: PredictConfig,
    run_file: dict,
    summary: RunSummary,
    progress: ProgressReporter,
    stop: threading.Event | None,
) -> None:
    writers = load_writers(config.writers)
    todo = [r for r in scan.refs if not journal.is_done(r, config.writers)]
    summary.skipped = len(scan.refs) - len(todo)
    for problem in scan.problems:
        if not journal.is_known_failure(problem.rel_path, None, None, problem.reason):
            journal.add(_failure_record(problem.path, problem.rel_path, None, None, problem.reason))
            summary.failed += 1
            progress.failure(problem.path, problem.reason)
            log.warning("%s: %s", problem.path, problem.reason)
    todo = [r for r in todo if not _known_failure(journal, r)]
    progress.start(len(todo), summary.skipped)
    if stop is not None and stop.is_set():  # stopped while scanning: write consistent outputs, load no model
        summary.interrupted = -1
        todo = []

    engine = make_engine(config)
    if todo:
        run_file = _record_run(out, run_file, engine.start())
    context = RunContext(out, journal, _categories_of(run_file), run_file.get("model_name", config.model.name))
    context.changed = journal.appended > 0 or journal.has_pending or summary.failed > 0
    for w in writers:
        w.open(context)

    last_checkpoint = time.monotonic()
    results = engine.run(todo) if todo else iter(())
    try:
        for step in results:
            for f in step.failures:
                _record_failure(journal, f, summary, progress)
            for decoded, dets in zip(step.images, step.detections, strict=True):
                if _finish_image(decoded, dets, journal, writers, config, summary, progress, out):
                    progress.advance(1, len(dets))
            journal.flush()
            context.changed = context.changed or journal.appended > 0
            if stop is not None and stop.is_set():
                summary.interrupted = -1
                break
            if time.monotonic() - last_checkpoint > config.checkpoint_seconds:
                _checkpoint(writers, journal, out, context)
                last_checkpoint = time.monotonic()
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        engine.close()
    journal.flush()
    context.changed = context.changed or journal.appended > 0
    _checkpoint(writers, journal, out, context, final=True)
    summary.failed_total = journal.counts[1]


def _finish_image(
    decoded: DecodedImage, dets: Any, journal: Journal, writers: list, config: PredictConfig, summary: RunSummary,
    progress: ProgressReporter, out: Path,
) -> bool:
    """Hand one image to the writers and journal it; False when its outputs could not be named."""
    ref = decoded.ref
    annotations = dets.to_coco()
    image_id = journal.image_id(ref.rel_path)
    record = ImageRecord(image_id, ref.path, ref.rel_path, ref.out_stem, decoded.width, decoded.height,
                         decoded.rgb, annotations)
    for w in writers:
        try:
            w.write(record, dets)
        except OSError as exc:
            where = Path(exc.filename) if exc.filename else out / ref.rel_path
            if exc.errno in _IMAGE_WRITE_ERRNOS:
                shown = os.path.relpath(where, out) if where.is_absolute() else str(where)
                _record_failure(journal, Failure(ref, f"cannot write its output {shown}: {exc.strerror}",
                                                 decoded.size, decoded.mtime_ns), summary, progress)
                return False
            raise output_error(where, exc) from None
    journal.add({
        "kind": "done", "image_id": image_id, "rel_path": ref.rel_path, "path": ref.path,
        "size": decoded.size, "mtime_ns": decoded.mtime_ns, "width": decoded.width, "height": decoded.height,
        "writers": list(config.writers), "detections": annotations,
    })
    summary.done += 1
    summary.detections += len(dets)
    return True


def _known_failure(journal: Journal, ref: ImageRef) -> bool:
    e = journal.entries.get(ref.rel_path)
    return e is not None and e.kind == "failed" and e.size == ref.size and e.mtime_ns == ref.mtime_ns


def _record_failure(journal: Journal, f: Failure, summary: RunSummary, progress: ProgressReporter) -> None:
    size, mtime_ns = (f.ref.size, f.ref.mtime_ns) if f.size is None else (f.size, f.mtime_ns)
    journal.add(_failure_record(f.ref.path, f.ref.rel_path, size, mtime_ns, f.reason))
    summary.failed += 1
    progress.failure(f.ref.path, f.reason)
    log.warning("%s: %s", f.ref.path, f.reason)


def _failure_record(path: str, rel_path: str, size: int | None, mtime_ns: int | None, reason: str) -> dict:
    return {"kind": "failed", "rel_path": rel_path, "path": path, "size": size, "mtime_ns": mtime_ns,
            "reason": reason}


def _checkpoint(writers: list, journal: Journal, out: Path, context: RunContext, *, final: bool = False) -> None:
    try:
        for w in writers:
            w.close() if final else w.checkpoint()
        failures = out / FAILURES_FILE
        if context.changed or not failures.exists():
            lines = [json_dumps({k: r.get(k) for k in ("path", "rel_path", "reason", "size", "mtime_ns")}) + "\n"
                     for r in journal.failure_records()]
            atomic_write_bytes(failures, "".join(lines).encode("utf-8"))
    except OSError as exc:
        raise output_error(out, exc) from None


def _prepare_out_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: the output path exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder: {exc.strerror}") from None
    return out


def _clear_outputs(out: Path) -> None:
    for name in _OWNED_OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _settings(config: PredictConfig) -> dict[str, Any]:
    m = config.model
    settings: dict[str, Any] = {
        "model": m.name, "weights": str(Path(m.weights).resolve()) if m.weights else None,
        "score_thresh": m.score_thresh, "mask_thresh": config.mask_thresh, "max_dets": m.max_dets,
        "min_size": m.min_size, "max_size": m.max_size, "classes": sorted(config.classes),
    }
    if m.backend != "torch":  # recorded only when not the default, so earlier run.json files still match
        settings["backend"] = m.backend
        settings["labels"] = str(Path(m.labels).resolve()) if m.labels else None
    if m.precision != "fp32":  # mixed precision moves scores and masks slightly: not mixed with fp32 results
        settings["precision"] = m.precision
    if config.shard is not None:  # only when sharded: a plain run's run.json (and a merged one) has no key
        settings["shard"] = f"{config.shard[0]}/{config.shard[1]}"
    return settings


def _check_settings(out: Path, config: PredictConfig) -> dict:
    """Refuse to mix results of different settings in one OUT; returns run.json's content."""
    path = out / RUN_FILE
    wanted = _settings(config)
    if not path.exists():
        return {"settings": wanted}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        before = previous["settings"]
    except (OSError, ValueError, KeyError):
        log.warning("%s is unreadable; it will be rewritten", path)
        return {"settings": wanted}
    diff = [f"{k} {before.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(wanted) | set(before))
            if before.get(k) != wanted.get(k)]
    if diff:
        raise UsageError(f"{out} holds results made with other settings ({'; '.join(diff)}); "
                         "use --overwrite to start afresh, or another output folder")
    return previous


def _record_run(out: Path, run_file: dict, model: ModelInfo) -> dict:
    updated = {
        "settings": run_file["settings"],
        "model_name": model.name,
        "categories": [{"label": c.label, "id": c.id, "name": c.name} for c in model.categories],
    }
    if updated != run_file:
        atomic_write_bytes(out / RUN_FILE, (json.dumps(updated, indent=1) + "\n").encode())
    return updated


def _categories_of(run_file: dict) -> list:
    from .detections import Category

    return [Category(c["label"], c["id"], c["name"]) for c in run_file.get("categories", [])]
