"""Decoded images -> batches, with decoding running in worker threads ahead of the model.

Pillow and NumPy release the GIL while decoding and converting, so threads overlap decoding with the
model's forward pass without the memory cost of worker processes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .decode import DecodedImage
from .errors import DecodeError, MasksegError, ModelOutputError, UndecodableError
from .sources import ImageRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """An image that could not be used, with the reason in words; ``size``/``mtime_ns`` are the file's
    when it was read (None: as scanned, e.g. it vanished or changed while being read)."""

    ref: ImageRef
    reason: str
    size: int | None = None
    mtime_ns: int | None = None


def prefetch(
    refs: Iterable[ImageRef],
    decode: Callable[[ImageRef], DecodedImage],
    *,
    workers: int = 2,
    depth: int = 4,
) -> Iterator[DecodedImage | Failure]:
    """Decode ``refs`` in ``workers`` threads, keeping up to ``depth`` images ready; yields in input order.

    A ``DecodeError`` becomes a ``Failure``; any other exception in a decoder is a bug and propagates.
    """
    if workers <= 0:
        for ref in refs:
            yield decode_or_failure(decode, ref)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="maskseg-decode") as pool:
        pending: deque[Future[DecodedImage | Failure]] = deque()
        it = iter(refs)
        try:
            for ref in it:
                pending.append(pool.submit(decode_or_failure, decode, ref))
                if len(pending) >= max(depth, 1):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def decode_or_failure(decode: Callable[[ImageRef], DecodedImage], ref: ImageRef) -> DecodedImage | Failure:
    try:
        return decode(ref)
    except UndecodableError as exc:
        return Failure(ref, exc.reason, exc.size, exc.mtime_ns)
    except DecodeError as exc:
        return Failure(ref, exc.reason)
    except MemoryError:
        return Failure(ref, "out of memory while decoding")


def batched(
    items: Iterable[DecodedImage | Failure], batch_size: int
) -> Iterator[tuple[list[DecodedImage], list[Failure]]]:
    """Group decoded images into batches of ``batch_size``; failures travel with the batch they met."""
    images: list[DecodedImage] = []
    failures: list[Failure] = []
    for item in items:
        if isinstance(item, Failure):
            failures.append(item)
            continue
        images.append(item)
        # Let go of it here: the loop variable would otherwise keep this image alive (48 MiB at 4096 x 4096)
        # while ``next(items)`` decodes the one after it, long after the consumer dropped its batch.
        del item
        if len(images) >= batch_size:
            yield images, failures
            images, failures = [], []
    if images or failures:
        yield images, failures


def segment_batch(
    segment: Callable[[list[Any]], Sequence[Any]], images: list[DecodedImage]
) -> tuple[list[DecodedImage], list[Any], list[Failure]]:
    """Run ``segment`` (RGB arrays -> Detections) on a batch; returns (images, detections, failures).

    When the batch raises, each image is run alone, so one image the model cannot take (a 1x4000 strip
    that its resize shrinks to 0 pixels) becomes a ``Failure`` with the model's reason instead of ending
    the run. Running out of memory on a single image is not that image's fault: it ends the run with a
    ``MasksegError`` (exit 1) and the image is retried next time.
    """
    if not images:
        return [], [], []
    try:
        return images, list(segment([d.rgb for d in images])), []
    except ModelOutputError:  # the model's outputs are misread, not this image's fault: every image would be
        raise
    except Exception as exc:
        if len(images) == 1:
            return [], [], [_model_failure(images[0], exc)]
        log.debug("the model failed on a batch of %d (%s); trying each image alone", len(images), exc)
    kept: list[DecodedImage] = []
    detections: list[Any] = []
    failures: list[Failure] = []
    for image in images:
        try:
            [dets] = segment([image.rgb])
        except ModelOutputError:
            raise
        except Exception as exc:
            failures.append(_model_failure(image, exc))
            continue
        kept.append(image)
        detections.append(dets)
    return kept, detections, failures


def _model_failure(image: DecodedImage, exc: Exception) -> Failure:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text:
        raise MasksegError(f"{image.ref.path}: out of memory running the model on this {image.width}x{image.height} "
                           f"image ({text}); try a smaller --batch-size or --max-size") from None
    return Failure(image.ref, f"the model failed on this {image.width}x{image.height} image: {text}", image.size,
                   image.mtime_ns)


GPU_BYTES_PER_IMAGE = 3 * 2**29  # 1.5 GiB: ResNet-50 FPN inference at 800x1333 in fp32, with headroom
MAX_AUTO_BATCH = 8


def auto_batch_size(device_type: str, free_bytes: int | None = None) -> int:
    """What ``--batch-size auto`` takes: 1 on a CPU (batches of 2-4 ran 4-15% slower on 2 cores: images
    are padded to a common size and the cores are busy anyway); on a CUDA GPU as many images as half of
    its ``free_bytes`` holds at ``GPU_BYTES_PER_IMAGE`` each, from 1 to ``MAX_AUTO_BATCH``. A batch that
    runs out of memory anyway is redone one image at a time (``segment_batch``)."""
    if device_type != "cuda" or not free_bytes:
        return 1
    return max(1, min(MAX_AUTO_BATCH, free_bytes // 2 // GPU_BYTES_PER_IMAGE))
