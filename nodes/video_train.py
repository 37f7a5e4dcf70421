"""SVD-v2 training in ComfyUI (issue 21): the SVD MODEL's UNet and VAE as the core's video step
(controlnext_core.video_train) needs them, on a clone of the MODEL as the image training works."""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

import comfy.model_management
from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError
from ..controlnext_core.processes import Processes
from ..controlnext_core.train import (TRAIN_LAYOUT, TrainingSettings, loss_summary, new_encoder, trainable_copy,
                                      trainable_unet_names)
from ..controlnext_core.clip_poses import detect_missing
from ..controlnext_core.video_dataset import OFFICIAL_GUIDE_SLACK, POSE_CACHE, ClipFiles, read_clip_folders
from ..controlnext_core.video_train import (OFFICIAL_VIDEO_RECIPE, VIDEO_TRAINED_SETS, ClipSampling, ClipSource,
                                            VideoTrainer)
from .loaders import ControlNeXtType
from .patch import model_family, model_type_name
from .preprocessors import dwpose_detector, dwpose_files, resolve_dwpose
from .train import (CHECKPOINTS_KEPT, PRECISIONS, RESUME_CHOICES, TRAIN_CATEGORY, CheckpointPlan, ComfyDenoiser,
                    ComfyHooks, LossMapType, _autocast_dtype, base_model_name, check_saves_fed_by, checkpoint_inputs_check,
                    control_scale_for, diffusers_names, release_folder, train_on_clone, trained_outputs)
from .train_data import input_subfolder, input_subfolders

log = logging.getLogger("ControlNeXt")
NO_DWPOSE = "none"


def require_svd_for_training(model) -> None:
    if model_family(model.model) != "svd":
        raise ControlNeXtError(f"The video training trains Stable Video Diffusion models (SVD-XT 1.1, as the "
                               f"official SVD-v2 training); this is a {model_type_name(model.model)} model: "
                               f"use Train ControlNeXt for SD1.5 and SDXL.")


class ComfyVideoDenoiser(ComfyDenoiser):
    """The SVD MODEL's UNet as ``controlnext_core.video_train.VideoDenoiser``: each clip's frames
    flattened into the batch as ComfyUI's SVD sampling feeds them, the image embedding and the added
    time ids given to every frame, those ids through the model's own embedder as the core gives them
    (the official training feeds fps 6 where ComfyUI's SVD conditioning feeds its fps input minus 1)."""

    def __init__(self, model, trained_names: list[str]):
        require_svd_for_training(model)
        super().__init__(model, "svd", trained_names)
        self.embedder = model.model.embedder

    def __call__(self, unet_input: torch.Tensor, timesteps: torch.Tensor, image_embeddings: torch.Tensor,
                 time_ids: torch.Tensor, inject: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        batch, frames = unet_input.shape[:2]
        y = torch.cat([self.embedder(time_ids[:, column]) for column in range(time_ids.shape[1])], dim=1)
        prediction = self.run_unet(inject, unet_input.flatten(0, 1), timesteps.repeat_interleave(frames),
                                   image_embeddings.repeat_interleave(frames, dim=0), y.repeat_interleave(frames, dim=0),
                                   num_video_frames=frames)
        return prediction.reshape(batch, frames, *prediction.shape[1:])


def video_trained_names(model, trained_set: str) -> list[str]:
    """The SVD UNet's weights a trained set covers (VIDEO_TRAINED_SETS), in the UNet's order."""
    if trained_set not in VIDEO_TRAINED_SETS:
        raise ControlNeXtError(f"Unknown trained set {trained_set!r}: choose one of {', '.join(VIDEO_TRAINED_SETS)}.")
    pattern = VIDEO_TRAINED_SETS[trained_set]
    if pattern is None:
        return []
    return trainable_unet_names([name for name, _ in model.model.diffusion_model.named_parameters()], "svd", pattern)


def clip_folder_clips(root: str, detector_model: str = NO_DWPOSE,
                      pose_model: str = NO_DWPOSE) -> tuple[list[ClipFiles], str]:
    """The clips of a folder of clip folders, with the poses and hands detections they lack made by
    DWPose once (cached in the folder's POSE_CACHE) where its two models are chosen; and a note of
    what stands in for what is missing."""
    chosen = [name for name in (detector_model, pose_model) if name != NO_DWPOSE]
    if len(chosen) == 1:
        raise ControlNeXtError("Choose both DWPose models (detector_model and pose_model) to make the clips' poses "
                               "and hands, or neither.")
    notes = []
    if chosen:
        def load_detector():
            log.info("DWPose: the missing poses and hands of the clips, once (kept in %s).",
                     os.path.join(root, POSE_CACHE))
            return dwpose_detector(resolve_dwpose(detector_model), resolve_dwpose(pose_model)).detect

        done = detect_missing(root, load_detector)
        if done:
            notes.append(f"DWPose made the poses or hands of {len(done)} clips (kept for later runs).")
    clips = read_clip_folders(root)
    unweighted = sum(clip.detections is None for clip in clips)
    if unweighted:
        notes.append(f"{unweighted} of {len(clips)} clips have no hands.json: their loss is not weighted on the "
                     f"hands (choose the DWPose models to make them).")
    return clips, " ".join(notes)


def reference_encoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference picture ([B, 3, H, W] in [-1, 1], noise augmented, so possibly a little outside)
    through ComfyUI's VAE: the latent distribution's mode, unscaled, as ComfyUI's SVD conditioning
    encodes its init image (the official script takes ``latent_dist.mode()`` too)."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(((pixels + 1) / 2).movedim(1, -1))
    return encode


def frames_encoder(vae, model) -> Callable[[torch.Tensor], torch.Tensor]:
    """A clip's frames ([F, 3, H, W] in [-1, 1]) as the SVD model's latents (the VAE's mode, scaled as
    ComfyUI scales sampled latents; the official script samples the distribution, whose spread the
    SD VAE keeps near 0)."""
    encode, latent_format = reference_encoder(vae), model.model.latent_format
    return lambda pixels: latent_format.process_in(encode(pixels))


def image_embedder(clip_vision) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference frame ([3, H, W] in [-1, 1]) through CLIP vision as ComfyUI's SVD conditioning
    embeds its init image: [1, D]."""
    def embed(reference: torch.Tensor) -> torch.Tensor:
        return clip_vision.encode_image(((reference + 1) / 2).movedim(0, -1)[None]).image_embeds
    return embed


class TrainControlNeXtSVD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        recipe = OFFICIAL_VIDEO_RECIPE
        return io.Schema(
            node_id="ControlNeXtTrainSVD",
            display_name="Train ControlNeXt SVD",
            category=TRAIN_CATEGORY,
            description="Trains a ControlNeXt-SVD-v2 pose encoder (and SVD UNet weights) on your clips, with the "
                        "official SVD-v2 training step: each step takes frames of a clip every interval_frame "
                        "frames, a random frame of the clip as the reference picture, and learns to make the "
                        "frames from the reference and the poses. For short clips on one GPU; the headless command "
                        "runs the official scale. Cancel stops and keeps what was trained.",
            inputs=[
                io.Model.Input("model", tooltip="The SVD model to train for (SVD-XT 1.1 for ControlNeXt-SVD-v2; "
                                                "Image Only Checkpoint Loader)."),
                io.ClipVision.Input("clip_vision", tooltip="The SVD checkpoint's CLIP vision model (Image Only "
                                                           "Checkpoint Loader): embeds the reference frame."),
                io.Vae.Input("vae", tooltip="The SVD checkpoint's VAE: encodes the frames and the reference."),
                io.Combo.Input("folder", options=input_subfolders(),
                               tooltip="A subfolder of ComfyUI's input folder with one subfolder per clip: its "
                                       "frames as frames/ (pictures in name order) or video.mp4, its poses as "
                                       "poses/ or poses.mp4 (one per frame, e.g. drawn with ControlNeXt Pose), "
                                       "optionally hands.json (the official per-frame hand detections: the loss "
                                       "weighs hands x 4.2)."),
                io.Int.Input("steps", default=500, min=1, max=1000000, tooltip="Optimiser steps."),
                io.Combo.Input("trained", options=list(VIDEO_TRAINED_SETS), default="attention outputs and values",
                               tooltip="The UNet weights trained with the encoder. all: every weight, the official "
                                       "default (16 bytes per weight for its fp32 master, AdamW moments and gradient: "
                                       "24 GB for SVD-XT's 1.5 billion); attention outputs and values (to_out, "
                                       "to_v: 0.1 billion): the official script's selective choice; encoder only: no UNet weight (works with any SVD "
                                       "fine-tune without a UNet file)."),
                io.Float.Input("learning_rate", default=1e-5, min=0.0, max=1.0, step=1e-7,
                               tooltip="AdamW learning rate of the encoder and the UNet weights (official: 1e-5, "
                                       "constant)."),
                io.Int.Input("frames", default=recipe.frames, min=2, max=64,
                             tooltip="Frames per sample (official: 14; SVD-XT generates 14 or 25)."),
                io.Int.Input("interval_frame", default=recipe.interval_frame, min=0, max=64,
                             tooltip="Take every Nth frame (official script.sh: 3); shrinks for a short clip. 0: "
                                     "drawn from 2 to 7 per sample."),
                io.Int.Input("width", default=recipe.width, min=64, max=4096, step=64,
                             tooltip="Training width (official: 576); each sample is cut to width : height at a "
                                     "random place, then resized."),
                io.Int.Input("height", default=recipe.height, min=64, max=4096, step=64,
                             tooltip="Training height (official: 1024)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Clips per step."),
                io.Float.Input("conditioning_dropout", default=recipe.conditioning_dropout, min=0.0, max=0.33,
                               step=0.01, tooltip="Share of samples trained without the reference embedding (2x "
                                                  "this) or its latents (2x this, overlapping), so guidance works "
                                                  "(official: 0.1)."),
                io.Float.Input("control_scale", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="How strongly the control is added while training, saved in the file. 0: "
                                       "the scale of the file continued, or 1.0 for a new encoder."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds a new encoder, the noise, the clips' order and their samples."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Less memory for more time: recompute the UNet's activations in the "
                                         "backward pass (official: on)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="Compute precision (trained weights stay fp32). auto: the model's own "
                                       "(official: bf16)."),
                ControlNeXtType.Input("controlnext", optional=True,
                                      tooltip="Continue this SVD-v2 encoder instead of starting a new one."),
                io.String.Input("checkpoint_name", default="", optional=True,
                                tooltip="A folder under models/controlnext: every checkpoint_every steps and on "
                                        f"Cancel the training state goes to <name>/checkpoints/step-N (the last "
                                        f"{CHECKPOINTS_KEPT} kept) and the release files in <name>/ are refreshed. "
                                        f"Empty: nothing is written while training."),
                io.Int.Input("checkpoint_every", default=100, min=1, max=1000000, optional=True,
                             tooltip="Steps between checkpoints (with a checkpoint_name)."),
                io.Combo.Input("resume", options=list(RESUME_CHOICES), default=RESUME_CHOICES[0], optional=True,
                               tooltip="latest: continue the newest checkpoint of checkpoint_name exactly; latest, "
                                       "new settings: take only its weights; no: a new run."),
                io.Combo.Input("detector_model", options=[NO_DWPOSE, *dwpose_files()], default=NO_DWPOSE,
                               optional=True,
                               tooltip="With pose_model: DWPose draws the poses of clips without poses/ and finds "
                                       "the hands of clips without hands.json, once (kept in the folder's "
                                       f"{POSE_CACHE}; your clip folders are not changed). Person detector in "
                                       "models/dwpose: yolox_l.onnx."),
                io.Combo.Input("pose_model", options=[NO_DWPOSE, *dwpose_files()], default=NO_DWPOSE, optional=True,
                               tooltip="Whole-body pose model in models/dwpose: dw-ll_ucoco_384.onnx."),
            ],
            outputs=[
                ControlNeXtType.Output(display_name="CONTROLNEXT",
                                       tooltip="For Apply ControlNeXt SVD and Save ControlNeXt."),
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained UNet weights as patches."),
                LossMapType.Output(display_name="loss", tooltip="The loss of every step (Plot Loss Graph)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_name: str = "", resume: str = RESUME_CHOICES[0]) -> bool | str:
        return checkpoint_inputs_check(checkpoint_name, resume)

    @classmethod
    def execute(cls, model, clip_vision, vae, folder: str, steps: int, trained: str, learning_rate: float,
                frames: int, interval_frame: int, width: int, height: int, batch_size: int,
                conditioning_dropout: float, control_scale: float, seed: int, gradient_checkpointing: bool,
                precision: str, controlnext=None, checkpoint_name: str = "", checkpoint_every: int = 100,
                resume: str = RESUME_CHOICES[0], detector_model: str = NO_DWPOSE,
                pose_model: str = NO_DWPOSE) -> io.NodeOutput:
        inputs = {name: value for name, value in locals().items()
                  if name not in ("cls", "folder", "detector_model", "pose_model")}
        node_id, prompt = getattr(cls.hidden, "unique_id", None), getattr(cls.hidden, "prompt", None)
        check_saves_fed_by(prompt, node_id)
        require_svd_for_training(model)
        clips, note = clip_folder_clips(input_subfolder(folder), detector_model, pose_model)
        return train_controlnext_svd(**inputs, clips=clips, data_label=folder, data_note=note, node_id=node_id,
                                     base_model=base_model_name(prompt, node_id, model))


def train_controlnext_svd(model, clip_vision, vae, clips: list[ClipFiles], data_label: str, steps: int, trained: str,
                          learning_rate: float, frames: int, interval_frame: int, width: int, height: int,
                          batch_size: int, conditioning_dropout: float, control_scale: float, seed: int,
                          gradient_checkpointing: bool, precision: str, controlnext=None, checkpoint_name: str = "",
                          checkpoint_every: int = 100, resume: str = RESUME_CHOICES[0], node_id=None,
                          base_model: str = "", gradient_accumulation_steps: int = 1, official_data: bool = False,
                          release: str = "", checkpoints_kept: int = CHECKPOINTS_KEPT,
                          hooks_class: type[ComfyHooks] | None = None, data_note: str = "") -> io.NodeOutput:
    """Train ControlNeXt SVD's work, for the node and the headless command (controlnext_train): the
    official SVD-v2 step run by the core loop on the MODEL's clone over the processes this one was
    started with, the result as a CONTROLNEXT and a patched MODEL like Train ControlNeXt's.

    ``official_data``: clips of an official meta-info file (BGR pose videos, pose counts that may
    differ by a few frames). The node names its release by ``checkpoint_name``; the command gives a
    folder (``release``) and its own Cancel and progress (``hooks_class``). ``resume`` may also be a
    checkpoint folder."""
    require_svd_for_training(model)
    if width % 64 or height % 64:
        raise ControlNeXtError(f"{width}x{height}: give a width and height that are multiples of 64 (the SVD UNet "
                               f"halves the latents three times).")
    if controlnext is not None and controlnext.layout != TRAIN_LAYOUT:
        raise ControlNeXtError(f"'{controlnext.name}' is an SVD v1 encoder; the SVD-v2 training continues SVD-v2 "
                               f"(\"base\" layout) encoders or starts a new one.")
    scale, scale_note = control_scale_for(control_scale, controlnext)
    names = video_trained_names(model, trained)  # refuses an unknown set
    pattern = VIDEO_TRAINED_SETS[trained]
    settings = TrainingSettings(family="svd", steps=steps, batch_size=batch_size, encoder_lr=learning_rate,
                                unet_lr=learning_rate, train_unet=pattern is not None, unet_pattern=pattern,
                                control_scale=scale, seed=seed,
                                gradient_accumulation_steps=gradient_accumulation_steps).resolved()
    with torch.inference_mode(False):
        encoder = new_encoder(seed) if controlnext is None else trainable_copy(controlnext.encoder)
        denoiser = ComfyVideoDenoiser(model, names)
    base_model = base_model or model_type_name(model.model)
    release = release or (release_folder(checkpoint_name) if checkpoint_name.strip() else "")
    sampling = (ClipSampling(frames, interval_frame, width, height, OFFICIAL_GUIDE_SLACK, guide_bgr=True)
                if official_data else ClipSampling(frames, interval_frame, width, height))
    source = ClipSource(clips, sampling, frames_encoder(vae, model), image_embedder(clip_vision))
    identity = {"base_model": base_model, "data": f"{data_label}: {len(clips)} clips, {frames} frames every "
                                                  f"{interval_frame} at {width}x{height}"}
    plan = (CheckpointPlan(release, checkpoint_every, resume, identity, base_model, diffusers_names(model),
                           checkpoints_kept) if release else None)
    device = comfy.model_management.get_torch_device()
    run = train_on_clone(
        denoiser, lambda base: VideoTrainer(encoder, base, settings, reference_encoder(vae), device,
                                            Processes.joined(), conditioning_dropout),
        source, None, settings, gradient_checkpointing, _autocast_dtype(precision, model), node_id, plan,
        hooks_class=hooks_class or ComfyHooks)
    trained_file, patched = trained_outputs(model, "svd", run, base_model, plan)
    message = " ".join(part for part in (
        f"{len(clips)} clips.", data_note, run.message, loss_summary(run.trainer.losses) + ".",
        f"adamw, lr {learning_rate:g}, trained: {trained}.", scale_note) if part)
    log.info("ControlNeXt SVD training: %s", message)
    return io.NodeOutput(trained_file, patched, {"loss": list(run.trainer.losses)},
                         ui={"controlnext_info": [message]})


VIDEO_TRAIN_NODES = [TrainControlNeXtSVD]
