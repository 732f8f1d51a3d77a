"""--backend openvino: the CLI-exported tiny ONNX model compiled by OpenVINO, against the torch backend on
real photos (same weights, f32), its own precision choice, the real CLI end to end with resume, and the
messages for what it cannot run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from maskseg.config import ModelConfig
from maskseg.decode import decode_bytes
from maskseg.errors import UsageError, WeightsError
from maskseg.export import compare_detections
from maskseg.segmenter import Segmenter

from ..conftest import SAMPLES, run_cli

pytest.importorskip("openvino", reason="the openvino extra (pip install 'maskseg[openvino]') is not installed")

PHOTOS = ["chelsea.png", "coins.png", "fruits_nuts/7.jpg"]


def _rgb(name: str) -> np.ndarray:
    return decode_bytes((SAMPLES / name).read_bytes(), name)


def test_fp32_parity_with_the_torch_backend_on_real_photos(tiny_checkpoint, tiny_onnx):
    torch_cfg = ModelConfig(weights=str(tiny_checkpoint), device="cpu")
    torch_seg = Segmenter(torch_cfg)
    ov_seg = Segmenter(replace(torch_cfg, weights=str(tiny_onnx[0]), backend="openvino", precision="fp32"))
    assert ov_seg.backend.name == "small" and ov_seg.backend.num_classes == 4
    assert [c.name for c in ov_seg.backend.categories] == ["date", "fig", "hazelnut"]
    for name in PHOTOS:
        rgb = _rgb(name)
        [ref], [got] = torch_seg([rgb]), ov_seg([rgb])
        parity = compare_detections(ref, got, name)
        assert len(ref) == len(got) > 0
        assert parity.ok, parity.describe()
        assert parity.masks_compared > len(ref) // 2


def test_its_own_precision_choice_follows_the_cpu(tiny_onnx):
    """auto: OpenVINO's choice, bf16 where the CPU has bf16 instructions, f32 elsewhere; fp32 forces f32."""
    from maskseg.precision import cpu_bf16_flags

    config = ModelConfig(weights=str(tiny_onnx[0]), backend="openvino")
    auto = Segmenter(replace(config, precision="auto"))
    assert auto.backend.inference_precision == ("bf16" if cpu_bf16_flags() else "f32")
    assert Segmenter(replace(config, precision="fp32")).backend.inference_precision == "f32"
    [dets] = auto([_rgb("chelsea.png")])
    assert len(dets) > 0


def test_cli_predict_with_openvino_gives_the_onnxruntime_results_and_resumes(tiny_onnx, tmp_path):
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "coins.png", images / "coins.png")
    shutil.copy(SAMPLES / "fruits_nuts" / "6.jpg", images / "sub" / "6.jpg")
    common = ["predict", images, "--weights", tiny_onnx[0], "--threads", "2", "--writers", "coco,results"]
    ov_args = [*common, "-o", tmp_path / "ov", "--backend", "openvino", "--precision", "fp32"]
    first = run_cli(*ov_args)
    assert first.returncode == 0, first.stderr
    assert "openvino model small (4 classes)" in first.stderr and "inference precision f32" in first.stderr
    run = json.loads((tmp_path / "ov" / "run.json").read_text())
    assert run["settings"]["backend"] == "openvino" and run["model_name"] == "small"
    again = run_cli(*ov_args)
    assert again.returncode == 0 and "done 0, skipped 2" in again.stderr
    mixed = run_cli(*common, "-o", tmp_path / "ov", "--backend", "openvino", "--precision", "auto")
    assert mixed.returncode == 2 and "other settings" in mixed.stderr and "precision None -> 'auto'" in mixed.stderr

    ort = run_cli(*common, "-o", tmp_path / "ort", "--backend", "onnxruntime")
    assert ort.returncode == 0, ort.stderr
    ov_anns = json.loads((tmp_path / "ov" / "results.json").read_text())
    ort_anns = json.loads((tmp_path / "ort" / "results.json").read_text())
    assert len(ov_anns) == len(ort_anns) > 0
    key = lambda a: (a["image_id"], -a["score"])  # noqa: E731
    for a, b in zip(sorted(ov_anns, key=key), sorted(ort_anns, key=key), strict=True):
        assert a["category_id"] == b["category_id"] and abs(a["score"] - b["score"]) <= 1e-3
        assert np.abs(np.array(a["bbox"]) - b["bbox"]).max() <= 1.0


def test_what_it_cannot_run(tiny_checkpoint, tiny_onnx, tmp_path):
    with pytest.raises(WeightsError, match=r"tiny\.pt: not an ONNX model OpenVINO can compile"):
        Segmenter(ModelConfig(weights=str(tiny_checkpoint), backend="openvino"))
    with pytest.raises(WeightsError, match=r"nothing\.onnx: ONNX model file not found"):
        Segmenter(ModelConfig(weights=str(tmp_path / "nothing.onnx"), backend="openvino"))
    with pytest.raises(UsageError, match=r"--device cuda: the openvino backend runs on the CPU"):
        Segmenter(ModelConfig(weights=str(tiny_onnx[0]), backend="openvino", device="cuda"))
    with pytest.raises(UsageError, match=r"--precision fp16: the openvino backend runs auto"):
        Segmenter(ModelConfig(weights=str(tiny_onnx[0]), backend="openvino", precision="fp16"))
    r = run_cli("predict", SAMPLES / "coins.png", "-o", tmp_path / "o", "--backend", "openvino")
    assert r.returncode == 2 and "needs --weights MODEL.onnx" in r.stderr and "Traceback" not in r.stderr
