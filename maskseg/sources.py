"""Inputs -> ImageRefs: folders (walked safely), files, globs, list files and stdin; no decoding here.

Walking never follows a symlink cycle, never opens anything, and never lets a non-regular file
(FIFO, device, socket) through: those become ``SourceProblem`` records that the run reports.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NamedTuple, overload

from .config import IMAGE_EXTENSIONS, MAX_LIST_BYTES, MAX_LIST_ENTRIES, MAX_LIST_LINE_BYTES, VIDEO_EXTENSIONS
from .errors import SourceError
from .objects import ObjectInfo, is_url, list_objects
from .scanstore import FoundRow, ScanStore, StoredRef

log = logging.getLogger(__name__)

_GLOB_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image file to segment.

    ``path`` is absolute (not symlink-resolved); ``rel_path`` is POSIX-style and relative to the common
    root of all inputs, so outputs mirror the input tree; ``out_stem`` is ``rel_path`` without its
    extension (or with it, as ``x_png``, where two inputs would share a stem). ``size``/``mtime_ns``
    are from the scan and decide whether a journal entry is still current; for an object in object
    storage ``path`` is its URL, ``mtime_ns`` is -1 and ``etag`` (its ETag, or GCS generation) does.
    Slotted: a scan of millions of files holds one of these per file.
    """

    path: str
    rel_path: str
    out_stem: str
    size: int
    mtime_ns: int
    etag: str | None = None


@dataclass(frozen=True)
class SourceProblem:
    """An input that was found but cannot be an image (dangling link, FIFO, unreadable folder...)."""

    path: str
    rel_path: str
    reason: str


class ScanRefs(Sequence[ImageRef]):
    """A scan's images in ``rel_path`` order, read from the scan's temporary database as they are used.

    Re-iterable; ``len`` and indexing are database lookups, so millions of images cost no memory here.
    ``where`` gives a narrower ``ScanRefs`` (kept in the same database); an empty scan has no database.
    """

    def __init__(self, store: ScanStore | None = None, selection: str | None = None, count: int | None = None) -> None:
        self._store = store
        self._selection = selection
        self._count = (store.count if store is not None else 0) if count is None else count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[ImageRef]:
        for _, ref in self._rows():
            yield ref

    @overload
    def __getitem__(self, index: int) -> ImageRef: ...

    @overload
    def __getitem__(self, index: slice) -> list[ImageRef]: ...

    def __getitem__(self, index: int | slice) -> ImageRef | list[ImageRef]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count or self._store is None:
            raise IndexError(index)
        return _image_ref(self._store.row(index, self._selection))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # compared by content, like a list

    def __repr__(self) -> str:
        return f"<ScanRefs: {self._count:,} images>"

    def where(self, keep: Iterable[bool]) -> ScanRefs:
        """The images whose flag in ``keep`` (one per image, in this order) is true."""
        if self._store is None:
            return self
        positions = self._store.positions(self._selection)
        name, count = self._store.select(pos for pos, flag in zip(positions, keep, strict=True) if flag)
        return ScanRefs(self._store, name, count)

    def close(self) -> None:
        """Free the scan's database: this, and every ``ScanRefs`` of the same scan, can no longer be read."""
        if self._store is not None:
            self._store.close()

    def _rows(self) -> Iterator[tuple[int, ImageRef]]:
        if self._store is not None:
            for pos, stored in self._store.rows(self._selection):
                yield pos, _image_ref(stored)


@dataclass
class SourceScan:
    """What the inputs hold: refs sorted by ``rel_path``, and the problems met while looking.

    ``close`` frees the refs' temporary database (garbage collection does it too).
    """

    refs: ScanRefs = field(default_factory=ScanRefs)
    problems: list[SourceProblem] = field(default_factory=list)

    def close(self) -> None:
        self.refs.close()


@dataclass(frozen=True)
class ListLimits:
    """Bounds on a list file or a list on stdin, so a hostile or runaway one fails in one line."""

    entries: int = MAX_LIST_ENTRIES
    total_bytes: int = MAX_LIST_BYTES
    line_bytes: int = MAX_LIST_LINE_BYTES


class _Stat(NamedTuple):
    """What a scan keeps of a file's stat (a tuple: 184 B a file, where an ``os.stat_result`` is 644)."""

    size: int
    mtime_ns: int
    dev: int
    ino: int


@dataclass(frozen=True, slots=True)
class _Found:
    path: str  # absolute
    root: str  # absolute folder the path is reported relative to
    stat: _Stat | None
    problem: str | None = None
    obj: ObjectInfo | None = None  # an object in object storage: path and root are URLs


def is_image_name(name: str) -> bool:
    """True when ``name`` has an image or video extension (case-insensitive) and is not hidden."""
    ext = os.path.splitext(name)[1].lower()
    return not name.startswith(".") and (ext in IMAGE_EXTENSIONS or ext in VIDEO_EXTENSIONS)


def scan_sources(
    inputs: Iterable[str],
    *,
    recursive: bool = True,
    exclude: str | None = None,
    stdin: Iterable[str] | None = None,
    limits: ListLimits | None = None,
    spill_dir: str | None = None,
) -> SourceScan:
    """Resolve INPUT arguments into sorted, de-duplicated image refs.

    Each input is ``-`` (paths on ``stdin``: a stream or an iterable of lines), ``@LIST`` (a list
    file), a folder, a file or a glob, or an object storage URL (``s3://bucket/prefix/``, an object,
    a glob; see ``objects.py``); lists may hold URLs too. ``exclude`` is a folder (the output folder) never read from.
    What is found goes into a temporary sqlite database (``scanstore``: in memory while small, then a file
    in ``spill_dir``, by default the system's temporary folder), which sorts and de-duplicates it, so the
    scan's memory does not grow with the number of inputs.
    Raises ``SourceError`` for an input that names nothing (missing path, unreadable list file), one
    inside ``exclude``, or a list past ``limits``.
    """
    limits = limits or ListLimits()
    exclude_abs = os.path.abspath(exclude) if exclude else None
    store = ScanStore(spill_dir)
    roots = _CommonRoot()
    try:
        store.add(roots.rows(_found(inputs, recursive, exclude_abs, stdin, limits)))
        if len(roots.kinds) > 1:
            raise SourceError("inputs mix object storage URLs and local paths; run them into separate output folders")
        relative = _url_relative if True in roots.kinds else _path_relative
        common = roots.root or ""
        prefix = common if not common or common.endswith("/") else common + "/"
        problems = store.finish(lambda path: relative(path, common), _stem, prefix)
    except BaseException:
        store.close()
        raise
    if not store.count:
        store.close()
        store = None
    return SourceScan(ScanRefs(store), [SourceProblem(*p) for p in problems])


def _found(inputs: Iterable[str], recursive: bool, exclude: str | None, stdin: Iterable[str] | None,
           limits: ListLimits) -> Iterator[_Found]:
    """Everything the inputs name, in the order given (and each folder's in name order)."""
    for item in inputs:
        if item == "-":
            stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
            yield from _from_list(_read_list(stream, "standard input", limits), os.getcwd(), recursive, exclude)
        elif item.startswith("@"):
            yield from _from_list_file(item[1:], recursive, exclude, limits)
        else:
            yield from _from_argument(item, recursive, exclude, explicit=True)


class _CommonRoot:
    """The common root of every input found, and their kinds (URL or not), kept as they stream by."""

    def __init__(self) -> None:
        self.root: str | None = None
        self.kinds: set[bool] = set()
        self._last: str | None = None

    def rows(self, found: Iterable[_Found]) -> Iterator[FoundRow]:
        """``found`` as the store's rows, taking each new root into account."""
        for f in found:
            if f.root != self._last:  # inputs come a folder at a time: roots repeat
                self._last = f.root
                url = is_url(f.root)
                self.kinds.add(url)
                if self.root is None:
                    self.root = f.root
                elif len(self.kinds) == 1:
                    self.root = _common_root([self.root, f.root], is_urls=url)
            yield _row(f)


def _row(f: _Found) -> FoundRow:
    if f.obj is not None:
        return FoundRow(f.path, f.obj.size, f.obj.mtime_ns, None, None, f.obj.etag, f.problem)
    if f.stat is not None:
        return FoundRow(f.path, f.stat.size, f.stat.mtime_ns, f.stat.dev, f.stat.ino, None, f.problem)
    return FoundRow(f.path, None, None, None, None, None, f.problem or "unusable")


def _stem(rel: str) -> str:
    return str(PurePosixPath(rel).with_suffix(""))


def _image_ref(stored: StoredRef) -> ImageRef:
    """An image read back from the store, named ``x_png`` where another image has its stem."""
    stem = stored.stem
    if stored.shared:
        p = PurePosixPath(stored.rel_path)
        stem = str(p.with_name(p.stem + "_" + p.suffix.lstrip(".").lower()))
    return ImageRef(stored.path, stored.rel_path, stem, stored.size, stored.mtime_ns, stored.etag)


def _from_argument(item: str, recursive: bool, exclude: str | None, *, explicit: bool) -> Iterator[_Found]:
    if is_url(item):
        yield from _from_url(item, recursive)
        return
    path = os.path.abspath(item)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            yield _Found(path, os.path.dirname(path), None, "dangling symlink")
            return
        if _GLOB_MAGIC.search(item):
            yield from _from_glob(item, exclude)
            return
        raise SourceError(f"{item}: no such file or folder") from None
    except OSError as exc:
        yield _Found(path, os.path.dirname(path), None, f"cannot stat: {exc.strerror}")
        return
    if exclude and _inside(exclude, path):
        if explicit:
            raise SourceError(f"{item}: is inside the output folder {exclude}; images are never read from it")
        yield _Found(path, os.path.dirname(path), None, "inside the output folder; not read")
        return
    if stat.S_ISDIR(st.st_mode):
        yield from _walk(path, path, recursive, exclude)
    else:
        yield _check_file(path, os.path.dirname(path), st)


def _from_url(url: str, recursive: bool) -> Iterator[_Found]:
    root, objects = list_objects(url, recursive=recursive)
    for obj in objects:
        if is_image_name(obj.url.rsplit("/", 1)[-1]):
            yield _Found(obj.url, root, None, obj=obj)


def _check_file(path: str, root: str, st: os.stat_result) -> _Found:
    if stat.S_ISREG(st.st_mode):
        return _Found(path, root, _Stat(st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino))
    kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(
        st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "special file"
    return _Found(path, root, None, f"not a regular file ({kind}); not opened")


def _walk(
    top: str, root: str, recursive: bool, exclude: str | None, *, images_only: bool = True
) -> Iterator[_Found]:
    """Depth-first walk following symlinks to folders, but each real folder once (no cycles)."""
    seen: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            yield _Found(folder, root, None, f"cannot read folder: {exc.strerror}")
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            log.debug("%s: folder already visited (symlink cycle or alias); skipped", folder)
            continue
        seen.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield _Found(folder, root, None, f"cannot read folder: {exc.strerror}")
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            full = os.path.join(folder, entry.name)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if exclude and _inside(exclude, full):
                    log.info("%s: the output folder, inside the input; not read", full)
                elif recursive:
                    subfolders.append(full)
                continue
            if images_only and not is_image_name(entry.name):
                continue
            try:
                est = os.stat(full)
            except FileNotFoundError:
                problem = "dangling symlink" if entry.is_symlink() else "vanished while scanning"
                yield _Found(full, root, None, problem)
                continue
            except OSError as exc:
                yield _Found(full, root, None, f"cannot stat: {exc.strerror}")
                continue
            yield _check_file(full, root, est)
        stack.extend(reversed(subfolders))


def _from_glob(pattern: str, exclude: str | None) -> Iterator[_Found]:
    """Expand a glob (``**`` spans folders) by walking its fixed prefix with the safe walker.

    Written by hand because ``glob.glob(recursive=True)`` follows symlink cycles without end.
    """
    parts = os.path.abspath(pattern).split(os.sep)
    fixed = []
    for part in parts:
        if _GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    root = os.sep.join(fixed) or os.sep
    if exclude and _inside(exclude, root):
        raise SourceError(f"{pattern}: is inside the output folder {exclude}; images are never read from it")
    rest = "/".join(parts[len(fixed):])
    regex = _glob_to_regex(rest)
    recursive = "**" in rest or rest.count("/") > 0
    matched = 0
    if os.path.isdir(root):
        for item in _walk(root, root, recursive, exclude, images_only=False):
            rel = os.path.relpath(item.path, root).replace(os.sep, "/")
            if regex.fullmatch(rel):
                matched += 1
                yield _Found(item.path, root, item.stat, item.problem)
    if not matched:
        log.warning("%s: the pattern matched no files", pattern)


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    out = []
    segments = pattern.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            out.append("(?:[^/]+/)*" if not last else ".*")
            continue
        j = 0
        while j < len(seg):
            c = seg[j]
            if c == "*":
                out.append("[^/]*")
            elif c == "?":
                out.append("[^/]")
            elif c == "[":
                end = seg.find("]", j + 2)
                if end == -1:
                    out.append(re.escape(c))
                else:
                    body = seg[j + 1 : end]
                    if body.startswith("!"):
                        body = "^" + body[1:]
                    out.append("[" + body.replace("\\", "\\\\") + "]")
                    j = end
            else:
                out.append(re.escape(c))
            j += 1
        if not last:
            out.append("/")
    return re.compile("".join(out), re.DOTALL)


def _read_list(stream: Any, what: str, limits: ListLimits) -> Iterator[str]:
    """The lines of a list, as they are read: a binary or text stream a bounded line at a time, or an
    iterable of str. Bytes are decoded as file names are (``os.fsdecode``), so non-UTF-8 names survive."""
    if not hasattr(stream, "readline"):
        for count, line in enumerate(stream):
            if count >= limits.entries:
                raise SourceError(f"{what}: more than {limits.entries:,} entries; split the list")
            yield line
        return
    total = count = 0
    while True:
        try:
            line = stream.readline(limits.line_bytes + 1)
        except OSError as exc:
            raise SourceError(f"{what}: cannot read list file: {exc.strerror}") from None
        if not line:
            return
        total += len(line)
        if len(line) > limits.line_bytes:
            raise SourceError(f"{what}: line {count + 1} is over {limits.line_bytes:,} bytes; "
                              "not a list of paths")
        if total > limits.total_bytes:
            raise SourceError(f"{what}: over {limits.total_bytes:,} bytes; split the list")
        if count >= limits.entries:
            raise SourceError(f"{what}: more than {limits.entries:,} entries; split the list")
        count += 1
        yield os.fsdecode(line) if isinstance(line, bytes) else line


def _from_list_file(list_path: str, recursive: bool, exclude: str | None, limits: ListLimits) -> Iterator[_Found]:
    try:
        fh = open(list_path, "rb")  # noqa: SIM115 - closed below, once its lines have been walked
    except OSError as exc:
        raise SourceError(f"{list_path}: cannot read list file: {exc.strerror}") from None
    with fh:
        base = os.path.dirname(os.path.abspath(list_path))
        yield from _from_list(_read_list(fh, list_path, limits), base, recursive, exclude)


def _from_list(lines: Iterable[str], base: str, recursive: bool, exclude: str | None) -> Iterator[_Found]:
    for raw in lines:
        entry = raw.rstrip("\r\n").strip()
        if not entry or entry.startswith("#"):
            continue
        if is_url(entry):
            try:
                yield from _from_url(entry, recursive)
            except SourceError as exc:
                yield _Found(entry, entry.rsplit("/", 1)[0], None, _listed_reason(exc, entry))
            continue
        path = entry if os.path.isabs(entry) else os.path.join(base, entry)
        try:
            yield from _from_argument(path, recursive, exclude, explicit=False)
        except SourceError:
            yield _Found(os.path.abspath(path), os.path.dirname(os.path.abspath(path)), None,
                         "listed but does not exist")


def _listed_reason(exc: SourceError, entry: str) -> str:
    text = str(exc).removeprefix(f"{entry}: ")
    return "listed but does not exist" if text.startswith("no such") else f"listed but {text}"


def _inside(folder: str, path: str) -> bool:
    folder = os.path.realpath(folder)
    path = os.path.realpath(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _common_root(roots: list[str], *, is_urls: bool) -> str:
    if not is_urls:
        return os.path.commonpath(roots)
    # URLs: the longest common run of "/"-separated parts (bucket included) of one protocol.
    split = [r.split("/") for r in roots]
    common: list[str] = []
    for parts in zip(*split, strict=False):  # as far as the shortest root goes
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common)


def _path_relative(path: str, common: str) -> str:
    prefix = common if common.endswith(os.sep) else common + os.sep
    if os.sep == "/" and path.startswith(prefix):  # paths are normalised (abspath): relpath's answer, faster
        return path[len(prefix):]
    return os.path.relpath(path, common).replace(os.sep, "/")


def _url_relative(url: str, common: str) -> str:
    if not common or common.endswith(":/"):  # other buckets (or protocols): the bucket starts rel_path
        return url.replace("://", "/", 1) if not common else url.split("://", 1)[1]
    return url[len(common):].lstrip("/")
