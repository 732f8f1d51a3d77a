"""Object storage inputs through fsspec: ``s3://bucket/prefix/``, ``gs://...``, globs and single objects.

An object is versioned by its ETag (S3 and S3-compatible servers) or generation (GCS), so resume
compares ETag and size, not times. Credentials and the endpoint come from the storage library's own
standard sources: for S3, botocore's environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for MinIO or any S3-compatible server, ...) and ``~/.aws/config``/``credentials``;
for GCS, gcsfs's chain (Application Default Credentials: ``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth
application-default login``, the metadata server) and ``STORAGE_EMULATOR_HOST`` for an emulator.
maskseg never reads, logs or records them. fsspec and the protocol's package (``s3fs``, ``gcsfs``) are
imported only when a URL is given: ``pip install 'maskseg[s3]'`` or ``'maskseg[gcs]'``.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .config import MAX_FILE_BYTES
from .errors import DecodeError, SourceError, UsageError

log = logging.getLogger(__name__)

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# What an OUT path that names object storage looks like, also after pathlib collapsed its "//".
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
_GLOB_MAGIC = re.compile(r"[*?\[]")
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS", "STORAGE_EMULATOR_HOST", "AZURE_", "FSSPEC_")
_FILESYSTEMS: dict[tuple, Any] = {}
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
_EXTRAS = {"s3fs": "s3", "gcsfs": "gcs"}


def is_url(item: str) -> bool:
    """True when ``item`` names object storage (``scheme://...``) rather than a local path."""
    m = _URL.match(item)
    return m is not None and m.group(1).lower() != "file"


def looks_like_url(path: str) -> bool:
    """True for ``s3://b/x`` and for what pathlib makes of it (``s3:/b/x``)."""
    return _URL_LIKE.match(path) is not None and not path.lower().startswith("file:")


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its URL, size in bytes, last-modified time (ns; -1 unknown) and version (ETag or
    generation; never None, see ``version_of``)."""

    url: str
    size: int
    mtime_ns: int
    etag: str


def filesystem(url: str) -> tuple[Any, str, str]:
    """(fsspec file system, path within it, protocol) for ``url``; ``UsageError`` when the package that
    speaks its protocol is missing."""
    protocol = _URL.match(url).group(1).lower()
    package = _PACKAGES.get(protocol, f"the fsspec package for {protocol}://")
    install = f"pip install 'maskseg[{_EXTRAS[package]}]'" if package in _EXTRAS else f"pip install {package}"
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: object storage inputs need fsspec: {install}") from None
    # One file system per protocol and credentials environment (fsspec's own cache would keep an old
    # endpoint or key after the environment changed); no listings cache: a rerun in the same process
    # must see objects rewritten in between.
    key = (protocol, os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))))
    try:
        cls = fsspec.get_filesystem_class(protocol)
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = _FILESYSTEMS[key] = cls(skip_instance_cache=True, use_listings_cache=False,
                                         **_emulator_kwargs(protocol))
        path = cls._strip_protocol(url)
    except ImportError:
        raise UsageError(f"{url}: reading {protocol}:// needs {package}: {install}") from None
    except ValueError as exc:
        raise UsageError(f"{url}: {exc}") from None
    return fs, path, protocol


def _emulator_kwargs(protocol: str) -> dict[str, str]:
    """No credentials against a GCS emulator (``STORAGE_EMULATOR_HOST``), as google-cloud-storage's own
    ``Client`` does: gcsfs would otherwise send the user's real Google token to it, or, with none, wait
    on the GCE metadata server before it falls back to anonymous."""
    if _PACKAGES.get(protocol) == "gcsfs" and os.environ.get("STORAGE_EMULATOR_HOST") not in (None, "", "default"):
        return {"token": "anon"}
    return {}


def list_objects(url: str, *, recursive: bool = True) -> tuple[str, Iterator[ObjectInfo]]:
    """(root URL the objects are relative to, the objects) that ``url`` names: one object, every
    object under a prefix (``s3://bucket/photos/``), or those a glob matches (``**`` spans folders).

    Raises ``SourceError`` when it names nothing, the bucket does not exist or access is denied.
    """
    fs, path, protocol = filesystem(url)
    try:
        if _GLOB_MAGIC.search(path):
            fixed = path[: _GLOB_MAGIC.search(path).start()].rsplit("/", 1)[0]
            found = fs.glob(path, detail=True)
            return _url(protocol, fixed), _objects(protocol, found.values())
        if not path.endswith("/"):
            info = _info(fs, path)
            if info is not None and info.get("type") != "directory":
                return _url(protocol, path.rsplit("/", 1)[0]), _objects(protocol, [info])
        root = path.rstrip("/")
        listing = list(_walk(fs, root, recursive))
    except FileNotFoundError:
        raise SourceError(f"{url}: no such bucket, object or prefix") from None
    except OSError as exc:
        if denied(exc):
            raise SourceError(f"{url}: access denied (check the credentials, and the bucket's policy)") from None
        raise SourceError(f"{url}: cannot list: {exc}") from None
    if not listing:
        raise SourceError(f"{url}: no such bucket, object or prefix (or it holds no objects)")
    return _url(protocol, root), _objects(protocol, listing)


def _walk(fs: Any, root: str, recursive: bool) -> Iterator[dict]:
    """Every object under ``root``, listing one "folder" per request. Not ``fs.find``: s3fs's find asks
    for the prefix as an object first, which a user allowed to list but not to read is refused."""
    folders = [root]
    while folders:
        for info in fs.ls(folders.pop(), detail=True):
            if info.get("type") == "directory":
                if recursive:
                    folders.append(info["name"])
            else:
                yield info


def _info(fs: Any, path: str) -> dict | None:
    try:
        return fs.info(path)
    except (FileNotFoundError, PermissionError):  # no object by this name (or none this user may read)
        return None


def _objects(protocol: str, infos: Any) -> Iterator[ObjectInfo]:
    for info in infos:
        if info.get("type") == "directory":
            continue
        yield ObjectInfo(_url(protocol, info["name"]), int(info.get("size") or 0), mtime_ns_of(info),
                         version_of(info))


def _url(protocol: str, path: str) -> str:
    return f"{protocol}://{path}"


def denied(exc: OSError) -> bool:
    """Whether a storage error means "not allowed" (a HEAD answered 403 carries no error code, only the
    status, so s3fs does not always make it a ``PermissionError``)."""
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return True
    text = str(exc)
    return any(word in text for word in ("AccessDenied", "Forbidden", "(403)", "InvalidAccessKeyId",
                                         "SignatureDoesNotMatch"))


def version_of(info: dict) -> str:
    """An object's version: its generation (GCS), ETag (S3, Azure); otherwise its size and time.

    GCS first: its objects carry an ``etag`` too, but that one changes with metadata edits as well (a
    label added would re-do the image) and on emulators is the MD5 (a rewrite with the same bytes keeps
    it); the generation changes exactly when the object is written."""
    for key in ("generation", "ETag", "etag", "VersionId"):
        value = info.get(key)
        if value not in (None, ""):
            return str(value)
    return f"{info.get('size')}@{mtime_ns_of(info)}"


def mtime_ns_of(info: dict) -> int:
    """Last-modified time in ns from what a file system's ``info`` says (datetime, ISO text or seconds)."""
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        try:
            if isinstance(value, str):
                value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if isinstance(value, dt.datetime):
                return int(value.timestamp() * 1_000_000) * 1000
            return int(float(value) * 1e9)
        except (ValueError, TypeError, OverflowError):
            continue
    return -1


def read_object(url: str, etag: str | None) -> tuple[bytes, ObjectInfo]:
    """The bytes of one object, read by whoever calls this (a Ray worker reads its own objects).

    The object is read, then looked at again: when its version is no longer ``etag`` (the one scanned)
    or its size not what was read, it changed while the run went on, and ``DecodeError`` says so (it
    is retried next run, keyed by its new version). Also ``DecodeError`` for a vanished object, access
    denied and objects over ``MAX_FILE_BYTES``.
    """
    fs, path, _ = filesystem(url)
    try:
        before = fs.info(path)
        if int(before.get("size") or 0) > MAX_FILE_BYTES:
            raise DecodeError(url, f"object is {before['size']:,} bytes, over the {MAX_FILE_BYTES:,} limit")
        data = fs.cat_file(path)
        fs.invalidate_cache(path)
        after = fs.info(path)
    except FileNotFoundError:
        raise DecodeError(url, "object vanished before it could be read") from None
    except OSError as exc:
        raise DecodeError(url, "access denied" if denied(exc) else f"read failed: {exc}") from None
    info = ObjectInfo(url, int(after.get("size") or 0), mtime_ns_of(after), version_of(after))
    if (etag is not None and info.etag != etag) or version_of(before) != info.etag or len(data) != info.size:
        raise DecodeError(url, "object changed since it was listed (rewritten during the run?); retried next run")
    return data, info
