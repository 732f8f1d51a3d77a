"""Reading and checking ``evaluate``'s inputs: ANN (a COCO instances file) and results, before pycocotools.

pycocotools fails on bad input with bare asserts, or silently evaluates something else (results on
unknown images, masks of another size, duplicate or zero annotation ids). Here each of those becomes
a one-line message naming the file and the entry, or a warning saying how the numbers are affected.
JSON is read with a size limit (``MAX_JSON_BYTES``); NaN or infinite numbers are refused where used.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import MAX_JSON_BYTES
from ..errors import EvalInputError, SourceError, UsageError
from ..jsonio import is_json_int, is_json_number, read_json_limited

log = logging.getLogger(__name__)

_EXAMPLES = 3


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file with ``jsonio``'s size limit; a missing file is a usage error, a bad one an input error."""
    if path.exists() and not path.is_file():  # a FIFO would block the open() below
        raise EvalInputError(f"{path}: not a regular file, expected a JSON file")
    try:
        return read_json_limited(path, MAX_JSON_BYTES)
    except SourceError as exc:
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"{path}: no such {what} file") from None
        raise EvalInputError(str(exc)) from None


class Notes(list):
    """Warnings met on the way: logged once and kept for the report."""

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.append(message)


def examples(items: list, n: int = _EXAMPLES) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


# ----------------------------------------------------------------------------- ground truth


class GroundTruth:
    """ANN checked and indexed, and the pycocotools ``COCO`` built from it (the same dict, unchanged)."""

    def __init__(self, data: Any, path: Path, iou_types: tuple[str, ...], notes: Notes) -> None:
        self.path = path
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                 for k in ("images", "annotations", "categories")):
            raise EvalInputError(f"{path}: not a COCO instances file: expected an object with lists "
                                 "images, annotations and categories")
        self.images: dict[int, dict] = {}
        for i, img in enumerate(data["images"]):
            if not (isinstance(img, dict) and is_json_int(img.get("id")) and is_json_int(img.get("width"))
                    and is_json_int(img.get("height")) and img["width"] > 0 and img["height"] > 0):
                raise EvalInputError(f"{path}: images[{i}] needs an integer id and positive integer width and height")
            if img["id"] in self.images:
                raise EvalInputError(f"{path}: image id {img['id']} appears twice")
            self.images[img["id"]] = img
        if not self.images:
            raise EvalInputError(f"{path}: no images")
        self.categories: dict[int, str] = {}
        for i, cat in enumerate(data["categories"]):
            if not (isinstance(cat, dict) and is_json_int(cat.get("id"))):
                raise EvalInputError(f"{path}: categories[{i}] needs an integer id")
            if cat["id"] in self.categories:
                raise EvalInputError(f"{path}: category id {cat['id']} appears twice")
            self.categories[cat["id"]] = str(cat.get("name", f"class_{cat['id']}"))
        if not self.categories:
            raise EvalInputError(f"{path}: no categories")
        self.instances: Counter[int] = Counter()
        self._check_annotations(data["annotations"], iou_types, notes)
        from pycocotools.coco import COCO

        self.coco = COCO()
        self.coco.dataset = data
        with quiet():
            self.coco.createIndex()

    def _check_annotations(self, anns: list, iou_types: tuple[str, ...], notes: Notes) -> None:
        path = self.path
        if not anns:
            raise EvalInputError(f"{path}: no annotations: there is nothing to evaluate against")
        ids: Counter[int] = Counter()
        zero, no_image, no_cat = [], [], Counter()
        for i, a in enumerate(anns):
            where = f"{path}: annotations[{i}]"
            if not isinstance(a, dict):
                raise EvalInputError(f"{where}: expected an object")
            for k in ("id", "image_id", "category_id"):
                if not is_json_int(a.get(k)):
                    raise EvalInputError(f"{where}: {k} must be an integer, found {a.get(k)!r}")
            if not (isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4 and all(map(is_json_number, a["bbox"]))):
                raise EvalInputError(f"{where} (id {a['id']}): bbox must be [x, y, width, height]")
            if not is_json_number(a.get("area")):
                raise EvalInputError(f"{where} (id {a['id']}): area must be a number")
            if "segm" in iou_types and not isinstance(a.get("segmentation"), (list, dict)):
                raise EvalInputError(f"{where} (id {a['id']}): no segmentation (polygons or RLE) to evaluate "
                                     "segm against; evaluate bbox only")
            ids[a["id"]] += 1
            if a["id"] == 0:
                zero.append(a["image_id"])
            if a["image_id"] not in self.images:
                no_image.append(a["id"])
            elif a["category_id"] not in self.categories:
                no_cat[a["category_id"]] += 1
            elif not a.get("iscrowd"):
                self.instances[a["category_id"]] += 1
        if zero:
            notes.warn(f"{path}: an annotation has id 0 (image {zero[0]}); pycocotools marks matches by "
                       "annotation id, so a detection matched to it counts as a false positive and the object as "
                       "missed: AP and AR come out lower than they should. Renumber annotation ids from 1.")
        repeated = sorted(k for k, n in ids.items() if n > 1)
        if repeated:
            notes.warn(f"{path}: {len(repeated)} annotation ids appear more than once ({examples(repeated)}); "
                       "pycocotools indexes annotations by id, so each repeat is evaluated as the last of its id")
        if no_image:
            notes.warn(f"{path}: {len(no_image)} annotations name images that are not in its images list "
                       f"(annotation ids {examples(no_image)}); pycocotools ignores them")
        if no_cat:
            notes.warn(f"{path}: annotations of category ids not in its categories ({examples(sorted(no_cat))}); "
                       "pycocotools ignores them")


# ----------------------------------------------------------------------------- results


class _Names:
    """File name -> ANN image id: the exact name, else a unique match on trailing path parts."""

    def __init__(self, names: Iterator[tuple[str, int]]) -> None:
        self.exact: dict[str, int | None] = {}
        self.tails: dict[str, int | None] = {}
        for name, image_id in names:
            parts = name_parts(name)
            key = "/".join(parts)
            self.exact[key] = image_id if self.exact.get(key, image_id) == image_id else None
            for k in range(1, len(parts)):
                tail = "/".join(parts[k:])
                self.tails[tail] = image_id if self.tails.get(tail, image_id) == image_id else None

    def lookup(self, name: str) -> int | None:
        parts = name_parts(name)
        key = "/".join(parts)
        if key in self.exact:
            return self.exact[key]
        if key in self.tails:  # ANN's name is longer ("images/0.jpg" for "0.jpg")
            return self.tails[key]
        for k in range(1, len(parts)):  # the result's name is longer ("/data/images/0.jpg")
            found = self.exact.get("/".join(parts[k:]))
            if found is not None:
                return found
        return None


def name_parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


class Results:
    """The results list that goes to ``COCO.loadRes``: image ids mapped to ANN's, entries checked.

    Accepts a COCO results list, or a COCO dataset with scores (maskseg's predictions.json), whose
    image ids are mapped through its images' file names. A maskseg results.json beside its
    predictions.json is mapped the same way, since maskseg's image ids are its own.
    """

    def __init__(self, source: Any, path: Path, gt: GroundTruth, iou_types: tuple[str, ...], notes: Notes,
                 names: dict[str, int] | None = None) -> None:
        self.path, self.gt, self.notes = path, gt, notes
        ann_names = _Names((str(img.get("file_name", "")), i) for i, img in gt.images.items()
                           if isinstance(img.get("file_name"), str))
        by_name: Callable[[str], int | None] = names.get if names is not None else ann_names.lookup
        id_map: dict[int, int | None] | None = None
        if isinstance(source, dict):
            if not isinstance(source.get("annotations"), list):
                raise EvalInputError(f"{path}: expected a COCO results list, or a COCO dataset with scored "
                                     "annotations (such as maskseg's predictions.json)")
            id_map = self._image_names(source, by_name)
            self._check_category_names(source.get("categories"))
            items = [_as_result(a, path) for a in source["annotations"]]
        elif isinstance(source, list):
            items = source
            sibling = path.with_name("predictions.json")
            if path.name == "results.json" and path.with_name("journal.jsonl").is_file() and sibling.is_file():
                log.info("%s is maskseg's: mapping its image ids to ANN's through %s", path, sibling)
                dataset = read_json(sibling, "predictions")
                id_map = self._image_names(dataset, by_name)
                self._check_category_names(dataset.get("categories"))
        else:
            raise EvalInputError(f"{path}: expected a COCO results list (a JSON array of objects), "
                                 f"found a JSON {type(source).__name__}")
        if not items:
            raise EvalInputError(f"{path}: no results (an empty list): there is nothing to evaluate")
        self.items = self._check(items, id_map, by_name, iou_types)

    def _image_names(self, dataset: Any, by_name: Callable[[str], int | None]) -> dict[int, int | None]:
        """The dataset's image id -> ANN's image id (``None``: ANN has no image of that name)."""
        imgs = dataset.get("images") if isinstance(dataset, dict) else None
        if not isinstance(imgs, list) or not all(isinstance(i, dict) and is_json_int(i.get("id"))
                                                 and isinstance(i.get("file_name"), str) for i in imgs):
            raise EvalInputError(f"{self.path}: its images need integer ids and file names to be matched to ANN's")
        return {i["id"]: by_name(i["file_name"]) for i in imgs}

    def _check_category_names(self, categories: Any) -> None:
        if not isinstance(categories, list):
            return
        differ = [f"{c['id']} is {c.get('name')!r} here, {self.gt.categories[c['id']]!r} in ANN"
                  for c in categories if isinstance(c, dict) and c.get("id") in self.gt.categories
                  and c.get("name") not in (None, self.gt.categories[c["id"]])]
        if differ:
            self.notes.warn(f"{self.path}: category ids are matched by number, but their names differ: "
                            f"{examples(differ)}")

    def _check(self, items: list, id_map: dict[int, int | None] | None, by_name: Callable[[str], int | None],
               iou_types: tuple[str, ...]) -> list[dict]:
        path, gt = self.path, self.gt
        kept: list[dict] = []
        unknown: list[Any] = []
        sizes: list[str] = []
        with_box = with_seg = 0
        for i, r in enumerate(items):
            where = f"{path}: result #{i}"
            if not isinstance(r, dict):
                raise EvalInputError(f"{where}: expected an object, found {type(r).__name__}")
            image = r.get("image_id", r.get("file_name"))
            if isinstance(image, str):
                image_id = by_name(image)
            elif is_json_int(image):
                image_id = image if id_map is None else id_map.get(image)
            else:
                raise EvalInputError(f"{where}: image_id must be an integer id or a file name, found {image!r}")
            cat = r.get("category_id")
            if isinstance(cat, float) and cat.is_integer():
                cat = r["category_id"] = int(cat)
            if not is_json_int(cat):
                raise EvalInputError(f"{where}: category_id must be an integer, found {cat!r}")
            if not is_json_number(r.get("score")):
                raise EvalInputError(f"{where}: score must be a finite number, found {r.get('score')!r}")
            if "bbox" in r:
                box = r["bbox"]
                if not (isinstance(box, list) and len(box) == 4 and all(map(is_json_number, box))):
                    raise EvalInputError(f"{where}: bbox must be [x, y, width, height], found {box!r}")
                with_box += 1
            if "segmentation" in r:
                _check_segmentation(r["segmentation"], where)
                with_seg += 1
            elif "bbox" not in r:
                raise EvalInputError(f"{where}: neither bbox nor segmentation")
            if image_id is None or image_id not in gt.images:
                unknown.append(image)
                continue
            seg = r.get("segmentation")
            img = gt.images[image_id]
            if isinstance(seg, dict) and list(seg["size"]) != [img["height"], img["width"]]:
                sizes.append(f"result #{i} on image {image_id} ({img.get('file_name', '?')}): mask "
                             f"{seg['size'][0]}x{seg['size'][1]}, ANN {img['height']}x{img['width']}")
            r["image_id"] = image_id
            kept.append(r)
        self._report(items, kept, unknown, sizes, with_box, with_seg, iou_types)
        if with_box == 0:
            for r in kept:  # loadRes takes areas and boxes from compressed RLE only when results have no bbox
                r["segmentation"] = _compressed(r["segmentation"], gt.images[r["image_id"]])
        return kept

    def _report(self, items: list, kept: list[dict], unknown: list, sizes: list[str], with_box: int,
                with_seg: int, iou_types: tuple[str, ...]) -> None:
        path, gt, n = self.path, self.gt, len(items)
        if sizes:
            raise EvalInputError(f"{path}: {len(sizes)} masks have another size than ANN gives their image "
                                 f"(height x width), e.g. {sizes[0]}; were the results made on other images?")
        if 0 < with_box < n:
            raise EvalInputError(f"{path}: {n - with_box} of {n} results have no bbox; give bbox for all or none")
        if "segm" in iou_types and with_seg < n:
            raise EvalInputError(f"{path}: {n - with_seg} of {n} results have no segmentation, so segm cannot be "
                                 "evaluated; evaluate bbox only (--iou-type bbox)")
        if unknown:
            shown = examples(sorted({str(u) for u in unknown}))
            if not kept:
                raise EvalInputError(f"{path}: none of the results' images are in ANN ({shown}); "
                                     "are these results for another dataset?")
            self.notes.warn(f"{path}: {len(unknown)} of {n} results are on images ANN does not have ({shown}); "
                            "they are left out")
        cats = Counter(r["category_id"] for r in kept)
        strangers = sorted(c for c in cats if c not in gt.categories)
        if strangers and len(strangers) == len(cats):
            self.notes.warn(f"{path}: none of the results' category ids ({examples(strangers)}) are ANN's "
                            f"({examples(sorted(gt.categories))}): every AP will be 0. Were the results made "
                            "with another category numbering (e.g. a COCO-trained model on a custom dataset)?")
        elif strangers:
            self.notes.warn(f"{path}: {sum(cats[c] for c in strangers)} results have category ids ANN does not "
                            f"have ({examples(strangers)}); pycocotools ignores them")
        missing = len(gt.images) - len({r["image_id"] for r in kept})
        if missing:
            log.info("%d of ANN's %d images have no results; their objects count as missed",
                     missing, len(gt.images))


def _as_result(ann: Any, path: Path) -> Any:
    """A scored dataset annotation as a results entry (``loadRes`` recomputes area, id and iscrowd)."""
    if not isinstance(ann, dict):
        return ann
    if "score" not in ann:
        raise EvalInputError(f"{path}: annotation id {ann.get('id')} has no score: a dataset is evaluated as "
                             "results only when its annotations are scored (is this ground truth?)")
    return {k: ann[k] for k in ("image_id", "category_id", "bbox", "score", "segmentation") if k in ann}


def _check_segmentation(seg: Any, where: str) -> None:
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if (isinstance(size, list) and len(size) == 2 and all(is_json_int(v) and v > 0 for v in size)
                and (isinstance(counts, str) or (isinstance(counts, list) and all(is_json_int(c) for c in counts)))):
            return
        raise EvalInputError(f"{where}: an RLE segmentation needs size [height, width] and counts")
    if isinstance(seg, list) and seg and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(is_json_number, p)) for p in seg):
        return
    raise EvalInputError(f"{where}: segmentation must be RLE or polygons (lists of at least 3 x, y pairs)")


def _compressed(seg: Any, img: dict) -> dict:
    """Polygons or uncompressed RLE -> compressed RLE, as pycocotools' ``annToRLE`` converts them."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, dict) and isinstance(seg["counts"], str):
        return seg
    h, w = img["height"], img["width"]
    rle = mask_utils.frPyObjects(seg, h, w)
    rle = mask_utils.merge(rle) if isinstance(seg, list) else rle
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """pycocotools reports with print(); keep it off our stdout and in the debug log."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        if buf.getvalue().strip():
            log.debug("pycocotools: %s", buf.getvalue().strip())
