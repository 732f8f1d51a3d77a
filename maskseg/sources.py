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
from typing import Any, overload

from .config import IMAGE_EXTENSIONS, MAX_LIST_BYTES, MAX_LIST_ENTRIES, MAX_LIST_LINE_BYTES, VIDEO_EXTENSIONS
from .errors import SourceError
from .objects import is_url, list_objects
from .scanstore import FoundRow, ScanStore, StoredRef

log = logging.getLogger(__name__)

_GLOB_MAGIC = re.compile(r"[*?\[]")
_MEDIA_EXTENSIONS = frozenset(IMAGE_EXTENSIONS) | frozenset(VIDEO_EXTENSIONS)
_LIST_BLOCK_BYTES = 1 << 20  # a list file or stdin is read this much at a time


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

    def where_joined(self, path: str, join: str, where: str, params: Sequence[object]) -> ScanRefs:
        """The images for which the SQL ``where`` holds, joined with another sqlite database: see
        ``ScanStore.select_joined`` for the names it may use."""
        if self._store is None:
            return self
        name, count = self._store.select_joined(path, join, where, params, self._selection)
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


# What the walk yields for each input: (root, row). ``root`` is the folder (or URL prefix) the path is
# reported relative to; ``row`` is a ``FoundRow`` or, for a regular file (millions of them go by), the plain
# tuple ``ScanStore.add`` takes: (path, size, mtime_ns, dev, ino, suffix_bytes), a tenth of the cost to make.
_Row = FoundRow | tuple[str, int, int, int, int, int]
_Found = tuple[str, _Row]


def _problem(path: str, root: str, reason: str) -> _Found:
    return root, FoundRow(path, None, None, None, None, None, reason)


class _Excluded:
    """The output folder, never read from. Whether a path lies in it is decided on real (symlink-resolved)
    paths; a file that is not a link is where its folder really is, so a folder's answer is kept for the
    files that follow it (a list names thousands of files of one folder in a row)."""

    _FOLDERS_KEPT = 4096

    def __init__(self, folder: str) -> None:
        self.folder = os.path.abspath(folder)
        self._real = os.path.realpath(folder)
        self._prefix = self._real.rstrip(os.sep) + os.sep
        self._folders: dict[str, bool] = {}
        self._last_folder: str | None = None
        self._last_inside = False

    def holds(self, path: str) -> bool:
        """Whether ``path`` (any kind, links resolved) is the output folder or inside it."""
        real = os.path.realpath(path)
        return real == self._real or real.startswith(self._prefix)

    def holds_file(self, path: str, *, link: bool) -> bool:
        """``holds`` for a file known to be a symlink (``link``) or not, by its folder's answer when it is not."""
        if link:
            return self.holds(path)
        return self.holds_folder(os.path.dirname(path))

    def holds_folder(self, folder: str) -> bool:
        """``holds`` for a folder, remembered for the files after it."""
        if folder == self._last_folder:
            return self._last_inside
        inside = self._folders.get(folder)
        if inside is None:
            if len(self._folders) >= self._FOLDERS_KEPT:
                self._folders.clear()
            inside = self._folders[folder] = self.holds(folder)
        self._last_folder, self._last_inside = folder, inside
        return inside


def is_image_name(name: str) -> bool:
    """True when ``name`` has an image or video extension (case-insensitive) and is not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _MEDIA_EXTENSIONS


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
    excluded = _Excluded(exclude) if exclude else None
    store = ScanStore(spill_dir)
    roots = _CommonRoot()
    try:
        store.add(roots.rows(_found(inputs, recursive, excluded, stdin, limits)))
        if len(roots.kinds) > 1:
            raise SourceError("inputs mix object storage URLs and local paths; run them into separate output folders")
        urls = True in roots.kinds
        relative = _url_relative if urls else _path_relative
        common = roots.root or ""
        prefix = common if not common or common.endswith("/") else common + "/"
        problems = store.finish(lambda path: relative(path, common), _stem, prefix, local=not urls and os.sep == "/")
    except BaseException:
        store.close()
        raise
    if not store.count:
        store.close()
        store = None
    return SourceScan(ScanRefs(store), [SourceProblem(*p) for p in problems])


def _found(inputs: Iterable[str], recursive: bool, exclude: _Excluded | None, stdin: Iterable[str] | None,
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

    def rows(self, found: Iterable[_Found]) -> Iterator[_Row]:
        """``found`` as the store's rows, taking each new root into account."""
        for root, row in found:
            if root != self._last:  # inputs come a folder at a time: roots repeat
                self._last = root
                url = is_url(root)
                self.kinds.add(url)
                if self.root is None:
                    self.root = root
                elif len(self.kinds) == 1:
                    self.root = _common_root([self.root, root], is_urls=url)
            yield row


def _stem(rel: str) -> str:
    return str(PurePosixPath(rel).with_suffix(""))


def _file_row(path: str, st: os.stat_result) -> _Row:
    """The row of a regular file."""
    return path, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, _suffix_bytes(path)


def _suffix_bytes(path: str) -> int:
    """The UTF-8 length of what ``_stem`` strips from a normalised path's name: pathlib's suffix (the last
    dot and after, unless the dot starts or ends the name), so the store can cut stems without Python."""
    dot = path.rfind(".")
    if not path.rfind("/") + 1 < dot < len(path) - 1:
        return 0
    return len(path) - dot if path.isascii() else len(path[dot:].encode("utf-8", "surrogatepass"))


def _image_ref(stored: StoredRef) -> ImageRef:
    """An image read back from the store, named ``x_png`` where another image has its stem."""
    stem = stored.stem
    if stored.shared:
        p = PurePosixPath(stored.rel_path)
        stem = str(p.with_name(p.stem + "_" + p.suffix.lstrip(".").lower()))
    return ImageRef(stored.path, stored.rel_path, stem, stored.size, stored.mtime_ns, stored.etag)


def _from_argument(item: str, recursive: bool, exclude: _Excluded | None, *, explicit: bool) -> Iterator[_Found]:
    if is_url(item):
        yield from _from_url(item, recursive)
        return
    yield from _from_local(_abspath(item), item, recursive, exclude, explicit=explicit)


def _abspath(path: str) -> str:
    """``os.path.abspath``, without its normalisation where the path has nothing to normalise."""
    if os.sep != "/" or not path.startswith("/") or "//" in path or "/." in path or path.endswith("/"):
        return os.path.abspath(path)
    return path


def _from_local(path: str, item: str, recursive: bool, exclude: _Excluded | None, *,
                explicit: bool) -> Iterator[_Found]:
    """What the absolute, normalised local ``path`` (given as ``item``) names: a file, a folder or a glob."""
    link = False
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            link = True
            st = os.stat(path)
    except FileNotFoundError:
        if link:
            yield _problem(path, os.path.dirname(path), "dangling symlink")
            return
        if _GLOB_MAGIC.search(item):
            yield from _from_glob(item, exclude)
            return
        raise SourceError(f"{item}: no such file or folder") from None
    except OSError as exc:
        yield _problem(path, os.path.dirname(path), f"cannot stat: {exc.strerror}")
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    if exclude and (exclude.holds(path) if is_dir else exclude.holds_file(path, link=link)):
        if explicit:
            raise SourceError(f"{item}: is inside the output folder {exclude.folder}; images are never read from it")
        yield _problem(path, os.path.dirname(path), "inside the output folder; not read")
        return
    if is_dir:
        yield from _walk(path, path, recursive, exclude)
    else:
        yield _check_file(path, os.path.dirname(path), st)


def _from_url(url: str, recursive: bool) -> Iterator[_Found]:
    root, objects = list_objects(url, recursive=recursive)
    for obj in objects:
        if is_image_name(obj.url.rsplit("/", 1)[-1]):
            yield root, FoundRow(obj.url, obj.size, obj.mtime_ns, None, None, obj.etag, None)


def _check_file(path: str, root: str, st: os.stat_result) -> _Found:
    if stat.S_ISREG(st.st_mode):
        return root, _file_row(path, st)
    kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(
        st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "special file"
    return _problem(path, root, f"not a regular file ({kind}); not opened")


def _walk(
    top: str, root: str, recursive: bool, exclude: _Excluded | None, *, images_only: bool = True
) -> Iterator[_Found]:
    """Depth-first walk following symlinks to folders, but each real folder once (no cycles)."""
    seen: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            yield _problem(folder, root, f"cannot read folder: {exc.strerror}")
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            log.debug("%s: folder already visited (symlink cycle or alias); skipped", folder)
            continue
        seen.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield _problem(folder, root, f"cannot read folder: {exc.strerror}")
            continue
        subfolders = []
        base = folder if folder.endswith(os.sep) else folder + os.sep
        for entry in entries:
            name = entry.name
            if name[0] == ".":
                continue
            full = base + name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if exclude and exclude.holds(full):
                    log.info("%s: the output folder, inside the input; not read", full)
                elif recursive:
                    subfolders.append(full)
                continue
            dot = name.rfind(".")
            if images_only and (dot <= 0 or name[dot:].lower() not in _MEDIA_EXTENSIONS):
                continue
            try:
                est = os.stat(full)
            except FileNotFoundError:
                problem = "dangling symlink" if entry.is_symlink() else "vanished while scanning"
                yield _problem(full, root, problem)
                continue
            except OSError as exc:
                yield _problem(full, root, f"cannot stat: {exc.strerror}")
                continue
            yield _check_file(full, root, est)
        stack.extend(reversed(subfolders))


def _from_glob(pattern: str, exclude: _Excluded | None) -> Iterator[_Found]:
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
    if exclude and exclude.holds(root):
        raise SourceError(f"{pattern}: is inside the output folder {exclude.folder}; images are never read from it")
    rest = "/".join(parts[len(fixed):])
    regex = _glob_to_regex(rest)
    recursive = "**" in rest or rest.count("/") > 0
    matched = 0
    if os.path.isdir(root):
        for _, row in _walk(root, root, recursive, exclude, images_only=False):
            rel = os.path.relpath(row[0], root).replace(os.sep, "/")
            if regex.fullmatch(rel):
                matched += 1
                yield root, row
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
    """The lines of a list, as they are read: a binary or text stream a block at a time (a line longer
    than ``limits.line_bytes`` is refused before more is read), or an iterable of str. Bytes are decoded as
    file names are (``os.fsdecode``), so non-UTF-8 names survive. Lines come without their newline."""
    if not hasattr(stream, "read"):
        for count, line in enumerate(stream):
            if count >= limits.entries:
                raise SourceError(f"{what}: more than {limits.entries:,} entries; split the list")
            yield line
        return
    read = getattr(stream, "read1", stream.read)  # what a pipe has now, not a whole block
    encoding = sys.getfilesystemencoding()
    total = count = 0
    rest: Any = None  # the end of the last block, after its last newline (bytes, or str from a text stream)
    while True:
        try:
            block = read(_LIST_BLOCK_BYTES)
        except OSError as exc:
            raise SourceError(f"{what}: cannot read list file: {exc.strerror}") from None
        total += len(block)
        if total > limits.total_bytes:
            raise SourceError(f"{what}: over {limits.total_bytes:,} bytes; split the list")
        rest = block[:0] if rest is None else rest
        newline = "\n" if isinstance(block, str) else b"\n"
        if block:
            data = rest + block
        elif rest:
            data = rest + newline  # a last line without its newline
        else:
            return
        cut = data.rfind(newline) + 1
        lines = data[:cut].split(newline)[:-1]
        rest = data[cut:]
        if len(rest) > limits.line_bytes or (lines and max(map(len, lines)) >= limits.line_bytes):
            too_long = next((i for i, line in enumerate(lines) if len(line) >= limits.line_bytes), len(lines))
            raise SourceError(f"{what}: line {count + too_long + 1} is over {limits.line_bytes:,} bytes; "
                              "not a list of paths")
        count += len(lines)
        if count > limits.entries:
            raise SourceError(f"{what}: more than {limits.entries:,} entries; split the list")
        if lines and isinstance(data, bytes):
            lines = data[:cut - 1].decode(encoding, "surrogateescape").split("\n")
        yield from lines


def _from_list_file(list_path: str, recursive: bool, exclude: _Excluded | None, limits: ListLimits
                    ) -> Iterator[_Found]:
    try:
        fh = open(list_path, "rb")  # noqa: SIM115 - closed below, once its lines have been walked
    except OSError as exc:
        raise SourceError(f"{list_path}: cannot read list file: {exc.strerror}") from None
    with fh:
        base = os.path.dirname(os.path.abspath(list_path))
        yield from _from_list(_read_list(fh, list_path, limits), base, recursive, exclude)


def _from_list(lines: Iterable[str], base: str, recursive: bool, exclude: _Excluded | None) -> Iterator[_Found]:
    base = base.rstrip(os.sep) + os.sep
    posix = os.sep == "/"  # a normalised absolute path's folder is then what is before its last "/"
    for raw in lines:
        entry = raw.strip()
        if not entry or entry[0] == "#":
            continue
        if "://" in entry and is_url(entry):
            try:
                yield from _from_url(entry, recursive)
            except SourceError as exc:
                yield _problem(entry, entry.rsplit("/", 1)[0], _listed_reason(exc, entry))
            continue
        path = _abspath(entry if entry[0] == os.sep else base + entry)
        # Most entries are files: one lstat and a row, the folder's answer for the output folder kept for
        # the files after it.
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            folder = (path[:path.rfind("/")] or "/") if posix else os.path.dirname(path)
            if exclude is None or not exclude.holds_folder(folder):
                yield folder, _file_row(path, st)
                continue
        try:  # everything else (a link, a folder, a glob, nothing) as an argument is taken
            yield from _from_local(path, path, recursive, exclude, explicit=False)
        except SourceError:
            yield _problem(path, os.path.dirname(path), "listed but does not exist")


def _listed_reason(exc: SourceError, entry: str) -> str:
    text = str(exc).removeprefix(f"{entry}: ")
    return "listed but does not exist" if text.startswith("no such") else f"listed but {text}"


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
