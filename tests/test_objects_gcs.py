"""gs:// inputs against a real GCS-protocol server (gcp-storage-emulator, in a thread on 127.0.0.1), driven
through the real CLI with the standard emulator environment: a prefix, a glob, a list file of URLs, a
missing object and bucket, an object rewritten between runs (new generation), and resume after a kill.
Predictions must equal those of the same photos read from local disk."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("gcsfs", reason="the gcs extra (pip install 'maskseg[gcs]') is not installed")
pytest.importorskip("gcp_storage_emulator.server",
                    reason="gcp-storage-emulator (the dev extra) is not installed")

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from tests.conftest import SAMPLES
from tests.objectstore import FAST, PHOTOS, done_records, free_port, kill_after_two_batches, photo_key, png, run

_GOOGLE_ENV = ("GOOGLE_", "GCSFS_", "CLOUDSDK_", "GCE_", "STORAGE_EMULATOR_HOST")


def _env(endpoint: str) -> dict[str, str]:
    """What a user of a GCS emulator sets: ``STORAGE_EMULATOR_HOST`` (maskseg then sends no credentials,
    so nothing asks the GCE metadata server), and gcsfs's switch off for its gRPC bucket-type probe,
    which emulators do not answer (each request would first wait out its 60 s of retries)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_GOOGLE_ENV)}
    env.update(STORAGE_EMULATOR_HOST=endpoint, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", PYTHONWARNINGS="ignore",
               COLUMNS="200")
    return env


@pytest.fixture(scope="module")
def server():
    """A gcp-storage-emulator server (in memory) in a thread, on a free loopback port."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    srv = create_server("127.0.0.1", port, in_memory=True)
    srv.start()
    yield f"http://127.0.0.1:{port}"
    srv.stop()


@pytest.fixture
def bucket(server, request) -> storage.Bucket:
    """A fresh bucket holding the sample photos under photos/ (two in photos/sub/) and a text file,
    written with Google's own client (not gcsfs, the library under test)."""
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": server})
    b = client.create_bucket("b-" + request.node.name.lower().replace("_", "-")[:40])
    for i, photo in enumerate(PHOTOS):
        b.blob(photo_key(i, photo)).upload_from_filename(SAMPLES / photo)
    b.blob("photos/notes.txt").upload_from_string(b"not an image")
    return b


def _predictions(out: Path) -> dict[str, dict]:
    """predictions.json by file name: size and annotations (ids left out: they follow run order)."""
    coco = json.loads((out / "predictions.json").read_text())
    names = {i["id"]: i["file_name"] for i in coco["images"]}
    found = {i["file_name"]: {"size": (i["width"], i["height"]), "annotations": []} for i in coco["images"]}
    for a in coco["annotations"]:
        found[names[a["image_id"]]]["annotations"].append({k: v for k, v in a.items() if k not in ("id", "image_id")})
    return found


def test_prefix_matches_local_disk_and_resumes_by_generation(server, bucket, images, tmp_path, tiny_checkpoint):
    env, out, local = _env(server), tmp_path / "out", tmp_path / "local"
    url = f"gs://{bucket.name}/photos/"
    r = run(env, "predict", url, "-o", out, "--weights", tiny_checkpoint, *FAST)
    assert r.returncode == 0, r.stderr
    r = run(env, "predict", images, "-o", local, "--weights", tiny_checkpoint, *FAST)
    assert r.returncode == 0, r.stderr
    found = _predictions(out)
    assert sorted(found) == ["chelsea.png", "coins.png", "sub/6.jpg", "sub/rocket.jpg"]
    assert found == _predictions(local)
    assert any(p["annotations"] for p in found.values())

    blob = bucket.get_blob("photos/coins.png")
    done = {d["rel_path"]: d for d in done_records(out)}
    assert done["coins.png"]["path"] == f"gs://{bucket.name}/photos/coins.png"
    assert (done["coins.png"]["etag"], done["coins.png"]["size"]) == (str(blob.generation), blob.size)

    r = run(env, "predict", url, "-o", out, "--weights", tiny_checkpoint, *FAST)
    assert r.returncode == 0 and "done 0, skipped 4" in r.stderr, r.stderr

    # Rewritten between runs with the same bytes: same MD5 (the emulator's etag), new generation ->
    # computed again, the others skipped, its image id kept.
    bucket.blob("photos/coins.png").upload_from_filename(SAMPLES / "coins.png")
    rewritten = bucket.get_blob("photos/coins.png")
    assert rewritten.generation != blob.generation and rewritten.md5_hash == blob.md5_hash
    r = run(env, "predict", url, "-o", out, "--weights", tiny_checkpoint, *FAST)
    assert r.returncode == 0 and "done 1, skipped 3" in r.stderr, r.stderr
    latest = {d["rel_path"]: d for d in done_records(out)}
    assert latest["coins.png"]["etag"] == str(rewritten.generation)
    assert latest["coins.png"]["image_id"] == done["coins.png"]["image_id"]
    assert _predictions(out) == found


def test_globs_lists_of_urls_a_missing_object_and_bucket(server, bucket, tmp_path, tiny_checkpoint):
    env, out = _env(server), tmp_path / "out"
    listed = tmp_path / "list.txt"
    listed.write_text(f"gs://{bucket.name}/photos/coins.png\ngs://{bucket.name}/photos/gone.jpg\n")
    r = run(env, "predict", f"gs://{bucket.name}/photos/**/*.jpg", f"@{listed}", "-o", out, "--weights",
            tiny_checkpoint, *FAST)
    assert r.returncode == 3, r.stderr  # 3: done, with failures
    names = sorted(i["file_name"] for i in json.loads((out / "predictions.json").read_text())["images"])
    assert names == ["coins.png", "sub/6.jpg", "sub/rocket.jpg"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    gone = (f"gs://{bucket.name}/photos/gone.jpg", "listed but does not exist")
    assert [(f["path"], f["reason"]) for f in failures] == [gone]

    r = run(env, "predict", "gs://no-such-bucket/photos/", "-o", tmp_path / "o2", "--weights", tiny_checkpoint,
            *FAST)
    assert r.returncode == 2 and "no such bucket, object or prefix" in r.stderr and "Traceback" not in r.stderr


def test_resume_after_a_kill_does_nothing_twice(server, bucket, tmp_path, tiny_checkpoint):
    names = [f"{i:02d}.png" for i in range(12)]
    for i, name in enumerate(names):
        bucket.blob(f"many/{name}").upload_from_string(png(10 + i), content_type="image/png")
    env, out = _env(server), tmp_path / "out"
    cmd = [sys.executable, "-m", "maskseg", "predict", f"gs://{bucket.name}/many/", "-o", str(out), "--weights",
           str(tiny_checkpoint), *FAST]
    kill_after_two_batches(cmd, env, out)
    assert 2 <= len(done_records(out)) < len(names)
    r = run(env, *cmd[3:])
    assert r.returncode == 0, r.stderr
    assert sorted(d["rel_path"] for d in done_records(out)) == names  # each once: nothing done twice
    assert len(json.loads((out / "predictions.json").read_text())["images"]) == len(names)
