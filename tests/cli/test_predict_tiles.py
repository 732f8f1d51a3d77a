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


def test_tiled_tiff_is_read_by_region_with_the_results_of_a_whole_decode(tiny_checkpoint, tmp_path):
    """The same pixels as a tiled TIFF (read by region) and as a PNG (decoded whole) give the same
    detections; the TIFF is not held to --max-pixels, the PNG and a TIFF decoded whole are."""
    import tifffile

    png_dir, tif_dir = tmp_path / "png", tmp_path / "tif"
    png_dir.mkdir()
    tif_dir.mkdir()
    height, width = _large_image(png_dir / "big.png")  # 1200 x 1600 = 1.92 MP
    rgb = cv2.imread(str(png_dir / "big.png"))[:, :, ::-1]
    tifffile.imwrite(tif_dir / "big.tif", rgb, tile=(256, 256), compression="zlib", photometric="rgb")
    common = ["--weights", tiny_checkpoint, "--tile", "400", "--tile-full", "--writers", "coco,results,overlay"]
    r = run_cli("predict", tif_dir, "-o", tmp_path / "out_tif", *common, "--max-pixels", "1000000")
    assert r.returncode == 0, r.stderr  # not refused: read by region
    r = run_cli("predict", png_dir, "-o", tmp_path / "out_png", *common)
    assert r.returncode == 0, r.stderr

    def results(out):
        anns = json.loads((out / "results.json").read_text())
        return sorted((a["category_id"], a["score"], a["bbox"], a["segmentation"]["counts"]) for a in anns)

    from_tif, from_png = results(tmp_path / "out_tif"), results(tmp_path / "out_png")
    assert from_tif and from_tif == from_png
    overlay = cv2.imread(str(tmp_path / "out_tif" / "overlays" / "big.tif.jpg"))
    assert overlay.shape[:2] == (height, width)  # under REGION_OVERLAY_SIDE: drawn at full size

    for args in ([png_dir], [tif_dir, "--no-tiff-regions"]):
        out = tmp_path / f"refused_{len(args)}"
        r = run_cli("predict", *args, "-o", out, *common, "--max-pixels", "1000000")
        assert r.returncode == 3, r.stderr
        assert "over the --max-pixels limit of 1,000,000" in (out / "failures.jsonl").read_text()
