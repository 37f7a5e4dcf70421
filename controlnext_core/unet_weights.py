"""UNet weights shipped with some releases, as reversible weight patches (README, "Models").

SDXL releases ship deltas (``unet_weight_increasements``: added to the base weights, so they
work on any SDXL fine-tune); SD1.5 releases ship a subset of full weights and SVD-v2 a whole
UNet, which replace the base's. A patch is ("add", diff): ``W' = W + strength * diff``, or
("set", value) for a replacement at full strength, which needs no copy of the base weight.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .errors import ControlNeXtError

MODES = ("auto", "add", "replace")
# What each family's official release means by its UNet file.
OFFICIAL_MODE = {"sdxl": "add", "sd15": "replace", "svd": "replace"}


def unet_weight_patches(
    file_weights: Mapping[str, torch.Tensor],
    key_map: Mapping[str, str],
    model_weights: Mapping[str, torch.Tensor],
    mode: str,
    strength: float = 1.0,
) -> dict[str, tuple[str, torch.Tensor]]:
    """Map every file key onto a model weight: ``{model key: ("add", diff) or ("set", value)}``.

    ``key_map`` maps file names (diffusers or the host's own) to model keys; ``mode`` is "add"
    (the file holds deltas) or "replace" (the file holds full weights); an "add" patch is meant
    to be applied with ``strength``. A key that maps to nothing, or a shape that differs, is an
    error naming it: nothing is dropped silently.
    """
    if mode not in ("add", "replace"):
        raise ControlNeXtError(f"Unknown UNet weight mode {mode!r}: use 'add' (deltas) or 'replace' (full weights).")
    if not file_weights:
        raise ControlNeXtError("The UNet weights file is empty: it holds no tensors.")
    if not all(isinstance(v, torch.Tensor) for v in file_weights.values()):
        raise ControlNeXtError("The UNet weights file holds entries that are not tensors: it is not a model file.")
    unmapped = [k for k in file_weights if key_map.get(k) not in model_weights]
    if unmapped:
        raise ControlNeXtError(
            f"{len(unmapped)} of {len(file_weights)} weights in the UNet file match nothing in this model "
            f"(first: {', '.join(unmapped[:3])}). The file is for another model family or architecture, "
            f"or it is not a ControlNeXt UNet file."
        )
    patches = {}
    for name, value in file_weights.items():
        key = key_map[name]
        base = model_weights[key]
        if tuple(value.shape) != tuple(base.shape):
            raise ControlNeXtError(
                f"UNet weight '{name}' has shape {list(value.shape)} but the model's '{key}' is {list(base.shape)}: "
                f"the file is for another architecture."
            )
        if not value.is_floating_point() or not torch.isfinite(value.float()).all():  # no float8 isfinite kernel
            raise ControlNeXtError(f"UNet weight '{name}' holds NaN, infinite or non-float values: the file is corrupt.")
        if mode == "add":
            patches[key] = ("add", value)
        elif strength == 1.0:
            patches[key] = ("set", value)
        else:
            patches[key] = ("add", value.float() - base.detach().to(device=value.device, dtype=torch.float32))
    return patches
