"""OUT's own files: run.json (settings and classes), failures.jsonl, preparing and clearing the folder,
the settings check that keeps one OUT to one set of settings, and the writers' checkpoint.

``predict`` (api.py) and ``merge`` (merge.py) share these; the writers' own outputs are theirs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes
from .config import DEFAULT_POLYGON_TOLERANCE, PredictConfig
from .detections import Category
from .engine import ModelInfo
from .errors import OutputError, UsageError
from .journal import INDEX_NAME, JOURNAL_NAME, Journal, output_error
from .jsonio import dumps as json_dumps
from .writers import RunContext, Writer

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
FAILURES_FILE = "failures.jsonl"
OWNED_OUTPUTS = (JOURNAL_NAME, INDEX_NAME, f"{INDEX_NAME}-wal", f"{INDEX_NAME}-shm", RUN_FILE, FAILURES_FILE,
                 "predictions.json", "results.json", "overlays", "masks", "predictions_polygons.json", "yolo",
                 "labelstudio_tasks.json", "labelstudio_config.xml", "json")
FAILURE_FIELDS = ("path", "rel_path", "reason", "size", "mtime_ns")


def refuse_object_store_out(out: str) -> None:
    """``UsageError`` when OUT names object storage: OUT must be on a POSIX file system."""
    from .objects import looks_like_url

    if looks_like_url(out):
        scheme, _, rest = out.partition(":")
        out = f"{scheme}://{rest.lstrip('/')}"  # as typed: pathlib made s3://b/x into s3:/b/x
        raise UsageError(f"{out}: OUT must be a folder on a POSIX file system, not object storage (resume needs "
                         "an atomic rename, an appended journal and a lock, which object stores lack); write OUT "
                         "locally and upload it when the run has finished (e.g. aws s3 sync OUT s3://...)")


def prepare_out_dir(out: Path) -> Path:
    """Create OUT (and its parents) if needed; ``OutputError`` if it is a file or cannot be made,
    ``UsageError`` if it names object storage."""
    refuse_object_store_out(str(out))
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: the output path exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder: {exc.strerror}") from None
    return out


def clear_outputs(out: Path) -> None:
    """Remove what maskseg wrote into OUT (``--overwrite``); anything else in it is left alone."""
    for name in OWNED_OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def settings_of(config: PredictConfig, *, precision: str | None = None) -> dict[str, Any]:
    """The settings that make results comparable: a rerun with other ones must not resume into OUT.

    ``precision``: the one that runs (``--precision auto`` resolved); default ``config.model.precision``."""
    m = config.model
    precision = precision or m.precision
    settings: dict[str, Any] = {
        "model": m.name, "weights": str(Path(m.weights).resolve()) if m.weights else None,
        "score_thresh": m.score_thresh, "mask_thresh": config.mask_thresh, "max_dets": m.max_dets,
        "min_size": m.min_size, "max_size": m.max_size, "classes": sorted(config.classes),
    }
    if m.backend != "torch":  # recorded only when not the default, so earlier run.json files still match
        settings["backend"] = m.backend
        settings["labels"] = str(Path(m.labels).resolve()) if m.labels else None
    if precision != "fp32":  # bf16/fp16 move scores and masks slightly: not mixed with fp32 results
        settings["precision"] = precision
    if config.agnostic_nms is not None:  # only when on: earlier run.json files (without the key) still match
        settings["agnostic_nms"] = config.agnostic_nms
    if config.writer_options.polygon_tolerance != DEFAULT_POLYGON_TOLERANCE:  # per-image polygon files (yolo)
        settings["polygon_tolerance"] = config.writer_options.polygon_tolerance  # must not mix two tolerances
    if config.shard is not None:  # only when sharded: a plain run's run.json (and a merged one) has no key
        settings["shard"] = f"{config.shard[0]}/{config.shard[1]}"
    if config.tile.size is not None:  # tiled results differ from whole-image ones: recorded when tiling
        t = config.tile
        settings["tile"] = {"size": t.size or "auto", "overlap": t.overlap, "full": t.full}
    if config.tiff_pages:
        settings["tiff_pages"] = True
    if config.uint16 != "range":  # 16-bit images look different under another mapping
        settings["uint16"] = config.uint16
    if config.frames != type(config.frames)():  # which video frames run: recorded when not every frame
        settings["frames"] = {"stride": config.frames.stride, "fps": config.frames.fps}
    return settings


def check_settings(out: Path, config: PredictConfig, *, precision: str | None = None) -> dict:
    """Refuse to mix results of different settings in one OUT; returns run.json's content.

    ``precision``: as in ``settings_of``."""
    path = out / RUN_FILE
    wanted = settings_of(config, precision=precision)
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


def write_run_file(out: Path, run_file: dict) -> None:
    """Replace OUT/run.json atomically."""
    atomic_write_bytes(out / RUN_FILE, (json.dumps(run_file, indent=1) + "\n").encode())


def record_run(out: Path, run_file: dict, model: ModelInfo) -> dict:
    """run.json with the model's name and categories added; written only when it changed."""
    updated = {
        "settings": run_file["settings"],
        "model_name": model.name,
        "categories": [{"label": c.label, "id": c.id, "name": c.name} for c in model.categories],
    }
    if updated != run_file:
        write_run_file(out, updated)
    return updated


def categories_of(run_file: dict) -> list[Category]:
    """The categories run.json records (empty before a model has run)."""
    return [Category(c["label"], c["id"], c["name"]) for c in run_file.get("categories", [])]


def checkpoint(writers: list[Writer], journal: Journal, out: Path, context: RunContext, *,
               final: bool = False) -> None:
    """Let every writer refresh (or, ``final``, close) its outputs, and rewrite failures.jsonl if it changed."""
    try:
        for w in writers:
            w.close() if final else w.checkpoint()
        failures = out / FAILURES_FILE
        if context.changed or not failures.exists():
            lines = [json_dumps({k: r.get(k) for k in FAILURE_FIELDS}) + "\n" for r in journal.failure_records()]
            atomic_write_bytes(failures, "".join(lines).encode("utf-8"))
    except OSError as exc:
        raise output_error(out, exc) from None
