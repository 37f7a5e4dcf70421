"""The official SVD-v2 training data (ControlNeXt-SVD-v2-Training, ``--dataset_type ubc``), read as the
script reads it: a ``--meta_info_path`` JSON listing clips (a video, its pose video, a JSON of the
detections per frame), ``sample_n_frames`` frames every ``interval_frame`` frames, the first of them
replaced by a random reference frame (and its pose), and a hands mask drawn from the detected hand
boxes that weights the loss (1 everywhere, 4.2 on confident hands); each sample cut at a random place
to the training aspect and resized. Besides the official layout, a simple one for ComfyUI users: a
folder per clip (``read_clip_folders``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from .dataset import PICTURE_SUFFIXES, _open_upright, problem_lines
from .errors import ControlNeXtError

HAND_SCORE_THRESHOLD, HAND_WEIGHT = 0.5, 0.8  # a hand whose keypoints average above 0.5 is drawn at 0.8
HAND_MARGIN_PX = 10
MASK_SCALE, MASK_BASE = 4.0, 1.0  # the loss weight: mask x 4 + 1
RANDOM_INTERVAL = (2, 7)  # interval_frame <= 0: drawn per clip in this range
OFFICIAL_GUIDE_SLACK = 24  # the script accepts a pose video up to 24 frames longer or shorter
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".avi", ".mkv", ".gif")
POSE_CACHE = ".controlnext_poses"  # under a folder of clips: the poses and hands made by DWPose (clip_poses)


@dataclass(frozen=True)
class ClipFiles:
    """One clip: an entry of the official meta-info file, or a clip folder of the simple layout."""

    video: str
    """A video file or a folder of frame pictures."""
    guide: str
    """The poses of the same frames (a video or a folder)."""
    detections: str | None
    """The JSON of per-frame detections (``hands_boxes``, ``hands_score``); None: no hands mask."""


def read_meta_info(path: str) -> list[ClipFiles]:
    """The clips of an official meta-info file, every missing key or file listed in one error."""
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except (OSError, ValueError) as error:
        raise ControlNeXtError(f"The meta-info file {path} cannot be read ({type(error).__name__}: {error}): give the "
                               f"JSON list of clips the official training reads (--meta_info_path).") from None
    if not isinstance(entries, list):
        raise ControlNeXtError(f"{path} holds no list of clips: the official meta-info file is a JSON list of "
                               f"{{\"video_path\", \"guide_path\", \"meta_info\"}} objects.")
    folder, clips, problems = os.path.dirname(os.path.abspath(path)), [], []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in ("video_path", "guide_path")):
            problems.append(f"clip {index}: needs 'video_path' and 'guide_path'")
            continue
        paths = {key: os.path.join(folder, entry[key]) for key in ("video_path", "guide_path", "meta_info")
                 if isinstance(entry.get(key), str)}
        problems += [f"clip {index}: its {key} {value} does not exist" for key, value in paths.items()
                     if not os.path.isfile(value)]
        clips.append(ClipFiles(paths["video_path"], paths["guide_path"], paths.get("meta_info")))
    if problems:
        raise ControlNeXtError(f"{path} has {len(problems)} problem(s); mend them and run again:\n"
                               f"{problem_lines(problems)}")
    if not clips:
        raise ControlNeXtError(f"{path} lists no clips.")
    return clips


def frame_indices(length: int, count: int, interval: int, generator: torch.Generator) -> list[int]:
    """``count`` frame numbers ``interval`` apart from a random start, as the script takes them
    (the interval shrinks for a short clip; ``interval`` <= 0 draws one from 2 to 7)."""
    if interval <= 0:
        interval = int(torch.randint(RANDOM_INTERVAL[0], RANDOM_INTERVAL[1] + 1, (1,), generator=generator))
    interval = min(interval, length // count)
    if interval < 1:
        raise ControlNeXtError(f"A clip of {length} frames is shorter than the {count} frames a sample takes: use "
                               f"longer clips or fewer frames.")
    segment = interval * count
    start = int(torch.randint(0, length - segment + 1, (1,), generator=generator))
    return list(range(start, start + segment, interval))


def hands_mask(detections: dict, height: int, width: int, margin: int = HAND_MARGIN_PX) -> torch.Tensor:
    """[1, H, W]: HAND_WEIGHT inside each hand box (normalised corners, ``margin`` pixels around)
    whose keypoint scores average above the threshold, 0 elsewhere."""
    mask = torch.zeros(1, height, width)
    boxes, scores = detections.get("hands_boxes") or [], detections.get("hands_score") or []
    for (corner0, corner1), score in zip(boxes, scores):
        weight = HAND_WEIGHT if sum(score) / max(1, len(score)) > HAND_SCORE_THRESHOLD else 0.0
        x0, y0 = max(int(corner0[0] * width) - margin, 0), max(int(corner0[1] * height) - margin, 0)
        x1, y1 = min(int(corner1[0] * width) + margin, width), min(int(corner1[1] * height) + margin, height)
        mask[..., y0:y1, x0:x1] = weight
    return mask


def loss_weights(masks: torch.Tensor) -> torch.Tensor:
    """[F, 1, H, W] hands masks as the loss weights: x 4 + 1, the reference frame (the first) 1."""
    weights = masks * MASK_SCALE + MASK_BASE
    weights[0] = MASK_BASE
    return weights


class FrameSource(Protocol):
    """A clip's frames, read one at a time as [H, W, 3] uint8 RGB."""

    name: str

    def __len__(self) -> int: ...

    def read(self, index: int) -> np.ndarray: ...


class VideoFrames:
    """A video file's frames, decoded with OpenCV where asked (a clip may be far longer than a sample)."""

    def __init__(self, path: str):
        self.name, self._capture = path, cv2.VideoCapture(path)
        self._count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT)) if self._capture.isOpened() else 0
        if self._count <= 0:
            raise ControlNeXtError(f"{path} cannot be read as a video (OpenCV finds no frames): give an mp4, mov, "
                                   f"webm, avi or mkv file, or a folder of frame pictures.")

    def __len__(self) -> int:
        return self._count

    def read(self, index: int) -> np.ndarray:
        self._capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        found, frame = self._capture.read()
        if not found:
            raise ControlNeXtError(f"Frame {index} of {self.name} cannot be decoded (the file says it has "
                                   f"{self._count} frames): re-encode the video, or give its frames as pictures.")
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class PictureFrames:
    """A folder of frame pictures, in name order."""

    def __init__(self, folder: str):
        self.name = folder
        self._paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))
                       if name.lower().endswith(PICTURE_SUFFIXES)]
        if not self._paths:
            raise ControlNeXtError(f"{folder} holds no frame pictures ({', '.join(PICTURE_SUFFIXES)}).")

    def __len__(self) -> int:
        return len(self._paths)

    def read(self, index: int) -> np.ndarray:
        return np.asarray(_open_upright(self._paths[index]).convert("RGB"))


def frame_source(path: str) -> FrameSource:
    return PictureFrames(path) if os.path.isdir(path) else VideoFrames(path)


@dataclass
class ClipSample:
    """One training sample of a clip, as the official data loader gives it."""

    pixels: torch.Tensor  # [F, 3, H, W] in [-1, 1]; frame 0 is the reference frame
    poses: torch.Tensor  # [F, 3, H, W] in [0, 1]; pose 0 is the reference frame's
    reference: torch.Tensor  # [3, H, W] in [-1, 1]
    weights: torch.Tensor  # [F, 1, H, W]: the loss weights (``loss_weights``)


def sample_clip(video: FrameSource, guide: FrameSource, detections: Sequence[dict] | None, frames: int,
                interval: int, width: int, height: int, generator: torch.Generator, *,
                guide_slack: int = 0, guide_bgr: bool = False) -> ClipSample:
    """``frames`` frames of a clip and their poses, as the script samples them: taken every
    ``interval`` frames from a random start, frame 0 (and its pose) replaced by a frame drawn from
    the whole clip, hands masks from ``detections`` (one dict per frame), cut at a random place to
    ``width`` : ``height`` and resized (bilinear, antialiased). ``guide_slack``: how many frames the
    pose clip may differ by (the official data: 24; only frames both have are drawn); ``guide_bgr``:
    the pose clip stores blue first, as the official pose videos do."""
    length = min(len(video), len(guide))
    if abs(len(video) - len(guide)) > guide_slack:
        raise ControlNeXtError(f"The clip {video.name} has {len(video)} frames but its poses {guide.name} have "
                               f"{len(guide)}: give one pose per frame.")
    if detections is not None and len(detections) < length:
        raise ControlNeXtError(f"The hands detections of {video.name} cover {len(detections)} frames of its "
                               f"{length}: give one entry per frame.")
    ids = frame_indices(length, frames, interval, generator)
    reference_id = int(torch.randint(0, length, (1,), generator=generator))
    pixels = _frames([video.read(reference_id)] + [video.read(index) for index in ids[1:]], video.name)
    poses = _frames([guide.read(reference_id)] + [guide.read(index) for index in ids[1:]], guide.name)
    if poses.shape[-2:] != pixels.shape[-2:]:
        raise ControlNeXtError(f"The poses of {video.name} are {poses.shape[-1]}x{poses.shape[-2]} but its frames "
                               f"{pixels.shape[-1]}x{pixels.shape[-2]}: draw the poses on the frames' canvas.")
    if guide_bgr:
        poses = poses.flip(1)
    masks = torch.stack([hands_mask(detections[index], *pixels.shape[-2:]) if detections is not None
                         else torch.zeros(1, *pixels.shape[-2:]) for index in ids])
    top, left, crop_height, crop_width = _aspect_crop(*pixels.shape[-2:], width, height, generator)
    cut = (slice(None), slice(None), slice(top, top + crop_height), slice(left, left + crop_width))
    pixels, poses, masks = (_resized(tensor[cut], width, height) for tensor in (pixels, poses, masks))
    pixels = pixels * 2 - 1
    return ClipSample(pixels, poses, pixels[0].clone(), loss_weights(masks))


def clip_problems(clips: Sequence[ClipFiles], frames: int, guide_slack: int = 0) -> list[str]:
    """What makes clips unusable before any training: unreadable frames or poses, fewer frames than a
    sample takes, pose counts or sizes that differ from the frames' (each named; the first frames
    only are decoded)."""
    problems = []
    for clip in clips:
        try:
            video, guide = frame_source(clip.video), frame_source(clip.guide)
        except ControlNeXtError as error:
            problems.append(str(error))
            continue
        if min(len(video), len(guide)) < frames:
            problems.append(f"{clip.video}: {min(len(video), len(guide))} frames, fewer than the {frames} a sample takes")
        if abs(len(video) - len(guide)) > guide_slack:
            problems.append(f"{clip.video}: {len(video)} frames but {len(guide)} poses in {clip.guide}")
        first_frame, first_pose = video.read(0).shape, guide.read(0).shape
        if first_frame != first_pose:
            problems.append(f"{clip.video}: frames {first_frame[1]}x{first_frame[0]} but poses "
                            f"{first_pose[1]}x{first_pose[0]} (draw the poses on the frames' canvas)")
    return problems


def _frames(arrays: list[np.ndarray], name: str) -> torch.Tensor:
    if len({array.shape for array in arrays}) != 1:
        raise ControlNeXtError(f"The frames of {name} differ in size: give frames of one size.")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _aspect_crop(frame_height: int, frame_width: int, width: int, height: int,
                 generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the largest window of the training aspect, at a random place
    along the longer side."""
    if frame_height / frame_width > height / width:
        crop_height = int(frame_width * height / width)
        return int(torch.randint(0, frame_height - crop_height + 1, (1,), generator=generator)), 0, crop_height, frame_width
    crop_width = int(frame_height * width / height)
    return 0, int(torch.randint(0, frame_width - crop_width + 1, (1,), generator=generator)), frame_height, crop_width


def _resized(tensor: torch.Tensor, width: int, height: int) -> torch.Tensor:
    return F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def read_clip_folders(root: str) -> list[ClipFiles]:
    """The clips of the simple layout under ``root``, one subfolder each, in name order: its frames as
    ``frames/`` (pictures) or ``video.<ext>``, its poses as ``poses/`` or ``poses.<ext>``, and
    optionally ``hands.json``, the official per-frame detections that weight the loss; poses and
    hands a clip lacks are read from the DWPose cache (``POSE_CACHE``) where they were made. Every
    problem is listed at once."""
    clips, problems = [], []
    for folder in clip_folders(root):
        if folder.frames is None:
            problems.append(f"{folder.name}: no frames/ folder of pictures and no "
                            f"video.<{'|'.join(s[1:] for s in VIDEO_SUFFIXES)}>")
        if folder.poses is None:
            problems.append(f"{folder.name}: no poses/ folder and no poses.<video>: choose the DWPose models to draw "
                            f"them from the frames once, or draw them yourself (DWPose Estimator), one per frame")
        if folder.frames and folder.poses:
            clips.append(ClipFiles(folder.frames, folder.poses, folder.hands))
    if problems:
        raise ControlNeXtError(f"{root} has {len(problems)} problem(s) with its clips; mend them and run again:\n"
                               f"{problem_lines(problems)}")
    if not clips:
        raise ControlNeXtError(f"{root} holds no clip folders: put each clip in a subfolder with frames/ (or "
                               f"video.mp4) and poses/ (or poses.mp4).")
    return clips


@dataclass(frozen=True)
class ClipFolder:
    """One clip folder of the simple layout, its parts found (None: missing); poses and hands its own,
    else those DWPose made for it (POSE_CACHE)."""

    name: str
    frames: str | None
    poses: str | None
    hands: str | None


def clip_folders(root: str) -> list[ClipFolder]:
    """The clip folders under ``root`` (hidden ones, such as the cache, left out), in name order."""
    if not os.path.isdir(root):
        raise ControlNeXtError(f"{root} is not a folder: give a folder with one subfolder per clip.")
    found = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        hands = os.path.join(folder, "hands.json")
        found.append(ClipFolder(name, clip_part(folder, "frames", "video"),
                                clip_part(folder, "poses", "poses") or cached_poses(root, name),
                                hands if os.path.isfile(hands) else cached_hands(root, name)))
    return found


def cache_folder(root: str, clip_name: str) -> str:
    return os.path.join(root, POSE_CACHE, clip_name)


def cached_poses(root: str, clip_name: str) -> str | None:
    """A clip's pose pictures drawn from DWPose detections (clip_poses), where they were made."""
    folder = os.path.join(cache_folder(root, clip_name), "poses")
    return folder if os.path.isdir(folder) else None


def cached_hands(root: str, clip_name: str) -> str | None:
    """A clip's hands detections made from DWPose's hand keypoints (clip_poses), where they were made."""
    path = os.path.join(cache_folder(root, clip_name), "hands.json")
    return path if os.path.isfile(path) else None


def clip_part(folder: str, subfolder: str, stem: str) -> str | None:
    """A clip folder's pictures folder ``subfolder``, else its video ``stem.<ext>``."""
    if os.path.isdir(os.path.join(folder, subfolder)):
        return os.path.join(folder, subfolder)
    for suffix in VIDEO_SUFFIXES:
        if os.path.isfile(os.path.join(folder, stem + suffix)):
            return os.path.join(folder, stem + suffix)
    return None


def read_detections(path: str) -> list[dict]:
    """A clip's per-frame detections (the official meta_info JSON: a list, one dict per frame)."""
    try:
        with open(path, encoding="utf-8") as file:
            detections = json.load(file)
    except (OSError, ValueError) as error:
        raise ControlNeXtError(f"The hands detections {path} cannot be read ({type(error).__name__}: {error}).") from None
    if not isinstance(detections, list) or not all(isinstance(entry, dict) for entry in detections):
        raise ControlNeXtError(f"{path} is not a list of per-frame detections ({{\"hands_boxes\": ..., "
                               f"\"hands_score\": ...}} per frame).")
    return detections
