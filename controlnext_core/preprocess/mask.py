"""Mask control images: the region white on black, as the ControlNeXt mask releases were trained on.

Masks are ``[B, H, W]`` floats in [0, 1] (ComfyUI's MASK). Growing and shrinking use a round
(Euclidean disc) structuring element and work on soft masks too (grey-level dilation/erosion);
all of it runs batched on the masks' device.
"""
from __future__ import annotations

import math

import kornia
import torch
from torch.nn import functional as F

from ..errors import ControlNeXtError
from .images import check_image_batch

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # Rec.601, as cv2's grey


def mask_from_image(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> MASK [B, H, W]: the image's luminance (white = inside)."""
    rgb = check_image_batch(images, "mask image")
    weights = torch.tensor(LUMA_WEIGHTS, dtype=rgb.dtype, device=rgb.device)
    return (rgb * weights).sum(dim=-1).clamp(0.0, 1.0)


def check_mask_batch(masks: torch.Tensor) -> torch.Tensor:
    """A MASK as [B, H, W]; a single [H, W] mask becomes a batch of one."""
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ControlNeXtError(f"A mask must be [batch, height, width]; got shape {tuple(masks.shape)}.")
    if masks.shape[0] == 0:
        raise ControlNeXtError("The mask batch is empty (0 masks): nothing to process.")
    return masks


def resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H, W] -> [B, height, width] by bilinear resampling (how a mask of another size is matched)."""
    if masks.shape[-2:] == (height, width):
        return masks
    return F.interpolate(masks[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def dilate_disc(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Grey-level dilation of [B, H, W] by a disc of ``radius`` pixels.

    A disc is a stack of horizontal segments: for each row offset dy the segment half-width is
    floor(sqrt(r^2 - dy^2)). So the dilation is a max over 2r+1 shifted 1-D max-pools, exact
    and cheap at any radius.
    """
    if radius <= 0:
        return masks
    padded = F.pad(masks[:, None], (0, 0, radius, radius), value=-math.inf)
    height = masks.shape[-2]
    result = torch.full_like(masks[:, None], -math.inf)
    for offset in range(-radius, radius + 1):
        half_width = math.isqrt(radius * radius - offset * offset)
        rows = padded[..., radius + offset:radius + offset + height, :]
        result = torch.maximum(result, F.max_pool2d(rows, (1, 2 * half_width + 1), stride=1, padding=(0, half_width)))
    return result[:, 0]


def grow_mask(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grows (pixels > 0) or shrinks (pixels < 0) the white region by a round structuring element."""
    if pixels >= 0:
        return dilate_disc(masks, pixels)
    return 1.0 - dilate_disc(1.0 - masks, -pixels)


def feather_mask(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Softens edges over about ``pixels`` on each side (Gaussian, sigma = pixels / 2, borders reflected)."""
    if pixels <= 0:
        return masks
    size = 2 * pixels + 1
    sigma = pixels / 2.0
    border = "reflect" if min(masks.shape[-2:]) > pixels else "replicate"
    return kornia.filters.gaussian_blur2d(masks[:, None], (size, size), (sigma, sigma), border_type=border)[:, 0]


def mask_control(masks: torch.Tensor, grow: int = 0, feather: int = 0, invert: bool = False,
                 threshold: float = 0.0) -> torch.Tensor:
    """MASK [B, H, W] -> control IMAGE [B, H, W, 3]: the region white on black.

    Order: binarise at ``threshold`` (0 keeps soft values), invert, grow/shrink by ``grow``
    pixels, then feather. Values outside [0, 1] are clipped first.
    """
    masks = check_mask_batch(masks).float().clamp(0.0, 1.0)
    if not 0.0 <= threshold < 1.0:
        raise ControlNeXtError(f"threshold must be in [0, 1); got {threshold}.")
    if threshold > 0:
        masks = (masks > threshold).float()
    if invert:
        masks = 1.0 - masks
    masks = feather_mask(grow_mask(masks, grow), feather)
    return masks.clamp(0.0, 1.0)[..., None].expand(-1, -1, -1, 3).contiguous()
