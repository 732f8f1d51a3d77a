"""The pictures of ``inspect_image``'s stages, with the training view's."""

from __future__ import annotations

import cv2


def test_pictures(with_targets, tmp_path):
    from maskseg.inspection.draw import draw_all

    paths = draw_all(with_targets, tmp_path)
    assert [p.name for p in paths] == ["objectness.png", "proposals.png", "roi_levels.png", "mask_logits.png",
                                       "overlay.jpg", "targets_anchors.png", "targets_masks.png"]
    for p in paths:
        img = cv2.imread(str(p))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100, p
    assert cv2.imread(str(tmp_path / "overlay.jpg")).shape[:2] == (600, 800)
