"""Align a driving pose video to the reference image's pose, as the official SVD-v2
preprocessing does (``utils/pre_process.py`` -> ``dwpose/preprocess.py get_video_pose``).

One linear map for the whole video: the vertical scale and offset are a least-squares fit of the
video's body keypoints onto the reference's (over every frame with exactly one person), the
horizontal scale follows from the vertical one and the two aspect ratios, and the horizontal
offset is the mean remaining difference. Every point of every frame (body, hands, face) is then
mapped and the result refers to the reference image's size.

Deviation from the official code: points the detector did not find (score <= 0.3) are left out
of the fit; the official fit includes their -1 placeholders, which drags it whenever a frame
misses a joint.
"""
from __future__ import annotations

import numpy as np

from ..errors import ControlNeXtError
from .pose import BODY_VISIBLE, PoseFrame

# The official ``ref_keypoint_id``: nose, neck, shoulders, hips, knees, ankles, eyes, ears.
ALIGNMENT_JOINTS = (0, 1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)


def fit_alignment(reference: PoseFrame, video: list[PoseFrame]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), each (x, y), mapping the video's normalised points onto the reference's."""
    if reference.people == 0:
        raise ControlNeXtError("No person was found in the reference image's pose: the video poses cannot be "
                               "aligned to it. Use a reference image with one clearly visible person.")
    joints = [j for j in ALIGNMENT_JOINTS if reference.keypoints[0, j, 2] > BODY_VISIBLE]
    if len(joints) < 2:
        raise ControlNeXtError("The reference pose shows fewer than two of the body joints used for alignment "
                               "(head, shoulders, hips, legs).")
    target = reference.keypoints[0, joints, :2]
    single = [frame.keypoints[0, joints] for frame in video if frame.people == 1]
    if not single:
        raise ControlNeXtError("No frame of the pose video shows exactly one person: nothing to align "
                               "(the official alignment uses single-person frames).")
    detected = np.stack(single)  # [frames, joints, 3]
    found = detected[..., 2] > BODY_VISIBLE
    target_all = np.broadcast_to(target, detected[..., :2].shape)
    if found.sum() < 2 or np.ptp(detected[..., 1][found]) == 0:
        raise ControlNeXtError("The pose video has too few detected body joints to fit an alignment.")
    scale_y, offset_y = np.polyfit(detected[..., 1][found], target_all[..., 1][found], 1)
    # The official x scale: the y scale corrected by both frames' aspect ratios.
    video_aspect = video[0].height / video[0].width
    scale_x = scale_y / (video_aspect / reference.height * reference.width)
    offset_x = float(np.mean(target_all[..., 0][found] - detected[..., 0][found] * scale_x))
    return np.array([scale_x, scale_y]), np.array([offset_x, offset_y])


def align_poses(reference: PoseFrame, video: list[PoseFrame]) -> list[PoseFrame]:
    """The video's poses moved onto the reference pose, on the reference image's canvas."""
    scale, offset = fit_alignment(reference, video)
    aligned = []
    for frame in video:
        keypoints = frame.keypoints.copy()
        keypoints[..., :2] = keypoints[..., :2] * scale + offset
        keypoints[..., 2] = np.where(frame.keypoints[..., 2] > 0, keypoints[..., 2], 0.0)
        aligned.append(PoseFrame(keypoints, reference.width, reference.height))
    return aligned
