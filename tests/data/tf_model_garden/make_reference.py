"""Runs the Model Garden Mask R-CNN export on real photos and stores raw outputs
plus "evaluator-style" results, computed with Model Garden's OWN evaluator code:

  * boxes -> original-image pixels:  COCOEvaluator._process_bbox_predictions
      (official/vision/evaluation/coco_evaluator.py: detection_boxes /=
       tile(image_info[:, 2:3, :], (1, 1, 2)))
  * COCO conversion + mask pasting:  coco_utils.convert_predictions_to_coco_annotations
      (official/vision/evaluation/coco_utils.py: yxyx_to_xywh, then
       mask_ops.paste_instance_masks(masks, xywh_boxes, int(image_info[0,0]),
       int(image_info[0,1])), then (pasted > 0) and RLE-encode)
  and, independently, a direct call of mask_ops.paste_instance_masks the same
  way, checked equal to the decoded RLEs.

Run:  /tmp/mg/venv/bin/python /tmp/mg/make_reference.py
Writes /tmp/mg/reference/<photo>.npz and /tmp/mg/reference/signature.txt
"""
import copy
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import numpy as np
from PIL import Image
from pycocotools import mask as mask_api
import tensorflow as tf

from official.vision.evaluation import coco_evaluator
from official.vision.evaluation import coco_utils
from official.vision.ops import box_ops
from official.vision.ops import mask_ops

OUT = os.environ.get('MG_OUT', '/tmp/mg')
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
EXPORT = os.path.join(OUT, 'export', 'saved_model')
REF = os.path.join(OUT, 'reference')
PHOTOS = {
    'fruits_nuts_0': os.path.join(REPO, 'tests', 'data', 'fruits_nuts', 'images', '0.jpg'),   # 800x600
    'chelsea': os.path.join(REPO, 'sample_images', 'chelsea.png'),                            # 451x300
}


def describe_signature(fn):
  lines = ['serving_default inputs:']
  args, kwargs = fn.structured_input_signature
  for k, spec in sorted(kwargs.items()):
    lines.append('  %s: %s %s (TensorSpec name=%r)' % (
        k, spec.dtype.name, spec.shape.as_list(), spec.name))
  lines.append('serving_default outputs:')
  for k, spec in sorted(fn.structured_outputs.items()):
    lines.append('  %s: %s %s' % (k, spec.dtype.name, spec.shape.as_list()))
  return '\n'.join(lines)


def main():
  os.makedirs(REF, exist_ok=True)
  loaded = tf.saved_model.load(EXPORT)
  fn = loaded.signatures['serving_default']
  sig = describe_signature(fn)
  print(sig)
  open(os.path.join(REF, 'signature.txt'), 'w').write(sig + '\n')
  (input_key,) = fn.structured_input_signature[1].keys()

  evaluator = coco_evaluator.COCOEvaluator(
      annotation_file=None, include_mask=True, need_rescale_bboxes=True)

  for key, path in PHOTOS.items():
    img = np.asarray(Image.open(path).convert('RGB'), dtype=np.uint8)
    h, w = img.shape[:2]
    out = fn(**{input_key: tf.constant(img[None])})
    raw = {k: v.numpy() for k, v in out.items()}
    n = int(raw['num_detections'][0])

    # 1) Model Garden's own box rescale (in place on a copy, numpy).
    preds = copy.deepcopy(raw)
    preds['source_id'] = np.array([1])
    evaluator._process_bbox_predictions(preds)   # pylint: disable=protected-access
    boxes_orig_yxyx = preds['detection_boxes'].copy()   # [1, 100, 4] orig px

    # 2) Model Garden's own COCO conversion (pastes all max_num_detections).
    batched = {k: [v] for k, v in preds.items()}
    anns = coco_utils.convert_predictions_to_coco_annotations(batched)
    coco_bbox_xywh = np.array([a['bbox'] for a in anns], np.float32)
    coco_masks = np.stack([mask_api.decode(a['segmentation']) for a in anns])

    # 3) Direct paste_instance_masks call exactly as coco_utils does it.
    xywh = box_ops.yxyx_to_xywh(boxes_orig_yxyx[0])
    pasted = mask_ops.paste_instance_masks(
        raw['detection_masks'][0], xywh,
        int(raw['image_info'][0, 0, 0]), int(raw['image_info'][0, 0, 1]))
    pasted_bool = pasted > 0.0
    assert pasted_bool.shape == (raw['detection_masks'].shape[1], h, w)
    assert np.array_equal(pasted_bool, coco_masks.astype(bool)), key
    assert np.allclose(xywh, coco_bbox_xywh), key

    np.savez_compressed(
        os.path.join(REF, key + '.npz'),
        image_path=np.array(path),
        image_hw=np.array([h, w], np.int32),
        # raw serving_default outputs (batch dim kept)
        detection_boxes=raw['detection_boxes'],
        detection_classes=raw['detection_classes'],
        detection_scores=raw['detection_scores'],
        detection_masks=raw['detection_masks'],
        num_detections=raw['num_detections'],
        image_info=raw['image_info'],
        # evaluator-style (first num_detections only)
        eval_boxes_yxyx=boxes_orig_yxyx[0, :n],
        eval_boxes_xywh=xywh[:n].astype(np.float32),
        eval_classes=raw['detection_classes'][0, :n],
        eval_scores=raw['detection_scores'][0, :n],
        eval_masks=pasted_bool[:n],
    )
    print('%s: %s %dx%d  num_detections=%d  image_info=%s' % (
        key, path, w, h, n, raw['image_info'][0].tolist()))
    print('  scores[:5]=%s classes[:5]=%s' % (
        np.round(raw['detection_scores'][0, :5], 4).tolist(),
        raw['detection_classes'][0, :5].tolist()))
    print('  boxes[:3] (canvas px)=%s' % np.round(raw['detection_boxes'][0, :3], 2).tolist())
    print('  eval boxes[:3] (orig px yxyx)=%s' % np.round(boxes_orig_yxyx[0, :3], 2).tolist())
    areas = pasted_bool[:n].reshape(n, -1).sum(1)
    print('  mask prob range %.3f..%.3f; pasted areas min/median/max = %s' % (
        raw['detection_masks'][0, :n].min(), raw['detection_masks'][0, :n].max(),
        (int(areas.min()), int(np.median(areas)), int(areas.max())) if n else None))
    print('  unique classes among detections: %d' % len(set(raw['detection_classes'][0, :n].tolist())))


if __name__ == '__main__':
  sys.exit(main())
