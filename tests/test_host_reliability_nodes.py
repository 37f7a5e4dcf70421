"""Cheap UNets for the reliability battery, and a test-only ComfyUI node that serves them.

Not a test module (pytest finds nothing to run here): the in-process battery imports it, and the
server battery links it into its temporary custom_nodes/ as a single-file custom node.

tiny_unet's models keep the real channel widths down to 1280 (238 M weights), which the SD1.5
releases' "mid" layout needs; a forward pass reads all of them, which makes hundreds of sampler
calls slow on a busy CPU. The "base" layout injects where the UNet has 320 channels, so these
UNets stop there: two 320-channel levels, one res block each (about 25 M weights), with the
real SD1.5 / SDXL model classes, so ComfyUI treats them exactly as those families.
"""
from __future__ import annotations

import functools
import os
import sys

try:
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
except ImportError:  # collected by pytest without a ComfyUI host
    import pytest

    pytest.skip("no ComfyUI host: set COMFYUI_PATH to a ComfyUI checkout to run the host tests",
                allow_module_level=True)

import torch

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
from controlnext_testbed.tiny_unet import UNET_CONFIGS, conditioning  # noqa: E402

CHEAP_CONFIGS = {
    "sd15": dict(UNET_CONFIGS["sd15"], num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 0],
                 transformer_depth_output=[1, 1, 0, 0]),
    "sdxl": dict(UNET_CONFIGS["sdxl"], num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[0, 1],
                 transformer_depth_output=[0, 0, 1, 1]),
}
CONFIG_CLASSES = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}


def randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / max(1.0, param[0].numel()) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


@functools.lru_cache(maxsize=None)
def cheap_model(family: str) -> comfy.model_patcher.ModelPatcher:
    """Cached: nothing may change it (the tests check exactly that)."""
    model_config = CONFIG_CLASSES[family](dict(CHEAP_CONFIGS[family]))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    randomise(base.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(base, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


class CheapModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (sorted(CHEAP_CONFIGS),)}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family):
        return cheap_model(family), conditioning(family, 1), conditioning(family, 2)


class Nonce:
    """Passes a latent through unchanged; a new ``nonce`` makes ComfyUI run everything after it
    again instead of answering from its cache (to run an identical graph twice)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "nonce": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, samples, nonce):
        return (samples,)


NODE_CLASS_MAPPINGS = {"ControlNeXtReliabilityCheapModel": CheapModel, "ControlNeXtReliabilityNonce": Nonce}
