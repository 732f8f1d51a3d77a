"""``maskseg predict --tile``: the real CLI in a subprocess on a large image made of real photos."""

from __future__ import annotations

import json

import cv2
import numpy as np
from pycocotools.coco import COCO

from ..conftest import SAMPLES, run_cli


def _large_image(path) -> tuple[int, int]:
    photos = [cv2.imread(str(SAMPLES / "fruits_nuts" / n)) for n in ("6.jpg", "7.jpg", "8.jpg", "9.jpg")]
    top = np.hstack(photos[:2])
    img = np.vstack([top, np.hstack(photos[2:])])  # 1600 x 1200
    cv2.imwrite(str(path), img)
    return img.shape[:2]


def test_tiled_predict_writes_whole_image_results_and_records_the_setting(tiny_checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    height, width = _large_image(src / "big.png")
    out = tmp_path / "out"
    r = run_cli("predict", src, "-o", out, "--weights", tiny_checkpoint, "--writers", "coco,results,masks",
                "--tile", "400", "--tile-overlap", "0.25", "--tile-full", "--workers", "0")
    assert r.returncode == 0, r.stderr
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["tile"] == {"size": 400, "overlap": 0.25, "full": True}
    coco = COCO(str(out / "predictions.json"))
    [img] = coco.dataset["images"]
    assert (img["height"], img["width"]) == (height, width)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns
    boxes = np.array([a["bbox"] for a in anns])
    assert boxes[:, 0].max() > 800 and boxes[:, 1].max() > 600  # detections from tiles far from the origin
    for a in anns[:20]:
        assert coco.annToMask(a).shape == (height, width)

    # another tile size is another setting: not mixed into the same OUT
    r = run_cli("predict", src, "-o", out, "--weights", tiny_checkpoint, "--writers", "coco,results,masks",
                "--tile", "500")
    assert r.returncode == 2 and "tile" in r.stderr


def test_tile_usage_errors(tiny_checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _large_image(src / "big.png")
    r = run_cli("predict", src, "-o", tmp_path / "o", "--weights", tiny_checkpoint, "--tile", "8")
    assert r.returncode == 2 and "--tile 8" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("predict", src, "-o", tmp_path / "o2", "--weights", tiny_checkpoint, "--tile", "256",
                "--engine", "ray")
    assert r.returncode == 2 and "--engine local" in r.stderr
