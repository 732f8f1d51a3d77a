"""The Python API: ``predict`` runs sources -> decode -> batches -> model -> detections -> writers.

Everything the CLI does is a call into this module; it never prints (progress goes to the
``ProgressReporter`` it is given, diagnostics to ``logging``).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from .atomic import stale_temp_files
from .backends import resolve_model_precision
from .batching import Failure
from .config import PredictConfig
from .decode import DecodedImage
from .detections import Detections
from .engine import BatchResult, make_engine
from .journal import Journal, OutputLock, output_error
from .outdir import categories_of, check_settings, checkpoint, clear_outputs, prepare_out_dir, record_run
from .shard import shard_scan
from .sources import SourceScan, scan_sources
from .video import split_frame_name
from .writers import ImageRecord, RunContext, Writer, load_writers

log = logging.getLogger(__name__)

# Write errors that belong to one image's output names (too long, or not allowed on OUT's file system):
# that image fails and the run goes on. Any other write error (disk full, read-only...) ends the run.
_IMAGE_WRITE_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ})


class ProgressReporter(Protocol):
    """Receives a run's progress; the CLI draws it, the API default ignores it."""

    def start(self, total: int, skipped: int) -> None: ...

    def advance(self, images: int, detections: int) -> None: ...

    def failure(self, path: str, reason: str) -> None: ...


class SilentProgress:
    """The API's default ``ProgressReporter``: ignores everything."""

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
    started = time.monotonic()
    out = prepare_out_dir(Path(out_dir))
    summary = RunSummary(out_dir=str(out))
    try:
        with OutputLock(out):
            if config.overwrite:
                clear_outputs(out)
            for tmp in stale_temp_files(out):
                tmp.unlink(missing_ok=True)
            scan = _scan(inputs, out, config, summary, stdin)
            try:
                # run.json records what runs (auto -> bf16 or fp32), so resume never mixes the two.
                run_file = check_settings(out, config, precision=resolve_model_precision(config.model).name)
                journal = Journal(out)
                try:
                    _Run(out, config, journal, summary, progress or SilentProgress(), stop).run(scan, run_file)
                finally:
                    journal.close()
            finally:
                scan.close()
    except OSError as exc:  # anything not turned into a message closer to where it happened
        raise output_error(Path(exc.filename) if exc.filename else out, exc) from None
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _scan(inputs: list[str] | tuple[str, ...], out: Path, config: PredictConfig, summary: RunSummary,
          stdin: Any) -> SourceScan:
    # The scan's database goes in OUT: on the disk the run writes to (a temporary folder may be in RAM).
    scan = scan_sources(inputs, recursive=config.recursive, exclude=str(out), stdin=stdin, spill_dir=str(out))
    summary.found = len(scan.refs)
    if not scan.refs and not scan.problems:
        log.warning("no images found in %s", " ".join(inputs))
    if config.shard is not None:
        scan = shard_scan(scan, *config.shard)
        summary.found = len(scan.refs)
    return scan


class _Run:
    """One locked run over OUT: what every step of it shares (journal, writers, summary, progress)."""

    def __init__(self, out: Path, config: PredictConfig, journal: Journal, summary: RunSummary,
                 progress: ProgressReporter, stop: threading.Event | None) -> None:
        self.out = out
        self.config = config
        self.journal = journal
        self.summary = summary
        self.progress = progress
        self.stop = stop
        self.writers: list[Writer] = []
        self.context: RunContext | None = None

    def run(self, scan: SourceScan, run_file: dict) -> None:
        """sources -> engine (decode, batches, model) -> detections -> writers and journal."""
        config, journal, summary = self.config, self.journal, self.summary
        self.writers = load_writers(config.writers)
        todo, summary.skipped = journal.pending(scan.refs, config.writers)  # neither done nor failed as they are
        for problem in scan.problems:
            if not journal.is_known_failure(problem.rel_path, None, None, problem.reason):
                self.record_failure(problem.path, problem.rel_path, None, None, problem.reason)
        self.progress.start(len(todo), summary.skipped)
        if self.stopped():  # stopped while scanning: write consistent outputs, load no model
            todo = []

        engine = make_engine(config)
        if todo:
            run_file = record_run(self.out, run_file, engine.start())
        context = RunContext(self.out, journal, categories_of(run_file), run_file.get("model_name", config.model.name),
                             options=config.writer_options)
        context.changed = journal.appended > 0 or journal.has_pending or summary.failed > 0
        self.context = context
        for w in self.writers:
            w.open(context)

        last_checkpoint = time.monotonic()
        results = engine.run(todo, done=lambda r: journal.is_done(r, config.writers)) if todo else iter(())
        try:
            for step in results:
                self.finish_step(step)
                # The next batch is decoded while this loop waits for it: the finished one goes first.
                del step
                journal.flush()
                context.changed = context.changed or journal.appended > 0
                if self.stopped():
                    break
                if time.monotonic() - last_checkpoint > config.checkpoint_seconds:
                    checkpoint(self.writers, journal, self.out, context)
                    last_checkpoint = time.monotonic()
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
            engine.close()
        journal.flush()
        context.changed = context.changed or journal.appended > 0
        checkpoint(self.writers, journal, self.out, context, final=True)
        summary.failed_total = journal.counts[1]

    def finish_step(self, step: BatchResult) -> None:
        """Journal one batch's failures and hand each of its images to the writers."""
        for f in step.failures:
            self.record_decode_failure(f)
        for decoded, dets in zip(step.images, step.detections, strict=True):
            if self.finish_image(decoded, dets):
                self.progress.advance(1, len(dets))

    def stopped(self) -> bool:
        """Whether ``stop`` is set; marks the summary interrupted when it is."""
        if self.stop is not None and self.stop.is_set():
            self.summary.interrupted = -1
            return True
        return False

    def finish_image(self, decoded: DecodedImage, dets: Detections) -> bool:
        """Hand one image to the writers and journal it; False when its outputs could not be named."""
        ref, out = decoded.ref, self.out
        annotations = dets.to_coco()
        image_id = self.journal.image_id(ref.rel_path)
        record = ImageRecord(image_id, ref.path, ref.rel_path, ref.out_stem, decoded.width, decoded.height,
                             decoded.rgb, annotations)
        for w in self.writers:
            try:
                w.write(record, dets)
            except OSError as exc:
                where = Path(exc.filename) if exc.filename else out / ref.rel_path
                if exc.errno in _IMAGE_WRITE_ERRNOS:
                    shown = os.path.relpath(where, out) if where.is_absolute() else str(where)
                    self.record_decode_failure(Failure(ref, f"cannot write its output {shown}: {exc.strerror}",
                                                       decoded.size, decoded.mtime_ns))
                    return False
                raise output_error(where, exc) from None
        record = {"kind": "done", "image_id": image_id, "rel_path": ref.rel_path, "path": ref.path,
                  "size": decoded.size, "mtime_ns": decoded.mtime_ns}
        if ref.etag is not None:  # an object: its version (checked against the bytes read) keys resume
            record["etag"] = ref.etag
        record.update({"width": decoded.width, "height": decoded.height, "writers": list(self.config.writers),
                       "detections": annotations})
        frame = split_frame_name(ref.rel_path)
        if frame is not None:  # a video frame: the COCO writer names its video and index
            record["video"], record["frame_index"] = frame
        self.journal.add(record)
        self.summary.done += 1
        self.summary.detections += len(dets)
        return True

    def record_decode_failure(self, f: Failure) -> None:
        """Journal an image that could not be used (the sizes are those of the bytes read, when read)."""
        size, mtime_ns = (f.ref.size, f.ref.mtime_ns) if f.size is None else (f.size, f.mtime_ns)
        self.record_failure(f.ref.path, f.ref.rel_path, size, mtime_ns, f.reason, f.ref.etag)

    def record_failure(self, path: str, rel_path: str, size: int | None, mtime_ns: int | None, reason: str,
                       etag: str | None = None) -> None:
        """Journal one failed input, count it and report it."""
        record = {"kind": "failed", "rel_path": rel_path, "path": path, "size": size, "mtime_ns": mtime_ns}
        if etag is not None:
            record["etag"] = etag
        self.journal.add({**record, "reason": reason})
        self.summary.failed += 1
        self.progress.failure(path, reason)
        log.warning("%s: %s", path, reason)
