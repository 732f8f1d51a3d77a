"""Walking inputs safely: every awkward path on disk, globs and list files, limits, OUT kept apart."""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from maskseg.errors import SourceError, WriterError
from maskseg.sources import ImageRef, ListLimits, ScanRefs, scan_sources
from maskseg.writers import RunContext

from .corpus import build_corpus, encode, non_utf8_rel, upright

# Failures the walker itself reports (nothing is opened); the rest of corpus.bad fail when decoded.
WALKER_PROBLEMS = {"links/self.jpg", "links/dangling.jpg", "special/fifo.jpg", "special/device.jpg"}


def _scan(*args, **kwargs):
    """scan_sources in a thread with a deadline: a walker that loops or blocks fails the test."""
    result: list = []

    def scan() -> None:
        try:
            result.append(scan_sources(*args, **kwargs))
        except Exception as exc:
            result.append(exc)

    t = threading.Thread(target=scan, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "the scan did not finish (symlink loop or a blocking open?)"
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def test_corpus_walk(tmp_path):
    unreadable = os.geteuid() != 0  # root reads mode-000 files and folders: left out of the corpus then
    corpus = build_corpus(tmp_path / "in", unreadable=unreadable)
    walker_problems = WALKER_PROBLEMS | ({"special/locked"} if unreadable else set())
    scan = _scan([str(corpus.root)])
    refs = {r.rel_path for r in scan.refs}
    problems = {p.rel_path: p.reason for p in scan.problems}
    assert refs == set(corpus.good) | (set(corpus.bad) - walker_problems)
    assert set(problems) == walker_problems
    for rel, reason in problems.items():
        assert corpus.bad[rel] in reason, (rel, reason)
    assert not any(r.startswith(("links/loop", "paths/.hidden")) for r in refs | set(problems))
    assert "paths/folder.jpg/inside.jpg" in refs and "paths/UPPER.JPG" in refs and non_utf8_rel() in refs
    rel_paths = [r.rel_path for r in scan.refs]
    assert rel_paths == sorted(rel_paths)
    for ref in scan.refs:  # the path is what the walker saw (links not resolved), the size from the scan
        assert ref.path == os.path.join(str(corpus.root), ref.rel_path)
        assert ref.size == os.stat(ref.path).st_size


def test_same_file_twice_is_read_once(tmp_path):
    (tmp_path / "a.jpg").write_bytes(encode(upright(), "JPEG"))
    (tmp_path / "b.jpg").symlink_to("a.jpg")
    os.link(tmp_path / "a.jpg", tmp_path / "c.jpg")
    scan = scan_sources([str(tmp_path), str(tmp_path / "a.jpg")])
    assert [r.rel_path for r in scan.refs] == ["a.jpg"]


def test_stems_that_collide_get_their_extension(tmp_path):
    (tmp_path / "x.jpg").write_bytes(encode(upright(), "JPEG"))
    (tmp_path / "x.png").write_bytes(encode(upright(), "PNG"))
    assert sorted(r.out_stem for r in scan_sources([str(tmp_path)]).refs) == ["x_jpg", "x_png"]


def test_glob_never_follows_a_cycle(tmp_path):
    corpus = build_corpus(tmp_path / "in", special=False)
    (corpus.root / "paths" / "deep" / "up").symlink_to("../..")
    scan = _scan([str(corpus.root / "**" / "*.jpg")])
    rels = {r.rel_path for r in scan.refs}
    assert "paths/deep/a/b/c/d/e/f/g/h/deep.jpg" in rels and "exif/orientation_6.jpg" in rels
    assert not any("/up/" in r for r in rels) and "paths/UPPER.JPG" not in rels  # *.jpg is case-sensitive


def test_list_file_paths_never_leave_out(tmp_path):
    """`../../x.jpg` and absolute paths from other roots give rel paths that stay inside OUT."""
    other = tmp_path / "elsewhere" / "etc"
    other.mkdir(parents=True)
    (other / "x.jpg").write_bytes(encode(upright(), "JPEG"))
    lists = tmp_path / "a" / "b" / "lists"
    lists.mkdir(parents=True)
    (lists / "here.jpg").write_bytes(encode(upright(), "JPEG"))
    lst = lists / "list.txt"
    lst.write_text(f"../../../elsewhere/etc/x.jpg\n{other / 'x.jpg'}\nhere.jpg\n../../../../../../../../etc/none.jpg\n")
    scan = scan_sources([f"@{lst}"])
    rels = sorted(r.rel_path for r in scan.refs)
    assert len(rels) == 2
    out = tmp_path / "out"
    run = RunContext(out, None, [], "m")
    for rel in rels + [p.rel_path for p in scan.problems]:
        assert not rel.startswith(("/", "../")) and "/../" not in rel, rel
        path = run.output_path("overlays", rel)
        assert os.path.abspath(path).startswith(str(out) + os.sep)
    assert [p.reason for p in scan.problems] == ["listed but does not exist"]
    with pytest.raises(WriterError, match="outside"):
        run.output_path("overlays", "../../etc/x.jpg")
    with pytest.raises(WriterError, match="outside"):
        run.output_path("/etc/x.jpg")


def test_list_with_non_utf8_and_comment_lines(tmp_path):
    name = b"caf\xe9.jpg"
    with open(os.path.join(os.fsencode(tmp_path), name), "wb") as fh:
        fh.write(encode(upright(), "JPEG"))
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"# a comment\n\n" + name + b"\r\n")
    assert [r.rel_path for r in scan_sources([f"@{lst}"]).refs] == [os.fsdecode(name)]


def test_list_limits(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg\nb.jpg\nc.jpg\n")
    with pytest.raises(SourceError, match="more than 2 entries"):
        scan_sources([f"@{lst}"], limits=ListLimits(entries=2))
    with pytest.raises(SourceError, match="over 10 bytes"):
        scan_sources([f"@{lst}"], limits=ListLimits(total_bytes=10))
    with pytest.raises(SourceError, match="more than 1 entries"):
        scan_sources(["-"], stdin=["a.jpg", "b.jpg"], limits=ListLimits(entries=1))
    # An endless stream without newlines is refused after one over-long line, not read to the end.
    with pytest.raises(SourceError, match="line 1 is over 65,536 bytes"):
        _scan(["@/dev/zero"])


def test_missing_input_and_unreadable_list(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        scan_sources([str(tmp_path / "missing")])
    with pytest.raises(SourceError, match="cannot read list file"):
        scan_sources([f"@{tmp_path / 'missing.txt'}"])
    assert scan_sources([str(tmp_path)]).refs == []


def test_out_inside_input_is_skipped_and_input_inside_out_refused(tmp_path, caplog):
    root = tmp_path / "in"
    out = root / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "x.jpg").write_bytes(encode(upright(), "JPEG"))
    (root / "y.jpg").write_bytes(encode(upright(), "JPEG"))
    with caplog.at_level("INFO", logger="maskseg"):
        scan = scan_sources([str(root)], exclude=str(out))
    assert [r.rel_path for r in scan.refs] == ["y.jpg"]
    assert "the output folder, inside the input; not read" in caplog.text
    for item in (str(out), str(out / "overlays"), str(out / "overlays" / "x.jpg"), str(out / "**" / "*.jpg")):
        with pytest.raises(SourceError, match="inside the output folder"):
            scan_sources([item], exclude=str(out))
    lst = tmp_path / "list.txt"
    lst.write_text(f"{out / 'overlays' / 'x.jpg'}\n{root / 'y.jpg'}\n")
    scan = scan_sources([f"@{lst}"], exclude=str(out))
    assert [r.rel_path for r in scan.refs] == ["y.jpg"]
    assert [p.reason for p in scan.problems] == ["inside the output folder; not read"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 folders; test_hardening covers unreadable "
                                              "files without CAP_DAC_OVERRIDE (setpriv)")
def test_unreadable_folder_is_a_problem(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "x.jpg").write_bytes(encode(upright(), "JPEG"))
    locked.chmod(0)
    try:
        scan = scan_sources([str(tmp_path)])
    finally:
        locked.chmod(0o755)
    assert [(p.rel_path, p.reason) for p in scan.problems] == [("locked", "cannot read folder: Permission denied")]


def test_paths_are_absolute_and_rel_paths_posix(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "-dash.jpg").write_bytes(encode(upright(), "JPEG"))
    monkeypatch.chdir(tmp_path)
    [ref] = scan_sources(["sub"]).refs
    assert Path(ref.path).is_absolute() and ref.rel_path == "-dash.jpg"


def test_refs_stream_sorted_with_duplicates_and_shared_stems_resolved(tmp_path):
    """The scan's refs come from its database in rel_path order, named exactly as the in-memory scan named
    them: each file once (repeated inputs, hard links, symlinks), ``x_png`` where stems are shared."""
    root = tmp_path / "in"
    for rel in ("a.jpg", "a.png", "a.b.jpg", "a.k.jpg", "A.JPG", "b.jpg", "sub/a.jpg", "sub/a.tif",
                "a.jpg.d/in.jpg", "\u00e9.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode(upright(), "JPEG"))
    os.link(root / "b.jpg", root / "c.jpg")  # the same file as b.jpg, found after it: dropped
    (root / "d.jpg").symlink_to("b.jpg")
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # not UTF-8: a lone surrogate in Python
    with open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(encode(upright(), "JPEG"))
    lst = tmp_path / "list.txt"
    lst.write_text("in/a.png\nin/./b.jpg\nin/missing.jpg\nin/sub/a.tif\n")
    scan = scan_sources([str(root), f"@{lst}", str(root / "a.jpg")])
    expected = sorted([("A.JPG", "A"), ("a.b.jpg", "a.b"), ("a.jpg", "a_jpg"), ("a.jpg.d/in.jpg", "a.jpg.d/in"),
                       ("a.k.jpg", "a.k"), ("a.png", "a_png"), ("b.jpg", "b"), ("sub/a.jpg", "sub/a_jpg"),
                       ("sub/a.tif", "sub/a_tif"), ("\u00e9.jpg", "\u00e9"),
                       (latin1, latin1[:-4])])
    assert isinstance(scan.refs, ScanRefs) and len(scan.refs) == len(expected)
    assert [(r.rel_path, r.out_stem) for r in scan.refs] == expected
    assert [(p.rel_path, p.reason) for p in scan.problems] == [("missing.jpg", "listed but does not exist")]
    first = list(scan.refs)
    assert list(scan.refs) == first and scan.refs == first  # re-iterable, and equal to the list it streams
    assert scan.refs[0] == first[0] and scan.refs[-1] == first[-1] and scan.refs[2:4] == first[2:4]
    assert all(ref.path == str(root / ref.rel_path) for ref in first)
    shard = scan.refs.where(ref.out_stem.startswith("a") for ref in scan.refs)
    assert isinstance(shard, ScanRefs) and [r.rel_path for r in shard] == [
        "a.b.jpg", "a.jpg", "a.jpg.d/in.jpg", "a.k.jpg", "a.png"]
    assert shard[1].out_stem == "a_jpg" and len(shard.where(r.rel_path == "a.png" for r in shard)) == 1


def test_refs_are_not_held_in_memory(tmp_path):
    """A scan of a list of 3,000 entries holds no ImageRef: they exist only while they are iterated."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3000):
        (folder / f"{i:05d}.jpg").touch()
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"in/{i:05d}.jpg\n" for i in reversed(range(3000))))

    def live_refs() -> int:
        gc.collect()
        return sum(isinstance(o, ImageRef) for o in gc.get_objects())

    before = live_refs()
    scan = scan_sources([f"@{lst}"])
    assert live_refs() == before and len(scan.refs) == 3000
    it = iter(scan.refs)
    assert next(it).rel_path == "00000.jpg" and live_refs() <= before + 1
    assert [r.rel_path for r in it][-1] == "02999.jpg"
    scan.close()


def test_scan_database_is_unlinked_at_once_and_closed_with_the_scan(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(encode(upright(), "JPEG"))
    spill = tmp_path / "spill"
    spill.mkdir()
    scan = scan_sources([str(tmp_path / "in")], spill_dir=str(spill))
    assert list(spill.iterdir()) == []
    assert [r.rel_path for r in scan.refs] == ["a.jpg"]
    scan.close()
    with pytest.raises(sqlite3.ProgrammingError):
        list(scan.refs)
    empty = scan_sources([str(spill)], spill_dir=str(spill))  # nothing found: no database kept open
    assert empty.refs == [] and len(empty.refs) == 0 and list(empty.refs) == []


def test_listed_files_reaching_out_through_links_are_not_read(tmp_path):
    """A list's files are checked against OUT by their folder's real path (kept for the files after it), and
    a listed symlink by its own: neither a linked folder nor a linked file lets OUT's files in."""
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (out / "overlays" / name).write_bytes(b"x")
    (tmp_path / "via").symlink_to(out / "overlays")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "y.jpg").write_bytes(b"x")
    (tmp_path / "in" / "link.jpg").symlink_to(out / "overlays" / "b.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("via/a.jpg\nvia/b.jpg\nin/y.jpg\nin/link.jpg\n")
    scan = scan_sources([f"@{lst}"], exclude=str(out))
    assert [r.rel_path for r in scan.refs] == ["in/y.jpg"]
    assert sorted((p.rel_path, p.reason) for p in scan.problems) == [
        ("in/link.jpg", "inside the output folder; not read"), ("via/a.jpg", "inside the output folder; not read"),
        ("via/b.jpg", "inside the output folder; not read")]


@pytest.mark.parametrize("name", ["a.jpg", "a.tar.gz", "a.", ".jpg", "..jpg", "a..jpg", "noext", "a b.JPG", "a.b/c",
                                  "\u00e9t\u00e9.j\u00e9g", "x.\U0001f600", os.fsdecode(b"caf\xe9.jp\xe9g")])
def test_stems_cut_in_sqlite_are_pathlibs(tmp_path, name):
    """The scan's database cuts stems by the suffix's byte count; they equal ``PurePosixPath.with_suffix('')``."""
    from pathlib import PurePosixPath

    from maskseg.sources import _suffix_bytes

    rel = "sub/" + name
    key = rel.encode("utf-8", "surrogatepass")
    cut = key[:len(key) - _suffix_bytes("/r/" + rel)].decode("utf-8", "surrogatepass")
    assert cut == str(PurePosixPath(rel).with_suffix(""))


@pytest.mark.parametrize("block", [1, 7, 1 << 20])
def test_lists_are_read_a_block_at_a_time_and_lines_survive_any_cut(tmp_path, monkeypatch, block):
    """Block edges may fall inside a line, a multi-byte character or a CRLF: the lines are the same."""
    import io

    from maskseg import sources

    monkeypatch.setattr(sources, "_LIST_BLOCK_BYTES", block)
    names = ["\u00e9t\u00e9.jpg", os.fsdecode(b"caf\xe9.jpg"), "b.jpg", "\U0001f600.png"]
    for name in names:
        with open(os.path.join(os.fsencode(tmp_path), os.fsencode(name)), "wb") as fh:
            fh.write(b"x")
    data = b"# list\r\n" + b"\r\n".join(os.fsencode(n) for n in names[:2]) + b"\n\n" + \
        b"\n".join(os.fsencode(n) for n in names[2:])  # no newline after the last line
    lst = tmp_path / "list.txt"
    lst.write_bytes(data)
    expected = sorted(names)
    assert [r.rel_path for r in scan_sources([f"@{lst}"]).refs] == expected
    piped = io.BufferedReader(io.BytesIO(data))  # as sys.stdin.buffer: read1 gives what is there
    monkeypatch.chdir(tmp_path)
    assert [r.rel_path for r in scan_sources(["-"], stdin=piped).refs] == expected
    with pytest.raises(SourceError, match="line 2 is over 10 bytes"):  # 9 bytes, CR and LF
        scan_sources([f"@{lst}"], limits=ListLimits(line_bytes=10))
    with pytest.raises(SourceError, match="more than 4 entries"):
        scan_sources([f"@{lst}"], limits=ListLimits(entries=4))
