"""--tiff-pages: every page of a multi-page TIFF as its own image."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from maskseg.api import predict
from maskseg.batching import Failure
from maskseg.config import ModelConfig, PredictConfig
from maskseg.decode import DecodedImage
from maskseg.pages import iter_pages
from maskseg.sources import scan_sources

from .conftest import SAMPLES


def _three_pages(path):
    photo = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    pages = [photo, photo.transpose(Image.FLIP_LEFT_RIGHT), photo.convert("L").convert("RGB")]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return pages


def test_pages_are_images_of_their_own(tmp_path):
    pages = _three_pages(tmp_path / "scan.tif")
    [ref] = scan_sources([str(tmp_path / "scan.tif")]).refs
    items = list(iter_pages(ref))
    assert [d.ref.rel_path for d in items] == ["scan.tif/p0001", "scan.tif/p0002", "scan.tif/p0003"]
    assert all(isinstance(d, DecodedImage) for d in items)
    assert np.array_equal(items[1].rgb, np.asarray(pages[1]))
    assert [d.ref.rel_path for d in iter_pages(ref, done=lambda r: r.rel_path.endswith("p0002"))] == [
        "scan.tif/p0001", "scan.tif/p0003"]

    data = (tmp_path / "scan.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    [cut] = scan_sources([str(tmp_path / "cut.tif")]).refs
    assert isinstance(list(iter_pages(cut))[-1], Failure)


def test_predict_with_and_without_tiff_pages(tiny_checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _three_pages(src / "scan.tif")
    model = ModelConfig(weights=str(tiny_checkpoint), device="cpu")
    for pages, names in ((False, ["scan.tif"]), (True, ["scan.tif/p0001", "scan.tif/p0002", "scan.tif/p0003"])):
        out = tmp_path / f"out{pages}"
        config = PredictConfig(model=model, tiff_pages=pages, writers=("coco", "overlay"), decode_workers=0)
        summary = predict([str(src)], out, config)
        assert summary.done == len(names)
        coco = json.loads((out / "predictions.json").read_text())
        assert sorted(i["file_name"] for i in coco["images"]) == names
    assert (tmp_path / "outTrue" / "overlays" / "scan.tif" / "p0002.jpg").is_file()
