"""Test-only helper nodes for the server tests: tiny random-weight models and conditioning,
so a real ComfyUI can run ControlNeXt graphs without multi-GB checkpoints. Installed only into
the temporary base directory a server test starts ComfyUI with; never part of the pack.
"""
import os
import sys

import torch

# the checkout's root, for controlnext_testbed; appended, so it never shadows ComfyUI's own modules
sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
from controlnext_testbed.tiny_unet import conditioning, tiny_model  # noqa: E402

from .tiny_checkpoint import TinyCheckpoint, TinyImageOnlyCheckpoint  # noqa: E402


class TinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd15", "sdxl"],)}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family):
        return tiny_model(family), conditioning(family, 1), conditioning(family, 2)


class LatentAsImage:
    """Shows a latent's first three channels as an image, so SaveImage has something to write."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "convert"
    CATEGORY = "testing"

    def convert(self, samples):
        latent = samples["samples"][:, :3].float()
        low = latent.amin(dim=(1, 2, 3), keepdim=True)
        high = latent.amax(dim=(1, 2, 3), keepdim=True)
        return (((latent - low) / (high - low + 1e-6)).movedim(1, -1).contiguous(),)


NODE_CLASS_MAPPINGS = {"ControlNeXtTestTinyModel": TinyModel, "ControlNeXtTestLatentAsImage": LatentAsImage,
                       "ControlNeXtTestTinyCheckpoint": TinyCheckpoint,
                       "ControlNeXtTestTinyImageOnlyCheckpoint": TinyImageOnlyCheckpoint}
