"""The training view obeys torchvision's matcher and sampler rules and gives the losses ``model.train()`` gives."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from maskseg.decode import decode_bytes
from maskseg.errors import UsageError
from maskseg.inspection import inspect_image

from ..conftest import SAMPLES
from .conftest import ANN, FRUITS


def test_training_view_obeys_the_matcher_and_sampler(with_targets, loaded):
    t = with_targets.targets
    assert t is not None and t.file_name == "3.jpg" and len(t.gt_boxes) > 0
    assert set(t.gt_category_ids.tolist()) <= {1, 2, 3}
    labels = t.anchor_labels
    assert len(labels) == sum(lv.anchor_count for lv in with_targets.levels)
    pos, neg = t.rpn_sampled_pos, t.rpn_sampled_neg
    assert (t.rpn_batch_size, t.rpn_positive_fraction) == (256, 0.5)
    assert len(pos) + len(neg) <= 256
    assert len(pos) <= 128
    assert len(pos) == min(int((labels == 1).sum()), 128)  # all positives are taken while they are few
    assert len(neg) == min(int((labels == 0).sum()), 256 - len(pos))
    assert np.all(labels[pos] == 1) and np.all(labels[neg] == 0)
    assert not set(pos.tolist()) & set(neg.tolist())
    assert np.all(labels[t.gt_best_anchor] == 1)  # each ground truth's best anchor is positive
    assert t.rpn_regression_targets.shape == (len(pos), 4)

    net = loaded.module
    assert t.roi_proposals <= net.rpn._post_nms_top_n["training"] + len(t.gt_boxes)
    assert (t.roi_batch_size, t.roi_positive_fraction) == (512, 0.25)
    roi_pos = int((t.roi_labels > 0).sum())
    assert len(t.roi_labels) <= 512 and roi_pos <= 128
    assert roi_pos == min(t.roi_matched["foreground"], 128)
    assert t.roi_matched["ignored"] == 0  # one IoU threshold (0.5): nothing between
    assert t.mask_targets.shape == (roi_pos, 28, 28)
    assert t.mask_targets.min() >= 0 and t.mask_targets.max() <= 1
    assert set(t.losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask",
                             "loss_total"}
    assert not net.training  # the caller's model stays in eval mode


def _truth(loaded, name: str):
    from maskseg.inspection.targets import load_ground_truth

    rgb = decode_bytes((FRUITS / "images" / name).read_bytes(), name)
    return rgb, load_ground_truth(loaded, rgb.shape[:2], name, ANN)


def test_training_view_losses_equal_a_train_mode_forward(with_targets, loaded):
    rgb, truth = _truth(loaded, "3.jpg")
    net = copy.deepcopy(loaded.module).train()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(7)
        losses = net([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255], [truth.target])
    for k, v in losses.items():
        assert with_targets.targets.losses[k] == pytest.approx(float(v), rel=1e-5), k


def test_training_view_is_reproducible(with_targets, loaded):
    from maskseg.inspection.targets import training_view

    rgb, truth = _truth(loaded, "3.jpg")
    first = with_targets.targets
    again, other = (training_view(loaded, rgb, truth, seed=s) for s in (7, 8))
    np.testing.assert_array_equal(again.rpn_sampled_pos, first.rpn_sampled_pos)
    np.testing.assert_array_equal(again.rpn_sampled_neg, first.rpn_sampled_neg)
    np.testing.assert_array_equal(again.roi_labels, first.roi_labels)
    assert again.losses == first.losses
    assert not np.array_equal(other.rpn_sampled_neg, first.rpn_sampled_neg)  # another seed, another sample


def test_targets_errors(loaded, tmp_path):
    with pytest.raises(UsageError, match=r"no image named chelsea\.png among its 18 images"):
        inspect_image(SAMPLES / "chelsea.png", loaded, targets=ANN)
    with pytest.raises(UsageError, match="no such file"):
        inspect_image(SAMPLES / "chelsea.png", loaded, targets=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UsageError, match="not a COCO annotation file"):
        inspect_image(SAMPLES / "chelsea.png", loaded, targets=bad)
