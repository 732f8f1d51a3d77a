"""Weights: safe loading only, clear errors offline and for files that do not fit."""

from __future__ import annotations

import pickle

import pytest
import torch

from maskseg.config import ModelConfig
from maskseg.errors import UsageError, WeightsError
from maskseg.models import load_model, read_weights_file, resolve_device


class _Evil:
    def __reduce__(self):
        return (print, ("this ran code",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    for protocol in (2, 4):
        with open(path, "wb") as fh:
            pickle.dump({"roi_heads.box_predictor.cls_score.weight": _Evil()}, fh, protocol=protocol)
        with pytest.raises(WeightsError, match="refused"):
            read_weights_file(path)


def test_garbage_and_wrong_model_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="refused: not a file of plain tensors"):
        read_weights_file(junk)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="not a Mask R-CNN state dict"):
        load_model(ModelConfig(weights=str(other), device="cpu"))


def test_offline_without_weights_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as info:
        load_model(ModelConfig(device="cpu"))
    message = str(info.value)
    assert "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "--weights" in message


def test_default_weights_found_in_torch_cache(tmp_path, monkeypatch, tiny_model):
    """Offline users drop torchvision's file into the torch cache; it is then used without a download."""
    from maskseg.synth import random_maskrcnn

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    model = random_maskrcnn("maskrcnn_resnet50_fpn", num_classes=91)
    torch.save(model.state_dict(), cache / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    loaded = load_model(ModelConfig(device="cpu", min_size=128, max_size=128))
    assert loaded.weights_source.endswith("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    assert loaded.category_name(1) == "person" and loaded.category_id(90) == 90


def test_device_names():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UsageError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda:0")


_NO_DYNAMO = """
import sys
import torch
from maskseg.config import ModelConfig
from maskseg.segmenter import Segmenter
from maskseg.models import load_model
seg = Segmenter(ModelConfig(weights=sys.argv[1], device="cpu"))  # the predict path: TorchBackend.load
state = load_model(ModelConfig(weights=sys.argv[1], device="cpu")).module.state_dict()
saved = torch.load(sys.argv[1], weights_only=True)["state_dict"]
assert state.keys() == saved.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
print(sorted(m for m in ("torch._dynamo", "torch._inductor", "triton") if m in sys.modules))
ra = sys.modules["torchvision.ops.roi_align"]  # the module (torchvision.ops.roi_align is the function)
stand_in = ra.is_compile_supported("cpu")  # the stand-in imports the real one when called
import torch._dynamo.utils
print(stand_in == torch._dynamo.utils.is_compile_supported("cpu"), torch._dynamo.utils.__file__ is not None)
"""


def test_loading_the_torch_backend_imports_no_dynamo_and_dynamo_still_works(tiny_checkpoint):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _NO_DYNAMO, str(tiny_checkpoint)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["[]", "True True"]


def test_the_loaded_model_keeps_no_tensor_of_its_checkpoint():
    # a compact (int8) checkpoint's tensors kept as metadata would keep the weights file mapped and resident
    loaded = load_model(ModelConfig(name="demo", device="cpu"))
    meta = loaded.extra["checkpoint"]
    assert meta["categories"] and "int8" not in meta and "state_dict" not in meta

    def tensors(x):
        if isinstance(x, dict):
            return sum(tensors(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(tensors(v) for v in x)
        return int(isinstance(x, torch.Tensor))

    assert tensors(meta) == 0
