"""Box-local masks -> polygons, shared by the polygon-based writers (polygons, yolo, labelstudio).

Contours come from OpenCV's ``findContours`` on the box-local bitmap (never a full-image array),
upsampled 2x first: on the 2x grid the outer boundary pixels' centres lie a quarter pixel inside the
mask's pixel edges, so the polygon follows the edges (pixel x covers [x, x+1) in COCO's coordinates).
Tracing the 1x bitmap gives the boundary pixels' centres instead, half a pixel inside: measured on the
demo's 393 masks, mean IoU against the RLE 0.966 (1x, +0.5 as detectron2 does) vs 0.997 (2x).
"""

from __future__ import annotations

import numpy as np

from ..detections import BoxMask


def mask_polygons(mask: BoxMask, tolerance: float) -> list[np.ndarray]:
    """Every connected part of ``mask`` as one polygon: a list of [K, 2] float64 arrays of (x, y) image
    coordinates (pixel x covers [x, x+1)), K >= 3, largest part first.

    ``tolerance`` is the Douglas-Peucker distance in pixels (0: only collinear points dropped). Holes are
    filled (COCO polygons cannot express them). A part that simplification would collapse below three
    points keeps its unsimplified contour, so no part is ever lost.
    """
    import cv2

    bitmap = mask.bitmap
    if bitmap.size == 0 or not bitmap.any():
        return []
    up = np.repeat(np.repeat(bitmap.astype(np.uint8), 2, axis=0), 2, axis=1)  # nearest 2x: every part >= 2x2
    method = cv2.CHAIN_APPROX_NONE if tolerance > 0 else cv2.CHAIN_APPROX_SIMPLE
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, method)
    parts = []
    for contour in contours:
        points = contour.reshape(-1, 2)
        if tolerance > 0:
            simplified = cv2.approxPolyDP(contour, 2 * tolerance, True).reshape(-1, 2)
            if len(simplified) >= 3:
                points = simplified
        if len(points) < 3:  # not reached on a 2x grid (each part is a 2x2 block or more); kept as a guard
            (xa, ya), (xb, yb) = points.min(axis=0), points.max(axis=0) + 1
            points = np.array([[xa, ya], [xb, ya], [xb, yb], [xa, yb]])
        parts.append((points.astype(np.float64) + 0.5) / 2 + (mask.x0, mask.y0))
    parts.sort(key=lambda p: -abs(polygon_area(p)))
    return parts


def polygon_area(poly: np.ndarray) -> float:
    """Signed shoelace area of a [K, 2] polygon."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def join_parts(parts: list[np.ndarray]) -> np.ndarray:
    """Several polygons as one ring: each further part is reached from the first one's nearest vertex
    by a zero-width bridge (there and back along the same segment), the way formats with one polygon
    per object (YOLO-seg) keep multi-part objects. [K, 2] float64."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    detours: dict[int, list[np.ndarray]] = {}
    for part in parts[1:]:
        d = ((first[:, None, :] - part[None, :, :]) ** 2).sum(axis=-1)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        ring = np.concatenate((part[j:], part[: j + 1]))  # around the part, back to where it was entered
        detours.setdefault(int(i), []).append(np.concatenate((ring, first[i : i + 1])))
    out = []
    for i in range(len(first)):
        out.append(first[i : i + 1])
        out.extend(detours.get(i, []))
    return np.concatenate(out)
