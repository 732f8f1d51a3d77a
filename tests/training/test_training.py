"""The training loop on a tiny real dataset (fruits_nuts photos at 160x120) with a tiny model on CPU."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from maskseg.config import ModelConfig, TrainConfig
from maskseg.errors import UsageError
from maskseg.models import load_model, read_weights_file, save_checkpoint
from maskseg.segmenter import Segmenter
from maskseg.synth import TINY_ARCH
from maskseg.training import build_for_training, coco_ap, export_int8, read_metrics, resume, set_trainable, train

from ..conftest import ROOT

FRUITS = ROOT / "tests" / "data" / "fruits_nuts"
# Category ids far from 1..K and out of order, to see them mapped to labels and back.
IDS = {1: 17, 2: 5, 3: 90}

# The tiny test model with fewer RPN proposals and RoI samples per image: the same code, less arithmetic.
FAST_ARCH = {**TINY_ARCH, "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 100,
             "box_batch_size_per_image": 64}
TINY = TrainConfig(model="small", arch_kwargs=FAST_ARCH, epochs=2, batch_size=2, lr=1e-3, warmup_iters=2,
                   min_size=120, max_size=160, workers=0, hflip=0.0, seed=0)


def tiny_fruits(folder: Path, image_ids: tuple[int, ...] = (0, 1, 3, 14), scale: float = 0.2) -> Path:
    """fruits_nuts photos ``image_ids`` shrunk by ``scale`` (800x600 -> 160x120) with their polygons, as a
    COCO file whose category ids are ``IDS`` (17 date, 5 fig, 90 hazelnut). Returns the JSON path."""
    data = json.loads((FRUITS / "trainval.json").read_text())
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for im in data["images"]:
        if im["id"] in image_ids:
            w, h = round(im["width"] * scale), round(im["height"] * scale)
            photo = cv2.imread(str(FRUITS / "images" / im["file_name"]))
            small = cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(folder / "images" / im["file_name"]), small)
            images.append({**im, "width": w, "height": h})
    annotations = [
        {**a, "category_id": IDS[a["category_id"]], "bbox": [v * scale for v in a["bbox"]],
         "area": a["area"] * scale * scale, "segmentation": [[v * scale for v in p] for p in a["segmentation"]]}
        for a in data["annotations"] if a["image_id"] in image_ids
    ]
    categories = [{"id": IDS[c["id"]], "name": c["name"]} for c in data["categories"]]
    path = folder / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_fruits(tmp_path_factory.mktemp("fruits"))


def _steps(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if r["kind"] == "step"]


def test_a_few_steps_lower_the_loss(data, tmp_path):
    """Ten steps on the same two photos (no augmentation): the loss falls well below where it started.
    The two photos are listed five times each, so the ten steps are one epoch (one checkpoint)."""
    ann = json.loads(data.read_text())
    images = [im for im in ann["images"] if im["id"] in (0, 1)]
    repeated = {"categories": ann["categories"], "images": [], "annotations": []}
    for copy in range(5):
        for im in images:
            repeated["images"].append({**im, "id": im["id"] + 100 * copy})
            repeated["annotations"] += [{**a, "id": a["id"] + 1000 * copy, "image_id": im["id"] + 100 * copy}
                                        for a in ann["annotations"] if a["image_id"] == im["id"]]
    two = data.with_name("two.json")
    two.write_text(json.dumps(repeated))
    summary = train(two, data.parent / "images", tmp_path / "run",
                    replace(TINY, epochs=1, batch_size=1, warmup_iters=1, lr_schedule="constant"))
    losses = [r["loss"] for r in _steps(tmp_path / "run")]
    assert summary.steps == len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_resume_continues_from_the_saved_step_as_if_never_stopped(data, tmp_path):
    """Stopped after step 3 of 4, then resumed: steps 4 on are those of an uninterrupted run (same
    batches, augmentations, RNG and optimizer state), and the final weights are the same."""
    config = replace(TINY, hflip=0.5, vflip=0.5, color_jitter=0.2, copy_paste=0.5)
    train(data, data.parent / "images", tmp_path / "whole", config)

    stop = threading.Event()

    class StopAfterThree:
        def start(self, total_steps, start_step, images_per_step):
            pass

        def step(self, record):
            if record["step"] == 3:
                stop.set()

        def epoch(self, record):
            pass

    stopped = train(data, data.parent / "images", tmp_path / "broken", config, progress=StopAfterThree(), stop=stop)
    assert stopped.interrupted and stopped.steps == 3
    assert read_weights_file(tmp_path / "broken" / "last.pt")["train"]["step"] == 3
    with pytest.raises(UsageError, match="--resume"):
        train(data, data.parent / "images", tmp_path / "broken", config)

    resumed = resume(tmp_path / "broken")
    assert resumed.steps == 4 and not resumed.interrupted
    whole, broken = _steps(tmp_path / "whole"), _steps(tmp_path / "broken")
    assert [r["step"] for r in broken] == [1, 2, 3, 4]
    assert broken[3]["loss"] == pytest.approx(whole[3]["loss"], rel=1e-4)
    assert broken[3]["lr"] == pytest.approx(whole[3]["lr"])
    a = read_weights_file(tmp_path / "whole" / "last.pt")["state_dict"]
    b = read_weights_file(tmp_path / "broken" / "last.pt")["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_checkpoint_predicts_unaided_and_category_ids_round_trip(data, tmp_path):
    run = tmp_path / "run"
    summary = train(data, data.parent / "images", run, replace(TINY, val_split=0.25, epochs=1))
    assert summary.best_epoch == 1 and {"bbox_AP", "segm_AP", "segm_AP50"} <= set(summary.metrics)
    assert json.loads((run / "val.json").read_text())["images"][0]["id"] == 14
    checkpoint = read_weights_file(run / "best.pt")
    assert checkpoint["arch"] == {"name": "small", "kwargs": FAST_ARCH}
    assert checkpoint["train"]["config"]["lr"] == TINY.lr and checkpoint["versions"]["torch"]
    assert checkpoint["thresholds"] == {"score": 0.5, "mask": 0.5} and "optimizer" not in checkpoint

    loaded = load_model(ModelConfig(weights=str(run / "best.pt"), device="cpu", score_thresh=0.0))
    assert [(c.label, c.id, c.name) for c in loaded.categories] == [(1, 5, "fig"), (2, 17, "date"), (3, 90, "hazelnut")]
    assert loaded.module.transform.min_size == (120,) and loaded.module.transform.max_size == 160
    photo = cv2.cvtColor(cv2.imread(str(data.parent / "images" / "0.jpg")), cv2.COLOR_BGR2RGB)
    [dets] = Segmenter(loaded=loaded)([photo])
    assert len(dets) > 0 and set(dets.labels.tolist()) <= {5, 17, 90}
    assert (run / "training.png").stat().st_size > 1000


def test_coco_ap_of_ground_truth_is_one():
    gt = json.loads((FRUITS / "trainval.json").read_text())
    gt = {**gt, "images": gt["images"][:3],
          "annotations": [a for a in gt["annotations"] if a["image_id"] in (0, 1, 2)]}
    gt["annotations"][0] = {k: v for k, v in gt["annotations"][0].items() if k not in ("area", "bbox")} | {"id": 0}
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                "bbox": a.get("bbox", [101.0, 118.0, 136.0, 167.0]),  # the bbox file gives annotation 1
                "segmentation": a["segmentation"]} for a in gt["annotations"]]
    assert coco_ap(gt, results) == {f"{t}_{k}": 1.0 for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")}
    assert coco_ap(gt, [])["segm_AP"] == 0.0


def test_weights_with_other_classes_get_new_predictors(tiny_model, tmp_path):
    """A 4-class checkpoint fine-tuned to 3 classes: its own architecture, all but the predictors kept."""
    from maskseg.models import Category

    path = tmp_path / "four.pt"
    save_checkpoint(path, tiny_model, arch="small", arch_kwargs=TINY_ARCH,
                    categories=[Category(i, i, f"c{i}") for i in (1, 2, 3)], min_size=160, max_size=256)
    module, arch, kwargs, source = build_for_training("maskrcnn_resnet50_fpn", str(path), 3, {}, {})
    assert (arch, kwargs, source) == ("small", TINY_ARCH, str(path))
    assert module.roi_heads.box_predictor.cls_score.out_features == 3
    assert module.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    assert module.transform.min_size == (160,)
    before = tiny_model.state_dict()
    after = module.state_dict()
    assert torch.equal(after["backbone.fpn.layer_blocks.0.0.weight"], before["backbone.fpn.layer_blocks.0.0.weight"])
    assert torch.equal(after["roi_heads.box_head.fc6.weight"], before["roi_heads.box_head.fc6.weight"])


def test_trainable_layers_and_frozen_backbone(tiny_model):
    import copy

    module = copy.deepcopy(tiny_model)
    set_trainable(module, 2)
    body = dict(module.backbone.body.named_parameters())
    assert body["layer4.0.conv1.weight"].requires_grad and body["layer3.0.conv1.weight"].requires_grad
    assert not body["layer2.0.conv1.weight"].requires_grad and not body["conv1.weight"].requires_grad
    assert all(p.requires_grad for p in module.backbone.fpn.parameters())
    set_trainable(module, 5, freeze_backbone=True)
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert all(p.requires_grad for p in module.roi_heads.parameters())


def test_int8_export_is_a_quarter_and_predicts_alike(tiny_checkpoint, tmp_path):
    small = export_int8(tiny_checkpoint, tmp_path / "tiny-int8.pt")
    assert small.stat().st_size < 0.3 * tiny_checkpoint.stat().st_size
    full = load_model(ModelConfig(weights=str(tiny_checkpoint), device="cpu"))
    compact = load_model(ModelConfig(weights=str(small), device="cpu"))
    assert compact.categories == full.categories
    photo = cv2.cvtColor(cv2.imread(str(FRUITS / "images" / "0.jpg")), cv2.COLOR_BGR2RGB)
    [a] = Segmenter(loaded=full)([photo])
    [b] = Segmenter(loaded=compact)([photo])
    assert len(a) > 0 and abs(len(a) - len(b)) <= max(2, len(a) // 10)
    # The strongest detection survives quantization at nearly the same place.
    best = torch.as_tensor(a.boxes[np.argmax(a.scores)])[None]
    assert float(box_iou(best, torch.as_tensor(b.boxes)).max()) > 0.8
