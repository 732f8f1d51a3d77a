"""One image through torchvision's Mask R-CNN, stage by stage: what each stage outputs, with which shapes.

``inspect_image`` calls the model's own submodules in the order ``GeneralizedRCNN.forward`` does
(transform, backbone + FPN, rpn.head, rpn.anchor_generator, box decoding, rpn.filter_proposals,
box_roi_pool, box_head, box_predictor, postprocess_detections, mask_roi_pool, mask_head,
mask_predictor, maskrcnn_inference) and pastes the masks with ``maskseg.postprocess`` as ``predict``
does, so the final detections are the Segmenter's on the same module, bit for bit (``predict`` loads
the model with ``backends.torch_backend.optimize``'s inference rewrites, which change floats by rounding only; inspect
runs the plain torchvision modules). Nothing of the model is implemented twice:
the only bookkeeping reproduced is what torchvision computes and drops (which FPN level each proposal
came from, which level each RoI is pooled from), using torchvision's own helpers, and checked
against the real outputs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEFAULT_MAX_PIXELS, ModelConfig
from ..errors import UsageError
from ..models import LoadedModel, load_model
from .records import DEFAULT_TOP, InputInfo, LevelInfo, Stage, StageOutputs, TensorStat
from .targets import load_ground_truth, locate_image, training_view

log = logging.getLogger(__name__)


def inspect_image(
    image: str | Path | np.ndarray,
    model: ModelConfig | LoadedModel | None = None,
    *,
    mask_thresh: float = 0.5,
    top: int = DEFAULT_TOP,
    targets: str | Path | None = None,
    seed: int = 0,
    image_name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> StageOutputs:
    """Run one image through Mask R-CNN stage by stage and record every intermediate tensor.

    ``image``: a file path (decoded as ``predict`` decodes it: EXIF orientation, RGB) or an [H, W, 3]
    uint8 RGB array (then ``image_name`` names it, e.g. for ``targets``). ``model``: a config to load
    or an already loaded model (left in eval mode). ``top`` bounds the per-proposal, per-RoI and
    per-detection arrays kept for the dump. ``targets``: a COCO annotation file holding this image;
    adds the training-time view (``StageOutputs.targets``), sampled reproducibly from ``seed``.
    """
    import torch

    from ..segmenter import Segmenter

    if top < 1:
        raise UsageError(f"top must be at least 1, not {top}")
    if isinstance(model, ModelConfig) and model.backend != "torch":
        raise UsageError(f"inspect runs torchvision's modules one by one: it needs the torch backend, "
                         f"not {model.backend}")
    rgb, name = _read_image(image, image_name, max_pixels)
    located = None
    if targets is not None:  # read first: a wrong file fails before the model is loaded
        located = locate_image(targets, name, rgb.shape[:2])
    loaded = model if isinstance(model, LoadedModel) else load_model(model or ModelConfig())
    if loaded.module.training:
        raise UsageError("inspect_image needs the model in eval mode (load_model returns it so)")
    truth = None
    if targets is not None:
        truth = load_ground_truth(loaded, rgb.shape[:2], name, targets, located)
    seg = Segmenter(loaded=loaded, mask_thresh=mask_thresh)
    with torch.inference_mode():
        run = _Run(loaded, seg, rgb, top)
        run.forward()
    view = None
    if truth is not None:
        view = training_view(loaded, rgb, truth, seed=seed, top=top)
    return StageOutputs(
        image=name, model=loaded.name, weights=loaded.weights_source, device=str(loaded.device),
        input=run.input_info, levels=tuple(run.levels), stages=tuple(run.stages), detections=run.detections,
        category_names={c.id: c.name for c in loaded.categories},
        label_names={c.label: c.name for c in loaded.categories}, tensors=run.tensors, rgb=rgb, top=top,
        proposal_levels_checked=run.levels_checked, targets=view,
    )


def _read_image(image: str | Path | np.ndarray, name: str | None, max_pixels: int) -> tuple[np.ndarray, str]:
    from ..decode import decode_bytes, read_file_bytes

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UsageError(f"expected an [H, W, 3] uint8 RGB array, got {image.dtype} {image.shape}")
        return image, name or "image"
    path = str(image)
    data, _ = read_file_bytes(path)
    return decode_bytes(data, path, max_pixels=max_pixels), name or path


def level_names(features: dict[str, Any], padded_size: tuple[int, int]) -> list[tuple[str, str, int]]:
    """(key, name, stride) per feature map: torchvision's keys '0'..'3', 'pool' are P2..P6 (stride 4..64).
    The first map's level comes from its size; the pyramid's next maps are the next levels (named by
    order, since tiny inputs can leave two levels with one cell each)."""
    maps = list(features.items())
    first = round(math.log2(max(padded_size[0] / int(maps[0][1].shape[-2]), 1))) if maps else 0
    return [(key, f"P{first + i}", 2 ** (first + i)) for i, (key, _) in enumerate(maps)]


class _Run:
    """The forward pass, one submodule at a time, filling ``stages``, ``levels`` and ``tensors``."""

    def __init__(self, loaded: LoadedModel, seg: Any, rgb: np.ndarray, top: int) -> None:
        self.loaded, self.seg, self.rgb, self.top = loaded, seg, rgb, top
        self.net = loaded.module
        self.stages: list[Stage] = []
        self.levels: list[LevelInfo] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.levels_checked = True

    def keep(self, key: str, t: Any, bounded: bool = False) -> None:
        t = t[: self.top] if bounded else t
        self.tensors[key] = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)

    def forward(self) -> None:
        import torch
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        net, rpn = self.net, self.net.rpn
        [image] = self.seg.backend.to_tensors([self.rgb])  # TorchBackend's, as predict converts
        original = (int(image.shape[-2]), int(image.shape[-1]))
        batch, _ = net.transform([image])
        if self.loaded.channels_last:
            batch.tensors = batch.tensors.contiguous(memory_format=torch.channels_last)
        resized = tuple(int(v) for v in batch.image_sizes[0])
        padded = (int(batch.tensors.shape[-2]), int(batch.tensors.shape[-1]))
        self._input_stage(image, batch, original, resized, padded)

        features = net.backbone(batch.tensors)
        names = level_names(features, padded)
        self._shapes = [tuple(int(v) for v in f.shape) for f in features.values()]
        # the anchor generator's spacing: padded size // grid size, per axis
        self._steps = [(padded[0] // s[-2], padded[1] // s[-1]) for s in self._shapes]
        self._level_p = _level_numbers(names).to(image.device)
        pool = net.roi_heads.box_roi_pool
        pooled_keys = [k for k in features if k in getattr(pool, "featmap_names", ())]
        self._roi_keys = pooled_keys
        self.stages.append(Stage("backbone", "Backbone + FPN", tuple(
            TensorStat.of(f"features['{k}'] {n}", f, f"stride {s}") for (k, n, s), f in
            zip(names, features.values(), strict=True)), {"levels": {n: k for k, n, _ in names}}))

        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(batch, feats)
        per_level = [int(o[0].numel()) for o in objectness]  # A * H * W, as rpn.forward counts them
        obj_flat, deltas_flat = concat_box_prediction_layers(objectness, deltas)
        decoded = rpn.box_coder.decode(deltas_flat.detach(), anchors).view(1, -1, 4)
        [boxes], [scores] = rpn.filter_proposals(decoded, obj_flat, batch.image_sizes, per_level)
        book = _proposal_bookkeeping(rpn, decoded, obj_flat, batch.image_sizes[0], per_level)
        if not torch.equal(book["boxes"], boxes):
            self.levels_checked = False
            log.warning("the FPN level bookkeeping does not reproduce rpn.filter_proposals (a torchvision "
                        "change?); proposal levels are approximate")
        self._rpn_stage(names, objectness, deltas, anchors[0], obj_flat, deltas_flat, decoded)

        heads = net.roi_heads
        box_features = heads.box_roi_pool(features, [boxes], batch.image_sizes)
        roi_level = _roi_levels(heads.box_roi_pool, boxes, self._roi_keys)
        self._proposal_stage(names, book, boxes, scores, roi_level)
        head_out = heads.box_head(box_features)
        class_logits, box_regression = heads.box_predictor(head_out)
        self._box_head_stage(names, box_features, roi_level, head_out, class_logits, box_regression)

        [det_boxes], [det_scores], [det_labels] = heads.postprocess_detections(
            class_logits, box_regression, [boxes], batch.image_sizes)
        raw = {"boxes": det_boxes, "scores": det_scores, "labels": det_labels}
        self._detection_stage(raw, class_logits)
        if heads.has_mask():
            from torchvision.models.detection.roi_heads import maskrcnn_inference

            mask_features = heads.mask_roi_pool(features, [det_boxes], batch.image_sizes)
            mask_head_out = heads.mask_head(mask_features)
            mask_logits = heads.mask_predictor(mask_head_out)
            [mask_probs] = maskrcnn_inference(mask_logits, [det_labels])
            raw["masks"] = mask_probs
            self._mask_stage(mask_features, mask_head_out, mask_logits, mask_probs, det_labels)
        self._final_stage(raw, resized, original)

    def _input_stage(self, image: Any, batch: Any, original: tuple, resized: tuple, padded: tuple) -> None:
        tr = self.net.transform
        min_size, max_size = int(tr.min_size[-1]), int(tr.max_size)
        scale = None if tr.fixed_size else min(min_size / min(original), max_size / max(original))
        self.input_info = InputInfo(original, resized, padded, scale, min_size, max_size, int(tr.size_divisible))
        h, w = resized
        self.stages.append(Stage("input", "Input (transform: normalize, resize, batch)", (
            TensorStat.of("image", self.rgb, "decoded RGB, upright (EXIF applied)"),
            TensorStat.of("image tensor", image, "[3, H, W] / 255"),
            TensorStat.of("resized + normalized", batch.tensors[0, :, :h, :w],
                          f"(x - mean) / std, scaled x{scale:.4g}" if scale else "(x - mean) / std"),
            TensorStat.of("batch.tensors", batch.tensors, f"zero-padded to a multiple of {tr.size_divisible}"),
        ), {"original_size": original, "resized_size": resized, "padded_size": padded, "scale_factor": scale,
            "min_size": min_size, "max_size": max_size, "image_mean": list(tr.image_mean),
            "image_std": list(tr.image_std)}))

    def _rpn_stage(self, names: list, objectness: list, deltas: list, anchors: Any, obj_flat: Any,
                   deltas_flat: Any, decoded: Any) -> None:
        gen = self.net.rpn.anchor_generator
        rows: list[TensorStat] = []
        offset = 0
        self._anchor_info = []
        for i, ((_key, name, _stride), o, d) in enumerate(zip(names, objectness, deltas, strict=True)):
            n = int(o[0].numel())
            a = anchors[offset : offset + n]
            offset += n
            sizes = tuple(float(s) for s in gen.sizes[i])
            ratios = tuple(round(float(r), 4) for r in gen.aspect_ratios[i])
            self._anchor_info.append((int(o.shape[1]), n, sizes, ratios))
            rows += [TensorStat.of(f"objectness {name}", o, f"logits, {o.shape[1]} anchors/location"),
                     TensorStat.of(f"box deltas {name}", d, "(dx, dy, dw, dh) per anchor"),
                     TensorStat.of(f"anchors {name}", a, f"sizes {_fmt(sizes)}, ratios {_fmt(ratios)}, "
                                   f"one every {_step(self._steps[i])} px")]
            self.keep(f"rpn/objectness/{name}", o)
            self.keep(f"rpn/deltas/{name}", d)
        rows += [TensorStat.of("objectness (all levels)", obj_flat, "concat_box_prediction_layers"),
                 TensorStat.of("box deltas (all levels)", deltas_flat, ""),
                 TensorStat.of("anchors (all levels)", anchors, "anchor_generator"),
                 TensorStat.of("decoded proposals", decoded, "rpn.box_coder.decode(deltas, anchors)")]
        self.keep("rpn/anchors", anchors)
        self.stages.append(Stage("rpn", "Stage 1: RPN head and anchors, per FPN level", tuple(rows), {
            "anchors": sum(x[1] for x in self._anchor_info),
            "box_coder_weights": list(self.net.rpn.box_coder.weights)}))

    def _proposal_stage(self, names: list, book: dict, boxes: Any, scores: Any, roi_level: Any) -> None:
        rpn = self.net.rpn
        level_p = self._level_p
        for i, (key, name, stride) in enumerate(names):
            def count(t: Any, i: int = i) -> int:
                return int((t == i).sum())

            anchors_per_loc, n, sizes, ratios = self._anchor_info[i]
            rois = 0
            if roi_level is not None and key in self._roi_keys:
                rois = count(roi_level, self._roi_keys.index(key))
            self.levels.append(LevelInfo(
                key, name, stride, self._steps[i], self._shapes[i], anchors_per_loc, n, sizes, ratios,
                count(book["pre_level"]), count(book["filtered_level"]), count(book["nms_level"]),
                count(book["level"]), rois))
        pre_note = ", ".join(f"{lv.name} {lv.pre_nms}" for lv in self.levels)
        fin_note = ", ".join(f"{lv.name} {lv.proposals}" for lv in self.levels)
        self.stages.append(Stage("proposals", "Proposals: per-level top-k, then per-level NMS", (
            TensorStat.of("pre-NMS boxes", book["pre_boxes"], f"top-k per level: {pre_note}"),
            TensorStat.of("pre-NMS objectness", book["pre_scores"], "sigmoid"),
            TensorStat.of("pre-NMS FPN level", level_p[book["pre_level"]], ""),
            TensorStat.of("proposals", boxes, "clipped, small and low boxes removed, NMS per level"),
            TensorStat.of("proposal objectness", scores, "sigmoid; the score model(...) drops"),
            TensorStat.of("proposal FPN level", level_p[book["level"]], fin_note),
        ), {"pre_nms_top_n": rpn.pre_nms_top_n(), "post_nms_top_n": rpn.post_nms_top_n(),
            "nms_thresh": rpn.nms_thresh, "score_thresh": rpn.score_thresh, "min_size": rpn.min_size,
            "per_level": {lv.name: {"anchors": lv.anchor_count, "pre_nms": lv.pre_nms,
                                    "after_filters": lv.after_filters, "after_nms": lv.after_nms,
                                    "proposals": lv.proposals} for lv in self.levels},
            "levels_checked": self.levels_checked}))
        self.keep("proposals/pre_nms/boxes", book["pre_boxes"])
        self.keep("proposals/pre_nms/objectness", book["pre_scores"])
        self.keep("proposals/pre_nms/level", level_p[book["pre_level"]])
        self.keep("proposals/boxes", boxes, True)
        self.keep("proposals/objectness", scores, True)
        self.keep("proposals/level", level_p[book["level"]], True)

    def _box_head_stage(self, names: list, box_features: Any, roi_level: Any, head_out: Any,
                        class_logits: Any, box_regression: Any) -> None:
        import torch

        rows = [TensorStat.of("RoI features", box_features, "box_roi_pool (MultiScaleRoIAlign)")]
        hist: dict[str, int] = {}
        if roi_level is not None:
            keys = [k for k, _, _ in names]
            to_all = torch.tensor([keys.index(k) for k in self._roi_keys], device=roi_level.device)
            level = self._level_p[to_all[roi_level]]
            hist = {lv.name: lv.rois for lv in self.levels if lv.key in self._roi_keys}
            rows.append(TensorStat.of("RoI pooled level", level, ", ".join(f"{k} {v}" for k, v in hist.items())))
            self.keep("roi/level", level, True)
        num_classes = int(class_logits.shape[-1])
        rows += [TensorStat.of("box-head features", head_out, type(self.net.roi_heads.box_head).__name__),
                 TensorStat.of("class logits", class_logits, f"{num_classes} classes incl. background"),
                 TensorStat.of("class scores", torch.softmax(class_logits, -1), "softmax"),
                 TensorStat.of("box deltas", box_regression, f"4 per class ({num_classes} x 4)")]
        self.keep("roi/features", box_features, True)
        self.keep("box_head/features", head_out, True)
        self.keep("box_predictor/class_logits", class_logits, True)
        self.keep("box_predictor/box_deltas", box_regression, True)
        pool = self.net.roi_heads.box_roi_pool
        self.stages.append(Stage("box_head", "Stage 2: RoI pooling, box head, box predictor", tuple(rows), {
            "roi_output_size": list(getattr(pool, "output_size", ())),
            "sampling_ratio": getattr(pool, "sampling_ratio", None),
            "canonical_scale": getattr(pool, "canonical_scale", None),
            "canonical_level": getattr(pool, "canonical_level", None),
            "rois_per_level": hist, "box_coder_weights": list(self.net.roi_heads.box_coder.weights)}))

    def _detection_stage(self, raw: dict, class_logits: Any) -> None:
        import torch

        heads = self.net.roi_heads
        above = int((torch.softmax(class_logits, -1)[:, 1:] > heads.score_thresh).sum())
        self.stages.append(Stage("detections", "Detections: score threshold, per-class NMS", (
            TensorStat.of("boxes", raw["boxes"], "decoded per class, clipped; resized-image pixels"),
            TensorStat.of("scores", raw["scores"], ""),
            TensorStat.of("labels", raw["labels"], "model labels (argmax is per class, not per box)"),
        ), {"score_thresh": heads.score_thresh, "nms_thresh": heads.nms_thresh,
            "detections_per_img": heads.detections_per_img, "class_box_pairs_above_thresh": above,
            "kept": int(raw["scores"].numel())}))
        for k in ("boxes", "scores", "labels"):
            self.keep(f"detections/{k}", raw[k], True)

    def _mask_stage(self, mask_features: Any, mask_head_out: Any, mask_logits: Any, mask_probs: Any,
                    labels: Any) -> None:
        import torch

        chosen = mask_logits[torch.arange(len(labels), device=labels.device), labels]
        self.stages.append(Stage("mask_head", "Stage 2: mask RoI pooling, mask head, mask predictor", (
            TensorStat.of("mask RoI features", mask_features, "mask_roi_pool on the detections' boxes"),
            TensorStat.of("mask-head features", mask_head_out, type(self.net.roi_heads.mask_head).__name__),
            TensorStat.of("mask logits", mask_logits, "one 28x28 map per class"),
            TensorStat.of("chosen-class mask logits", chosen, "the detection's label"),
            TensorStat.of("mask probabilities", mask_probs, "maskrcnn_inference: sigmoid of the chosen class"),
        ), {"mask_roi_output_size": list(getattr(self.net.roi_heads.mask_roi_pool, "output_size", ()))}))
        self.keep("mask/roi_features", mask_features, True)
        self.keep("mask/head_features", mask_head_out, True)
        self.keep("mask/logits", mask_logits, True)
        self.keep("mask/probs", mask_probs, True)

    def _final_stage(self, raw: dict, resized: tuple, original: tuple) -> None:
        from ..postprocess import to_detections

        seg = self.seg
        dets = to_detections(raw, resized, original, mask_thresh=seg.mask_thresh, keep_labels=seg.keep_labels)
        dets = seg.to_category_ids(dets)
        self.detections = dets
        k = len(dets)
        rows = [TensorStat.of("boxes", dets.boxes, "original-image pixels (resize_boxes)"),
                TensorStat.of("scores", dets.scores, ""),
                TensorStat.of("labels", dets.labels, "category ids")]
        if dets.masks is not None:
            area = float(sum(m.area for m in dets.masks))
            total = k * original[0] * original[1]
            note = f"> {seg.mask_thresh}, pasted box-locally as predict does"
            rows.append(TensorStat("masks", (k, *original), "bool", 0.0, area / total, 1.0 if area else 0.0, note)
                        if k else TensorStat("masks", (0, *original), "bool", None, None, None, note))
        self.stages.append(Stage("final", "Final: boxes, masks pasted into the original image", tuple(rows), {
            "mask_thresh": seg.mask_thresh, "dropped_by_label_filter": int(raw["scores"].numel()) - k,
            "detections": k}))
        self.keep("final/boxes", dets.boxes[: self.top])
        self.keep("final/scores", dets.scores[: self.top])
        self.keep("final/labels", dets.labels[: self.top])
        if dets.masks is not None:
            # COCO compressed RLE (as results.json has it) as bytes: np.load needs no pickle for them
            self.tensors["final/masks_rle"] = np.array(
                [m.rle()["counts"].encode("ascii") for m in dets.masks[: self.top]], dtype=bytes)
            self.tensors["final/image_size"] = np.array(original, np.int64)


def _proposal_bookkeeping(rpn: Any, proposals: Any, objectness: Any, image_size: tuple[int, int],
                          num_anchors_per_level: list[int]) -> dict[str, Any]:
    """The level of each proposal: ``rpn.filter_proposals``' own steps for one image, keeping the
    ``levels`` tensor it builds and drops (same helpers, same order; checked against its output)."""
    import torch
    from torchvision.ops import boxes as box_ops

    obj = objectness.detach().reshape(1, -1)
    levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=obj.device)
                        for i, n in enumerate(num_anchors_per_level)]).reshape(1, -1).expand_as(obj)
    # torchvision's own per-level top-k (RegionProposalNetwork's helper; it has no public twin), so the
    # selection is filter_proposals' exactly
    top_n_idx = rpn._get_top_n_idx(obj, num_anchors_per_level)
    batch_idx = torch.arange(1, device=obj.device)[:, None]
    scores = torch.sigmoid(obj[batch_idx, top_n_idx])[0]
    lvl = levels[batch_idx, top_n_idx][0]
    boxes = proposals[batch_idx, top_n_idx][0]
    out = {"pre_boxes": boxes, "pre_scores": scores, "pre_level": lvl}
    boxes = box_ops.clip_boxes_to_image(boxes, image_size)
    keep = box_ops.remove_small_boxes(boxes, rpn.min_size)
    boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
    keep = torch.where(scores >= rpn.score_thresh)[0]
    boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
    out["filtered_level"] = lvl
    keep = box_ops.batched_nms(boxes, scores, lvl, rpn.nms_thresh)
    out["nms_level"] = lvl[keep]
    keep = keep[: rpn.post_nms_top_n()]
    out.update(boxes=boxes[keep], scores=scores[keep], level=lvl[keep])
    return out


def _roi_levels(pool: Any, boxes: Any, pooled_keys: list[str]) -> Any:
    """Which feature map ``box_roi_pool`` took each RoI from, as an index into ``pooled_keys`` (the
    feature maps it pools from, in the features' order): its own LevelMapper, which it sets up on its
    first call. None for poolers without one."""
    import torch

    mapper = getattr(pool, "map_levels", None)
    if len(pooled_keys) == 1:
        return torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
    if mapper is None or not pooled_keys:
        return None
    return mapper([boxes])


def _level_numbers(names: list[tuple[str, str, int]]) -> Any:
    """Index -> P number (2..6) as a tensor, for turning level indices into names' numbers."""
    import torch

    return torch.tensor([int(n[1:]) if n[1:].isdigit() else i for i, (_, n, _) in enumerate(names)])


def _step(step: tuple[int, int]) -> str:
    return str(step[0]) if step[0] == step[1] else f"{step[0]} (y) x {step[1]} (x)"


def _fmt(values: tuple) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
