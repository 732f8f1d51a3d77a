"""The ``maskseg.writers`` entry-point registry: built-in and third-party writers found the same way."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint, entry_points

from ..errors import WriterError
from .base import Writer

log = logging.getLogger(__name__)

GROUP = "maskseg.writers"

# Used only when maskseg runs from a source tree without installed metadata (no entry points).
_BUILTIN_FALLBACK = {
    "coco": "maskseg.writers.coco:CocoWriter",
    "results": "maskseg.writers.coco:ResultsWriter",
    "overlay": "maskseg.writers.overlay:OverlayWriter",
    "masks": "maskseg.writers.masks:MasksWriter",
    "polygons": "maskseg.writers.polygons:PolygonsWriter",
    "yolo": "maskseg.writers.yolo:YoloWriter",
    "labelstudio": "maskseg.writers.labelstudio:LabelStudioWriter",
    "json": "maskseg.writers.jsonfiles:JsonFilesWriter",
}


def _entry_points() -> dict[str, EntryPoint]:
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    for name, target in _BUILTIN_FALLBACK.items():
        found.setdefault(name, EntryPoint(name, target, GROUP))
    return found


def available_writers() -> list[str]:
    """Names of every installed writer, without importing any of them."""
    return sorted(_entry_points())


def load_writers(names: tuple[str, ...] | list[str]) -> list[Writer]:
    """Instantiate the named writers, in order; unknown or broken names raise ``WriterError``."""
    eps = _entry_points()
    writers = []
    for name in names:
        ep = eps.get(name)
        if ep is None:
            raise WriterError(f"unknown writer {name!r}; installed: {', '.join(sorted(eps))}")
        try:
            factory = ep.load()
            writer = factory()
        except Exception as exc:
            raise WriterError(f"writer {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}") from None
        if not all(hasattr(writer, m) for m in ("open", "write", "close")):
            raise WriterError(f"writer {name!r} ({ep.value}) lacks open/write/close")
        writer.name = name
        writers.append(writer)
    return writers
