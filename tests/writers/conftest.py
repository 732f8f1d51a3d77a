"""One real CLI run with every annotation-tool writer, shared by the writer tests that read its files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, run_cli

ANNOTATION_WRITERS = "coco,results,polygons,yolo,labelstudio,json"


@pytest.fixture(scope="session")
def annotation_run(tiny_checkpoint, tmp_path_factory) -> Path:
    """OUT of ``maskseg predict`` over four real photos in a small tree (two share the stem ``x``),
    with the coco, polygons, yolo, labelstudio and json writers; the tiny random model."""
    root = tmp_path_factory.mktemp("annotation")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "fruits_nuts" / "6.jpg", photos / "x.jpg")
    shutil.copy(SAMPLES / "coins.png", photos / "x.png")  # same stem as x.jpg: outputs must not collide
    shutil.copy(SAMPLES / "fruits_nuts" / "7.jpg", photos / "sub" / "7.jpg")
    shutil.copy(SAMPLES / "chelsea.png", photos / "sub" / "chelsea.png")
    out = root / "out"
    proc = run_cli("predict", photos, "-o", out, "--weights", tiny_checkpoint, "--writers", ANNOTATION_WRITERS,
                   "--score-thresh", "0.3")
    assert proc.returncode == 0, proc.stderr
    return out


def load_predictions(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text())
