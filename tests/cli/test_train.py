"""`maskseg train` as a user runs it (a real subprocess): train, predict with the checkpoint, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskseg.training import read_coco, read_metrics

from ..conftest import ROOT, run_cli
from ..training.test_training import FAST_ARCH, tiny_fruits

# The README's held-out segm AP for the bundled model is DEMO_AP; this leaves room for score ties.
DEMO_MIN_SEGM_AP = 0.5
TINY_OPTIONS = ("--model", "small", "--arch-kwargs", json.dumps(FAST_ARCH), "--min-size", "120", "--max-size", "160",
                "--workers", "0", "--lr", "1e-3", "--warmup-iters", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_fruits(tmp_path_factory.mktemp("fruits"))


def test_train_predict_resume(data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--coco", data, "--images", data.parent / "images", "-o", run, "--val-split", "0.25",
                "--epochs", "1", *TINY_OPTIONS)
    assert r.returncode == 0, r.stderr
    assert "training small (from scratch) on 3 images" in r.stderr
    assert "epoch 1 done at step 2" in r.stderr and "validation bbox AP" in r.stderr
    assert f"--weights {run / 'best.pt'}" in r.stderr
    for name in ("best.pt", "last.pt", "metrics.jsonl", "training.png", "train.json", "val.json"):
        assert (run / name).is_file(), name

    out = tmp_path / "out"
    r = run_cli("predict", data.parent / "images" / "0.jpg", "-o", out, "--weights", run / "best.pt",
                "--score-thresh", "0.01")
    assert r.returncode == 0, r.stderr
    predictions = json.loads((out / "predictions.json").read_text())
    assert [(c["id"], c["name"]) for c in predictions["categories"]] == [(5, "fig"), (17, "date"), (90, "hazelnut")]
    assert predictions["images"][0]["width"] == 160
    assert {a["category_id"] for a in predictions["annotations"]} <= {5, 17, 90}

    r = run_cli("train", "--coco", data, "--images", data.parent / "images", "-o", run, *TINY_OPTIONS)
    assert r.returncode == 2 and f"--resume {run}" in r.stderr

    r = run_cli("train", "--resume", run, "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "at step 2 of 4" in r.stderr
    steps = [m["step"] for m in read_metrics(run) if m["kind"] == "step"]
    epochs = [m["epoch"] for m in read_metrics(run) if m["kind"] == "epoch"]
    assert steps == [1, 2, 3, 4] and epochs == [1, 2]


def test_malformed_annotations_are_a_usage_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 0, "file_name": "a.jpg", "width": 4, "height": 4}],
                               "categories": [{"id": 1, "name": "a"}],
                               "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "segmentation": [[1, 2]]}]}))
    r = run_cli("train", "--coco", bad, "--images", tmp_path, "-o", tmp_path / "run")
    assert r.returncode == 2
    assert f"maskseg: error: {bad}: annotations[0] (id 0): a polygon must be" in r.stderr
    assert "Traceback" not in r.stderr


def test_quick_start_offline_with_the_bundled_demo_model(tmp_path):
    """The README's offline quick start: no --weights, no network; on the four held-out photos the
    demo model's masks score as the README says (segm AP measured by `maskseg eval`)."""
    out = tmp_path / "out"
    r = run_cli("predict", ROOT / "sample_images" / "fruits_nuts", "-o", out, "--model", "demo")
    assert r.returncode == 0, r.stderr
    assert "bundled demo" in r.stderr
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(c["name"] for c in predictions["categories"]) == ["date", "fig", "hazelnut"]
    assert len(predictions["images"]) == 4 and len(predictions["annotations"]) >= 20

    _, val = read_coco(ROOT / "tests" / "data" / "fruits_nuts" / "trainval.json").split(0.2)
    (tmp_path / "val.json").write_text(json.dumps(val.data))
    r = run_cli("eval", "--coco", tmp_path / "val.json", "--results", out / "predictions.json",
                "--fail-under", str(DEMO_MIN_SEGM_AP))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_demo_model_finds_no_fruit_in_the_other_quick_start_photos(tmp_path):
    """The README's quick start over all of sample_images/: the demo's first impression. It was trained
    with negative photos, so the cup, the cat, the astronaut, the coins and the rocket hold no fruit at
    the default score threshold, while the fruit photos still hold many."""
    out = tmp_path / "out"
    r = run_cli("predict", ROOT / "sample_images", "-o", out, "--model", "demo")
    assert r.returncode == 0, r.stderr
    predictions = json.loads((out / "predictions.json").read_text())
    names = {im["id"]: im["file_name"] for im in predictions["images"]}
    found: dict[str, int] = {}
    for a in predictions["annotations"]:
        found[names[a["image_id"]]] = found.get(names[a["image_id"]], 0) + 1
    others = [n for n in names.values() if not n.startswith("fruits_nuts/")]
    assert sorted(others) == ["astronaut.png", "chelsea.png", "coffee.png", "coins.png", "rocket.jpg"]
    assert {n: found.get(n, 0) for n in others} == dict.fromkeys(others, 0)
    assert sum(found.get(n, 0) for n in names.values() if n.startswith("fruits_nuts/")) >= 30


def test_torchrun_two_processes_on_cpu(data, tmp_path):
    """The same command under torchrun (DistributedDataParallel, gloo on CPU): one run folder, rank 0 writes."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "maskseg",
         "train", "--coco", str(data), "--images", str(data.parent / "images"), "-o", str(run), "--epochs", "1",
         *TINY_OPTIONS], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 epochs x 1 steps of 4 images" in r.stderr
    assert [m["step"] for m in read_metrics(run) if m["kind"] == "step"] == [1]
    assert (run / "best.pt").is_file()
