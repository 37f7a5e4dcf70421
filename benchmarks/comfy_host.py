"""The ComfyUI host of the benchmarks, and the models they run (random weights).

The host is the ComfyUI checkout at ``COMFYUI_PATH``, set up as the tests do (checkout first on
sys.path, ``nodes`` imported early), except that the device is chosen here: ``--device cpu``
sets ComfyUI's ``--cpu``, anything else lets ComfyUI pick its GPU.

Every model comes from the builders the tests use (``controlnext_testbed``): UNets from its
``tiny_unet`` (``tiny_model`` on a registered config: the real SD1.5/SDXL configs it holds, or the
SVD-XT config below), encoders from its ``official_layouts``. ComfyUI's own ControlNet is ComfyUI's
``cldm.ControlNet`` class built from the UNet's config (as ``load_controlnet_state_dict`` does)
with weights from ``official_layouts.random_tensor``.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # controlnext_testbed; appended: never shadows ComfyUI's modules
from controlnext_testbed import comfy_library  # noqa: E402

# SVD-XT (1.1) as ComfyUI detects it from the released checkpoint (model_detection.py, video
# branch). 1 524 623 082 parameters, the count of the official unet.bin in
# controlnext_testbed/official_keys.json (checked when the model is built).
REAL_SVD_CONFIG = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=768, in_channels=8, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=True, context_dim=1024, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    extra_ff_mix_layer=True, use_spatial_context=True, merge_strategy="learned_with_images", merge_factor=0.0,
    video_kernel_size=[3, 1, 1], use_temporal_resblock=True, use_temporal_attention=True,
    disable_temporal_crossattention=False, max_ddpm_temb_period=10000)
SVD_XT_PARAMETERS = 1_524_623_082


def setup(device: str) -> str:
    """Import ComfyUI from COMFYUI_PATH and this pack the way ComfyUI imports a custom node folder."""
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("The benchmarks need a ComfyUI host: set COMFYUI_PATH to a ComfyUI checkout and run "
                         "them with that ComfyUI's python (see the README, Benchmarks).")
    path = comfy_library.use_comfyui(os.environ["COMFYUI_PATH"], cpu=device == "cpu")
    comfy_library.import_pack()
    return path


pack = comfy_library.pack


def _register(key: str, config: dict, config_class) -> None:
    from controlnext_testbed import tiny_unet

    tiny_unet.UNET_CONFIGS[key] = dict(config)
    tiny_unet.REAL_UNET_CONFIGS[key] = dict(config)
    tiny_unet.MODEL_CONFIG_CLASSES[key] = config_class


def unet_key(family: str, quick: bool) -> str:
    """Register the family's config with controlnext_testbed.tiny_unet and return its key there."""
    from controlnext_testbed import tiny_unet

    if quick:
        return family  # the tests' shallow models
    key = f"{family}_real"
    config = REAL_SVD_CONFIG if family == "svd" else tiny_unet.REAL_UNET_CONFIGS[family]
    _register(key, config, tiny_unet.MODEL_CONFIG_CLASSES[family])
    return key


def build_unet(family: str, quick: bool, dtype: torch.dtype):
    """A random-weight UNet (ModelPatcher) from the tests' builder; the builder's cache is cleared so
    that ``del`` frees it."""
    from controlnext_testbed import tiny_unet

    key = unet_key(family, quick)
    model = tiny_unet.tiny_model(key, dtype)
    tiny_unet.tiny_model.cache_clear()
    if family == "svd" and not quick:
        count = sum(p.numel() for p in model.model.diffusion_model.parameters())
        assert count == SVD_XT_PARAMETERS, f"SVD-XT config gives {count} parameters, not {SVD_XT_PARAMETERS}"
    return model


def unet_on_meta(family: str, quick: bool):
    from controlnext_testbed import tiny_unet

    key = unet_key(family, quick)
    if quick:  # the shallow config, on meta
        _register(f"{family}_quick_meta", tiny_unet.UNET_CONFIGS[family], tiny_unet.MODEL_CONFIG_CLASSES[family])
        key = f"{family}_quick_meta"
    return tiny_unet.real_size_model_on_meta(key)


def controlnext_file(layout: str, seed: int = 0):
    """What Load ControlNeXt outputs, from a random official-layout file written to a temp folder."""
    import safetensors.torch
    from controlnext_testbed.official_layouts import random_encoder_state_dict

    core, patch = pack("controlnext_core"), pack("nodes.patch")
    path = os.path.join(tempfile.mkdtemp(prefix="controlnext_bench_"), f"controlnext_{layout}.safetensors")
    safetensors.torch.save_file(random_encoder_state_dict(layout, seed), path)
    file = patch.ControlNeXtFile(os.path.basename(path), core.load_encoder(core.load_state_dict_file(path)))
    os.remove(path)
    return file


def controlnet_config(unet_config: dict, dtype, device) -> dict:
    """ComfyUI's ControlNet config for a UNet config, as comfy.controlnet.load_controlnet_state_dict makes it."""
    import comfy.ops

    config = dict(unet_config)
    config.pop("out_channels", None)
    config.update(hint_channels=3, dtype=dtype, device=device, operations=comfy.ops.pick_operations(dtype, None))
    return config


def comfy_controlnet(unet_patcher, seed: int = 1):
    """ComfyUI's own ControlNet (comfy.controlnet.ControlNet around comfy.cldm.cldm.ControlNet) for the
    UNet's architecture, random weights. Returns it and its parameter count."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    from controlnext_testbed.official_layouts import random_tensor

    dtype = unet_patcher.model.get_dtype()
    config = controlnet_config(unet_patcher.model.model_config.unet_config, dtype,
                               comfy.model_management.unet_offload_device())
    control_model = comfy.cldm.cldm.ControlNet(**config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in control_model.named_parameters():
            parameter.copy_(random_tensor(name, list(parameter.shape), generator).to(parameter.dtype))
    count = sum(p.numel() for p in control_model.parameters())
    net = comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device(),
                                      manual_cast_dtype=None)
    return net, count


def conditioning(family: str, context_dim: int, seed: int, latent: torch.Tensor | None = None) -> list:
    """A CONDITIONING with the model's own context width (77 tokens; SVD: one CLIP-vision token)."""
    generator = torch.Generator().manual_seed(seed)
    if family == "svd":
        extra = {"fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0,
                 "concat_latent_image": torch.randn(1, *latent.shape[1:], generator=generator)}
        return [[torch.randn(1, 1, context_dim, generator=generator), extra]]
    extra = {"pooled_output": torch.randn(1, 1280, generator=generator)} if family == "sdxl" else {}
    return [[torch.randn(1, 77, context_dim, generator=generator), extra]]


def control_image(frames: int, height: int, width: int, seed: int = 3) -> torch.Tensor:
    """A ComfyUI IMAGE [F,H,W,3]: coarse random blocks, like an edge or depth map."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(frames, 3, max(1, height // 8), max(1, width // 8), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="nearest").movedim(1, -1)
