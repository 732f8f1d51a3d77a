"""Builds a tiny, randomly initialised Model Garden Mask R-CNN and exports it
with Model Garden's own exporter (export_saved_model_lib.export_inference_graph).

Run:  /tmp/mg/venv/bin/python /tmp/mg/make_export.py
Writes: /tmp/mg/ckpt/ (random-init checkpoint), /tmp/mg/export/{saved_model/,params.yaml}

Versions used: tf-models-official 2.20.0, tensorflow 2.20.0, tf_keras 2.20.1, Python 3.11.7.
"""
import os
import shutil
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import numpy as np
import tensorflow as tf
import tf_keras

from official.core import exp_factory
from official.vision import registry_imports  # noqa: F401  (registers configs)
from official.vision.serving import detection
from official.vision.serving import export_saved_model_lib

SEED = int(os.environ.get('MG_SEED', '7'))
OUT = os.environ.get('MG_OUT', '/tmp/mg')
EXPORT_DIR = os.path.join(OUT, 'export')
CKPT_DIR = os.path.join(OUT, 'ckpt')
SIZE = 256
NMS_VERSION = os.environ.get('MG_NMS', 'batched')
DEPTH_MULT = float(os.environ.get('MG_DEPTH', '0.125'))


def build_config():
  config = exp_factory.get_exp_config('maskrcnn_resnetfpn_coco')
  config.override({
      'runtime': {'mixed_precision_dtype': 'float32', 'enable_xla': False},
      'task': {
          'init_checkpoint': '',          # random weights, no ImageNet backbone
          'model': {
              'num_classes': 91,            # COCO, background (0) included
              'input_size': [SIZE, SIZE, 3],
              'backbone': {'type': 'resnet',
                           'resnet': {'model_id': 18, 'depth_multiplier': DEPTH_MULT}},
              'decoder': {'type': 'fpn', 'fpn': {'num_filters': 32}},
              'rpn_head': {'num_convs': 1, 'num_filters': 32},
              'detection_head': {'num_convs': 4, 'num_filters': 32,
                                 'num_fcs': 1, 'fc_dims': 64},
              'mask_head': {'num_convs': 4, 'num_filters': 32,
                            'upsample_factor': 2},   # 14x14 RoI -> 28x28 masks
              # nms_version 'batched' (tf.image.combined_non_max_suppression)
              # instead of the default 'v2', which unrolls a while-loop NMS per
              # class (90x) and alone adds ~5.7 MB of graph to saved_model.pb.
              'detection_generator': {'max_num_detections': 100,
                                      'nms_version': NMS_VERSION},
              'norm_activation': {'use_sync_bn': False},
          },
      },
  }, is_strict=True)
  config.validate()
  return config


def tweak_random_heads(model, rng):
  """Random init gives softmax ~1/91 per class (< 0.05 pre-NMS threshold), i.e.
  zero detections. Scale the class-logit layer so scores vary per RoI and give
  a handful of classes a positive bias so some exceed the threshold. Also scale
  the mask-logit layer so masks are not all ~0.5."""
  done = []
  for v in model.trainable_variables:
    name = v.name
    if 'detection-scores' in name and name.endswith('kernel:0'):
      v.assign(v * 60.0)
      done.append(name)
    elif 'detection-scores' in name and name.endswith('bias:0'):
      b = np.zeros(v.shape, np.float32)
      b[0] = 1.0                                   # background
      cls = rng.choice(np.arange(1, v.shape[0]), size=8, replace=False)
      b[cls] = rng.uniform(2.0, 3.5, size=cls.shape).astype(np.float32)
      v.assign(b)
      done.append(name + ' classes=' + str(sorted(cls.tolist())))
    elif 'detection-boxes' in name and name.endswith('kernel:0'):
      v.assign(v * 50.0)                           # boxes differ from proposals
      done.append(name)
    elif 'mask-logits' in name and name.endswith('kernel:0'):
      v.assign(v * 8.0)
      done.append(name)
  return done


def main():
  tf.random.set_seed(SEED)
  tf_keras.utils.set_random_seed(SEED)
  rng = np.random.default_rng(SEED)
  config = build_config()

  # Build the model exactly the way the exporter will (same DetectionModule),
  # create its variables with one dummy forward, tweak heads, save checkpoint.
  module = detection.DetectionModule(
      params=config, batch_size=1, input_image_size=[SIZE, SIZE],
      input_type='image_tensor', num_channels=3)
  dummy = tf.zeros([1, SIZE, SIZE, 3], tf.uint8)
  module.serve(dummy)
  print('\n'.join(tweak_random_heads(module.model, rng)))
  nparams = sum(int(np.prod(v.shape)) for v in module.model.variables)
  print('model variables (params):', nparams)
  for sub in ('backbone', 'decoder', 'rpn_head', 'detection_head', 'mask_head'):
    layer = getattr(module.model, sub)
    print('  %-15s %d' % (sub, sum(int(np.prod(v.shape)) for v in layer.variables)))

  shutil.rmtree(CKPT_DIR, ignore_errors=True)
  ckpt = tf.train.Checkpoint(model=module.model)
  ckpt_path = ckpt.save(os.path.join(CKPT_DIR, 'ckpt'))
  print('checkpoint:', ckpt_path)

  shutil.rmtree(EXPORT_DIR, ignore_errors=True)
  export_saved_model_lib.export_inference_graph(
      input_type='image_tensor',
      batch_size=1,
      input_image_size=[SIZE, SIZE],
      params=config,
      checkpoint_path=ckpt_path,
      export_dir=EXPORT_DIR,
      export_saved_model_subdir='saved_model',   # as export_saved_model.py does
      # Pass the already-built DetectionModule: its variables exist, so the
      # tf.function is traced once (a fresh module creates variables during
      # the first trace and the SavedModel then holds two full traces).
      # export_base.export still restores checkpoint_path into it (with
      # assert_existing_objects_matched()).
      export_module=module,
  )
  print('exported to', EXPORT_DIR)


if __name__ == '__main__':
  sys.exit(main())
