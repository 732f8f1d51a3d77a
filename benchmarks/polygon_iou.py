"""Mask IoU of maskseg's polygons (rasterised by pycocotools) against the RLE masks they came from.

    python benchmarks/polygon_iou.py OUT/predictions.json [--tolerances 0,0.5,1,1.5,2]

Prints, per tolerance, mean / 5th percentile / minimum IoU over every mask, the IoU of all pixels
pooled, and polygon vertices per mask: what --polygon-tolerance's default was chosen from.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from pycocotools import mask as mask_utils

from maskseg.detections import BoxMask
from maskseg.writers.shapes import mask_polygons


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("predictions")
    parser.add_argument("--tolerances", default="0,0.25,0.5,0.75,1,1.5,2")
    args = parser.parse_args()
    with open(args.predictions, encoding="utf-8") as fh:
        anns = [a for a in json.load(fh)["annotations"] if a.get("area", 0) > 0]
    print(f"{len(anns)} masks; area median {np.median([a['area'] for a in anns]):.0f} px")
    print("tolerance  mean IoU  p5 IoU  min IoU  pooled IoU  vertices/mask")
    for tol in (float(t) for t in args.tolerances.split(",")):
        ious, inter_sum, union_sum, vertices = [], 0, 0, 0
        for a in anns:
            rle = a["segmentation"]
            h, w = rle["size"]
            polys = mask_polygons(BoxMask.from_rle(rle), tol)
            vertices += sum(len(p) for p in polys)
            poly_rle = mask_utils.merge(mask_utils.frPyObjects([p.ravel().tolist() for p in polys], h, w))
            ref = {"size": [h, w], "counts": rle["counts"].encode("ascii")}
            inter = float(mask_utils.area(mask_utils.merge([ref, poly_rle], intersect=True)))
            union = float(mask_utils.area(mask_utils.merge([ref, poly_rle])))
            ious.append(inter / union)
            inter_sum += inter
            union_sum += union
        ious = np.array(ious)
        print(f"{tol:9.2f}  {ious.mean():8.4f}  {np.percentile(ious, 5):6.4f}  {ious.min():7.4f}  "
              f"{inter_sum / union_sum:10.4f}  {vertices / len(anns):13.1f}")


if __name__ == "__main__":
    main()
