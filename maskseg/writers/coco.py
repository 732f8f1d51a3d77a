"""COCO outputs rebuilt from the journal: ``predictions.json`` (a dataset) and ``results.json``.

Both are streamed record by record into a temp file and swapped in atomically, so a run of any
length holds one image's annotations in memory at a time and readers never see a partial file.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from typing import IO

from ..atomic import atomic_write_with
from ..jsonio import dumps as _dumps
from .base import BaseWriter


class JournalJsonWriter(BaseWriter):
    filename = ""

    def checkpoint(self) -> None:
        self._rebuild()

    def close(self) -> None:
        self._rebuild()

    def _rebuild(self) -> None:
        path = self.run.output_path(self.filename)
        if self.run.changed or not path.exists():
            atomic_write_with(path, lambda fh: self._stream(fh))

    def _stream(self, fh: IO[bytes]) -> None:
        raise NotImplementedError

    @staticmethod
    def _chunks(fh: IO[bytes], items: Iterator[str]) -> None:
        first = True
        for item in items:
            fh.write((("" if first else ",\n") + item).encode("utf-8"))
            first = False


class CocoWriter(JournalJsonWriter):
    """``OUT/predictions.json``: a COCO instances dataset (with scores) that ``COCO()`` loads as it is.

    Annotation ids start at 1 (pycocotools treats id 0 as unmatched) and follow image-id order.
    """

    filename = "predictions.json"

    def _stream(self, fh: IO[bytes]) -> None:
        run = self.run
        info = {
            "description": f"maskseg predictions ({run.model_name})",
            "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **run.info,
            **self._info(),
        }
        categories = [{"id": c.id, "name": c.name, "supercategory": ""} for c in run.categories]
        fh.write(f'{{"info":{_dumps(info)},"licenses":[],"categories":{_dumps(categories)},\n"images":[\n'.encode())
        self._chunks(fh, (_dumps(_image_entry(r)) for r in run.journal.done_records()))
        fh.write(b'\n],\n"annotations":[\n')
        self._chunks(fh, self._annotations())
        fh.write(b"\n]}\n")

    def _annotations(self) -> Iterator[str]:
        ann_id = 0
        for rec in self.run.journal.done_records():
            for det in rec["detections"]:
                ann_id += 1
                yield _dumps({"id": ann_id, "image_id": rec["image_id"], **self._annotation(det), "iscrowd": 0})

    def _info(self) -> dict:
        """What a subclass adds to ``info``."""
        return {}

    def _annotation(self, det: dict) -> dict:
        """One journal detection as this file's annotation (without id, image_id, iscrowd)."""
        return det


class ResultsWriter(JournalJsonWriter):
    """``OUT/results.json``: the COCO results list that ``COCO.loadRes`` takes (same image ids)."""

    filename = "results.json"

    def _stream(self, fh: IO[bytes]) -> None:
        fh.write(b"[\n")
        self._chunks(fh, (
            _dumps({"image_id": rec["image_id"], "category_id": d["category_id"], "bbox": d["bbox"],
                    "score": d["score"], **({"segmentation": d["segmentation"]} if "segmentation" in d else {})})
            for rec in self.run.journal.done_records()
            for d in rec["detections"]
        ))
        fh.write(b"\n]\n")


def _image_entry(r: dict) -> dict:
    """COCO ``images`` entry of a journal record; a video frame also names its ``video`` (the video's
    relative path) and ``frame_index`` (0-based, in decode order)."""
    entry = {"id": r["image_id"], "file_name": r["rel_path"], "width": r["width"], "height": r["height"]}
    if "video" in r:
        entry["video"] = r["video"]
        entry["frame_index"] = r["frame_index"]
    return entry
