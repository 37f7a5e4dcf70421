"""Core tests: aligning a pose video to the reference pose (official pre_process behaviour)."""
from __future__ import annotations

import numpy as np
import pytest

from controlnext_core.errors import ControlNeXtError
from controlnext_core.preprocess.align import ALIGNMENT_JOINTS, align_poses, fit_alignment
from controlnext_core.preprocess.pose import KEYPOINT_COUNT, PoseFrame


def person(body: np.ndarray, score: float = 0.9) -> np.ndarray:
    keypoints = np.zeros((KEYPOINT_COUNT, 3))
    keypoints[:18, :2] = body
    keypoints[:18, 2] = score
    keypoints[24:92, :2] = body[0] + 0.01  # a face near the nose
    keypoints[24:92, 2] = 0.8
    return keypoints


def official_fit(reference_body, video_bodies, video_size, reference_size):
    """The official get_video_pose arithmetic, transcribed (all joints detected)."""
    ids = list(ALIGNMENT_JOINTS)
    ref = reference_body[ids]
    detected = np.stack(video_bodies)[:, ids]
    ay, by = np.polyfit(detected[:, :, 1].flatten(), np.tile(ref[:, 1], len(detected)), 1)
    (fw, fh), (width, height) = video_size, reference_size
    ax = ay / (fh / fw / height * width)
    bx = np.mean(np.tile(ref[:, 0], len(detected)) - detected[:, :, 0].flatten() * ax)
    return np.array([ax, ay]), np.array([bx, by])


def test_fit_matches_the_official_arithmetic():
    rng = np.random.default_rng(0)
    reference_body = rng.uniform(0.2, 0.8, (18, 2))
    video_bodies = [reference_body * [0.5, 0.6] + [0.1, 0.05] + rng.normal(0, 0.01, (18, 2)) for _ in range(5)]
    reference = PoseFrame(person(reference_body)[None], 576, 1024)
    video = [PoseFrame(person(body)[None], 1280, 720) for body in video_bodies]
    scale, offset = fit_alignment(reference, video)
    expected_scale, expected_offset = official_fit(reference_body, video_bodies, (1280, 720), (576, 1024))
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-9)
    np.testing.assert_allclose(offset, expected_offset, rtol=1e-9)
    aligned = align_poses(reference, video)
    assert (aligned[0].width, aligned[0].height) == (576, 1024)
    np.testing.assert_allclose(aligned[0].keypoints[0, :18, :2], video_bodies[0] * scale + offset)
    np.testing.assert_allclose(aligned[0].keypoints[0, 24:92, :2], np.broadcast_to((video_bodies[0][0] + 0.01) * scale + offset, (68, 2)))


def test_a_video_that_is_the_reference_maps_onto_itself():
    body = np.random.default_rng(1).uniform(0.2, 0.8, (18, 2))
    reference = PoseFrame(person(body)[None], 512, 512)
    aligned = align_poses(reference, [PoseFrame(person(body)[None], 512, 512)] * 3)
    np.testing.assert_allclose(aligned[2].keypoints, reference.keypoints, atol=1e-9)


def test_undetected_joints_stay_out_of_the_fit():
    body = np.random.default_rng(2).uniform(0.2, 0.8, (18, 2))
    reference = PoseFrame(person(body)[None], 512, 512)
    missing = person(body)
    missing[10] = [0, 0, 0]  # a knee the detector lost
    scale, offset = fit_alignment(reference, [PoseFrame(missing[None], 512, 512)])
    np.testing.assert_allclose(scale, [1, 1], atol=1e-9)
    np.testing.assert_allclose(offset, [0, 0], atol=1e-9)


def test_clear_errors():
    body = np.random.default_rng(3).uniform(0.2, 0.8, (18, 2))
    empty = PoseFrame(np.zeros((0, KEYPOINT_COUNT, 3)), 512, 512)
    one = PoseFrame(person(body)[None], 512, 512)
    with pytest.raises(ControlNeXtError, match="No person was found in the reference"):
        fit_alignment(empty, [one])
    with pytest.raises(ControlNeXtError, match="exactly one person"):
        fit_alignment(one, [empty, PoseFrame(np.stack([person(body), person(body)]), 512, 512)])
