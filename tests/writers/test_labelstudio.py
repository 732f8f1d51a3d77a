"""The labelstudio writer: tasks with polygon predictions in percent coordinates, a labeling config they
belong to, local-files image URLs; validated by label-studio-sdk's own code where it is installed."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskseg.writers.labelstudio import local_files_url

from .conftest import load_predictions


def _tasks(out):
    return json.loads((out / "labelstudio_tasks.json").read_text())


def test_tasks_and_config(annotation_run):
    pred = load_predictions(annotation_run)
    tasks = _tasks(annotation_run)
    config = ET.fromstring((annotation_run / "labelstudio_config.xml").read_text())
    labels = [e.get("value") for e in config.iter("Label")]
    assert labels == [c["name"] for c in pred["categories"]]
    poly_tag = next(config.iter("PolygonLabels"))
    image_tag = next(config.iter("Image"))
    assert poly_tag.get("toName") == image_tag.get("name") and image_tag.get("value") == "$" + image_tag.get("name")
    assert len(tasks) == len(pred["images"])
    for task, im in zip(tasks, pred["images"], strict=True):
        url = urlparse(task["data"]["image"])
        # Relative to the folder above the inputs' common folder ("photos"), which can then be the storage.
        assert url.path == "/data/local-files/" and parse_qs(url.query)["d"] == ["photos/" + im["file_name"]]
        [prediction] = task["predictions"]
        assert prediction["model_version"] == "small"
        anns = [a for a in pred["annotations"] if a["image_id"] == im["id"]]
        regions = prediction["result"]
        # One region per part: at least one per detection, each with its detection's score.
        assert len(regions) >= len(anns) > 0
        assert {r["score"] for r in regions} <= {a["score"] for a in anns}
        assert prediction["score"] == pytest.approx(np.mean([a["score"] for a in anns]), abs=1e-4)
        for r in regions:
            assert r["type"] == "polygonlabels" and r["from_name"] == poly_tag.get("name")
            assert r["to_name"] == image_tag.get("name")
            assert (r["original_width"], r["original_height"]) == (im["width"], im["height"])
            pts = np.array(r["value"]["points"])
            assert pts.shape[1] == 2 and len(pts) >= 3 and pts.min() >= 0 and pts.max() <= 100
            assert r["value"]["polygonlabels"][0] in labels
        assert len({r["id"] for r in regions}) == len(regions)
        # Percent coordinates: the regions of the first detection span its mask.
        first = [r for r in regions if r["id"].startswith("d0p")]
        pts = np.concatenate([np.array(r["value"]["points"]) for r in first]) / 100 * [im["width"], im["height"]]
        seg = anns[0]["segmentation"]
        x, y, w, h = mask_utils.toBbox({"size": seg["size"], "counts": seg["counts"].encode()}).tolist()
        assert abs(pts[:, 0].min() - x) <= 1 and abs(pts[:, 1].max() - (y + h)) <= 1
        assert abs(pts[:, 0].max() - (x + w)) <= 1 and abs(pts[:, 1].min() - y) <= 1


def test_local_files_url_relative_to_a_root(tmp_path):
    assert local_files_url("/data/imgs/a b/x#1.jpg", "a b/x#1.jpg", None) == \
        "/data/local-files/?d=imgs/a%20b/x%231.jpg"
    assert local_files_url("/data/imgs/x.jpg", "x.jpg", None) == "/data/local-files/?d=imgs/x.jpg"
    assert local_files_url("/data/imgs/a/x.jpg", "a/x.jpg", "/") == "/data/local-files/?d=data/imgs/a/x.jpg"


def test_label_studio_sdk_validates_tasks(annotation_run):
    """label-studio-sdk's LabelInterface checks each task's data and prediction against the config."""
    pytest.importorskip("label_studio_sdk", reason="label-studio-sdk is not installed (pip install -e '.[dev]')")
    from label_studio_sdk.label_interface import LabelInterface

    li = LabelInterface((annotation_run / "labelstudio_config.xml").read_text())
    li.validate()  # the config itself
    for task in _tasks(annotation_run):
        # validate_task checks the data the config's variables need (with "predictions" in the task it calls
        # validate_prediction() without its argument in this SDK release, so those are checked one by one).
        assert li.validate_task({"data": task["data"]}), task["data"]
        for prediction in task["predictions"]:
            assert li.validate_prediction(prediction, return_errors=True) == []
    bad = dict(_tasks(annotation_run)[0]["predictions"][0])
    bad["result"] = [dict(bad["result"][0], value={**bad["result"][0]["value"], "polygonlabels": ["nut"]})]
    assert li.validate_prediction(bad, return_errors=True)  # a label the config lacks is refused
    assert not li.validate_task({"data": {"img": "x"}})
