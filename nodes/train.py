"""Training nodes: train a ControlNeXt on a MODEL from latents, captions and control images, save it
as a release (core: controlnext_core.train), and load a folder of pictures with their captions.

ComfyUI runs nodes under ``torch.inference_mode``; training runs inside ``inference_mode(False)``
and through the UNet module itself (not a copy), reading the trained weights from the trainer.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError, injection_block, resize_control, rule_for
from ..controlnext_core.train import (EMPTY_PROMPT, OPTIMIZERS, TRAIN_LAYOUT, Trainer, TrainingBatch,
                                      TrainingDiverged, TrainingSettings, new_encoder, release_metadata,
                                      release_unet_weights, save_release, trainable_unet_names)
from ..controlnext_core.unet_weights import OFFICIAL_MODE
from .loaders import CATEGORY, FOLDER, ControlNeXtType, patch_unet_weights_from
from .patch import LATENT_SCALE, PATCH_KIND, ControlNeXtFile, control_image_from_comfy, model_family, model_type_name

log = logging.getLogger("ControlNeXt")
TRAIN_CATEGORY = f"{CATEGORY}/training"
LossMapType = io.Custom("LOSS_MAP")  # ComfyUI's own Plot Loss Graph takes it
UNET_CHOICES = ("official subset", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TrainedControlNeXt(ControlNeXtFile):
    """A CONTROLNEXT made by Train ControlNeXt: Apply ControlNeXt takes it like a loaded file, and
    Save ControlNeXt writes it with the UNet weights it was trained with."""

    def __init__(self, name: str, encoder, unet_file_weights: dict[str, torch.Tensor], metadata: dict[str, str]):
        super().__init__(name, encoder, metadata)
        self.unet_file_weights = unet_file_weights


def diffusers_names(model) -> dict[str, str]:
    """This UNet's parameter names (without "diffusion_model.") -> the diffusers names releases use."""
    return {ldm: diffusers for diffusers, ldm in
            comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}


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


class ComfyDenoiser:
    """The MODEL's UNet as ``controlnext_core.train.Denoiser``: raw DDPM inputs and integer
    timesteps (as the official scripts feed diffusers' UNet); the trained weights come in through
    ``trained_weights_in``."""

    def __init__(self, model, family: str):
        self.base = model.model
        self.unet = self.base.diffusion_model
        self.family = family
        rule = rule_for(family, TRAIN_LAYOUT)
        self.patch = TrainingPatch(injection_block(rule, list(self.unet.num_res_blocks)))
        options = model.model_options.get("transformer_options", {})
        patches = {k: list(v) for k, v in options.get("patches", {}).items()}
        kind = PATCH_KIND[self.patch.block[0]]
        patches[kind] = patches.get(kind, []) + [self.patch]
        self.transformer_options = {**options, "patches": patches}
        self.dtype = self.base.manual_cast_dtype or self.base.get_dtype()

    def __call__(self, noisy, timesteps, conditioning, inject):
        context, y = conditioning
        self.patch.inject = inject
        try:
            return self.unet(noisy.to(self.dtype), timesteps.float(), context=context.to(noisy.device, self.dtype),
                             y=None if y is None else y.to(noisy.device, self.dtype),
                             transformer_options=dict(self.transformer_options))
        finally:
            self.patch.inject = None


def _master_weight(master: torch.nn.Parameter, weight: torch.Tensor) -> torch.Tensor:
    return master.to(weight.dtype)


@contextlib.contextmanager
def trained_weights_in(unet, unet_parameters: dict[str, torch.nn.Parameter]):
    """The UNet reads the trainer's fp32 masters in place of the weights being trained, through
    ComfyUI's per-layer weight functions: inside each layer's forward, so a checkpointed layer's
    recomputation reads them too. The layers' own weights are never written."""
    modules = dict(unet.named_modules())
    saved = []
    for name, master in unet_parameters.items():
        module_name, kind = name.rsplit(".", 1)
        module = modules[module_name]
        attribute = f"{kind}_function"
        if not hasattr(module, attribute):
            raise ControlNeXtError(f"The UNet layer '{module_name}' is not one of ComfyUI's layers, so its weights "
                                   f"cannot be trained here; load the model with a ComfyUI loader.")
        saved.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, list(getattr(module, attribute)) + [functools.partial(_master_weight, master)])
    try:
        yield
    finally:
        for module, attribute, functions in reversed(saved):
            setattr(module, attribute, functions)


def _batch_conditioning(model, family: str, entries: list, latent_shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack CONDITIONING entries of one batch into (context, SDXL's y with the official time ids:
    original and target size = the training size, crop 0)."""
    tokens = math.lcm(*[entry[0].shape[1] for entry in entries])
    context = torch.cat([entry[0].repeat(1, tokens // entry[0].shape[1], 1) for entry in entries])
    if family != "sdxl":
        return context, None
    height, width = latent_shape[-2] * LATENT_SCALE, latent_shape[-1] * LATENT_SCALE
    missing = [i for i, entry in enumerate(entries) if entry[1].get("pooled_output") is None]
    if missing:
        raise ControlNeXtError("SDXL training needs the pooled text embedding in each conditioning: encode the "
                               "captions with an SDXL checkpoint's CLIP (CLIP Text Encode does).")
    y = torch.cat([model.model.encode_adm(pooled_output=entry[1]["pooled_output"], width=width, height=height,
                                          crop_w=0, crop_h=0, target_width=width, target_height=height)
                   for entry in entries])
    return context, y


def encode_text(clip, text: str) -> list:
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No gradient for the module's own weights while training (only the trainer's parameters get
    one); each weight's flag is put back afterwards."""
    flags = [(param, param.requires_grad) for param in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


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


def make_weights_trainable_through(module: torch.nn.Module) -> None:
    """Weights loaded under ComfyUI's inference mode cannot be saved for backward. Replace each such
    tensor by an ordinary one with the same values, one at a time (no lasting copy; outputs unchanged)."""
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub.named_parameters(recurse=False)):
                if param.is_inference():
                    setattr(sub, name, torch.nn.Parameter(param.clone(), requires_grad=False))
            for name, buffer in list(sub.named_buffers(recurse=False)):
                if buffer.is_inference():
                    sub.register_buffer(name, buffer.clone())


def _autocast_dtype(precision: str, model) -> torch.dtype | None:
    if precision == "auto":
        dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        return None if dtype == torch.float32 else dtype
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_training_inputs(model, latents: torch.Tensor, images: torch.Tensor, positive: list) -> str:
    family = model_family(model.model)
    if family not in ("sd15", "sdxl"):
        raise ControlNeXtError(
            f"Train ControlNeXt trains on SD1.5 and SDXL models (the official training code covers those two); "
            f"this is a {model_type_name(model.model)} model.")
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
    return family


class TrainControlNeXt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtTrain",
            display_name="Train ControlNeXt",
            category=TRAIN_CATEGORY,
            description="Trains a ControlNeXt encoder (and, as the official scripts do, the UNet's attention "
                        "outputs) on your pictures and their control images. Cancel stops and keeps what was trained.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SDXL model to train for (a fine-tune works)."),
                io.Latent.Input("latents", tooltip="The training pictures, VAE-encoded (one latent per picture)."),
                io.Conditioning.Input("positive", tooltip="The captions: one conditioning for all pictures, or one "
                                                          "per picture (Load Training Pictures gives one per picture)."),
                io.Image.Input("control_images", tooltip="One control image per picture (canny, depth, pose...), "
                                                         "the same size as the pictures; resized if not."),
                io.Int.Input("steps", default=400, min=1, max=100000,
                             tooltip="Optimiser steps. The paper reports convergence in about 400."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Pictures per step."),
                io.Float.Input("encoder_lr", default=1e-4, min=0.0, max=1.0, step=1e-6,
                               tooltip="Learning rate of the encoder (official examples: 1e-4)."),
                io.Float.Input("unet_lr", default=1e-5, min=0.0, max=1.0, step=1e-7,
                               tooltip="Learning rate of the trained UNet weights (official examples: 1e-5)."),
                io.Combo.Input("train_unet", options=list(UNET_CHOICES), default=UNET_CHOICES[0],
                               tooltip="official subset: SD1.5 every attention output (to_out), SDXL the "
                                       "cross-attention outputs (attn2 to_out), as the official scripts. "
                                       "none: the encoder only (works on any fine-tune without a UNet file)."),
                io.Combo.Input("optimizer", options=["official", *OPTIMIZERS], default="official",
                               tooltip="official: AdamW for SD1.5, Adafactor with gradient clipping at 1.0 for SDXL."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                             tooltip="Linear learning-rate warm-up (the official SDXL script uses 500)."),
                io.Float.Input("control_scale", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="How strongly the control is added while training; saved in the file and "
                                       "applied when it is loaded (official SD1.5 examples: 0.35)."),
                io.Float.Input("proportion_empty_prompts", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of steps trained with an empty prompt so control works without "
                                       "a caption (official SDXL example: 0.2). Needs the clip input."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Less memory for a little more time: recompute the UNet's activations "
                                         "in the backward pass."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="Compute precision of the UNet and encoder (trained weights stay fp32). "
                                       "auto: the model's own."),
                ControlNeXtType.Input("controlnext", optional=True,
                                      tooltip="Continue training this encoder (a \"base\" layout file) instead "
                                              "of starting a new one."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Encodes the empty prompt for proportion_empty_prompts."),
            ],
            outputs=[
                ControlNeXtType.Output(display_name="CONTROLNEXT", tooltip="For Apply ControlNeXt and Save ControlNeXt."),
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained UNet weights as patches."),
                LossMapType.Output(display_name="loss", tooltip="The loss of every step (Plot Loss Graph)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents, positive, control_images, steps: int, batch_size: int, encoder_lr: float,
                unet_lr: float, train_unet: str, optimizer: str, warmup_steps: int, control_scale: float,
                proportion_empty_prompts: float, seed: int, gradient_checkpointing: bool, precision: str,
                controlnext=None, clip=None) -> io.NodeOutput:
        samples = latents["samples"]
        images = control_image_from_comfy(control_images)
        family = check_training_inputs(model, samples, images, positive)
        if proportion_empty_prompts > 0 and clip is None:
            raise ControlNeXtError("proportion_empty_prompts is above 0: connect the checkpoint's CLIP to the clip "
                                   "input so the empty prompt can be encoded.")
        settings = TrainingSettings(
            family=family, steps=steps, batch_size=batch_size, encoder_lr=encoder_lr, unet_lr=unet_lr,
            train_unet=train_unet != "none", optimizer=None if optimizer == "official" else optimizer,
            warmup_steps=warmup_steps, control_scale=control_scale,
            prediction="v_prediction" if "V_PREDICTION" in type(model.model.model_sampling).__name__ else "epsilon",
            proportion_empty_prompts=proportion_empty_prompts, seed=seed).resolved()
        empty = encode_text(clip, EMPTY_PROMPT[family]) if proportion_empty_prompts > 0 else None
        result = train(model, family, samples, images, positive, empty, settings, controlnext,
                       gradient_checkpointing, _autocast_dtype(precision, model),
                       getattr(cls.hidden, "unique_id", None))  # None when called outside a server
        trainer, message = result
        name = f"trained ControlNeXt ({family}, {trainer.steps_done} steps)"
        names = diffusers_names(model)
        file_weights = {names[key]: value for key, value in release_unet_weights(
            trainer.trained_unet(), {k: v for k, v in _unet_state(model).items() if k in trainer.unet_parameters},
            family).items()}
        metadata = release_metadata(family, settings.control_scale, trainer.steps_done, _base_name(model))
        trained = TrainedControlNeXt(name, trainer.finish(), file_weights, metadata)
        patched = (patch_unet_weights_from(model, file_weights, name, 1.0, OFFICIAL_MODE[family]) if file_weights
                   else model.clone())
        ui = {"controlnext_info": [message]}
        return io.NodeOutput(trained, patched, {"loss": list(trainer.losses)}, ui=ui)


def _unet_state(model) -> dict[str, torch.Tensor]:
    return dict(model.model.diffusion_model.named_parameters())


def _base_name(model) -> str:
    return model_type_name(model.model)


def train(model, family: str, samples: torch.Tensor, images: torch.Tensor, positive: list, empty: list | None,
          settings: TrainingSettings, controlnext, use_checkpointing: bool, autocast_dtype, node_id) -> tuple[Trainer, str]:
    """The training loop: progress with the loss, Cancel and divergence stop it and keep the last good step."""
    if controlnext is not None and controlnext.layout != TRAIN_LAYOUT:
        raise ControlNeXtError(
            f"'{controlnext.name}' has the layout of the SD1.5 releases, which the official training code does not "
            f"train; continue a \"base\" layout file (SDXL releases, or one trained here), or start a new encoder.")
    device = comfy.model_management.get_torch_device()
    with torch.inference_mode(False):
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        unet = model.model.diffusion_model
        make_weights_trainable_through(unet)
        encoder = new_encoder(settings.seed) if controlnext is None else _copy_encoder(controlnext.encoder)
        unet_state = _unet_state(model)
        names = trainable_unet_names(unet_state, family) if settings.train_unet else []
        trainer = Trainer(encoder, {name: unet_state[name] for name in names}, settings, device)
        denoiser = ComfyDenoiser(model, family)
        latents = model.model.process_latent_in(samples.to(device, torch.float32))
        height, width = samples.shape[-2] * LATENT_SCALE, samples.shape[-1] * LATENT_SCALE
        if tuple(images.shape[-2:]) != (height, width):
            log.info("ControlNeXt training: control images %sx%s resized to the pictures' %sx%s.",
                     images.shape[-1], images.shape[-2], width, height)
        controls = resize_control(images, height, width).to(device)
        scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 and device.type == "cuda" else None
        progress = comfy.utils.ProgressBar(settings.steps, node_id=node_id)
        message = f"Trained {settings.steps} steps."
        with frozen(unet), trained_weights_in(unet, trainer.unet_parameters), \
                gradient_checkpointing(unet, use_checkpointing):
            for step in range(settings.steps):
                if comfy.model_management.processing_interrupted():
                    comfy.model_management.interrupt_current_processing(False)
                    message = f"Cancelled after {trainer.steps_done} of {settings.steps} steps; kept what was trained."
                    log.warning("ControlNeXt training: %s", message)
                    break
                indices = trainer.batch_indices(samples.shape[0])
                empties = trainer.empty_prompt_mask(len(indices))
                entries = [empty[0] if is_empty else positive[i if len(positive) > 1 else 0]
                           for i, is_empty in zip(indices, empties)]
                conditioning = _batch_conditioning(model, family, entries, samples.shape)
                batch = TrainingBatch(latents[indices], controls[indices], conditioning)
                try:
                    loss = trainer.step(denoiser, batch, autocast_dtype, scaler)
                except TrainingDiverged as error:
                    if trainer.steps_done == 0:
                        raise
                    message = str(error)
                    log.warning("ControlNeXt training: %s", message)
                    break
                progress.update_absolute(step + 1, settings.steps)
                _progress_text(f"step {step + 1}/{settings.steps}  loss {loss:.4f}", node_id)
    return trainer, message


def _copy_encoder(encoder):
    """A trainable copy: the CONTROLNEXT given to continue stays as it was."""
    copy = type(encoder)(encoder.config)
    copy.load_state_dict(encoder.state_dict())
    copy.control_scale = encoder.control_scale
    return copy


def _progress_text(text: str, node_id) -> None:
    try:
        from server import PromptServer
    except ImportError:  # outside a server (tests)
        return
    if node_id is not None and PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, node_id)


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
                                 tooltip="Replace files of the same name; off: an existing name is an error."),
            ],
            outputs=[io.String.Output(display_name="folder")],
        )

    @classmethod
    def execute(cls, controlnext, name: str, overwrite: bool) -> io.NodeOutput:
        if not isinstance(controlnext, TrainedControlNeXt):
            raise ControlNeXtError(f"'{controlnext.name}' was loaded from a file, which is already saved; Save "
                                   f"ControlNeXt writes the output of Train ControlNeXt.")
        clean = name.strip().strip("/\\")
        if not clean or os.path.isabs(clean) or ".." in clean.replace("\\", "/").split("/"):
            raise ControlNeXtError(f"'{name}' is not a folder name: use letters, digits and - _ (sub/folders allowed).")
        folder = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], clean)
        paths = save_release(folder, controlnext.encoder, controlnext.unet_file_weights, controlnext.metadata,
                             overwrite)
        return io.NodeOutput(folder, ui={"controlnext_info": [f"Saved {', '.join(paths)}"]})


def _picture_files(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ControlNeXtError(f"'{folder}' holds no pictures ({', '.join(IMAGE_SUFFIXES)}).")
    return [os.path.join(folder, n) for n in names]


def _resolve_folder(folder: str) -> str:
    path = folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)
    if not os.path.isdir(path):
        raise ControlNeXtError(f"'{folder}' is not a folder: give a folder inside ComfyUI's input folder, or an "
                               f"absolute path.")
    return path


def load_picture(path: str, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` and centre-crop a square, as the official training data."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


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
                io.String.Input("folder", default="training",
                                tooltip="A folder inside ComfyUI's input folder, or an absolute path."),
                io.Clip.Input("clip", tooltip="Encodes the captions."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training size (SD1.5: 512, SDXL: 1024)."),
                io.String.Input("default_caption", default="", multiline=True,
                                tooltip="The caption of pictures without a .txt file."),
            ],
            outputs=[io.Image.Output(display_name="images"),
                     io.Conditioning.Output(display_name="positive", tooltip="One conditioning per picture."),
                     io.Int.Output(display_name="count")],
        )

    @classmethod
    def execute(cls, folder: str, clip, resolution: int, default_caption: str) -> io.NodeOutput:
        if resolution % LATENT_SCALE:
            raise ControlNeXtError(f"resolution {resolution} is not a multiple of 8.")
        paths = _picture_files(_resolve_folder(folder))
        images = torch.stack([load_picture(path, resolution) for path in paths])
        conditioning = []
        for path in paths:
            caption_file = os.path.splitext(path)[0] + ".txt"
            caption = default_caption
            if os.path.isfile(caption_file):
                with open(caption_file, encoding="utf-8") as file:
                    caption = file.read().strip()
            conditioning += encode_text(clip, caption)
        return io.NodeOutput(images, conditioning, len(paths))


TRAIN_NODES = [LoadTrainingPictures, TrainControlNeXt, SaveControlNeXt]
