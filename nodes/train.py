"""Training nodes: train a ControlNeXt on a MODEL from latents, captions and control images, save it
as a release (core: controlnext_core.train), and load a folder of pictures with their captions.

ComfyUI runs nodes under ``torch.inference_mode``; training runs inside ``inference_mode(False)``
on a clone of the MODEL, whose ModelPatcher carries the trained weights as weight wrappers (as
ComfyUI's own Train LoRA does) and loads it under ComfyUI's memory management.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError, injection_block, rule_for
from ..controlnext_core.checkpoints import checkpoint_folders, latest_checkpoint, resume, save_checkpoint
from ..controlnext_core.dataset import load_training_pair, read_items
from ..controlnext_core.train import (EMPTY_PROMPT, OPTIMIZERS, RECIPES, TRAIN_LAYOUT, Trainer,
                                      TrainingSettings, loss_summary, new_encoder, noise_schedule,
                                      release_metadata, release_unet_weights, save_release, trainable_copy,
                                      trainable_unet_names)
from ..controlnext_core.processes import Processes
from ..controlnext_core.training_loop import LoopHooks, run_training
from ..controlnext_core.unet_weights import OFFICIAL_MODE
from .loaders import CATEGORY, FOLDER, ControlNeXtType, patch_unet_weights_from
from .patch import (LATENT_SCALE, NO_OPTIONS, PATCH_KIND, ControlNeXtFile, attach, control_image_from_comfy, make_patch,
                    model_family, model_type_name)
from .train_data import (InMemoryPictures, LoadTrainingData, TrainingDataType, cached_pictures, encode_text, input_subfolder,
                         input_subfolders)
from .unet_keys import diffusers_map

log = logging.getLogger("ControlNeXt")
TRAIN_CATEGORY = f"{CATEGORY}/training"
LossMapType = io.Custom("LOSS_MAP")  # ComfyUI's own Plot Loss Graph takes it
UNET_CHOICES = ("official subset", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OFFICIAL = "official"  # the optimizer choice that takes the whole official recipe
RESUME_CHOICES = ("no", "latest", "latest, new settings")
CHECKPOINTS_KEPT = 3
CACHE_WAIT_S = 24 * 3600.0  # how long the other processes wait for the one building the cache


class TrainedControlNeXt(ControlNeXtFile):
    """A CONTROLNEXT made by Train ControlNeXt: Apply ControlNeXt takes it like a loaded file, and
    Save ControlNeXt writes it with the UNet weights it was trained with."""

    def __init__(self, name: str, encoder, unet_file_weights: dict[str, torch.Tensor], metadata: dict[str, str],
                 release: str = ""):
        super().__init__(name, encoder, metadata)
        self.unet_file_weights = unet_file_weights
        self.release = release  # the release folder its run's checkpoints refreshed: Save may write it again


def diffusers_names(model) -> dict[str, str]:
    """This UNet's parameter names (without "diffusion_model.") -> the diffusers names releases use;
    a name diffusers has no counterpart for keeps its own (the UNet loaders read both)."""
    names = {name: name for name, _ in model.model.diffusion_model.named_parameters()}
    return names | {ldm: diffusers for diffusers, ldm in diffusers_map(model).items() if ldm in names}


class TrainingPatch:
    """Adds the control at the family's block during training (the inference patch's maths, with
    gradients and no caches)."""

    def __init__(self, block: tuple[str, int]):
        self.block = block
        self.inject = None

    def __call__(self, h, *rest):
        transformer_options = rest[-1]
        if transformer_options.get("block") == self.block and self.inject is not None:
            h = self.inject(h)
        return (h, rest[0]) if len(rest) == 2 else h


class MasterWeight:
    """A weight wrapper: the layer computes with the trainer's fp32 master of this weight (inside its
    forward, so a checkpointed layer's recomputation reads it too)."""

    def __init__(self, masters: dict[str, torch.nn.Parameter], name: str):
        self.masters, self.name = masters, name

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.masters[self.name].to(weight.dtype)


def computed_from_a_copy(weight: torch.Tensor) -> torch.Tensor:
    """A weight wrapper that changes nothing: a layer with one casts a copy of its weight per call,
    and outside inference mode that copy (unlike a weight loaded under ComfyUI's inference mode)
    can be saved for the backward pass."""
    return weight


class MasteredModule(torch.nn.Module):
    """An object patch for a UNet module whose parameters ComfyUI's weight wrappers cannot reach (SVD's
    AlphaBlender mix factors): each call runs the module with the trainer's master of a trained
    parameter, and with a plain copy of a frozen one loaded under inference mode (which autograd could
    not keep). It shares the module's parameter table, so the parameters keep their names and
    ComfyUI's weight patches (a merge, a LoRA) still find them."""

    def __init__(self, module: torch.nn.Module, masters: dict[str, torch.nn.Parameter], names: dict[str, str]):
        super().__init__()
        object.__setattr__(self, "original", module)  # not a submodule: its parameters are listed once
        self._parameters = module._parameters
        self.masters, self.names = masters, names  # parameter kind -> its name in the UNet

    def forward(self, *args, **kwargs):
        values = {}
        for kind, name in self.names.items():
            own = self._parameters[kind]
            if name in self.masters:
                values[kind] = self.masters[name].to(own.dtype)
            elif own.is_inference():
                values[kind] = own.clone()
        return torch.func.functional_call(self.original, values, args, kwargs)


class ComfyDenoiser:
    """The MODEL's UNet as ``controlnext_core.train.Denoiser``: raw DDPM inputs and integer timesteps
    (as the official scripts feed diffusers' UNet). It works on a clone of the MODEL: the training
    patch, the weight wrappers and the object patches live on the clone's ModelPatcher, which ComfyUI
    loads (making room for it) and unloads, so the MODEL given is never changed."""

    def __init__(self, model, family: str, trained_names: list[str]):
        self.patcher, self.trained_names = model.clone(), list(trained_names)
        rule = rule_for(family, TRAIN_LAYOUT)
        self.patch = TrainingPatch(injection_block(rule, list(model.model.diffusion_model.num_res_blocks)))
        self.patcher.set_model_patch(self.patch, PATCH_KIND[self.patch.block[0]])
        self.masters: dict[str, torch.nn.Parameter] = {}
        trained, layers = set(trained_names), dict(model.model.diffusion_model.named_modules())
        unreachable: dict[str, dict[str, str]] = {}  # layer -> {parameter kind: name}, outside ComfyUI's ops
        for name, tensor in model.model.diffusion_model.named_parameters():
            layer_name, kind = name.rsplit(".", 1)
            if not (tensor.is_inference() or name in trained):
                continue
            if not hasattr(layers[layer_name], f"{kind}_function"):
                unreachable.setdefault(layer_name, {})[kind] = name
            elif name in trained:
                self.patcher.add_weight_wrapper(f"diffusion_model.{name}", MasterWeight(self.masters, name))
            else:
                self.patcher.add_weight_wrapper(f"diffusion_model.{name}", computed_from_a_copy)
        for layer_name, names in unreachable.items():
            self.patcher.add_object_patch(f"diffusion_model.{layer_name}",
                                          MasteredModule(layers[layer_name], self.masters, names))
        self.unet = self.patcher.model.diffusion_model
        self.dtype = self.patcher.model.manual_cast_dtype or self.patcher.model.get_dtype()

    @contextlib.contextmanager
    def loaded(self, use_checkpointing: bool):
        """The clone loaded as ComfyUI's own trainer loads its model (other models make room), with
        the UNet's own weights frozen and, optionally, gradient checkpointing."""
        self.load()
        try:
            with frozen(self.unet), gradient_checkpointing(self.unet, use_checkpointing):
                yield self
        finally:
            self.unload()

    def load(self) -> None:
        comfy.model_management.load_models_gpu([self.patcher], memory_required=1e20, force_full_load=True)

    def unload(self) -> None:
        """The clone out of ComfyUI's loaded models (its object patches undone), its weight wrappers off
        the shared UNet's layers: nothing of the run (the trainer's masters) stays in the MODEL's modules."""
        loaded = comfy.model_management.current_loaded_models
        for index in reversed(range(len(loaded))):
            if loaded[index].model is self.patcher:
                loaded.pop(index).model_unload()
        # a full load's unpatch leaves the weight functions on the layers until the next load: take ours off
        for layer in self.unet.modules():
            for attribute in ("weight_function", "bias_function"):
                functions = layer.__dict__.get(attribute)
                if functions:
                    setattr(layer, attribute, [function for function in functions
                                               if not isinstance(function, MasterWeight)
                                               and function is not computed_from_a_copy])

    def unet_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The loaded UNet's weights of these names (with the MODEL's own patches, e.g. a LoRA)."""
        state = dict(self.unet.named_parameters())
        return {name: state[name] for name in names}

    def train_through(self, unet_parameters: dict[str, torch.nn.Parameter]) -> None:
        self.masters.update(unet_parameters)

    def run_unet(self, inject, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """The UNet on the clone's transformer options, with ``inject`` at the training patch's block.
        Another model loaded since (a validation sampler, a VAE or CLIP vision encode that needed the
        room) may have unloaded the clone, and its patches with it: it goes back in first."""
        if not any(loaded.model is self.patcher for loaded in comfy.model_management.current_loaded_models):
            self.load()
        self.patch.inject = inject
        try:
            return self.unet(x.to(self.dtype), timesteps.float(), context=context.to(x.device, self.dtype),
                             y=None if y is None else y.to(x.device, self.dtype),
                             transformer_options=dict(self.patcher.model_options["transformer_options"]), **kwargs)
        finally:
            self.patch.inject = None

    def __call__(self, noisy, timesteps, conditioning, inject):
        context, y = conditioning
        return self.run_unet(inject, noisy, timesteps, context, y)


def training_objective(model) -> tuple[str, torch.Tensor]:
    """(prediction type, alphas_cumprod) from the MODEL's own sampling object, so a model patched by
    ComfyUI's ModelSamplingDiscrete (v_prediction, zsnr) trains the way it samples."""
    sampling = model.get_model_object("model_sampling")
    kinds = comfy.model_sampling
    if (not isinstance(sampling, kinds.ModelSamplingDiscrete) or isinstance(sampling, (kinds.EDM, kinds.X0))
            or not isinstance(sampling, kinds.EPS)):
        raise ControlNeXtError(
            f"This model samples as {type(sampling).__name__} ({', '.join(c.__name__ for c in type(sampling).__mro__[1:3])}); "
            f"ControlNeXt trains models with discrete timesteps that predict the noise (eps) or v, as SD1.5 and "
            f"SDXL checkpoints do. Remove a ModelSampling node that sets another type before Train ControlNeXt.")
    prediction = "v_prediction" if isinstance(sampling, kinds.V_PREDICTION) else "epsilon"
    return prediction, noise_schedule(sampling.sigmas)


def check_conditioning(model, family: str, conditionings: list, what: str) -> None:
    """Captions encoded by another model's CLIP fail deep inside the UNet: say so before training."""
    config = model.model.model_config.unet_config
    width = config.get("context_dim")
    pooled_width = config.get("adm_in_channels", 0) - 6 * 256 if family == "sdxl" else None  # SDXL's y: pooled + 6 time ids
    for index, (cond, extra) in enumerate(conditionings):
        if width is not None and cond.shape[-1] != width:
            raise ControlNeXtError(
                f"The {what} {index} is {cond.shape[-1]} wide but this {model_type_name(model.model)} model takes "
                f"{width}: encode the captions with this checkpoint's CLIP (the CLIP output of its loader).")
        if pooled_width is not None:
            pooled = extra.get("pooled_output")
            if pooled is None or pooled.shape[-1] != pooled_width:
                raise ControlNeXtError(
                    f"SDXL training needs the pooled text embedding ({pooled_width} wide) in each conditioning; the "
                    f"{what} {index} has {'none' if pooled is None else pooled.shape[-1]}: encode the captions with "
                    f"an SDXL checkpoint's CLIP (CLIP Text Encode does).")


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No gradient for the module's own weights while training (only the trainer's parameters get
    one); each weight's flag is put back afterwards."""
    asking = [param for param in module.parameters() if param.requires_grad]
    for param in asking:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in asking:
            with torch.inference_mode(param.is_inference()):  # where torch allows an inference tensor the flag
                param.requires_grad_(True)


@contextlib.contextmanager
def gradient_checkpointing(unet, enabled: bool):
    """Recompute each UNet layer in the backward pass instead of keeping its activations."""
    layers = [layer for blocks in (unet.input_blocks, [unet.middle_block], unet.output_blocks)
              for block in blocks for layer in block] if enabled else []
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _autocast_dtype(precision: str, model) -> torch.dtype | None:
    if precision == "auto":
        dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        return None if dtype == torch.float32 else dtype
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def training_family(model) -> str:
    family = model_family(model.model)
    if family not in ("sd15", "sdxl"):
        raise ControlNeXtError(
            f"Train ControlNeXt trains on SD1.5 and SDXL models (the official SD1.5 and SDXL training code); "
            f"this is a {model_type_name(model.model)} model.")
    return family


def check_training_inputs(model, latents: torch.Tensor, images: torch.Tensor, positive: list) -> None:
    family = training_family(model)
    if latents.ndim != 4:
        raise ControlNeXtError(f"The training latents must be an image LATENT batch [N,4,h,w]; got {list(latents.shape)}.")
    if images.shape[0] != latents.shape[0]:
        raise ControlNeXtError(
            f"{images.shape[0]} control images for {latents.shape[0]} training latents: give one control image per "
            f"latent, in the same order (make them from the same pictures).")
    if len(positive) not in (1, latents.shape[0]):
        raise ControlNeXtError(
            f"{len(positive)} conditionings for {latents.shape[0]} latents: give one (used for every picture) or "
            f"one per latent (a caption each).")
    check_conditioning(model, family, positive, "conditioning")


def control_scale_for(control_scale: float, controlnext) -> tuple[float, str]:
    """The scale to train at and what to say about it: 0 means the continued file's own scale (1.0
    for a new encoder), so continuing a file at the defaults never changes its scale."""
    if controlnext is None:
        return (control_scale or 1.0), ""
    own = controlnext.encoder.control_scale
    if not control_scale or control_scale == own:
        return own, f"Continued at the file's control scale {own:g}."
    return control_scale, f"The control scale changed from the file's {own:g} to {control_scale:g}, as set."


def recipe_text(settings: TrainingSettings) -> str:
    clipping = f", gradients clipped at {settings.max_grad_norm:g}" if settings.max_grad_norm else ""
    return (f"{settings.optimizer}, lr encoder {settings.encoder_lr:g} / UNet {settings.unet_lr:g}, "
            f"{settings.warmup_steps} warm-up steps{clipping}")


def _official(family: str) -> str:
    recipe = RECIPES[family]
    clipping = f", clipping at {recipe.max_grad_norm:g}" if recipe.max_grad_norm else ""
    return (f"{recipe.optimizer}, encoder {recipe.encoder_lr:g}, UNet {recipe.unet_lr:g}, {recipe.warmup_steps} "
            f"warm-up steps{clipping}")


def base_model_name(prompt: dict | None, node_id, model) -> str:
    """The checkpoint the trained MODEL came from, followed up the graph's model links (a loader's
    ckpt_name / unet_name); the model type where the graph does not say."""
    node = (prompt or {}).get(str(node_id))
    for _ in range(len(prompt or {})):
        link = (node or {}).get("inputs", {}).get("model")
        if not isinstance(link, list) or str(link[0]) not in prompt:
            break
        node = prompt[str(link[0])]
        for key in ("ckpt_name", "unet_name"):
            if isinstance(node.get("inputs", {}).get(key), str):
                return node["inputs"][key]
    return model_type_name(model.model)


class TrainControlNeXt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtTrain",
            display_name="Train ControlNeXt",
            category=TRAIN_CATEGORY,
            description="Trains a ControlNeXt encoder (and, as the official scripts do, the UNet's attention "
                        "outputs) on your pictures and their control images. Cancel stops and keeps what was trained: "
                        "the nodes after it (Save ControlNeXt) still run.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SDXL model to train for (a fine-tune works; its "
                                                "prediction type, eps or v, and noise schedule are used)."),
                io.Latent.Input("latents", optional=True,
                                tooltip="The training pictures, VAE-encoded (one latent per picture); or use data."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="The captions: one conditioning for all pictures, or one "
                                                          "per picture (Load Training Pictures gives one per picture)."),
                io.Image.Input("control_images", optional=True,
                               tooltip="One control image per picture (canny, depth, pose...), "
                                                         "the same size as the pictures; resized if not."),
                io.Int.Input("steps", default=400, min=1, max=100000,
                             tooltip="Optimiser steps. The paper reports convergence in about 400."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Pictures per step."),
                io.Float.Input("encoder_lr", default=1e-4, min=0.0, max=1.0, step=1e-6,
                               tooltip="Learning rate of the encoder (official examples: 1e-4). Not used with "
                                       "optimizer = official, which takes the recipe's own."),
                io.Float.Input("unet_lr", default=1e-5, min=0.0, max=1.0, step=1e-7,
                               tooltip="Learning rate of the trained UNet weights (official examples: 1e-5). Not "
                                       "used with optimizer = official, which takes the recipe's own."),
                io.Combo.Input("train_unet", options=list(UNET_CHOICES), default=UNET_CHOICES[0],
                               tooltip="official subset: SD1.5 every attention output (to_out), SDXL the "
                                       "cross-attention outputs (attn2 to_out), as the official scripts. "
                                       "none: the encoder only (works on any fine-tune without a UNet file)."),
                io.Combo.Input("optimizer", options=[OFFICIAL, *OPTIMIZERS], default=OFFICIAL,
                               tooltip=f"official: the whole recipe of the family's official script, whatever "
                                       f"encoder_lr, unet_lr and warmup_steps say (SD1.5: {_official('sd15')}; "
                                       f"SDXL: {_official('sdxl')}). adamw / adafactor: that optimiser with the "
                                       f"learning rates and warm-up set here (SDXL keeps its clipping at 1.0)."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                             tooltip="Linear learning-rate warm-up steps. Not used with optimizer = official (the "
                                     "SDXL recipe warms up over 500)."),
                io.Float.Input("control_scale", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="How strongly the control is added while training; saved in the file and "
                                       "applied when it is loaded (official SD1.5 examples: 0.35). 0: the scale of "
                                       "the file continued (controlnext input), or 1.0 for a new encoder."),
                io.Float.Input("proportion_empty_prompts", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of steps trained with an empty prompt so control works without "
                                       "a caption (official SDXL example: 0.2). Needs the clip input."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds a new encoder's weights, the noise, the timesteps, the order of the "
                                     "pictures and the empty prompts: the same seed and inputs train the same run."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Less memory for a little more time: recompute the UNet's activations "
                                         "in the backward pass."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="Compute precision of the UNet and encoder (trained weights stay fp32). "
                                       "auto: the model's own."),
                ControlNeXtType.Input("controlnext", optional=True,
                                      tooltip="Continue training this encoder (a \"base\" layout file) instead "
                                              "of starting a new one; it keeps its control scale unless "
                                              "control_scale is set."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Encodes the empty prompt for proportion_empty_prompts."),
                TrainingDataType.Input("data", optional=True,
                                       tooltip="Instead of latents, positive and control_images: a folder from Load "
                                               "Training Data, encoded once into its cache (needs vae and clip) and "
                                               "read from disk batch by batch."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the data's pictures into the cache."),
                io.Image.Input("validation_images", optional=True,
                               tooltip="Control images to sample with the current weights every validation_every "
                                       "steps (the same seed and noise each time; needs vae), shown on the node and "
                                       "saved under output/controlnext_validation/, with one strip of all of them at "
                                       "the end."),
                io.Conditioning.Input("validation_positive", optional=True,
                                      tooltip="The validation prompt: one for all validation images, or one each."),
                io.Conditioning.Input("validation_negative", optional=True,
                                      tooltip="The validation negative prompt (CFG 5); without it, CFG 1."),
                io.Int.Input("validation_every", default=100, min=1, max=100000, optional=True,
                             tooltip="Steps between validation samples (20 euler steps each)."),
                io.Int.Input("gradient_accumulation_steps", default=1, min=1, max=1024, optional=True,
                             tooltip="Batches computed one after the other per optimiser step: a step trains on "
                                     "batch_size x this many pictures for the memory of batch_size."),
                io.String.Input("checkpoint_name", default="", optional=True,
                                tooltip="A folder under models/controlnext: every checkpoint_every steps and on "
                                        "Cancel the whole training state goes to <name>/checkpoints/step-N (the "
                                        f"last {CHECKPOINTS_KEPT} kept) and the release files in <name>/ are "
                                        "refreshed, so the newest weights can be tried at once. Empty: nothing is "
                                        "written while training (Save ControlNeXt writes the result)."),
                io.Int.Input("checkpoint_every", default=100, min=1, max=100000, optional=True,
                             tooltip="Steps between checkpoints (with a checkpoint_name)."),
                io.Combo.Input("resume", options=list(RESUME_CHOICES), default=RESUME_CHOICES[0], optional=True,
                               tooltip="latest: continue the newest checkpoint of checkpoint_name exactly (the same "
                                       "weights as an uninterrupted run; steps may grow), or start there when it "
                                       "has none; a checkpoint of other settings or data is refused naming each "
                                       "difference. latest, new settings: take only its weights (and the optimiser "
                                       "state where it fits) and train with the settings given. no: a new run "
                                       "(refused where checkpoint_name already has checkpoints)."),
            ],
            outputs=[
                ControlNeXtType.Output(display_name="CONTROLNEXT", tooltip="For Apply ControlNeXt and Save ControlNeXt."),
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained UNet weights as patches."),
                LossMapType.Output(display_name="loss", tooltip="The loss of every step (Plot Loss Graph)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_name: str = "", resume: str = RESUME_CHOICES[0]) -> bool | str:
        return checkpoint_inputs_check(checkpoint_name, resume)

    @classmethod
    def execute(cls, model, steps: int, batch_size: int, encoder_lr: float, unet_lr: float, train_unet: str,
                optimizer: str, warmup_steps: int, control_scale: float, proportion_empty_prompts: float, seed: int,
                gradient_checkpointing: bool, precision: str, latents=None, positive=None, control_images=None,
                controlnext=None, clip=None, data=None, vae=None, gradient_accumulation_steps: int = 1,
                checkpoint_name: str = "", checkpoint_every: int = 100, resume: str = RESUME_CHOICES[0],
                validation_images=None, validation_positive=None, validation_negative=None,
                validation_every: int = 100) -> io.NodeOutput:
        inputs = {name: value for name, value in locals().items() if name != "cls"}
        node_id, prompt = getattr(cls.hidden, "unique_id", None), getattr(cls.hidden, "prompt", None)  # None outside a server
        check_saves_fed_by(prompt, node_id)
        return train_controlnext(**inputs, node_id=node_id, base_model=base_model_name(prompt, node_id, model))


def train_controlnext(model, steps: int, batch_size: int, encoder_lr: float, unet_lr: float, train_unet: str,
                      optimizer: str, warmup_steps: int, control_scale: float, proportion_empty_prompts: float,
                      seed: int, gradient_checkpointing: bool, precision: str, latents=None, positive=None,
                      control_images=None, controlnext=None, clip=None, data=None, vae=None,
                      gradient_accumulation_steps: int = 1, checkpoint_name: str = "", checkpoint_every: int = 100,
                      resume: str = RESUME_CHOICES[0], validation_images=None, validation_positive=None,
                      validation_negative=None, validation_every: int = 100, node_id=None,
                      base_model: str = "", release: str = "", checkpoints_kept: int = CHECKPOINTS_KEPT,
                      validation_folder: str = "", cache_wait_s: float = CACHE_WAIT_S,
                      hooks_class: type[ComfyHooks] | None = None) -> io.NodeOutput:
    """Train ControlNeXt's work, for the node and the headless command (controlnext_train): the inputs
    checked, the pictures read (encoded into their cache first for ``data``), the loop run over the
    processes this one was started with (one in a ComfyUI server).

    The node names its release by ``checkpoint_name`` (under models/controlnext) and samples into
    output/controlnext_validation; the command gives folders (``release``, ``validation_folder``).
    ``resume`` may also be a checkpoint folder. The processes that do not build the cache wait for it
    up to ``cache_wait_s``. ``hooks_class``: the command's own Cancel and progress (ComfyHooks: the
    server's)."""
    family = training_family(model)
    if proportion_empty_prompts > 0 and clip is None:
        raise ControlNeXtError("proportion_empty_prompts is above 0: connect the checkpoint's CLIP to the clip "
                               "input so the empty prompt can be encoded.")
    if controlnext is not None and controlnext.layout != TRAIN_LAYOUT:
        raise ControlNeXtError(
            f"'{controlnext.name}' has the layout of the SD1.5 releases, which the official training code does "
            f"not train; continue a \"base\" layout file (SDXL releases, or one trained here), or start a new "
            f"encoder.")
    device = comfy.model_management.get_torch_device()
    data_note = ""
    if data is not None:
        if vae is None or clip is None:
            raise ControlNeXtError("Training from data encodes its pictures and captions: connect the "
                                   "checkpoint's VAE to vae and its CLIP to clip.")
        check_conditioning(model, family, encode_text(clip, ""), "conditioning of this CLIP")
        with Processes.joined().writer_first(cache_wait_s, f"the training cache of {len(data.items)} pairs"):
            pictures, data_note = cached_pictures(data, model, vae, clip, family, node_id, device)
    else:
        if latents is None or positive is None or control_images is None:
            raise ControlNeXtError("Connect latents, positive and control_images (pictures in memory), or data "
                                   "(a folder from Load Training Data) with vae and clip.")
        samples, images = latents["samples"], control_image_from_comfy(control_images)
        check_training_inputs(model, samples, images, positive)
        with torch.inference_mode(False):  # tensors a backward pass may keep
            pictures = InMemoryPictures(model, family, samples, images, positive, device)
    scale, scale_note = control_scale_for(control_scale, controlnext)
    prediction, alphas_cumprod = training_objective(model)
    official = optimizer == OFFICIAL
    settings = TrainingSettings(
        family=family, steps=steps, batch_size=batch_size, encoder_lr=None if official else encoder_lr,
        unet_lr=None if official else unet_lr, train_unet=train_unet != "none",
        optimizer=None if official else optimizer, warmup_steps=None if official else warmup_steps,
        control_scale=scale, prediction=prediction, proportion_empty_prompts=proportion_empty_prompts,
        seed=seed, gradient_accumulation_steps=gradient_accumulation_steps).resolved()
    empty = encode_text(clip, EMPTY_PROMPT[family]) if proportion_empty_prompts > 0 else None
    if empty is not None:
        check_conditioning(model, family, empty, "empty prompt's conditioning")
    with torch.inference_mode(False):  # weights that can be trained (nodes run under inference mode)
        encoder = new_encoder(settings.seed) if controlnext is None else trainable_copy(controlnext.encoder)
    base_model = base_model or model_type_name(model.model)
    release = release or (release_folder(checkpoint_name) if checkpoint_name.strip() else "")
    plan = CheckpointPlan(release, checkpoint_every, resume, {"base_model": base_model, "data": pictures.digest},
                          base_model, diffusers_names(model), checkpoints_kept) if release else None
    validation = None
    if validation_images is not None:
        if validation_positive is None or vae is None:
            raise ControlNeXtError("Validation samples need validation_positive (their prompt) and the "
                                   "checkpoint's VAE (to decode them).")
        label = checkpoint_name.strip() or os.path.basename(release) or f"run-{node_id or 'local'}"
        validation = ValidationPlan(model, family, vae, validation_images, validation_positive,
                                    validation_negative, validation_every, seed, label,
                                    validation_folder or os.path.join(folder_paths.get_output_directory(),
                                                                      "controlnext_validation", label))
    run = train(model, family, pictures, empty, settings, encoder, gradient_checkpointing,
                _autocast_dtype(precision, model), alphas_cumprod, node_id, plan, validation, hooks_class or ComfyHooks)
    trained, patched = trained_outputs(model, family, run, base_model, plan)
    message = " ".join(part for part in (
        data_note, run.message, loss_summary(run.trainer.losses) + ".", f"{prediction} target; {recipe_text(settings)}.",
        scale_note) if part)
    ui = {"controlnext_info": [message]}
    if validation is not None and validation.rounds:
        ui["images"] = [validation.strip()]
        message += f" {validation.summary()}"
        ui["controlnext_info"] = [message]
    log.info("ControlNeXt training: %s", message)
    return io.NodeOutput(trained, patched, {"loss": list(run.trainer.losses)}, ui=ui)


def trained_outputs(model, family: str, run: "TrainingRun", base_model: str,
                    plan: "CheckpointPlan | None") -> tuple["TrainedControlNeXt", object]:
    """A training node's CONTROLNEXT (the finished encoder with its release's UNet weights) and the
    MODEL with those weights as patches (a clone where none were trained)."""
    trainer = run.trainer
    name = f"trained ControlNeXt ({family}, {trainer.steps_done} steps)"
    file_weights = release_file_weights(run.unet_file_weights, diffusers_names(model))
    metadata = release_metadata(family, trainer.settings.control_scale, trainer.steps_done, base_model)
    trained = TrainedControlNeXt(name, trainer.finish(), file_weights, metadata, plan.folder if plan else "")
    patched = (patch_unet_weights_from(model, file_weights, name, 1.0, OFFICIAL_MODE[family]) if file_weights
               else model.clone())
    return trained, patched


class CheckpointPlan:
    """Where and how often a run writes its checkpoints and refreshes its release, and how it starts."""

    def __init__(self, folder: str, every: int, resume: str, identity: dict[str, str], base_model: str,
                 diffusers: dict[str, str], keep: int = CHECKPOINTS_KEPT):
        self.folder = folder
        self.root = os.path.join(self.folder, "checkpoints")
        self.every, self.resume, self.identity, self.keep = every, resume, identity, keep
        self.base_model, self.diffusers = base_model, diffusers

    def start(self, trainer: Trainer) -> str:
        """Resumes the latest checkpoint, or the checkpoint folder ``resume`` names, where asked;
        returns what was done, in words."""
        if self.resume == RESUME_CHOICES[0]:
            return ""
        if self.resume not in RESUME_CHOICES:
            return resume(self.resume, trainer, self.identity)
        latest = latest_checkpoint(self.root)
        if latest is None:
            return f"No checkpoint in {self.root} yet: started a new run."
        return resume(latest, trainer, self.identity, new_settings=self.resume == RESUME_CHOICES[2])

    def write(self, trainer: Trainer, base_weights: dict[str, torch.Tensor]) -> str:
        """A checkpoint, then the release files refreshed with the same weights."""
        folder = save_checkpoint(self.root, trainer, self.identity, keep=self.keep)
        settings = trainer.settings
        unet_file = release_file_weights(release_unet_weights(trainer.trained_unet(), base_weights, settings.family),
                                         self.diffusers)
        save_release(self.folder, trainer.encoder, unet_file,
                     release_metadata(settings.family, settings.control_scale, trainer.steps_done, self.base_model),
                     overwrite=True)
        return folder


def release_file_weights(unet_weights: dict[str, torch.Tensor], diffusers: dict[str, str]) -> dict[str, torch.Tensor]:
    """The release's UNet file under the diffusers names releases use."""
    return {diffusers[name]: value for name, value in unet_weights.items()}


VALIDATION_STEPS, VALIDATION_CFG = 20, 5.0


class ValidationPlan:
    """Samples of fixed controls with the weights of the moment, every N steps (the official scripts'
    --validation_image / --validation_prompt / --validation_steps), through ComfyUI's sampler and the
    same patch as Apply ControlNeXt; the same seed and noise each time, so the pictures show what
    training changed."""

    def __init__(self, model, family: str, vae, images: torch.Tensor, positive: list, negative: list | None,
                 every: int, seed: int, label: str, folder: str):
        self.model, self.family, self.vae, self.every = model, family, vae, every
        self.controls = control_image_from_comfy(images)
        self.positive, self.negative = positive, negative if negative is not None else positive
        self.cfg = VALIDATION_CFG if negative is not None else 1.0
        count, height, width = images.shape[0], images.shape[1] // LATENT_SCALE, images.shape[2] // LATENT_SCALE
        self.seed = seed
        self.noise = torch.randn((count, 4, height, width), generator=torch.Generator().manual_seed(seed))
        self.folder, self.label = folder, label
        self.rounds: list[tuple[int, torch.Tensor]] = []
        self.seconds = 0.0

    def sample(self, trainer: Trainer, base_weights: dict[str, torch.Tensor], denoiser: "ComfyDenoiser") -> None:
        started = time.perf_counter()
        settings = trainer.settings
        encoder = trainable_copy(trainer.encoder).eval().requires_grad_(False)
        encoder.control_scale = settings.control_scale
        metadata = release_metadata(settings.family, settings.control_scale, trainer.steps_done, self.label)
        file = TrainedControlNeXt(f"validation at step {trainer.steps_done}", encoder, {}, metadata)
        unet_file = release_file_weights(release_unet_weights(trainer.trained_unet(), base_weights, self.family),
                                         diffusers_names(self.model))
        model = (patch_unet_weights_from(self.model, unet_file, file.name, 1.0, OFFICIAL_MODE[self.family])
                 if unet_file else self.model)
        patch = make_patch(file, model.model, model.get_model_object("model_sampling"), self.controls, 1.0,
                           (0.0, 1.0), NO_OPTIONS)
        with torch.no_grad():
            latents = comfy.sample.sample(attach(model, patch), self.noise, VALIDATION_STEPS, self.cfg, "euler",
                                          "normal", self.positive, self.negative, torch.zeros_like(self.noise),
                                          seed=self.seed, disable_pbar=True)
            pictures = self.vae.decode(latents).clamp(0, 1).cpu()
        self.rounds.append((trainer.steps_done, pictures))
        for index, picture in enumerate(pictures):
            self._save(picture, f"step-{trainer.steps_done:06d}_{index}.png")
        # the sampler loaded the validation model: the training clone goes back in, with its weight wrappers
        denoiser.load()
        self.seconds += time.perf_counter() - started

    def strip(self) -> dict:
        """All rounds side by side (a row per validation image), saved; the node's preview of it."""
        rows = [torch.cat([pictures[index] for _, pictures in self.rounds], dim=1)
                for index in range(self.rounds[0][1].shape[0])]
        return self._save(torch.cat(rows, dim=0), "strip.png")

    def summary(self) -> str:
        steps = ", ".join(str(step) for step, _ in self.rounds)
        return (f"Validation samples at steps {steps} ({self.seconds / len(self.rounds):.1f} s each) in "
                f"{self.folder}.")

    def _save(self, picture: torch.Tensor, name: str) -> dict:
        from PIL import Image

        os.makedirs(self.folder, exist_ok=True)
        Image.fromarray((picture.numpy() * 255).round().astype("uint8")).save(os.path.join(self.folder, name))
        subfolder = os.path.relpath(self.folder, folder_paths.get_output_directory())
        return {"filename": name, "subfolder": subfolder, "type": "output"}


class TrainingRun:
    """What ``train`` leaves: the trainer (weights, losses), the release's UNet file weights by the
    UNet's own names, and how the run ended."""

    def __init__(self, trainer: Trainer, unet_file_weights: dict[str, torch.Tensor], message: str):
        self.trainer, self.unet_file_weights, self.message = trainer, unet_file_weights, message


def cancelled(progress, done: int, total: int) -> bool:
    """Moves the progress bar and says whether the user pressed Cancel. In a server ComfyUI's
    progress hook raises on a Cancel: caught here (the flag is then cleared, as ComfyUI clears it),
    so the run ends with what was trained and the nodes after it still run."""
    try:
        progress.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()
    except comfy.model_management.InterruptProcessingException:
        return True
    return False


class ComfyHooks(LoopHooks):
    """The loop's hooks in ComfyUI: the progress bar with the loss, Cancel (checked between steps and
    raised by ComfyUI inside layers and samplers), checkpoints and validation samples."""

    cancel_errors = (comfy.model_management.InterruptProcessingException,)

    def __init__(self, node_id, steps: int, base_weights: dict[str, torch.Tensor], denoiser: "ComfyDenoiser",
                 plan: CheckpointPlan | None, validation: ValidationPlan | None):
        self.node_id, self.base_weights, self.denoiser = node_id, base_weights, denoiser
        self.plan, self.validation = plan, validation
        self.progress = comfy.utils.ProgressBar(steps, node_id=node_id)
        self.checkpoint_every = plan.every if plan else 0
        self.validation_every = validation.every if validation else 0

    def cancel_requested(self, steps_done: int, steps: int) -> bool:
        return cancelled(self.progress, steps_done, steps)

    def stepped(self, trainer: Trainer, loss: float) -> None:
        _progress_text(f"step {trainer.steps_done}/{trainer.settings.steps}  loss {loss:.4f}", self.node_id)

    def checkpoint(self, trainer: Trainer) -> str:
        return self.plan.write(trainer, self.base_weights)

    def validate(self, trainer: Trainer) -> None:
        self.validation.sample(trainer, self.base_weights, self.denoiser)


def train(model, family: str, pictures, empty: list | None, settings: TrainingSettings, encoder,
          use_checkpointing: bool, autocast_dtype, alphas_cumprod: torch.Tensor | None, node_id,
          plan: CheckpointPlan | None = None, validation: ValidationPlan | None = None,
          hooks_class: type[ComfyHooks] = ComfyHooks) -> TrainingRun:
    """SD1.5 / SDXL training on the MODEL's clone (``train_on_clone``)."""
    with torch.inference_mode(False):
        names = (trainable_unet_names([name for name, _ in model.model.diffusion_model.named_parameters()], family)
                 if settings.train_unet else [])
        denoiser = ComfyDenoiser(model, family, names)
    device = comfy.model_management.get_torch_device()
    return train_on_clone(
        denoiser, lambda base: Trainer(encoder, base, settings, device, alphas_cumprod, Processes.joined()), pictures,
        empty, settings, use_checkpointing, autocast_dtype, node_id, plan, validation, hooks_class)


def train_on_clone(denoiser: ComfyDenoiser, make_trainer: Callable[[dict[str, torch.Tensor]], Trainer], source,
                   empty: list | None, settings: TrainingSettings, use_checkpointing: bool, autocast_dtype, node_id,
                   plan: CheckpointPlan | None = None, validation: ValidationPlan | None = None,
                   hooks_class: type[ComfyHooks] = ComfyHooks) -> TrainingRun:
    """The core loop (controlnext_core.training_loop) on the MODEL's clone, loaded by ComfyUI; the
    trainer is made from the loaded UNet's weights of the trained names."""
    with torch.inference_mode(False), denoiser.loaded(use_checkpointing):
        base_weights = denoiser.unet_weights(denoiser.trained_names)
        trainer = make_trainer(base_weights)
        denoiser.train_through(trainer.unet_parameters)
        started = plan.start(trainer) if plan else ""
        device = trainer.device
        scaler = (torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 and device.type == "cuda"
                  else None)
        hooks = hooks_class(node_id, settings.steps, base_weights, denoiser, plan, validation)
        message = run_training(trainer, denoiser, source, hooks, empty, autocast_dtype, scaler)
        file_weights = release_unet_weights(trainer.trained_unet(), base_weights, settings.family)
    return TrainingRun(trainer, file_weights, " ".join(part for part in (started, message) if part))


def _progress_text(text: str, node_id) -> None:
    try:
        from server import PromptServer
    except ImportError:  # outside a server (tests)
        return
    if node_id is not None and PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, node_id)


def release_folder(name: str) -> str:
    """models/controlnext/<name>, refusing names that reach outside it."""
    clean = name.strip().strip("/\\")
    if not clean or os.path.isabs(clean) or ".." in clean.replace("\\", "/").split("/"):
        raise ControlNeXtError(f"'{name}' is not a folder name: use letters, digits and - _ (sub/folders allowed).")
    return os.path.join(folder_paths.get_folder_paths(FOLDER)[0], clean)


def release_for_run_problem(name: str, resume: str, field: str) -> str | None:
    """Why a run cannot write into models/controlnext/<name> (checked when the prompt is queued): a
    name that is no folder name, or a new run into another run's checkpoints."""
    try:
        folder = release_folder(name)
    except ControlNeXtError as error:
        return str(error)
    if resume == RESUME_CHOICES[0] and checkpoint_folders(os.path.join(folder, "checkpoints")):
        return (f"models/controlnext/{name.strip()} already has checkpoints of a run: set resume to latest to "
                f"continue it, or choose another {field}.")
    return None


def checkpoint_inputs_check(checkpoint_name: str, resume: str) -> bool | str:
    """A training node's validate_inputs, checked when the prompt is queued: a new run must not mix
    its checkpoints with another's."""
    if resume not in RESUME_CHOICES:
        return f"resume '{resume}' is not one of {', '.join(RESUME_CHOICES)}."
    if not checkpoint_name.strip():
        return True
    return release_for_run_problem(checkpoint_name, resume, "checkpoint_name") or True


def release_name_is_free(name: str, overwrite: bool, own_release: str = "") -> None:
    """Refuses a name whose folder holds release files, unless ``overwrite`` or the folder is
    ``own_release``, the one the saved run's checkpoints refreshed with its own weights."""
    folder = release_folder(name)
    taken = sorted(file for file in os.listdir(folder) if file.endswith(".safetensors")) if os.path.isdir(folder) else []
    if taken and not overwrite and folder != own_release:
        raise ControlNeXtError(f"models/controlnext/{name.strip()} already holds {', '.join(taken)}: choose another "
                               f"name, or set overwrite.")


def check_saves_fed_by(prompt: dict | None, node_id) -> None:
    """The Save ControlNeXt nodes this Train node feeds, checked before training: a taken name found
    only after the run would lose it."""
    checkpoint_name = ((prompt or {}).get(str(node_id)) or {}).get("inputs", {}).get("checkpoint_name")
    own_release = release_folder(checkpoint_name) if isinstance(checkpoint_name, str) and checkpoint_name.strip() else ""
    for save_id, node in (prompt or {}).items():
        inputs = node.get("inputs", {})
        link = inputs.get("controlnext")
        if (node.get("class_type") == "ControlNeXtSave" and isinstance(link, list) and str(link[0]) == str(node_id)
                and isinstance(inputs.get("name"), str)):
            try:
                release_name_is_free(inputs["name"], bool(inputs.get("overwrite")), own_release)
            except ControlNeXtError as error:
                raise ControlNeXtError(f"Save ControlNeXt (node {save_id}) could not save this training: {error} "
                                       f"Nothing was trained.") from None


class SaveControlNeXt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtSave",
            display_name="Save ControlNeXt",
            category=TRAIN_CATEGORY,
            description="Writes a trained ControlNeXt as a release: models/controlnext/<name>/controlnet.safetensors "
                        "and unet.safetensors, which Load ControlNeXt and Load ControlNeXt UNet Weights (and the "
                        "official inference code) read.",
            is_output_node=True,
            inputs=[
                ControlNeXtType.Input("controlnext", tooltip="The output of Train ControlNeXt."),
                io.String.Input("name", default="my_controlnext",
                                tooltip="Folder name under models/controlnext."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace files of the same name; off: an existing name is refused when the "
                                         "prompt is queued, before anything is trained."),
            ],
            outputs=[io.String.Output(display_name="folder", tooltip="The folder the files were written to.")],
        )

    @classmethod
    def validate_inputs(cls, name: str, overwrite: bool) -> bool | str:
        """Checked when the prompt is queued (and by Train ControlNeXt before it trains: ComfyUI still
        runs the outputs that do not need a Save that failed validation). A folder that holds checkpoints
        is left to Train's check, which sees whether they are its own run's."""
        try:
            folder = release_folder(name)
            release_name_is_free(name, overwrite, folder if checkpoint_folders(os.path.join(folder, "checkpoints"))
                                 else "")
        except ControlNeXtError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, controlnext, name: str, overwrite: bool) -> io.NodeOutput:
        if not isinstance(controlnext, TrainedControlNeXt):
            raise ControlNeXtError(f"'{controlnext.name}' was loaded from a file, which is already saved; Save "
                                   f"ControlNeXt writes the output of Train ControlNeXt.")
        folder = release_folder(name)
        paths = save_release(folder, controlnext.encoder, controlnext.unet_file_weights, controlnext.metadata,
                             overwrite or folder == controlnext.release)
        return io.NodeOutput(folder, ui={"controlnext_info": [f"Saved {', '.join(paths)}"]})


class LoadTrainingPictures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtLoadTrainingPictures",
            display_name="Load Training Pictures (ControlNeXt)",
            category=TRAIN_CATEGORY,
            description="A folder of pictures as a square IMAGE batch (shorter side scaled, centre crop, as the official "
                        "training data), with each picture's caption from the .txt file of the same name.",
            inputs=[
                io.Combo.Input("folder", options=input_subfolders(),
                               tooltip="A subfolder of ComfyUI's input folder holding the pictures (and their "
                                       ".txt captions)."),
                io.Clip.Input("clip", tooltip="Encodes the captions."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training size (SD1.5: 512, SDXL: 1024)."),
                io.String.Input("default_caption", default="", multiline=True,
                                tooltip="The caption of pictures without a .txt file."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The pictures, square, in file-name order."),
                     io.Conditioning.Output(display_name="positive", tooltip="One conditioning per picture."),
                     io.Int.Output(display_name="count", tooltip="How many pictures the folder held.")],
        )

    @classmethod
    def execute(cls, folder: str, clip, resolution: int, default_caption: str) -> io.NodeOutput:
        if resolution % LATENT_SCALE:
            raise ControlNeXtError(f"resolution {resolution} is not a multiple of 8.")
        items = read_items(input_subfolder(folder), "pictures", default_caption=default_caption)
        images = torch.stack([load_training_pair(item, resolution)[0] for item in items])
        conditioning = [entry for item in items for entry in encode_text(clip, item.caption)]
        return io.NodeOutput(images, conditioning, len(items))


TRAIN_NODES = [LoadTrainingPictures, LoadTrainingData, TrainControlNeXt, SaveControlNeXt]
