"""Video inputs: frames named clip.mp4/f000123, frame selection, truncated files, resume mid-video and
the overlay-video writer. The videos are made here with PyAV itself."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="the video extra (pip install 'maskseg[video]') is not installed")

from maskseg.api import SilentProgress, predict  # noqa: E402
from maskseg.batching import Failure  # noqa: E402
from maskseg.config import FrameSelect, ModelConfig, PredictConfig  # noqa: E402
from maskseg.decode import DecodedImage  # noqa: E402
from maskseg.sources import scan_sources  # noqa: E402
from maskseg.video import frame_name, is_video_file, iter_frames, split_frame_name  # noqa: E402

from .conftest import SAMPLES  # noqa: E402


def make_video(path: Path, frames: int = 12, size: tuple[int, int] = (96, 64), rate: int = 10,
               codec: str = "libx264") -> Path:
    """A small video with a bright square moving right, one step a frame; the photo of figs behind it."""
    import cv2

    w, h = size
    photo = cv2.resize(cv2.imread(str(SAMPLES / "fruits_nuts" / "6.jpg"))[:, :, ::-1], (w, h))
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = photo.copy()
            img[10:30, 4 + 3 * i : 24 + 3 * i] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _ref(path: Path):
    [ref] = scan_sources([str(path)]).refs
    return ref


def test_frames_are_named_by_index_and_selected_by_stride_or_fps(tmp_path):
    clip = make_video(tmp_path / "clip.mp4", frames=12, rate=10)
    assert is_video_file(str(clip))
    items = list(iter_frames(_ref(clip)))
    assert all(isinstance(d, DecodedImage) for d in items)
    assert [d.ref.rel_path for d in items] == [frame_name("clip.mp4", i) for i in range(12)]
    assert items[0].rgb.shape == (64, 96, 3) and items[0].rgb.dtype == np.uint8
    assert items[3].ref.out_stem == "clip/f000003" and items[3].ref.path == str(clip)
    assert split_frame_name("clip.mp4/f000123") == ("clip.mp4", 123)
    assert split_frame_name("photos/f000123") is None

    strided = [d.ref.rel_path for d in iter_frames(_ref(clip), select=FrameSelect(stride=5))]
    assert strided == ["clip.mp4/f000000", "clip.mp4/f000005", "clip.mp4/f000010"]
    by_fps = [split_frame_name(d.ref.rel_path)[1] for d in iter_frames(_ref(clip), select=FrameSelect(fps=2.5))]
    assert by_fps == [0, 4, 8]  # 10 fps video, 2.5 kept a second

    done = {"clip.mp4/f000000", "clip.mp4/f000001"}
    rest = [d.ref.rel_path for d in iter_frames(_ref(clip), done=lambda r: r.rel_path in done)]
    assert rest == [frame_name("clip.mp4", i) for i in range(2, 12)]


def test_truncated_videos_report_the_frames_read(tmp_path):
    clip = make_video(tmp_path / "clip.mkv", frames=30, size=(160, 120))
    data = clip.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 9 // 10])
    items = list(iter_frames(_ref(cut)))
    frames = [d for d in items if isinstance(d, DecodedImage)]
    [failure] = [d for d in items if isinstance(d, Failure)]
    assert 0 < len(frames) < 30
    assert "truncated" in failure.reason and f"{len(frames)} " in failure.reason

    mp4 = make_video(tmp_path / "whole.mp4", frames=10)
    head = tmp_path / "head.mp4"
    head.write_bytes(mp4.read_bytes()[:-1500])  # the frames' data cut short
    items = list(iter_frames(_ref(head)))
    assert isinstance(items[-1], Failure) and "truncated" in items[-1].reason
    assert f"{len(items) - 1} " in items[-1].reason and "frames read" in items[-1].reason

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100)
    [failure] = list(iter_frames(_ref(junk)))
    assert isinstance(failure, Failure) and "0 frames read" in failure.reason


def test_a_video_name_holding_an_image_is_decoded_as_an_image(tmp_path):
    fake = tmp_path / "photo.mp4"
    fake.write_bytes((SAMPLES / "chelsea.png").read_bytes())
    assert not is_video_file(str(fake))


def test_predict_runs_frame_by_frame_resumes_mid_video_and_writes_an_annotated_video(tiny_checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_video(src / "clip.mp4", frames=9)
    (src / "chelsea.png").write_bytes((SAMPLES / "chelsea.png").read_bytes())
    out = tmp_path / "out"
    config = PredictConfig(model=ModelConfig(weights=str(tiny_checkpoint), device="cpu"), decode_workers=0,
                           writers=("coco", "results", "overlay-video"), batch_size=1)

    class StopAfter(SilentProgress):
        def __init__(self, n: int, stop: threading.Event) -> None:
            self.n, self.stop = n, stop

        def advance(self, images: int, detections: int) -> None:
            self.n -= images
            if self.n <= 0:
                self.stop.set()

    stop = threading.Event()
    first = predict([str(src)], out, config, progress=StopAfter(4, stop), stop=stop)
    assert first.interrupted is not None and 4 <= first.done < 10
    second = predict([str(src)], out, config)
    assert first.done + second.done == 10  # 9 frames and one photo, none done twice
    coco = json.loads((out / "predictions.json").read_text())
    frames = sorted((i["frame_index"], i["file_name"]) for i in coco["images"] if "video" in i)
    assert frames == [(k, frame_name("clip.mp4", k)) for k in range(9)]
    assert all(i["video"] == "clip.mp4" for i in coco["images"] if "video" in i)
    assert any(i["file_name"] == "chelsea.png" and "video" not in i for i in coco["images"])

    video = out / "videos" / "clip.mp4"
    with av.open(str(video)) as rendered:
        n = sum(1 for _ in rendered.decode(video=0))
    assert n == 9  # the whole video, though its frames came from two runs

    third = predict([str(src)], out, config)  # all done: no frame is segmented again
    assert third.done == 0
