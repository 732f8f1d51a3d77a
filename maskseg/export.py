"""Export a Mask R-CNN to ONNX: one graph from RGB pixels to boxes, labels, scores and 28 x 28 masks,
with the class names and preprocessing in its metadata, checked against torch before it is kept.

The graph (``OnnxGraph``) takes ``image`` uint8 [H, W, 3] RGB (any H, W), ``size`` int64 [2] (the
resized height and width, computed outside the graph by ``maskseg.backends.onnx_backend.resized_size``
with torchvision's own float64 arithmetic from ``min_size``/``max_size``) and ``score_thresh`` float32
[]. It runs torchvision's own normalize, resize, backbone, RPN and RoI heads, and returns ``boxes``
[N, 4] float32 XYXY in the ORIGINAL image's pixels, ``labels`` [N] int64 model label ids, ``scores``
[N] float32 (best first, at most the export's ``max_dets``) and ``masks`` [N, 28, 28] float32
probabilities in torchvision's RoI layout. Masks are NOT pasted in the graph (torchvision's export
pastes N x H x W floats): maskseg pastes them box-locally afterwards, as for the torch backend.

Only torch's TorchScript-based exporter (``dynamo=False``) handles this model: the dynamo exporter
stops at ``batched_nms``'s data-dependent branch (torch 2.14, torchvision 0.29).
"""

from __future__ import annotations

import io
import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .config import ExportConfig
from .detections import Detections
from .errors import ExportError, UsageError

log = logging.getLogger(__name__)

ONNX_FORMAT = "maskseg.onnx"
ONNX_FORMAT_VERSION = 1
MIN_OPSET = 17
INPUT_NAMES = ("image", "size", "score_thresh")
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
INSTALL_HINT = "maskseg export --format onnx needs onnx and onnxruntime: pip install 'maskseg[onnx]'"
# The export check and the parity tests hold ONNX Runtime to these against torch, detection by detection.
BOX_TOL_PX = 1.0
SCORE_TOL = 1e-3
MASK_IOU_MIN = 0.97
MATCH_IOU = 0.5
# Mask IoU is measured on masks of at least MASK_MIN_PIXELS whose box is at least MASK_MIN_SIDE_PX on each
# side. Below that single pixels decide: one pixel of a 30-pixel mask flipping at the 0.5 threshold is
# IoU 0.967, and pasting rounds a sub-pixel box to whole pixels, so a 1e-4 px edge difference moves a column.
MASK_MIN_PIXELS = 100
MASK_MIN_SIDE_PX = 2.0
# The photo the check uses when no check image is given: shipped in the package (sample_images/astronaut.png,
# Eileen Collins; NASA, public domain, from scikit-image), so an installed maskseg needs no source checkout.
DEFAULT_CHECK_PHOTO = Path(__file__).resolve().parent / "data" / "check_astronaut.png"


@dataclass(frozen=True)
class Parity:
    """How one image's detections from two backends agree (``reference`` is torch).

    Detections are matched greedily, best reference score first, to the unmatched candidate of the
    same label with the highest box IoU (at least ``MATCH_IOU``). Differences are over matched pairs:
    box coordinates in pixels, scores, and mask IoU after thresholding and pasting, over the
    ``masks_compared`` masks that are large enough to measure (see ``MASK_MIN_PIXELS``).
    """

    image: str
    reference: int
    candidate: int
    matched: int
    max_box_diff: float
    max_score_diff: float
    min_mask_iou: float
    masks_compared: int = 0

    @property
    def ok(self) -> bool:
        return (self.matched == self.reference == self.candidate and self.max_box_diff <= BOX_TOL_PX
                and self.max_score_diff <= SCORE_TOL and self.min_mask_iou >= MASK_IOU_MIN)

    def describe(self) -> str:
        return (f"{self.image}: {self.matched} of {self.reference} torch / {self.candidate} onnxruntime "
                f"detections matched, box diff {self.max_box_diff:.4f} px (<= {BOX_TOL_PX}), score diff "
                f"{self.max_score_diff:.2e} (<= {SCORE_TOL}), mask IoU >= {self.min_mask_iou:.4f} (>= {MASK_IOU_MIN}) "
                f"over {self.masks_compared} masks of >= {MASK_MIN_PIXELS} px")


@dataclass(frozen=True)
class ExportReport:
    """What ``export_onnx`` wrote: the file, its size, the opset, the time taken and the check results."""

    path: Path
    bytes: int
    opset: int
    export_seconds: float
    check_seconds: float
    checks: tuple[Parity, ...]


def compare_detections(reference: Detections, candidate: Detections, image: str = "") -> Parity:
    """Match ``candidate`` to ``reference`` detection by detection (see ``Parity``)."""
    import torch
    from torchvision.ops import box_iou

    n_ref, n_cand = len(reference), len(candidate)
    if n_ref == 0 or n_cand == 0:
        return Parity(image, n_ref, n_cand, 0, 0.0, 0.0, 1.0)
    iou = box_iou(torch.as_tensor(reference.boxes), torch.as_tensor(candidate.boxes)).numpy()
    iou[reference.labels[:, None] != candidate.labels[None, :]] = -1.0
    used = np.zeros(n_cand, bool)
    pairs = []
    for i in np.argsort(-reference.scores, kind="stable"):
        row = np.where(used, -1.0, iou[i])
        j = int(np.argmax(row))
        if row[j] >= MATCH_IOU:
            used[j] = True
            pairs.append((int(i), j))
    if not pairs:
        return Parity(image, n_ref, n_cand, 0, float("inf"), float("inf"), 0.0)
    ri, ci = (np.array(x) for x in zip(*pairs, strict=True))
    box_diff = float(np.abs(reference.boxes[ri] - candidate.boxes[ci]).max())
    score_diff = float(np.abs(reference.scores[ri] - candidate.scores[ci]).max())
    ious = []
    if reference.masks is not None and candidate.masks is not None:
        sides = np.minimum(reference.boxes[:, 2] - reference.boxes[:, 0], reference.boxes[:, 3] - reference.boxes[:, 1])
        ious = [_mask_iou(reference.masks[i], candidate.masks[j]) for i, j in pairs if sides[i] >= MASK_MIN_SIDE_PX
                and max(reference.masks[i].area, candidate.masks[j].area) >= MASK_MIN_PIXELS]
    return Parity(image, n_ref, n_cand, len(pairs), box_diff, score_diff, min(ious, default=1.0), len(ious))


def _mask_iou(a: Any, b: Any) -> float:
    """IoU of two BoxMask (pycocotools on their RLEs)."""
    from pycocotools import mask as mask_utils

    return float(mask_utils.iou([a.rle()], [b.rle()], [0])[0, 0])


def _graph_class() -> type:
    """``OnnxGraph`` is a torch module; defined on first use so importing this file never imports torch."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.transform import resize_boxes

    class OnnxGraph(torch.nn.Module):
        """torchvision's MaskRCNN inference chain for one uint8 [H, W, 3] image, up to 28 x 28 masks."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: Any, size: Any, score_thresh: Any) -> tuple[Any, ...]:
            net = self.model
            x = net.transform.normalize(image.permute(2, 0, 1).float() / 255.0)
            resized = F.interpolate(x[None], size=[size[0], size[1]], mode="bilinear", align_corners=False)[0]
            batch = net.transform.batch_images([resized], size_divisible=net.transform.size_divisible)
            images = ImageList(batch, [resized.shape[-2:]])
            features = net.backbone(images.tensors)
            proposals, _ = net.rpn(images, features)
            heads = net.roi_heads
            fixed_thresh = heads.score_thresh
            # RoIHeads reads its score threshold from an attribute; a tensor there makes it a graph input.
            heads.score_thresh = score_thresh
            try:
                detections, _ = heads(features, proposals, images.image_sizes)
            finally:
                heads.score_thresh = fixed_thresh
            d = detections[0]
            boxes = resize_boxes(d["boxes"], resized.shape[-2:], x.shape[-2:])
            return boxes, d["labels"], d["scores"], d["masks"][:, 0]

    return OnnxGraph


def export_onnx(out: str | Path, config: ExportConfig | None = None) -> ExportReport:
    """Export ``config.model`` to the ONNX file ``out``, check it against torch, then write it atomically.

    Nothing is written when the check fails (``ExportError``, naming the image and the differences).
    """
    config = config or ExportConfig()
    out = Path(out)
    if config.format != "onnx":
        raise UsageError(f"--format {config.format}: only onnx is supported")
    if config.opset < MIN_OPSET:
        raise UsageError(f"--opset {config.opset}: {MIN_OPSET} or newer is needed")
    if out.is_dir():
        raise UsageError(f"-o {out}: is a folder; give the .onnx file to write")
    onnx, _ = _import_onnx()
    photos = _check_photos(config) if config.check else []
    from .models import load_model

    loaded = load_model(replace(config.model, device="cpu", channels_last=False, backend="torch"))
    t0 = time.perf_counter()
    example = photos[0][1] if photos else _pattern_image()
    data = _trace(loaded, example, config.opset)
    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, metadata(loaded, config))
    data = proto.SerializeToString()
    export_seconds = time.perf_counter() - t0
    log.info("exported %s (%.1f MB, opset %d) in %.1f s", loaded.name, len(data) / 1e6, config.opset, export_seconds)
    t0 = time.perf_counter()
    checks = tuple(check_against_torch(data, loaded, photos, config))
    check_seconds = time.perf_counter() - t0
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ExportError(f"{out} not written: ONNX Runtime disagrees with torch on {failed[0].describe()}")
    from .atomic import atomic_write_bytes

    atomic_write_bytes(out, data)
    return ExportReport(out, len(data), config.opset, export_seconds, check_seconds, checks)


def metadata(loaded: Any, config: ExportConfig) -> dict[str, str]:
    """The ONNX ``metadata_props`` maskseg writes: classes and preprocessing, as strings (JSON where nested)."""
    import torch
    import torchvision

    from . import __version__

    net = loaded.module
    t = net.transform
    return {
        "maskseg_format": ONNX_FORMAT,
        "maskseg_format_version": str(ONNX_FORMAT_VERSION),
        "arch": loaded.name,
        "num_classes": str(int(net.roi_heads.box_predictor.cls_score.out_features)),
        "categories": json.dumps([{"label": c.label, "id": c.id, "name": c.name} for c in loaded.categories]),
        "input": "image: uint8 RGB [H, W, 3]; size: int64 [2] resized (height, width); score_thresh: float32 []",
        "min_size": str(int(t.min_size[-1])),
        "max_size": str(int(t.max_size)),
        "image_mean": json.dumps([float(v) for v in t.image_mean]),
        "image_std": json.dumps([float(v) for v in t.image_std]),
        "size_divisible": str(int(t.size_divisible)),
        "score_thresh": str(config.model.score_thresh),
        "max_dets": str(int(net.roi_heads.detections_per_img)),
        "mask_layout": "roi",
        "weights": str(loaded.weights_source),
        "versions": json.dumps({"maskseg": __version__, "torch": str(torch.__version__),
                                "torchvision": str(torchvision.__version__)}),
    }


def check_against_torch(data: bytes, loaded: Any, photos: list[tuple[str, np.ndarray]],
                        config: ExportConfig) -> list[Parity]:
    """Run the exported model (``data``) and the torch model on each photo; one Parity per photo."""
    from .backends.onnx_backend import OnnxBackend
    from .backends.torch_backend import TorchBackend
    from .postprocess import raw_to_detections

    if not photos:
        return []
    onnx_backend = OnnxBackend.from_bytes(data, replace(config.model, device="cpu"), source="the export")
    torch_backend = TorchBackend(loaded)
    out = []
    for name, rgb in photos:
        size = (int(rgb.shape[0]), int(rgb.shape[1]))
        with graph_nms():
            ref = raw_to_detections(torch_backend.infer([rgb])[0], size, mask_thresh=0.5)
        cand = raw_to_detections(onnx_backend.infer([rgb])[0], size, mask_thresh=0.5)
        parity = compare_detections(ref, cand, name)
        log.info("check %s", parity.describe())
        out.append(parity)
    return out


def _trace(loaded: Any, example: np.ndarray, opset: int) -> bytes:
    """Trace ``OnnxGraph`` around ``loaded.module`` on ``example`` (uint8 [H, W, 3]) -> ONNX bytes."""
    import torch

    from .backends.onnx_backend import resized_size

    net = loaded.module
    graph = _graph_class()(net).eval()
    t = net.transform
    size = resized_size(example.shape[0], example.shape[1], int(t.min_size[-1]), int(t.max_size))
    # A zero threshold while tracing: every branch then runs on real detections (it is an input after).
    args = (torch.from_numpy(np.ascontiguousarray(example)), torch.tensor(size, dtype=torch.int64),
            torch.tensor(0.0, dtype=torch.float32))
    n = "detections"
    dynamic = {"image": {0: "height", 1: "width"}, **{k: {0: n} for k in OUTPUT_NAMES}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), _gather_merged_roi_levels():
        warnings.simplefilter("always")
        try:
            torch.onnx.export(graph, args, buffer, dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
                              output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic, do_constant_folding=True)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed for {loaded.name} at opset {opset}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    for w in {str(w.message).splitlines()[0] for w in caught}:
        log.debug("exporter: %s", w)
    return buffer.getvalue()


@contextmanager
def graph_nms() -> Iterator[None]:
    """While the torch reference runs, give torchvision's ``batched_nms`` the graph's one NMS over
    class- (or level-) offset boxes (``_batched_nms_coordinate_trick``, what tracing records).

    Eager torchvision on the CPU switches to one NMS per class or level above 4000 box coordinates and
    then orders the survivors with an unstable sort. The two are the same function of the scores, except
    where scores tie exactly; then which boxes fill the RPN's first ``post_nms_top_n`` depends on the tie
    order alone. A Mask R-CNN whose RPN objectness saturates (thousands of proposals at exactly 1.0 in
    float32, as in benchmarks/bench_predict.py's 30x objectness) then gets wholly different proposals,
    and detections, in eager torch and in a faithful export. The check compares like with like.
    """
    import torchvision.ops.boxes as box_ops

    original = box_ops.batched_nms

    def batched_nms(boxes: Any, scores: Any, idxs: Any, iou_threshold: float) -> Any:
        return box_ops._batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)

    box_ops.batched_nms = batched_nms
    try:
        yield
    finally:
        box_ops.batched_nms = original


@contextmanager
def _gather_merged_roi_levels() -> Iterator[None]:
    """While tracing, merge MultiScaleRoIAlign's per-level results with one Concat + Gather.

    torchvision's traced merge (``poolers._onnx_merge_levels``) scatters every level into a zero
    tensor of all RoIs x C x 7 x 7 (or 14 x 14), four full copies with an int64 index as large:
    7% of ONNX Runtime's time on ResNet-50 at 800 px. The rows are the same, in the same order.
    """
    import torch
    import torchvision.ops.poolers as poolers

    def merge(levels: Any, unmerged: list) -> Any:
        order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged))])
        return torch.cat(unmerged)[torch.argsort(order)]

    original = poolers._onnx_merge_levels
    poolers._onnx_merge_levels = merge
    try:
        yield
    finally:
        poolers._onnx_merge_levels = original


def _check_photos(config: ExportConfig) -> list[tuple[str, np.ndarray]]:
    """The photos the export is checked on, decoded: ``config.check_images``, else the sample photo."""
    from .decode import decode_bytes
    from .errors import DecodeError

    paths = [Path(p) for p in config.check_images] or [DEFAULT_CHECK_PHOTO]
    if not config.check_images and not paths[0].is_file():
        raise UsageError("no photo to check the export on: pass --check-image PHOTO (a real photo), or --no-check")
    out = []
    for p in paths:
        try:
            out.append((p.name, decode_bytes(p.read_bytes(), str(p))))
        except OSError as exc:
            raise UsageError(f"--check-image {p}: cannot read it ({exc.strerror or exc})") from None
        except DecodeError as exc:
            raise UsageError(f"--check-image {exc}") from None
    return out


def _pattern_image(height: int = 480, width: int = 640) -> np.ndarray:
    """A deterministic uint8 RGB test pattern, to trace on when no photo is checked."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return onnx, onnxruntime
