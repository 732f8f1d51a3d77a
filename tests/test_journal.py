"""The journal (append-only, torn lines repaired, failed writes cut back) and OUT's lock."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from maskseg import journal as journal_module
from maskseg.errors import LockedError, OutputError
from maskseg.journal import INDEX_NAME, JOURNAL_NAME, Journal, OutputLock


def _done(rel: str, image_id: int) -> dict:
    return {"kind": "done", "image_id": image_id, "rel_path": rel, "path": "/x/" + rel, "size": 1, "mtime_ns": 2,
            "width": 3, "height": 4, "writers": ["coco"], "detections": []}


def test_records_survive_reopen_and_ids_stay(tmp_path):
    j = Journal(tmp_path)
    j.add(_done("a.jpg", j.image_id("a.jpg")))
    j.add({"kind": "failed", "rel_path": "b.jpg", "path": "/x/b.jpg", "size": 5, "mtime_ns": 6, "reason": "bad"})
    j.close()
    j = Journal(tmp_path)
    assert j.counts == (1, 1)
    assert j.image_id("a.jpg") == 1 and j.image_id("c.jpg") == 2
    assert [r["rel_path"] for r in j.done_records()] == ["a.jpg"]
    assert [r["reason"] for r in j.failure_records()] == ["bad"]
    j.close()


def test_torn_last_line_from_a_kill_is_dropped(tmp_path, caplog):
    lines = [json.dumps(_done(f"{i}.jpg", i + 1)) + "\n" for i in range(3)]
    whole = "".join(lines[:2]).encode()
    (tmp_path / JOURNAL_NAME).write_bytes(whole + lines[2].encode()[:25])
    j = Journal(tmp_path)
    assert j.counts == (2, 0) and "torn by an earlier crash" in caplog.text
    assert (tmp_path / JOURNAL_NAME).read_bytes() == whole
    j.add(_done("new.jpg", j.image_id("new.jpg")))
    j.close()
    records = [json.loads(line) for line in (tmp_path / JOURNAL_NAME).read_text().splitlines()]
    assert [r["rel_path"] for r in records] == ["0.jpg", "1.jpg", "new.jpg"] and records[-1]["image_id"] == 3


def test_unreadable_record_is_skipped(tmp_path, caplog):
    good = json.dumps(_done("a.jpg", 1)) + "\n"
    (tmp_path / JOURNAL_NAME).write_text("{not json}\n" + good)
    j = Journal(tmp_path)
    assert j.counts == (1, 0) and "unreadable record at byte 0" in caplog.text
    j.close()


def test_failed_write_is_cut_back_to_the_last_whole_record(tmp_path):
    """A write that stops part-way (here: RLIMIT_FSIZE, as a full disk would) leaves no torn record."""
    j = Journal(tmp_path)
    j.add(_done("a.jpg", 1))
    j.flush()
    before = (tmp_path / JOURNAL_NAME).read_bytes()
    for i in range(20):
        j.add(_done(f"b{i}.jpg", i + 2))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 100, hard))
    try:
        with pytest.raises(OutputError, match=JOURNAL_NAME):
            j.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    j.close()  # nothing queued is written again
    assert (tmp_path / JOURNAL_NAME).read_bytes() == before
    assert Journal(tmp_path).counts == (1, 0)


def test_second_lock_is_refused_and_released(tmp_path):
    with OutputLock(tmp_path):
        held = rf"another maskseg run is using this output folder \(pid {os.getpid()}\)"
        with pytest.raises(LockedError, match=held):
            OutputLock(tmp_path).acquire()
        assert LockedError.exit_code == 75
    with OutputLock(tmp_path):
        pass


HOLDER = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from pathlib import Path
    from maskseg.journal import OutputLock

    OutputLock(Path(sys.argv[1])).acquire()
    children = []
    if sys.argv[2] == "fork":
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
        proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=False)
        proc.start()
        children.append(proc.pid)
    print(" ".join(map(str, children)), flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("mode", ["alone", "fork"])
def test_lock_of_a_killed_run_never_blocks_the_next(tmp_path, mode):
    """SIGKILL the lock holder; its fork()ed children (os.fork, multiprocessing) live on, and the lock
    must still be free: flock belongs to the open file description, which a fork shares."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), mode], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1])
    children = [int(p) for p in holder.stdout.readline().split()]
    try:
        with pytest.raises(LockedError):
            OutputLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        for pid in children:
            os.kill(pid, 0)  # still alive
        deadline = time.monotonic() + 10
        while True:
            try:
                OutputLock(tmp_path).acquire()
                break
            except LockedError:
                assert time.monotonic() < deadline, "the lock outlived the run that took it"
                time.sleep(0.05)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        holder.kill()
        holder.wait()


# -- the index beside the journal (journal.index, sqlite): a cache the journal can always rebuild ------

def _journal_with(tmp_path, n: int) -> None:
    j = Journal(tmp_path)
    for i in range(n):
        j.add(_done(f"{i:03}.jpg", j.image_id(f"{i:03}.jpg")))
    j.add({"kind": "failed", "rel_path": "bad.jpg", "path": "/x/bad.jpg", "size": 5, "mtime_ns": 6, "reason": "r"})
    j.close()


def _state(tmp_path) -> tuple:
    j = Journal(tmp_path)
    try:
        return (j.counts, [(r["rel_path"], r["image_id"]) for r in j.done_records()],
                [r["rel_path"] for r in j.failure_records()], j.image_id("new.jpg"))
    finally:
        j.close()


def test_missing_or_unreadable_index_is_rebuilt_from_the_journal(tmp_path, caplog):
    _journal_with(tmp_path, 5)
    assert (tmp_path / INDEX_NAME).is_file()
    want = _state(tmp_path)
    assert want[0] == (5, 1) and want[3] == 6
    (tmp_path / INDEX_NAME).unlink()
    assert _state(tmp_path) == want
    (tmp_path / INDEX_NAME).write_bytes(b"not a database at all" * 100)
    assert _state(tmp_path) == want
    assert "rebuilt" in caplog.text


def test_index_of_another_journal_is_not_trusted(tmp_path):
    """A journal replaced by one of the same length (a restore, a copy) is re-read, not looked up."""
    _journal_with(tmp_path, 3)
    raw = (tmp_path / JOURNAL_NAME).read_bytes()
    (tmp_path / JOURNAL_NAME).write_bytes(raw.replace(b'"000.jpg"', b'"zzz.jpg"'))
    _counts, done, _failed, _ = _state(tmp_path)
    assert [rel for rel, _ in done] == ["zzz.jpg", "001.jpg", "002.jpg"]
    (tmp_path / JOURNAL_NAME).write_bytes(raw[: raw.index(b"\n") + 1])  # cut back: shorter than indexed
    assert _state(tmp_path)[0] == (1, 0)


def test_records_the_index_missed_are_indexed_on_open(tmp_path):
    """A kill between the journal's fsync and the index update leaves the index behind: the journal's
    tail is indexed on the next open, and nothing is done twice."""
    _journal_with(tmp_path, 2)
    with open(tmp_path / JOURNAL_NAME, "ab") as fh:
        fh.write((json.dumps(_done("late.jpg", 7)) + "\n").encode())
    j = Journal(tmp_path)
    assert j.counts == (3, 1) and j.entry("late.jpg").image_id == 7 and j.image_id("next.jpg") == 8
    j.close()


def test_records_are_read_back_in_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "_RECORD_SLICE", 3)
    j = Journal(tmp_path)
    rels = [f"{i}.jpg" for i in range(10)]
    for rel in reversed(rels):  # ids in reverse path order: done_records follows ids, failures paths
        j.add(_done(rel, j.image_id(rel)))
    for rel in rels:
        j.add({"kind": "failed", "rel_path": "f" + rel, "path": "/x", "size": 1, "mtime_ns": 1, "reason": "r"})
    j.close()
    j = Journal(tmp_path)
    assert [r["rel_path"] for r in j.done_records()] == list(reversed(rels))
    assert [r["rel_path"] for r in j.failure_records()] == sorted("f" + r for r in rels)
    j.close()


def test_objects_are_versioned_by_etag_and_names_need_not_be_utf8(tmp_path):
    from maskseg.sources import ImageRef

    odd = os.fsdecode(b"caf\xe9.jpg")
    j = Journal(tmp_path)
    j.add(dict(_done(odd, 1), etag='"abc"', mtime_ns=5))
    j.close()
    j = Journal(tmp_path)
    assert j.is_done(ImageRef("s3://b/x", odd, "x", 1, 5, '"abc"'), ("coco",))
    assert j.is_done(ImageRef("s3://b/x", odd, "x", 1, 99, '"abc"'), ("coco",))  # the ETag decides, not the time
    assert not j.is_done(ImageRef("s3://b/x", odd, "x", 1, 5, '"new"'), ("coco",))
    assert not j.is_done(ImageRef("/x", odd, "x", 1, 5), ("coco",))
    assert [r["rel_path"] for r in j.done_records()] == [odd]
    j.close()


def test_pending_is_what_is_done_and_is_known_failure_say(tmp_path):
    from maskseg.sources import ImageRef

    j = Journal(tmp_path)
    j.add(_done("done.jpg", 1))
    j.add(_done("changed.jpg", 2))
    j.add({"kind": "failed", "rel_path": "failed.jpg", "path": "/x", "size": 1, "mtime_ns": 2, "reason": "r"})
    j.add({"kind": "failed", "rel_path": "fixed.jpg", "path": "/x", "size": 1, "mtime_ns": 2, "reason": "r"})
    j.close()
    j = Journal(tmp_path)
    j.add(_done("queued.jpg", 3))  # queued, not yet flushed: counts as done already
    refs = [ImageRef("/x/" + rel, rel, rel, 1, mtime) for rel, mtime in
            [("changed.jpg", 9), ("done.jpg", 2), ("failed.jpg", 2), ("fixed.jpg", 3), ("new.jpg", 2),
             ("queued.jpg", 2)]]
    todo, skipped = j.pending(refs, ("coco",))
    assert [r.rel_path for r in todo] == ["changed.jpg", "fixed.jpg", "new.jpg"] and skipped == 2
    assert [r.rel_path for r in refs if not j.is_done(r, ("coco",))] == [
        "changed.jpg", "failed.jpg", "fixed.jpg", "new.jpg"]
    todo, skipped = j.pending(refs, ("coco", "overlay"))  # done, but not by every writer of this run
    assert [r.rel_path for r in todo] == ["changed.jpg", "done.jpg", "fixed.jpg", "new.jpg", "queued.jpg"]
    j.close()


@pytest.mark.parametrize("join_min", [0, 10**9], ids=["joined-in-sqlite", "ref-by-ref"])
def test_pending_of_a_scan_joins_the_index_with_the_same_verdicts(tmp_path, monkeypatch, join_min):
    """A scan's resume check joins its refs with the index in sqlite; the refs that are not plainly done
    go ref by ref: the answer is the same either way, non-UTF-8 names and 0xED bytes included."""
    from maskseg.sources import scan_sources

    images = tmp_path / "in"
    images.mkdir()
    names = ["done.jpg", "touched.jpg", "grown.jpg", "coco-only.jpg", "failed.jpg", "fixed.jpg", "new.jpg",
             "\ud55c.jpg", os.fsdecode(b"caf\xe9.jpg")]  # U+D55C is 0xED 0x95 0x9C in UTF-8
    for name in names:
        with open(os.path.join(os.fsencode(images), os.fsencode(name)), "wb") as fh:
            fh.write(b"x" * 10)
    scan = scan_sources([str(images)], spill_dir=str(tmp_path))
    refs = {r.rel_path: r for r in scan.refs}
    out = tmp_path / "out"
    out.mkdir()
    j = Journal(out)
    for i, name in enumerate(["done.jpg", "touched.jpg", "grown.jpg", "\ud55c.jpg", names[-1]], 1):
        j.add(dict(_done(name, i), size=10, mtime_ns=refs[name].mtime_ns, writers=["coco", "overlay"]))
    j.add(dict(_done("coco-only.jpg", 9), size=10, mtime_ns=refs["coco-only.jpg"].mtime_ns))
    j.add({"kind": "failed", "rel_path": "failed.jpg", "path": "/x", "size": 10,
           "mtime_ns": refs["failed.jpg"].mtime_ns, "reason": "r"})
    j.add({"kind": "failed", "rel_path": "fixed.jpg", "path": "/x", "size": 10, "mtime_ns": 1, "reason": "r"})
    j.close()
    os.utime(images / "touched.jpg", ns=(1, 1))
    (images / "grown.jpg").write_bytes(b"x" * 11)
    scan = scan_sources([str(images)], spill_dir=str(tmp_path))

    monkeypatch.setattr(journal_module, "_JOIN_MIN", join_min)
    decided = []
    verdicts = Journal._verdicts
    monkeypatch.setattr(Journal, "_verdicts", lambda self, r, w: (decided.append(len(r)), verdicts(self, r, w))[1])
    j = Journal(out)
    todo, skipped = j.pending(scan.refs, ("coco", "overlay"))
    assert sorted(r.rel_path for r in todo) == ["coco-only.jpg", "fixed.jpg", "grown.jpg", "new.jpg", "touched.jpg"]
    assert skipped == 3  # done.jpg and both odd names; failed.jpg is neither to do nor skipped
    # Joined, only what is not plainly done is decided ref by ref: the six others and the two odd names.
    assert decided == ([8] if join_min == 0 else [len(names)])
    todo, skipped = j.pending(scan.refs, ("coco",))
    assert sorted(r.rel_path for r in todo) == ["fixed.jpg", "grown.jpg", "new.jpg", "touched.jpg"] and skipped == 4
    j.close()
    scan.close()
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_NAME, JOURNAL_NAME])  # no scratch left
