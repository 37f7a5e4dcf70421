"""SVD-v2 training in ComfyUI (issue 21): the SVD MODEL's UNet and VAE as the core's video step
(controlnext_core.video_train) needs them, on a clone of the MODEL as the image training works."""
from __future__ import annotations

from typing import Callable

import torch

from ..controlnext_core import ControlNeXtError
from ..controlnext_core.train import trainable_unet_names
from ..controlnext_core.video_train import VIDEO_TRAINED_SETS
from .patch import model_family, model_type_name
from .train import ComfyDenoiser


class ComfyVideoDenoiser(ComfyDenoiser):
    """The SVD MODEL's UNet as ``controlnext_core.video_train.VideoDenoiser``: each clip's frames
    flattened into the batch as ComfyUI's SVD sampling feeds them, the image embedding and the added
    time ids given to every frame, those ids through the model's own embedder as the core gives them
    (the official training feeds fps 6 where ComfyUI's SVD conditioning feeds its fps input minus 1)."""

    def __init__(self, model, trained_names: list[str]):
        if model_family(model.model) != "svd":
            raise ControlNeXtError(f"The video training trains Stable Video Diffusion models (SVD-XT 1.1, as the "
                                   f"official SVD-v2 training); this is a {model_type_name(model.model)} model.")
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


def reference_encoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """The VAE's encoder for the reference picture ([B, 3, H, W] in [-1, 1], noise augmented, so
    possibly a little outside): the distribution's mode, unscaled, as the official script's
    ``latent_dist.mode()`` and ComfyUI's SVD conditioning give it. Called while the VAE is loaded
    beside the training clone (ComfyUI's VAE.encode would load it itself and could evict the clone)."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.first_stage_model.encode(pixels.to(vae.device, vae.vae_dtype)).float()
    return encode
