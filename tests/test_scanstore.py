"""The scan's temporary database: first-wins de-duplication, Python's order, shared stems, selections."""

from __future__ import annotations

import errno
import os
import sqlite3

import pytest

from maskseg.scanstore import FoundRow, ScanStore


def _image(path: str, dev: int | None = 1, ino: int | None = None) -> FoundRow:
    return FoundRow(path, 10, 20, dev, ino if ino is not None else hash(path) & 0xFFFFFF, None, None)


def _finish(store: ScanStore, root: str = "/r") -> list[tuple[str, str, str]]:
    return store.finish(lambda p: p[len(root) + 1:], lambda rel: os.path.splitext(rel)[0], root + "/")


def test_first_of_each_path_then_first_of_each_file_wins(tmp_path):
    """As the scan did in memory: a row dropped as a repeated path does not claim its file."""
    store = ScanStore(str(tmp_path))
    store.add([_image("/r/x.jpg", ino=1), _image("/r/x.jpg", ino=2),  # the same path again: dropped
               _image("/r/y.jpg", ino=2),  # the file of a dropped row: kept
               _image("/r/z.jpg", ino=1),  # x.jpg's file under another name (a hard link): dropped
               _image("/r/w.jpg", dev=2, ino=1),  # another device: another file
               FoundRow("/r/v.jpg", None, None, None, None, None, "dangling symlink")])
    problems = _finish(store)
    assert [(s.rel_path, s.path) for _, s in store.rows()] == [("w.jpg", "/r/w.jpg"), ("x.jpg", "/r/x.jpg"),
                                                               ("y.jpg", "/r/y.jpg")]
    assert problems == [("/r/v.jpg", "v.jpg", "dangling symlink")]
    assert store.count == 3


def test_order_is_pythons_for_every_name(tmp_path):
    """Keys are surrogatepass UTF-8: byte order is code point order, non-UTF-8 names' surrogates included."""
    names = ["z.jpg", "\udce9.jpg", "\u00e9.jpg", "\ue000.jpg", "\U0001f600.jpg", "a b.jpg", "a/b.jpg", "A.jpg",
             "a.b.jpg", "a-.jpg", "\ud7ff.jpg"]
    store = ScanStore(str(tmp_path))
    store.add(_image("/r/" + n) for n in names)
    _finish(store)
    assert [s.rel_path for _, s in store.rows()] == sorted(names)


@pytest.mark.parametrize("chunk_rows", [2, 10_000])
def test_file_tuples_store_as_found_rows(tmp_path, monkeypatch, chunk_rows):
    """Regular files' six-field tuples (sqlite encodes their paths) give what the same files as
    ``FoundRow``s give, in chunks of files only, of files with a non-UTF-8 name, and mixed with problems."""
    monkeypatch.setattr("maskseg.scanstore._ROWS_PER_TX", chunk_rows)
    names = ["b.jpg", "\udce9.jpg", "\u00e9.jpg", "a.jpg", "\U0001f600.jpg", "c.jpg", "a.jpg", "d.jpg"]
    rows = [(f"/r/{n}", 10 + i, 20 + i, 1, 100 + i, 4) for i, n in enumerate(names)]
    problem = FoundRow("/r/\udcff.png", None, None, None, None, None, "FIFO \udcff")
    plain, tuples = ScanStore(str(tmp_path)), ScanStore(str(tmp_path))
    plain.add([FoundRow(p, size, mtime, dev, ino, None, None, cut) for p, size, mtime, dev, ino, cut in rows]
              + [problem])
    tuples.add([*rows[:3], problem, *rows[3:]])
    assert _finish(plain) == _finish(tuples) == [("/r/\udcff.png", "\udcff.png", "FIFO \udcff")]
    assert list(plain.rows()) == list(tuples.rows())
    assert [(s.rel_path, s.size) for _, s in tuples.rows()][:2] == [("a.jpg", 13), ("b.jpg", 10)]
    assert tuples.count == 7


def test_shared_stems_and_paths_stored_apart(tmp_path):
    store = ScanStore(str(tmp_path))
    rows = ["/r/a.jpg", "/r/a.png", "/r/a.b.jpg", "/r/a.k.jpg", "/r/a/x.jpg", "/r/a.jpg.d/x.png", "/r/b.jpg"]
    store.add([_image(p) for p in rows] + [FoundRow("/r/a.gif", None, None, None, None, None, "FIFO")])
    # A path that is not root + rel_path (a URL's, say) is kept whole; a stem that is not a prefix, too.
    store.add([_image("s3://elsewhere/c.jpg")])
    store.finish(lambda p: p.split("/", 3)[-1] if p.startswith("s3") else p[3:],
                 lambda rel: "stem-of-c" if rel == "c.jpg" else os.path.splitext(rel)[0], "/r/")
    got = {s.rel_path: (s.path, s.stem, s.shared) for _, s in store.rows()}
    assert got == {"a.jpg": ("/r/a.jpg", "a", True), "a.png": ("/r/a.png", "a", True),  # a problem shares none
                   "a.b.jpg": ("/r/a.b.jpg", "a.b", False), "a.k.jpg": ("/r/a.k.jpg", "a.k", False),
                   "a/x.jpg": ("/r/a/x.jpg", "a/x", False), "a.jpg.d/x.png": ("/r/a.jpg.d/x.png", "a.jpg.d/x", False),
                   "b.jpg": ("/r/b.jpg", "b", False), "c.jpg": ("s3://elsewhere/c.jpg", "stem-of-c", False)}


def test_rows_by_position_and_selections(tmp_path):
    store = ScanStore(str(tmp_path))
    store.add(_image(f"/r/{i:03d}.jpg") for i in range(100))
    _finish(store)
    assert store.row(0).rel_path == "000.jpg" and store.row(99).rel_path == "099.jpg"
    with pytest.raises(IndexError):
        store.row(100)
    odd, n = store.select(pos for pos in store.positions() if pos % 2 == 0)  # positions count from 1
    assert n == 50 and [s.rel_path for _, s in store.rows(odd)][:2] == ["001.jpg", "003.jpg"]
    tens, n = store.select(pos for pos, s in store.rows(odd) if s.rel_path.endswith("1.jpg"))
    assert n == 10 and store.row(9, tens).rel_path == "091.jpg"
    assert [s.rel_path for _, s in store.rows(tens)] == [f"{i:03d}.jpg" for i in range(1, 100, 10)]


def test_small_in_memory_large_in_a_file_gone_at_once_and_freed_on_close(tmp_path):
    before = _open_scan_files()
    small = ScanStore(str(tmp_path), memory_rows=2)
    small.add(_image(f"/r/{i}.jpg") for i in range(2))
    assert not small.on_disk and _open_scan_files() == before
    store = ScanStore(str(tmp_path), memory_rows=2)
    store.add(_image(f"/r/{i}.jpg") for i in range(3))
    assert store.on_disk and _open_scan_files() == before + 1
    assert list(tmp_path.iterdir()) == []  # unlinked as soon as it was open: a kill leaves nothing
    _finish(store)
    assert [s.rel_path for _, s in store.rows()] == ["0.jpg", "1.jpg", "2.jpg"]
    store.close()
    assert _open_scan_files() == before
    with pytest.raises(sqlite3.ProgrammingError):
        list(store.rows())


def test_a_failing_producer_closes_the_store(tmp_path):
    def rows():
        yield _image("/r/a.jpg")
        raise RuntimeError("walk failed")

    before = _open_scan_files()
    store = ScanStore(str(tmp_path), memory_rows=0)
    with pytest.raises(RuntimeError, match="walk failed"):
        store.add(rows())
    assert _open_scan_files() == before


def test_a_full_disk_is_an_oserror(tmp_path, monkeypatch):
    """sqlite's "database or disk is full" reaches the caller as ENOSPC, which predict words for users."""
    store = ScanStore(str(tmp_path), memory_rows=0)
    store.add([_image("/r/a.jpg")])
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # SQLITE_FULL

    class Full:
        def execute(self, sql, *args):
            pass

        def executemany(self, sql, rows):
            raise full

        def close(self):
            pass

    monkeypatch.setattr(store, "_db", Full())
    with pytest.raises(OSError) as caught:
        store.add([_image("/r/b.jpg")])
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path)


def _open_scan_files() -> int:
    """How many of this process's file descriptors are (deleted) scan databases."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += ".maskseg-scan-" in target
    return count
