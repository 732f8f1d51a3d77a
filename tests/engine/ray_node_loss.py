"""The node-loss scenario of ``test_ray_cluster``, run in a process (and session) of its own:

    python -m tests.engine.ray_node_loss WEIGHTS PHOTOS WORKDIR

It starts a two-node ``ray.cluster_utils.Cluster`` (a head of 3 CPUs, a worker node of 2), runs
``RayEngine`` over PHOTOS with two model actors that record the node they land on, removes the worker
node (no grace: a preempted machine) once the first batch is back and both nodes hold an actor, lets
the run finish, and writes WORKDIR/results.json: where the actors landed and, per image, its boxes and
scores or its failure. The test compares that with the local engine.

Why a process of its own: this process is the cluster's owner and the run's driver, and a node that
goes away takes Ray's raylets, process groups and signal handlers with it; if anything there ends the
driver, it ends this process, not the test session, and the test says how it ended."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from maskseg.engine.ray import ModelWorker, RayEngine
from maskseg.sources import scan_sources

from .test_ray import _config

PLACEMENT_WAIT_S = 120  # under load the second actor may still be loading its model


def two_node_cluster():  # -> (ray.cluster_utils.Cluster, its worker node)
    """A head node (3 CPUs) and a worker node (2 CPUs) on this machine, not joined by this process."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 3, "object_store_memory": 150 * 1024**2,
                                      "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, object_store_memory=150 * 1024**2)
    cluster.wait_for_nodes()
    return cluster, worker


def run(weights: Path, photos: Path, work: Path) -> dict:
    """The scenario; returns what results.json holds."""
    nodes = work / "nodes"
    nodes.mkdir(parents=True)

    class RecordsItsNode(ModelWorker):
        """Writes the id of the node it runs on, one file per actor process."""

        def __init__(self, *args, **kwargs):
            import ray

            super().__init__(*args, **kwargs)
            (nodes / f"{os.getpid()}-{ray.get_runtime_context().get_node_id()}").touch()

    def placed() -> set[str]:
        return {p.name.split("-", 1)[1] for p in nodes.iterdir()}

    cluster, worker = two_node_cluster()
    report: dict = {"head": cluster.head_node.node_id, "worker": worker.node_id, "removed": False}
    refs = scan_sources([str(photos)]).refs
    engine = RayEngine(_config(weights, workers=2, address=cluster.address), actor_cls=RecordsItsNode)
    results = []
    try:
        engine.start()
        for step in engine.run(refs):
            results.append(step)
            if len(results) == 1:  # the worker node goes away with work in flight
                deadline = time.monotonic() + PLACEMENT_WAIT_S
                while len(placed()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.5)
                report["placed"] = sorted(placed())
                if worker.node_id in report["placed"]:
                    cluster.remove_node(worker, allow_graceful=False)
                    report["removed"] = True
    finally:
        engine.close()  # leaves the Ray it joined
        cluster.shutdown()
    report["refs"] = [r.rel_path for r in refs]
    report["done"] = {d.ref.rel_path: {"boxes": dets.boxes.tolist(), "scores": dets.scores.tolist()}
                      for r in results for d, dets in zip(r.images, r.detections, strict=True)}
    report["done_count"] = sum(len(r.images) for r in results)
    report["failed"] = [f.ref.rel_path for r in results for f in r.failures]
    return report


def main(argv: list[str]) -> int:
    weights, photos, work = map(Path, argv)
    report = run(weights, photos, work)
    tmp = work / "results.json.tmp"
    tmp.write_text(json.dumps(report))
    tmp.replace(work / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
