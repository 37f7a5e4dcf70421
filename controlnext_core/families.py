"""The one table of (model family, encoder layout) facts, and layout detection.

The file alone does not say where it goes; its layout and the target model's family
together decide the injection point, the order of pooling and normalising, eps, the family
constant and which CFG halves get control.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import ControlNeXtError

FAMILIES = ("sd15", "sdxl", "svd")
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "svd": "Stable Video Diffusion"}


@dataclass(frozen=True)
class InjectionRule:
    family: str
    layout: str
    point: str  # where in the UNet: see ``injection_block``
    pool_first: bool  # pool the control to h's size before normalising (else after)
    eps: float
    factor: float  # the family constant k
    uncond: str  # what the uncond half gets: "same", "none", or "v1" (sigmoid(0)*1.3)
    embedding_padding: int  # padding of the 2nd/3rd embedding convs: 0 in the SVD inference code


RULES: dict[tuple[str, str], InjectionRule] = {
    ("sd15", "mid"): InjectionRule("sd15", "mid", "after_middle", True, 1e-12, 1.0, "same", 1),
    ("sd15", "base"): InjectionRule("sd15", "base", "after_first_down", True, 1e-12, 1.0, "same", 1),
    ("sdxl", "base"): InjectionRule("sdxl", "base", "after_conv_in", False, 1e-12, 1.0, "same", 1),
    ("svd", "base"): InjectionRule("svd", "base", "after_first_down", False, 1e-5, 0.2, "none", 0),
    ("svd", "svd_v1"): InjectionRule("svd", "svd_v1", "before_middle", False, 1e-5, 1.0, "v1", 0),
}

# Each injection point in words for the editor (``injection_block`` has the exact block).
POINT_WORDS = {
    "after_conv_in": "right after the first layer of the UNet, at full resolution",
    "after_first_down": "early in the UNet, after its first downscale (half resolution)",
    "before_middle": "deep in the UNet, just before its middle, at its lowest resolution",
    "after_middle": "deep in the UNet, right after its middle, at its lowest resolution",
}

# Without a family hint, what a layout most likely serves (the published releases).
DEFAULT_FAMILY = {"mid": "sd15", "base": "sdxl", "svd_v1": "svd"}
# For ``inject`` without a layout: the published releases of each family.
DEFAULT_LAYOUT = {"sd15": "mid", "sdxl": "base", "svd": "base"}

LAYOUT_DESCRIPTIONS = {
    "base": '"base" layout (320 channels: SDXL releases, SVD-v2, SD1.5 training code)',
    "mid": '"mid" layout (1280 channels: SD1.5 releases)',
    "svd_v1": '"SVD v1" layout (1280 channels with GroupNorm)',
}

# safetensors metadata key naming the model family a file was trained for ("sd15", "sdxl", "svd").
METADATA_FAMILY = "family"
# Tensors every official encoder layout has (``detect_layout`` tells the layouts apart by their shapes).
ENCODER_KEYS = ("time_embedding.linear_1.weight", "mid_convs.1.weight")


def rule_for(family: str, layout: str) -> InjectionRule:
    if family not in FAMILIES:
        raise ControlNeXtError(
            f"Unsupported model family {family!r}: ControlNeXt exists for "
            f"{', '.join(FAMILY_NAMES[f] for f in FAMILIES)} ({', '.join(FAMILIES)})."
        )
    rule = RULES.get((family, layout))
    if rule is None:
        served = sorted(FAMILY_NAMES[f] for f, lay in RULES if lay == layout)
        raise ControlNeXtError(
            f"This ControlNeXt file has the {LAYOUT_DESCRIPTIONS[layout]}, which cannot serve a "
            f"{FAMILY_NAMES[family]} model; it serves {' or '.join(served)}. "
            f"Use a ControlNeXt release made for {FAMILY_NAMES[family]}, or a {' or '.join(served)} model."
        )
    return rule


def trained_family(layout: str, metadata: Mapping[str, str]) -> str | None:
    """The family a file says it was trained for (``METADATA_FAMILY``: Save ControlNeXt writes it, the
    releases carry none), when that family can take its layout; else None."""
    family = metadata.get(METADATA_FAMILY)
    return family if (family, layout) in RULES else None


def mixed_up_pairing(family: str, layout: str, metadata: Mapping[str, str]) -> str | None:
    """Why an encoder on a ``family`` model is probably the wrong file, or None.

    On SD1.5 a "base" encoder goes after the UNet's first down block: right for encoders from the
    official SD1.5 training code, wrong for the published "base" releases (SDXL, SVD-v2), whose
    keys and shapes are the same. Only the file's metadata (``METADATA_FAMILY``) can tell them
    apart, and the official training code writes none: warn, never refuse.
    """
    if (family, layout) != ("sd15", "base"):
        return None
    trained_for = metadata.get(METADATA_FAMILY)
    if trained_for == "sd15":
        return None
    if trained_for:
        what = (f"was made for {FAMILY_NAMES.get(trained_for, trained_for)} "
                f"(its metadata says {METADATA_FAMILY}={trained_for})")
    else:
        what = "is probably an SDXL release's encoder (the published \"base\" files are SDXL and SVD-v2 releases)"
    return (f"This file {what}. On SD1.5 a \"base\" encoder is added after the UNet's first down block, which is "
            f"right only for encoders trained for SD1.5 with the official SD1.5 training code. Use this file with "
            f"the model it was made for, or an SD1.5 release (\"mid\" layout) here; if it was trained for SD1.5, "
            f"the pairing is right (files whose safetensors metadata says {METADATA_FAMILY}=sd15 are not flagged).")


def injection_block(rule: InjectionRule, num_res_blocks: list[int]) -> tuple[str, int]:
    """The UNet block whose output gets the control, as ComfyUI names blocks.

    Counted from the UNet's own config, so the point stays right for fine-tunes with other
    depths (the real SD1.5/SDXL/SVD UNets give ("input", 3), ("input", 0), ("input", 11)).
    """
    if rule.point == "after_conv_in":
        return ("input", 0)
    if rule.point == "after_first_down":
        return ("input", num_res_blocks[0] + 1)
    if rule.point == "before_middle":
        return ("input", sum(num_res_blocks) + len(num_res_blocks) - 1)
    if rule.point == "after_middle":
        return ("output", 0)
    raise AssertionError(rule.point)


def injection_channels(rule: InjectionRule, model_channels: int, channel_mult: list[int]) -> int:
    """Channels of the UNet's hidden state at the injection point (what the encoder must output)."""
    if rule.point == "after_conv_in":
        return model_channels
    if rule.point == "after_first_down":
        return model_channels * channel_mult[0]
    return model_channels * channel_mult[-1]


def _describe_foreign(keys: list[str]) -> str:
    joined = " ".join(keys[:200])
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "a full Stable Diffusion checkpoint"
    if "lora" in joined.lower():
        return "a LoRA"
    if any(k.startswith(("control_model.", "controlnet_cond_embedding.", "input_hint_block.", "zero_convs."))
           or "controlnet_down_blocks" in k for k in keys):
        return "an ordinary ControlNet"
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "input_blocks.", "output_blocks."))
           for k in keys):
        return "UNet weights (ControlNeXt releases ship these beside the encoder: load them with "\
               "'Load ControlNeXt UNet Weights')"
    return ""


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which official encoder layout a state dict holds, from key names and shapes."""
    keys = list(state_dict.keys())
    if not keys:
        raise ControlNeXtError("The ControlNeXt file is empty: it holds no tensors. Download it again.")

    def shape(key: str) -> tuple[int, ...] | None:
        value = state_dict.get(key)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    time_embedding, final_conv = ENCODER_KEYS
    out = shape(final_conv)
    if out is None or shape(time_embedding) is None:
        raise ControlNeXtError(
            f"This file is {(_describe_foreign(keys) + ', ') if _describe_foreign(keys) else ''}not a ControlNeXt "
            f"condition encoder "
            f"(found {len(keys)} tensors, first keys: {', '.join(keys[:3])}; expected keys such as "
            f"'time_embedding.linear_1.weight' and 'mid_convs.1.weight'). "
            f"Load the encoder file of a ControlNeXt release (often named controlnet.safetensors)."
        )
    has_embedding = shape("embedding.0.weight") is not None
    if out[:1] == (320,) and has_embedding:
        return "base"
    if out[:1] == (1280,) and has_embedding:
        return "svd_v1"
    if out[:1] == (1280,) and shape("down_res.0.conv1.weight") is not None:
        return "mid"
    raise ControlNeXtError(
        f"Unrecognised ControlNeXt encoder: final conv 'mid_convs.1.weight' has shape {list(out)} "
        f"and 'embedding.0.weight' is {'present' if has_embedding else 'absent'}; the official layouts "
        f"have 320 output channels with an embedding (base), 1280 without (SD1.5) or 1280 with (SVD v1). "
        f"The file may be truncated or from another project."
    )
