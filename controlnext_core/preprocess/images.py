"""Checks and conversions shared by the preprocessors: ComfyUI-style image batches in, 8-bit grey out.

Images are ``[B, H, W, C]`` floats in [0, 1] (ComfyUI's IMAGE layout). Three channels is the
normal case; one channel is read as grey and four as RGBA whose alpha is ignored.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np
import torch

from ..errors import ControlNeXtError

# cv2.COLOR_RGB2GRAY on 8-bit images is Rec.601 in fixed point, rounded: OpenCV 4 uses 14-bit
# weights, OpenCV 5 15-bit ones. (weights R, G, B), shift.
CV2_GRAY_FIXED_POINT = (((4899, 9617, 1868), 14), ((9798, 19235, 3735), 15))


def check_image_batch(images: torch.Tensor, what: str = "image") -> torch.Tensor:
    """Returns the batch as 3-channel RGB, or raises with what was wrong and what to give instead."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ControlNeXtError(
            f"The {what} must be an image batch [batch, height, width, channels]; got {shape}. "
            f"Connect an IMAGE output (Load Image, VAE Decode, a video loader...).")
    batch, height, width, channels = images.shape
    if batch == 0:
        raise ControlNeXtError(f"The {what} batch is empty (0 images): nothing to process. Check the node that "
                               f"feeds it (a video loader with no frames selected, a filter that removed all).")
    if height == 0 or width == 0:
        raise ControlNeXtError(f"The {what} has no pixels ({height}x{width}).")
    if channels == 1:
        return images.expand(-1, -1, -1, 3)
    if channels == 4:
        return images[..., :3]
    if channels != 3:
        raise ControlNeXtError(f"The {what} has {channels} channels; expected 3 (RGB), 1 (grey) or 4 (RGBA, alpha is "
                               f"ignored).")
    return images


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> integer levels 0..255 (int32), round(255 x) as an 8-bit image file would hold."""
    return torch.round(images.float().clamp(0.0, 1.0) * 255.0).to(torch.int32)


@functools.cache
def cv2_gray_fixed_point() -> tuple[tuple[int, int, int], int]:
    """The fixed-point grey weights of the installed OpenCV, found by converting a few colours with it."""
    colours = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    expected = cv2.cvtColor(colours, cv2.COLOR_RGB2GRAY).astype(np.int64)
    channels = colours.astype(np.int64)
    for weights, shift in CV2_GRAY_FIXED_POINT:
        gray = (channels @ np.array(weights) + (1 << (shift - 1))) >> shift
        if np.array_equal(gray, expected):
            return weights, shift
    return CV2_GRAY_FIXED_POINT[0]  # an OpenCV with other rounding: within one level of it


def gray_levels(images: torch.Tensor) -> torch.Tensor:
    """RGB batch [B, H, W, 3] -> 8-bit grey levels [B, 1, H, W] (int32), exactly as cv2.COLOR_RGB2GRAY."""
    red, green, blue = to_uint8_levels(images).unbind(-1)
    (weight_r, weight_g, weight_b), shift = cv2_gray_fixed_point()
    gray = (red * weight_r + green * weight_g + blue * weight_b + (1 << (shift - 1))) >> shift
    return gray[:, None]


def chunks(batch: int, height: int, width: int, max_pixels: int) -> list[slice]:
    """Frame ranges that keep each step's working set under ``max_pixels`` (at least one frame each)."""
    per_chunk = max(1, max_pixels // max(1, height * width))
    return [slice(start, min(batch, start + per_chunk)) for start in range(0, batch, per_chunk)]
