"""Object storage inputs against a real S3-protocol server (moto's server mode) on 127.0.0.1, driven
through the real CLI: listing, reading, a missing object, objects rewritten between and during runs,
access denied, and resume after a kill."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="the s3 extra (pip install 'maskseg[s3]') is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")

import boto3

from tests.conftest import SAMPLES
from tests.objectstore import FAST, PHOTOS, done_records, free_port, kill_after_two_batches, photo_key, png, run


def _env(endpoint: str, key: str = "testing", secret: str = "testing") -> dict[str, str]:
    """The standard AWS environment, and nothing from ~/.aws: what a user of MinIO would set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret,
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               PYTHONWARNINGS="ignore", COLUMNS="200")
    return env


@pytest.fixture(scope="module")
def server():
    """A moto S3 server in a thread, on a free loopback port."""
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


@pytest.fixture
def bucket(server, request):
    """A fresh bucket holding the sample photos under photos/ (one in a sub-folder)."""
    s3 = boto3.client("s3", endpoint_url=server, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    name = "b-" + request.node.name.lower().replace("_", "-")[:40]
    s3.create_bucket(Bucket=name)
    for i, photo in enumerate(PHOTOS):
        s3.put_object(Bucket=name, Key=photo_key(i, photo), Body=(SAMPLES / photo).read_bytes())
    s3.put_object(Bucket=name, Key="photos/notes.txt", Body=b"not an image")
    return s3, name


def test_prefix_is_listed_read_and_resumed_by_etag(server, bucket, tmp_path, tiny_checkpoint):
    s3, name = bucket
    env, out = _env(server), tmp_path / "out"
    r = run(env, "predict", f"s3://{name}/photos/", "-o", out, "--weights", tiny_checkpoint, *FAST)
    assert r.returncode == 0, r.stderr
    assert "testing" not in r.stderr  # credentials are never logged
    images = json.loads((out / "predictions.json").read_text())["images"]
    assert sorted(i["file_name"] for i in images) == ["chelsea.png", "coins.png", "sub/6.jpg", "sub/rocket.jpg"]
    done = {d["rel_path"]: d for d in done_records(out)}
    head = s3.head_object(Bucket=name, Key="photos/coins.png")
    assert done["coins.png"]["etag"] == head["ETag"] and done["coins.png"]["path"] == f"s3://{name}/photos/coins.png"
    assert done["coins.png"]["size"] == head["ContentLength"]

    r = run(env, "predict", f"s3://{name}/photos/", "-o", out, "--weights", tiny_checkpoint, *FAST)
    assert r.returncode == 0 and "done 0, skipped 4" in r.stderr, r.stderr

    # Rewritten between runs (new ETag): recomputed, the others skipped, its image id kept.
    s3.put_object(Bucket=name, Key="photos/coins.png", Body=png(1))
    r = run(env, "predict", f"s3://{name}/photos/", "-o", out, "--weights", tiny_checkpoint, *FAST)
    assert r.returncode == 0 and "done 1, skipped 3" in r.stderr, r.stderr
    latest = {d["rel_path"]: d for d in done_records(out)}
    assert latest["coins.png"]["image_id"] == done["coins.png"]["image_id"]
    assert (latest["coins.png"]["width"], latest["coins.png"]["height"]) == (64, 48)
    images = {i["file_name"]: i for i in json.loads((out / "predictions.json").read_text())["images"]}
    assert len(images) == 4 and images["coins.png"]["width"] == 64


def test_globs_lists_of_urls_and_a_missing_object(server, bucket, tmp_path, tiny_checkpoint):
    _, name = bucket
    env, out = _env(server), tmp_path / "out"
    listed = tmp_path / "list.txt"
    listed.write_text(f"s3://{name}/photos/coins.png\ns3://{name}/photos/gone.jpg\n")
    r = run(env, "predict", f"s3://{name}/photos/**/*.jpg", f"@{listed}", "-o", out, "--weights", tiny_checkpoint,
            *FAST)
    assert r.returncode == 3, r.stderr  # 3: done, with failures
    names = sorted(i["file_name"] for i in json.loads((out / "predictions.json").read_text())["images"])
    assert names == ["coins.png", "sub/6.jpg", "sub/rocket.jpg"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    gone = (f"s3://{name}/photos/gone.jpg", "listed but does not exist")
    assert [(f["path"], f["reason"]) for f in failures] == [gone]

    r = run(env, "predict", f"s3://{name}/nothing/", "-o", tmp_path / "o2", "--weights", tiny_checkpoint, *FAST)
    assert r.returncode == 2 and "no such bucket, object or prefix" in r.stderr and "Traceback" not in r.stderr


def test_object_rewritten_during_the_run_is_retried_next_run(server, bucket, tmp_path, tiny_checkpoint,
                                                              monkeypatch):
    """Rewritten after it was listed, before it was read: not recorded as done with the old ETag; the
    next run (which lists the new ETag) computes it."""
    from typer.testing import CliRunner

    from maskseg import objects
    from maskseg.cli import app

    s3, name = bucket
    for k, v in _env(server).items():
        monkeypatch.setenv(k, v)
    read = objects.read_object

    def rewrite_then_read(url: str, etag: str | None):
        if url.endswith("/coins.png") and etag == s3.head_object(Bucket=name, Key="photos/coins.png")["ETag"]:
            s3.put_object(Bucket=name, Key="photos/coins.png", Body=png(2))
        return read(url, etag)

    monkeypatch.setattr(objects, "read_object", rewrite_then_read)
    out = tmp_path / "out"
    args = ["predict", f"s3://{name}/photos/", "-o", str(out), "--weights", str(tiny_checkpoint), *FAST]
    r = CliRunner().invoke(app, args, prog_name="maskseg")
    assert r.exit_code == 3, r.output
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["rel_path"] for f in failures] == ["coins.png"] and "changed since it was listed" in failures[0]["reason"]
    assert "coins.png" not in {d["rel_path"] for d in done_records(out)}
    r = CliRunner().invoke(app, args, prog_name="maskseg")
    assert r.exit_code == 0, r.output
    assert [d["rel_path"] for d in done_records(out)].count("coins.png") == 1
    assert (out / "failures.jsonl").read_text() == ""


def test_out_on_object_storage_is_refused(server, tmp_path, tiny_checkpoint):
    r = run(_env(server), "predict", SAMPLES / "coins.png", "-o", "s3://bucket/out", "--weights", tiny_checkpoint)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "s3://bucket/out: OUT must be a folder on a POSIX file system, not object storage" in r.stderr
    assert not Path("s3:").exists()


def test_resume_after_a_kill_does_nothing_twice(server, bucket, tmp_path, tiny_checkpoint):
    s3, name = bucket
    keys = [f"many/{i:02d}.png" for i in range(12)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=name, Key=key, Body=png(10 + i))
    env, out = _env(server), tmp_path / "out"
    cmd = [sys.executable, "-m", "maskseg", "predict", f"s3://{name}/many/", "-o", str(out), "--weights",
           str(tiny_checkpoint), *FAST]
    kill_after_two_batches(cmd, env, out)
    before = {d["rel_path"] for d in done_records(out)}
    assert 2 <= len(before) < len(keys)
    r = run(env, *cmd[3:])
    assert r.returncode == 0, r.stderr
    rels = [d["rel_path"] for d in done_records(out)]
    assert sorted(rels) == sorted(k.removeprefix("many/") for k in keys)  # each once: nothing done twice
    assert len(json.loads((out / "predictions.json").read_text())["images"]) == len(keys)


def test_access_denied(tmp_path, tiny_checkpoint):
    """A moto server that enforces IAM (after the set-up requests): a user that may list the bucket but
    not read its objects gets one failure per image; unknown credentials cannot even list."""
    port = free_port()
    setup_requests = 6
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(setup_requests))
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "moto server did not start"
                time.sleep(0.1)
        kw = {"endpoint_url": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
              "region_name": "us-east-1"}
        s3, iam = boto3.client("s3", **kw), boto3.client("iam", **kw)
        s3.create_bucket(Bucket="locked")  # 1
        s3.put_object(Bucket="locked", Key="photos/coins.png", Body=(SAMPLES / "coins.png").read_bytes())  # 2
        iam.create_user(UserName="lister")  # 3
        key = iam.create_access_key(UserName="lister")["AccessKey"]  # 4
        policy = {"Version": "2012-10-17", "Statement": [  # the bucket, not its objects (locked/*)
            {"Effect": "Allow", "Action": ["s3:*"], "Resource": "arn:aws:s3:::locked"},
            {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:ListObjectsV2"], "Resource": "*"}]}
        iam.put_user_policy(UserName="lister", PolicyName="list-only", PolicyDocument=json.dumps(policy))  # 5
        s3.head_bucket(Bucket="locked")  # 6: the last request without authorization
        lister = _env(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        out = tmp_path / "out"
        r = run(lister, "predict", "s3://locked/photos/", "-o", out, "--weights", tiny_checkpoint, *FAST)
        assert r.returncode == 3, r.stderr
        failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
        assert [(f["rel_path"], f["reason"]) for f in failures] == [("coins.png", "access denied")]
        assert key["SecretAccessKey"] not in r.stderr

        r = run(_env(endpoint, "AKIANOTAKEY", "nope"), "predict", "s3://locked/photos/", "-o", tmp_path / "o2",
                "--weights", tiny_checkpoint, *FAST)
        assert r.returncode == 2 and "access denied" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
