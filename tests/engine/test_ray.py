"""--engine ray with 2 workers: the local engine's outputs and ids; a killed worker or driver loses no
image. Starting Ray costs 10-20 s, so it starts twice here: once by a killed CLI run (a local Ray of its
own), once in this process as a cluster that the resumed CLI run joins with --ray-address and the
worker-kill run uses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from maskseg.config import EngineConfig, ModelConfig, PredictConfig
from maskseg.engine import LocalEngine
from maskseg.engine.ray import ModelWorker, RayEngine
from maskseg.errors import UsageError, WeightsError
from maskseg.sources import scan_sources

from ..conftest import SAMPLES, run_cli
from ..test_merge import comparable_outputs

pytest.importorskip("ray.data")

PHOTOS = ["chelsea.png", "coins.png", "rocket.jpg", "coffee.png", "fruits_nuts/6.jpg", "fruits_nuts/7.jpg"]
COMMON = ["--writers", "coco,results,overlay,masks", "--max-dets", "8"]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray cluster, started in this process, that other processes join by its address."""
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, object_store_memory=300 * 1024**2,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def short_ray_tmpdir() -> Path:
    """A new folder for RAY_TMPDIR, short because Ray's socket paths under it must fit in 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))


@pytest.fixture
def photos(tmp_path) -> Path:
    """Twelve real photos (six, twice, in two folders), a truncated JPEG and a 1x4000 strip of a photo
    (it decodes, but the model's resize leaves it no pixels: a per-image model failure)."""
    import cv2

    folder = tmp_path / "photos"
    for sub in ("a", "b"):
        (folder / sub).mkdir(parents=True)
        for name in PHOTOS:
            shutil.copy(SAMPLES / name, folder / sub / Path(name).name)
    (folder / "a" / "broken.jpg").write_bytes((SAMPLES / "rocket.jpg").read_bytes()[:3000])
    row = cv2.imread(str(SAMPLES / "rocket.jpg"))[200:201]
    cv2.imwrite(str(folder / "b" / "strip.png"), cv2.resize(row, (4000, 1)))
    return folder


def _config(weights: Path, **engine) -> PredictConfig:
    """Writers that read no pixels: results come back without them (the CLI test ships pixels)."""
    return PredictConfig(model=ModelConfig(weights=str(weights), max_dets=8),
                         engine=EngineConfig(name="ray", **engine), writers=("coco",))


def _done_lines(out: Path) -> int:
    journal = out / "journal.jsonl"
    return journal.read_bytes().count(b'"kind":"done"') if journal.exists() else 0


def test_without_ray_the_engine_says_what_to_install(monkeypatch, tiny_checkpoint):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r"pip install 'maskseg\[ray\]'"):
        RayEngine(_config(tiny_checkpoint)).start()


def test_engine_options_are_checked_before_anything_starts(tiny_checkpoint):
    assert RayEngine(_config(tiny_checkpoint)).worker_model.device == "cpu"
    assert RayEngine(_config(tiny_checkpoint, gpus_per_worker=1)).worker_model.device == "cuda"
    assert RayEngine(_config(tiny_checkpoint, threads_per_worker=3)).worker_model.threads == 3
    cuda = PredictConfig(model=ModelConfig(device="cuda"), engine=EngineConfig(name="ray"))
    with pytest.raises(UsageError, match="--gpus-per-worker"):
        RayEngine(cuda)
    one_gpu = PredictConfig(model=ModelConfig(device="cuda:1"), engine=EngineConfig(name="ray", gpus_per_worker=1))
    with pytest.raises(UsageError, match="assigns each worker its GPU"):
        RayEngine(one_gpu)
    with pytest.raises(UsageError, match="Ray Client"):  # Ray Data's executor needs a driver in the cluster
        RayEngine(PredictConfig(engine=EngineConfig(name="ray", address="ray://head:10001")))


@pytest.mark.slow
def test_ray_run_killed_mid_way_resumes_to_the_local_engines_outputs(photos, tiny_checkpoint, tmp_path,
                                                                     monkeypatch, ray_address):
    # One torch thread on both sides (each Ray worker runs one), so the float math is the same.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    r = run_cli("predict", photos, "-o", local, "--weights", tiny_checkpoint, *COMMON)
    assert r.returncode == 3, r.stderr

    args = [sys.executable, "-m", "maskseg", "predict", str(photos), "-o", str(on_ray), "--weights",
            str(tiny_checkpoint), "--engine", "ray", "--workers", "2", *COMMON]
    # Without --ray-address the run starts a Ray of its own, even where RAY_ADDRESS and Ray's
    # ray_current_cluster file (written by `ray start`) name a cluster that is up: the one of this module.
    ray_tmp = short_ray_tmpdir()
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(ray_address)
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_ADDRESS=ray_address)
    with open(tmp_path / "killed.log", "wb") as log:
        # Its own session, so the kill takes the driver with the Ray it started (as a job scheduler does).
        driver = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True, env=env)
        deadline = time.monotonic() + 240
        while _done_lines(on_ray) == 0 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    sessions = list((ray_tmp / "ray").glob("session_2*"))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    assert len(sessions) == 1, sessions  # the Ray it started itself
    done_before = _done_lines(on_ray)
    assert 1 <= done_before < 12, done_before

    r = run_cli("predict", photos, "-o", on_ray, "--weights", tiny_checkpoint, "--engine", "ray", "--workers", "2",
                "--ray-address", ray_address, *COMMON)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    assert f"done {12 - done_before}, skipped {done_before}" in r.stderr
    got, expected = comparable_outputs(on_ray), comparable_outputs(local)
    assert [i["file_name"] for i in got["images"]] == sorted(i["file_name"] for i in got["images"])
    assert len(expected["images"]) == 12 and len(expected["annotations"]) > 0
    assert "a/broken.jpg" in expected["failures"] and "b/strip.png" in expected["failures"]
    assert got == expected


class WindowsCounted(RayEngine):
    """The engine, noting the size of each window of refs it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.windows: list[int] = []

    def _dataset(self, refs):
        self.windows.append(len(refs))
        return super()._dataset(refs)


@pytest.mark.slow
def test_worker_killed_mid_run_loses_no_image(photos, tiny_checkpoint, tmp_path, ray_address):
    """In windows of 5 refs (as a long run goes in windows of 50,000): the local engine's detections, in
    the order of the refs, across windows and a worker that dies in the first one."""
    marker = tmp_path / "a-worker-died"

    class DiesOnItsThirdImage(ModelWorker):
        """The first actor to reach its third image exits at once, as a crashed or preempted worker does."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.images = 0

        def __call__(self, batch):
            self.images += len(batch["idx"])
            if self.images >= 3 and not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    config = _config(tiny_checkpoint, workers=2)
    refs = scan_sources([str(photos)]).refs
    engine = WindowsCounted(config, actor_cls=DiesOnItsThirdImage, images_per_window=5)
    info = engine.start()
    try:
        results = list(engine.run(refs))
    finally:
        engine.close()
    import ray

    assert ray.is_initialized()  # close() leaves a Ray it did not start running
    assert marker.exists()
    assert len(refs) == 14 and engine.windows == [5, 5, 4]
    assert [c.name for c in info.categories] == ["date", "fig", "hazelnut"]
    images = [d for r in results for d in r.images]
    failures = {f.ref.rel_path: f.reason for r in results for f in r.failures}
    assert sorted(failures) == ["a/broken.jpg", "b/strip.png"]
    assert "the model failed on this 4000x1 image" in failures["b/strip.png"]
    assert [d.ref.rel_path for d in images] == [r.rel_path for r in refs if r.rel_path not in failures]

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers
    try:
        reference = LocalEngine(config)
        reference.start()
        expected = [(d.ref.rel_path, dets) for r in reference.run(refs)
                    for d, dets in zip(r.images, r.detections, strict=True)]
    finally:
        torch.set_num_threads(threads)
    got = [(d.ref.rel_path, dets) for r in results for d, dets in zip(r.images, r.detections, strict=True)]
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert sum(len(d) for _, d in got) > 0
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
        assert np.array_equal(a.labels, b.labels)
        assert [m.rle() for m in a.masks] == [m.rle() for m in b.masks]
    assert json.dumps([d.to_coco() for _, d in got]) == json.dumps([d.to_coco() for _, d in expected])


@pytest.mark.slow
def test_a_worker_that_cannot_load_the_model_is_a_one_line_error(photos, tiny_checkpoint, ray_address):
    class WeightsMissingOnThisNode(ModelWorker):
        def __init__(self, *args, **kwargs):
            super().__init__(replace(kwargs.pop("model"), weights="/nowhere/w.pt"), **kwargs)

    engine = RayEngine(_config(tiny_checkpoint, workers=1), actor_cls=WeightsMissingOnThisNode)
    engine.start()  # the driver can read the weights; the worker cannot
    try:
        with pytest.raises(WeightsError, match=r"/nowhere/w\.pt: weights file not found"):
            list(engine.run(scan_sources([str(photos)]).refs))
    finally:
        engine.close()
