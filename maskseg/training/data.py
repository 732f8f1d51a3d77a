"""COCO instances JSON -> training samples: validation, targets, augmentations, collate.

A sample is ``(image, target)``: image [3, H, W] float32 in [0, 1]; target ``boxes`` [N, 4] float32
XYXY pixels, ``labels`` [N] int64 model labels (1..K, category ids mapped in sorted id order),
``masks`` [N, H, W] uint8, ``image_id`` int (the COCO id). Crowd regions are left out of the targets,
as torchvision's reference training does; pycocotools' evaluation ignores detections matched to them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..detections import Category
from ..errors import SourceError
from ..jsonio import is_json_int, is_json_number

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CocoImage:
    """One image record and its (validated) annotation records."""

    id: int
    file_name: str
    width: int
    height: int
    annotations: tuple[dict, ...]


@dataclass(frozen=True)
class CocoSet:
    """A validated COCO instances file. ``categories``: label 1..K in sorted category id order."""

    path: str
    categories: list[Category]
    images: list[CocoImage]
    data: dict

    def subset(self, image_ids: set[int], path: str) -> CocoSet:
        """The same categories with only the images (and their annotations) in ``image_ids``."""
        images = [im for im in self.images if im.id in image_ids]
        data = {
            **{k: v for k, v in self.data.items() if k not in ("images", "annotations")},
            "images": [im for im in self.data["images"] if im["id"] in image_ids],
            "annotations": [a for a in self.data["annotations"] if a["image_id"] in image_ids],
        }
        return CocoSet(path, self.categories, images, data)

    def split(self, fraction: float) -> tuple[CocoSet, CocoSet]:
        """(train, val): the last ``round(fraction * N)`` images in the file's order are held out, so the
        split is the same on every machine and for every seed."""
        n_val = min(max(round(fraction * len(self.images)), 1), len(self.images) - 1)
        if len(self.images) < 2:
            raise SourceError(f"{self.path}: --val-split needs at least 2 images, found {len(self.images)}")
        val_ids = {im.id for im in self.images[-n_val:]}
        train_ids = {im.id for im in self.images[:-n_val]}
        return self.subset(train_ids, f"{self.path} (train split)"), self.subset(val_ids, f"{self.path} (val split)")

    @property
    def num_instances(self) -> int:
        return sum(1 for im in self.images for a in im.annotations if not a.get("iscrowd", 0))


def read_coco(path: str | Path) -> CocoSet:
    """Read and check a COCO instances JSON; the first bad record is named in a ``SourceError``.

    Accepts polygons, RLE (compressed or not), crowd regions, any category ids (mapped to labels
    1..K in sorted order), images without annotations and annotation id 0.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SourceError(f"{path}: annotation file not found") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: not a readable JSON file ({exc})") from None
    return check_coco(data, path)


def check_coco(data: Any, path: Path) -> CocoSet:
    """A parsed COCO instances object, checked, as a CocoSet (``path`` names it in messages)."""
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a COCO object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise SourceError(f"{path}: no '{key}' list (a COCO instances file has images, annotations, categories)")
    categories = _check_categories(path, data["categories"])
    images = _check_images(path, data["images"])
    by_image: dict[int, list[dict]] = {i: [] for i in images}
    seen: set[int] = set()
    cat_ids = {c.id for c in categories}
    for k, ann in enumerate(data["annotations"]):
        _check_annotation(path, k, ann, images, cat_ids, seen)
        by_image[ann["image_id"]].append(ann)
    records = [CocoImage(i, im["file_name"], im["width"], im["height"], tuple(by_image[i]))
               for i, im in images.items()]
    return CocoSet(str(path), categories, records, data)


def _check_categories(path: Path, records: list) -> list[Category]:
    if not records:
        raise SourceError(f"{path}: 'categories' is empty; training needs at least one category")
    seen: dict[int, str] = {}
    for k, c in enumerate(records):
        where = f"{path}: categories[{k}]"
        if not isinstance(c, dict) or not is_json_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise SourceError(f"{where}: expected an object with an integer 'id' and a string 'name', found {c!r:.120}")
        if c["id"] in seen:
            raise SourceError(f"{where}: category id {c['id']} appears twice")
        seen[c["id"]] = c["name"]
    return [Category(label, cid, seen[cid]) for label, cid in enumerate(sorted(seen), start=1)]


def _check_images(path: Path, records: list) -> dict[int, dict]:
    images: dict[int, dict] = {}
    for k, im in enumerate(records):
        where = f"{path}: images[{k}]"
        if not isinstance(im, dict) or not is_json_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise SourceError(f"{where}: expected an object with an integer 'id' and a string 'file_name', "
                              f"found {im!r:.120}")
        for key in ("width", "height"):
            if not is_json_int(im.get(key)) or im[key] < 1:
                raise SourceError(f"{where} (id {im['id']}): '{key}' must be a positive integer, found {im.get(key)!r}")
        if im["id"] in images:
            raise SourceError(f"{where}: image id {im['id']} appears twice")
        images[im["id"]] = im
    return images


def _check_annotation(path: Path, k: int, ann: Any, images: dict[int, dict], cat_ids: set[int],
                      seen: set[int]) -> None:
    where = f"{path}: annotations[{k}]"
    if not isinstance(ann, dict) or not is_json_int(ann.get("id")):
        raise SourceError(f"{where}: expected an object with an integer 'id', found {ann!r:.120}")
    where += f" (id {ann['id']})"
    if ann["id"] in seen:
        raise SourceError(f"{where}: annotation id {ann['id']} appears twice")
    seen.add(ann["id"])
    if ann.get("image_id") not in images or not is_json_int(ann.get("image_id")):
        raise SourceError(f"{where}: image_id {ann.get('image_id')!r} is not an image of this file")
    if ann.get("category_id") not in cat_ids or not is_json_int(ann.get("category_id")):
        raise SourceError(f"{where}: category_id {ann.get('category_id')!r} is not a category of this file")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise SourceError(f"{where}: iscrowd must be 0 or 1, found {ann.get('iscrowd')!r}")
    bbox = ann.get("bbox")
    if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(map(is_json_number, bbox))
                                 and bbox[2] >= 0 and bbox[3] >= 0):
        raise SourceError(f"{where}: bbox must be [x, y, width, height] with width, height >= 0, found {bbox!r:.120}")
    im = images[ann["image_id"]]
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            raise SourceError(f"{where}: segmentation is an empty polygon list")
        for poly in seg:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
                    and all(map(is_json_number, poly))):
                raise SourceError(f"{where}: a polygon must be a flat list of x, y numbers (at least 3 points), "
                                  f"found {poly!r:.120}")
    elif isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if size != [im["height"], im["width"]]:
            raise SourceError(f"{where}: RLE size {size!r} differs from its image's [height, width] "
                              f"[{im['height']}, {im['width']}]")
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(map(is_json_int, counts)))):
            raise SourceError(f"{where}: RLE counts must be a string or a list of integers")
        if isinstance(counts, list) and sum(counts) != im["height"] * im["width"]:
            raise SourceError(f"{where}: RLE counts sum to {sum(counts)}, expected height x width = "
                              f"{im['height'] * im['width']}")
    else:
        raise SourceError(f"{where}: segmentation must be a list of polygons or an RLE object, found "
                          f"{type(seg).__name__}")


def annotation_mask(ann: dict, height: int, width: int) -> Any:
    """One annotation's segmentation (polygons, RLE or uncompressed RLE) -> [H, W] uint8 numpy mask."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    return mask_utils.decode(rle)


@dataclass(frozen=True)
class Augment:
    """Training augmentations, each applied with its probability (``color_jitter``: strength 0-1).

    ``copy_paste``: probability of pasting 1-6 instances from another training image (each flipped at
    random and scaled 0.8-1.2) on top of this one; instances they cover are trimmed or dropped.
    """

    hflip: float = 0.0
    vflip: float = 0.0
    transpose: float = 0.0
    color_jitter: float = 0.0
    copy_paste: float = 0.0


class CocoDetection:
    """Map-style dataset of a ``CocoSet``: index -> (image, target) as described in the module docstring.

    Randomness comes from torch's generator (per DataLoader worker), so a run is reproducible from its seed.
    """

    def __init__(self, coco: CocoSet, image_dir: str | Path, augment: Augment | None = None) -> None:
        self.coco = coco
        self.image_dir = Path(image_dir)
        self.augment = augment or Augment()
        self.label_of = {c.id: c.label for c in coco.categories}

    def __len__(self) -> int:
        return len(self.coco.images)

    def load(self, index: int) -> tuple[Any, dict]:
        """Decoded image [3, H, W] uint8 and its target (masks uint8), no augmentation."""
        import numpy as np
        import torch

        from ..decode import decode_bytes, read_file_bytes

        rec = self.coco.images[index]
        file = self.image_dir / rec.file_name
        try:
            data, _ = read_file_bytes(str(file))
        except Exception as exc:
            raise SourceError(f"{file}: image {rec.id} of {self.coco.path} cannot be read ({exc})") from None
        rgb = decode_bytes(data, str(file))
        if rgb.shape[:2] != (rec.height, rec.width):
            raise SourceError(f"{file}: decoded size {rgb.shape[1]}x{rgb.shape[0]} differs from the "
                              f"{rec.width}x{rec.height} that {self.coco.path} gives for image {rec.id}")
        boxes, labels, masks = [], [], []
        for ann in rec.annotations:
            if ann.get("iscrowd", 0):
                continue
            mask = annotation_mask(ann, rec.height, rec.width)
            if ann.get("bbox") is not None:
                x, y, w, h = ann["bbox"]
                box = [x, y, x + w, y + h]
            else:
                ys, xs = np.nonzero(mask)
                box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
            boxes.append(box)
            labels.append(self.label_of[ann["category_id"]])
            masks.append(mask)
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, rec.height, rec.width),
                                                                                  dtype=torch.uint8),
            "image_id": rec.id,
        }
        target["boxes"][:, 0::2] = target["boxes"][:, 0::2].clamp(0, rec.width)
        target["boxes"][:, 1::2] = target["boxes"][:, 1::2].clamp(0, rec.height)
        return image, target

    def __getitem__(self, index: int) -> tuple[Any, dict]:
        import torch

        image, target = self.load(index)
        aug = self.augment
        if aug.copy_paste and len(self) > 1 and torch.rand(()) < aug.copy_paste:
            other = int(torch.randint(len(self) - 1, ()))
            image, target = copy_paste(image, target, *self.load(other + (other >= index)))
        image, target = flip_and_jitter(image, target, aug)
        boxes = target["boxes"]
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        if not bool(keep.all()):
            target = {**target, "boxes": target["boxes"][keep], "labels": target["labels"][keep],
                      "masks": target["masks"][keep]}
        return image.float().div_(255.0), target


def flip_and_jitter(image: Any, target: dict, aug: Augment) -> tuple[Any, dict]:
    """Random horizontal/vertical flips, transpose and colour jitter on a uint8 [3, H, W] image and its
    target (boxes XYXY pixels follow the pixels). Written out because torchvision.transforms.v2 has no
    transpose; flips and transpose are then one index operation each."""
    import torch
    from torchvision.transforms.v2 import functional as tvf

    boxes, masks = target["boxes"].clone(), target["masks"]
    if aug.hflip and torch.rand(()) < aug.hflip:
        width = image.shape[-1]
        image, masks = image.flip(-1), masks.flip(-1)
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    if aug.vflip and torch.rand(()) < aug.vflip:
        height = image.shape[-2]
        image, masks = image.flip(-2), masks.flip(-2)
        boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
    if aug.transpose and torch.rand(()) < aug.transpose:
        image, masks = image.transpose(-1, -2), masks.transpose(-1, -2)
        boxes = boxes[:, [1, 0, 3, 2]]
    if aug.color_jitter:
        s = aug.color_jitter

        def factor() -> float:
            return float(torch.empty(()).uniform_(max(0.0, 1 - s), 1 + s))

        image = tvf.adjust_brightness(image, factor())
        image = tvf.adjust_contrast(image, factor())
        image = tvf.adjust_saturation(image, factor())
    return image.contiguous(), {**target, "boxes": boxes, "masks": masks.contiguous()}


def copy_paste(image: Any, target: dict, src_image: Any, src_target: dict, *, max_instances: int = 6,
               min_visible: float = 0.3) -> tuple[Any, dict]:
    """Paste 1-``max_instances`` instances of ``src`` (each flipped at random, scaled 0.8-1.2, placed at
    random) onto ``image``. Instances of ``target`` left with less than ``min_visible`` of their area are
    dropped; the rest get boxes recomputed from what is still visible. Images uint8 [3, H, W]."""
    import torch
    import torch.nn.functional as F
    from torchvision.ops import masks_to_boxes

    n_src = len(src_target["labels"])
    if n_src == 0:
        return image, target
    height, width = image.shape[-2:]
    image = image.clone()
    masks = target["masks"].clone()
    areas = masks.flatten(1).sum(1)
    labels = [target["labels"]]
    new_masks = []
    k = int(torch.randint(1, min(max_instances, n_src) + 1, ()))
    for i in torch.randperm(n_src)[:k].tolist():
        x0, y0, x1, y1 = src_target["boxes"][i].round().int().tolist()
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        patch = src_image[:, y0:y1, x0:x1].float()
        pmask = src_target["masks"][i, y0:y1, x0:x1].float()
        if torch.rand(()) < 0.5:
            patch, pmask = patch.flip(-1), pmask.flip(-1)
        scale = float(torch.empty(()).uniform_(0.8, 1.2))
        h = min(max(round((y1 - y0) * scale), 2), height)
        w = min(max(round((x1 - x0) * scale), 2), width)
        patch = F.interpolate(patch[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        pmask = F.interpolate(pmask[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0.5
        if not bool(pmask.any()):
            continue
        top = int(torch.randint(height - h + 1, ()))
        left = int(torch.randint(width - w + 1, ()))
        full = torch.zeros((height, width), dtype=torch.bool)
        full[top:top + h, left:left + w] = pmask
        region = image[:, top:top + h, left:left + w]
        region[:, pmask] = patch.round().clamp(0, 255).to(image.dtype)[:, pmask]
        masks[:, full] = 0
        for m in new_masks:
            m[full] = 0
        new_masks.append(full.to(torch.uint8))
        labels.append(src_target["labels"][i : i + 1])
    if not new_masks:
        return image, target
    keep = masks.flatten(1).sum(1) >= min_visible * areas.clamp(min=1)
    all_masks = torch.cat([masks[keep], torch.stack(new_masks)])
    visible = all_masks.flatten(1).sum(1) > 0
    all_masks = all_masks[visible]
    all_labels = torch.cat([labels[0][keep], *labels[1:]])[visible]
    new_boxes = masks_to_boxes(all_masks)
    new_boxes[:, 2:] += 1  # masks_to_boxes gives the last pixel's index; COCO/XYXY boxes end after it
    return image, {**target, "boxes": new_boxes, "labels": all_labels, "masks": all_masks}


def collate(batch: list[tuple[Any, dict]]) -> tuple[list[Any], list[dict]]:
    """Samples -> (images, targets) lists: torchvision's detection models take per-image lists."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
