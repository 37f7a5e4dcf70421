"""Advanced-ControlNet interop (Kosinkadink's ComfyUI-Advanced-ControlNet, README "Advanced-ControlNet").

That pack's Apply Advanced ControlNet node applies its timestep keyframes, latent keyframes,
effect mask and weights only to controls it recognises as its own (``hasattr(control,
"sub_idxs")``); any other CONTROL_NET passes through without them. So where the pack is loaded,
Load ControlNeXt's CONTROL_NET is made an instance of its ``AdvancedControlBase`` as well: the
class is built at run time from the pack's loaded module (nothing of it is imported by name or
copied here). Its keyframe state machine decides, at each model call, the current keyframe's
strength, each latent's multiplier, the masks and the uncond multiplier; they reach the patch as
``CallScales``, and a call at strength 0 installs no patch (the encoder does not run).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from types import ModuleType

import torch

from ..controlnext_core import ControlNeXtError
from .patch import NO_OPTIONS, CallScales, ControlNeXtControlNet, ControlNeXtFile, ControlOptions

# ComfyUI imports a custom node folder as a package named after its path: this is the module of
# that pack holding AdvancedControlBase, whatever its folder is called.
ADVANCED_MODULE_SUFFIX = ".adv_control.utils"
# The Advanced-ControlNet release series whose AdvancedControlBase this module is written against:
# what it uses (its __init__, keyframe state, latent and mask helpers, copy_to_advanced,
# default_control_actions) is the same from 1.4.0 to 1.5.8; the host test runs against a checkout.
KNOWN_SERIES = ((1, 4), (1, 5))

log = logging.getLogger("ControlNeXt")


def advanced_controlnet_module() -> ModuleType | None:
    """Advanced-ControlNet's ``adv_control.utils`` when that pack is loaded, else None."""
    for name, module in list(sys.modules.items()):
        if name.endswith(ADVANCED_MODULE_SUFFIX) and hasattr(module, "AdvancedControlBase") \
                and hasattr(module, "ControlWeights"):
            return module
    return None


def pack_version(module: ModuleType) -> str | None:
    """The version in the pyproject.toml of the Advanced-ControlNet folder ``module`` was loaded from
    (the pack keeps its version only there); None when there is none to read."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(module.__file__)))
    try:
        with open(os.path.join(folder, "pyproject.toml"), encoding="utf-8") as file:
            found = re.search(r'^version\s*=\s*"([^"]+)"', file.read(), re.MULTILINE)
    except OSError:
        return None
    return found.group(1) if found else None


def unknown_version_note(version: str | None) -> str | None:
    """What to tell the user when Advanced-ControlNet is a ``version`` this pack does not know; None
    for a known one."""
    series = re.match(r"(\d+)\.(\d+)(\.|$)", version or "")
    if series is not None and (int(series[1]), int(series[2])) in KNOWN_SERIES:
        return None
    known = " and ".join(f"{major}.{minor}" for major, minor in KNOWN_SERIES)
    return (f"Advanced-ControlNet {version or 'of an unknown version (its pyproject.toml gives none)'} is not a "
            f"release this pack knows (it is written for the {known} releases). Load ControlNeXt's CONTROL_NET "
            f"is made one of its controls anyway; if Apply Advanced ControlNet fails with it or its keyframes do "
            f"not act, use Advanced-ControlNet {KNOWN_SERIES[-1][0]}.{KNOWN_SERIES[-1][1]}, or this pack's own "
            f"schedule nodes with ComfyUI's Apply ControlNet (README, \"Advanced-ControlNet\").")


def control_net_for(file: ControlNeXtFile) -> ControlNeXtControlNet:
    """Load ControlNeXt's CONTROL_NET: an Advanced-ControlNet control too where that pack is loaded."""
    module = advanced_controlnet_module()
    return ControlNeXtControlNet(file) if module is None else advanced_control_class(module)(file)


def per_layer_weights(weights) -> bool:
    """Whether Advanced-ControlNet ``weights`` scale layers (which ControlNeXt, acting at one block, has not)."""
    lists = (weights.weights_input, weights.weights_middle, weights.weights_output)
    return (weights.base_multiplier != 1.0 or weights.weight_mask is not None or weights.weight_func is not None
            or any(values is not None for values in lists))


@functools.lru_cache(maxsize=None)
def advanced_control_class(module: ModuleType) -> type:
    """ControlNeXtControlNet as an ``AdvancedControlBase`` of this loaded Advanced-ControlNet (built
    once per loaded pack, which is when a version this pack does not know is logged)."""
    note = unknown_version_note(pack_version(module))
    if note is not None:
        log.warning("ControlNeXt: %s", note)
    base = module.AdvancedControlBase

    class AdvancedControlNeXtControlNet(ControlNeXtControlNet, base):
        """Advanced-ControlNet calls ``pre_run``, ``get_control`` and ``cleanup`` through its own
        wrappers (set per instance by its ``__init__``), which reach ours through ``self.base``."""

        def __init__(self, file: ControlNeXtFile, options: ControlOptions = NO_OPTIONS, timestep_keyframes=None):
            ControlNeXtControlNet.__init__(self, file, options)
            base.__init__(self, super(AdvancedControlNeXtControlNet, self), timestep_keyframes,
                          module.ControlWeights.default())

        def get_control_advanced(self, x_noisy, t, cond, batched_number, transformer_options):
            """Advanced-ControlNet's own chaining (the controls before this one), then this call's patch."""
            control_prev = self.default_control_actions(x_noisy, t, cond, batched_number, transformer_options)
            self.install_patch(transformer_options, self.call_scales(x_noisy, t, cond, batched_number))
            return control_prev

        def call_scales(self, x_noisy, t, cond, batched_number) -> CallScales:
            """This call's multiplier of each row of h and mask, as Advanced-ControlNet decides them."""
            rows = x_noisy.shape[0]
            keyframe = self._current_timestep_keyframe.strength
            # the latent keyframes' multipliers, on the CPU (no device read): only the row count is used
            latents = self.calc_latent_keyframe_mults(x=torch.empty(rows, 1), batched_number=batched_number)
            chunks = self.cond_or_uncond or [0] * batched_number
            per_chunk = rows // len(chunks)
            uncond = self.weights.uncond_multiplier
            strengths = tuple(keyframe * float(latents[row]) * (uncond if chunks[row // per_chunk] == 1 else 1.0)
                              for row in range(rows))
            self.prepare_mask_cond_hint(x_noisy=x_noisy, t=t, cond=cond, batched_number=batched_number)
            masks = [m.reshape(rows, *m.shape[-2:]) for m in (self.mask_cond_hint, self.tk_mask_cond_hint)
                     if m is not None]  # [rows, 1, H, W] at the latent's pixel size
            mask = None if not masks else masks[0] if len(masks) == 1 else masks[0] * masks[1]
            return CallScales(strengths, mask)

        def verify_all_weights(self, throw_error=True):
            base.verify_all_weights(self, throw_error)
            given = [self.weights_override] + [k.control_weights for k in self.timestep_keyframes.keyframes]
            if any(weights is not None and per_layer_weights(weights) for weights in given):
                raise ControlNeXtError(
                    "ControlNeXt adds its control at one UNet block, so per-layer ControlNet weights (soft weights, "
                    "weight lists or masks) have no layers to act on: use strength, a timestep keyframe's strength "
                    "or the effect mask instead (the weights' uncond_multiplier does apply).")

        def _copy_with(self, file: ControlNeXtFile) -> "AdvancedControlNeXtControlNet":
            c = type(self)(file, self.options, self.timestep_keyframes)
            self.copy_to(c)
            self.copy_to_advanced(c)
            return c

    return AdvancedControlNeXtControlNet
