"""The Writer protocol and what writers are handed: the run, and each finished image."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..config import WriterOptions
from ..detections import Detections
from ..errors import WriterError


@dataclass
class RunContext:
    """What a writer may read about the run.

    ``journal`` holds every finished image (``journal.done_records()`` streams them in id order);
    ``categories`` are the model's classes; ``changed`` is true once this run has recorded anything
    new, so writers that rebuild whole files can skip the work (and leave bytes untouched) otherwise.
    ``options`` are the writers' settings (``--polygon-tolerance``...), defaults in ``config.py``.
    """

    out_dir: Path
    journal: Any  # maskseg.journal.Journal
    categories: list[Any]  # list[maskseg.models.Category]
    model_name: str
    changed: bool = False
    info: dict = field(default_factory=dict)
    options: WriterOptions = field(default_factory=WriterOptions)

    def output_path(self, *parts: str) -> Path:
        """``OUT/<parts...>``, refused if it would leave OUT (``..`` or absolute parts)."""
        path = self.out_dir.joinpath(*parts)
        root = os.path.abspath(self.out_dir)
        if not os.path.abspath(path).startswith(root.rstrip(os.sep) + os.sep):
            raise WriterError(f"refusing to write outside {self.out_dir}: {'/'.join(parts)}")
        return path

    def category_name(self, category_id: int) -> str:
        for c in self.categories:
            if c.id == category_id:
                return c.name
        return f"class_{category_id}"


@dataclass(frozen=True)
class ImageRecord:
    """One finished image: ``rgb`` is [H, W, 3] uint8 upright; ``annotations`` the COCO-style dicts
    (category_id, bbox XYWH, score, area, segmentation RLE) that the journal records for it.

    In a tiled run a TIFF read by region has a ``maskseg.regions.TiffRegions`` as ``rgb``: index it
    (``rgb[y0:y1, x0:x1]``) or ask for ``rgb.downscaled(h, w)``; ``np.asarray(rgb)`` decodes it whole."""

    image_id: int
    path: str
    rel_path: str
    out_stem: str
    width: int
    height: int
    rgb: np.ndarray  # or maskseg.regions.TiffRegions, see above
    annotations: list[dict]


@runtime_checkable
class Writer(Protocol):
    """A sink for results: ``open`` once, ``write`` per finished image, ``checkpoint`` now and then,
    ``close`` at the end. Per-image files must be written atomically (see ``maskseg.atomic``)."""

    name: str

    def open(self, run: RunContext) -> None: ...

    def write(self, image: ImageRecord, detections: Detections) -> None: ...

    def checkpoint(self) -> None: ...

    def close(self) -> None: ...


class BaseWriter:
    """Convenience base with no-op methods; subclasses override what they need."""

    name = "base"

    def open(self, run: RunContext) -> None:
        self.run = run

    def write(self, image: ImageRecord, detections: Detections) -> None:
        pass

    def checkpoint(self) -> None:
        pass

    def close(self) -> None:
        pass
