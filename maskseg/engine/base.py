"""Engines: where decode and the model run for a predict run. The journal, writers and outputs stay
in ``api.predict``; an engine only turns ImageRefs into per-batch results.

``local`` decodes in threads ahead of the model in this process; ``ray`` (optional extra) spreads
decode and the model over a Ray cluster and streams the same results back. This module holds what
both share: the protocol and the records they yield.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..batching import Failure
from ..decode import DecodedImage
from ..detections import Category, Detections
from ..sources import ImageRef


@dataclass
class BatchResult:
    """What one step of an engine produced: decoded images with their detections (same order), and
    the inputs that could not be decoded. ``images[i].rgb`` may be read by writers (overlays)."""

    images: list[DecodedImage]
    detections: list[Detections]
    failures: list[Failure]


@dataclass(frozen=True)
class ModelInfo:
    """What the outputs need to know of the model: its name and categories (label -> id, name)."""

    name: str
    categories: list[Category]


class Engine(Protocol):
    """``start`` loads the model (once) and says what it is; ``run`` yields results in input order
    (batch by batch) until the refs are used up; ``close`` frees workers. ``run`` may be abandoned
    part-way (the generator is closed) when a run is interrupted. ``refs`` is a scan's ``ScanRefs`` in
    a run (read from the scan's database as they are used): an engine that can should read it in order,
    once, rather than copy it."""

    def start(self) -> ModelInfo: ...

    def run(self, refs: Sequence[ImageRef], done: Callable[[ImageRef], bool] | None = None
            ) -> Iterator[BatchResult]: ...

    def close(self) -> None: ...
