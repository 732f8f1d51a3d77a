"""Parity: maskseg's Segmenter gives what torchvision's own ``model(images)`` gives, masks included.

The Segmenter runs the module after ``torch_backend.optimize``'s rewrites (BN folded, fused convs, threaded
RoIAlign); the reference is the plain torchvision module with the same weights (``load_model``), so
the tolerances cover float rounding of the rewrites too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskseg.config import ModelConfig
from maskseg.decode import decode_bytes
from maskseg.models import load_model
from maskseg.segmenter import Segmenter

from .conftest import SAMPLES


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize("name", ["chelsea.png", "rocket.jpg", "fruits_nuts/7.jpg"])
def test_parity_with_torchvision_at_batch_size_one(tiny_checkpoint, name):
    config = ModelConfig(weights=str(tiny_checkpoint), device="cpu")
    seg = Segmenter(config, mask_thresh=0.5)
    assert seg.model.extra["optimizations"]  # the rewrites under test were applied
    plain = load_model(config).module
    rgb = decode_bytes((SAMPLES / name).read_bytes(), name)
    [ours] = seg([rgb])
    with torch.inference_mode():
        ref = plain([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255])[0]
    assert len(ours) == len(ref["scores"]) > 0
    np.testing.assert_allclose(ours.boxes, ref["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(ours.scores, ref["scores"].numpy(), atol=1e-5)
    assert ours.labels.tolist() == ref["labels"].tolist()
    full = (ref["masks"][:, 0] > 0.5).numpy()
    ious = [_iou(m.full(), full[i]) for i, m in enumerate(ours.masks)]
    assert min(ious) >= 0.98
    assert all(m.full().shape == rgb.shape[:2] for m in ours.masks)


def test_batches_give_one_result_per_image_in_order(tiny_checkpoint):
    seg = Segmenter(ModelConfig(weights=str(tiny_checkpoint), device="cpu"))
    a = decode_bytes((SAMPLES / "chelsea.png").read_bytes(), "a")
    b = decode_bytes((SAMPLES / "coins.png").read_bytes(), "b")
    out = seg([a, b])
    assert [d.image_size for d in out] == [a.shape[:2], b.shape[:2]]


def test_class_filter_and_unknown_class(tiny_checkpoint):
    from maskseg.errors import UsageError

    cfg = ModelConfig(weights=str(tiny_checkpoint), device="cpu")
    rgb = decode_bytes((SAMPLES / "chelsea.png").read_bytes(), "x")
    everything = Segmenter(cfg)([rgb])[0]
    present = {int(x) for x in everything.labels}
    names = {1: "date", 2: "fig", 3: "hazelnut"}
    keep = sorted(present)[0]
    only = Segmenter(cfg, classes=[names[keep].upper()])([rgb])[0]
    assert len(only) == int((everything.labels == keep).sum())
    assert set(only.labels.tolist()) <= {keep}
    with pytest.raises(UsageError, match="unknown class zebra"):
        Segmenter(cfg, classes=["zebra"])
