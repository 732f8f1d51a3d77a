"""``evaluate``: COCO bbox and segm AP of a results file, or of a model run over a dataset's images.

The numbers are pycocotools' own: ``COCOeval.evaluate/accumulate/summarize`` run on the files as given.
What this module adds is around that call: inputs are read with a size limit and checked first, so
pycocotools' assertion failures and silent pitfalls (unknown ids, masks of another size, annotation
id 0) become one-line messages; per-class AP and precision-recall curves are read from
``COCOeval.eval['precision']`` as detectron2 does. Nothing here re-implements matching.
"""

from __future__ import annotations

import json
import logging
import signal
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import EvalConfig
from ..errors import EvalInputError, Interrupted, UsageError
from .coco import cocoeval, load_results, pycocotools_version
from .inputs import GroundTruth, Notes, Results, examples, name_parts, read_json
from .report import EvalReport, Gate, parse_metric

if TYPE_CHECKING:
    import threading

    from ..api import ProgressReporter

log = logging.getLogger(__name__)

EVAL_RESULTS_FILE = "eval_results.json"


def evaluate(
    annotations: str | Path,
    results: str | Path | None = None,
    *,
    images: str | Path | None = None,
    out: str | Path | None = None,
    config: EvalConfig | None = None,
    progress: ProgressReporter | None = None,
    stop: threading.Event | None = None,
) -> EvalReport:
    """COCO bbox/segm metrics of ``results`` (a COCO results list, or a COCO dataset with scores such as
    maskseg's predictions.json) against ``annotations``; or, with ``images``, of the model in
    ``config.predict`` run over ANN's images (resumably, into ``out``) and then evaluated.

    Image ids are mapped by file name where results name images that way (and for maskseg outputs,
    whose ids are maskseg's own). Raises ``UsageError`` for contradictory arguments and
    ``EvalInputError`` for files that cannot be evaluated.
    """
    config = config or EvalConfig()
    check_eval_config(config)
    if (results is None) == (images is None):
        raise UsageError("give exactly one of results (a results file) or images (a folder to run the model on)")
    notes = Notes()
    ann_path = Path(annotations)
    gt = GroundTruth(read_json(ann_path, "annotations"), ann_path, config.iou_types, notes)
    if images is not None:
        if out is None:
            raise UsageError("images= needs out= (the folder the model's outputs are kept in)")
        names, res_path = predict_over(gt, Path(images), Path(out), config, progress, stop, notes)
        source: Any = read_json(res_path, "predictions")
        if isinstance(source, dict) and source.get("annotations") == []:
            raise EvalInputError(f"the model made no detections on ANN's {len(gt.images)} images (score threshold "
                                 f"{config.predict.model.score_thresh}); there is nothing to evaluate")
    else:
        res_path = Path(results)  # type: ignore[arg-type]
        source = read_json(res_path, "results")
        names = None
    dets = Results(source, res_path, gt, config.iou_types, notes, names)
    if images is not None:
        from ..atomic import atomic_write_bytes

        # What was evaluated, in ANN's image ids: pycocotools can be run on it as it is.
        atomic_write_bytes(Path(out) / EVAL_RESULTS_FILE,  # type: ignore[arg-type]
                           json.dumps(dets.items, separators=(",", ":")).encode())
    dt = load_results(gt, dets.items)  # one loaded copy serves both IoU types, as in pycocotools' demo
    per_category = Counter(r["category_id"] for r in dets.items)
    metrics = tuple(cocoeval(gt, dt, per_category, t, config.max_dets) for t in config.iou_types)
    report = EvalReport(
        annotations=str(ann_path), results=str(res_path), images=len(gt.images), instances=sum(gt.instances.values()),
        detections=len(dets.items), max_dets=config.max_dets, metrics=metrics, warnings=tuple(notes),
        pycocotools_version=pycocotools_version(),
    )
    if config.fail_under is not None:
        label, value = report.metric(config.fail_metric)
        gate = Gate(label, value, config.fail_under, value >= config.fail_under)
        report = replace(report, gate=gate)
    return report


def check_eval_config(config: EvalConfig) -> None:
    bad = [t for t in config.iou_types if t not in ("bbox", "segm")]
    if bad or not config.iou_types:
        raise UsageError(f"IoU types must be bbox and/or segm, not {', '.join(bad) or 'none'}")
    if config.max_dets < 10:
        raise UsageError(f"max_dets must be at least 10 (COCOeval's maxDets: 1, 10, max_dets), not {config.max_dets}")
    if config.fail_under is not None:
        if not 0.0 <= config.fail_under <= 1.0:
            raise UsageError(f"fail_under must be between 0 and 1, not {config.fail_under}")
        parse_metric(config.fail_metric, config.iou_types, config.max_dets)


def predict_over(gt: GroundTruth, folder: Path, out: Path, config: EvalConfig, progress: Any, stop: Any,
                  notes: Notes) -> tuple[dict[str, int], Path]:
    """Run ``predict`` over exactly ANN's images; returns maskseg's rel_path -> ANN id, and predictions.json."""
    from ..api import predict
    from ..sources import scan_sources

    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (images)")
    root = folder.resolve()
    paths: dict[str, int] = {}
    missing: list[str] = []
    for image_id, img in gt.images.items():
        name = img.get("file_name")
        parts = name_parts(name) if isinstance(name, str) else []
        if not parts or ".." in parts or name.startswith(("/", "\\")):
            raise EvalInputError(f"{gt.path}: image {image_id} has file_name {name!r}: it must be a path inside "
                                 f"the images folder")
        path = str(root.joinpath(*parts))
        if path in paths:
            raise EvalInputError(f"{gt.path}: images {paths[path]} and {image_id} are both {name!r}")
        if not Path(path).is_file():
            missing.append("/".join(parts))
        paths[path] = image_id
    if missing:
        raise EvalInputError(f"{len(missing)} of ANN's {len(gt.images)} images are not in {folder} "
                             f"({examples(missing)}); --images must be the folder ANN's file names are relative to")
    # predict names images by their path relative to the inputs' common folder; the same scan gives it here.
    scan = scan_sources(list(paths), recursive=False, exclude=str(out))
    rel_to_id = {ref.rel_path: paths[ref.path] for ref in scan.refs}
    scan.close()
    summary = predict(list(paths), out, config.predict, progress=progress, stop=stop)
    if summary.interrupted is not None:
        raise Interrupted(signal.SIGINT)
    if summary.failed_total:
        notes.warn(f"{summary.failed_total} of ANN's images could not be segmented (listed in "
                   f"{out / 'failures.jsonl'}); their objects count as missed")
    return rel_to_id, out / "predictions.json"
