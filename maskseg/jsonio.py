"""JSON in and out at the edges: UTF-8-safe compact dumps, and size-limited reads of untrusted files."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .config import MAX_JSON_BYTES
from .errors import SourceError

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(obj: Any) -> str:
    """Compact JSON that always encodes to valid UTF-8, keeping readable non-ASCII as it is.

    File names that are not valid UTF-8 reach Python as lone surrogates (``os.fsdecode``); they are
    written as ``\\udcXX`` escapes, which ``json.loads`` turns back into the same string (and
    ``os.fsencode`` into the original bytes). Done by hand because ``json.dumps`` can only escape all
    non-ASCII (``ensure_ascii=True``) or none, and the latter leaves text UTF-8 cannot encode.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def dump_bytes(obj: Any) -> bytes:
    """``dumps(obj)`` as UTF-8 bytes."""
    return dumps(obj).encode("utf-8")


def read_json_limited(path: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file, refusing one larger than ``max_bytes`` before reading it.

    Raises ``SourceError`` naming the file for a missing, unreadable, non-regular, oversized or invalid
    file, so a hostile or broken input fails in one line instead of eating the machine's memory.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size > max_bytes:
                raise SourceError(f"{path}: {st.st_size:,} bytes, over the {max_bytes:,}-byte limit for JSON input")
            data = fh.read(max_bytes + 1)  # a pipe or a file still growing: never read past the limit
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a folder, expected a JSON file") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise SourceError(f"{path}: over the {max_bytes:,}-byte limit for JSON input")
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text (byte {exc.start}); expected JSON") from None
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise SourceError(f"{path}: JSON nested too deeply") from None


def is_json_int(v: Any) -> bool:
    """An integer as JSON means it (``True``/``False`` are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_json_number(v: Any) -> bool:
    """A finite number as JSON means it (no booleans, NaN or infinities)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
