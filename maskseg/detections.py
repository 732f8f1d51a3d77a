"""Detections: typed per-image results with compact box-local masks and COCO RLE encoding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Category:
    """One class the model predicts: ``label`` is the model's output index, ``id`` the category id
    written to outputs (equal to ``label`` for torchvision's COCO weights), ``name`` its name."""

    label: int
    id: int
    name: str


@dataclass(frozen=True)
class BoxMask:
    """A binary mask stored only over the pixels it can cover.

    ``bitmap`` is [h, w] bool and sits at column ``x0``, row ``y0`` of an image of ``image_size``
    (height, width); everything outside it is background. It never extends past the image.
    """

    x0: int
    y0: int
    bitmap: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        if self.bitmap.ndim != 2 or self.bitmap.dtype != np.bool_:
            raise ValueError(f"bitmap must be 2-D bool, got {self.bitmap.dtype} {self.bitmap.shape}")
        h, w = self.bitmap.shape
        ih, iw = self.image_size
        if self.x0 < 0 or self.y0 < 0 or self.x0 + w > iw or self.y0 + h > ih:
            raise ValueError(f"mask at ({self.x0},{self.y0}) size {w}x{h} leaves the {iw}x{ih} image")

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.bitmap))

    def full(self) -> np.ndarray:
        """The mask as a full-image [H, W] bool array (allocates H*W bytes)."""
        out = np.zeros(self.image_size, dtype=np.bool_)
        h, w = self.bitmap.shape
        out[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.bitmap
        return out

    def rle_counts(self) -> list[int]:
        """Uncompressed COCO RLE counts (column-major runs, starting with background) of the full mask.

        Computed from the box-local bitmap, in time and memory proportional to the box, not the
        image: pycocotools' ``encode`` needs a full-image array per mask (H*W bytes each).
        """
        height, width = self.image_size
        h, w = self.bitmap.shape
        if h == 0 or w == 0 or not self.bitmap.any():
            return [height * width]
        # Pad each column with a background row above and below, so no run crosses a column here.
        padded = np.zeros((h + 2, w), dtype=np.int8)
        padded[1:-1] = self.bitmap
        flat = padded.T.reshape(-1)
        edges = np.flatnonzero(np.diff(flat))  # index before each change, in padded coordinates
        starts, ends = edges[0::2] + 1, edges[1::2] + 1  # [start, end) of foreground runs
        col = starts // (h + 2)
        starts_g = (self.x0 + col) * height + self.y0 + (starts - col * (h + 2) - 1)
        ends_g = starts_g + (ends - starts)
        # Runs that end at the bottom of one column and start at the top of the next are one run.
        if len(starts_g) > 1:
            joined = ends_g[:-1] == starts_g[1:]
            if joined.any():
                keep_start = np.concatenate(([True], ~joined))
                keep_end = np.concatenate((~joined, [True]))
                starts_g, ends_g = starts_g[keep_start], ends_g[keep_end]
        counts = np.empty(2 * len(starts_g) + 1, dtype=np.int64)
        counts[0] = starts_g[0]
        counts[1:-1:2] = ends_g - starts_g
        counts[2:-1:2] = starts_g[1:] - ends_g[:-1]
        counts[-1] = height * width - ends_g[-1]
        if counts[-1] == 0:  # pycocotools ends on the last run; it writes no empty background run
            counts = counts[:-1]
        return counts.tolist()

    def rle(self) -> dict:
        """Compressed COCO RLE: ``{"size": [H, W], "counts": str}`` as pycocotools writes it."""
        from pycocotools import mask as mask_utils

        height, width = self.image_size
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": self.rle_counts()}, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}

    @classmethod
    def from_rle(cls, rle: dict) -> BoxMask:
        """The inverse of ``rle``: a COCO RLE (compressed string or counts list) as a BoxMask over the
        mask's own extent (its pixels' bounding box).

        Decoded in memory proportional to the columns the mask spans (image height x mask width):
        pycocotools' ``decode`` only gives a full-image array per mask.
        """
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
        counts = rle_string_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
        ends = np.cumsum(np.asarray(counts, dtype=np.int64))
        starts_fg, ends_fg = ends[0:-1:2], ends[1::2]  # runs alternate background, foreground
        keep = ends_fg > starts_fg
        starts_fg, ends_fg = starts_fg[keep], ends_fg[keep]
        if not len(starts_fg):
            return cls(0, 0, np.zeros((0, 0), bool), (height, width))
        col0, col1 = int(starts_fg[0] // height), int((ends_fg[-1] - 1) // height) + 1
        base = col0 * height
        delta = np.zeros((col1 - col0) * height + 1, dtype=np.int32)
        np.add.at(delta, starts_fg - base, 1)
        np.add.at(delta, ends_fg - base, -1)
        strip = np.cumsum(delta[:-1]).astype(bool).reshape(col1 - col0, height).T  # [H, columns]
        rows = np.flatnonzero(strip.any(axis=1))
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        return cls(col0, y0, np.ascontiguousarray(strip[y0:y1]), (height, width))


def rle_string_counts(text: str | bytes) -> list[int]:
    """COCO's compressed RLE string -> its counts list (pycocotools' ``rleFrString``, which it does not
    expose to Python)."""
    data = text.encode("ascii") if isinstance(text, str) else text
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


@dataclass(frozen=True)
class Detections:
    """The instances found in one image.

    ``boxes``: [N, 4] float32 XYXY pixels in the original (upright) image. ``scores``: [N] float32 in
    [0, 1]. ``labels``: [N] int64 category ids as written to outputs: the model's own label ids, mapped
    through a maskseg checkpoint's categories where it has them (for torchvision's COCO weights they
    are COCO category ids, 91-slot layout, never shifted). ``masks``: N ``BoxMask`` or ``None`` for box-only models.
    ``image_size``: (height, width).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: tuple[BoxMask, ...] | None
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.boxes.shape != (n, 4):
            raise ValueError(f"boxes must be [{n}, 4], got {self.boxes.shape}")
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be [{n}], got {self.labels.shape}")
        if self.masks is not None and len(self.masks) != n:
            raise ValueError(f"{len(self.masks)} masks for {n} detections")

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> Detections:
        return cls(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), (), image_size
        )

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> Detections:
        """A new Detections holding the selected rows (int, slice, index list or bool mask)."""
        if isinstance(index, int):
            index = [index]
        rows = np.arange(len(self))[index]
        masks = None if self.masks is None else tuple(self.masks[int(i)] for i in rows)
        return Detections(self.boxes[rows], self.scores[rows], self.labels[rows], masks, self.image_size)

    def areas(self) -> np.ndarray:
        """[N] int64 mask areas in pixels (box areas when there are no masks)."""
        if self.masks is None:
            w = self.boxes[:, 2] - self.boxes[:, 0]
            h = self.boxes[:, 3] - self.boxes[:, 1]
            return np.round(w * h).astype(np.int64)
        return np.array([m.area for m in self.masks], dtype=np.int64)

    def to_coco(self) -> list[dict]:
        """One COCO annotation-like dict per detection: category_id, bbox (XYWH), score, area, segmentation."""
        out = []
        areas = self.areas()
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            record = {
                "category_id": int(self.labels[i]),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(self.scores[i]), 5),
                "area": int(areas[i]),
            }
            if self.masks is not None:
                record["segmentation"] = self.masks[i].rle()
            out.append(record)
        return out
