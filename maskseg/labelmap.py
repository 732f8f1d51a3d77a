"""TF Object Detection API label maps (``label_map.pbtxt``) -> class ids and names.

The format is protobuf text format of a ``StringIntLabelMap``::

    item {            # comments run to the end of the line
      id: 1
      name: '/m/01g317'
      display_name: "person"
    }

Parsed here by hand on purpose: reading it with ``google.protobuf.text_format`` would need the TF
Object Detection API's compiled ``.proto`` classes, a dependency maskseg does not want for a list of
names. Ids may have gaps (COCO's has 80 items numbered up to 90); fields maskseg does not use
(``keypoints { ... }``, ``frequency``, ``ancestor_ids: [...]``) are read and ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LabelMapError

MAX_LABEL_MAP_BYTES = 64 * 1024 * 1024

_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\f\v]+) | (?P<newline>\n) | (?P<comment>\#[^\n]*)
  | (?P<string>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")
  | (?P<punct>[{}<>:;,\[\]])
  | (?P<word>[A-Za-z0-9_.+\-]+)
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
            "\\": "\\", "'": "'", '"': '"', "?": "?"}
_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_CLOSE = {"{": "}", "<": ">"}


@dataclass(frozen=True)
class LabelMapItem:
    """One ``item``: the class id the model emits, its ``name`` and optional ``display_name``."""

    id: int
    name: str
    display_name: str | None = None

    @property
    def label(self) -> str:
        """The name to show: ``display_name`` when given, else ``name``, else ``class_<id>``."""
        return self.display_name or self.name or f"class_{self.id}"


def read_label_map(path: str | Path) -> list[LabelMapItem]:
    """Read a ``.pbtxt`` label map; items sorted by id. Raises LabelMapError naming the file and line."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_LABEL_MAP_BYTES:
            raise LabelMapError(f"{p}: label map larger than {MAX_LABEL_MAP_BYTES // 2**20} MiB")
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise LabelMapError(f"{p}: label map not found") from None
    except IsADirectoryError:
        raise LabelMapError(f"{p}: is a folder, expected a label map file (.pbtxt)") from None
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise LabelMapError(f"{p}:{line}: label map is not UTF-8 text") from None
    except OSError as exc:
        raise LabelMapError(f"{p}: cannot read the label map: {exc.strerror}") from None
    return parse_label_map(text, str(p))


def parse_label_map(text: str, source: str = "<label map>") -> list[LabelMapItem]:
    """Parse label map text; ``source`` names it in errors (``source:line: problem``).

    Id 0 is the background: an item with id 0 named ``background`` is skipped, any other id 0 or a
    negative, duplicate or missing id is an error.
    """
    parser = _Parser(_tokens(text, source), source)
    items: dict[int, LabelMapItem] = {}
    for field, value, line in parser.message(top=True):
        if field != "item":
            raise LabelMapError(f"{source}:{line}: expected 'item {{ ... }}', found field {field!r}")
        if not isinstance(value, list):
            raise LabelMapError(f"{source}:{line}: 'item' must be a block {{ ... }}")
        item = _item(value, line, source)
        if item is None:
            continue
        if item.id in items:
            raise LabelMapError(f"{source}:{line}: id {item.id} appears twice")
        items[item.id] = item
    if not items:
        raise LabelMapError(f"{source}: the label map has no items")
    return [items[k] for k in sorted(items)]


def _item(fields: list, line: int, source: str) -> LabelMapItem | None:
    values: dict[str, tuple[object, int]] = {}
    for name, value, at in fields:
        if name in ("id", "name", "display_name"):
            if name in values:
                raise LabelMapError(f"{source}:{at}: '{name}' given twice in one item")
            if isinstance(value, list):
                raise LabelMapError(f"{source}:{at}: '{name}' must be a value, not a block")
            values[name] = (value, at)
    if "id" not in values:
        raise LabelMapError(f"{source}:{line}: item without an 'id'")
    raw_id, at = values["id"]
    if not isinstance(raw_id, _Word) or not re.fullmatch(r"[+-]?\d+", raw_id):
        raise LabelMapError(f"{source}:{at}: id must be an integer, found {raw_id!r}")
    item_id = int(raw_id)
    name = _text(values.get("name"), source)
    display = _text(values.get("display_name"), source)
    if item_id < 0:
        raise LabelMapError(f"{source}:{at}: id {item_id} is negative; class ids start at 1")
    if item_id == 0:
        if "background" in (name, display):
            return None
        raise LabelMapError(f"{source}:{at}: id 0 is reserved for the background; class ids start at 1")
    return LabelMapItem(item_id, name or "", display)


def _text(entry: tuple[object, int] | None, source: str) -> str | None:
    if entry is None:
        return None
    value, at = entry
    if not isinstance(value, _String):
        raise LabelMapError(f"{source}:{at}: names must be quoted strings, found {value!s}")
    return str(value)


class _Word(str):
    """An unquoted token (number, enum value)."""


class _String(str):
    """The decoded text of one or more adjacent quoted strings."""


def _tokens(text: str, source: str) -> list[tuple[str, str, int]]:
    """(kind, text, line) per token; kinds: string, punct, word."""
    out = []
    line, pos = 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos] in "'\"":
                raise LabelMapError(f"{source}:{line}: a string is not closed on the line it starts")
            raise LabelMapError(f"{source}:{line}: unexpected {text[pos]!r}")
        kind = m.lastgroup or ""
        if kind == "newline":
            line += 1
        elif kind in ("string", "punct", "word"):
            out.append((kind, m.group(), line))
        pos = m.end()
    return out


class _Parser:
    """Protobuf text format: fields ``name: value``, ``name { ... }`` / ``name < ... >``, lists ``[a, b]``."""

    def __init__(self, tokens: list[tuple[str, str, int]], source: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.source = source

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _fail(self, expected: str) -> LabelMapError:
        tok = self._peek()
        if tok is None:
            last = self.tokens[-1][2] if self.tokens else 1
            return LabelMapError(f"{self.source}:{last}: expected {expected}, found the end of the file")
        return LabelMapError(f"{self.source}:{tok[2]}: expected {expected}, found {tok[1]!r}")

    def message(self, top: bool = False, close: str = "") -> list[tuple[str, object, int]]:
        """Fields up to ``close`` (or the end of the file at the top level) as (name, value, line)."""
        fields = []
        while True:
            tok = self._peek()
            if tok is None:
                if top:
                    return fields
                raise self._fail(f"'{close}'")
            if not top and tok[1] == close:
                self.pos += 1
                return fields
            if tok[0] != "word":
                raise self._fail("a field name")
            self.pos += 1
            name, line = tok[1], tok[2]
            nxt = self._peek()
            if nxt is not None and nxt[1] == ":":
                self.pos += 1
                nxt = self._peek()
            if nxt is not None and nxt[1] in _CLOSE:
                self.pos += 1
                fields.append((name, self.message(close=_CLOSE[nxt[1]]), line))
            elif nxt is not None and nxt[1] == "[":
                self.pos += 1
                fields.append((name, self._list(), line))
            else:
                fields.append((name, self._scalar(), line))
            sep = self._peek()
            if sep is not None and sep[1] in (",", ";"):
                self.pos += 1

    def _list(self) -> list:
        values: list = []
        while True:
            tok = self._peek()
            if tok is not None and tok[1] == "]":
                self.pos += 1
                return values
            if values:
                if tok is None or tok[1] != ",":
                    raise self._fail("',' or ']'")
                self.pos += 1
            tok = self._peek()
            if tok is not None and tok[1] in _CLOSE:
                self.pos += 1
                values.append(self.message(close=_CLOSE[tok[1]]))
            else:
                values.append(self._scalar())

    def _scalar(self) -> _Word | _String:
        tok = self._peek()
        if tok is None or tok[0] == "punct":
            raise self._fail("a value")
        if tok[0] == "word":
            self.pos += 1
            return _Word(tok[1])
        parts = []
        while tok is not None and tok[0] == "string":  # adjacent strings concatenate, as in C
            parts.append(_unquote(tok[1], self.source, tok[2]))
            self.pos += 1
            tok = self._peek()
        return _String("".join(parts))


def _unquote(quoted: str, source: str, line: int) -> str:
    """A quoted token's text with C escapes decoded (octal and \\x escapes are UTF-8 bytes)."""
    body, out, pos = quoted[1:-1], bytearray(), 0
    for m in _ESCAPE.finditer(body):
        out += body[pos : m.start()].encode()
        octal, hexa, char = m.groups()
        if octal:
            out.append(int(octal, 8) & 0xFF)
        elif hexa:
            out.append(int(hexa, 16))
        elif char in _ESCAPES:
            out += _ESCAPES[char].encode()
        else:
            raise LabelMapError(f"{source}:{line}: unknown escape '\\{char}' in {quoted}")
        pos = m.end()
    out += body[pos:].encode()
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise LabelMapError(f"{source}:{line}: escapes in {quoted} are not UTF-8") from None
