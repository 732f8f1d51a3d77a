"""The ``ray`` engine: decode and the model spread over a Ray cluster with Ray Data; results stream back.

The pipeline is ``from_arrow(idx, path) -> map_batches(decode_rows)`` (stateless tasks, retried when a
worker dies) ``-> map_batches(ModelWorker)`` (an actor pool: the model is loaded once per actor, on its
GPU when it has one; an actor that dies is restarted and its batch retried). The driver iterates the
results in input order and hands them to ``api.predict``, which feeds the same journal and writers as
the local engine, so resume, the lock, failures and exit codes are unchanged. A long run goes through
that pipeline in windows of ``IMAGES_PER_WINDOW`` images, so the driver never holds every path at once.

Images are read by the workers from their paths: on a cluster, the inputs (and ``--weights``) must be
on storage every node sees at the same path, and maskseg must be installed on every node. Objects in
object storage (``s3://...``) are read by the workers from their URLs, never through the driver.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .. import errors
from ..batching import Failure, segment_batch
from ..batching import decode_or_failure as attempt_decode  # the local engine's per-image decode: the same failures
from ..config import DEFAULT_UINT16, ModelConfig, PredictConfig
from ..decode import DecodedImage, decode_image
from ..errors import MasksegError, UsageError
from ..sources import ImageRef
from .base import BatchResult, ModelInfo

log = logging.getLogger(__name__)

# Logical CPUs a decode task asks for. Differing from the model actors' request also keeps Ray Data
# from fusing decode into the actors, so decoding overlaps the model instead of stalling it.
DECODE_CPUS = 0.5
# Object store of a Ray started here: small, because Ray Data's back-pressure keeps only a few
# blocks in flight anyway (Ray's own default is 30% of RAM).
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
# At most this many images per input block (fewer for short runs, so they still spread out).
MAX_ROWS_PER_BLOCK = 16
# Images per Ray Data run. A run's input blocks (the paths, as Arrow) are built before it starts, so a
# long run goes in windows of this many, one after the other, and the driver holds one window's paths,
# not all of them; each window starts its actors (and loads their models) again: seconds, against the
# hours of work in a window.
IMAGES_PER_WINDOW = 50_000
# The last line of a traceback that a maskseg error ended (Ray passes an actor's start-up error as text).
_ERROR_LINE = re.compile(r"^maskseg\.errors\.(\w+): (.*)$", re.MULTILINE)
# Built-in writers that never read pixels: without others, the driver gets sizes back, not pixels.
PIXEL_FREE_WRITERS = frozenset({"coco", "results", "masks", "polygons", "yolo", "labelstudio", "json"})


def require_ray() -> Any:
    """Import ``ray`` (with Ray Data), or raise ``UsageError`` saying what to install."""
    try:
        import ray
        import ray.data  # Ray Data (pyarrow, pandas) is the [data] extra of ray
    except ImportError as exc:
        raise UsageError(f"--engine ray needs Ray Data ({exc.name or 'ray'} is missing): "
                         "pip install 'maskseg[ray]'") from None
    return ray


def import_ray_data() -> None:
    """Ray worker setup hook: import ``ray.data`` whole before a task unpickles one of its submodules.

    Ray 2.60's ray.data has an import cycle that fails ("cannot import name 'InputData' from partially
    initialized module") when a fresh worker's first import of it is a planner module, as happens to
    a worker started after a node is lost mid-run.
    """
    import ray.data  # noqa: F401


def decode_rows(batch: dict[str, np.ndarray], *, max_pixels: int, uint16: str = DEFAULT_UINT16) -> dict[str, Any]:
    """Ray Data task: rows ``idx``, ``path`` (file-system bytes) -> the same plus ``rgb`` ([H, W, 3]
    uint8; [0, 0, 3] on failure), ``size``, ``mtime_ns`` (of the bytes read; -1 when not read whole) and
    ``error`` (the reason as UTF-8 bytes, empty when decoded), as the local engine's decode gives them.

    A file that cannot be used becomes an ``error`` row, never a failed task.
    """
    n = len(batch["idx"])
    rgbs: list[np.ndarray] = []
    sizes = np.full(n, -1, np.int64)
    mtimes = np.full(n, -1, np.int64)
    errors = np.full(n, b"", dtype=object)
    etags = batch.get("etag")
    for i, raw in enumerate(batch["path"]):
        path = os.fsdecode(bytes(raw))
        etag = str(etags[i]) if etags is not None and etags[i] else None  # an object: read here, by URL
        item = attempt_decode(lambda ref: decode_image(ref, max_pixels=max_pixels, uint16=uint16), _ref(path, etag))
        if isinstance(item, Failure):
            rgbs.append(np.zeros((0, 0, 3), np.uint8))
            errors[i] = _encode(item.reason)
            if item.size is not None:
                sizes[i], mtimes[i] = item.size, item.mtime_ns
        else:
            rgbs.append(item.rgb)
            sizes[i], mtimes[i] = item.size, item.mtime_ns
    return {"idx": batch["idx"], "path": batch["path"], "rgb": rgbs, "size": sizes, "mtime_ns": mtimes,
            "error": errors}


class ModelWorker:
    """Ray Data callable class: one per actor, holding one loaded model.

    Takes decoded rows; returns ``idx``, ``size``, ``mtime_ns``, ``error``, ``dets`` (a pickled
    ``Detections``, empty for failed rows), ``height``, ``width`` and, when ``ship_pixels``, ``rgb``.
    An image the model cannot take becomes an ``error`` row, as in the local engine.
    Pickle is Ray's own transport between the processes of one job; nothing outside it is unpickled.
    """

    def __init__(self, model: ModelConfig, *, mask_thresh: float, classes: tuple[str, ...], threads: int,
                 ship_pixels: bool, agnostic_nms: float | None = None) -> None:
        import torch

        from ..segmenter import Segmenter

        torch.set_num_threads(threads)
        self.segmenter = Segmenter(model, mask_thresh=mask_thresh, classes=classes, agnostic_nms=agnostic_nms)
        self.ship_pixels = ship_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["idx"])
        out = {k: batch[k].copy() for k in ("idx", "size", "mtime_ns", "error")}
        # Ray hands read-only views of its object store; the backends want arrays they may wrap.
        decoded = {i: DecodedImage(_ref(os.fsdecode(bytes(batch["path"][i]))),
                                   np.require(batch["rgb"][i], requirements="W"),
                                   int(batch["size"][i]), int(batch["mtime_ns"][i]))
                   for i in range(n) if not batch["error"][i]}
        row = {id(d.ref): i for i, d in decoded.items()}
        images, detections, failures = segment_batch(self.segmenter, list(decoded.values()))
        dets = np.full(n, b"", dtype=object)
        for d, found in zip(images, detections, strict=True):
            dets[row[id(d.ref)]] = pickle.dumps(found, protocol=pickle.HIGHEST_PROTOCOL)
        for f in failures:
            out["error"][row[id(f.ref)]] = _encode(f.reason)
        out["dets"] = dets
        out["height"] = np.array([batch["rgb"][i].shape[0] for i in range(n)], np.int64)
        out["width"] = np.array([batch["rgb"][i].shape[1] for i in range(n)], np.int64)
        if self.ship_pixels:
            out["rgb"] = batch["rgb"]
        return out


def _ref(path: str, etag: str | None = None) -> ImageRef:
    """An ``ImageRef`` for a worker, which knows only the path or URL, and an object's ETag (the driver
    keeps the real refs)."""
    return ImageRef(path, path, path, -1, -1, etag)


def _encode(reason: str) -> bytes:
    return reason.encode("utf-8", "surrogateescape") or b"failed"


class RayEngine:
    """Runs ``config`` on Ray: ``config.engine.workers`` model actors of ``threads_per_worker`` torch
    threads and ``gpus_per_worker`` GPUs each, decode in tasks beside them.

    Joins ``config.engine.address`` (``auto``, ``HOST:6379``) or the Ray already initialised in
    this process; otherwise starts a local Ray with this machine's cores and stops it in ``close``.
    ``actor_cls`` is the model actor class (a ``ModelWorker`` subclass; tests inject faults with it).
    """

    def __init__(self, config: PredictConfig, *, actor_cls: type = ModelWorker,
                 images_per_window: int = IMAGES_PER_WINDOW) -> None:
        self.config = config
        self.actor_cls = actor_cls
        self.images_per_window = images_per_window
        self.worker_model = _worker_model(config)
        self._ray: Any = None
        self._started_ray = False
        self._log_levels: dict[str, int] = {}

    def start(self) -> ModelInfo:
        """Load the model once here, on the CPU, for its name and categories (and to fail early and
        clearly on bad weights or class names, before any worker starts); it is not kept."""
        from ..segmenter import Segmenter

        require_ray()
        probe = Segmenter(replace(self.config.model, device="cpu"), mask_thresh=self.config.mask_thresh,
                          classes=self.config.classes)
        return ModelInfo(probe.backend.name, list(probe.backend.categories))

    def run(self, refs: Sequence[ImageRef], done: Any = None) -> Iterator[BatchResult]:  # done: videos, local only
        """Results in the order of ``refs``, a window of ``images_per_window`` refs after another."""
        if not refs:
            return
        self._connect()
        lost = 0
        remaining = iter(refs)
        while window := list(itertools.islice(remaining, self.images_per_window)):
            ds = self._dataset(window)
            seen: set[int] = set()
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    yield self._result(batch, window, seen)
            except self._ray.exceptions.RayError as exc:
                user_error = _masksegerror_in(exc)
                if user_error is not None:
                    raise user_error from None
                raise
            lost += len(window) - len(seen)
        if lost:
            log.warning("%d of %d images did not come back from Ray; rerun to process them", lost, len(refs))

    def close(self) -> None:
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False
        for name, level in self._log_levels.items():
            logging.getLogger(name).setLevel(level)
        self._log_levels.clear()

    def _connect(self) -> None:
        ray = self._ray = require_ray()
        if ray.is_initialized():
            return
        engine = self.config.engine
        quiet = not log.isEnabledFor(logging.DEBUG)
        common: dict[str, Any] = {"logging_level": logging.WARNING if quiet else logging.INFO,
                                  "log_to_driver": not quiet,
                                  "runtime_env": {"worker_process_setup_hook": f"{__name__}.import_ray_data"}}
        if engine.address:
            try:
                ray.init(address=engine.address, **common)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UsageError(f"--ray-address {engine.address}: cannot join the Ray cluster: {exc}") from None
        else:
            cpus = max(os.cpu_count() or 1, engine.workers * engine.threads_per_worker + 1)
            # "local": a Ray of its own, as documented, where ray.init() alone would join the cluster
            # that RAY_ADDRESS or `ray start`'s ray_current_cluster file names (and refuse num_cpus there).
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
            log.debug("started a local Ray with %d CPUs", cpus)
        self._started_ray = True
        if quiet:
            # ray.data logs each execution at INFO; its progress module only says its bars are off.
            for name, level in (("ray.data", logging.WARNING), ("ray.data._internal.progress", logging.ERROR)):
                self._log_levels[name] = logging.getLogger(name).level
                logging.getLogger(name).setLevel(level)

    def _dataset(self, refs: Sequence[ImageRef]) -> Any:
        import pyarrow as pa
        from ray.data import ActorPoolStrategy

        config, engine = self.config, self.config.engine
        table = pa.table({
            "idx": pa.array(range(len(refs)), pa.int64()),
            "path": pa.array([os.fsencode(r.path) for r in refs], pa.binary()),
            "etag": pa.array([r.etag or "" for r in refs], pa.string()),
        })
        rows = max(1, min(MAX_ROWS_PER_BLOCK, math.ceil(len(refs) / (4 * max(engine.workers, 1)))))
        ds = self._ray.data.from_arrow([table.slice(i, rows) for i in range(0, len(refs), rows)])
        # The dataset's own copy of the DataContext: results in input order (so image ids follow the
        # local engine's), and no progress bars of Ray Data's (the CLI draws its own).
        ds.context.execution_options.preserve_order = True
        ds.context.enable_progress_bars = False
        ds = ds.map_batches(decode_rows, fn_kwargs={"max_pixels": config.max_pixels, "uint16": config.uint16},
                            batch_size=1, batch_format="numpy", num_cpus=DECODE_CPUS)
        gpus = engine.gpus_per_worker
        return ds.map_batches(
            self.actor_cls,
            fn_constructor_kwargs={
                "model": self.worker_model, "mask_thresh": config.mask_thresh, "classes": config.classes,
                "agnostic_nms": config.agnostic_nms,
                "threads": engine.threads_per_worker,
                "ship_pixels": not set(config.writers) <= PIXEL_FREE_WRITERS,
            },
            compute=ActorPoolStrategy(size=engine.workers),
            batch_size=config.batch_size or 1, batch_format="numpy",
            num_cpus=engine.threads_per_worker, num_gpus=gpus if gpus > 0 else None,
        )

    @staticmethod
    def _result(batch: dict[str, np.ndarray], refs: Sequence[ImageRef], seen: set[int]) -> BatchResult:
        result = BatchResult([], [], [])
        has_pixels = "rgb" in batch
        for i, idx in enumerate(batch["idx"].tolist()):
            if idx in seen:  # a retried task may deliver a row twice: the first one counts
                log.debug("%s: duplicate result from a retried task ignored", refs[idx].rel_path)
                continue
            seen.add(idx)
            ref = refs[idx]
            error = batch["error"][i]
            if error:
                size, mtime_ns = int(batch["size"][i]), int(batch["mtime_ns"][i])
                reason = bytes(error).decode("utf-8", "surrogateescape")
                result.failures.append(Failure(ref, reason, size, mtime_ns) if size >= 0 else Failure(ref, reason))
                continue
            if has_pixels:
                rgb = batch["rgb"][i]
            else:  # shape without pixels: no writer of this run reads them
                shape = (int(batch["height"][i]), int(batch["width"][i]), 3)
                rgb = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), shape)
            result.images.append(DecodedImage(ref, rgb, int(batch["size"][i]), int(batch["mtime_ns"][i])))
            result.detections.append(pickle.loads(batch["dets"][i]))
        return result


def _worker_model(config: PredictConfig) -> ModelConfig:
    """Check the engine options; return the model settings each actor uses. Ray places actors on GPUs
    (``--gpus-per-worker``), so the device follows from that, and ``--device`` may only agree with it."""
    engine, model = config.engine, config.model
    if engine.address and engine.address.startswith("ray://"):
        # Ray Data's streaming executor needs its driver inside the cluster (under Ray Client, Ray 2.60
        # fails with "'Worker' object has no attribute 'core_worker'").
        raise UsageError(f"--ray-address {engine.address}: Ray Data does not run through Ray Client; run maskseg "
                         "on a node of the cluster with --ray-address auto (e.g. ray job submit -- maskseg ...)")
    if engine.workers < 1:
        raise UsageError(f"--workers {engine.workers}: --engine ray needs at least one model worker")
    if engine.gpus_per_worker > 0:
        if model.device not in ("auto", "cuda"):
            raise UsageError(f"--device {model.device}: with --engine ray, Ray assigns each worker its GPU; "
                             "use --device auto or cuda")
        device = "cuda"
    else:
        if model.device not in ("auto", "cpu"):
            raise UsageError(f"--device {model.device}: with --engine ray, GPUs need --gpus-per-worker 1 "
                             "(or a fraction to share one)")
        device = "cpu"
    return replace(model, device=device, threads=engine.threads_per_worker)


def _masksegerror_in(exc: BaseException) -> MasksegError | None:
    """The ``MasksegError`` a worker raised (a weights file missing on a node, ...), from Ray's wrappers.

    A failed task carries the exception itself (``cause``); an actor that failed to start carries only
    its traceback text, so the error is rebuilt from the traceback's last ``maskseg.errors.X: ...`` line.
    """
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MasksegError):
            return e
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    found = _ERROR_LINE.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, None)
    plain = isinstance(cls, type) and issubclass(cls, MasksegError) and cls.__init__ is MasksegError.__init__
    return cls(message) if plain else MasksegError(message)
