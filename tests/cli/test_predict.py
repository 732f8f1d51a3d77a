"""The real ``maskseg`` CLI in a subprocess, on real photos, with a tiny random model on disk."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import pytest
from pycocotools.coco import COCO

from ..conftest import SAMPLES, run_cli

ALL_WRITERS = "coco,results,overlay,masks"


def _done_paths(out: Path) -> list[str]:
    data = json.loads((out / "predictions.json").read_text())
    return sorted(img["file_name"] for img in data["images"])


def test_predict_writes_all_four_outputs(images, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    r = run_cli("predict", images, "-o", out, "--weights", tiny_checkpoint, "--writers", ALL_WRITERS)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert _done_paths(out) == ["chelsea.png", "coins.png", "sub/6.jpg", "sub/rocket.jpg"]

    coco = COCO(str(out / "predictions.json"))
    assert coco.getCatIds() == [1, 2, 3]
    assert len(coco.getAnnIds()) > 0
    for img in coco.dataset["images"]:
        src = cv2.imread(str(images / img["file_name"]))
        assert (img["height"], img["width"]) == src.shape[:2]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            assert coco.annToMask(ann).shape == src.shape[:2]
            assert ann["iscrowd"] == 0 and 0 < ann["score"] <= 1 and ann["id"] >= 1

    results = json.loads((out / "results.json").read_text())
    loaded = coco.loadRes(str(out / "results.json"))
    assert len(loaded.getAnnIds()) == len(results) == len(coco.getAnnIds())

    overlay = cv2.imread(str(out / "overlays" / "sub" / "rocket.jpg"))
    assert overlay.shape[:2] == cv2.imread(str(images / "sub" / "rocket.jpg")).shape[:2]
    assert (out / "overlays" / "chelsea.png.jpg").is_file()

    pngs = sorted((out / "masks" / "sub" / "6").glob("*.png"))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[i["id"] for i in coco.dataset["images"]
                                                if i["file_name"] == "sub/6.jpg"]))
    assert len(pngs) == len(anns) > 0
    mask0 = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert mask0.shape == (600, 800) and set(mask0.flatten().tolist()) <= {0, 255}
    assert pngs[0].name.split("_", 1)[1] in {"date.png", "fig.png", "hazelnut.png"}
    assert (out / "failures.jsonl").read_text() == ""


def test_rerun_skips_done_and_picks_up_new_files(images, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli("predict", images, "-o", out, "--weights", tiny_checkpoint).returncode == 0
    first = json.loads((out / "predictions.json").read_text())
    ids = {i["file_name"]: i["id"] for i in first["images"]}
    shutil.copy(SAMPLES / "coffee.png", images / "sub" / "coffee.png")
    r = run_cli("predict", images, "-o", out, "--weights", tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    assert "done 1, skipped 4" in r.stderr
    second = json.loads((out / "predictions.json").read_text())
    ids2 = {i["file_name"]: i["id"] for i in second["images"]}
    assert {k: ids2[k] for k in ids} == ids  # stable ids
    assert ids2["sub/coffee.png"] == max(ids.values()) + 1
    r = run_cli("predict", images, "-o", out, "--weights", tiny_checkpoint, "--overwrite")
    assert "done 5, skipped 0" in r.stderr


def test_corrupt_file_among_good_ones_exit_3(images, tiny_checkpoint, tmp_path):
    (images / "broken.jpg").write_bytes((SAMPLES / "rocket.jpg").read_bytes()[:2000])
    (images / "notes.jpg").write_text("<html>not an image</html>")
    out = tmp_path / "out"
    r = run_cli("predict", images, "-o", out, "--weights", tiny_checkpoint)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["rel_path"] for f in failures) == ["broken.jpg", "notes.jpg"]
    assert all(f["reason"] for f in failures)
    assert len(_done_paths(out)) == 4


def test_list_file_glob_and_stdin(images, tiny_checkpoint, tmp_path):
    lst = images / "list.txt"
    lst.write_text("# comment\nchelsea.png\n\nsub/rocket.jpg\n")
    out = tmp_path / "a"
    r = run_cli("predict", f"@{lst}", "-o", out, "--weights", tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    assert _done_paths(out) == ["chelsea.png", "sub/rocket.jpg"]

    out = tmp_path / "b"
    r = run_cli("predict", str(images / "**" / "*.jpg"), "-o", out, "--weights", tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    assert _done_paths(out) == ["sub/6.jpg", "sub/rocket.jpg"]

    out = tmp_path / "c"
    r = run_cli("predict", "-", "-o", out, "--weights", tiny_checkpoint, cwd=images,
                input="coins.png\nsub/6.jpg\ncoins.png\n")
    assert r.returncode == 0, r.stderr
    assert _done_paths(out) == ["coins.png", "sub/6.jpg"]


def test_usage_errors_are_one_line(images, tiny_checkpoint, tmp_path):
    r = run_cli("predict", tmp_path / "missing", "-o", tmp_path / "o", "--weights", tiny_checkpoint)
    assert r.returncode == 2
    assert "missing: no such file or folder" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("predict", images, "-o", tmp_path / "o", "--weights", tiny_checkpoint, "--writers", "coco,nope")
    assert r.returncode == 1 and "unknown writer 'nope'" in r.stderr
    r = run_cli("predict", images, "-o", tmp_path / "o", "--weights", tmp_path / "none.pth")
    assert r.returncode == 1 and "weights file not found" in r.stderr
    r = run_cli("predict", images, "-o", tmp_path / "o", "--batch-size", "0")
    assert r.returncode == 2


def test_changed_settings_need_overwrite(images, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli("predict", images, "-o", out, "--weights", tiny_checkpoint).returncode == 0
    r = run_cli("predict", images, "-o", out, "--weights", tiny_checkpoint, "--score-thresh", "0.9")
    assert r.returncode == 2 and "other settings" in r.stderr and "score_thresh" in r.stderr


def test_help_is_fast_and_lists_every_option():
    t0 = time.perf_counter()
    r = run_cli("predict", "--help")
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0
    for option in ("--out", "--list", "--model", "--weights", "--device", "--batch-size", "--score-thresh",
                   "--mask-thresh", "--max-dets", "--min-size", "--max-size", "--classes", "--writers",
                   "--max-pixels", "--overwrite", "--quiet", "Exit codes"):
        assert option in r.stdout, option
    assert elapsed < 5  # generous for CI; the import itself must not pull in torch:
    r = run_cli("--help")
    assert r.returncode == 0 and "predict" in r.stdout


def test_cli_does_not_import_torch_for_help():
    import subprocess
    import sys

    code = ("import sys, maskseg.cli; heavy = {'torch', 'numpy', 'cv2', 'pycocotools'} & set(sys.modules); "
            "print(sorted(heavy)); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_package_names_load_on_first_use():
    import maskseg

    for name in maskseg.__all__:
        assert getattr(maskseg, name) is not None
    assert callable(maskseg.evaluate) and callable(maskseg.train)  # the functions, not the modules
    assert maskseg.evaluate.__module__.startswith("maskseg.evaluation.") and maskseg.train.__module__.startswith(
        "maskseg.training.")
    with pytest.raises(AttributeError):
        maskseg.no_such_name  # noqa: B018


@pytest.mark.slow
def test_torchvision_resnet50_state_dict_as_it_is(tmp_path):
    """A plain torchvision state dict (91 COCO classes) loads with --weights and keeps COCO ids."""
    from maskseg.synth import random_maskrcnn, save_state_dict

    weights = save_state_dict(random_maskrcnn("maskrcnn_resnet50_fpn", num_classes=91, class_bias=3.0),
                              tmp_path / "r50.pth")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SAMPLES / "chelsea.png", folder)
    out = tmp_path / "out"
    r = run_cli("predict", folder, "-o", out, "--weights", weights, "--min-size", "160", "--max-size", "256",
                "--device", "cpu", "--writers", ALL_WRITERS)
    assert r.returncode == 0, r.stderr
    coco = COCO(str(out / "predictions.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert len(cats) == 80 and cats[0] == {"id": 1, "name": "person", "supercategory": ""}
    assert {c["id"] for c in cats} >= {90}  # 91-slot layout, never shifted
    assert all(a["category_id"] in coco.getCatIds() for a in coco.dataset["annotations"])
    assert len(coco.getAnnIds()) > 0


def test_precision_auto_is_recorded_as_what_ran_and_resume_does_not_mix(images, tiny_checkpoint, tmp_path):
    """auto resolves from this CPU's flags; run.json holds the result, and fp32 cannot resume a bf16 OUT."""
    from maskseg.precision import cpu_bf16_flags

    out = tmp_path / "out"
    base = ["predict", images, "-o", out, "--weights", tiny_checkpoint, "--writers", "coco"]
    r = run_cli(*base, "--precision", "auto")
    assert r.returncode == 0, r.stderr
    settings = json.loads((out / "run.json").read_text())["settings"]
    fp32 = run_cli(*base, "--precision", "fp32")
    if cpu_bf16_flags():
        assert "precision bf16 (auto: this CPU has" in r.stderr and settings["precision"] == "bf16"
        assert fp32.returncode == 2 and "precision 'bf16' -> None" in fp32.stderr
        assert "Traceback" not in fp32.stderr
    else:
        assert "precision fp32 (auto: this CPU has no bf16 instructions)" in r.stderr and "precision" not in settings
        assert fp32.returncode == 0 and "skipped 4" in fp32.stderr
    again = run_cli(*base, "--precision", "auto")
    assert again.returncode == 0 and "done 0, skipped 4" in again.stderr
    bad = run_cli(*base, "--precision", "fp16", "--overwrite", "--device", "cpu")
    assert bad.returncode == 2 and "--precision fp16: runs on a CUDA GPU only" in bad.stderr


def test_agnostic_nms_is_a_recorded_setting(images, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    photo = images / "sub" / "6.jpg"
    r = run_cli("predict", photo, "-o", out, "--weights", tiny_checkpoint, "--writers", "coco", "--agnostic-nms", "0")
    assert r.returncode == 2 and "--agnostic-nms" in r.stderr
    r = run_cli("predict", photo, "-o", out, "--weights", tiny_checkpoint, "--writers", "coco", "--agnostic-nms", "0.5")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "run.json").read_text())["settings"]["agnostic_nms"] == 0.5
    r = run_cli("predict", photo, "-o", out, "--weights", tiny_checkpoint, "--writers", "coco")
    assert r.returncode == 2 and "agnostic_nms" in r.stderr


def test_list_file_run_matches_folder_run_and_leaves_no_scan_database(images, tiny_checkpoint, tmp_path):
    """A list naming the folder's images (shuffled, repeated, with a hard link and a shared stem) gives the
    same outputs as the folder; the scan's temporary database lives in OUT only while the run reads it."""
    shutil.copy(SAMPLES / "coins.png", images / "sub" / "rocket.png")  # shares sub/rocket.jpg's stem
    lst = tmp_path / "list.txt"
    lst.write_text("photos/sub/rocket.png\nphotos/chelsea.png\nphotos/sub/6.jpg\nphotos/coins.png\n"
                   "photos/sub/rocket.jpg\nphotos/./chelsea.png\n")
    runs = {}
    for name, source in (("folder", str(images)), ("list", f"@{lst}")):
        out = tmp_path / name
        r = run_cli("predict", source, "-o", out, "--weights", tiny_checkpoint, "--writers", "coco,yolo")
        assert r.returncode == 0, r.stderr
        assert not [p for p in out.rglob("*") if ".maskseg-scan-" in p.name]
        labels = {str(p.relative_to(out / "yolo")): p.read_text() for p in (out / "yolo").rglob("*.txt")}
        predictions = json.loads((out / "predictions.json").read_text())
        del predictions["info"]  # its date_created is the run's
        runs[name] = (predictions, labels)
    assert runs["list"] == runs["folder"]
    assert [img["file_name"] for img in runs["list"][0]["images"]] == [
        "chelsea.png", "coins.png", "sub/6.jpg", "sub/rocket.jpg", "sub/rocket.png"]
    assert sorted(runs["list"][1]) == ["labels/chelsea.txt", "labels/coins.txt", "labels/sub/6.txt",
                                       "labels/sub/rocket_jpg.txt", "labels/sub/rocket_png.txt"]
