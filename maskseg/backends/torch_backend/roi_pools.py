"""Faster RoI pools for Mask R-CNN on the CPU, each giving what torchvision's ``MultiScaleRoIAlign`` gives.

``SparseRoIPool``: RoIAlign as one sparse-matrix product per pyramid level, over channels_last features.

torchvision's CPU ``roi_align`` kernel runs on one core and reads NCHW planes one channel at a time
(about 0.38 s for Mask R-CNN's 1000 box RoIs on the finest level here). RoIAlign is linear in the
features: every output bin is a fixed weighted sum of at most 4 samples x 4 neighbouring pixels. So
the weights go into a sparse matrix S [RoIs * bins, H * W] and the pooled features are
``S @ features`` with the features viewed as [H * W, C] (what channels_last memory already is): MKL's
multithreaded sparse x dense product, about 6x faster on 2 cores, with no NCHW copy of the pyramid.

The sample positions and weights are computed exactly as torchvision's kernel computes them
(``aligned=False``, a fixed ``sampling_ratio``, float32); only the order of the final additions
differs, so the results agree to float rounding (checked at load by ``sparse_roi_align_available``).

``ParallelRoIPool``, where that check fails: torchvision's kernel with the RoIs split across threads (each
RoI is pooled alone, so the result is the same tensor); ``to_nchw`` gives it NCHW maps fast.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _setup_scales  # the level scales MultiScaleRoIAlign sets on its first call


def _axis(v: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """torchvision's bilinear_interpolate along one axis: (in range, low index, high index, low weight,
    high weight) of sample coordinates ``v``, clamped at the map's edges as the kernel clamps them."""
    inside = (v >= -1.0) & (v <= size)
    v = v.clamp(min=0.0)
    low = v.long()  # v >= 0: truncation is floor, as the kernel's (int) cast
    at_edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_edge, low, low + 1)
    v = torch.where(at_edge, low.to(v.dtype), v)
    frac = v - low
    return inside, low, high, 1.0 - frac, frac


def sparse_roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int],
                     spatial_scale: float, sampling_ratio: int) -> torch.Tensor:
    """``torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio,
    aligned=False)`` for float32 CPU tensors and ``sampling_ratio > 0``.

    ``features`` [N, C, H, W] (channels_last avoids a copy); ``rois`` [K, 5] (batch index, x1, y1, x2, y2)
    in image pixels. Returns [K, C, PH, PW].
    """
    n, c, h, w = features.shape
    ph, pw = output_size
    k, sr = len(rois), sampling_ratio
    if k == 0:
        return features.new_zeros((0, c, ph, pw))
    batch = rois[:, 0].long()
    x1, y1 = rois[:, 1] * spatial_scale, rois[:, 2] * spatial_scale
    roi_w = (rois[:, 3] * spatial_scale - x1).clamp(min=1.0)
    roi_h = (rois[:, 4] * spatial_scale - y1).clamp(min=1.0)
    bin_w, bin_h = (roi_w / pw)[:, None, None], (roi_h / ph)[:, None, None]
    grid = (torch.arange(sr, dtype=features.dtype) + 0.5)[None, None, :]
    # Sample coordinates [K, bins, samples], in the kernel's order of operations.
    ys = y1[:, None, None] + torch.arange(ph, dtype=features.dtype)[None, :, None] * bin_h + grid * bin_h / sr
    xs = x1[:, None, None] + torch.arange(pw, dtype=features.dtype)[None, :, None] * bin_w + grid * bin_w / sr
    y_in, y_lo, y_hi, y_wlo, y_whi = _axis(ys, h)
    x_in, x_lo, x_hi, x_wlo, x_whi = _axis(xs, w)

    def rows(t: torch.Tensor) -> torch.Tensor:  # [K, PH, sy] -> [K, PH, 1, sy, 1]
        return t[:, :, None, :, None]

    def cols(t: torch.Tensor) -> torch.Tensor:  # [K, PW, sx] -> [K, 1, PW, 1, sx]
        return t[:, None, :, None, :]

    inside = (rows(y_in) & cols(x_in)).to(features.dtype) / (sr * sr)  # the kernel's "/ count", exact for 2x2
    weights = torch.stack([rows(y_wlo) * cols(x_wlo), rows(y_wlo) * cols(x_whi),
                           rows(y_whi) * cols(x_wlo), rows(y_whi) * cols(x_whi)], -1) * inside[..., None]
    base = (batch * (h * w))[:, None, None, None, None]
    pixels = torch.stack([rows(y_lo) * w + cols(x_lo), rows(y_lo) * w + cols(x_hi),
                          rows(y_hi) * w + cols(x_lo), rows(y_hi) * w + cols(x_hi)], -1) + base[..., None]
    per_bin = sr * sr * 4
    matrix = torch.sparse_csr_tensor(
        torch.arange(0, k * ph * pw * per_bin + 1, per_bin), pixels.reshape(-1), weights.reshape(-1),
        size=(k * ph * pw, n * h * w), check_invariants=False)  # repeated columns (edges, tiny RoIs) are summed
    pooled = matrix @ features.permute(0, 2, 3, 1).reshape(n * h * w, c)  # [K * PH * PW, C]
    return pooled.view(k, ph, pw, c).permute(0, 3, 1, 2)


class SparseRoIPool(nn.Module):
    """A ``MultiScaleRoIAlign`` (same levels, same RoI-to-level mapping) pooling with ``sparse_roi_align``.

    It reads the features in whatever layout they come; channels_last (the backbone's, here) is free.
    Gradients, other devices or dtypes, and adaptive sampling take the wrapped pool.
    """

    reads_channels_last = True

    def __init__(self, pool: MultiScaleRoIAlign) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        pool = self.pool
        feats = [v for k, v in x.items() if k in pool.featmap_names]
        first = feats[0]
        if (first.device.type != "cpu" or first.dtype != torch.float32 or pool.sampling_ratio <= 0
                or torch.is_grad_enabled()):
            return pool(x, boxes, image_shapes)
        if pool.scales is None or pool.map_levels is None:
            pool.scales, pool.map_levels = _setup_scales(feats, image_shapes, pool.canonical_scale,
                                                         pool.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        if len(feats) == 1:
            return sparse_roi_align(first, rois, pool.output_size, pool.scales[0], pool.sampling_ratio)
        levels = pool.map_levels(boxes)
        result = first.new_zeros((len(rois), first.shape[1], *pool.output_size))
        for level, (feature, scale) in enumerate(zip(feats, pool.scales, strict=True)):
            index = torch.where(levels == level)[0]
            if len(index):
                result[index] = sparse_roi_align(feature, rois[index], pool.output_size, scale, pool.sampling_ratio)
        return result


def sparse_roi_align_available() -> bool:
    """Whether this torch build's sparse product gives torchvision's RoIAlign on a small case with RoIs
    crossing the edges, smaller than a pixel and in two images (repeated columns included)."""
    try:
        gen = torch.Generator().manual_seed(0)
        feats = torch.randn(2, 8, 9, 11, generator=gen).contiguous(memory_format=torch.channels_last)
        xy = torch.rand(40, 2, generator=gen) * 60 - 8
        wh = torch.rand(40, 2, generator=gen) * 30
        wh[:10] *= 0.02
        rois = torch.cat([(torch.arange(40) % 2)[:, None].float(), xy, xy + wh], 1)
        with torch.inference_mode(), warnings.catch_warnings():
            # torch warns once per process that sparse CSR is "beta": said here, where it is checked.
            warnings.simplefilter("ignore", UserWarning)
            ref = roi_align(feats.contiguous(), rois, (7, 7), 0.25, 2, aligned=False)
            out = sparse_roi_align(feats, rois, (7, 7), 0.25, 2)
        return bool(torch.allclose(out, ref, atol=1e-5, rtol=1e-5))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


# ---- torchvision's kernel over threads ------------------------------------------------------------------------

def to_nchw(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] tensor in any memory layout -> contiguous NCHW with the same values.

    For channels_last float32 on the CPU this uses OpenCV's blocked 2-D transpose: torch's strided copy
    for that layout ran about 10x slower here (476 vs 43 ms for a 256 x 192 x 336 map).
    """
    if (t.is_contiguous() or t.device.type != "cpu" or t.dtype != torch.float32 or t.ndim != 4
            or not t.is_contiguous(memory_format=torch.channels_last)):
        return t.contiguous()
    import cv2

    n, c, h, w = t.shape
    nhwc = t.permute(0, 2, 3, 1).numpy()  # a view: channels_last memory is NHWC
    out = torch.empty((n, c, h, w), dtype=t.dtype)
    dst = out.numpy().reshape(n, c, h * w)
    for i in range(n):
        dst[i] = cv2.transpose(nhwc[i].reshape(h * w, c))
    return out


def split_boxes(boxes: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """Each image's boxes cut into ``parts`` consecutive chunks: ``parts`` lists of one tensor per image."""
    out: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    for b in boxes:
        bounds = [len(b) * k // parts for k in range(parts + 1)]
        for k in range(parts):
            out[k].append(b[bounds[k]:bounds[k + 1]])
    return out


class ParallelRoIPool(nn.Module):
    """A ``MultiScaleRoIAlign`` whose RoIs are pooled in up to ``threads`` chunks at once.

    The features are made NCHW once (the kernel would copy each level again on every call); the rows
    are put back in the original order, so the result is the tensor the wrapped pool gives.
    """

    min_rois_per_thread = 32

    def __init__(self, pool: MultiScaleRoIAlign, threads: int) -> None:
        super().__init__()
        self.pool = pool
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        x = {k: to_nchw(v) for k, v in x.items()}
        parts = min(self.threads, sum(len(b) for b in boxes) // self.min_rois_per_thread)
        # The first call sets the pool's scales; it runs alone so no two threads set them at once.
        if parts <= 1 or self.pool.scales is None or torch.is_grad_enabled():
            return self.pool(x, boxes, image_shapes)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="maskseg-roialign")
        chunks = split_boxes(boxes, parts)
        results = [f.result() for f in [self._executor.submit(self._pool, x, c, image_shapes) for c in chunks]]
        pieces = []
        for i in range(len(boxes)):  # image i's rows: its chunk from each part, in order
            for k in range(parts):
                start = sum(len(b) for b in chunks[k][:i])
                pieces.append(results[k][start:start + len(chunks[k][i])])
        return torch.cat(pieces)

    def _pool(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
              image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        with torch.inference_mode():  # grad mode is per thread
            return self.pool(x, boxes, image_shapes)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_executor"] = None
        return state


def use_fast_roi_pools(module: nn.Module, threads: int) -> str | None:
    """Replace ``roi_heads``' torchvision pools by ``SparseRoIPool`` where this torch build's sparse
    product checks out, else by ``ParallelRoIPool``; returns what was done, in words (None: nothing)."""
    roi_heads = getattr(module, "roi_heads", None)
    names = [n for n in ("box_roi_pool", "mask_roi_pool") if type(getattr(roi_heads, n, None)) is MultiScaleRoIAlign]
    if not names:
        return None
    if sparse_roi_align_available():
        for name in names:
            setattr(roi_heads, name, SparseRoIPool(getattr(roi_heads, name)))
        return "RoIAlign as sparse products"
    use_parallel_roi_pools(module, threads)
    return f"RoIAlign on {threads} threads"


def pools_read_channels_last(roi_heads: nn.Module) -> bool:
    """Whether every RoI pool of ``roi_heads`` reads channels_last features without an NCHW copy."""
    pools = [getattr(roi_heads, n, None) for n in ("box_roi_pool", "mask_roi_pool")]
    return all(getattr(p, "reads_channels_last", False) for p in pools if p is not None)


def use_parallel_roi_pools(module: nn.Module, threads: int) -> int:
    """Wrap ``roi_heads``' box and mask pools in ``ParallelRoIPool``; returns how many were wrapped."""
    roi_heads = getattr(module, "roi_heads", None)
    count = 0
    for name in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(roi_heads, name, None)
        if type(pool) is MultiScaleRoIAlign:
            setattr(roi_heads, name, ParallelRoIPool(pool, max(int(threads), 1)))
            count += 1
    return count
