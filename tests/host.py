"""Host-test helpers: the pack imported as ComfyUI imports it, tiny random-weight UNets with the
real SD1.5 / SDXL block layout, and a sampler call. Importing this skips the calling test
module when no ComfyUI host was found (see conftest.py).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

import pytest
import torch

from conftest import COMFYUI_PATH, HOST_SKIP_REASON, PACK_ROOT

if not COMFYUI_PATH:
    pytest.skip(HOST_SKIP_REASON, allow_module_level=True)

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
import safetensors.torch  # noqa: E402

from builders import random_encoder_state_dict  # noqa: E402

PACK_NAME = "comfyui_controlnext_under_test"


def load_pack():
    """Import the checkout as a package, the way ComfyUI imports a custom node folder."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(PACK_ROOT, "__init__.py"),
                                                      submodule_search_locations=[PACK_ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


pack = load_pack()
core = importlib.import_module(f"{PACK_NAME}.controlnext_core")
patch_module = importlib.import_module(f"{PACK_NAME}.nodes.patch")
loaders = importlib.import_module(f"{PACK_NAME}.nodes.loaders")
apply_module = importlib.import_module(f"{PACK_NAME}.nodes.apply")

CONTEXT_DIM = 64
# The real channel counts where ControlNeXt injects (320 after conv_in and level 0, 1280 at the
# middle), but one res block per level and one transformer layer: shallow, not narrow.
_COMMON = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
               out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4],
               transformer_depth_middle=1, context_dim=CONTEXT_DIM, use_temporal_attention=False,
               use_temporal_resblock=False)
UNET_CONFIGS = {
    "sd15": dict(_COMMON, transformer_depth=[1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 0, 0],
                 use_linear_in_transformer=False, adm_in_channels=None, num_classes=None),
    "sdxl": dict(_COMMON, transformer_depth=[0, 1, 1], transformer_depth_output=[0, 0, 1, 1, 1, 1],
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
    return [[torch.randn(1, 77, CONTEXT_DIM, generator=generator), extra]]


def sample(model, family: str, batch: int = 1, cfg: float = 2.0, steps: int = 3, size: int = 8, seed: int = 7,
           positive=None, negative=None, sampler: str = "euler") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, size, size, generator=generator)
    latent = torch.zeros(batch, 4, size, size)
    positive = positive if positive is not None else conditioning(family, 1)
    negative = negative if negative is not None else conditioning(family, 2)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative, latent,
                               seed=seed, disable_pbar=True)


def encoder_file(tmp_path, layout: str, seed: int = 0, name: str | None = None) -> str:
    name = name or f"controlnext_{layout}.safetensors"
    path = os.path.join(tmp_path, name)
    safetensors.torch.save_file(random_encoder_state_dict(layout, seed), path)
    return path


def loaded(tmp_path, layout: str, seed: int = 0):
    """A ControlNeXtFile as Load ControlNeXt makes it."""
    path = encoder_file(tmp_path, layout, seed)
    return patch_module.ControlNeXtFile(os.path.basename(path), core.load_encoder(core.load_state_dict_file(path)))


def control_image(batch: int = 1, size: int = 64, seed: int = 3) -> torch.Tensor:
    """A ComfyUI IMAGE [B,H,W,3]: random blocks, like an edge or depth map."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest").movedim(1, -1)


def apply(model, file, image, strength: float = 1.0, start: float = 0.0, end: float = 1.0, mask=None):
    return apply_module.ApplyControlNeXt.execute(model, file, image, strength, start, end, mask).result[0]


def count_encoder_runs(file, monkeypatch) -> list:
    """Counts encoder passes (``features`` runs once per encode, whichever entry point)."""
    calls = []
    original = file.encoder.features

    def counting(image, timestep, inner_padding=1):
        calls.append(image.shape[0])
        return original(image, timestep, inner_padding)

    monkeypatch.setattr(file.encoder, "features", counting)
    return calls


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float rounding, measured against the tensors' scale (random UNets output large values)."""
    scale = expected.abs().max().clamp_min(1e-6)
    difference = (actual - expected).abs().max()
    assert difference <= rel * scale, f"max |difference| {difference:.3g} is over {rel:g} x {scale:.3g}"


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
