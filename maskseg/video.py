"""Video files -> frames: each kept frame is a DecodedImage named ``clip.mp4/f000123``.

Decoded with PyAV (its wheels bundle FFmpeg; ``pip install 'maskseg[video]'``). A frame's index is its
position in decode order from 0, so names are stable across runs and frame selections; ``--frame-stride
N`` keeps every Nth frame, ``--fps F`` about F frames per second of video time. Frames already in the
journal are decoded (a video is read in order) but not handed to the model again, so a killed run
continues mid-video. A video that ends early (truncated, corrupt) becomes a ``Failure`` that says how
many frames were read; the frames before the damage are kept.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import replace

from .batching import Failure
from .config import VIDEO_EXTENSIONS, FrameSelect
from .decode import DecodedImage
from .sources import ImageRef

_FRAME_NAME = re.compile(r"^(?P<video>.+)/f(?P<index>\d{6,})$")


def is_video_name(name: str) -> bool:
    """True when ``name`` has a video extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


# ISO base media files that are still images (HEIC/HEIF, AVIF), told apart by the brand after "ftyp".
_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"})


def looks_like_video(head: bytes) -> bool:
    """Whether the first bytes of a file are a video container (MP4/MOV ``ftyp`` other than HEIF/AVIF,
    Matroska/WebM EBML, AVI RIFF): videos are told by content, so a ``.mp4`` that holds a JPEG is
    decoded as an image."""
    if head[4:8] == b"ftyp":
        return head[8:12] not in _IMAGE_BRANDS
    return (head[4:8] in (b"moov", b"mdat", b"wide", b"free") or head[:4] == b"\x1a\x45\xdf\xa3"
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI "))


def is_video_file(path: str) -> bool:
    """Sniff ``path``'s first bytes; never blocks (opened non-blocking, regular files only)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and looks_like_video(os.read(fd, 16))
    except OSError:
        return False
    finally:
        os.close(fd)


def frame_name(rel_path: str, index: int) -> str:
    """``clip.mp4`` and 123 -> ``clip.mp4/f000123``."""
    return f"{rel_path}/f{index:06d}"


def split_frame_name(rel_path: str) -> tuple[str, int] | None:
    """``clip.mp4/f000123`` -> (``clip.mp4``, 123); None for an image's name."""
    m = _FRAME_NAME.match(rel_path)
    if m is None or not is_video_name(m.group("video")):
        return None
    return m.group("video"), int(m.group("index"))


def frame_ref(video: ImageRef, index: int) -> ImageRef:
    """The ref of one frame: the video's path, size and mtime; its own name and output stem."""
    return replace(video, rel_path=frame_name(video.rel_path, index), out_stem=f"{video.out_stem}/f{index:06d}")


def iter_frames(ref: ImageRef, *, select: FrameSelect | None = None, done: Callable[[ImageRef], bool] | None = None,
                max_pixels: int | None = None) -> Iterator[DecodedImage | Failure]:
    """Decode ``ref``'s first video stream; yield the selected frames not ``done`` as [H, W, 3] uint8 RGB.

    Ends with a ``Failure`` for ``ref`` when the file cannot be opened as a video, a frame cannot be
    decoded, or fewer frames were read than the container declares (truncated).
    """
    try:
        import av
    except ImportError:
        yield Failure(ref, "a video file; reading videos needs PyAV: pip install 'maskseg[video]'")
        return
    select = select or FrameSelect()
    try:
        st = os.stat(ref.path)
        container = av.open(ref.path, mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        yield Failure(ref, f"cannot open as a video (truncated or not a video): {_why(exc)}; 0 frames read")
        return
    read = 0
    try:
        if not container.streams.video:
            yield Failure(ref, "a container without a video stream; 0 frames read", st.st_size, st.st_mtime_ns)
            return
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        expected = _declared_frames(container, stream)
        next_time = 0.0
        try:
            for frame in container.decode(stream):
                index = read
                read += 1
                if select.fps is not None:
                    t = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 25)
                    if t + 1e-6 < next_time:
                        continue
                    next_time = max(next_time + 1.0 / select.fps, t)
                elif index % select.stride:
                    continue
                fref = frame_ref(ref, index)
                if done is not None and done(fref):
                    continue
                if max_pixels is not None and frame.width * frame.height > max_pixels:
                    yield Failure(ref, f"{frame.width}x{frame.height} frames, over the --max-pixels limit of "
                                       f"{max_pixels:,}; 0 frames used", st.st_size, st.st_mtime_ns)
                    return
                rgb = frame.to_ndarray(format="rgb24")
                yield DecodedImage(fref, rgb, st.st_size, st.st_mtime_ns)
        except (av.FFmpegError, ValueError) as exc:
            yield Failure(ref, f"corrupt or truncated video: {_why(exc)}; {read} frames read", st.st_size,
                          st.st_mtime_ns)
            return
        if expected and read < expected - 1:
            yield Failure(ref, f"truncated video: {read} of {expected} declared frames read", st.st_size,
                          st.st_mtime_ns)
        elif read == 0:
            yield Failure(ref, "no frame could be decoded; 0 frames read", st.st_size, st.st_mtime_ns)
    finally:
        container.close()


def _declared_frames(container, stream) -> int:  # av containers and streams
    """Frames the container says the stream has: its frame count, else duration x rate (0: unknown)."""
    if stream.frames:
        return int(stream.frames)
    rate = float(stream.average_rate or 0)
    if stream.duration is not None and stream.time_base is not None and rate:
        return round(float(stream.duration * stream.time_base) * rate)
    if container.duration and rate:
        return round(container.duration / 1_000_000 * rate)
    return 0


def _why(exc: Exception) -> str:
    """FFmpeg's words without the path it appends (the failure names the file already)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:200]
