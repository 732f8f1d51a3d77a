"""What the object storage tests share (S3 in test_objects.py, GCS in test_objects_gcs.py): the photos a
bucket holds, the real CLI in a subprocess with a given environment, the journal's done records, and a
run killed part-way through."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

PHOTOS = ["chelsea.png", "coins.png", "rocket.jpg", "fruits_nuts/6.jpg"]  # under sample_images/
FAST = ("--max-dets", "3", "--device", "cpu", "--batch-size", "1")


def photo_key(i: int, photo: str) -> str:
    """Where the i-th of ``PHOTOS`` lies in a bucket: photos/, the last two in photos/sub/ (as the
    ``images`` fixture lays them out on disk)."""
    return f"photos/{'sub/' if i >= 2 else ''}{Path(photo).name}"


def run(env: dict, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m maskseg ARGS`` in a subprocess with environment ``env``."""
    return subprocess.run([sys.executable, "-m", "maskseg", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def done_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "journal.jsonl").read_text().splitlines()) if r["kind"] == "done"]


def png(seed: int) -> bytes:
    """A 64x48 RGB PNG of random pixels."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_after_two_batches(cmd: list[str], env: dict, out: Path, timeout: float = 180) -> None:
    """Start ``cmd`` (a predict into ``out``) and SIGKILL it once its journal holds two lines."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    journal = out / "journal.jsonl"
    try:
        while not (journal.exists() and journal.read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
