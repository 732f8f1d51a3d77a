"""``OUT/overlays/<rel path>.jpg``: masks, boxes, class names and scores drawn with OpenCV."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_write_bytes
from ..config import REGION_OVERLAY_SIDE
from ..detections import Detections
from ..errors import WriterError
from .base import BaseWriter, ImageRecord

if TYPE_CHECKING:
    from ..regions import TiffRegions


def color_for(category_id: int) -> tuple[int, int, int]:
    """A stable, well-spread BGR colour per category (golden-ratio hue steps)."""
    import cv2

    hue = int((category_id * 0.618033988749895 % 1.0) * 180)
    hsv = np.uint8([[[hue, 200, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw_overlay(rgb: np.ndarray, detections: Detections, names: dict[int, str], alpha: float = 0.45) -> np.ndarray:
    """Return a BGR uint8 copy of ``rgb`` with each instance's mask tinted, outlined and labelled.

    ``names`` maps category id -> name; ``detections.labels`` must already be category ids. Masks are
    blended only inside their boxes (no full-image work per instance).
    """
    import cv2

    canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    h_img, w_img = canvas.shape[:2]
    thickness = max(1, round(max(h_img, w_img) / 500))
    font_scale = max(0.4, max(h_img, w_img) / 1600)
    order = np.argsort(detections.scores)  # draw the best last, on top
    for i in order:
        cid = int(detections.labels[i])
        color = color_for(cid)
        if detections.masks is not None:
            m = detections.masks[i]
            mh, mw = m.bitmap.shape
            if mh and mw and m.bitmap.any():
                roi = canvas[m.y0 : m.y0 + mh, m.x0 : m.x0 + mw]
                sel = m.bitmap
                roi[sel] = (roi[sel] * (1 - alpha) + np.array(color) * alpha).astype(np.uint8)
                contours, _ = cv2.findContours(m.bitmap.astype(np.uint8), cv2.RETR_EXTERNAL,
                                               cv2.CHAIN_APPROX_SIMPLE, offset=(m.x0, m.y0))
                cv2.drawContours(canvas, contours, -1, color, thickness)
        x1, y1, x2, y2 = (round(float(v)) for v in detections.boxes[i])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        label = f"{names.get(cid, cid)} {float(detections.scores[i]):.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = max(y1, th + base)
        cv2.rectangle(canvas, (x1, ty - th - base), (x1 + tw, ty), color, cv2.FILLED)
        cv2.putText(canvas, label, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return canvas


def overlay_rel_path(rel_path: str) -> str:
    """``a/x.jpg`` -> ``a/x.jpg``; ``a/x.png`` -> ``a/x.png.jpg`` (never two inputs on one file)."""
    p = PurePosixPath(rel_path)
    return rel_path if p.suffix.lower() in (".jpg", ".jpeg") else rel_path + ".jpg"


class OverlayWriter(BaseWriter):
    """Draws each image's detections and writes it as JPEG (quality 90) under ``OUT/overlays/``.

    An image read by region (a tiled TIFF in a tiled run, ``maskseg.regions``) is drawn downscaled to
    ``REGION_OVERLAY_SIDE`` on its long side when larger, so that it is never decoded whole."""

    quality = 90

    def write(self, image: ImageRecord, detections: Detections) -> None:
        import cv2

        names = {c.id: c.name for c in self.run.categories}
        rgb = image.rgb
        if not isinstance(rgb, np.ndarray):
            rgb, detections = downscale_region(rgb, detections, REGION_OVERLAY_SIDE)
        canvas = draw_overlay(rgb, detections, names)
        ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise WriterError(f"{image.rel_path}: JPEG encoding of the overlay failed")
        atomic_write_bytes(self.run.output_path("overlays", overlay_rel_path(image.rel_path)), buf.tobytes())


def downscale_region(regions: TiffRegions, detections: Detections, side: int) -> tuple[np.ndarray, Detections]:
    """An image read by region (``maskseg.regions.TiffRegions``) and its detections, at most ``side`` px
    on the long side."""
    from ..tiling import upscale

    height, width = int(regions.shape[0]), int(regions.shape[1])
    scale = side / max(height, width)
    if scale >= 1.0:
        return np.asarray(regions), detections
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return regions.downscaled(*size), upscale(detections, size)
