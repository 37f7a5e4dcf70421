"""Core tests of the official SVD-v2 training data as the script reads it
(controlnext_core/video_dataset.py): the meta-info file, the frames taken, the hands mask."""
from __future__ import annotations

import json

import pytest
import torch

import controlnext_core as cn
from controlnext_core import video_dataset as vd


def test_the_meta_info_file_lists_its_clips_and_every_missing_file_at_once(tmp_path):
    for name in ("a.mp4", "a_pose.mp4", "a.json"):
        (tmp_path / name).write_bytes(b"x")
    meta = tmp_path / "meta_info.json"
    meta.write_text(json.dumps([{"video_path": "a.mp4", "guide_path": "a_pose.mp4", "meta_info": "a.json"}]))
    [clip] = vd.read_meta_info(str(meta))
    assert clip == vd.MetaInfoClip(str(tmp_path / "a.mp4"), str(tmp_path / "a_pose.mp4"), str(tmp_path / "a.json"))
    meta.write_text(json.dumps([{"video_path": "b.mp4", "guide_path": "a_pose.mp4"}, {"video_path": "a.mp4"},
                                {"video_path": "a.mp4", "guide_path": "c.mp4"}]))
    with pytest.raises(cn.ControlNeXtError) as raised:
        vd.read_meta_info(str(meta))
    message = str(raised.value)
    assert "3 problem(s)" in message and "clip 0: its video_path" in message and "b.mp4 does not exist" in message
    assert "clip 1: needs 'video_path' and 'guide_path'" in message and "c.mp4 does not exist" in message
    meta.write_text("{")
    with pytest.raises(cn.ControlNeXtError, match="cannot be read"):
        vd.read_meta_info(str(meta))


def test_frames_are_taken_every_interval_from_a_random_start_and_the_interval_shrinks_for_short_clips():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        frames = vd.frame_indices(100, 14, 3, generator)
        assert len(frames) == 14 and all(b - a == 3 for a, b in zip(frames, frames[1:])) and frames[-1] < 100
    assert vd.frame_indices(28, 14, 3, generator) == list(range(0, 28, 2))  # 28 // 14 = 2
    drawn = {frames[1] - frames[0] for frames in (vd.frame_indices(200, 14, 0, generator) for _ in range(50))}
    assert drawn <= set(range(2, 8)) and len(drawn) > 1
    with pytest.raises(cn.ControlNeXtError, match="shorter than the 14 frames"):
        vd.frame_indices(10, 14, 3, generator)


def test_the_hands_mask_draws_confident_hand_boxes_with_a_margin_and_weights_the_loss():
    detections = {"hands_boxes": [[[0.25, 0.25], [0.5, 0.5]], [[0.75, 0.75], [1.0, 1.0]]],
                  "hands_score": [[0.9, 0.7], [0.4, 0.5]]}  # the second hand averages 0.45: not drawn
    mask = vd.hands_mask(detections, 100, 100, margin=10)
    assert mask.shape == (1, 100, 100)
    assert mask[0, 15, 15].item() == pytest.approx(0.8) and mask[0, 14, 14].item() == 0.0
    assert mask[0, 59, 59].item() == pytest.approx(0.8) and mask[0, 60, 60].item() == 0.0
    assert mask[0, 90, 90].item() == 0.0
    weights = vd.loss_weights(torch.stack([mask, mask]))
    assert weights[0].unique().tolist() == [1.0]  # the reference frame
    assert sorted(weights[1].unique().tolist()) == pytest.approx([1.0, 4.2])
    assert vd.hands_mask({}, 4, 4).sum().item() == 0.0
