"""``OUT/videos/<video rel path>.mp4``: each input video's segmented frames, annotated, as an H.264 mp4.

Frames reach writers one by one like images; this writer only notes which videos had new frames. At
``close`` it renders each such video afresh from the source file and the journal (every finished frame
of it, this run's and earlier runs'), so a resumed run still ends with one whole annotated video.
Detections are read back from the journal's RLE (pycocotools decodes a frame-sized array per
detection: fine at video frame sizes) and kept box-local for drawing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_with
from ..detections import BoxMask, Detections
from ..errors import WriterError
from ..video import split_frame_name
from .base import BaseWriter, ImageRecord, RunContext
from .overlay import draw_overlay

log = logging.getLogger(__name__)


class OverlayVideoWriter(BaseWriter):
    """Annotated mp4 per input video (``pip install 'maskseg[video]'``); images are left alone."""

    name = "overlay-video"

    def open(self, run: RunContext) -> None:
        super().open(run)
        self.touched: dict[str, str] = {}  # video rel path -> its file

    def write(self, image: ImageRecord, detections: Detections) -> None:
        frame = split_frame_name(image.rel_path)
        if frame is not None:
            self.touched[frame[0]] = image.path

    def close(self) -> None:
        for rel, path in sorted(self.touched.items()):
            frames = {}
            for r in self.run.journal.done_records():
                if r.get("video") == rel:
                    frames[int(r["frame_index"])] = r
            if frames:
                target = self.run.output_path("videos", rel if rel.lower().endswith(".mp4") else rel + ".mp4")
                target.parent.mkdir(parents=True, exist_ok=True)
                render_video(Path(path), target, frames, {c.id: c.name for c in self.run.categories})
        self.touched = {}


def render_video(source: Path, target: Path, frames: dict[int, dict], names: dict[int, str]) -> int:
    """Write ``target`` (mp4, H.264) with the ``frames`` (index -> journal record) of ``source`` drawn;
    frames without a record are left out. Returns the frames written."""
    import av

    written = 0

    def fill(fh) -> None:  # fh: a binary file, seekable (the mp4 muxer writes its index at the end)
        nonlocal written
        with av.open(str(source), mode="r") as src:
            stream = src.streams.video[0]
            rate = stream.average_rate or 25
            step = _median_step(sorted(frames))
            with av.open(fh, mode="w", format="mp4") as dst:
                out = dst.add_stream("libx264", rate=max(1, round(float(rate) / step)))
                out.pix_fmt = "yuv420p"
                out.options = {"crf": "23", "preset": "veryfast"}
                try:
                    for index, frame in enumerate(src.decode(stream)):
                        record = frames.get(index)
                        if record is None:
                            continue
                        rgb = frame.to_ndarray(format="rgb24")
                        if not written:
                            out.width, out.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
                        bgr = draw_overlay(rgb, _detections(record), names)
                        rgb_out = np.ascontiguousarray(bgr[: out.height, : out.width, ::-1])
                        for packet in out.encode(av.VideoFrame.from_ndarray(rgb_out, format="rgb24")):
                            dst.mux(packet)
                        written += 1
                except av.FFmpegError as exc:  # a truncated source: what was read is written
                    log.info("%s: stopped reading after %d frames (%s)", source, written, exc)
                for packet in out.encode():
                    dst.mux(packet)

    try:
        atomic_write_with(target, fill)
    except av.FFmpegError as exc:
        raise WriterError(f"{target}: cannot write the annotated video: {exc}") from None
    return written


def _median_step(indices: list[int]) -> float:
    if len(indices) < 2:
        return 1.0
    return float(np.median(np.diff(indices)))


def _detections(record: dict) -> Detections:
    """A journal record's annotations as Detections with box-local masks (RLE decoded inside its box)."""
    from pycocotools import mask as mask_utils

    size = (int(record["height"]), int(record["width"]))
    anns = record.get("detections", [])
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns], np.float32).reshape(-1, 4)
    masks = None
    if anns and all("segmentation" in a for a in anns):
        masks = []
        for a in anns:
            seg = a["segmentation"]
            full = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
            ys, xs = np.nonzero(full)
            if len(xs):
                bx0, by0, bx1, by1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                masks.append(BoxMask(int(bx0), int(by0), full[by0:by1, bx0:bx1].copy(), size))
            else:
                masks.append(BoxMask(0, 0, np.zeros((0, 0), bool), size))
        masks = tuple(masks)
    return Detections(boxes, np.array([a["score"] for a in anns], np.float32),
                      np.array([a["category_id"] for a in anns], np.int64), masks, size)
