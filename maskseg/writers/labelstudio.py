"""``OUT/labelstudio_tasks.json`` and ``OUT/labelstudio_config.xml``: Label Studio pre-annotations.

The tasks file is a JSON list Label Studio imports as it is (Project -> Import): one task per image,
``data.image`` a local-files URL (``/data/local-files/?d=<path>``, the path relative to Label Studio's
``LOCAL_FILES_DOCUMENT_ROOT``: ``--labelstudio-root``, by default the folder above the inputs' common
folder), and one prediction per task holding every detection as
``polygonlabels`` regions in percent of the image size, with the model version and scores. The config
is the labeling interface those regions belong to (``PolygonLabels name="label" toName="image"``).
Both are rebuilt from the journal like ``predictions.json``: resumable, swapped in atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import PurePath, PurePosixPath
from typing import IO
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from ..atomic import atomic_write_bytes
from ..detections import BoxMask
from ..jsonio import dumps
from .coco import JournalJsonWriter
from .shapes import mask_polygons

CONFIG_FILE = "labelstudio_config.xml"
FROM_NAME, TO_NAME = "label", "image"


def local_files_url(path: str, rel_path: str, root: str | None) -> str:
    """The URL Label Studio's local-files storage serves ``path`` (absolute) from: ``path`` relative to
    ``root`` (``LOCAL_FILES_DOCUMENT_ROOT``). None takes the folder above the inputs' common folder
    (which ``rel_path`` is relative to): Label Studio wants a storage's folder strictly inside the
    document root, so the common folder itself can then be the project's Local Files storage."""
    if root is None:
        common = PurePath(path).parents[len(PurePosixPath(rel_path).parts) - 1]
        root = str(common.parent)
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return "/data/local-files/?d=" + quote(rel, safe="/", errors="surrogateescape")


def labeling_config(names: list[str]) -> str:
    """Label Studio's XML labeling config: an image with polygon labels, one ``Label`` per class."""
    from .overlay import color_for

    labels = []
    for k, name in enumerate(names):
        b, g, r = color_for(k + 1)
        labels.append(f"    <Label value={quoteattr(name)} background=\"#{r:02x}{g:02x}{b:02x}\"/>")
    return "\n".join([
        "<View>",
        f'  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>',
        f'  <PolygonLabels name="{FROM_NAME}" toName="{TO_NAME}" strokeWidth="2" opacity="0.4">',
        *labels,
        "  </PolygonLabels>",
        "</View>",
    ]) + "\n"


class LabelStudioWriter(JournalJsonWriter):
    """A part of a multi-part mask is its own region (a Label Studio polygon is one ring), each with the
    detection's label and score; the prediction's ``score`` is the mean detection score (Label Studio
    sorts and filters tasks by it)."""

    filename = "labelstudio_tasks.json"

    def checkpoint(self) -> None:
        super().checkpoint()
        self._write_config()

    def close(self) -> None:
        super().close()
        self._write_config()

    def _write_config(self) -> None:
        path = self.run.output_path(CONFIG_FILE)
        if self.run.changed or not path.exists():
            names = [c.name for c in sorted(self.run.categories, key=lambda c: c.id)]
            atomic_write_bytes(path, labeling_config(names).encode("utf-8"))

    def _stream(self, fh: IO[bytes]) -> None:
        fh.write(b"[\n")
        self._chunks(fh, (dumps(task) for task in self._tasks()))
        fh.write(b"\n]\n")

    def _tasks(self) -> Iterator[dict]:
        run = self.run
        tol, root = run.options.polygon_tolerance, run.options.labelstudio_root
        for rec in run.journal.done_records():
            width, height = rec["width"], rec["height"]
            results, scores = [], []
            for n, det in enumerate(rec["detections"]):
                scores.append(det["score"])
                seg = det.get("segmentation")
                if seg is None:
                    continue
                for p, part in enumerate(mask_polygons(BoxMask.from_rle(seg), tol)):
                    points = [[round(x * 100 / width, 4), round(y * 100 / height, 4)] for x, y in part.tolist()]
                    results.append({
                        "id": f"d{n}p{p}", "type": "polygonlabels", "from_name": FROM_NAME, "to_name": TO_NAME,
                        "original_width": width, "original_height": height, "image_rotation": 0,
                        "value": {"points": points, "closed": True,
                                  "polygonlabels": [run.category_name(det["category_id"])]},
                        "score": det["score"],
                    })
            prediction = {"model_version": run.model_name, "result": results,
                          "score": round(sum(scores) / len(scores), 5) if scores else 0.0}
            yield {"data": {TO_NAME: local_files_url(rec["path"], rec["rel_path"], root)},
                   "meta": {"maskseg_image_id": rec["image_id"], "file_name": rec["rel_path"]},
                   "predictions": [prediction]}
