"""A scan's inputs on disk, not in memory: a temporary sqlite database that sorts and de-duplicates them.

Rows go in as the walk finds them (``add``); ``finish`` names each by its path relative to the inputs'
common root, keeps the first row of each relative path and then of each file (device, inode), marks the
stems several images share, and numbers the images in relative-path order. They are read back a row at a
time (``rows``), by position (``row``) or through a selection (``select``), so a scan of millions of
files holds none of them in memory. A small scan's database stays in memory; a large one moves to a file
that is unlinked as soon as it is open, as sqlite does for its own temporary databases: it never outlives
the process, and its space is freed when it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

# Paths are BLOBs encoded with ``surrogatepass``: their bytes sort as Python sorts the strings (code point
# order), lone surrogates of non-UTF-8 file names included, which sqlite's TEXT would refuse.
_SCHEMA = """
CREATE TABLE found (seq INTEGER PRIMARY KEY, path BLOB NOT NULL, size INTEGER, mtime_ns INTEGER,
                    dev INTEGER, ino INTEGER, etag TEXT, problem BLOB, suffix_bytes INTEGER);
"""
_CACHE_KIB = 16 * 1024  # sqlite's page cache (and sort memory): a fixed amount, whatever the scan's size
MEMORY_ROWS = 50_000  # inputs a scan keeps in an in-memory database (a few MiB) before it moves to a file
_ROWS_PER_TX = 10_000
_SQLITE_FULL, _SQLITE_IOERR = 13, 10  # sqlite's primary result codes (named in the sqlite3 module from 3.11)


class FoundRow(NamedTuple):
    """One input as the walk found it. ``dev``/``ino`` are None for objects and problems; ``problem``
    says why it cannot be an image (None for an image); ``suffix_bytes``, where known, is how many
    UTF-8 bytes at the end of ``path`` its stem leaves out (see ``finish``)."""

    path: str
    size: int | None
    mtime_ns: int | None
    dev: int | None
    ino: int | None
    etag: str | None
    problem: str | None
    suffix_bytes: int | None = None


class StoredRef(NamedTuple):
    """One image read back: ``shared`` is True when another image has the same ``stem``."""

    rel_path: str
    path: str
    stem: str
    shared: bool
    size: int
    mtime_ns: int
    etag: str | None


def _connect(name: str) -> sqlite3.Connection:
    # isolation_level None: transactions are the explicit BEGIN/COMMIT below. No rollback journal (the
    # database is private and thrown away on any error), so the file is the only one there is.
    db = sqlite3.connect(name, isolation_level=None, check_same_thread=False)
    for pragma in ("journal_mode = OFF", "synchronous = OFF", f"cache_size = -{_CACHE_KIB}"):
        db.execute(f"PRAGMA {pragma}")
    return db


def _os_error(exc: sqlite3.Error, folder: str | None) -> BaseException:
    """A full disk or an I/O error as the ``OSError`` it is (callers word those for users); others as they are."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; before, sqlite's message tells
    full = code & 0xFF == _SQLITE_FULL if code is not None else "disk is full" in str(exc)
    io = code & 0xFF == _SQLITE_IOERR if code is not None else "disk I/O error" in str(exc)
    if full or io:
        err = errno.ENOSPC if full else errno.EIO
        return OSError(err, os.strerror(err), folder or tempfile.gettempdir())
    return exc


_INSERT_FOUND = ("INSERT INTO found (path, size, mtime_ns, dev, ino, etag, problem, suffix_bytes) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
# Regular files, the rows millions of inputs are: sqlite encodes the path itself (a third less time than
# encoding it in Python), which is the same UTF-8 wherever the path has no lone surrogate.
_INSERT_FILES = ("INSERT INTO found (path, size, mtime_ns, dev, ino, suffix_bytes) "
                 "VALUES (CAST(? AS BLOB), ?, ?, ?, ?, ?)")


def _plain_files(chunk: list[tuple]) -> bool:
    """Whether every row of ``chunk`` is a regular file's six fields with a path sqlite can encode."""
    if any(len(row) != 6 for row in chunk):
        return False
    try:
        "".join([row[0] for row in chunk]).encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 file name (lone surrogates): encoded with surrogatepass instead
        return False
    return True


def _encoded(row: tuple) -> tuple:
    """A row of any kind as ``_INSERT_FOUND``'s parameters, text encoded as the store keeps it."""
    if len(row) == 6:
        path, size, mtime_ns, dev, ino, suffix_bytes = row
        return _enc(path), size, mtime_ns, dev, ino, None, None, suffix_bytes
    path, size, mtime_ns, dev, ino, etag, problem, suffix_bytes = row
    return _enc(path), size, mtime_ns, dev, ino, etag, None if problem is None else _enc(problem), suffix_bytes


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


class ScanStore:
    """The temporary database of one scan: in memory while it is small, then in ``folder`` (default: the
    system's temporary folder) once more than ``memory_rows`` inputs were found."""

    def __init__(self, folder: str | None = None, *, memory_rows: int = MEMORY_ROWS) -> None:
        self.folder = folder
        self.memory_rows = memory_rows
        self._db = _connect(":memory:")
        self._db.executescript(_SCHEMA)
        self.on_disk = False
        self.prefix = ""  # what a stored NULL path stands for: prefix + rel_path
        self.count = 0
        self._found = 0
        self._selections = 0

    def _spill(self) -> None:
        """Move the database to a file in ``folder``, unlinked as soon as it is open (a kill leaves nothing)."""
        fd, name = tempfile.mkstemp(prefix=".maskseg-scan-", suffix=".sqlite", dir=self.folder)
        os.close(fd)
        try:
            disk = _connect(name)
        finally:
            os.unlink(name)
        try:
            self._db.backup(disk)
        except sqlite3.Error as exc:
            disk.close()
            self._db.close()
            raise _os_error(exc, self.folder) from None
        self._db.close()
        self._db = disk
        self.on_disk = True

    def close(self) -> None:
        """Close the database (its disk space is freed); rows can no longer be read."""
        self._db.close()

    def add(self, rows: Iterable[tuple]) -> None:
        """Store ``rows`` in the order given (the order decides which duplicate is kept): ``FoundRow``s, plain
        tuples of its eight fields, or, for regular files, tuples (path, size, mtime_ns, dev, ino, suffix_bytes)."""
        it = iter(rows)
        while chunk := list(itertools.islice(it, _ROWS_PER_TX)):
            if _plain_files(chunk):
                self._bulk(_INSERT_FILES, chunk)
            else:
                self._bulk(_INSERT_FOUND, [_encoded(row) for row in chunk])
            self._found += len(chunk)
            if not self.on_disk and self._found > self.memory_rows:
                self._spill()

    def finish(self, relative: Callable[[str], str], stem_of: Callable[[str], str], prefix: str, *,
               local: bool = False) -> list[tuple[str, str, str]]:
        """Sort and de-duplicate what was added; return the problems as (path, rel_path, reason), sorted.

        ``relative(path)`` is an input's rel_path, ``stem_of(rel_path)`` an image's output stem before
        collisions; a path equal to ``prefix + rel_path`` is stored as NULL. ``local`` says that, for
        every path that starts with ``prefix``, ``relative`` cuts the prefix off and ``stem_of`` cuts the
        ``suffix_bytes`` the row gives: when every row has them, sqlite names the rows itself (no Python
        per row).
        """
        db = self._db
        self.prefix = prefix
        db.execute("CREATE TABLE byrel (rel BLOB PRIMARY KEY, seq INTEGER NOT NULL, path BLOB, stem_len INTEGER, "
                   "stem BLOB, size INTEGER, mtime_ns INTEGER, dev INTEGER, ino INTEGER, etag TEXT, problem BLOB) "
                   "WITHOUT ROWID")
        cut = len(_enc(prefix))
        if local and cut and db.execute(
                "SELECT 1 FROM found WHERE substr(path, 1, ?) != ? OR length(path) <= ? "
                "OR (problem IS NULL AND suffix_bytes IS NULL) LIMIT 1", (cut, _enc(prefix), cut)).fetchone() is None:
            # The first row of each relative path wins (as below), named by cutting bytes off.
            self._bulk("INSERT OR IGNORE INTO byrel SELECT substr(path, ? + 1), seq, NULL, "
                       "length(path) - ? - CASE WHEN problem IS NULL THEN suffix_bytes ELSE 0 END, NULL, "
                       "size, mtime_ns, dev, ino, etag, problem FROM found ORDER BY seq", [(cut, cut)])
            return self._finish_named()

        def named() -> Iterator[tuple]:
            for seq, path_key, *rest, _ in db.execute("SELECT * FROM found ORDER BY seq"):
                path = _dec(path_key)
                rel = relative(path)
                rel_key = _enc(rel)
                stem_key = rel_key if rest[-1] is not None else _enc(stem_of(rel))  # problems have none
                # Most stems are the path without its extension: stored as a length into rel.
                short = rel_key.startswith(stem_key)
                yield (rel_key, seq, None if prefix + rel == path else path_key,
                       len(stem_key) if short else None, None if short else stem_key, *rest)

        # The first row of each relative path wins; then the first of each file among those left.
        self._bulk("INSERT OR IGNORE INTO byrel VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", named())
        return self._finish_named()

    def _finish_named(self) -> list[tuple[str, str, str]]:
        """``finish`` once ``byrel`` holds the first row of each relative path."""
        db, prefix = self._db, self.prefix
        db.execute("DROP TABLE found")
        self._bulk("CREATE INDEX byrel_file ON byrel (dev, ino, seq) WHERE dev IS NOT NULL", None)
        self._bulk("DELETE FROM byrel WHERE rel IN (SELECT b.rel FROM (SELECT dev, ino, MIN(seq) AS first FROM byrel "
                   "WHERE dev IS NOT NULL GROUP BY dev, ino HAVING COUNT(*) > 1) AS d JOIN byrel AS b "
                   "ON b.dev = d.dev AND b.ino = d.ino AND b.seq > d.first)", None)
        stem = "COALESCE(stem, substr(rel, 1, stem_len))"
        self._bulk(f"CREATE TABLE shared AS SELECT {stem} AS stem FROM byrel WHERE problem IS NULL "
                   f"GROUP BY {stem} HAVING COUNT(*) > 1", None)
        self._bulk("CREATE TABLE refs (pos INTEGER PRIMARY KEY, rel BLOB NOT NULL, path BLOB, stem_len INTEGER, "
                   "stem BLOB, shared INTEGER NOT NULL, size INTEGER, mtime_ns INTEGER, etag TEXT)", None)
        self._bulk(f"INSERT INTO refs (rel, path, stem_len, stem, shared, size, mtime_ns, etag) "
                   f"SELECT rel, path, stem_len, stem, {stem} IN (SELECT stem FROM shared), size, mtime_ns, etag "
                   f"FROM byrel WHERE problem IS NULL ORDER BY rel", None)
        problems = [(_dec(path) if path is not None else prefix + _dec(rel), _dec(rel), _dec(problem))
                    for rel, path, problem in
                    db.execute("SELECT rel, path, problem FROM byrel WHERE problem IS NOT NULL ORDER BY rel")]
        db.execute("DROP TABLE byrel")
        db.execute("DROP TABLE shared")
        self.count = db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]
        return problems

    def rows(self, selection: str | None = None) -> Iterator[tuple[int, StoredRef]]:
        """(position, image) in relative-path order: all of them, or those of a ``select`` result."""
        for pos, *row in self._db.execute(f"{self._query(selection)} ORDER BY {self._order(selection)}"):
            yield pos, self._ref(row)

    def row(self, index: int, selection: str | None = None) -> StoredRef:
        """The image at 0-based ``index`` (of all, or of a selection): one B-tree lookup."""
        found = self._db.execute(f"{self._query(selection)} WHERE {self._order(selection)} = ?",
                                 (index + 1,)).fetchone()
        if found is None:
            raise IndexError(index)
        return self._ref(found[1:])

    def select_joined(self, path: str, join: str, where: str, params: Sequence[object],
                      selection: str | None = None) -> tuple[str, int]:
        """A new selection of the images (of all, or of ``selection``) for which ``where`` holds, with the
        sqlite database at ``path`` attached as ``other`` and LEFT JOINed ``join`` (SQL after ``JOIN``).

        Images are ``r`` (columns: pos, rel, path, stem_len, stem, shared, size, mtime_ns, etag; ``rel`` is
        ``surrogatepass`` UTF-8). ``other`` is opened with an exclusive lock (a database in WAL mode needs no
        shared memory then) and detached before this returns: nobody else may have it open meanwhile.
        """
        db = self._db
        name = self._new_selection()
        db.execute("PRAGMA locking_mode = EXCLUSIVE")
        db.execute("ATTACH DATABASE ? AS other", (path,))
        try:
            self._bulk(f"INSERT INTO {name} (pos) SELECT r.pos FROM {self._from(selection)} LEFT JOIN {join} "
                       f"WHERE {where} ORDER BY {self._order(selection)}", [tuple(params)])
        finally:
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed by _bulk on an error: nothing to undo
                db.execute("DETACH DATABASE other")
                db.execute("PRAGMA locking_mode = NORMAL")
        return name, db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]

    def _new_selection(self) -> str:
        """The name of a new, empty selection table."""
        self._selections += 1
        name = f"sel_{self._selections}"
        self._db.execute(f"CREATE TABLE {name} (i INTEGER PRIMARY KEY, pos INTEGER NOT NULL)")
        return name

    def positions(self, selection: str | None = None) -> Iterator[int]:
        """The positions of ``rows``, alone."""
        for (pos,) in self._db.execute(f"SELECT r.pos FROM {self._from(selection)} ORDER BY {self._order(selection)}"):
            yield pos

    def select(self, positions: Iterable[int]) -> tuple[str, int]:
        """A new selection of the images at ``positions`` (increasing): its name and size."""
        name = self._new_selection()
        self._bulk(f"INSERT INTO {name} (pos) VALUES (?)", ((p,) for p in positions))
        return name, self._db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]

    @classmethod
    def _query(cls, selection: str | None) -> str:
        return ("SELECT r.pos, r.rel, r.path, r.stem_len, r.stem, r.shared, r.size, r.mtime_ns, r.etag "
                f"FROM {cls._from(selection)}")

    @staticmethod
    def _from(selection: str | None) -> str:
        return "refs AS r" if selection is None else f"{selection} AS s JOIN refs AS r ON r.pos = s.pos"

    @staticmethod
    def _order(selection: str | None) -> str:
        """The column numbering the rows 1, 2, ... in order (positions are dense in ``refs`` and ``sel_*``)."""
        return "r.pos" if selection is None else "s.i"

    def _ref(self, row: Iterable) -> StoredRef:
        rel_key, path, stem_len, stem, shared, size, mtime_ns, etag = row
        rel = _dec(rel_key)
        return StoredRef(rel, self.prefix + rel if path is None else _dec(path),
                         _dec(rel_key[:stem_len] if stem is None else stem), bool(shared), size, mtime_ns, etag)

    def _bulk(self, sql: str, params: Iterable[tuple] | None) -> None:
        """One statement (for each of ``params``) in one transaction. Without a rollback journal there is
        no rollback: on any error the store is closed (the scan that owns it failed)."""
        try:
            self._db.execute("BEGIN")
            if params is None:
                self._db.execute(sql)
            else:
                self._db.executemany(sql, params)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._db.close()
            raise _os_error(exc, self.folder if self.on_disk else None) from None
        except BaseException:
            self._db.close()
            raise
