"""Poses and hands detections made for clip folders that lack them (issue 21): each frame through
DWPose once, the pose drawn as the official SVD-v2 code draws it and the hands written as the
official per-frame detections (``hands_boxes``, ``hands_score``), kept in a cache folder beside the
clips so later runs read them instead of detecting again. The user's clip folders are never written.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ControlNeXtError
from .preprocess.pose import PoseFrame, draw_pose
from .video_dataset import cache_folder, cached_hands, cached_poses, clip_part, frame_source

HAND_KEYPOINT_VISIBLE = 0.3  # DWPose's own cut for drawing a keypoint; the box spans those above it
FRAMES_PER_CALL = 8  # frames detected together (a clip may hold hundreds)


def hands_detections(frame: PoseFrame) -> dict:
    """One frame's official detections entry: a box around each hand's visible keypoints
    (normalised corners) and the scores of its 21 keypoints, for every person found."""
    boxes, scores = [], []
    for hand in (*frame.left_hand, *frame.right_hand):
        visible = hand[hand[:, 2] > HAND_KEYPOINT_VISIBLE]
        if len(visible) == 0:
            continue
        low, high = visible[:, :2].min(axis=0).clip(0, 1), visible[:, :2].max(axis=0).clip(0, 1)
        boxes.append([low.tolist(), high.tolist()])
        scores.append(hand[:, 2].tolist())
    return {"hands_boxes": boxes, "hands_score": scores}


def write_clip_poses(root: str, clip_name: str, frames_path: str, draw: bool,
                     detect: Callable[[torch.Tensor], Sequence[PoseFrame]],
                     on_frames: Callable[[int], None] | None = None) -> None:
    """Detects every frame of a clip (``detect``: IMAGE [B, H, W, 3] in [0, 1] -> PoseFrames) and
    caches its hands detections, and its drawn poses where ``draw``. Written beside, then moved into
    place: a run stopped half-way leaves no partial cache."""
    frames = frame_source(frames_path)
    target = cache_folder(root, clip_name)
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.join(partial, "poses") if draw else partial)
    detections = []
    for start in range(0, len(frames), FRAMES_PER_CALL):
        indices = range(start, min(start + FRAMES_PER_CALL, len(frames)))
        batch = torch.from_numpy(np.stack([frames.read(index) for index in indices])).float() / 255
        for index, frame in zip(indices, detect(batch), strict=True):
            detections.append(hands_detections(frame))
            if draw:
                Image.fromarray(draw_pose(frame)).save(os.path.join(partial, "poses", f"{index:05d}.png"))
        if on_frames is not None:
            on_frames(len(indices))
    with open(os.path.join(partial, "hands.json"), "w", encoding="utf-8") as file:
        json.dump(detections, file)
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.replace(partial, target)


def clips_to_detect(root: str) -> list[tuple[str, str, bool]]:
    """(clip name, frames path, draw poses) of the clip folders under ``root`` with no poses or no
    hands detections, their own or cached."""
    wanted = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        frames = clip_part(folder, "frames", "video")
        if frames is None:
            continue  # read_clip_folders names it
        no_poses = clip_part(folder, "poses", "poses") is None and cached_poses(root, name) is None
        no_hands = not os.path.isfile(os.path.join(folder, "hands.json")) and cached_hands(root, name) is None
        if no_poses or no_hands:
            wanted.append((name, frames, no_poses))
    return wanted


def detect_missing(root: str, detect: Callable[[torch.Tensor], Sequence[PoseFrame]],
                   on_frames: Callable[[int], None] | None = None) -> list[str]:
    """Makes and caches the poses and hands detections the clips under ``root`` lack; the names of
    the clips done."""
    if not os.path.isdir(root):
        raise ControlNeXtError(f"{root} is not a folder: give a folder with one subfolder per clip.")
    done = []
    for name, frames, draw in clips_to_detect(root):
        write_clip_poses(root, name, frames, draw, detect, on_frames)
        done.append(name)
    return done
