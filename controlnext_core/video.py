"""Long videos the way the official ControlNeXt-SVD-v2 pipeline samples them.

Windows of ``window`` frames overlapping by ``overlap``; in each window the first frame's
control is replaced by the video's first-frame control; a window's results count for all its
frames except that first frame (unless the window starts the video), averaged over overlaps.
"""
from __future__ import annotations

import torch

from .errors import ControlNeXtError


def plan_windows(num_frames: int, window: int, overlap: int) -> list[list[int]]:
    """The official window starts: every ``window - overlap`` frames, the last one clamped."""
    if num_frames < 1:
        raise ControlNeXtError("The video has no frames.")
    if not 0 <= overlap < window:
        raise ControlNeXtError(f"Window overlap {overlap} must be at least 0 and smaller than the window ({window}).")
    if num_frames <= window:
        return [list(range(num_frames))]
    windows = []
    for start in range(0, num_frames - overlap, window - overlap):
        start = min(start, num_frames - window)
        windows.append(list(range(start, start + window)))
    return windows


def control_frames(window_frames: list[int]) -> list[int]:
    """Which control image each frame of a window uses: the video's first for the window's first."""
    return [0] + list(window_frames[1:])


def fusion_weights(window_frames: list[int]) -> torch.Tensor:
    """Per-frame weight of one window's result: 0 for a window's replaced first frame."""
    weights = torch.ones(len(window_frames))
    if window_frames[0] != 0:
        weights[0] = 0.0
    return weights


def linear_guidance(num_frames: int, min_scale: float, max_scale: float) -> torch.Tensor:
    """The official per-frame CFG scale across a window's frames."""
    return torch.linspace(min_scale, max_scale, num_frames)


def resample_frames(images: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Pick ``num_frames`` evenly spaced images (nearest), for a pose video of another length."""
    if images.shape[0] == num_frames:
        return images
    index = (torch.linspace(0, images.shape[0] - 1, num_frames) + 0.5).floor().long()
    return images[index]
