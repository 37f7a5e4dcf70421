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
import sys
from types import ModuleType

import torch

from ..controlnext_core import ControlNeXtError
from .patch import NO_OPTIONS, CallScales, ControlNeXtControlNet, ControlNeXtFile, ControlOptions

# ComfyUI imports a custom node folder as a package named after its path: this is the module of
# that pack holding AdvancedControlBase, whatever its folder is called.
ADVANCED_MODULE_SUFFIX = ".adv_control.utils"


def advanced_controlnet_module() -> ModuleType | None:
    """Advanced-ControlNet's ``adv_control.utils`` when that pack is loaded, else None."""
    for name, module in list(sys.modules.items()):
        if name.endswith(ADVANCED_MODULE_SUFFIX) and hasattr(module, "AdvancedControlBase") \
                and hasattr(module, "ControlWeights"):
            return module
    return None


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
    """ControlNeXtControlNet as an ``AdvancedControlBase`` of this loaded Advanced-ControlNet."""
    base = module.AdvancedControlBase

    class AdvancedControlNeXtControlNet(ControlNeXtControlNet, base):
        """Advanced-ControlNet calls ``pre_run``, ``get_control`` and ``cleanup`` through its own
        wrappers (set per instance by its ``__init__``), which reach ours through ``self.base``."""

        def __init__(self, file: ControlNeXtFile, options: ControlOptions = NO_OPTIONS, timestep_keyframes=None):
            ControlNeXtControlNet.__init__(self, file, options)
            base.__init__(self, super(AdvancedControlNeXtControlNet, self), timestep_keyframes,
                          module.ControlWeights.default())

        def get_control_advanced(self, x_noisy, t, cond, batched_number, transformer_options):
            control_prev = None
            if self.previous_controlnet is not None:
                control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number,
                                                                    transformer_options)
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
