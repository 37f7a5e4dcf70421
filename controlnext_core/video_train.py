"""The objective of the official SVD-v2 training (ControlNeXt-SVD-v2-Training/train_svd.py), in plain
torch: what one step draws and computes around the UNet, for the video training of issue 21.

EDM-style: sigmas drawn from simple diffusion's interpolated cosine distribution (k-diffusion's
``rand_cosine_interpolated`` with the script's constants), the UNet fed ``noisy / sqrt(sigma² + 1)``
at timestep ``0.25 log sigma``, its output turned into denoised latents with
``c_out = -sigma / sqrt(sigma² + 1)`` and ``c_skip = 1 / (sigma² + 1)``, the loss
``(1 + sigma²) / sigma² · (denoised − latents)²`` weighted by the hands mask pooled to the latent size,
averaged per sample, then over the batch. Conditioning dropout follows InstructPix2Pix as the script
does: one draw per sample drops the image embedding below 2p and the reference latents in [p, 3p).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch.nn import functional as F

from .cross_norm import add_control
from .encoders import ConditionEncoder
from .errors import ControlNeXtError
from .processes import Processes
from .train import Trainer, TrainingSettings
from .dataset import problem_lines
from .video_dataset import ClipFiles, clip_problems, frame_source, read_detections, sample_clip

# the script's constants
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 700.0, 0.5
IMAGE_D, NOISE_D_LOW, NOISE_D_HIGH = 64, 32, 64
TRAIN_NOISE_AUGMENTATION = 0.02  # added to the reference picture before the VAE; also its time id
FPS, MOTION_BUCKET_ID = 6, 127.0  # the added time ids besides the noise augmentation
# The official SVD-v2 training encoder pads every embedding conv; its inference code (which the pack's
# Apply ControlNeXt SVD follows) leaves the 2nd and 3rd unpadded. Training follows the training code.
TRAINING_EMBEDDING_PADDING = 1


@dataclass(frozen=True)
class VideoRecipe:
    """What the official SVD-v2 training runs with besides its optimiser: train_svd.py's defaults and
    script.sh's values. The optimiser side is train.RECIPES["svd"]: AdamW at 1e-5 for the encoder and
    every UNet weight (its "pretraining" branch; the selective one trains SELECTIVE_UNET_PATTERN), no
    warm-up in effect (its lr_scheduler "constant" ignores --lr_warmup_steps), clipping at 1.0 from
    the DeepSpeed config only (its own clipping is commented out)."""

    conditioning_dropout: float = 0.1
    frames: int = 14
    interval_frame: int = 3  # script.sh at ab4b3ac (the script's default: 2)
    width: int = 576
    height: int = 1024
    precision: str = "bf16"
    checkpoint_every: int = 2000
    checkpoints_kept: int = 4
    validation_every: int = 500


OFFICIAL_VIDEO_RECIPE = VideoRecipe()
SELECTIVE_UNET_PATTERN = r"to_out|to_v"  # the script's commented alternative to training every weight
# The trained UNet weights to choose from (re.search patterns; None: the encoder alone): the script's
# default, its selective branch, and no UNet weight.
VIDEO_TRAINED_SETS = {"all": ".", "attention outputs and values": SELECTIVE_UNET_PATTERN, "encoder only": None}


def stratified_uniform(count: int, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """``count`` draws in [0, 1), one in each of ``count`` equal strata (k-diffusion, one group)."""
    offsets = torch.arange(0, count, dtype=dtype, device=device)
    return (offsets + torch.rand(count, generator=generator, dtype=dtype, device=device)) / count


def _logsnr_cosine(t: torch.Tensor, logsnr_min: float, logsnr_max: float) -> torch.Tensor:
    t_min = math.atan(math.exp(-0.5 * logsnr_max))
    t_max = math.atan(math.exp(-0.5 * logsnr_min))
    return -2 * torch.log(torch.tan(t_min + t * (t_max - t_min)))


def _logsnr_cosine_shifted(t: torch.Tensor, noise_d: float, logsnr_min: float, logsnr_max: float) -> torch.Tensor:
    shift = 2 * math.log(noise_d / IMAGE_D)
    return _logsnr_cosine(t, logsnr_min - shift, logsnr_max - shift) + shift


def sigmas_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """The interpolated cosine distribution's sigma at quantile ``u`` (deterministic, for tests)."""
    logsnr_min = -2 * math.log(SIGMA_MIN / SIGMA_DATA)
    logsnr_max = -2 * math.log(SIGMA_MAX / SIGMA_DATA)
    low = _logsnr_cosine_shifted(u, NOISE_D_LOW, logsnr_min, logsnr_max)
    high = _logsnr_cosine_shifted(u, NOISE_D_HIGH, logsnr_min, logsnr_max)
    return torch.exp(-torch.lerp(low, high, u) / 2) * SIGMA_DATA


def draw_sigmas(count: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """One sigma per sample, as the script draws them (stratified over the batch)."""
    return sigmas_from_uniform(stratified_uniform(count, generator, device))


def unet_inputs(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """(noisy latents, the UNet's scaled input, its timesteps) for [B, F, C, H, W] latents."""
    shaped = sigmas.reshape(-1, *([1] * (latents.ndim - 1)))
    noisy = latents + noise * shaped
    return noisy, noisy / (shaped ** 2 + 1) ** 0.5, 0.25 * sigmas.log()


def denoised(prediction: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    shaped = sigmas.reshape(-1, *([1] * (noisy.ndim - 1)))
    return prediction * (-shaped / (shaped ** 2 + 1) ** 0.5) + noisy / (shaped ** 2 + 1)


def pooled_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A [B, F, C, h, w] hands mask averaged down to the latents' [h', w'] (adaptive average pooling)."""
    batch, frames = mask.shape[:2]
    pooled = F.adaptive_avg_pool2d(mask.reshape(batch * frames, *mask.shape[2:]), size)
    return pooled.reshape(batch, frames, *pooled.shape[1:])


def video_loss(prediction: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor,
               hands_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The script's loss: EDM-weighted squared error of the denoised latents, times the pooled hands
    mask where there is one, mean per sample then over the batch (in fp32)."""
    shaped = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).float()
    weighting = (1 + shaped ** 2) * shaped ** -2.0
    error = weighting * (denoised(prediction, noisy, sigmas).float() - latents.float()) ** 2
    if hands_mask is not None:
        error = error * pooled_mask(hands_mask.float(), tuple(latents.shape[-2:]))
    return error.reshape(latents.shape[0], -1).mean(dim=1).mean()


def dropout_masks(draws: torch.Tensor, probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop the image embedding, keep the reference latents as 0/1) per sample from one uniform draw
    each: the embedding is dropped below 2p, the reference latents in [p, 3p), as the script does."""
    drop_embedding = draws < 2 * probability
    keep_reference = 1 - ((draws >= probability).float() * (draws < 3 * probability).float())
    return drop_embedding, keep_reference


def added_time_ids(batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[fps, motion bucket id, noise augmentation] per sample, the script's values."""
    return torch.tensor([[FPS, MOTION_BUCKET_ID, TRAIN_NOISE_AUGMENTATION]], device=device, dtype=dtype).repeat(batch, 1)


@dataclass
class VideoBatch:
    """What one SVD-v2 step trains on (a sample per clip)."""

    latents: torch.Tensor  # [B, F, 4, h, w]: the frames' VAE latents times the scaling factor
    controls: torch.Tensor  # [B, F, 3, H, W] in [0, 1]: the pose frames
    image_embeddings: torch.Tensor  # [B, 1, D]: the reference picture through the CLIP image encoder
    reference_pixels: torch.Tensor  # [B, 3, H, W] in [-1, 1]: the reference picture, for its latents
    weights: torch.Tensor | None = None  # [B, F, 1, H, W]: the loss weights (video_dataset.loss_weights)
    draws: "VideoDraws | None" = None  # given: reproduce a step exactly; None: drawn


@dataclass
class VideoDraws:
    noise: torch.Tensor  # like the latents
    sigmas: torch.Tensor  # [B]
    reference_noise: torch.Tensor  # like the reference pixels
    dropout: torch.Tensor  # [B] uniform draws for the conditioning dropout


@dataclass(frozen=True)
class ClipSampling:
    """How samples are cut from clips (video_dataset.sample_clip)."""

    frames: int = OFFICIAL_VIDEO_RECIPE.frames
    interval: int = OFFICIAL_VIDEO_RECIPE.interval_frame
    width: int = OFFICIAL_VIDEO_RECIPE.width
    height: int = OFFICIAL_VIDEO_RECIPE.height
    guide_slack: int = 0  # the official meta-info data: video_dataset.OFFICIAL_GUIDE_SLACK
    guide_bgr: bool = False  # the official pose videos: True


class ClipSource:
    """The video trainer's samples: each clip drawn is sampled with a seed of its own (drawn by
    ``VideoTrainer.next_batches`` for the whole global batch, so every process and a resumed run
    draw the same samples), its frames through ``encode_frames`` ([F, 3, H, W] in [-1, 1] -> the
    scaled latents [F, 4, h, w]) and its reference frame through ``embed_image`` ([3, H, W] in
    [-1, 1] -> [1, D]). Every clip is checked first (``clip_problems``); the files are opened per
    sample: a data set may hold thousands of clips."""

    def __init__(self, clips: Sequence[ClipFiles], sampling: ClipSampling,
                 encode_frames: Callable[[torch.Tensor], torch.Tensor],
                 embed_image: Callable[[torch.Tensor], torch.Tensor]):
        problems = clip_problems(clips, sampling.frames, sampling.guide_slack)
        if problems:
            raise ControlNeXtError(f"{len(problems)} problem(s) with the clips, found before training; mend them "
                                   f"and run again:\n{problem_lines(problems)}")
        self.clips, self.sampling = list(clips), sampling
        self.encode_frames, self.embed_image = encode_frames, embed_image
        self.count = len(self.clips)

    def batch(self, indices: list[int], seeds: list[int]) -> "VideoBatch":
        sampling, samples = self.sampling, []
        for index, seed in zip(indices, seeds, strict=True):
            clip = self.clips[index]
            samples.append(sample_clip(
                frame_source(clip.video), frame_source(clip.guide),
                read_detections(clip.detections) if clip.detections else None, sampling.frames, sampling.interval,
                sampling.width, sampling.height, torch.Generator().manual_seed(seed),
                guide_slack=sampling.guide_slack, guide_bgr=sampling.guide_bgr))
        with torch.no_grad():
            latents = torch.stack([self.encode_frames(sample.pixels) for sample in samples])
            embeddings = torch.stack([self.embed_image(sample.reference) for sample in samples])
        return VideoBatch(latents, torch.stack([sample.poses for sample in samples]), embeddings,
                          torch.stack([sample.reference for sample in samples]),
                          torch.stack([sample.weights for sample in samples]))


class VideoDenoiser(Protocol):
    """The frozen SVD UNet: ``(input [B, F, 8, h, w], timesteps [B], image embeddings, added time
    ids [B, 3], inject) -> prediction [B, F, 4, h, w]``. It calls ``inject(h)`` on the hidden state
    after its first down block (frames flattened into the batch) and reads the trained UNet weights
    from ``Trainer.unet_parameters``."""

    def __call__(self, unet_input: torch.Tensor, timesteps: torch.Tensor, image_embeddings: torch.Tensor,
                 time_ids: torch.Tensor, inject: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


class VideoTrainer(Trainer):
    """The official SVD-v2 step (above) in the SD1.5/SDXL trainer's frame: the same optimiser groups,
    fp32 masters of the trained UNet weights, loop, checkpoints, resume and processes. Every
    process draws the global batch's noise, sigmas (stratified within each micro-batch, as the
    script stratifies each GPU's batch), reference noise and dropout, and takes its share.
    ``encode_reference`` is the VAE's encoder (unscaled latents, no gradient)."""

    def __init__(self, encoder: ConditionEncoder, unet_weights: Mapping[str, torch.Tensor], settings: TrainingSettings,
                 encode_reference: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
                 processes: Processes = Processes(), conditioning_dropout: float = OFFICIAL_VIDEO_RECIPE.conditioning_dropout):
        if settings.family != "svd":
            raise ControlNeXtError(f"VideoTrainer trains SVD models; use Trainer for {settings.family}.")
        super().__init__(encoder, unet_weights, settings, device, None, processes)
        self.encode_reference, self.conditioning_dropout = encode_reference, conditioning_dropout

    def loss(self, denoiser: VideoDenoiser, batch: VideoBatch, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        batch = self._with_draws([batch])[0]
        draws, device = batch.draws, self.device
        latents = batch.latents.to(device)
        count, frames = latents.shape[:2]
        noisy, unet_input, timesteps = unet_inputs(latents, draws.noise.to(device), draws.sigmas.to(device))
        with torch.no_grad():
            reference = self.encode_reference(batch.reference_pixels.to(device)
                                              + TRAIN_NOISE_AUGMENTATION * draws.reference_noise.to(device))
        drop_embedding, keep_reference = dropout_masks(draws.dropout.to(device), self.conditioning_dropout)
        embeddings = batch.image_embeddings.to(device)
        embeddings = torch.where(drop_embedding.reshape(-1, 1, 1), torch.zeros_like(embeddings), embeddings)
        reference = (reference * keep_reference.reshape(-1, 1, 1, 1)).to(unet_input.dtype)
        unet_input = torch.cat([unet_input, reference[:, None].expand(-1, frames, -1, -1, -1)], dim=2)
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else torch.autocast(device.type, enabled=False))
        with autocast:
            control = self.encoder(batch.controls.to(device).flatten(0, 1), timesteps.repeat_interleave(frames),
                                   TRAINING_EMBEDDING_PADDING)
            scale = self.settings.control_scale

            def inject(hidden: torch.Tensor) -> torch.Tensor:
                return add_control(hidden, control, self.rule, scale)

            prediction = denoiser(unet_input, timesteps, embeddings, added_time_ids(count, device), inject)
        weights = None if batch.weights is None else batch.weights.to(device)
        return video_loss(prediction, noisy, latents, draws.sigmas.to(device), weights)

    def next_batches(self, source: ClipSource, empty: None = None) -> list[VideoBatch]:
        """This process's micro-batches of the next step: the global batch's clips and a sampling
        seed for each, drawn alike by every process, the share of this process read from ``source``."""
        indices = self.batch_indices(source.count)
        seeds = torch.randint(0, 2 ** 62, (len(indices),), generator=self.data_generator).tolist()
        indices, seeds = self.processes.share(indices), self.processes.share(seeds)
        return [source.batch(part, part_seeds)
                for part, part_seeds in zip(self.micro_batches(indices), self.micro_batches(seeds))]

    def _with_draws(self, parts: list[VideoBatch]) -> list[VideoBatch]:
        if all(part.draws is not None for part in parts):
            return parts
        sizes = [part.latents.shape[0] for part in parts]
        share = sum(sizes)
        total = share * self.processes.count
        first = parts[0]
        noise = torch.randn((total, *first.latents.shape[1:]), generator=self.generator, device=self.device)
        sigmas = torch.cat([draw_sigmas(size, self.generator, self.device)
                            for _ in range(self.processes.count) for size in sizes])
        reference_noise = torch.randn((total, *first.reference_pixels.shape[1:]), generator=self.generator,
                                      device=self.device)
        dropout = torch.rand(total, generator=self.generator, device=self.device)
        mine = slice(self.processes.rank * share, (self.processes.rank + 1) * share)
        split = [tensor[mine].split(sizes) for tensor in (noise, sigmas, reference_noise, dropout)]
        return [replace(part, draws=part.draws or VideoDraws(*values)) for part, *values in zip(parts, *split)]
