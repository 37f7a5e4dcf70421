"""Core tests of the poses and hands detections made for clip folders that lack them
(controlnext_core/clip_poses.py): drawn as the official code draws poses, hands boxes from the hand
keypoints in the official detections' format, cached beside the clips, the user's folders untouched."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import controlnext_core as cn
from controlnext_core import clip_poses
from controlnext_core import video_dataset as vd
from controlnext_core.preprocess.pose import KEYPOINT_COUNT, LEFT_HAND, RIGHT_HAND, PoseFrame, draw_pose
from test_core_video_dataset import write_frames

WIDTH, HEIGHT = 48, 32


def person(frame_value: float) -> np.ndarray:
    """One person: a body, a left hand of visible keypoints around (0.25, 0.5) and a right hand not seen."""
    keypoints = np.zeros((1, KEYPOINT_COUNT, 3))
    keypoints[0, :18, :2] = np.linspace(0.2, 0.8, 36).reshape(18, 2)
    keypoints[0, :18, 2] = 0.9
    hand = np.stack([np.linspace(0.2, 0.3, 21), np.linspace(0.45, 0.55, 21), np.full(21, 0.8)], axis=1)
    hand[0] = (0.9, 0.9, 0.1)  # a keypoint DWPose is unsure of: outside the box (which starts at the 2nd)
    hand[1, 0] += frame_value  # which frame was detected
    keypoints[0, LEFT_HAND] = hand
    keypoints[0, RIGHT_HAND, 2] = 0.05
    return keypoints


class CountingDetector:
    """A stand-in for DWPose: a person per frame, placed by the frame's value; counts its frames."""

    def __init__(self, fail_after: int | None = None):
        self.frames, self.fail_after = 0, fail_after

    def __call__(self, images: torch.Tensor) -> list[PoseFrame]:
        if self.fail_after is not None and self.frames >= self.fail_after:
            raise cn.ControlNeXtError("the detector stopped")
        self.frames += images.shape[0]
        return [PoseFrame(person(float(image.mean()) / 100), WIDTH, HEIGHT) for image in images]


def test_hands_detections_box_the_visible_keypoints_with_all_scores():
    entry = clip_poses.hands_detections(PoseFrame(person(0.0), WIDTH, HEIGHT))
    [[low, high]] = entry["hands_boxes"]  # the unseen right hand has none
    assert np.allclose(low, [0.205, 0.455]) and np.allclose(high, [0.3, 0.55])
    assert len(entry["hands_score"]) == 1 and len(entry["hands_score"][0]) == 21
    mask = vd.hands_mask(entry, 100, 100, margin=0)  # the official mask reads it: the box at 0.8
    assert mask[0, 50, 25] == pytest.approx(0.8) and mask[0, 10, 10] == 0


def test_missing_poses_and_hands_are_made_once_cached_and_read_with_the_clips(tmp_path):
    root = tmp_path / "clips"
    write_frames(root / "a" / "frames", 10, WIDTH, HEIGHT)  # no poses, no hands
    write_frames(root / "b" / "frames", 6, WIDTH, HEIGHT)
    write_frames(root / "b" / "poses", 6, WIDTH, HEIGHT, offset=1)  # its own poses; hands missing
    write_frames(root / "c" / "frames", 6, WIDTH, HEIGHT)
    write_frames(root / "c" / "poses", 6, WIDTH, HEIGHT, offset=1)
    (root / "c" / "hands.json").write_text(json.dumps([{}] * 6))
    with pytest.raises(cn.ControlNeXtError, match="a: no poses/ folder.*choose the DWPose models"):
        vd.read_clip_folders(str(root))
    before = {path: os.path.getmtime(path) for path in root.rglob("*")}
    detector = CountingDetector()
    assert clip_poses.detect_missing(str(root), lambda: detector) == ["a", "b"]
    assert detector.frames == 16
    a, b, c = vd.read_clip_folders(str(root))
    cache = root / vd.POSE_CACHE
    assert a.guide == str(cache / "a" / "poses") and a.detections == str(cache / "a" / "hands.json")
    assert b.guide == str(root / "b" / "poses") and b.detections == str(cache / "b" / "hands.json")
    assert not (cache / "b" / "poses").exists()  # its own poses are kept
    assert c.detections == str(root / "c" / "hands.json") and not (cache / "c").exists()
    given = torch.from_numpy(np.stack([vd.frame_source(a.video).read(3)])).float() / 255  # as the detector got it
    frame_3 = PoseFrame(person(float(given[0].mean()) / 100), WIDTH, HEIGHT)
    expected = draw_pose(frame_3)
    assert np.array_equal(np.asarray(Image.open(cache / "a" / "poses" / "00003.png")), expected)
    detections = vd.read_detections(a.detections)
    assert len(detections) == 10 and detections[3] == clip_poses.hands_detections(frame_3)
    assert {path: os.path.getmtime(path) for path in before} == before  # the user's files untouched
    assert clip_poses.detect_missing(str(root), lambda: detector) == [] and detector.frames == 16  # made once
    sample = vd.sample_clip(vd.frame_source(a.video), vd.frame_source(a.guide), detections, 4, 2, WIDTH, HEIGHT,
                            torch.Generator().manual_seed(0))
    assert sample.weights[1:].max() > 1  # the hands weigh the loss


def test_a_detection_stopped_half_way_leaves_no_cache(tmp_path):
    root = tmp_path / "clips"
    write_frames(root / "a" / "frames", 20, WIDTH, HEIGHT)
    with pytest.raises(cn.ControlNeXtError, match="the detector stopped"):
        clip_poses.detect_missing(str(root), lambda: CountingDetector(fail_after=clip_poses.FRAMES_PER_CALL))
    assert vd.cached_poses(str(root), "a") is None and vd.cached_hands(str(root), "a") is None
    with pytest.raises(cn.ControlNeXtError, match="no poses/ folder"):
        vd.read_clip_folders(str(root))
    assert clip_poses.detect_missing(str(root), CountingDetector) == ["a"]  # the next run starts over
    assert len(vd.read_detections(vd.cached_hands(str(root), "a"))) == 20
