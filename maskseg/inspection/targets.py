"""``maskseg inspect --targets ANN.json``: how the training losses see one image.

The ground truth of the image (found by file name in a COCO file) goes through the model's own
training machinery, on a deep copy in train mode (the caller's model stays in eval mode): the RPN's
Matcher (IoU 0.7 / 0.3, each ground truth's best anchors positive), its BalancedPositiveNegativeSampler
(256 anchors, half positive at most) and BoxCoder; then ``roi_heads.select_training_samples``
(Matcher at 0.5, 512 RoIs, a quarter positive at most), ``project_masks_on_boxes`` for the 28x28 mask
targets and torchvision's loss functions. The samplers draw from a seeded RNG, replayed so that the
samples shown are the very ones the losses use; the values equal ``model.train()(images, targets)``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..models import LoadedModel
from .records import ImageTargets, Stage, TargetView, TensorStat, label_histogram


def locate_image(ann_file: str | Path, image_name: str, image_size: tuple[int, int]) -> tuple[Any, dict]:
    """Read the COCO file ``ann_file`` and find ``image_name`` in it (by file name): (COCO, image entry).
    A clear ``UsageError`` when the file is unreadable, lacks the image or gives it another size."""
    coco = _load_coco(ann_file)
    info = _find_image(coco, image_name, ann_file)
    if (info.get("height"), info.get("width")) not in (tuple(image_size), (None, None)):
        raise UsageError(f"--targets {ann_file}: image {info['file_name']} is {info.get('width')}x"
                         f"{info.get('height')} there but {image_size[1]}x{image_size[0]} decoded "
                         f"(EXIF-rotated, or another image?)")
    return coco, info


def load_ground_truth(loaded: LoadedModel, image_size: tuple[int, int], image_name: str,
                      ann_file: str | Path, located: tuple[Any, dict] | None = None) -> ImageTargets:
    """The targets of ``image_name`` in ``ann_file`` for ``loaded``'s classes (``located``: what
    ``locate_image`` returned, to not read the file twice)."""
    coco, info = located or locate_image(ann_file, image_name, image_size)
    target, skipped, ids = _targets(coco, info, loaded, image_size, loaded.device)
    return ImageTargets(str(ann_file), info, target, skipped, ids)


def training_view(loaded: LoadedModel, rgb: np.ndarray, truth: ImageTargets, *, seed: int = 0,
                  top: int = 100) -> TargetView:
    """Run ``truth`` through the training losses of a train-mode copy of the model."""
    import torch

    device = loaded.device
    net = copy.deepcopy(loaded.module).train()
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        view = _losses_view(net, rgb, truth.target, device)
    del net
    return _record(view, truth.annotation_file, truth.info, truth.skipped, truth.category_ids, rgb.shape[:2], top)


def _load_coco(ann_file: str | Path) -> Any:
    from pycocotools.coco import COCO

    path = Path(ann_file)
    if not path.is_file():
        raise UsageError(f"--targets {ann_file}: no such file")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise UsageError(f"--targets {ann_file}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None


def _find_image(coco: Any, image_name: str, ann_file: str | Path) -> dict:
    """The image entry whose file_name has the same base name as ``image_name`` (the longest matching
    path suffix wins when several share it)."""
    wanted = Path(image_name).as_posix()
    base = Path(wanted).name
    hits = [img for img in coco.dataset.get("images", []) if Path(str(img.get("file_name", ""))).name == base]
    if not hits:
        names = [str(img.get("file_name")) for img in coco.dataset.get("images", [])[:5]]
        raise UsageError(f"--targets {ann_file}: no image named {base} among its "
                         f"{len(coco.dataset.get('images', []))} images (e.g. {', '.join(names)})")
    if len(hits) > 1:
        suffix = [img for img in hits if wanted.endswith(Path(str(img["file_name"])).as_posix())]
        if len(suffix) != 1:
            raise UsageError(f"--targets {ann_file}: {len(hits)} images are named {base} "
                             f"({', '.join(str(h['file_name']) for h in hits[:5])}); pass the image by a path "
                             f"ending in one of those file names")
        hits = suffix
    return hits[0]


def _targets(coco: Any, info: dict, loaded: LoadedModel, size: tuple[int, int], device: Any
             ) -> tuple[dict, tuple[str, ...], np.ndarray]:
    """torchvision's target dict (boxes XYXY float, labels int64 = model labels, masks [G, H, W] uint8),
    as torchvision's COCO reference builds it: crowd regions and empty boxes left out."""
    import torch

    label_of = {c.id: c.label for c in loaded.categories}
    boxes, labels, masks, ids, skipped = [], [], [], [], []
    h, w = size
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])):
        cid = int(ann.get("category_id", -1))
        if ann.get("iscrowd", 0):
            skipped.append(f"annotation {ann.get('id')}: crowd region (not a training target)")
            continue
        if cid not in label_of:
            skipped.append(f"annotation {ann.get('id')}: category {cid} is not one of the model's classes")
            continue
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
        if x1 <= x0 or y1 <= y0:
            skipped.append(f"annotation {ann.get('id')}: empty box")
            continue
        boxes.append([x0, y0, x1, y1])
        labels.append(label_of[cid])
        ids.append(cid)
        masks.append(coco.annToMask(ann) if ann.get("segmentation") else _box_mask(size, (x0, y0, x1, y1)))
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64, device=device),
        "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)).to(device),
    }
    return target, tuple(skipped), np.array(ids, np.int64)


def _box_mask(size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    m = np.zeros(size, np.uint8)
    x0, y0, x1, y1 = (round(v) for v in box)
    m[y0:y1, x0:x1] = 1
    return m


def _rng_state(device: Any) -> tuple:
    import torch

    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: Any) -> None:
    import torch

    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _losses_view(net: Any, rgb: np.ndarray, target: dict, device: Any) -> dict[str, Any]:
    """``GeneralizedRCNN.forward`` in train mode, one submodule at a time (same calls, same RNG draws)."""
    import torch
    from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_loss, project_masks_on_boxes
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    image = torch.from_numpy(rgb).to(device).permute(2, 0, 1).float().div_(255.0)
    batch, [tgt] = net.transform([image], [target])
    features = net.backbone(batch.tensors)
    rpn, heads = net.rpn, net.roi_heads
    feats = list(features.values())
    objectness, deltas = rpn.head(feats)
    [anchors] = rpn.anchor_generator(batch, feats)
    per_level = [int(o[0].numel()) for o in objectness]
    obj_flat, deltas_flat = concat_box_prediction_layers(objectness, deltas)
    decoded = rpn.box_coder.decode(deltas_flat.detach(), [anchors]).view(1, -1, 4)
    proposals, _ = rpn.filter_proposals(decoded, obj_flat, batch.image_sizes, per_level)

    [labels], [matched_gt] = rpn.assign_targets_to_anchors([anchors], [tgt])
    [regression] = rpn.box_coder.encode([matched_gt], [anchors])
    gt = tgt["boxes"]
    if gt.numel():
        best_iou, best_anchor = rpn.box_similarity(gt, anchors).max(dim=1)
    else:
        best_iou = best_anchor = torch.zeros(0, device=device)
    state = _rng_state(device)
    [pos_mask], [neg_mask] = rpn.fg_bg_sampler([labels])  # the draw compute_loss makes next
    _set_rng_state(state, device)
    loss_objectness, loss_rpn_box_reg = rpn.compute_loss(obj_flat, deltas_flat, [labels], [regression])
    pos = torch.where(pos_mask)[0]
    neg = torch.where(neg_mask)[0]

    all_props = heads.add_gt_proposals([p.clone() for p in proposals], [gt])
    _, [all_labels] = heads.assign_targets_to_proposals(all_props, [gt], [tgt["labels"]])
    rois, [matched_idxs], roi_labels, roi_regression = heads.select_training_samples(proposals, [tgt])
    box_features = heads.box_head(heads.box_roi_pool(features, rois, batch.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, roi_labels, roi_regression)
    out: dict[str, Any] = {
        "settings": {
            "rpn_iou": (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold),
            "rpn_sampler": (rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction),
            "roi_iou": (heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold),
            "roi_sampler": (heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction),
            "roi_box_coder": tuple(heads.box_coder.weights),
        },
        "batch": batch, "tgt": tgt, "anchors": anchors, "anchor_labels": labels, "best_anchor": best_anchor,
        "best_iou": best_iou, "pos": pos, "neg": neg, "rpn_regression": regression[pos],
        "proposals": int(all_props[0].shape[0]), "all_labels": all_labels, "rois": rois[0],
        "roi_labels": roi_labels[0], "roi_regression": roi_regression[0][roi_labels[0] > 0],
        "class_logits": class_logits,
        "losses": {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg,
                   "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg},
    }
    if heads.has_mask():
        fg = torch.where(roi_labels[0] > 0)[0]
        mask_props, fg_matched = [rois[0][fg]], [matched_idxs[fg]]
        mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, mask_props,
                                                                                batch.image_sizes)))
        out["losses"]["loss_mask"] = maskrcnn_loss(mask_logits, mask_props, [tgt["masks"]], [tgt["labels"]],
                                                   fg_matched)
        out["mask_targets"] = project_masks_on_boxes(tgt["masks"], mask_props[0], fg_matched[0],
                                                     int(mask_logits.shape[-1]))
        out["mask_labels"] = tgt["labels"][fg_matched[0]]
    return out


def _record(v: dict, ann_file: str, info: dict, skipped: tuple[str, ...], category_ids: np.ndarray,
            original: tuple[int, int], top: int) -> TargetView:
    import torch

    st = v["settings"]
    rpn_n, rpn_frac = st["rpn_sampler"]
    roi_n, roi_frac = st["roi_sampler"]
    rpn_sampler_note = f"sampler {rpn_n} x {rpn_frac:g}"
    tgt, labels = v["tgt"], v["anchor_labels"]
    losses = {k: float(t) for k, t in v["losses"].items()}
    losses["loss_total"] = float(sum(losses.values()))
    all_labels = v["all_labels"]
    matched = {"foreground": int((all_labels > 0).sum()), "background": int((all_labels == 0).sum()),
               "ignored": int((all_labels == -1).sum())}
    mask_targets = v.get("mask_targets", torch.zeros((0, 28, 28)))
    counts = {"positive": int((labels == 1).sum()), "negative": int((labels == 0).sum()),
              "ignored": int((labels == -1).sum())}
    rpn_rows = (
        TensorStat.of("gt boxes", tgt["boxes"], "XYXY, resized with the image by the transform"),
        TensorStat.of("gt labels", tgt["labels"], "model labels"),
        TensorStat.of("gt masks", tgt["masks"], "resized with the image"),
        TensorStat.of("anchor labels", labels, "Matcher: " + ", ".join(f"{k} {n}" for k, n in counts.items())),
        TensorStat.of("best anchor IoU per gt", v["best_iou"], "each gt's best anchors are positive"),
        TensorStat.of("sampled positives", v["pos"], f"{rpn_sampler_note}: {v['pos'].numel()} anchor indices"),
        TensorStat.of("sampled negatives", v["neg"], f"{rpn_sampler_note}: {v['neg'].numel()} anchor indices"),
        TensorStat.of("regression targets", v["rpn_regression"], "(dx, dy, dw, dh) of the sampled positives"),
    )
    roi_rows = (
        TensorStat.of("sampled RoIs", v["rois"], f"of {v['proposals']} proposals (gt boxes added)"),
        TensorStat.of("class targets", v["roi_labels"], ", ".join(
            f"{k}: {n}" for k, n in label_histogram(v["roi_labels"].cpu().numpy()).items())),
        TensorStat.of("box regression targets", v["roi_regression"], "of the sampled positives; "
                      "BoxCoder weights (" + ", ".join(f"{float(w):g}" for w in st["roi_box_coder"]) + ")"),
        TensorStat.of("class logits", v["class_logits"], "of the sampled RoIs"),
        TensorStat.of("mask targets", mask_targets, "project_masks_on_boxes: gt masks cropped to positives"),
    )
    hi, lo = st["rpn_iou"]
    roi_hi, roi_lo = st["roi_iou"]
    stages = (
        Stage("targets_rpn", f"Training view: RPN targets (Matcher IoU {hi:g} / {lo:g}, sampler {rpn_n} x "
              f"{rpn_frac:g})", rpn_rows,
              {**counts, "sampled_positive": int(v["pos"].numel()), "sampled_negative": int(v["neg"].numel()),
               "fg_iou_thresh": hi, "bg_iou_thresh": lo, "batch_size_per_image": rpn_n,
               "positive_fraction": rpn_frac}),
        Stage("targets_roi", f"Training view: RoI head targets (Matcher IoU {roi_hi:g}, sampler {roi_n} x "
              f"{roi_frac:g}), mask targets", roi_rows,
              {"proposals_with_gt": v["proposals"], "matched": matched, "sampled": int(v["roi_labels"].numel()),
               "fg_iou_thresh": roi_hi, "bg_iou_thresh": roi_lo, "batch_size_per_image": roi_n,
               "positive_fraction": roi_frac}),
        Stage("losses", "Training view: losses for this image", tuple(
            TensorStat(k, (), "float32", val, val, val, "") for k, val in losses.items()), {}),
    )

    def np_(t: Any, bounded: bool = False) -> np.ndarray:
        t = t[:top] if bounded else t
        return t.detach().cpu().numpy()

    tensors = {
        "targets/gt_boxes": np_(tgt["boxes"]), "targets/gt_labels": np_(tgt["labels"]),
        "targets/anchor_labels": np_(labels).astype(np.int8), "targets/rpn_sampled_pos": np_(v["pos"]),
        "targets/rpn_sampled_neg": np_(v["neg"]), "targets/rpn_regression_targets": np_(v["rpn_regression"]),
        "targets/roi_boxes": np_(v["rois"], True), "targets/roi_labels": np_(v["roi_labels"], True),
        "targets/roi_regression_targets": np_(v["roi_regression"], True),
        "targets/mask_targets": np_(mask_targets, True),
    }
    resized = tuple(int(s) for s in v["batch"].image_sizes[0])
    return TargetView(
        annotation_file=ann_file, image_id=int(info["id"]), file_name=str(info["file_name"]), skipped=skipped,
        gt_boxes=np_(tgt["boxes"]), gt_labels=np_(tgt["labels"]), gt_category_ids=category_ids,
        anchors=np_(v["anchors"]), anchor_labels=np_(labels).astype(np.int8), gt_best_anchor=np_(v["best_anchor"]),
        gt_best_iou=np_(v["best_iou"]), rpn_sampled_pos=np_(v["pos"]), rpn_sampled_neg=np_(v["neg"]),
        rpn_batch_size=int(rpn_n), rpn_positive_fraction=float(rpn_frac),
        rpn_regression_targets=np_(v["rpn_regression"]),
        roi_proposals=v["proposals"], roi_matched=matched, roi_boxes=np_(v["rois"]), roi_labels=np_(v["roi_labels"]),
        roi_batch_size=int(roi_n), roi_positive_fraction=float(roi_frac), mask_targets=np_(mask_targets), losses=losses,
        resized_size=resized, original_size=original, stages=stages, tensors=tensors,
    )
