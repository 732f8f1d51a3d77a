"""torch_backend.roi_pools: the sparse-product RoIAlign gives torchvision's (to float rounding), the threaded pool
gives it exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from maskseg.backends.torch_backend.optimize import prepare_for_inference
from maskseg.backends.torch_backend.roi_pools import (
    ParallelRoIPool,
    SparseRoIPool,
    pools_read_channels_last,
    sparse_roi_align,
    sparse_roi_align_available,
    split_boxes,
    to_nchw,
)


def _rois(n: int, seed: int, *, images: int, width: float, height: float) -> torch.Tensor:
    """[n, 5] RoIs of every kind: inside, crossing every edge, wholly outside, thinner than a pixel, points."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height])
    xy = torch.rand(n, 2, generator=g) * size * 1.3 - size * 0.15
    wh = torch.rand(n, 2, generator=g) * size * 0.6
    wh[: n // 5] *= 0.01  # far smaller than one feature-map pixel: many samples share their pixels
    wh[n // 5: n // 4] = 0.0
    batch = torch.randint(0, images, (n, 1), generator=g).float()
    return torch.cat([batch, xy, xy + wh], 1)


def test_this_build_passes_the_load_time_check():
    assert sparse_roi_align_available()


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(("output_size", "sampling_ratio", "scale"), [((7, 7), 2, 0.25), ((14, 14), 2, 0.125),
                                                                       ((5, 3), 1, 0.5), ((7, 7), 3, 1 / 32)])
def test_sparse_roi_align_equals_torchvision(channels_last, output_size, sampling_ratio, scale):
    torch.manual_seed(0)
    features = torch.randn(3, 16, 23, 37)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    rois = _rois(300, 1, images=3, width=37 / scale, height=23 / scale)
    with torch.inference_mode():
        ref = roi_align(features.contiguous(), rois, output_size, scale, sampling_ratio, aligned=False)
        out = sparse_roi_align(features, rois, output_size, scale, sampling_ratio)
    assert out.shape == ref.shape == (300, 16, *output_size)
    assert ref.abs().amax(dim=(1, 2, 3)).gt(0).sum() > 200  # most RoIs pool something
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_no_rois_gives_an_empty_result():
    out = sparse_roi_align(torch.randn(1, 4, 8, 8), torch.zeros(0, 5), (7, 7), 0.25, 2)
    assert out.shape == (0, 4, 7, 7)


def _pyramid(channels_last: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: torch.randn(2, 8, s, s * 3 // 2).contiguous(memory_format=fmt)
            for k, s in (("0", 64), ("1", 32), ("2", 16), ("3", 8), ("pool", 4))}


@pytest.mark.parametrize("channels_last", [True, False])
def test_sparse_pool_equals_multiscale_roi_align(channels_last):
    x = _pyramid(channels_last)
    g = torch.Generator().manual_seed(5)
    boxes = []
    for n in (180, 0, 60):  # the middle image has no RoIs
        xy = torch.rand(n, 2, generator=g) * torch.tensor([300.0, 200.0])
        boxes.append(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 250 + 1], 1))
    x = {k: torch.cat([v, v[:1]]) for k, v in x.items()}  # three images
    shapes = [(256, 384), (250, 370), (240, 380)]
    plain = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
    sparse = SparseRoIPool(MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2))
    with torch.inference_mode():
        ref = plain(x, boxes, shapes)
        out = sparse(x, boxes, shapes)
    levels = plain.map_levels(boxes)
    assert len(levels.unique()) >= 3  # the RoIs reach several levels
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sparse_pool_leaves_gradients_and_adaptive_sampling_to_torchvision():
    x = _pyramid(False)
    boxes = [torch.tensor([[10.0, 10.0, 90.0, 70.0]]), torch.tensor([[0.0, 0.0, 300.0, 200.0]])]
    shapes = [(256, 384)] * 2
    adaptive = SparseRoIPool(MultiScaleRoIAlign(["0", "1"], 7, 0))
    assert torch.equal(adaptive(x, boxes, shapes), MultiScaleRoIAlign(["0", "1"], 7, 0)(x, boxes, shapes))
    feats = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    SparseRoIPool(MultiScaleRoIAlign(["0", "1"], 7, 2))(feats, boxes, shapes).sum().backward()
    assert feats["0"].grad is not None and feats["0"].grad.abs().sum() > 0


def test_prepare_for_inference_uses_the_sparse_pools(tiny_model):
    model = copy.deepcopy(tiny_model)  # the fixture is shared; the rewrites change a module in place
    applied = prepare_for_inference(model, torch.device("cpu"))
    assert "RoIAlign as sparse products" in applied
    assert isinstance(model.roi_heads.box_roi_pool, SparseRoIPool)
    assert isinstance(model.roi_heads.mask_roi_pool, SparseRoIPool)
    assert pools_read_channels_last(model.roi_heads)


# ---- torchvision's kernel over threads

def test_to_nchw_is_an_exact_copy():
    t = torch.randn(2, 16, 7, 9).contiguous(memory_format=torch.channels_last)
    out = to_nchw(t)
    assert out.is_contiguous() and torch.equal(out, t)
    plain = torch.randn(1, 3, 4, 5)
    assert to_nchw(plain) is plain


def _levels(channels_last: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: torch.randn(2, 8, s, s * 3 // 2).contiguous(memory_format=fmt)
            for k, s in (("0", 64), ("1", 32), ("2", 16), ("3", 8))}


def _boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([300.0, 200.0])
    wh = torch.rand(n, 2, generator=g) * 150 + 2
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_parallel_roi_pool_equals_the_plain_pool_exactly(channels_last):
    x = _levels(channels_last)
    boxes = [_boxes(150, 1), _boxes(77, 2)]
    shapes = [(256, 384), (240, 380)]
    plain = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    parallel = ParallelRoIPool(MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), threads=3)
    with torch.inference_mode():
        ref = plain(x, boxes, shapes)
        first = parallel(x, boxes, shapes)  # sets the scales, in one piece
        second = parallel(x, boxes, shapes)  # split across threads
        few = parallel(x, [boxes[0][:5], boxes[1][:3]], shapes)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert torch.equal(few, torch.cat([ref[:5], ref[150:153]]))


def test_split_boxes_keeps_every_box_once_in_order():
    boxes = [torch.arange(7.0)[:, None].repeat(1, 4), torch.zeros(0, 4), torch.arange(3.0)[:, None].repeat(1, 4)]
    parts = split_boxes(boxes, 3)
    for i, b in enumerate(boxes):
        assert torch.equal(torch.cat([parts[k][i] for k in range(3)]), b)
