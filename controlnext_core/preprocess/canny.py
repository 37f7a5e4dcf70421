"""Canny edges matching ``cv2.Canny``, for a whole batch at once on a GPU.

The ControlNeXt canny releases were trained on ``cv2.Canny`` maps of the grey image (aperture 3,
L1 gradient), with thresholds from the image median when none are given (the official SDXL
``canny_extractor``). ``canny_batched`` reproduces that pixel for pixel with tensor operations
(kornia's Sobel, cv2's integer direction test for non-maximum suppression, 8-connected
hysteresis by label equivalence), so a video batch runs in one go on the GPU.
"""
from __future__ import annotations

from typing import Callable

import cv2
import kornia
import numpy as np
import torch
from torch.nn import functional as F

from ..errors import ControlNeXtError
from .images import check_image_batch, chunks, gray_levels

AUTO_SIGMA = 0.33  # official SDXL canny_extractor: thresholds (1 -/+ 0.33) x median
# cv2's direction test in fixed point: tan(22.5 deg) * 2**15 (canny.cpp, TG22 and CANNY_SHIFT).
TAN22_Q15 = 13573
SHIFT = 15
# Frames per step: under 2**24 pixels (float32 labels stay exact; work buffers under about 1 GB).
MAX_PIXELS_PER_STEP = (1 << 24) - 1


def auto_thresholds(gray: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per-frame (low, high) from the median grey level, as the official extractor computes them.

    ``gray`` is [B, 1, H, W] levels 0..255. The median is numpy's (mean of the two middle values
    for an even count), found from a per-frame histogram so it stays batched on the device.
    """
    batch = gray.shape[0]
    count = gray[0].numel()
    offsets = torch.arange(batch, device=gray.device)[:, None] * 256
    histogram = torch.bincount((gray.reshape(batch, -1) + offsets).reshape(-1), minlength=batch * 256)
    cumulative = histogram.reshape(batch, 256).cumsum(dim=1)
    lower_rank = torch.tensor((count - 1) // 2, device=gray.device)
    upper_rank = torch.tensor(count // 2, device=gray.device)
    lower = torch.searchsorted(cumulative, lower_rank.expand(batch, 1).contiguous(), right=True)
    upper = torch.searchsorted(cumulative, upper_rank.expand(batch, 1).contiguous(), right=True)
    medians = ((lower + upper).double() / 2.0).flatten().cpu().tolist()
    lows = [int(max(0, (1.0 - AUTO_SIGMA) * median)) for median in medians]
    highs = [int(min(255, (1.0 + AUTO_SIGMA) * median)) for median in medians]
    return lows, highs


def blur_levels(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of 8-bit levels, rounded back to levels (cv2's kernel size for 8-bit images)."""
    size = int(round(sigma * 3 * 2 + 1)) | 1
    blurred = kornia.filters.gaussian_blur2d(gray.float(), (size, size), (sigma, sigma), border_type="reflect")
    return torch.round(blurred).clamp(0, 255).to(torch.int32)


def gradients(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 Sobel (replicated borders), exact integers as int32: (dx, dy), each [B, 1, H, W]."""
    sobel = kornia.filters.spatial_gradient(gray.float(), mode="sobel", order=1, normalized=False)
    dx, dy = torch.round(sobel).to(torch.int32).unbind(2)
    return dx, dy


def edge_candidates(dx: torch.Tensor, dy: torch.Tensor, low: torch.Tensor, high: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-maximum suppression as cv2 does it: (candidates over ``low``, strong ones over ``high``).

    ``low``/``high`` are integer thresholds [B, 1, 1, 1]; the magnitude is |dx| + |dy| and
    neighbours outside the image count as 0.
    """
    magnitude = dx.abs() + dy.abs()
    padded = F.pad(magnitude, (1, 1, 1, 1))
    height, width = magnitude.shape[-2:]

    def neighbour(row: int, col: int) -> torch.Tensor:
        return padded[..., 1 + row:1 + row + height, 1 + col:1 + col + width]

    abs_x = dx.abs()
    scaled_y = dy.abs() << SHIFT
    tan22_x = abs_x * TAN22_Q15
    horizontal = scaled_y < tan22_x
    vertical = ~horizontal & (scaled_y > tan22_x + (abs_x << (SHIFT + 1)))
    same_sign = (dx ^ dy) >= 0
    along_x = (magnitude > neighbour(0, -1)) & (magnitude >= neighbour(0, 1))
    along_y = (magnitude > neighbour(-1, 0)) & (magnitude >= neighbour(1, 0))
    diagonal = torch.where(same_sign,
                           (magnitude > neighbour(-1, -1)) & (magnitude > neighbour(1, 1)),
                           (magnitude > neighbour(-1, 1)) & (magnitude > neighbour(1, -1)))
    is_max = torch.where(horizontal, along_x, torch.where(vertical, along_y, diagonal))
    candidates = is_max & (magnitude > low)
    return candidates, candidates & (magnitude > high)


def hysteresis_on_device(candidates: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """Keeps the 8-connected candidate components that hold a strong pixel, on the tensors' device.

    Connected components by label equivalence: each candidate starts with its own index as label;
    every round, each pixel's smallest neighbouring label is handed to the root its label points
    to, and labels then follow labels to their end (pointer jumping). A component converges to
    its smallest index in a few rounds, where growing strong pixels one step at a time takes as
    many steps as the longest edge chain (thousands). Labels are float32: exact below 2**24.
    """
    count = candidates.numel()
    if count >= 1 << 24:
        raise ControlNeXtError(f"{count} pixels in one hysteresis step is over the 2**24 that float32 labels count.")
    outside = float(count)
    shape = candidates.shape
    labels = torch.where(candidates.flatten(), torch.arange(count, device=candidates.device, dtype=torch.float32),
                         outside)
    while True:
        neighbour_min = torch.where(candidates, -F.max_pool2d(-labels.view(shape), 3, stride=1, padding=1),
                                    outside).flatten()
        lower = neighbour_min < labels
        if not bool(lower.any()):
            break
        roots = labels.clone()
        roots.scatter_reduce_(0, labels[lower].long(), neighbour_min[lower], reduce="amin")
        labels = torch.minimum(roots, neighbour_min)
        while True:
            jumped = torch.where(labels < outside, labels[labels.clamp(max=count - 1).long()], labels)
            if torch.equal(jumped, labels):
                break
            labels = jumped
    seeded = torch.zeros(count + 1, dtype=torch.bool, device=candidates.device)
    seeded[labels[strong.flatten()].long()] = True
    seeded[count] = False
    return seeded[labels.long()].view(shape)


def _check_arguments(low_threshold: float | None, high_threshold: float | None, blur_sigma: float) -> None:
    if (low_threshold is None) != (high_threshold is None):
        raise ControlNeXtError("Give both canny thresholds, or neither for automatic (median-based) ones.")
    if low_threshold is not None and (low_threshold < 0 or high_threshold < 0):
        raise ControlNeXtError(f"Canny thresholds must be >= 0; got {low_threshold} and {high_threshold}.")
    if blur_sigma < 0:
        raise ControlNeXtError(f"blur_sigma must be >= 0; got {blur_sigma}.")


def canny_batched(images: torch.Tensor, low_threshold: float | None = None, high_threshold: float | None = None,
                  blur_sigma: float = 0.0, device: torch.device | str | None = None,
                  on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``canny`` for the whole batch at once with tensor operations on ``device`` (meant for GPUs)."""
    images = check_image_batch(images)
    _check_arguments(low_threshold, high_threshold, blur_sigma)
    device = torch.device(device) if device is not None else images.device
    batch, height, width, _ = images.shape
    output = torch.empty(batch, height, width, 3, dtype=images.dtype, device=images.device)
    for frames in chunks(batch, height, width, MAX_PIXELS_PER_STEP):
        gray = gray_levels(images[frames].to(device))
        if blur_sigma > 0:
            gray = blur_levels(gray, blur_sigma)
        if low_threshold is None:
            lows, highs = auto_thresholds(gray)
        else:
            low, high = sorted((low_threshold, high_threshold))
            lows, highs = [int(np.floor(low))] * gray.shape[0], [int(np.floor(high))] * gray.shape[0]
        low_levels = torch.tensor(lows, dtype=torch.int32, device=device).view(-1, 1, 1, 1)
        high_levels = torch.tensor(highs, dtype=torch.int32, device=device).view(-1, 1, 1, 1)
        edges = hysteresis_on_device(*edge_candidates(*gradients(gray), low_levels, high_levels))
        output[frames] = edges[:, 0, :, :, None].expand(-1, -1, -1, 3).to(images.device, images.dtype)
        if on_progress is not None:
            on_progress(frames.stop - frames.start)
    return output


def canny_cv2(images: torch.Tensor, low_threshold: float | None = None, high_threshold: float | None = None,
              blur_sigma: float = 0.0, on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``canny`` frame by frame with OpenCV: the reference, and the fastest route on a CPU."""
    images = check_image_batch(images)
    _check_arguments(low_threshold, high_threshold, blur_sigma)
    edges = np.empty(images.shape[:3], dtype=np.uint8)
    for index, frame in enumerate(images):
        levels = np.rint(np.clip(frame.float().cpu().numpy(), 0.0, 1.0) * 255.0).astype(np.uint8)
        gray = cv2.cvtColor(levels, cv2.COLOR_RGB2GRAY)
        if blur_sigma > 0:
            gray = cv2.GaussianBlur(gray, (0, 0), blur_sigma)
        if low_threshold is None:
            median = np.median(gray)
            low, high = int(max(0, (1.0 - AUTO_SIGMA) * median)), int(min(255, (1.0 + AUTO_SIGMA) * median))
        else:
            low, high = low_threshold, high_threshold
        edges[index] = cv2.Canny(gray, low, high)
        if on_progress is not None:
            on_progress(1)
    result = torch.from_numpy(edges > 0)[..., None].expand(-1, -1, -1, 3)
    return result.to(images.device, images.dtype)


def canny(images: torch.Tensor, low_threshold: float | None = None, high_threshold: float | None = None,
          blur_sigma: float = 0.0, device: torch.device | str | None = None,
          on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Canny edge maps for an image batch, as ``cv2.Canny`` draws them.

    images: [B, H, W, C] floats in [0, 1] (C = 3, 1 or 4; see ``check_image_batch``), quantised
    to 8 bits (round(255 x)) and converted to grey as cv2 does.
    low_threshold / high_threshold: on cv2's scale (8-bit grey, L1 Sobel magnitude, swapped if
    reversed); both None computes them per frame from the median, as the official SDXL example.
    blur_sigma: optional Gaussian blur of the grey image first (0 = none, as official).
    device: where to compute; a GPU runs the whole batch at once (``canny_batched``), the CPU
    runs OpenCV per frame (``canny_cv2``), which is faster there. Both give the same edges
    (the blur may differ by one grey level where cv2 rounds its fixed-point kernel).
    Returns [B, H, W, 3] floats, 1 on edges and 0 elsewhere, on ``images``' device.
    ``on_progress`` is called with the number of frames finished after each step.
    """
    device = torch.device(device) if device is not None else images.device
    if device.type == "cpu":
        return canny_cv2(images, low_threshold, high_threshold, blur_sigma, on_progress)
    return canny_batched(images, low_threshold, high_threshold, blur_sigma, device, on_progress)
