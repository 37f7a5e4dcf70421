"""Random-weight UNets with the real SD1.5 / SDXL block layout, built inside a ComfyUI.

Used by the host tests, the test server's helper nodes and the benchmarks; imports ComfyUI,
so only import it where a host is on sys.path.
"""
from __future__ import annotations

import functools

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

CONTEXT_DIM = 64
# The real channel counts where ControlNeXt injects (320 after conv_in and level 0, 1280 at the
# SD1.5 middle), but two levels, one res block each and one transformer layer: shallow, not
# narrow, so a CPU samples them in a fraction of a second.
_COMMON = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
               out_channels=4, model_channels=320, num_res_blocks=[1, 1], transformer_depth_middle=1,
               context_dim=CONTEXT_DIM, use_temporal_attention=False, use_temporal_resblock=False)
UNET_CONFIGS = {
    "sd15": dict(_COMMON, channel_mult=[1, 4], transformer_depth=[1, 0], transformer_depth_output=[1, 1, 0, 0],
                 use_linear_in_transformer=False, adm_in_channels=None, num_classes=None),
    "sdxl": dict(_COMMON, channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                 use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816),
}
MODEL_CONFIG_CLASSES = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL,
                        "sdxl_refiner": comfy.supported_models.SDXLRefiner}


@functools.lru_cache(maxsize=None)
def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A shallow random-weight UNet with the family's block layout. Cached: tests never change it
    (several assert exactly that)."""
    unet_config = dict(UNET_CONFIGS[family])
    model_config = MODEL_CONFIG_CLASSES[family](unet_config)
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in base.diffusion_model.named_parameters():
            if param.ndim >= 2:
                value = torch.randn(param.shape, generator=generator) / max(1.0, param[0].numel()) ** 0.5
            elif "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            else:
                value = 0.1 * torch.randn(param.shape, generator=generator)
            param.copy_(value.to(param.dtype))
    base.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(base, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


def conditioning(family: str, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    extra = {}
    if family == "sdxl":
        extra = {"pooled_output": torch.randn(1, 1280, generator=generator)}
    if family == "svd":  # what SVD_img2vid_Conditioning attaches (the image latent is added by the caller)
        extra = {"fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0,
                 "concat_latent_image": torch.randn(1, 4, 8, 8, generator=generator)}
    return [[torch.randn(1, 77, CONTEXT_DIM, generator=generator), extra]]


REAL_UNET_CONFIGS = {  # as ComfyUI detects them from the released base checkpoints
    "sd15": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_classes=None,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_resblock=False,
                 use_temporal_attention=False),
    "sdxl": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_resblock=False,
                 use_temporal_attention=False),
}


def real_size_model_on_meta(family: str) -> comfy.model_patcher.ModelPatcher:
    """The full-size architecture with no memory behind it: for name and shape checks."""
    model_config = MODEL_CONFIG_CLASSES[family](dict(REAL_UNET_CONFIGS[family]))
    model_config.set_inference_dtype(torch.float16, None)
    base = model_config.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(base, torch.device("meta"), torch.device("meta"))


SVD_CONFIG = dict(_COMMON, in_channels=8, channel_mult=[1, 2], transformer_depth=[1, 1],
                  transformer_depth_output=[1, 1, 1, 1],
                  use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=768,
                  use_temporal_attention=True, use_temporal_resblock=True, extra_ff_mix_layer=True,
                  use_spatial_context=True, merge_strategy="learned_with_images", merge_factor=0.0,
                  video_kernel_size=[3, 1, 1], disable_temporal_crossattention=False, max_ddpm_temb_period=10000)
UNET_CONFIGS["svd"] = SVD_CONFIG
MODEL_CONFIG_CLASSES["svd"] = comfy.supported_models.SVD_img2vid
# SVD v1 encoders inject before the middle block, where SVD-XT has 1280 channels: the same shallow
# SVD UNet with its last level as wide.
UNET_CONFIGS["svd_1280"] = dict(SVD_CONFIG, channel_mult=[1, 4])
MODEL_CONFIG_CLASSES["svd_1280"] = comfy.supported_models.SVD_img2vid
