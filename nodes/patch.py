"""The ComfyUI side of the injection: one UNet patch, used by both the MODEL route (Apply
ControlNeXt) and the CONTROL_NET route (ComfyUI's Apply ControlNet), so both give one result.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Mapping

import torch

import comfy.controlnet
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension

from ..controlnext_core import (ControlNeXt, ControlNeXtError, bind, fit_control, injection_block,
                                injection_channels)
from ..controlnext_core.encoders import ConditionEncoder
from ..controlnext_core.encoding_cache import EncodingCache, refresh_block
from ..controlnext_core.families import FAMILY_NAMES, LAYOUT_DESCRIPTIONS, mixed_up_pairing
from ..controlnext_core.rows import (CallLayout, add_planned_control, controls_any_chunk,
                                     encode_rows, plan_rows, row_images, row_masks)
from ..controlnext_core.schedule import LatentStrengths, ResolvedSchedule, StrengthSchedule, check_strength, resolve

# ComfyUI model config class (or a base class of it) -> ControlNeXt family.
FAMILY_BY_CONFIG = {"SD15": "sd15", "SDXL": "sdxl", "SVD_img2vid": "svd"}
PATCH_KIND = {"input": "input_block_patch_after_skip", "output": "output_block_patch"}
LATENT_SCALE = 8  # SD1.5, SDXL and SVD VAEs all downscale by 8
# transformer_options keys our window guider sets: the control frame of each row, and the video length.
WINDOW_CONTROL_FRAMES = "controlnext_control_frames"
VIDEO_FRAMES = "controlnext_video_frames"
FRAME_POLICIES = ("error", "resample")  # see controlnext_core.rows.row_images
# transformer_options key of this model call's sigmas as floats: (the sigmas tensor, its values)
STEP_SIGMAS = "controlnext_step_sigmas"
# transformer_options key of this model call's per-row multipliers from the CONTROL_NET that installed
# a patch ({id(patch): CallScales}; Advanced-ControlNet's keyframes, nodes/advanced_controlnet.py)
CALL_SCALES = "controlnext_call_scales"
# transformer_options key, set only when several ControlNeXts act at one block: (the last one's
# output, the UNet's own hidden state there), so each is normalised against the UNet's statistics
BLOCK_INPUT = "controlnext_block_input"
WRAPPER_KEY = "controlnext"

log = logging.getLogger("ControlNeXt")


def model_type_name(base_model) -> str:
    return type(getattr(base_model, "model_config", base_model)).__name__


def model_family(base_model) -> str | None:
    config = getattr(base_model, "model_config", None)
    for cls in type(config).__mro__:
        if cls.__name__ in FAMILY_BY_CONFIG:
            return FAMILY_BY_CONFIG[cls.__name__]
    return None


class ControlNeXtFile:
    """What Load ControlNeXt outputs: one encoder, bound to a family when applied to a model.

    Immutable once built (apart from the log-once record of its pairing warnings); clones of a
    MODEL share it. ``metadata``: the file's safetensors metadata (``read_file_metadata``), which
    can say what family it was trained for.
    """

    def __init__(self, name: str, encoder: ConditionEncoder, metadata: Mapping[str, str] | None = None,
                 load_device: torch.device | None = None):
        self.name = name
        self.encoder = encoder
        self.metadata = dict(metadata or {})
        self._warned_families: set[str] = set()  # the log says it once, not at every sampling run
        self.patcher = comfy.model_patcher.ModelPatcher(
            encoder, load_device=load_device or comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())

    def for_device(self, load_device: torch.device) -> "ControlNeXtFile":
        """The same file with an encoder of its own, loaded on ``load_device`` (multi-GPU sampling).

        The copy shares the layout's config: layouts are told apart by config identity."""
        config = self.encoder.config
        return ControlNeXtFile(self.name, copy.deepcopy(self.encoder, {id(config): config}), self.metadata, load_device)

    def pairing_warning(self, family: str) -> str | None:
        """Why this file on a ``family`` model is probably a mixed-up file (None when nothing says so)."""
        warning = mixed_up_pairing(family, self.layout, self.metadata)
        return None if warning is None else f"'{self.name}' on a {FAMILY_NAMES[family]} model: {warning}"

    @property
    def layout(self) -> str:
        return self.encoder.layout

    def bind(self, base_model) -> ControlNeXt:
        family = model_family(base_model)
        if family is None:
            raise ControlNeXtError(
                f"'{self.name}' ({LAYOUT_DESCRIPTIONS[self.layout]}) cannot be applied to this "
                f"{model_type_name(base_model)} model: ControlNeXt works with SD1.5, SDXL and Stable Video "
                f"Diffusion models. Load one of those."
            )
        try:
            controlnext = bind(self.encoder, family)
        except ControlNeXtError as error:
            raise ControlNeXtError(f"'{self.name}' on a {FAMILY_NAMES[family]} model "
                                   f"({model_type_name(base_model)}): {error}") from None
        warning = self.pairing_warning(family)
        if warning is not None and family not in self._warned_families:
            self._warned_families.add(family)
            log.warning("ControlNeXt: %s", warning)
        return controlnext

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class ControlOptions:
    """What the schedule inputs add to strength and start/end, on both routes (README, "Schedules and
    per-frame strength"): a strength schedule over sampling, a multiplier per latent or video frame,
    a mask (one, or one per latent / frame) and the uncond half's multiplier."""

    schedule: StrengthSchedule | None = None
    latent_strengths: LatentStrengths | None = None
    mask: torch.Tensor | None = None
    uncond_multiplier: float = 1.0

    def __post_init__(self):
        check_strength(self.uncond_multiplier, "uncond_multiplier")
        if self.mask is not None and self.mask.ndim == 2:
            object.__setattr__(self, "mask", self.mask[None])


NO_OPTIONS = ControlOptions()


@dataclass(frozen=True)
class CallScales:
    """One model call's multipliers of a patch's control, one per row of h (all CFG chunks), and an
    optional mask per row: what a CONTROL_NET decides per call (Advanced-ControlNet's keyframes)."""

    strengths: tuple[float, ...]
    mask: torch.Tensor | None = None


def step_sigmas(transformer_options: dict) -> tuple[float, ...]:
    """This model call's sigmas as floats, read from the device once per call.

    The read waits for the GPU, so it happens before the UNet's kernels are queued: in the
    diffusion-model wrapper ``attach`` registers, or in ``get_control`` on the CONTROL_NET route
    (where ComfyUI's own ControlNets check their timestep range). The patch inside the UNet then
    finds the values and never waits.
    """
    sigmas = transformer_options["sigmas"]
    cached = transformer_options.get(STEP_SIGMAS)
    if cached is None or cached[0] is not sigmas:
        cached = (sigmas, tuple(sigmas.detach().float().cpu().tolist()))
        transformer_options[STEP_SIGMAS] = cached
    return cached[1]


def read_step_sigmas_early(transformer_options: dict) -> None:
    """Before the UNet: see ``step_sigmas`` (a call without sigmas, outside sampling, has none to read)."""
    if "sigmas" in transformer_options:
        step_sigmas(transformer_options)


def read_sigmas_before_the_unet(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """DIFFUSION_MODEL wrapper: see ``step_sigmas``."""
    read_step_sigmas_early(transformer_options)
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


class ControlNeXtPatch:
    """Encode the control once per step, cross-normalise it and add it at one UNet block: the glue
    between ComfyUI's transformer_options and the core's row plan (``controlnext_core.rows``).

    Immutable after construction apart from ``cache`` (an ``EncodingCache``), which never changes
    a result, so sharing the object between MODEL clones is safe.

    Strength is the file's scale x ``strength`` per CFG half (the uncond half x the options'
    multiplier), x the schedule at this step, x the options' strength of each latent / frame (x a
    CONTROL_NET's ``CallScales``). Rows whose strength is 0 are not encoded; at 0 for all rows the
    encoder does not run.

    ``refresh_every`` = k > 1 is an opt-in approximation: the unit control is encoded at the first
    evaluation of steps 0, k, 2k... of a sampling run and reused until the next (keyed by the run's
    schedule and the block of steps, so the result does not depend on earlier runs).
    """

    def __init__(self, controlnext: ControlNeXt, patcher, image: torch.Tensor, strength: float,
                 sigma_range: tuple[float, float], block: tuple[str, int], model_sampling,
                 options: ControlOptions = NO_OPTIONS, schedule: ResolvedSchedule | None = None,
                 cond_only: bool = False, frame_policy: str = "error", refresh_every: int = 1):
        if int(refresh_every) != refresh_every or refresh_every < 1:
            raise ControlNeXtError(f"refresh_every must be a whole number of steps, 1 or more; got {refresh_every}.")
        self.controlnext = controlnext
        self.patcher = patcher
        self.image = image
        self.mask = options.mask
        self.latent_strengths = options.latent_strengths
        self.schedule = schedule
        cond, uncond = controlnext.gains(strength, cond_only)
        self.gains = (cond, uncond * options.uncond_multiplier)
        self.sigma_start, self.sigma_end = sigma_range
        self.block = block
        self.kind = PATCH_KIND[block[0]]
        self.model_sampling = model_sampling
        self.frame_policy = frame_policy
        self.refresh_every = int(refresh_every)
        self.unit = "frames" if controlnext.family == "svd" else "latents"
        self.cache = EncodingCache()

    def __deepcopy__(self, memo):
        return self

    def to(self, device_or_dtype):
        """ComfyUI moves patches with the model (load, detach): the cached controls are dropped so
        none stays on a device the model left. The encoder's ModelPatcher moves the weights."""
        if isinstance(device_or_dtype, torch.device):
            self.cache.clear()
        return self

    def models(self):
        return [self.patcher]

    def inject(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if transformer_options.get("block") != self.block:
            return h
        sigma_values = step_sigmas(transformer_options)
        if not self.sigma_end <= sigma_values[0] <= self.sigma_start:
            return h
        over_time = self._strength_over_time(sigma_values[0], transformer_options)
        chunks = tuple(transformer_options.get("cond_or_uncond") or [0])
        if not controls_any_chunk(self.gains, chunks, over_time):
            return h
        layout = call_layout(transformer_options, chunks, h.shape[0] // len(chunks))
        call = transformer_options.get(CALL_SCALES, {}).get(id(self))
        plan = plan_rows(layout, self.gains, over_time, self.latent_strengths, self.unit,
                         None if call is None else call.strengths)
        if not plan.active:
            return h
        unit = self._unit_control(h, layout, plan.active, transformer_options)
        mask = row_masks(self.mask, layout, self.unit)
        reference = self._block_input(h, transformer_options)
        out = add_planned_control(h, unit, self.controlnext.rule, plan, mask, None if call is None else call.mask,
                                  statistics_of=reference)
        if self._shares_its_block(transformer_options):
            transformer_options[BLOCK_INPUT] = (out, reference)
        return out

    def _strength_over_time(self, sigma: float, transformer_options: dict) -> float:
        """The schedule's multiplier at this step (1 without a schedule)."""
        if self.schedule is None:
            return 1.0
        run = self._run_sigmas(transformer_options) if self.schedule.schedule.step_strengths is not None else None
        return self.schedule.strength(sigma, run)

    def _block_input(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        """The UNet's own hidden state at this block: h, or what h was before another ControlNeXt added to it."""
        record = transformer_options.get(BLOCK_INPUT)
        return record[1] if record is not None and record[0] is h else h

    def _shares_its_block(self, transformer_options: dict) -> bool:
        """Whether another ControlNeXt acts at this block after this one (then it needs ``BLOCK_INPUT``)."""
        patches = transformer_options.get("patches", {}).get(self.kind, [])
        later = patches[next((i for i, p in enumerate(patches) if p is self), len(patches)) + 1:]
        return any(isinstance(p, ControlNeXtPatch) and p.block == self.block for p in later)

    def _run_sigmas(self, transformer_options) -> tuple[float, ...] | None:
        """The sampling run's sigmas (``sample_sigmas``); None outside ComfyUI's sampling."""
        sample_sigmas = transformer_options.get("sample_sigmas")
        return None if sample_sigmas is None else self.cache.run_sigmas(sample_sigmas)

    def _unit_control(self, h: torch.Tensor, layout: CallLayout, active: tuple[int, ...],
                      transformer_options: dict) -> torch.Tensor:
        """The unit control of each row: cached, or encoded from the rows' images fitted to the latent."""
        rows = layout.rows
        sigmas, sigma_values = transformer_options["sigmas"], step_sigmas(transformer_options)
        if len(sigma_values) != rows:
            sigmas, sigma_values = sigmas[:1].expand(rows), sigma_values[:1] * rows
        size = tuple(h.shape[-2:])
        latent_size = tuple(transformer_options["original_shape"][-2:])
        shared = self.image.shape[0] == 1 and len(set(sigma_values)) == 1  # one encoding serves every row
        subset = None if shared or len(active) == rows else active
        inputs = (size, latent_size, rows, layout.frames, subset, h.device, h.dtype)
        block = self._refresh_block(transformer_options, sigma_values[0])
        unit = self.cache.find(sigma_values, inputs, block)
        if unit is not None:
            return unit
        images = row_images(self.image, layout, self.unit, self.frame_policy)
        image = fit_control(images, latent_size[0] * LATENT_SCALE, latent_size[1] * LATENT_SCALE).to(h.device)
        timesteps = self.model_sampling.timestep(sigmas).float()
        unit = encode_rows(self.controlnext, image, timesteps[:1] if shared else timesteps, size, h.dtype, rows, subset)
        self.cache.store(sigma_values, inputs, block, unit)
        return unit

    def _refresh_block(self, transformer_options, sigma: float) -> tuple | None:
        """Refresh mode: the block of ``refresh_every`` steps ``sigma`` falls in (``refresh_block``);
        None in the exact mode, or when ComfyUI gives no schedule."""
        if self.refresh_every == 1:
            return None
        run = self._run_sigmas(transformer_options)
        return None if run is None else refresh_block(run, sigma, self.refresh_every)


def call_layout(transformer_options: dict, chunks: tuple[int, ...], rows: int) -> CallLayout:
    """This call's batch layout, from ComfyUI's options: the video frame of each row under a window
    (ours: first frame swapped for the video's first, as the official pipeline does; or ComfyUI's
    context windows: a plain slice), and the latents in the batch or the frames of the whole video
    (None when ComfyUI's window does not say)."""
    frames = transformer_options.get(WINDOW_CONTROL_FRAMES)
    window = transformer_options.get("context_window")
    if frames is None and window is not None:
        frames = window.index_list
    frames = None if frames is None else tuple(int(f) for f in frames)
    if VIDEO_FRAMES in transformer_options:
        total = transformer_options[VIDEO_FRAMES]
    elif frames is None:
        total = rows
    else:
        total = getattr(window, "total_frames", 0) or None
    return CallLayout(chunks, rows, frames, total)


class InputBlockPatch(ControlNeXtPatch):
    def __call__(self, h, transformer_options):
        return self.inject(h, transformer_options)


class OutputBlockPatch(ControlNeXtPatch):
    def __call__(self, h, hsp, transformer_options):
        return self.inject(h, transformer_options), hsp


def make_patch(file: ControlNeXtFile, base_model, model_sampling, image: torch.Tensor, strength: float,
               percent_range: tuple[float, float], options: ControlOptions = NO_OPTIONS,
               cond_only: bool = False, frame_policy: str = "error", refresh_every: int = 1) -> ControlNeXtPatch:
    """Bind ``file`` to ``base_model``'s family and build the patch for its injection block.

    Raises ControlNeXtError, before any sampling, when the file cannot serve the model. Percents
    become sigmas here, once, for both routes: start/end and the schedule's keyframes.
    ``refresh_every`` > 1 (opt-in, approximate) re-encodes the control only every that many
    sampling steps and reuses it in between; 1 (the default) is exact.
    """
    controlnext = file.bind(base_model)
    unet = base_model.diffusion_model
    block = injection_block(controlnext.rule, list(unet.num_res_blocks))
    channels = injection_channels(controlnext.rule, unet.model_channels, list(unet.channel_mult))
    if channels != file.encoder.config.out_channels:
        raise ControlNeXtError(
            f"'{file.name}' outputs {file.encoder.config.out_channels} channels but this "
            f"{model_type_name(base_model)} UNet has {channels} at block {block}: it is not the architecture "
            f"ControlNeXt {FAMILY_NAMES[controlnext.family]} releases are made for.")
    patch_class = OutputBlockPatch if block[0] == "output" else InputBlockPatch
    sigma_range = (model_sampling.percent_to_sigma(percent_range[0]), model_sampling.percent_to_sigma(percent_range[1]))
    schedule = None
    if options.schedule is not None and not options.schedule.is_constant:
        schedule = resolve(options.schedule, model_sampling.percent_to_sigma)
    return patch_class(controlnext, file.patcher, image, strength, sigma_range, block, model_sampling, options,
                       schedule, cond_only, frame_policy, refresh_every)


def check_percent_range(start_percent: float, end_percent: float) -> None:
    if start_percent > end_percent:
        raise ControlNeXtError(
            f"start_percent ({start_percent}) is after end_percent ({end_percent}): control would never act. "
            f"Make start_percent <= end_percent.")


def attach(model, patch: ControlNeXtPatch):
    """A clone of ``model`` with ``patch`` registered at its hook; the input MODEL is untouched."""
    patched = model.clone()
    if patch.kind == "output_block_patch":
        patched.set_model_output_block_patch(patch)
    else:
        patched.set_model_input_block_patch_after_skip(patch)
    wrapper_type = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    if read_sigmas_before_the_unet not in patched.get_wrappers(wrapper_type, WRAPPER_KEY):  # once when stacked
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, read_sigmas_before_the_unet)
    return patched


def control_image_from_comfy(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [N,H,W,C] -> [N,3,H,W] float in [0,1]; grey and RGBA are converted."""
    if image.ndim != 4 or image.shape[0] == 0:
        raise ControlNeXtError(f"The control image must be an IMAGE batch [N,H,W,C] with N >= 1; got shape {list(image.shape)}.")
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, -1, 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ControlNeXtError(f"The control image has {channels} channels; give an RGB, RGBA or grey IMAGE.")
    return image.movedim(-1, 1).float().clamp(0.0, 1.0).contiguous()


class ControlNeXtControlNet(comfy.controlnet.ControlBase):
    """A CONTROL_NET for ComfyUI's own Apply ControlNet nodes: it installs the same patch as
    Apply ControlNeXt into each model call's transformer_options, so it stacks with other
    ControlNets and follows per-conditioning control. ``options``: what ControlNeXt ControlNet
    Options set (schedule, per-latent strengths, mask, uncond multiplier)."""

    def __init__(self, file: ControlNeXtFile, options: ControlOptions = NO_OPTIONS):
        super().__init__()
        self.file = file
        self.options = options
        self.patch: ControlNeXtPatch | None = None

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        check_percent_range(*self.timestep_percent_range)  # ComfyUI's Apply ControlNet nodes allow start > end
        image = control_image_from_comfy(self.cond_hint_original.movedim(1, -1))
        self.patch = make_patch(self.file, model, model.model_sampling, image, self.strength,
                                self.timestep_percent_range, self.options)

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        self.install_patch(transformer_options)
        return control_prev

    def install_patch(self, transformer_options: dict, scales: CallScales | None = None) -> None:
        """Puts the patch into this model call's options (a per-call dict), with this call's ``scales``."""
        if self.patch is None:
            return
        read_step_sigmas_early(transformer_options)
        patches = dict(transformer_options.get("patches", {}))
        patches[self.patch.kind] = list(patches.get(self.patch.kind, [])) + [self.patch]
        transformer_options["patches"] = patches
        if scales is not None:
            transformer_options[CALL_SCALES] = {**transformer_options.get(CALL_SCALES, {}), id(self.patch): scales}

    def with_options(self, options: ControlOptions) -> "ControlNeXtControlNet":
        c = self.copy()
        c.options = options
        return c

    def get_models(self):
        return super().get_models() + [self.file.patcher]

    def copy(self):
        return self._copy_with(self.file)

    def _copy_with(self, file: ControlNeXtFile) -> "ControlNeXtControlNet":
        c = type(self)(file, self.options)
        self.copy_to(c)
        return c

    def deepclone_multigpu(self, load_device, autoregister=False):
        """ComfyUI's multi-GPU sampling (v0.33+): a copy whose encoder is its own, on ``load_device``;
        ``autoregister`` files it among this ControlNet's per-device clones, as ComfyUI's ControlNet does."""
        c = self._copy_with(self.file.for_device(load_device))
        if autoregister:
            self.multigpu_clones[load_device] = c
        return c

    def cleanup(self):
        self.patch = None
        super().cleanup()
