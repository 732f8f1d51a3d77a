"""Raw network outputs -> Detections: labels filtered, masks pasted per box, all on the CPU at the end.

torchvision's ``paste_masks_in_image`` builds an [N, H, W] float tensor (100 masks on a 12 MP image is
about 4.8 GB). Here each M x M mask is resized only to its own box, with torchvision's exact
expand/round/interpolate steps, thresholded, and kept box-local: same pixels, a tiny fraction of the
memory and time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends import RawDetections
from .detections import BoxMask, Detections


def paste_box_local(masks: Any, boxes: Any, image_size: tuple[int, int], mask_thresh: float) -> list[BoxMask]:
    """Threshold each mask inside its box, as ``paste_masks_in_image(masks, boxes) > mask_thresh`` would.

    masks: [N, 1, M, M] float probabilities (torchvision's "roi" layout); boxes: [N, 4] float XYXY pixels
    in the image of ``image_size`` (height, width). Returns N BoxMask, each clipped to the image.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    if len(masks) == 0:
        return []
    im_h, im_w = image_size
    padded, scale = expand_masks(masks, padding=1)
    int_boxes = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()
    out = []
    for mask, (bx0, by0, bx1, by1) in zip(padded, int_boxes, strict=True):
        w = max(bx1 - bx0 + 1, 1)
        h = max(by1 - by0 + 1, 1)
        x0, x1 = max(bx0, 0), min(bx1 + 1, im_w)
        y0, y1 = max(by0, 0), min(by1 + 1, im_h)
        if x1 <= x0 or y1 <= y0:
            out.append(_empty(x0, y0, image_size))
            continue
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        local = resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] > mask_thresh
        out.append(BoxMask(x0, y0, local.cpu().numpy(), image_size))
    return out


def paste_box_exact(masks: Any, boxes: Any, image_size: tuple[int, int], mask_thresh: float) -> list[BoxMask]:
    """Threshold masks that cover exactly their box (the "box" layout of TF's ``detection_masks``).

    masks: [N, M, M] float probabilities; boxes: [N, 4] float XYXY pixels. Each pixel centre inside the
    box samples the mask bilinearly (``grid_sample``, align_corners=False, edges clamped), so an M x M mask stretches
    over the box edge to edge. Returns N BoxMask, each clipped to the image.
    """
    import torch
    import torch.nn.functional as F

    masks = torch.as_tensor(masks, dtype=torch.float32)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    im_h, im_w = image_size
    out = []
    for mask, (bx0, by0, bx1, by1) in zip(masks, boxes.tolist(), strict=True):
        x0, x1 = max(int(np.floor(bx0)), 0), min(int(np.ceil(bx1)), im_w)
        y0, y1 = max(int(np.floor(by0)), 0), min(int(np.ceil(by1)), im_h)
        if x1 <= x0 or y1 <= y0 or bx1 <= bx0 or by1 <= by0:
            out.append(_empty(x0, y0, image_size))
            continue
        xs = (torch.arange(x0, x1, dtype=torch.float32) + 0.5 - bx0) / (bx1 - bx0) * 2 - 1
        ys = (torch.arange(y0, y1, dtype=torch.float32) + 0.5 - by0) / (by1 - by0) * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx, gy), dim=-1)[None]
        sampled = F.grid_sample(mask[None, None], grid, mode="bilinear", padding_mode="border",
                                align_corners=False)[0, 0]
        out.append(BoxMask(x0, y0, (sampled > mask_thresh).numpy(), image_size))
    return out


def crop_full_masks(masks: Any, boxes: Any, image_size: tuple[int, int], mask_thresh: float) -> list[BoxMask]:
    """Threshold full-image masks ([N, H, W] probabilities, the "image" layout) and keep each only over
    its box (XYXY pixels, rounded outwards), so it is stored box-local like the other layouts."""
    import torch

    masks = torch.as_tensor(masks)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    im_h, im_w = image_size
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (im_h, im_w):
        raise ValueError(f"full-image masks must be [N, {im_h}, {im_w}], got {list(masks.shape)}")
    out = []
    for mask, (bx0, by0, bx1, by1) in zip(masks, boxes.tolist(), strict=True):
        x0, x1 = max(int(np.floor(bx0)), 0), min(int(np.ceil(bx1)), im_w)
        y0, y1 = max(int(np.floor(by0)), 0), min(int(np.ceil(by1)), im_h)
        if x1 <= x0 or y1 <= y0:
            out.append(_empty(x0, y0, image_size))
            continue
        out.append(BoxMask(x0, y0, (mask[y0:y1, x0:x1] > mask_thresh).cpu().numpy(), image_size))
    return out


def clip_boxes(boxes: Any, image_size: tuple[int, int]) -> Any:
    """[N, 4] XYXY float tensor clipped to an image of ``image_size`` (height, width); a new tensor."""
    height, width = image_size
    clipped = boxes.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    return clipped


def _empty(x0: int, y0: int, image_size: tuple[int, int]) -> BoxMask:
    im_h, im_w = image_size
    return BoxMask(min(max(x0, 0), im_w), min(max(y0, 0), im_h), np.zeros((0, 0), bool), image_size)


def raw_to_detections(
    raw: RawDetections,
    image_size: tuple[int, int],
    *,
    mask_thresh: float,
    keep_labels: set[int] | None = None,
) -> Detections:
    """One image's ``RawDetections`` (boxes already in original pixels) -> Detections.

    ``image_size`` is the original (height, width); ``keep_labels`` drops every other model label.
    Labels stay model label ids (the Segmenter maps them to category ids).
    """
    import torch

    boxes = torch.as_tensor(raw.boxes).float()
    scores = torch.as_tensor(raw.scores).float()
    labels = torch.as_tensor(raw.labels).to(torch.int64)
    masks = torch.as_tensor(raw.masks).float() if raw.masks is not None else None
    if keep_labels is not None:
        keep = torch_isin(labels, keep_labels)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        masks = masks[keep] if masks is not None else None
    pasted = None
    if masks is not None:  # onto the whole box: a box clipped first would squeeze its mask
        if raw.mask_layout == "roi":
            pasted = paste_box_local(masks[:, None], boxes, image_size, mask_thresh)
        elif raw.mask_layout == "box":
            pasted = paste_box_exact(masks.cpu(), boxes.cpu(), image_size, mask_thresh)
        else:
            pasted = crop_full_masks(masks, boxes, image_size, mask_thresh)
    boxes = clip_boxes(boxes, image_size)
    return Detections(
        boxes=boxes.detach().float().cpu().numpy().reshape(-1, 4),
        scores=scores.detach().float().cpu().numpy(),
        labels=labels.detach().cpu().numpy().astype(np.int64),
        masks=tuple(pasted) if pasted is not None else None,
        image_size=image_size,
    )


def to_detections(
    raw: dict[str, Any],
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
    *,
    mask_thresh: float,
    keep_labels: set[int] | None = None,
) -> Detections:
    """One image's torchvision ``roi_heads`` output -> Detections in original-image pixels.

    raw: ``boxes`` [N, 4] XYXY in the resized image, ``scores`` [N], ``labels`` [N], ``masks``
    [N, 1, 28, 28] probabilities (optional). Sizes are (height, width).
    """
    from torchvision.models.detection.transform import resize_boxes

    masks = raw.get("masks")
    converted = RawDetections(resize_boxes(raw["boxes"], resized_size, original_size), raw["scores"],
                              raw["labels"], masks[:, 0] if masks is not None else None, "roi")
    return raw_to_detections(converted, original_size, mask_thresh=mask_thresh, keep_labels=keep_labels)


def mask_iou(a: BoxMask, b: BoxMask) -> float:
    """IoU of two box-local masks, computed on the intersection of their boxes only (no full-image arrays)."""
    (ah, aw), (bh, bw) = a.bitmap.shape, b.bitmap.shape
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1, y1 = min(a.x0 + aw, b.x0 + bw), min(a.y0 + ah, b.y0 + bh)
    inter = 0
    if x1 > x0 and y1 > y0:
        inter = int(np.count_nonzero(a.bitmap[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
                                     & b.bitmap[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]))
    union = a.area + b.area - inter
    return inter / union if union else 0.0


def agnostic_nms(dets: Detections, iou_thresh: float) -> Detections:
    """Drop every detection whose mask overlaps a kept, higher-scoring detection of another class by
    mask IoU >= ``iou_thresh`` (box IoU for box-only models); same-class overlaps are the model's NMS's
    business and are left as they are. Greedy in score order, like torchvision's ``batched_nms``."""
    n = len(dets)
    if n < 2:
        return dets
    order = np.argsort(-dets.scores, kind="stable")
    kept: list[int] = []
    for i in order.tolist():
        for j in kept:
            if dets.labels[j] == dets.labels[i]:
                continue
            if dets.masks is not None:
                overlap = mask_iou(dets.masks[i], dets.masks[j])
            else:
                overlap = _box_iou(dets.boxes[i], dets.boxes[j])
            if overlap >= iou_thresh:
                break
        else:
            kept.append(i)
    if len(kept) == n:
        return dets
    return dets[np.sort(np.array(kept, dtype=np.int64))]


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    h = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    inter = w * h
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def torch_isin(labels: Any, allowed: set[int]) -> Any:
    """Bool mask of ``labels`` (int64 tensor) that are in ``allowed``."""
    import torch

    return torch.isin(labels, torch.tensor(sorted(allowed), dtype=labels.dtype, device=labels.device))
