"""Random-weight SD1.5 / SDXL checkpoint files as ComfyUI saves them (comfy.sd.save_checkpoint), so
ComfyUI's own loader detects and loads them: for the headless training command's tests ("tiny") and
its throughput benchmark ("real": the released models' sizes).

ComfyUI detects SD1.5 by the UNet's context width (768) and base channels (320) and builds the text
encoders at their real size whatever a file holds, so even the tiny file carries a real-size CLIP-L
(123 M weights, 0.25 GB in fp16); its UNet is tiny_unet's shallow SD1.5 layout at width 768 and its
VAE a TAESD. Imports ComfyUI: only import it where a host is on sys.path.
"""
from __future__ import annotations

import torch

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


def write_checkpoint(path: str, family: str = "sd15", real: bool = False, seed: int = 0) -> None:
    """An fp16 checkpoint of ``family`` at the released size (``real``) or tiny (SD1.5 only)."""
    if not real and family != "sd15":
        raise ValueError("only SD1.5 has a tiny checkpoint ComfyUI detects (SDXL needs its real-size text encoders)")
    unet_config = dict(REAL_UNET_CONFIGS[family]) if real else dict(TINY_SD15_UNET)
    model_config = MODEL_CONFIG_CLASSES[family](unet_config)
    model_config.set_inference_dtype(torch.float16, None)
    base = model_config.get_model({})
    randomise(base.diffusion_model, seed)
    clip = comfy.sd.CLIP(model_config.clip_target(), model_options={"dtype": torch.float16})
    randomise(clip.cond_stage_model, seed + 1)
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    comfy.sd.save_checkpoint(path, model, clip, random_vae(real, seed + 2))
    comfy.model_management.unload_all_models()
    state = comfy.utils.load_torch_file(path)  # what the VAE and CLIP wrote in fp32: halved, as releases are
    comfy.utils.save_torch_file({name: tensor.half() if tensor.is_floating_point() else tensor
                                 for name, tensor in state.items()}, path)
