"""LocalEngine: results in input order, the model one batch ahead in its own thread (or inline)."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from maskseg.config import PredictConfig
from maskseg.engine import LocalEngine
from maskseg.errors import MasksegError
from maskseg.sources import scan_sources


class _Recorder:
    """A stand-in segmenter: returns each image's width and records the thread it ran in."""

    def __init__(self, fail_width: int | None = None) -> None:
        self.threads: list[str] = []
        self.fail_width = fail_width

    def __call__(self, images):
        self.threads.append(threading.current_thread().name)
        if any(rgb.shape[1] == self.fail_width for rgb in images):
            raise MemoryError
        return [int(rgb.shape[1]) for rgb in images]


def _photos(folder: Path, widths: list[int]) -> list:
    folder.mkdir()
    for i, w in enumerate(widths):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((6, w, 3), i * 20, np.uint8))
    (folder / "99_broken.png").write_bytes(b"not a png")
    return scan_sources([str(folder)]).refs


@pytest.mark.parametrize(("workers", "batch_size"), [(2, 1), (2, 2), (0, 1)])
def test_results_come_in_input_order(tmp_path, workers, batch_size):
    widths = [5, 7, 9, 11, 13]
    refs = _photos(tmp_path / "in", widths)
    engine = LocalEngine(PredictConfig(decode_workers=workers, batch_size=batch_size))
    engine.segmenter = _Recorder()
    steps = list(engine.run(refs))
    assert [d for s in steps for d in s.detections] == widths
    assert [i.ref.rel_path for s in steps for i in s.images] == [f"{i:02d}.png" for i in range(len(widths))]
    assert [f.ref.rel_path for s in steps for f in s.failures] == ["99_broken.png"]
    expected = "maskseg-model" if workers else threading.current_thread().name
    assert all(name.startswith(expected) for name in engine.segmenter.threads)


def test_an_error_in_the_model_thread_reaches_the_caller(tmp_path):
    refs = _photos(tmp_path / "in", [5, 7, 9])
    engine = LocalEngine(PredictConfig(decode_workers=2))
    engine.segmenter = _Recorder(fail_width=7)
    results = engine.run(refs)
    assert next(results).detections == [5]
    with pytest.raises(MasksegError, match="out of memory"):
        next(results)


def test_a_run_abandoned_part_way_closes_cleanly(tmp_path):
    refs = _photos(tmp_path / "in", [5, 7, 9, 11])
    engine = LocalEngine(PredictConfig(decode_workers=2))
    engine.segmenter = _Recorder()
    results = engine.run(refs)
    assert next(results).detections == [5]
    results.close()  # as api.predict does when a run is interrupted
    for t in threading.enumerate():
        if t.name.startswith("maskseg-model"):
            t.join(10)
    # The next batch was submitted before the first result was handed over: it ran or was cancelled,
    # and nothing after it started.
    assert len(engine.segmenter.threads) in (1, 2)


class _SplitRecorder:
    """A stand-in segmenter whose work splits like Segmenter's: ``infer`` (the network) and ``finish``
    (the paste, per image); records the thread each part ran in."""

    def __init__(self) -> None:
        self.infer_threads: list[str] = []
        self.finish_threads: list[str] = []

    def infer(self, images):
        self.infer_threads.append(threading.current_thread().name)
        return [int(rgb.shape[1]) for rgb in images]

    def finish(self, raw, rgb):
        self.finish_threads.append(threading.current_thread().name)
        assert raw == rgb.shape[1]  # each raw result meets its own image
        return raw * 10

    def __call__(self, images):
        return [self.finish(raw, rgb) for raw, rgb in zip(self.infer(images), images, strict=True)]


@pytest.mark.parametrize(("workers", "batch_size"), [(2, 1), (2, 3), (0, 2)])
def test_masks_are_pasted_beside_the_writers_not_in_the_model_thread(tmp_path, workers, batch_size):
    widths = [5, 7, 9, 11, 13]
    refs = _photos(tmp_path / "in", widths)
    engine = LocalEngine(PredictConfig(decode_workers=workers, batch_size=batch_size))
    engine.segmenter = _SplitRecorder()
    steps = list(engine.run(refs))
    assert [d for s in steps for d in s.detections] == [10 * w for w in widths]
    caller = threading.current_thread().name
    model_thread = "maskseg-model" if workers else caller
    assert engine.segmenter.infer_threads and all(n.startswith(model_thread) for n in engine.segmenter.infer_threads)
    assert len(engine.segmenter.finish_threads) == len(widths)
    assert all(n == caller for n in engine.segmenter.finish_threads)


def test_prefetch_depth_is_one_in_a_tiled_run():
    from maskseg.config import TileConfig
    from maskseg.engine.local import prefetch_depth

    assert prefetch_depth(PredictConfig(prefetch=4)) == 4
    assert prefetch_depth(PredictConfig(prefetch=4, tile=TileConfig(size=1024))) == 1
    assert prefetch_depth(PredictConfig(prefetch=0, tile=TileConfig(size=1024))) == 0


@pytest.mark.parametrize("workers", [2, 0])
def test_a_tiled_run_decodes_at_most_one_image_ahead_of_the_model(tmp_path, monkeypatch, workers):
    """Each image of a tiled run may be huge: the one in the model plus the next, never a queue of them."""
    import maskseg.engine.local as local
    from maskseg.config import TileConfig

    refs = _photos(tmp_path / "in", [5, 7, 9, 11, 13, 15])
    decoded: list[str] = []
    real = local.decode_for_tiling

    def counting(ref, **kw):
        decoded.append(ref.rel_path)
        return real(ref, **kw)

    monkeypatch.setattr(local, "decode_for_tiling", counting)
    ahead: list[int] = []

    def segment(images):
        ahead.append(len(decoded) - seen[0] - len(images))
        seen[0] += len(images)
        return [int(rgb.shape[1]) for rgb in images]

    seen = [0]
    engine = LocalEngine(PredictConfig(decode_workers=workers, batch_size=1, tile=TileConfig(size=1024)))
    engine.segmenter = segment
    steps = list(engine.run(refs))
    assert [d for s in steps for d in s.detections] == [5, 7, 9, 11, 13, 15]
    assert max(ahead) <= (1 if workers else 0), ahead
