"""Pictures of ``inspect_image``'s stages: objectness per FPN level, proposals by level, the RoI-to-level
histogram, the 28x28 mask logits, the final overlay and, with targets, the anchors and mask targets
the losses see. Matplotlib's object API (no pyplot state) with the Agg canvas; written atomically."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes
from .records import StageOutputs

DPI = 100


def draw_all(out: StageOutputs, folder: str | Path, *, proposals: int = 100, masks: int = 16) -> list[Path]:
    """Write every picture of ``out`` into ``folder``; returns the paths written, in order."""
    folder = Path(folder)
    jobs: list[tuple[str, Callable[[], bytes]]] = [
        ("objectness.png", lambda: objectness_png(out)),
        ("proposals.png", lambda: proposals_png(out, proposals)),
        ("roi_levels.png", lambda: roi_levels_png(out)),
        ("mask_logits.png", lambda: mask_logits_png(out, masks)),
        ("overlay.jpg", lambda: overlay_jpg(out)),
    ]
    if out.targets is not None:
        jobs += [("targets_anchors.png", lambda: target_anchors_png(out)),
                 ("targets_masks.png", lambda: target_masks_png(out, masks))]
    written = []
    for name, make in jobs:
        path = folder / name
        atomic_write_bytes(path, make())
        written.append(path)
    return written


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _panel_size(out: StageOutputs, width: float) -> float:
    h, w = out.input.original_size
    return width * h / w


def _to_original(out: StageOutputs, boxes: np.ndarray) -> np.ndarray:
    """Boxes in the resized image -> original-image pixels (what resize_boxes does)."""
    (oh, ow), (rh, rw) = out.input.original_size, out.input.resized_size
    return np.asarray(boxes, np.float64) * np.array([ow / rw, oh / rh, ow / rw, oh / rh])


def _level_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def objectness_png(out: StageOutputs) -> bytes:
    """One panel per FPN level: the highest anchor objectness (sigmoid) at each location over the image."""
    import cv2
    import torch

    oh, ow = out.input.original_size
    rh, rw = out.input.resized_size
    ph, pw = out.input.padded_size
    n = len(out.levels) + 1
    cols = 3
    rows = (n + cols - 1) // cols
    fig = _figure(4.0 * cols, _panel_size(out, 4.0) * rows + 0.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    axes[0].imshow(out.rgb)
    axes[0].set_title(f"input {ow}x{oh} -> {rw}x{rh} (padded {pw}x{ph})", fontsize=9)
    for ax, lv in zip(axes[1:], out.levels, strict=False):
        logits = out.tensors[f"rpn/objectness/{lv.name}"][0]
        prob = torch.sigmoid(torch.from_numpy(logits)).amax(0).numpy()
        # the map covers the padded batch; stretch it there, crop the image's part, back to original size
        full = cv2.resize(prob, (pw, ph), interpolation=cv2.INTER_NEAREST)[:rh, :rw]
        heat = cv2.resize(full, (ow, oh), interpolation=cv2.INTER_NEAREST)
        ax.imshow(out.rgb)
        im = ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=float(prob.min()), vmax=float(prob.max()))
        fig.colorbar(im, ax=ax, shrink=0.7, format="%.3g")
        ax.set_title(f"{lv.name} (key '{lv.key}'): {lv.anchors_per_location}x{logits.shape[1]}x{logits.shape[2]}, "
                     f"stride {lv.stride}", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle("RPN objectness per FPN level: max over the anchors at each location (sigmoid)", fontsize=11)
    return _png(fig)


def proposals_png(out: StageOutputs, top: int = 100) -> bytes:
    """The top proposals (by objectness) over the image, coloured by the FPN level that proposed them."""
    from matplotlib.patches import Patch, Rectangle

    boxes = _to_original(out, out.tensors["proposals/boxes"][:top])
    levels = out.tensors["proposals/level"][:top]
    numbers = [int(lv.name[1:]) if lv.name[1:].isdigit() else i for i, lv in enumerate(out.levels)]
    colors = dict(zip(numbers, _level_colors(len(numbers)), strict=True))
    fig = _figure(9.0, _panel_size(out, 9.0) + 0.8)
    ax = fig.subplots()
    ax.imshow(out.rgb)
    for box, lvl in reversed(list(zip(boxes, levels, strict=True))):  # best drawn last, on top
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, ec=colors.get(int(lvl), "w")))
    handles = [Patch(color=colors[num], label=f"{lv.name}: {int((levels == num).sum())} shown, {lv.proposals} in all")
               for num, lv in zip(numbers, out.levels, strict=True)]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.8)
    oh, ow = out.input.original_size
    ax.set_xlim(0, ow)
    ax.set_ylim(oh, 0)
    ax.set_axis_off()
    total = out.stage("proposals").row("proposals").shape[0]
    ax.set_title(f"top {len(boxes)} of {total} proposals after NMS, coloured by the FPN level that proposed them",
                 fontsize=10)
    return _png(fig)


def roi_levels_png(out: StageOutputs) -> bytes:
    """Per FPN level: proposals it produced (RPN) and RoIs pooled from it (LevelMapper, FPN eq. 1)."""
    fig = _figure(7.0, 4.0)
    ax = fig.subplots()
    names = [lv.name for lv in out.levels]
    x = np.arange(len(names))
    proposed = [lv.proposals for lv in out.levels]
    pooled = [lv.rois for lv in out.levels]
    b1 = ax.bar(x - 0.2, proposed, 0.4, label="proposals from this RPN level")
    b2 = ax.bar(x + 0.2, pooled, 0.4, label="RoIs pooled from this level")
    ax.bar_label(b1, fontsize=8)
    ax.bar_label(b2, fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("count")
    facts = out.stage("box_head").facts
    k0, s0 = facts.get("canonical_level"), facts.get("canonical_scale")
    ax.set_title(f"RoI -> level: k = floor({k0} + log2(sqrt(wh) / {s0})), clamped to the pooled levels",
                 fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def mask_logits_png(out: StageOutputs, top: int = 16) -> bytes:
    """The chosen class's 28x28 mask logits of the top detections (red: inside, blue: outside)."""
    logits = out.tensors.get("mask/logits")
    labels = out.tensors["detections/labels"]
    scores = out.tensors["detections/scores"]
    k = 0 if logits is None else min(top, len(logits))
    cols = max(1, min(4, k))
    rows = max(1, (k + cols - 1) // cols)
    fig = _figure(2.4 * cols + 0.8, 2.4 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    if k == 0:
        axes[0].text(0.5, 0.5, "no detections", ha="center", va="center")
    im = None
    for i in range(k):
        chosen = logits[i, int(labels[i])]
        lim = float(np.abs(chosen).max()) or 1.0
        im = axes[i].imshow(chosen, cmap="RdBu_r", vmin=-lim, vmax=lim)
        name = out.label_names.get(int(labels[i]), str(int(labels[i])))
        axes[i].set_title(f"#{i} {name} {float(scores[i]):.2f}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.6, label="logit (0 = probability 0.5)")
    side = logits.shape[-1] if logits is not None else 28
    fig.suptitle(f"mask logits of the detected class, {side}x{side}, top {k} detections",
                 fontsize=10)
    return _png(fig)


def overlay_jpg(out: StageOutputs) -> bytes:
    """The final detections drawn as ``predict``'s overlay writer draws them."""
    import cv2

    from ..writers.overlay import draw_overlay

    canvas = draw_overlay(out.rgb, out.detections, out.category_names)
    ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding of the overlay failed")
    return buf.tobytes()


def target_anchors_png(out: StageOutputs) -> bytes:
    """Ground truth and the anchors the RPN loss sampled: positives (green boxes), negatives (red centres)."""
    from matplotlib.patches import Patch, Rectangle

    t = out.targets
    assert t is not None
    (oh, ow), (rh, rw) = t.original_size, t.resized_size
    scale = np.array([ow / rw, oh / rh, ow / rw, oh / rh])
    fig = _figure(9.0, 9.0 * oh / ow + 0.8)
    ax = fig.subplots()
    ax.imshow(out.rgb)

    def draw(boxes: np.ndarray, color: str, lw: float) -> None:
        for x0, y0, x1, y1 in np.asarray(boxes, np.float64) * scale:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=lw, ec=color))

    neg = np.asarray(t.anchors[t.rpn_sampled_neg], np.float64) * scale
    ax.scatter((neg[:, 0] + neg[:, 2]) / 2, (neg[:, 1] + neg[:, 3]) / 2, s=6, c="red", marker="x", lw=0.8)
    draw(t.anchors[t.rpn_sampled_pos], "lime", 1.0)
    draw(t.gt_boxes, "white", 2.0)
    c = t.counts
    ax.legend(handles=[
        Patch(facecolor="white", edgecolor="black", label=f"ground truth ({len(t.gt_boxes)})"),
        Patch(color="lime", label=f"sampled positives ({c['sampled_positive']} of {c['positive']})"),
        Patch(color="red", label=f"sampled negatives, centres ({c['sampled_negative']} of {c['negative']})"),
    ], loc="upper right", fontsize=8, framealpha=0.8)
    ax.set_xlim(0, ow)
    ax.set_ylim(oh, 0)
    ax.set_axis_off()
    ax.set_title(f"RPN targets: {c['positive']} positive, {c['negative']} negative, {c['ignored']} ignored anchors; "
                 f"{c['sampled_positive'] + c['sampled_negative']} sampled", fontsize=10)
    return _png(fig)


def target_masks_png(out: StageOutputs, top: int = 16) -> bytes:
    """The mask targets: ground-truth masks cropped to the positive RoIs and resized to 28x28."""
    t = out.targets
    assert t is not None
    masks = t.mask_targets
    labels = t.roi_labels[t.roi_labels > 0]
    k = min(top, len(masks))
    cols = max(1, min(4, k))
    rows = max(1, (k + cols - 1) // cols)
    fig = _figure(2.2 * cols, 2.2 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    if k == 0:
        axes[0].text(0.5, 0.5, "no positive RoIs", ha="center", va="center")
    for i in range(k):
        axes[i].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        label = int(labels[i]) if i < len(labels) else -1
        axes[i].set_title(f"RoI {i}: {out.label_names.get(label, label)}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"mask targets ({masks.shape[-1]}x{masks.shape[-1]}) of {k} of {len(masks)} positive RoIs",
                 fontsize=10)
    return _png(fig)
