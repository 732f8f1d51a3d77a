"""`maskseg export --format onnx`: the real CLI exports the tiny checkpoint (session fixture ``tiny_onnx``);
the file is a valid ONNX model with dynamic image size and maskseg's metadata; the comparison that
guards the export catches each kind of disagreement; bad options are refused before any work."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from maskseg.config import ExportConfig, ModelConfig
from maskseg.decode import decode_bytes
from maskseg.detections import BoxMask, Detections
from maskseg.errors import UsageError
from maskseg.export import BOX_TOL_PX, MASK_IOU_MIN, SCORE_TOL, compare_detections, export_onnx

from .conftest import SAMPLES


def test_cli_export_writes_a_checked_onnx_model_with_metadata(tiny_onnx):
    onnx = pytest.importorskip("onnx")
    path, proc = tiny_onnx
    assert "check chelsea.png: 100 of 100 torch / 100 onnxruntime detections matched" in proc.stderr
    assert f"wrote {path}" in proc.stderr and "checked on 1 photo(s)" in proc.stderr
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["maskseg_format"] == "maskseg.onnx" and meta["mask_layout"] == "roi"
    assert [c["name"] for c in json.loads(meta["categories"])] == ["date", "fig", "hazelnut"]
    assert (meta["min_size"], meta["max_size"], meta["num_classes"], meta["arch"]) == ("160", "256", "4", "small")
    image = model.graph.input[0]
    dims = image.type.tensor_type.shape.dim
    assert image.name == "image" and [d.dim_param or d.dim_value for d in dims] == ["height", "width", 3]
    assert [o.name for o in model.graph.output] == ["boxes", "labels", "scores", "masks"]


def _torch_detections(tiny_checkpoint, name: str) -> Detections:
    from maskseg.segmenter import Segmenter

    rgb = decode_bytes((SAMPLES / name).read_bytes(), name)
    return Segmenter(ModelConfig(weights=str(tiny_checkpoint), device="cpu"))([rgb])[0]


def test_compare_detections_catches_each_kind_of_disagreement(tiny_checkpoint):
    ref = _torch_detections(tiny_checkpoint, "coins.png")
    assert len(ref) > 10
    same = compare_detections(ref, ref, "coins.png")
    assert same.ok and same.matched == len(ref) and same.max_box_diff == 0 and same.min_mask_iou == 1.0
    assert same.masks_compared > 0

    shifted = replace(ref, boxes=ref.boxes + np.float32(BOX_TOL_PX + 0.5))
    assert not compare_detections(ref, shifted).ok
    rescored = replace(ref, scores=ref.scores - np.float32(3 * SCORE_TOL))
    assert compare_detections(ref, rescored).max_score_diff > SCORE_TOL
    assert not compare_detections(ref, rescored).ok
    dropped = compare_detections(ref, ref[1:])
    assert not dropped.ok and dropped.matched == len(ref) - 1
    relabelled = replace(ref, labels=ref.labels % 3 + 1)
    assert compare_detections(ref, relabelled).matched < len(ref)

    def thinner(m: BoxMask) -> BoxMask:  # the mask loses its left half
        bitmap = m.bitmap.copy()
        bitmap[:, : bitmap.shape[1] // 2] = False
        return BoxMask(m.x0, m.y0, bitmap, m.image_size)

    thinned = compare_detections(ref, replace(ref, masks=tuple(thinner(m) for m in ref.masks)))
    assert thinned.min_mask_iou < MASK_IOU_MIN and not thinned.ok


@pytest.mark.parametrize(("config", "out_name", "message"), [
    (ExportConfig(opset=16), "m.onnx", "--opset 16: 17 or newer"),
    (ExportConfig(format="tflite"), "m.onnx", "--format tflite: only onnx"),
    (ExportConfig(), ".", "is a folder"),
    (ExportConfig(check_images=("missing.jpg",)), "m.onnx", "--check-image missing.jpg: cannot read it"),
    (ExportConfig(check_images=(str(SAMPLES / "README.md"),)), "m.onnx", "not an image"),
])
def test_export_refuses_bad_options_before_any_work(tmp_path, monkeypatch, config, out_name, message):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=message):
        export_onnx(tmp_path / out_name, config)
    assert list(tmp_path.iterdir()) == []


def test_export_check_holds_when_rpn_scores_tie(tmp_path):
    """An RPN whose objectness saturates (every proposal exactly 1.0 in float32, as with a ResNet-50 whose
    objectness is scaled 30x) keeps proposals by tie order alone: eager torch (one NMS per level, then an
    unstable sort) and the traced graph (one NMS over level-offset boxes) then keep different ones. The
    export is faithful to torchvision's traced path, and its check compares it with that path."""
    pytest.importorskip("onnxruntime")
    import torch

    from maskseg.models import Category, save_checkpoint
    from maskseg.synth import TINY_ARCH, random_maskrcnn

    model = random_maskrcnn(num_classes=4, min_size=160, max_size=256)
    with torch.no_grad():
        model.rpn.head.cls_logits.bias.fill_(100.0)
    save_checkpoint(tmp_path / "tied.pt", model, arch="small", arch_kwargs=TINY_ARCH,
                    categories=[Category(i, i, f"c{i}") for i in range(1, 4)])
    # 320 px: enough proposals survive NMS that the RPN's first 1000 are picked among ties.
    config = ModelConfig(weights=str(tmp_path / "tied.pt"), min_size=320, max_size=512)
    report = export_onnx(tmp_path / "tied.onnx", ExportConfig(model=config, check_images=(str(SAMPLES / "coins.png"),)))
    assert report.checks[0].ok and report.checks[0].reference > 0
