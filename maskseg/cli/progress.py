"""Terminal output for the CLI: logging set-up, stop signals, and progress as a rich bar or plain log lines.

``RichProgress``/``LogProgress`` follow a predict run (start, advance, failure, close);
``RichTrainProgress``/``LogTrainProgress`` a training run (start, step, epoch, close).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any

log = logging.getLogger("maskseg")


def setup_logging(*, quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("maskseg").setLevel(level)


def install_stop_handlers(stop: threading.Event, caught: list[int], *, finishing: str) -> None:
    """First SIGINT/SIGTERM: set ``stop`` (the work finishes ``finishing`` and writes what it has, exit
    130/143) and record the signal in ``caught``; a second one raises KeyboardInterrupt: stop now."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        caught.append(signum)
        stop.set()
        log.warning("signal %d: stopping after %s (again to stop at once)", signum, finishing)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


class RichProgress:
    """A live bar with images/s, ETA and detections (used when stderr is a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]segmenting"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[dets]} detections, {task.fields[failed]} failed"),
            console=Console(stderr=True), transient=False,
        )
        self._task: Any = None
        self._t0 = time.monotonic()
        self._dets = self._failed = self._done = 0

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            log.info("%d images already done (resuming); %d to go", skipped, total)
        self._progress.start()
        self._task = self._progress.add_task("segment", total=total, rate="", dets=0, failed=0)
        self._t0 = time.monotonic()

    def advance(self, images: int, detections: int) -> None:
        self._done += images
        self._dets += detections
        rate = self._done / max(time.monotonic() - self._t0, 1e-9)
        self._progress.update(self._task, advance=images, rate=f"{rate:.2f} img/s", dets=self._dets)

    def failure(self, path: str, reason: str) -> None:
        self._failed += 1
        if self._task is not None:
            self._progress.update(self._task, advance=1, failed=self._failed)

    def close(self) -> None:
        self._progress.stop()


class LogProgress:
    """Plain progress lines every ``every`` seconds (cron, pipes, CI logs)."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.total = self.done = self.dets = 0
        self._t0 = self._last = time.monotonic()

    def start(self, total: int, skipped: int) -> None:
        self.total = total
        log.info("%d images to segment, %d already done", total, skipped)
        self._t0 = self._last = time.monotonic()

    def advance(self, images: int, detections: int) -> None:
        self.done += images
        self.dets += detections
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("%d/%d images, %.2f img/s, ETA %.0f s, %d detections", self.done, self.total, rate, eta,
                     self.dets)

    def failure(self, path: str, reason: str) -> None:
        self.done += 1

    def close(self) -> None:
        pass


# torchvision's loss names, shortened for the live display.
_SHORT = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask", "loss_objectness": "obj",
          "loss_rpn_box_reg": "rpn"}


class RichTrainProgress:
    """A live bar with losses, lr, images/s and ETA (used when stderr is a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]training"), TextColumn("epoch {task.fields[epoch]}"), BarColumn(bar_width=24),
            MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[losses]}"),
            console=Console(stderr=True), transient=False,
        )
        self._task: Any = None

    def start(self, total_steps: int, start_step: int, images_per_step: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, epoch="-",
                                             losses="", lr="", rate="")

    def step(self, record: dict) -> None:
        parts = [f"{_SHORT.get(k, k)} {v:.3f}" for k, v in record.items() if k.startswith("loss_")]
        losses = f"loss {record['loss']:.3f} ({' '.join(parts)})"
        self._progress.update(self._task, completed=record["step"], epoch=record["epoch"], losses=losses,
                              lr=f"{record['lr']:.2e}", rate=f"{record['images_per_s']:.2f} img/s")

    def epoch(self, record: dict) -> None:
        _log_epoch(record)

    def close(self) -> None:
        self._progress.stop()


class LogTrainProgress:
    """Plain log lines every ``every`` seconds and after each epoch (cron, pipes, CI logs)."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self.total = self.start_step = 0
        self._t0 = self._last = time.monotonic()

    def start(self, total_steps: int, start_step: int, images_per_step: int) -> None:
        self.total, self.start_step = total_steps, start_step
        self._t0 = self._last = time.monotonic()

    def step(self, record: dict) -> None:
        now = time.monotonic()
        if now - self._last < self.every and record["step"] != self.total:
            return
        self._last = now
        done = record["step"] - self.start_step
        per_step = (now - self._t0) / max(done, 1)
        losses = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
        log.info("step %d/%d epoch %d: loss %.3f (%s), lr %.2e, %.2f img/s, %.1f s/step, ETA %.0f s",
                 record["step"], self.total, record["epoch"], record["loss"], losses, record["lr"],
                 record["images_per_s"], per_step, per_step * (self.total - record["step"]))

    def epoch(self, record: dict) -> None:
        _log_epoch(record)

    def close(self) -> None:
        pass


def _log_epoch(record: dict) -> None:
    ap = (f", validation bbox AP {record['bbox_AP']:.3f}, segm AP {record['segm_AP']:.3f} "
          f"(AP50 {record['segm_AP50']:.3f})" if "segm_AP" in record else "")
    log.info("epoch %d done at step %d: mean loss %.3f%s", record["epoch"], record["step"], record.get("loss", 0.0), ap)


def run_progress(quiet: bool) -> RichProgress | LogProgress | None:
    """A predict run's progress: a live bar on a terminal, log lines otherwise, none with --quiet."""
    return None if quiet else RichProgress() if sys.stderr.isatty() else LogProgress()


def train_progress(quiet: bool) -> RichTrainProgress | LogTrainProgress | None:
    """A training run's progress: a live bar on a terminal, log lines otherwise, none with --quiet."""
    return None if quiet else RichTrainProgress() if sys.stderr.isatty() else LogTrainProgress()
