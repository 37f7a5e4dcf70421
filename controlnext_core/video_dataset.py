"""The official SVD-v2 training data (ControlNeXt-SVD-v2-Training, ``--dataset_type ubc``), read as the
script reads it: a ``--meta_info_path`` JSON listing clips (a video, its pose video, a JSON of the
detections per frame), ``sample_n_frames`` frames every ``interval_frame`` frames, the first of them
replaced by a random reference frame (and its pose), and a hands mask drawn from the detected hand
boxes that weights the loss (1 everywhere, 4.2 on confident hands).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .errors import ControlNeXtError

HAND_SCORE_THRESHOLD, HAND_WEIGHT = 0.5, 0.8  # a hand whose keypoints average above 0.5 is drawn at 0.8
HAND_MARGIN_PX = 10
MASK_SCALE, MASK_BASE = 4.0, 1.0  # the loss weight: mask x 4 + 1
RANDOM_INTERVAL = (2, 7)  # interval_frame <= 0: drawn per clip in this range


@dataclass(frozen=True)
class MetaInfoClip:
    """One entry of the official meta-info file."""

    video: str
    guide: str
    """The pose video of the same frames."""
    detections: str | None
    """The JSON of per-frame detections (``hands_boxes``, ``hands_score``); None: no hands mask."""


def read_meta_info(path: str) -> list[MetaInfoClip]:
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
        clips.append(MetaInfoClip(paths["video_path"], paths["guide_path"], paths.get("meta_info")))
    if problems:
        shown = "\n".join(f"- {problem}" for problem in problems[:20])
        raise ControlNeXtError(f"{path} has {len(problems)} problem(s); mend them and run again:\n{shown}")
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
