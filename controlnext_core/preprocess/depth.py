"""Monocular depth maps: a Depth Anything (V1/V2) model in transformers format, from a local folder.

The model gives relative inverse depth (large = near). The control image is made from it in
one of two styles:
- ``viridis``: what the ControlNeXt vidit-depth releases (SD1.5, SDXL) were trained on: the VIDIT
  depth maps are depth coloured with matplotlib's viridis, near = dark purple, far = yellow
  (see the releases' ``examples/vidit_depth/condition_0.png``). VIDIT's maps are metric; here
  depth is relative, taken as 1 - normalised inverse depth.
- ``grayscale``: normalised inverse depth, near = white (the MiDaS/ControlNet convention).
Normalised over each frame, or over the whole batch so a video's brightness does not flicker.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Callable

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from ..errors import ControlNeXtError
from .images import check_image_batch

STYLES = ("viridis", "grayscale")
NORMALISATIONS = ("batch", "per_frame")
# Depth Anything's image processor defaults (preprocessor_config.json overrides them).
DEFAULT_SIZE = 518
DEFAULT_MULTIPLE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FRAMES_PER_STEP = 8


@functools.cache
def viridis_table() -> torch.Tensor:
    """OpenCV's viridis colour map (matplotlib's), as 256 RGB rows in [0, 1]."""
    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_VIRIDIS)[0]
    return torch.from_numpy(bgr[:, ::-1].copy()).float() / 255.0


def colourise_viridis(values: torch.Tensor) -> torch.Tensor:
    """[...] in [0, 1] -> [..., 3] RGB, interpolating linearly between the 256 viridis entries."""
    table = viridis_table().to(values.device)
    position = values.clamp(0, 1) * 255.0
    lower = position.floor().long().clamp(max=254)
    fraction = (position - lower)[..., None]
    return table[lower] * (1 - fraction) + table[lower + 1] * fraction


def depth_control(disparity: torch.Tensor, style: str = "viridis", normalise: str = "batch") -> torch.Tensor:
    """Relative inverse depth [B, H, W] -> control IMAGE [B, H, W, 3] in [0, 1] (see module doc)."""
    if style not in STYLES:
        raise ControlNeXtError(f"Unknown depth style '{style}'; use one of {', '.join(STYLES)}.")
    if normalise not in NORMALISATIONS:
        raise ControlNeXtError(f"Unknown normalisation '{normalise}'; use one of {', '.join(NORMALISATIONS)}.")
    disparity = disparity.float()
    dims = (1, 2) if normalise == "per_frame" else (0, 1, 2)
    low = disparity.amin(dim=dims, keepdim=True)
    high = disparity.amax(dim=dims, keepdim=True)
    nearness = (disparity - low) / (high - low).clamp_min(1e-8)
    if style == "grayscale":
        return nearness[..., None].expand(-1, -1, -1, 3).contiguous()
    return colourise_viridis(1.0 - nearness)


def model_input_size(height: int, width: int, size: int, multiple: int) -> tuple[int, int]:
    """Depth Anything's resize: keep the aspect ratio, both sides at least ``size``, multiples of ``multiple``."""
    scale = max(size / height, size / width)

    def constrain(value: float) -> int:
        rounded = int(round(value / multiple) * multiple)
        return rounded if rounded >= size else int(math.ceil(value / multiple) * multiple)

    return constrain(height * scale), constrain(width * scale)


class DepthEstimator:
    """A transformers depth model plus its input rules; ``estimate`` works on ComfyUI IMAGE batches."""

    def __init__(self, model: torch.nn.Module, size: int = DEFAULT_SIZE, multiple: int = DEFAULT_MULTIPLE,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.model = model
        self.size = size
        self.multiple = multiple
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, folder: str, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "DepthEstimator":
        """Loads a transformers-format folder (config.json + weights; preprocessor_config.json optional)."""
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ControlNeXtError(f"'{folder}' has no config.json: it is not a transformers depth model folder.")
        try:
            from transformers import AutoModelForDepthEstimation
        except ImportError:
            raise ControlNeXtError("The depth preprocessor needs the 'transformers' package (ComfyUI installs it): "
                                   "pip install transformers into ComfyUI's Python.") from None
        try:
            model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ControlNeXtError(f"Could not load the depth model in '{folder}' ({str(error).splitlines()[0]}). "
                                   f"The folder needs the model's config.json and model.safetensors from the same "
                                   f"release.") from None
        settings = {}
        processor_file = os.path.join(folder, "preprocessor_config.json")
        if os.path.isfile(processor_file):
            with open(processor_file) as file:
                settings = json.load(file)
        size = settings.get("size", {})
        size = min(size.get("height", DEFAULT_SIZE), size.get("width", DEFAULT_SIZE)) if isinstance(size, dict) else size
        return cls(model.to(device, dtype).eval(), int(size), int(settings.get("ensure_multiple_of", DEFAULT_MULTIPLE)),
                   tuple(settings.get("image_mean", IMAGENET_MEAN)), tuple(settings.get("image_std", IMAGENET_STD)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def estimate(self, images: torch.Tensor, on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """IMAGE [B, H, W, C] -> relative inverse depth [B, H, W] (float32, on the images' device)."""
        images = check_image_batch(images)
        batch, height, width, _ = images.shape
        input_height, input_width = model_input_size(height, width, self.size, self.multiple)
        parameter = next(self.model.parameters())
        output = torch.empty(batch, height, width, dtype=torch.float32, device=images.device)
        for start in range(0, batch, FRAMES_PER_STEP):
            frames = images[start:start + FRAMES_PER_STEP].to(parameter.device, torch.float32).movedim(-1, 1)
            downscale = input_height < height or input_width < width
            pixels = F.interpolate(frames, size=(input_height, input_width), mode="bicubic", align_corners=False,
                                   antialias=downscale)
            pixels = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
            with torch.inference_mode():
                predicted = self.model(pixel_values=pixels.to(parameter.dtype)).predicted_depth
            predicted = F.interpolate(predicted[:, None].float(), size=(height, width), mode="bicubic",
                                      align_corners=False)[:, 0]
            output[start:start + len(frames)] = predicted.to(images.device)
            if on_progress is not None:
                on_progress(len(frames))
        return output
