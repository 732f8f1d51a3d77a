"""Sliced inference: a huge image -> overlapping tiles -> the same segmenter -> one merged Detections.

Mask R-CNN resizes every input to about 1333 px, so on a 20000 px image an object of 60 px becomes 4 px
and is lost. Here the image is cut into tiles of ``TileConfig.size`` (each seen at the model's own
scale), optionally plus the whole image downscaled (``full``), and every tile goes through the same
segmenter, backend and batch size as a whole image would. Detections are merged in box-local form:

1. parts of one object cut by a tile edge are *joined* when their masks agree inside the band the two
   tiles share (mask union over the union box);
2. duplicates are grouped greedily by score (as SAHI's GREEDYNMM): a kept detection takes the lower-scored
   ones of its label whose mask overlaps the group's (its own, grown by fragments) by IoU, or, for a cut
   fragment (a detection touching an inner tile edge, so contained in the whole object), by
   intersection over the smaller mask. A
   group's mask is its best whole view (the kept detection, or, when that is a fragment, the best
   uncut member containing it) united with its fragments; other whole views it took are dropped, as NMS
   drops them, not united: a low-scored detection spanning two neighbours would otherwise weld them.

No step allocates a full-image mask: each comparison reads the two bitmaps over their shared rectangle,
and each merged mask covers only its union box. Written here rather than taken from SAHI because SAHI
shifts every mask to a full-size array per slice (its cost on large images is what issue 17 is about).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import AUTO_TILE_SIZE, AUTO_TILE_TRIGGER, TILE_FULL_SIDE, TileConfig
from .detections import BoxMask, Detections
from .regions import TiffRegions

log = logging.getLogger(__name__)

# A box side within this many pixels of a tile's inner edge counts as cut by it.
EDGE_PX = 2


@dataclass(frozen=True)
class Tile:
    """A rectangle of the image, XYXY integer pixels (``x1``/``y1`` exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``size`` covering ``length`` with ``overlap`` shared; the last tile ends
    at the image edge (shifted back rather than cut short, so every tile has the full size)."""
    if length <= size:
        return [0]
    step = max(1, round(size * (1.0 - overlap)))
    n = math.ceil((length - size) / step) + 1
    starts = [min(i * step, length - size) for i in range(n)]
    return sorted(set(starts))


def tile_grid(height: int, width: int, size: int, overlap: float) -> list[Tile]:
    """The tiles covering a ``height`` x ``width`` image, row by row."""
    ys = tile_starts(height, size, overlap)
    xs = tile_starts(width, size, overlap)
    return [Tile(x, y, min(x + size, width), min(y + size, height)) for y in ys for x in xs]


def tile_size_for(config: TileConfig, height: int, width: int) -> int | None:
    """The tile side to use on this image, or None to run it whole."""
    if config.size is None:
        return None
    if config.size == 0:  # auto
        return AUTO_TILE_SIZE if max(height, width) > AUTO_TILE_TRIGGER else None
    return config.size if max(height, width) > config.size else None


class TiledSegmenter:
    """Wraps a segmenter (a callable: list of [H, W, 3] uint8 RGB -> list of Detections) with tiling.

    Images that need no tiles go to ``segmenter`` in one batch as before; a tiled image sends its tiles
    in batches of ``batch_size``, so memory grows with the tiles in flight, not with the image (beyond
    the decoded image itself). An image may also be a ``TiffRegions`` (a TIFF read by region,
    ``maskseg.regions``): its tiles and its ``full`` pass are then read from the file, never the whole.
    """

    def __init__(self, segmenter: Callable[[list[np.ndarray]], Sequence[Detections]], config: TileConfig,
                 *, batch_size: int = 1) -> None:
        self.segmenter = segmenter
        self.config = config
        self.batch_size = max(1, batch_size)

    @property
    def backend(self):  # the wrapped segmenter's backend, for engines that read it
        return self.segmenter.backend  # type: ignore[attr-defined]

    def __call__(self, images: Sequence[np.ndarray | TiffRegions]) -> list[Detections]:
        sizes = [tile_size_for(self.config, int(im.shape[0]), int(im.shape[1])) for im in images]
        # an image read by region that needs no tiles is small enough to read whole
        whole = [np.asarray(im) for im, s in zip(images, sizes, strict=True) if s is None]
        whole_dets = iter(self.segmenter(whole) if whole else [])
        return [next(whole_dets) if s is None else self.segment_tiled(im, s)
                for im, s in zip(images, sizes, strict=True)]

    def segment_tiled(self, rgb: np.ndarray | TiffRegions, size: int) -> Detections:
        """Segment one image tile by tile (plus the downscaled whole with ``full``) and merge."""
        height, width = int(rgb.shape[0]), int(rgb.shape[1])
        grid = tile_grid(height, width, size, self.config.overlap)
        parts: list[tuple[Tile, Detections]] = []
        for i in range(0, len(grid), self.batch_size):
            chunk = grid[i : i + self.batch_size]
            crops = [np.ascontiguousarray(rgb[t.y0 : t.y1, t.x0 : t.x1]) for t in chunk]
            parts.extend(zip(chunk, self.segmenter(crops), strict=True))
        if self.config.full:
            parts.append((Tile(0, 0, width, height), self._full_pass(rgb)))
        log.debug("%dx%d image: %d tiles of %d px, %d detections before merging", width, height, len(grid),
                  size, sum(len(d) for _, d in parts))
        return merge_tiles(parts, (height, width), self.config)

    def _full_pass(self, rgb: np.ndarray | TiffRegions) -> Detections:
        import cv2

        height, width = int(rgb.shape[0]), int(rgb.shape[1])
        scale = min(1.0, TILE_FULL_SIDE / max(height, width))
        if scale == 1.0:
            return self.segmenter([np.asarray(rgb)])[0]
        small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
        if isinstance(rgb, TiffRegions):  # strip by strip (or from the file's reduced level), same pixels
            small = rgb.downscaled(small_h, small_w)
        else:
            small = cv2.resize(rgb, (small_w, small_h), interpolation=cv2.INTER_AREA)
        [dets] = self.segmenter([small])
        return upscale(dets, (height, width))


def upscale(dets: Detections, image_size: tuple[int, int]) -> Detections:
    """Detections of a resized image mapped onto the original ``image_size`` (height, width), or the
    other way (an overlay drawn downscaled); each mask is resized over its own box only (nearest)."""
    import cv2

    height, width = image_size
    sh, sw = dets.image_size
    fy, fx = height / sh, width / sw
    boxes = (dets.boxes * np.array([fx, fy, fx, fy], np.float32)).astype(np.float32)
    masks = None
    if dets.masks is not None:
        masks = []
        for m in dets.masks:
            h, w = m.bitmap.shape
            x0, y0 = math.floor(m.x0 * fx), math.floor(m.y0 * fy)
            x1, y1 = min(width, math.ceil((m.x0 + w) * fx)), min(height, math.ceil((m.y0 + h) * fy))
            if h == 0 or w == 0 or x1 <= x0 or y1 <= y0:
                masks.append(BoxMask(min(x0, width), min(y0, height), np.zeros((0, 0), bool), image_size))
                continue
            big = cv2.resize(m.bitmap.astype(np.uint8), (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
            masks.append(BoxMask(x0, y0, big.astype(bool), image_size))
        masks = tuple(masks)
    return Detections(boxes, dets.scores, dets.labels, masks, image_size)


def shift(dets: Detections, tile: Tile, image_size: tuple[int, int]) -> Detections:
    """Detections of a tile moved into the coordinates of the whole image (masks stay box-local)."""
    boxes = dets.boxes + np.array([tile.x0, tile.y0, tile.x0, tile.y0], np.float32)
    masks = None if dets.masks is None else tuple(
        BoxMask(m.x0 + tile.x0, m.y0 + tile.y0, m.bitmap, image_size) for m in dets.masks)
    return Detections(boxes.astype(np.float32), dets.scores, dets.labels, masks, image_size)


def merge_tiles(parts: Sequence[tuple[Tile, Detections]], image_size: tuple[int, int],
                config: TileConfig | None = None) -> Detections:
    """Merge per-tile detections (in each tile's own coordinates) into one Detections for the image.

    ``parts``: (tile, detections of that tile's crop) pairs; ``image_size``: (height, width). See the
    module docstring for the two steps; thresholds come from ``config``.
    """
    config = config or TileConfig()
    shifted = [(t, shift(d, t, image_size)) for t, d in parts if len(d)]
    if not shifted:
        return Detections.empty(image_size)
    has_masks = all(d.masks is not None for _, d in shifted)
    boxes = np.concatenate([d.boxes for _, d in shifted])
    scores = np.concatenate([d.scores for _, d in shifted]).astype(np.float32)
    labels = np.concatenate([d.labels for _, d in shifted])
    tile_of = np.concatenate([np.full(len(d), i) for i, (_, d) in enumerate(shifted)])
    tiles = [t for t, _ in shifted]
    items = ([m for _, d in shifted for m in d.masks] if has_masks  # type: ignore[union-attr]
             else [_box_as_mask(b, image_size) for b in boxes])

    cut = np.array([_cut_sides(b, tiles[t], image_size) for b, t in zip(boxes, tile_of, strict=True)])
    groups = _join_cut_parts(boxes, labels, tile_of, tiles, items, image_size, config.join_iou)
    boxes, scores, labels, items = _combine(groups, boxes, scores, labels, items, image_size)
    cut = np.array([bool(cut[g].any()) for g in groups])  # a joined object may still be cut at its far ends
    groups = _greedy_nmm(boxes, scores, labels, items, cut, config.match_ios, config.match_iou)
    boxes, scores, labels, items = _combine(groups, boxes, scores, labels, items, image_size)
    order = np.argsort(-scores, kind="stable")
    return Detections(boxes[order], scores[order], labels[order],
                      tuple(items[i] for i in order) if has_masks else None, image_size)


def _box_as_mask(box: np.ndarray, image_size: tuple[int, int]) -> BoxMask:
    """A box-only detection treated as a filled mask, so one merge serves models without masks."""
    height, width = image_size
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, max(x0, math.ceil(box[2]))), min(height, max(y0, math.ceil(box[3])))
    return BoxMask(x0, y0, np.ones((y1 - y0, x1 - x0), bool), image_size)


def _rect(m: BoxMask) -> tuple[int, int, int, int]:
    h, w = m.bitmap.shape
    return m.x0, m.y0, m.x0 + w, m.y0 + h


def mask_overlap(a: BoxMask, b: BoxMask, clip: tuple[int, int, int, int] | None = None) -> tuple[int, int, int]:
    """(intersection, area of ``a``, area of ``b``) in pixels, each inside ``clip`` (XYXY) when given;
    reads the bitmaps over their shared rectangle only."""
    ax0, ay0, ax1, ay1 = _rect(a)
    bx0, by0, bx1, by1 = _rect(b)
    area_a = _area(a, clip)
    area_b = _area(b, clip)
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if clip is not None:
        x0, y0, x1, y1 = max(x0, clip[0]), max(y0, clip[1]), min(x1, clip[2]), min(y1, clip[3])
    if x1 <= x0 or y1 <= y0:
        return 0, area_a, area_b
    inter = np.count_nonzero(a.bitmap[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
                             & b.bitmap[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0])
    return int(inter), area_a, area_b


def _area(m: BoxMask, clip: tuple[int, int, int, int] | None) -> int:
    if clip is None:
        return m.area
    x0, y0, x1, y1 = _rect(m)
    cx0, cy0, cx1, cy1 = max(x0, clip[0]), max(y0, clip[1]), min(x1, clip[2]), min(y1, clip[3])
    if cx1 <= cx0 or cy1 <= cy0:
        return 0
    return int(np.count_nonzero(m.bitmap[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]))


def union_mask(masks: Sequence[BoxMask], image_size: tuple[int, int]) -> BoxMask:
    """The union of box-local masks, stored over their union box only."""
    if len(masks) == 1:
        return masks[0]
    rects = [_rect(m) for m in masks]
    x0, y0 = min(r[0] for r in rects), min(r[1] for r in rects)
    x1, y1 = max(r[2] for r in rects), max(r[3] for r in rects)
    out = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), bool)
    for m, (mx0, my0, mx1, my1) in zip(masks, rects, strict=True):
        out[my0 - y0 : my1 - y0, mx0 - x0 : mx1 - x0] |= m.bitmap
    return BoxMask(x0, y0, out, image_size)


def _cut_sides(box: np.ndarray, tile: Tile, image_size: tuple[int, int]) -> bool:
    """Whether ``box`` touches an edge of ``tile`` that lies inside the image (the object may go on)."""
    height, width = image_size
    return bool((tile.x0 > 0 and box[0] <= tile.x0 + EDGE_PX) or (tile.y0 > 0 and box[1] <= tile.y0 + EDGE_PX)
                or (tile.x1 < width and box[2] >= tile.x1 - EDGE_PX)
                or (tile.y1 < height and box[3] >= tile.y1 - EDGE_PX))


def _pairs(boxes: np.ndarray, cell: int) -> set[tuple[int, int]]:
    """Index pairs (i < j) whose boxes overlap or touch, found through a grid of ``cell`` px (no N x N
    matrix); boxes spanning many cells (from the full-image pass) are compared with every box instead."""
    buckets: dict[tuple[int, int], list[int]] = {}
    big = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if (x1 - x0) > 8 * cell or (y1 - y0) > 8 * cell:
            big.append(i)
            continue
        for gy in range(int(y0) // cell, int(y1) // cell + 1):
            for gx in range(int(x0) // cell, int(x1) // cell + 1):
                buckets.setdefault((gx, gy), []).append(i)
    pairs: set[tuple[int, int]] = set()
    for i in big:
        hit = np.flatnonzero((boxes[:, 0] <= boxes[i, 2]) & (boxes[i, 0] <= boxes[:, 2])
                             & (boxes[:, 1] <= boxes[i, 3]) & (boxes[i, 1] <= boxes[:, 3]))
        pairs.update((min(i, int(j)), max(i, int(j))) for j in hit if j != i)
    for members in buckets.values():
        for a in range(len(members)):
            i = members[a]
            for j in members[a + 1 :]:
                if (boxes[i, 0] <= boxes[j, 2] and boxes[j, 0] <= boxes[i, 2]
                        and boxes[i, 1] <= boxes[j, 3] and boxes[j, 1] <= boxes[i, 3]):
                    pairs.add((min(i, j), max(i, j)))
    return pairs


def _cell_for(boxes: np.ndarray) -> int:
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return max(32, int(np.median(sides)) * 2) if len(sides) else 256


def _join_cut_parts(boxes: np.ndarray, labels: np.ndarray, tile_of: np.ndarray, tiles: list[Tile],
                    items: list[BoxMask], image_size: tuple[int, int], join_iou: float) -> list[list[int]]:
    """Groups (union-find) of detections that are parts of one object cut by tile edges: same label,
    different tiles, both touching an inner tile edge, masks agreeing inside the two tiles' shared band."""
    n = len(boxes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    cut = [i for i in range(n) if _cut_sides(boxes[i], tiles[tile_of[i]], image_size)]
    if len(cut) > 1:
        sub = boxes[cut]
        for a, b in _pairs(sub, _cell_for(sub)):
            i, j = cut[a], cut[b]
            if labels[i] != labels[j] or tile_of[i] == tile_of[j]:
                continue
            ti, tj = tiles[tile_of[i]], tiles[tile_of[j]]
            band = (max(ti.x0, tj.x0), max(ti.y0, tj.y0), min(ti.x1, tj.x1), min(ti.y1, tj.y1))
            if band[2] < band[0] or band[3] < band[1] or (band[2] == band[0] and band[3] == band[1]):
                continue
            if band[2] > band[0] and band[3] > band[1]:
                inter, area_i, area_j = mask_overlap(items[i], items[j], band)
            else:  # tiles that abut (no overlap): the pixel rows or columns on either side of the edge
                inter, area_i, area_j = _edge_overlap(items[i], items[j], ti, band)
            union = area_i + area_j - inter
            if union and inter / union >= join_iou:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _edge_overlap(a: BoxMask, b: BoxMask, tile_a: Tile, band: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """(intersection, |a|, |b|) of the masks' last line on ``a``'s side of the edge ``band`` (zero wide)
    and first line on the other side, compared position by position along the edge."""
    x0, y0, x1, y1 = band
    if x0 == x1:  # a vertical edge at x0
        side_a, side_b = (x0 - 1, x0) if tile_a.x0 < x0 else (x0, x0 - 1)
        la = _line(a, side_a, y0, y1, vertical=True)
        lb = _line(b, side_b, y0, y1, vertical=True)
    else:
        side_a, side_b = (y0 - 1, y0) if tile_a.y0 < y0 else (y0, y0 - 1)
        la = _line(a, side_a, x0, x1, vertical=False)
        lb = _line(b, side_b, x0, x1, vertical=False)
    return int(np.count_nonzero(la & lb)), int(np.count_nonzero(la)), int(np.count_nonzero(lb))


def _line(m: BoxMask, at: int, start: int, stop: int, *, vertical: bool) -> np.ndarray:
    """The mask's pixels along column (``vertical``) or row ``at``, from ``start`` to ``stop``, as bool."""
    out = np.zeros(stop - start, bool)
    mx0, my0, mx1, my1 = _rect(m)
    if vertical:
        if mx0 <= at < mx1:
            lo, hi = max(start, my0), min(stop, my1)
            if hi > lo:
                out[lo - start : hi - start] = m.bitmap[lo - my0 : hi - my0, at - mx0]
    elif my0 <= at < my1:
        lo, hi = max(start, mx0), min(stop, mx1)
        if hi > lo:
            out[lo - start : hi - start] = m.bitmap[at - my0, lo - mx0 : hi - mx0]
    return out


def _greedy_nmm(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, items: list[BoxMask],
                cut: np.ndarray, match_ios: float, match_iou: float) -> list[list[int]]:
    """Greedy duplicate grouping: in score order, each kept detection takes the lower-scored ones of its
    label whose mask overlaps the group's mask by IoU >= ``match_iou``, or by intersection over the
    smaller mask >= ``match_ios`` when the smaller one is ``cut`` (touches an inner tile edge). Returns,
    per group, the indices whose masks make its mask (``_combine``): its best whole view, then its fragments.

    Intersection over the smaller is kept for fragments: a fragment lies inside the whole object, whereas
    a whole detection inside a larger one is a neighbour under a detection spanning both (the low-score
    tail has many such). For the same reason the group's mask, the one candidates are matched against,
    grows by fragments (and by the whole view that replaces a kept fragment) but not by other whole views.
    """
    order = np.argsort(-scores, kind="stable")
    neighbours: dict[int, list[int]] = {}
    for i, j in _pairs(boxes, _cell_for(boxes)):
        if labels[i] == labels[j]:
            neighbours.setdefault(i, []).append(j)
            neighbours.setdefault(j, []).append(i)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    taken = np.zeros(len(order), bool)
    groups = []
    for i in order:
        if taken[i]:
            continue
        taken[i] = True
        whole, members, mask = int(i), [], items[i]  # the group's best whole view, its fragments, its mask
        queue = sorted(neighbours.get(int(i), ()), key=lambda k: rank[k])
        while queue:
            j = queue.pop(0)
            if taken[j]:
                continue
            inter, area_g, area_j = mask_overlap(mask, items[j])
            both = area_g + area_j - inter
            smaller = min(area_g, area_j)
            ios = inter / smaller if smaller else 0.0
            small_cut = cut[j] if area_j <= area_g else cut[whole]
            if not ((both and inter / both >= match_iou) or (small_cut and ios >= match_ios)):
                continue
            taken[j] = True
            if cut[j]:
                members.append(int(j))
            elif cut[whole] and area_g <= area_j and ios >= match_ios:
                members.append(whole)  # the kept fragment: the object seen whole (containing it) replaces it
                whole = int(j)
            else:
                continue  # another whole view: dropped, as NMS drops it
            mask = union_mask([mask, items[j]], mask.image_size)
            queue = sorted(set(queue) | {k for k in neighbours.get(j, ()) if not taken[k]}, key=lambda k: rank[k])
        groups.append([whole, *members])
    return groups


def _combine(groups: list[list[int]], boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
             items: list[BoxMask], image_size: tuple[int, int]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[BoxMask]]:
    """One detection per group: union box, highest score, the first member's label, union mask."""
    out_boxes = np.empty((len(groups), 4), np.float32)
    out_scores = np.empty(len(groups), np.float32)
    out_labels = np.empty(len(groups), labels.dtype)
    out_items = []
    for k, g in enumerate(groups):
        b = boxes[g]
        out_boxes[k] = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
        out_scores[k] = scores[g].max()
        out_labels[k] = labels[g[0]]
        out_items.append(union_mask([items[i] for i in g], image_size))
    return out_boxes, out_scores, out_labels, out_items
