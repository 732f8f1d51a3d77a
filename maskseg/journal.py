"""What a run has done: an append-only JSON-lines record per image in OUT, resume, and OUT's lock.

The journal is the commit point: an image counts as done once its record is flushed and fsynced.
The JSON outputs are rebuilt from it, so a killed run loses at most the batch in flight, and image
ids stay stable across runs (an image keeps the id it was first given).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LockedError, OutputError
from .sources import ImageRef, ScanRefs

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"
INDEX_NAME = "journal.index"
LOCK_NAME = ".maskseg.lock"


@dataclass(frozen=True)
class Entry:
    """The latest journal state of one relative path. ``etag`` is an object's version (ETag, or a GCS
    generation); None for files, which are versioned by ``mtime_ns``."""

    kind: str  # "done" or "failed"
    size: int | None
    mtime_ns: int | None
    offset: int
    image_id: int | None = None
    reason: str | None = None
    writers: tuple[str, ...] = ()
    etag: str | None = None

    def same_version(self, size: int | None, mtime_ns: int | None, etag: str | None) -> bool:
        """Whether these describe the bytes this entry was made from (size and mtime, or size and ETag)."""
        if etag is not None or self.etag is not None:
            return self.size == size and self.etag == etag
        return self.size == size and self.mtime_ns == mtime_ns


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    rel BLOB PRIMARY KEY, done INTEGER NOT NULL, size INTEGER, mtime_ns INTEGER, etag TEXT,
    off INTEGER NOT NULL, image_id INTEGER, reason TEXT, writers TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_id ON entries (done, image_id);
CREATE INDEX IF NOT EXISTS entries_failed ON entries (rel) WHERE done = 0;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
"""
_INDEX_VERSION = 1
_PROBE_BYTES = 4096  # journal bytes hashed at each end of the indexed part to recognise the same journal
_RECORD_SLICE = 10_000
_LOOKUP_SLICE = 500  # paths per lookup query (sqlite allows 32766 parameters)
_JOIN_MIN = 1000  # scanned refs from which a resume check joins them with the index in sqlite
_INSERT = "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_FIELDS = "done, size, mtime_ns, etag, off, image_id, reason, writers"
_INDEX_ROWS_PER_TX = 50_000
# Journal lines carry their detections last (``api.finish_image`` writes them so); indexing reads only
# what comes before, which keeps rebuilding the index of a large journal fast.
_DETECTIONS_KEY = b',"detections":'


def _key(rel_path: str) -> bytes:
    # A BLOB, not TEXT: file names that are not UTF-8 reach us as lone surrogates, which sqlite refuses.
    return rel_path.encode("utf-8", "surrogateescape")


def _parse_head(line: bytes) -> dict[str, Any]:
    """The fields of a journal line that the index keeps (everything before its detections)."""
    cut = line.find(_DETECTIONS_KEY)
    if cut > 0:
        with contextlib.suppress(ValueError):
            return json.loads(line[:cut] + b"}")
    return json.loads(line)


class Journal:
    """Append-only record of finished and failed images in ``OUT/journal.jsonl``, with an index.

    ``journal.jsonl`` is the source of truth: an image is done once its record there is fsynced. The
    latest entry per path is looked up in ``OUT/journal.index`` (sqlite, WAL), a cache of the journal's
    first ``covered`` bytes that is only ever updated after those bytes are durable, so memory does not
    grow with the number of images. Opening repairs a torn last line left by a kill, checks that the
    index describes this journal (bytes hashed at both ends of the part it covers), indexes the records
    after that part, and rebuilds the index from the journal when it is missing, stale or unreadable.
    Records are read back from the journal when outputs are rebuilt, never held in memory.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / JOURNAL_NAME
        self.index_path = out_dir / INDEX_NAME
        self.appended = 0
        self._pending: list[bytes] = []
        self._pending_entries: dict[str, Entry] = {}
        self._pending_rows: dict[bytes, tuple] = {}
        self._db: sqlite3.Connection | None = None
        self._next_id = 1
        self._load()
        # A raw descriptor, not a buffered file: after a failed write nothing is left in a buffer to be
        # written again later, so the file can be cut back to its last whole record.
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    # -- opening: the index checked against the journal, the journal's tail indexed --------------------

    def _load(self) -> None:
        if not self.path.exists():
            self.path.touch()
        self._db = self._open_index()
        covered = self._covered_if_current()
        if covered is None:
            log.info("%s: does not describe %s; rebuilt from it", self.index_path, JOURNAL_NAME)
            self._db.close()
            self._remove_index()
            self._db = self._open_index()
            covered = 0
        with open(self.path, "r+b") as fh:
            fh.seek(covered)
            data_end = offset = covered
            rows = 0
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                try:
                    self._put(_row(_parse_head(line), offset, self._latest))
                    rows += 1
                except (ValueError, KeyError, TypeError):
                    log.warning("%s: unreadable record at byte %d ignored", self.path, offset)
                offset += len(line)
                data_end = offset
                if rows >= _INDEX_ROWS_PER_TX:
                    self._commit(data_end)
                    rows = 0
            size = fh.seek(0, os.SEEK_END)
            if size != data_end:
                log.warning("%s: dropping %d bytes of a record torn by an earlier crash", self.path,
                            size - data_end)
                fh.truncate(data_end)
            if data_end != covered:  # an index that is current is left as it is, byte for byte
                self._commit(data_end)
        top = self._db.execute("SELECT MAX(image_id) FROM entries").fetchone()[0]
        self._next_id = (top or 0) + 1

    def _open_index(self) -> sqlite3.Connection:
        for attempt in (1, 2):
            db = sqlite3.connect(self.index_path, isolation_level=None, check_same_thread=False)
            try:
                # EXCLUSIVE before WAL: no shared-memory file, so WAL works on any file system OUT is on (the
                # run holds OUT's flock anyway). NORMAL syncs at checkpoints only: a power cut may lose the
                # last index updates (the journal's tail is then indexed again), never corrupt the index.
                for pragma in ("locking_mode=EXCLUSIVE", "journal_mode=WAL", "synchronous=NORMAL",
                               "cache_size=-8192"):  # KiB: the index's pages held in memory stay bounded
                    db.execute(f"PRAGMA {pragma}")
                db.executescript(_SCHEMA)
                return db
            except sqlite3.DatabaseError as exc:
                db.close()
                if attempt == 2:
                    raise OutputError(f"{self.index_path}: cannot create the index: {exc}") from None
                log.warning("%s: unreadable (%s); rebuilt from %s", self.index_path, exc, JOURNAL_NAME)
                self._remove_index()
        raise AssertionError("unreachable")

    def _remove_index(self) -> None:
        for p in (self.index_path, *_index_sidecars(self.index_path)):
            p.unlink(missing_ok=True)

    def _covered_if_current(self) -> int | None:
        """How many journal bytes the index describes, or None when it is not this journal's index."""
        try:
            meta = dict(self._db.execute("SELECT k, v FROM meta").fetchall())
            empty = self._db.execute("SELECT 1 FROM entries LIMIT 1").fetchone() is None
        except sqlite3.DatabaseError:
            return None
        if not meta:
            return 0 if empty else None
        covered = meta.get("covered")
        if (meta.get("version") != _INDEX_VERSION or not isinstance(covered, int)
                or covered > self.path.stat().st_size):
            return None
        with open(self.path, "rb") as fh:
            return covered if _probe(fh, covered) == meta.get("probe") else None

    def _commit(self, covered: int) -> None:
        """Make the index describe the journal's first ``covered`` bytes (already durable in it)."""
        with open(self.path, "rb") as fh:
            probe = _probe(fh, covered)
        db = self._db
        db.execute("BEGIN")
        try:
            if self._pending_rows:
                db.executemany(_INSERT, self._pending_rows.values())
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("version", _INDEX_VERSION), ("covered", covered), ("probe", probe)])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            self._pending_rows.clear()

    def _put(self, row: tuple) -> None:
        self._pending_rows[row[0]] = row
        if row[6] is not None:
            self._next_id = max(self._next_id, row[6] + 1)

    # -- lookups -------------------------------------------------------------------------------------

    def entry(self, rel_path: str) -> Entry | None:
        """The latest entry of ``rel_path`` (queued records included), or None."""
        pending = self._pending_entries.get(rel_path)
        return pending if pending is not None else self._latest(rel_path)

    def _latest(self, rel_path: str) -> Entry | None:
        row = self._pending_rows.get(_key(rel_path))  # indexed, not yet committed
        if row is not None:
            return _entry(row[1:])
        found = self._db.execute(f"SELECT {_FIELDS} FROM entries WHERE rel = ?", (_key(rel_path),)).fetchone()
        return _entry(found) if found is not None else None

    def pending(self, refs: Iterable[ImageRef], writers: tuple[str, ...]) -> tuple[Sequence[ImageRef], int]:
        """The refs still to do, and how many were skipped as done: what ``is_done`` and
        ``is_known_failure`` (any reason) say ref by ref, looked up a slice of refs per query.

        For a scan's ``ScanRefs`` the refs to do are a ``ScanRefs`` too, kept in the scan's database, so
        checking millions of refs holds none of them in memory; for any other iterable, a list.
        """
        skipped = 0
        if isinstance(refs, ScanRefs) and len(refs) >= _JOIN_MIN and not self._pending_rows \
                and not self._pending_entries:
            refs, skipped = self._undecided(refs, writers)

        def verdicts() -> Iterator[tuple[ImageRef, bool | None]]:
            nonlocal skipped
            for ref, todo in self._verdicts(refs, writers):
                skipped += todo is False
                yield ref, todo

        if isinstance(refs, ScanRefs):
            todo: Sequence[ImageRef] = refs.where(todo is True for _, todo in verdicts())
        else:
            todo = [ref for ref, todo in verdicts() if todo]
        return todo, skipped

    def _undecided(self, refs: ScanRefs, writers: tuple[str, ...]) -> tuple[ScanRefs, int]:
        """The refs that are not plainly done (done by every writer, same size and version), and how many
        are: the scan's database joins the index in one query, while this connection is closed (it holds
        the index's lock). The refs left are decided one by one, as before: new, changed, failed, done by
        other writers, or named with bytes (0xED) that could be a non-UTF-8 name's, keyed apart in the two
        databases (``surrogatepass`` there, ``surrogateescape`` here)."""
        every_writer = " AND ".join("instr(',' || e.writers || ',', ?) > 0" for _ in writers) or "1"
        where = ("e.rel IS NULL OR e.done != 1 OR e.size IS NOT r.size "
                 "OR CASE WHEN e.etag IS NULL AND r.etag IS NULL THEN e.mtime_ns IS NOT r.mtime_ns "
                 f"ELSE e.etag IS NOT r.etag END OR NOT ({every_writer}) OR instr(r.rel, X'ED') > 0")
        covered = self._covered_if_current()
        self._db.close()
        try:
            left = refs.where_joined(str(self.index_path), "other.entries AS e ON e.rel = r.rel", where,
                                     [f",{w}," for w in writers])
        finally:
            self._db = self._open_index()
            if self._covered_if_current() != covered:  # unreadable when reopened, and made anew: rebuilt
                self._db.close()
                self._load()
        return left, len(refs) - len(left)

    def _verdicts(self, refs: Iterable[ImageRef], writers: tuple[str, ...]) -> Iterator[tuple[ImageRef, bool | None]]:
        """(ref, True) to do, (ref, False) done as it is, (ref, None) failed as it is: for each of ``refs``."""
        wanted = set(writers)
        it = iter(refs)
        while chunk := list(itertools.islice(it, _LOOKUP_SLICE)):
            keys = [_key(r.rel_path) for r in chunk]
            found = self._rows_for(keys)
            for ref, key in zip(chunk, keys, strict=True):
                if ref.rel_path in self._pending_entries or key in self._pending_rows:
                    e = self.entry(ref.rel_path)
                    state = None if e is None else (e.kind == "done", e.size, e.mtime_ns, e.etag, ",".join(e.writers))
                else:
                    state = found.get(key)
                if state is None:
                    yield ref, True
                    continue
                done, size, mtime_ns, etag, done_by = state
                same = size == ref.size and (etag == ref.etag if etag is not None or ref.etag is not None
                                             else mtime_ns == ref.mtime_ns)
                if done and same and wanted <= set(done_by.split(",")):
                    yield ref, False
                elif done or not same:  # changed, or done but not by every writer of this run
                    yield ref, True
                else:
                    yield ref, None

    def _rows_for(self, keys: list[bytes]) -> dict[bytes, tuple]:
        """(done, size, mtime_ns, etag, writers) of ``keys`` by key. Scan order makes a slice of refs a
        narrow range of the index, read in one sequential pass (faster than a B-tree search per key);
        when the range holds many other paths, the keys are looked up one by one instead."""
        columns = "rel, done, size, mtime_ns, etag, writers"
        limit = 2 * len(keys) + 16
        rows = self._db.execute(f"SELECT {columns} FROM entries WHERE rel BETWEEN ? AND ? LIMIT ?",
                                (min(keys), max(keys), limit)).fetchall()
        if len(rows) == limit:
            rows = self._db.execute(f"SELECT {columns} FROM entries WHERE rel IN ({','.join('?' * len(keys))})",
                                    keys).fetchall()
        return {row[0]: row[1:] for row in rows}

    def is_done(self, ref: ImageRef, writers: tuple[str, ...]) -> bool:
        """True when ``ref``'s file (or object) is unchanged since it was done by (at least) these writers."""
        e = self.entry(ref.rel_path)
        return (e is not None and e.kind == "done" and e.same_version(ref.size, ref.mtime_ns, ref.etag)
                and set(writers) <= set(e.writers))

    def is_known_failure(self, rel_path: str, size: int | None, mtime_ns: int | None, reason: str | None,
                         etag: str | None = None) -> bool:
        """True when the same file already failed (for the same ``reason``, unless None): retrying would
        change nothing."""
        e = self.entry(rel_path)
        return (e is not None and e.kind == "failed" and e.same_version(size, mtime_ns, etag)
                and (reason is None or e.reason == reason))

    def image_id(self, rel_path: str) -> int:
        """The id this path has had before, or the next free one."""
        e = self.entry(rel_path)
        if e is not None and e.image_id is not None:
            return e.image_id
        image_id = self._next_id
        self._next_id += 1
        return image_id

    def writers_used(self) -> set[str]:
        """Every writer named by a done entry."""
        names: set[str] = set()
        for (joined,) in self._db.execute("SELECT DISTINCT writers FROM entries WHERE done = 1"):
            names.update(w for w in (joined or "").split(",") if w)
        return names

    # -- appending -----------------------------------------------------------------------------------

    def add(self, record: dict[str, Any]) -> None:
        """Queue a record (``kind`` done/failed, ``rel_path``, ...); ``flush`` makes it durable."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8", "surrogateescape")
        offset = self._size + sum(len(p) for p in self._pending)
        row = _row(record, offset, self.entry)
        self._put(row)
        self._pending_entries[record["rel_path"]] = _entry(row[1:])
        self._pending.append(line)

    @property
    def has_pending(self) -> bool:
        """Whether records are queued that ``flush`` has not yet made durable."""
        return bool(self._pending)

    def flush(self) -> None:
        """Write queued records and fsync: after this, they survive a kill or power loss. The index is
        updated after the fsync, so it never holds a record the journal might lose."""
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
            self._pending_entries.clear()
            self._pending_rows.clear()
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.warning("%s: could not cut off a partly written batch; the next run drops it", self.path)
            raise output_error(self.path, exc) from None
        self._size += len(data)
        self.appended += len(self._pending)
        self._pending.clear()
        try:
            self._commit(self._size)
        except sqlite3.Error as exc:  # the journal holds the records: the next run indexes them again
            raise OutputError(f"{self.index_path}: cannot update the index: {exc}") from None
        finally:
            self._pending_entries.clear()

    def close(self) -> None:
        """Flush what is queued and close the files (a failed flush still closes them)."""
        try:
            self.flush()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    # -- reading back --------------------------------------------------------------------------------

    def read_at(self, offset: int) -> dict[str, Any]:
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return json.loads(fh.readline())

    def done_records(self) -> Iterator[dict[str, Any]]:
        """The latest record of every done image, in image-id order (read from disk one at a time)."""
        yield from self._records("SELECT image_id, rel, off FROM entries WHERE done = 1 {where}", "image_id, rel")

    def failure_records(self) -> Iterator[dict[str, Any]]:
        """The latest record of every path whose last attempt failed, in path order."""
        # The partial index keeps each slice a range read, however many images are done.
        yield from self._records("SELECT rel, off FROM entries INDEXED BY entries_failed WHERE done = 0 {where}", "rel")

    def _records(self, query: str, key: str) -> Iterator[dict[str, Any]]:
        # Offsets are read a slice at a time, each slice after the last one's sort key, so neither the
        # offsets nor the records are ever all in memory (and no statement stays open between slices).
        after: tuple = ()
        with open(self.path, "rb") as fh:
            while True:
                where = f"AND ({key}) > ({', '.join('?' * len(after))})" if after else ""
                rows = self._db.execute(query.format(where=where) + f" ORDER BY {key} LIMIT {_RECORD_SLICE}",
                                        after).fetchall()
                for row in rows:
                    fh.seek(row[-1])
                    yield json.loads(fh.readline())
                if len(rows) < _RECORD_SLICE:
                    return
                after = tuple(rows[-1][:-1])

    @property
    def counts(self) -> tuple[int, int]:
        done, failed = (self._db.execute("SELECT COALESCE(SUM(done), 0), COUNT(*) - COALESCE(SUM(done), 0) "
                                         "FROM entries").fetchone())
        for rel, e in self._pending_entries.items():  # queued records are counted as the old code did
            before = self._latest(rel)
            if before is None:
                done, failed = done + (e.kind == "done"), failed + (e.kind != "done")
            elif before.kind != e.kind:
                done, failed = (done + 1, failed - 1) if e.kind == "done" else (done - 1, failed + 1)
        return int(done), int(failed)


def _row(record: dict[str, Any], offset: int, previous: Any) -> tuple:
    """A record as an index row: (rel, done, size, mtime_ns, etag, off, image_id, reason, writers). A failed
    record keeps the id its path had (``previous(rel_path)``), so a later success reuses it."""
    rel = record["rel_path"]
    if record["kind"] == "done":
        image_id: int | None = int(record["image_id"])
        done, reason = 1, None
    else:
        before = previous(rel)
        image_id = before.image_id if before is not None else None
        done, reason = 0, record.get("reason")
    return (_key(rel), done, record.get("size"), record.get("mtime_ns"), record.get("etag"), offset, image_id,
            reason, ",".join(record.get("writers", ())) if done else None)


def _entry(fields: tuple) -> Entry:
    done, size, mtime_ns, etag, off, image_id, reason, writers = fields
    return Entry("done" if done else "failed", size, mtime_ns, off, image_id, reason,
                 tuple(writers.split(",")) if writers else (), etag)


def _probe(fh: Any, covered: int) -> str:
    """A digest of the journal's first and last ``_PROBE_BYTES`` before ``covered``."""
    digest = hashlib.sha256(str(covered).encode())
    fh.seek(0)
    digest.update(fh.read(min(covered, _PROBE_BYTES)))
    fh.seek(max(0, covered - _PROBE_BYTES))
    digest.update(fh.read(covered - max(0, covered - _PROBE_BYTES)))
    return digest.hexdigest()


def _index_sidecars(path: Path) -> tuple[Path, ...]:
    return tuple(path.with_name(path.name + end) for end in ("-wal", "-shm", "-journal"))


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
