"""Random-weight SD1.5 / SDXL / SVD checkpoint files as ComfyUI saves them (comfy.sd.save_checkpoint),
so ComfyUI's own loader detects and loads them: for the headless training command's tests ("tiny") and
its throughput benchmark ("real": the released models' sizes).

ComfyUI detects SD1.5 by the UNet's context width (768) and base channels (320) and builds the text
encoders at their real size whatever a file holds, so even the tiny file carries a real-size CLIP-L
(123 M weights, 0.25 GB in fp16); its UNet is tiny_unet's shallow SD1.5 layout at width 768 and its
VAE a TAESD. Imports ComfyUI: only import it where a host is on sys.path.
"""
from __future__ import annotations

import os

import torch

import comfy.clip_vision
import comfy.ldm.models.autoencoder
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.taesd.taesd
import comfy.utils

from .tiny_unet import MODEL_CONFIG_CLASSES, REAL_UNET_CONFIGS, UNET_CONFIGS

SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
TINY_SD15_UNET = dict(UNET_CONFIGS["sd15"], context_dim=768, channel_mult=[1, 1])
# ComfyUI detects SVD by 320 base channels, four levels of two res blocks with attention in the first
# three, context 1024 and adm 768 (supported_models.SVD_img2vid), and its CLIP vision by the depth of
# ViT-H: the tiny SVD file keeps those, at one width (320) on every level. Its CLIP vision is a real-size
# ViT-H (632 M weights, 1.3 GB in fp16), the one part that cannot shrink.
TINY_SVD_UNET = dict(UNET_CONFIGS["svd"], context_dim=1024, channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2],
                     transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                     transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


def randomise(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI allocates weights without initialising them: give every one a seeded value (in place:
    these modules hold up to a few billion weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 / max(1.0, param[0].numel()) ** 0.5, generator=generator)
            elif name.endswith("weight"):
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.1, generator=generator)


def random_vae(real: bool, seed: int = 2) -> comfy.sd.VAE:
    """The SD VAE (SD1.5 and SDXL share its layout), or a TAESD of the same latent space."""
    module = (comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4) if real
              else comfy.taesd.taesd.TAESD())
    randomise(module, seed)
    return comfy.sd.VAE(sd=module.state_dict())


def random_clip_vision_h(seed: int) -> comfy.clip_vision.ClipVisionModel:
    """SVD's image encoder layout (OpenCLIP ViT-H/14 as ComfyUI builds it)."""
    config = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json")
    clip_vision = comfy.clip_vision.ClipVisionModel(config)
    randomise(clip_vision.model, seed)
    return clip_vision


def write_checkpoint(path: str, family: str = "sd15", real: bool = False, seed: int = 0) -> None:
    """An fp16 checkpoint of ``family`` at the released size (``real``, SD1.5 / SDXL) or tiny (SD1.5,
    SVD: ``TINY_SVD_UNET``, with a TAESD for the VAE)."""
    tiny_configs = {"sd15": TINY_SD15_UNET, "svd": TINY_SVD_UNET}
    if not real and family not in tiny_configs:
        raise ValueError("only SD1.5 and SVD have a tiny checkpoint ComfyUI detects (SDXL needs its real-size text "
                         "encoders)")
    unet_config = dict(REAL_UNET_CONFIGS[family]) if real else dict(tiny_configs[family])
    model_config = MODEL_CONFIG_CLASSES[family](unet_config)
    model_config.set_inference_dtype(torch.float16, None)
    base = model_config.get_model({})
    randomise(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    if family == "svd":
        comfy.sd.save_checkpoint(path, model, vae=random_vae(real, seed + 2),
                                 clip_vision=random_clip_vision_h(seed + 1))
    else:
        clip = comfy.sd.CLIP(model_config.clip_target(), model_options={"dtype": torch.float16})
        randomise(clip.cond_stage_model, seed + 1)
        comfy.sd.save_checkpoint(path, model, clip, random_vae(real, seed + 2))
    comfy.model_management.unload_all_models()
    state = comfy.utils.load_torch_file(path)  # what the VAE and CLIP wrote in fp32: halved, as releases are
    comfy.utils.save_torch_file({name: tensor.half() if tensor.is_floating_point() else tensor
                                 for name, tensor in state.items()}, path)
