"""A stand-in for Load Checkpoint in the workflow tests: the same MODEL, CLIP and VAE types,
built with ComfyUI's own classes at a small size, so the real workflow files run on a CPU.

ComfyUI's checkpoint detection only accepts full-size SD1.5 / SDXL files (GBs). Everything
else in a workflow runs unchanged: ComfyUI's real tokenizer and CLIP text model classes (three
thin layers), a TAESD-shaped VAE, and tiny_unet's shallow real-layout UNets with the context
width those text models give.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile

import torch

import comfy.clip_vision
import comfy.sd
import comfy.taesd.taesd

import comfy.model_management
import comfy.model_patcher

from controlnext_testbed.checkpoint_files import randomise  # noqa: F401  (tests import it from here too)
from controlnext_testbed.tiny_unet import MODEL_CONFIG_CLASSES, UNET_CONFIGS

# The official base checkpoint names the workflows use, and the family each stands for.
OFFICIAL_CHECKPOINTS = {"v1-5-pruned-emaonly.safetensors": "sd15", "sd_xl_base_1.0.safetensors": "sdxl"}
OFFICIAL_VIDEO_CHECKPOINTS = {"svd_xt_1_1.safetensors": "svd"}
# Text encoders: three layers (SDXL reads the second-to-last), a thin MLP. SD1.5's CLIP-L gives
# the UNet's context alone; SDXL concatenates CLIP-L and CLIP-G, and CLIP-G's width is also its
# pooled output, which SDXL's UNet needs 1280 wide: so its context is 32 + 1280.
_THIN_TEXT_MODEL = dict(intermediate_size=64, num_attention_heads=2, num_hidden_layers=3)
TEXT_MODEL_CONFIGS = {
    "sd15": {"clip_l_model_config": dict(_THIN_TEXT_MODEL, hidden_size=64)},
    "sdxl": {"clip_l_model_config": dict(_THIN_TEXT_MODEL, hidden_size=32),
             "clip_g_model_config": dict(_THIN_TEXT_MODEL, hidden_size=1280)},
}
CONTEXT_DIMS = {"sd15": 64, "sdxl": 32 + 1280, "svd": 64}
# SVD's context is the CLIP vision image embedding: a two-layer ViT projecting to that width.
TINY_CLIP_VISION = dict(hidden_act="gelu", hidden_size=32, image_size=224, intermediate_size=64,
                        layer_norm_eps=1e-5, model_type="clip_vision_model", num_attention_heads=2,
                        num_channels=3, num_hidden_layers=2, patch_size=14, projection_dim=CONTEXT_DIMS["svd"])


@functools.lru_cache(maxsize=None)
def tiny_unet(family: str) -> comfy.model_patcher.ModelPatcher:
    model_config = MODEL_CONFIG_CLASSES[family](dict(UNET_CONFIGS[family], context_dim=CONTEXT_DIMS[family]))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    randomise(base.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(base, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


@functools.lru_cache(maxsize=None)
def tiny_clip(family: str) -> comfy.sd.CLIP:
    target = MODEL_CONFIG_CLASSES[family]({}).clip_target()
    clip = comfy.sd.CLIP(target, model_options={**TEXT_MODEL_CONFIGS[family], "dtype": torch.float32})
    randomise(clip.cond_stage_model, seed=1)
    return clip


@functools.lru_cache(maxsize=None)
def tiny_vae() -> comfy.sd.VAE:
    taesd = comfy.taesd.taesd.TAESD()
    randomise(taesd, seed=2)
    return comfy.sd.VAE(sd=taesd.state_dict())


@functools.lru_cache(maxsize=None)
def tiny_clip_vision() -> comfy.clip_vision.ClipVisionModel:
    with tempfile.TemporaryDirectory() as folder:  # ComfyUI reads the config from a file
        path = os.path.join(folder, "clip_vision_config.json")
        with open(path, "w") as file:
            json.dump(TINY_CLIP_VISION, file)
        clip_vision = comfy.clip_vision.ClipVisionModel(path)
    randomise(clip_vision.model, seed=3)
    return clip_vision


class TinyCheckpoint:
    """Takes the workflow's checkpoint name, so the substitution keeps it; loads nothing from disk."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (sorted(OFFICIAL_CHECKPOINTS),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name):
        family = OFFICIAL_CHECKPOINTS[ckpt_name]
        return tiny_unet(family), tiny_clip(family), tiny_vae()


class TinyImageOnlyCheckpoint:
    """Stands in for Image Only Checkpoint Loader (img2vid model): SVD's MODEL, CLIP_VISION, VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (sorted(OFFICIAL_VIDEO_CHECKPOINTS),)}}

    RETURN_TYPES = ("MODEL", "CLIP_VISION", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name):
        return tiny_unet(OFFICIAL_VIDEO_CHECKPOINTS[ckpt_name]), tiny_clip_vision(), tiny_vae()
