"""Names in released UNet files (diffusers, or ComfyUI/LDM) -> this model's state-dict keys.

ComfyUI maps diffusers names for SD1.5/SDXL (``comfy.utils.unet_to_diffusers``) but has no map
for the spatio-temporal SVD UNet; its spatial half follows the SD map and the temporal blocks
sit beside it under ``time_stack``, ``time_mixer`` and ``time_pos_embed``.
"""
from __future__ import annotations

import re

import comfy.utils

# ComfyUI prefixes of a res block: inside input/output blocks it is sub-module 0.
_RES_PREFIX = re.compile(r"^((?:input_blocks|output_blocks)\.\d+\.0\.|middle_block\.[02]\.)(.*)$")
_ATTENTION = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)\.(.*)$")
_RES = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.resnets\.\d+|mid_block\.resnets\.\d+)\.(.*)$")
# Temporal transformer parts that spatial blocks lack.
_TEMPORAL_ONLY = ("norm_in.weight", "norm_in.bias", "ff_in.net.0.proj.weight", "ff_in.net.0.proj.bias",
                  "ff_in.net.2.weight", "ff_in.net.2.bias")


def _spatio_temporal(sd_map: dict[str, str]) -> dict[str, str]:
    """Diffusers UNetSpatioTemporalConditionModel names from the SD map of the same layout."""
    out: dict[str, str] = {}
    attention_prefixes: dict[str, str] = {}
    temporal_blocks: set[tuple[str, str]] = set()
    for diffusers, ldm in sd_map.items():
        res = _RES.match(diffusers)
        if res:
            block, part = res.groups()
            ldm_prefix, ldm_part = _RES_PREFIX.match(ldm).groups()
            out[f"{block}.spatial_res_block.{part}"] = ldm
            out[f"{block}.temporal_res_block.{part}"] = f"{ldm_prefix}time_stack.{ldm_part}"
            out[f"{block}.time_mixer.mix_factor"] = f"{ldm_prefix}time_mixer.mix_factor"
            continue
        attention = _ATTENTION.match(diffusers)
        if attention:
            block, part = attention.groups()
            ldm_prefix = ldm[: len(ldm) - len(part)]
            attention_prefixes[block] = ldm_prefix
            out[diffusers] = ldm
            if part.startswith("transformer_blocks."):
                index = part.split(".")[1]
                out[f"{block}.temporal_{part}"] = f"{ldm_prefix}time_stack.{part[len('transformer_blocks.'):]}"
                temporal_blocks.add((block, index))
            continue
        out[diffusers] = ldm
    for block, ldm_prefix in attention_prefixes.items():
        for linear, index in (("linear_1", 0), ("linear_2", 2)):
            for kind in ("weight", "bias"):
                out[f"{block}.time_pos_embed.{linear}.{kind}"] = f"{ldm_prefix}time_pos_embed.{index}.{kind}"
        out[f"{block}.time_mixer.mix_factor"] = f"{ldm_prefix}time_mixer.mix_factor"
    for block, index in temporal_blocks:
        ldm_prefix = attention_prefixes[block]
        for part in _TEMPORAL_ONLY:
            out[f"{block}.temporal_transformer_blocks.{index}.{part}"] = f"{ldm_prefix}time_stack.{index}.{part}"
    return out


def diffusers_map(model) -> dict[str, str]:
    """Diffusers names -> ``model``'s UNet names (without "diffusion_model."), spatio-temporal for SVD."""
    unet_config = model.model.model_config.unet_config
    names = comfy.utils.unet_to_diffusers(unet_config)
    return _spatio_temporal(names) if unet_config.get("use_temporal_resblock") else names


def unet_key_map(model) -> dict[str, str]:
    """File names (diffusers, LDM, or full-checkpoint LDM) -> ``model``'s state-dict keys."""
    key_map = {diffusers: f"diffusion_model.{ldm}" for diffusers, ldm in diffusers_map(model).items()}
    for key in model.model_state_dict(filter_prefix="diffusion_model."):
        ldm = key[len("diffusion_model."):]
        key_map[ldm] = key
        key_map[f"model.diffusion_model.{ldm}"] = key
    return key_map
