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

from .preprocess.pose import PoseFrame, draw_pose
from .video_dataset import cache_folder, clip_folders, frame_source

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


def detect_missing(root: str, load_detector: Callable[[], Callable[[torch.Tensor], Sequence[PoseFrame]]],
                   on_frames: Callable[[int], None] | None = None) -> list[str]:
    """Makes and caches the poses and hands detections the clips under ``root`` lack (clips without
    frames are left to read_clip_folders to name); the names of the clips done. ``load_detector`` is
    called only where there is something to detect."""
    wanted = [folder for folder in clip_folders(root)
              if folder.frames is not None and (folder.poses is None or folder.hands is None)]
    if not wanted:
        return []
    detect = load_detector()
    for folder in wanted:
        write_clip_poses(root, folder.name, folder.frames, folder.poses is None, detect, on_frames)
    return [folder.name for folder in wanted]
