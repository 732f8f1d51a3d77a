"""What a run has done: an append-only JSON-lines record per image in OUT, resume, and OUT's lock.

The journal is the commit point: an image counts as done once its record is flushed and fsynced.
The JSON outputs are rebuilt from it, so a killed run loses at most the batch in flight, and image
ids stay stable across runs (an image keeps the id it was first given).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LockedError, OutputError
from .sources import ImageRef

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"
LOCK_NAME = ".maskseg.lock"


@dataclass(frozen=True)
class Entry:
    """The latest journal state of one relative path."""

    kind: str  # "done" or "failed"
    size: int | None
    mtime_ns: int | None
    offset: int
    image_id: int | None = None
    reason: str | None = None
    writers: tuple[str, ...] = ()


class Journal:
    """Append-only record of finished and failed images in ``OUT/journal.jsonl``.

    Opening it repairs a torn last line left by a kill, then indexes the latest entry per path
    (offsets only: records are read back from disk when outputs are rebuilt, never held in memory).
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / JOURNAL_NAME
        self.entries: dict[str, Entry] = {}
        self.appended = 0
        self._pending: list[bytes] = []
        self._next_id = 1
        self._load()
        # A raw descriptor, not a buffered file: after a failed write nothing is left in a buffer to be
        # written again later, so the file can be cut back to its last whole record.
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "r+b") as fh:
            data_end = 0
            offset = 0
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                try:
                    self._index(json.loads(line), offset)
                except (ValueError, KeyError, TypeError):
                    log.warning("%s: unreadable record at byte %d ignored", self.path, offset)
                offset += len(line)
                data_end = offset
            size = fh.seek(0, os.SEEK_END)
            if size != data_end:
                log.warning("%s: dropping %d bytes of a record torn by an earlier crash", self.path,
                            size - data_end)
                fh.truncate(data_end)

    def _index(self, rec: dict[str, Any], offset: int) -> None:
        rel = rec["rel_path"]
        if rec["kind"] == "done":
            image_id = int(rec["image_id"])
            self._next_id = max(self._next_id, image_id + 1)
            entry = Entry("done", rec.get("size"), rec.get("mtime_ns"), offset, image_id,
                          writers=tuple(rec.get("writers", ())))
        else:
            previous = self.entries.get(rel)
            entry = Entry("failed", rec.get("size"), rec.get("mtime_ns"), offset,
                          previous.image_id if previous else None, rec.get("reason"))
        self.entries[rel] = entry

    def is_done(self, ref: ImageRef, writers: tuple[str, ...]) -> bool:
        """True when ``ref``'s file is unchanged since it was done by (at least) these writers."""
        e = self.entries.get(ref.rel_path)
        return (e is not None and e.kind == "done" and e.size == ref.size and e.mtime_ns == ref.mtime_ns
                and set(writers) <= set(e.writers))

    def is_known_failure(self, rel_path: str, size: int | None, mtime_ns: int | None, reason: str) -> bool:
        """True when the same file already failed for the same reason (retrying would change nothing)."""
        e = self.entries.get(rel_path)
        return (e is not None and e.kind == "failed" and e.size == size and e.mtime_ns == mtime_ns
                and e.reason == reason)

    def image_id(self, rel_path: str) -> int:
        """The id this path has had before, or the next free one."""
        e = self.entries.get(rel_path)
        if e is not None and e.image_id is not None:
            return e.image_id
        image_id = self._next_id
        self._next_id += 1
        return image_id

    def add(self, record: dict[str, Any]) -> None:
        """Queue a record (``kind`` done/failed, ``rel_path``, ...); ``flush`` makes it durable."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8", "surrogateescape")
        self._index(record, self._size + sum(len(p) for p in self._pending))
        self._pending.append(line)

    @property
    def has_pending(self) -> bool:
        """Whether records are queued that ``flush`` has not yet made durable."""
        return bool(self._pending)

    def flush(self) -> None:
        """Write queued records and fsync: after this, they survive a kill or power loss."""
        if not self._pending or self._fd is None:
            return
        data = b"".join(self._pending)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:
            # Disk full or I/O error: drop this batch (its images are redone next run) and cut off any
            # part of it that reached the disk, so the journal still ends with a whole record.
            self._pending.clear()
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.warning("%s: could not cut off a partly written batch; the next run drops it", self.path)
            raise output_error(self.path, exc) from None
        self._size += len(data)
        self.appended += len(self._pending)
        self._pending.clear()

    def close(self) -> None:
        """Flush what is queued and close the file (a failed flush still closes it)."""
        try:
            self.flush()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def read_at(self, offset: int) -> dict[str, Any]:
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return json.loads(fh.readline())

    def done_records(self) -> Iterator[dict[str, Any]]:
        """The latest record of every done image, in image-id order (read from disk one at a time)."""
        done = sorted((e.image_id or 0, e.offset) for e in self.entries.values() if e.kind == "done")
        with open(self.path, "rb") as fh:
            for _, offset in done:
                fh.seek(offset)
                yield json.loads(fh.readline())

    def failure_records(self) -> Iterator[dict[str, Any]]:
        """The latest record of every path whose last attempt failed, in path order."""
        with open(self.path, "rb") as fh:
            for rel in sorted(self.entries):
                e = self.entries[rel]
                if e.kind == "failed":
                    fh.seek(e.offset)
                    yield json.loads(fh.readline())

    @property
    def counts(self) -> tuple[int, int]:
        done = sum(1 for e in self.entries.values() if e.kind == "done")
        return done, len(self.entries) - done


def output_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return OutputError(f"{path}: {what}; outputs written so far are intact, rerun when space is freed")
    return OutputError(f"{path}: {exc.strerror or exc}")


# flock belongs to the open file description, which a fork()ed child shares; a child that outlives a
# SIGKILLed parent (multiprocessing or DataLoader workers) would keep OUT locked. Close-on-exec covers
# exec only, so every child closes its copies right after fork (closing a copy never unlocks).
_HELD_LOCK_FDS: set[int] = set()


def _close_lock_fds_in_child() -> None:
    for fd in _HELD_LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_child)


class OutputLock:
    """An exclusive ``flock`` on ``OUT/.maskseg.lock``; released by the OS when the process dies.

    The descriptor is close-on-exec and closed in fork()ed children, so no child process keeps OUT
    locked after the run that took the lock has ended or been killed.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create the lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                who = f" (pid {holder})" if holder else ""
                raise LockedError(f"{self.path.parent}: another maskseg run is using this output folder{who}; "
                                  "try again when it has finished") from None
            raise OutputError(f"{self.path}: cannot lock: {exc.strerror}") from None
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)
        pid = f"{os.getpid()}\n".encode()
        if os.pread(fd, 64, 0) != pid:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, pid, 0)
            except OSError:
                pass  # the pid is only a hint in the "locked" message; a full disk must not stop the run here

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCK_FDS.discard(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
