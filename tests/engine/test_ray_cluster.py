"""--engine ray on a real two-node Ray cluster on this machine (Ray's own ``cluster_utils.Cluster``: two
raylets with their own ports and object stores): the CLI joins it with --ray-address and gives the local
engine's outputs; model actors land on both nodes; a node removed mid-run loses no image."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from maskseg.engine import LocalEngine
from maskseg.engine.ray import RayEngine
from maskseg.sources import scan_sources

from ..conftest import ROOT, run_cli
from ..test_merge import comparable_outputs
from .ray_node_loss import two_node_cluster
from .test_ray import COMMON, _config, photos, short_ray_tmpdir  # noqa: F401 - photos is a fixture

pytest.importorskip("ray.data")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server (moto) on loopback, named by AWS_ENDPOINT_URL in the environment the Ray nodes start
    with (a worker reads objects with its own node's credentials), or None without s3fs and moto."""
    try:
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    srv.stop()


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """``two_node_cluster``'s cluster and worker node, not joined by this process until a run does."""
    c, worker = two_node_cluster()
    yield c, worker
    import ray

    ray.shutdown()
    c.shutdown()


def test_the_cli_joins_a_two_node_cluster_with_the_local_engines_outputs(cluster, photos, tiny_checkpoint,  # noqa: F811
                                                                         tmp_path, monkeypatch):
    c, _ = cluster
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one torch thread, as in each Ray worker: the same float math
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    r = run_cli("predict", photos, "-o", local, "--weights", tiny_checkpoint, *COMMON)
    assert r.returncode == 3, r.stderr
    r = run_cli("predict", photos, "-o", on_ray, "--weights", tiny_checkpoint, "--engine", "ray", "--workers", "2",
                "--ray-address", c.address, *COMMON)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and "done 12," in r.stderr
    assert comparable_outputs(on_ray) == comparable_outputs(local)


def test_actors_on_both_nodes_and_a_node_lost_mid_run_loses_nothing(photos, tiny_checkpoint,  # noqa: F811
                                                                    tmp_path):
    """A cluster of its own, owned and driven by a process of its own (``ray_node_loss``, in a new
    session): whatever the lost node's teardown does to its driver cannot end this test session, and a
    driver that dies is reported with Ray's own logs. A driver that dies is tried once more, with a
    warning; lost or wrong images are never retried."""
    report, first_death = None, None
    for attempt in (1, 2):
        work = tmp_path / f"attempt{attempt}"
        work.mkdir()
        report, death = _node_loss_run(tiny_checkpoint, photos, work)
        if report is not None:
            break
        if first_death is not None:
            pytest.fail(f"the driver died twice:\n{first_death}\n---\n{death}")
        first_death = death
    if first_death is not None:
        warnings.warn(f"the node-loss driver died once and passed on its second try:\n{first_death}",
                      stacklevel=1)
    assert report is not None
    assert set(report.get("placed", ())) == {report["head"], report["worker"]}, "the actors did not land on both nodes"
    assert report["removed"]
    assert sorted(report["failed"]) == ["a/broken.jpg", "b/strip.png"]
    assert report["done_count"] == len(report["done"])  # no image twice
    assert sorted([*report["done"], *report["failed"]]) == sorted(report["refs"])  # every image once

    import torch

    config = _config(tiny_checkpoint, workers=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one torch thread, as in each Ray worker: the same float math
    try:
        reference = LocalEngine(config)
        reference.start()
        expected = {d.ref.rel_path: dets for r in reference.run(scan_sources([str(photos)]).refs)
                    for d, dets in zip(r.images, r.detections, strict=True)}
    finally:
        torch.set_num_threads(threads)
    assert report["done"].keys() == expected.keys()
    for rel, dets in report["done"].items():
        assert np.array_equal(np.asarray(dets["boxes"], np.float32).reshape(-1, 4), expected[rel].boxes)
        assert np.array_equal(np.asarray(dets["scores"], np.float32), expected[rel].scores)


def _node_loss_run(weights: Path, folder: Path, work: Path) -> tuple[dict | None, str | None]:
    """Runs ``ray_node_loss`` in a new session, with a Ray temp folder of its own; (its report, None),
    or (None, how its driver died)."""
    ray_tmp = short_ray_tmpdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore", RAY_TMPDIR=str(ray_tmp))
    try:
        with open(work / "driver.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tests.engine.ray_node_loss", str(weights), str(folder),
                                     str(work)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=600)
            finally:
                with contextlib.suppress(ProcessLookupError):  # what its Ray left behind in its session
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        results = work / "results.json"
        if proc.returncode == 0 and results.exists():
            return json.loads(results.read_text()), None
        said = (work / "driver.log").read_text(errors="replace")[-4000:]
        return None, f"exit {proc.returncode}; it said:\n{said}{_ray_logs_tail(ray_tmp / 'ray')}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _ray_logs_tail(ray_dir: Path, lines: int = 15) -> str:
    """The last lines of the Ray session's driver and raylet logs, for a driver that died."""
    said = []
    for session in sorted(ray_dir.glob("session_2*")):
        for name in ("python-core-driver-*.log", "raylet*.out", "raylet*.err", "gcs_server.out"):
            for path in sorted((session / "logs").glob(name)):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                said.append(f"\n--- {session.name}/{path.name}:\n" + "\n".join(tail))
    return "".join(said)


def test_workers_read_objects_from_their_urls(cluster, s3_endpoint, photos, tiny_checkpoint,  # noqa: F811
                                               monkeypatch):
    """s3:// inputs on the cluster: the workers read each object themselves; the driver reads none."""
    if s3_endpoint is None:
        pytest.skip("the s3 extra and moto[server] are not installed")
    import boto3

    from maskseg import objects

    c, _ = cluster
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="cluster-photos")
    for p in sorted((photos / "a").iterdir()):
        s3.put_object(Bucket="cluster-photos", Key=f"a/{p.name}", Body=p.read_bytes())
    refs = scan_sources(["s3://cluster-photos/"]).refs
    assert refs and all(r.etag for r in refs)

    def not_here(url, etag):
        raise AssertionError(f"the driver read {url}")

    monkeypatch.setattr(objects, "read_object", not_here)
    engine = RayEngine(_config(tiny_checkpoint, workers=2, address=c.address))
    engine.start()
    try:
        results = list(engine.run(refs))
    finally:
        engine.close()
    done = {d.ref.rel_path: d.size for r in results for d in r.images}
    failed = {f.ref.rel_path: f.reason for r in results for f in r.failures}
    assert sorted(failed) == ["a/broken.jpg"] and len(done) + 1 == len(refs)
    assert all(done[r.rel_path] == r.size for r in refs if r.rel_path in done)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
