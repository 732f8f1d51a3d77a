"""Batches: decode failures travel with their batch; an image the model cannot take fails alone."""

from __future__ import annotations

import numpy as np
import pytest

from maskseg.batching import Failure, auto_batch_size, batched, prefetch, segment_batch
from maskseg.config import parse_batch_size
from maskseg.decode import DecodedImage
from maskseg.errors import DecodeError, MasksegError, UsageError
from maskseg.sources import ImageRef


def _image(name: str, width: int) -> DecodedImage:
    return DecodedImage(ImageRef(f"/in/{name}", name, name, 10, 20), np.zeros((4, width, 3), np.uint8), 11, 21)


def _model(images):
    """Like torchvision's resize on a 1-pixel-wide strip: any such image in the batch fails it."""
    if any(rgb.shape[1] == 1 for rgb in images):
        raise RuntimeError("Input and output sizes should be greater than 0\nmore detail")
    return [f"dets{rgb.shape[1]}" for rgb in images]


def test_a_failing_image_is_run_alone_and_reported():
    batch = [_image("a.png", 8), _image("strip.png", 1), _image("c.png", 9)]
    images, dets, failures = segment_batch(_model, batch)
    assert [d.ref.rel_path for d in images] == ["a.png", "c.png"] and dets == ["dets8", "dets9"]
    [f] = failures
    assert f.ref.rel_path == "strip.png" and (f.size, f.mtime_ns) == (11, 21)
    assert f.reason == "the model failed on this 1x4 image: Input and output sizes should be greater than 0"
    assert segment_batch(_model, []) == ([], [], [])


def test_out_of_memory_ends_the_run():
    def oom(images):
        raise MemoryError

    with pytest.raises(MasksegError, match="out of memory running the model on this 8x4 image"):
        segment_batch(oom, [_image("a.png", 8)])


def test_prefetch_keeps_order_and_turns_decode_errors_into_failures():
    refs = [ImageRef(f"/in/{i}.png", f"{i}.png", str(i), 1, 1) for i in range(7)]

    def decode(ref):
        if ref.rel_path in ("2.png", "5.png"):
            raise DecodeError(ref.path, "broken")
        return _image(ref.rel_path, 4)

    for workers in (0, 3):
        items = list(prefetch(refs, decode, workers=workers, depth=2))
        assert [i.ref.rel_path for i in items] == [r.rel_path for r in refs]
        assert [i.reason for i in items if isinstance(i, Failure)] == ["broken", "broken"]
        steps = list(batched(items, 2))
        assert [([d.ref.rel_path for d in imgs], [f.ref.rel_path for f in fails]) for imgs, fails in steps] == [
            (["0.png", "1.png"], []), (["3.png", "4.png"], ["2.png"]), (["6.png"], ["5.png"])]


def test_auto_batch_size_is_one_on_a_cpu_and_fits_a_gpu():
    gib = 2**30
    assert auto_batch_size("cpu") == auto_batch_size("cpu", 100 * gib) == 1
    assert auto_batch_size("cuda", None) == 1
    assert auto_batch_size("cuda", 2 * gib) == 1  # less than one image's share
    assert auto_batch_size("cuda", 9 * gib) == 3  # half of the free memory, 1.5 GiB an image
    assert auto_batch_size("cuda", 139 * gib) == 8  # capped


@pytest.mark.parametrize(("text", "value"), [("auto", None), ("AUTO", None), ("1", 1), ("16", 16)])
def test_batch_size_option(text, value):
    assert parse_batch_size(text) == value


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5", ""])
def test_bad_batch_size_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--batch-size"):
        parse_batch_size(text)


def test_batched_lets_go_of_an_image_before_the_next_is_decoded():
    import weakref

    class Image:  # stands for a DecodedImage: only the batch may hold it
        pass

    alive: list[weakref.ref] = []

    def decoded():
        for _ in range(3):
            # the consumer dropped the last batch: nothing may still hold its image while this one decodes
            assert [r() for r in alive if r() is not None] == []
            image = Image()
            alive.append(weakref.ref(image))
            yield image
            del image

    seen = 0
    for batch, _failures in batched(decoded(), 1):
        seen += len(batch)
        del batch
    assert seen == 3
