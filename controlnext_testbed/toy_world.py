"""The toy world, trained and kept in a folder: pictures of shapes and their canny controls, a small
autoencoder trained on the pictures, and a base UNet trained unconditionally on its latents (the
pieces are in toy_shapes.py). The convergence study (benchmarks/convergence.py) trains ControlNeXt
and ControlNet on it; the demo (python -m controlnext_demo) trains one ControlNeXt.

Needs ComfyUI on sys.path (comfy_library.use_comfyui): the base is ComfyUI's UNetModel, samples are
drawn with ComfyUI's sampler, and the pack's own modules are imported through comfy_library.pack.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

from . import comfy_library, toy_shapes

COMPUTE_DTYPE = torch.bfloat16  # autocast on the CPU (README, Benchmarks); trained weights stay fp32
HELDOUT_SEED = 1_000_000  # drawing seed of the held-out pictures (training pictures: 0)
SAMPLE_SEED = 77  # the noise of every scored sample: the same for every model compared
BASE_FILE = "toy_base.safetensors"
DATA_FILE = "data.pt"
SUMMARY_FILE = "world.pt"


@dataclasses.dataclass(frozen=True, kw_only=True)
class World:
    """How much is drawn and trained, and how samples are drawn for scoring."""
    train_pictures: int
    heldout_pictures: int
    autoencoder_steps: int
    autoencoder_batch: int
    base_steps: int
    base_batch: int
    base_lr: float
    sampler_steps: int
    sampler: str = "dpmpp_2m"
    scheduler: str = "karras"


def canny(images: torch.Tensor, low=None, high=None) -> torch.Tensor:
    return comfy_library.pack("controlnext_core.preprocess.canny").canny(images, low, high)


def controls_of(pictures: torch.Tensor) -> torch.Tensor:
    return canny(pictures, *toy_shapes.CANNY_THRESHOLDS)


def progress(what: str, step: int, steps: int, loss: float) -> None:
    """A line on stderr at every tenth of a training, with the CPU time so far."""
    if (step + 1) % max(1, steps // 10) == 0:
        print(f"{what}: step {step + 1}/{steps}, loss {loss:.4f}, {time.process_time():.0f} CPU s", file=sys.stderr,
              flush=True)


def train_autoencoder(pictures: torch.Tensor, world: World, seed: int = 0):
    """L1 reconstruction with a little latent noise (so slightly-off latents from the sampler still
    decode), AdamW with a cosine schedule; ``latent_scale`` set so the UNet sees unit spread."""
    torch.manual_seed(seed)
    autoencoder = toy_shapes.ShapeAutoencoder()
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for step in range(world.autoencoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / world.autoencoder_steps))
        images = pictures[torch.randint(0, len(pictures), (world.autoencoder_batch,), generator=generator)]
        target = images.movedim(-1, 1) * 2 - 1
        with torch.autocast("cpu", dtype=COMPUTE_DTYPE):
            latents = autoencoder.encoder(target)
            latents = latents + 0.05 * latents.detach().std() * torch.randn_like(latents)
            decoded = autoencoder.decoder(latents)
        loss = F.l1_loss(decoded.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress("autoencoder", step, world.autoencoder_steps, float(loss.detach()))
    autoencoder.eval().requires_grad_(False)
    with torch.no_grad():
        spread = autoencoder.encoder(pictures[:512].movedim(-1, 1) * 2 - 1).std()
        autoencoder.latent_scale.fill_(1.0 / (float(spread) * 0.18215))  # SD1.5 latent format's factor
    return autoencoder, float(loss.detach())


def unet_call(model, noisy, timesteps, **extra):
    """The UNet called as nodes/train.py's ComfyDenoiser calls it: raw DDPM inputs, fixed context."""
    unet = model.model.diffusion_model
    context = toy_shapes.conditioning(noisy.shape[0])[0][0]
    return unet(noisy, timesteps.float(), context=context, transformer_options={}, **extra)


def noisy_batch(latents: torch.Tensor, generator: torch.Generator):
    """The official training inputs: uniform integer timesteps, the DDPM schedule's add_noise."""
    train = comfy_library.pack("controlnext_core.train")
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, train.TRAIN_TIMESTEPS, (latents.shape[0],), generator=generator)
    return train.add_noise(latents, noise, timesteps, train.ddpm_alphas_cumprod()), noise, timesteps


def train_base(latents: torch.Tensor, world: World, seed: int = 0):
    """The base UNet, unconditionally: MSE on epsilon, AdamW, an exponential moving average of its
    weights (decay 0.99) as the frozen base."""
    torch.manual_seed(seed)
    model = toy_shapes.new_base()
    unet = model.model.diffusion_model.requires_grad_(True)  # ComfyUI v0.33 builds its layers without gradients
    parameters = list(unet.parameters())
    average = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=world.base_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(world.base_steps):
        for group in optimizer.param_groups:
            group["lr"] = world.base_lr * min(1.0, (step + 1) / 50)
        indices = torch.randint(0, len(latents), (world.base_batch,), generator=generator)
        noisy, noise, timesteps = noisy_batch(model.model.process_latent_in(latents[indices]), generator)
        with torch.autocast("cpu", dtype=COMPUTE_DTYPE):
            prediction = unet_call(model, noisy, timesteps)
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(0.99, (1 + step) / (10 + step))
            for kept, param in zip(average, parameters):
                kept.lerp_(param.detach(), 1 - decay)
        losses.append(float(loss.detach()))
        progress("base", step, world.base_steps, losses[-1])
    with torch.no_grad():
        for kept, param in zip(average, parameters):
            param.copy_(kept)
    unet.requires_grad_(False)
    return model, losses


def sample(model, count: int, world: World, positive=None) -> torch.Tensor:
    """ComfyUI's sampler (cfg 1: the conditioned pass only) from fixed noise; ComfyUI latents."""
    import comfy.sample

    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    size = toy_shapes.PICTURE // 8
    noise = torch.randn(count, 4, size, size, generator=generator)
    positive = positive if positive is not None else toy_shapes.conditioning()
    with torch.no_grad():
        return comfy.sample.sample(model, noise, world.sampler_steps, 1.0, world.sampler, world.scheduler, positive,
                                   toy_shapes.conditioning(), torch.zeros_like(noise), seed=SAMPLE_SEED,
                                   disable_pbar=True)


def release_comfy_models() -> None:
    """Unpatch and unload what ComfyUI loaded for sampling, so training reads the plain weights."""
    import comfy.model_management

    comfy.model_management.unload_all_models()


def score(autoencoder, latents: torch.Tensor, controls: torch.Tensor):
    """(per-sample edge IoU with the controls, decoded pictures)."""
    with torch.no_grad():
        pictures = autoencoder.decode(latents.float())
    return toy_shapes.edge_iou(pictures, controls, canny).tolist(), pictures


def build_world(world: World, folder: str) -> dict:
    """Data, autoencoder and base, saved into ``folder`` (and reused from there when it already
    holds them); returns what a report says about them: CPU times, losses, the uncontrolled base's
    and the autoencoder's own edge IoU on the held-out controls, and those pictures."""
    summary_path = os.path.join(folder, SUMMARY_FILE)
    if os.path.exists(summary_path):
        return torch.load(summary_path, weights_only=False)
    started = time.process_time()
    pictures = toy_shapes.draw_pictures(world.train_pictures, 0)
    heldout = toy_shapes.draw_pictures(world.heldout_pictures, HELDOUT_SEED)
    controls, heldout_controls = controls_of(pictures), controls_of(heldout)
    drawn = time.process_time()
    autoencoder, autoencoder_loss = train_autoencoder(pictures, world)
    with torch.no_grad():
        latents = torch.cat([autoencoder.encode(chunk) for chunk in pictures.split(256)])
        reconstructed = autoencoder.decode(autoencoder.encode(heldout))
    encoded = time.process_time()
    model, base_losses = train_base(latents, world)
    based = time.process_time()
    toy_shapes.save_checkpoint(os.path.join(folder, BASE_FILE), model, autoencoder, {"steps": str(world.base_steps)})
    torch.save({"latents": latents, "controls": controls, "heldout_controls": heldout_controls},
               os.path.join(folder, DATA_FILE))
    uncontrolled, base_pictures = score(autoencoder, sample(model, world.heldout_pictures, world), heldout_controls)
    release_comfy_models()
    ceiling = toy_shapes.edge_iou(reconstructed, heldout_controls, canny).tolist()
    summary = {
        "cpu_s": {"data": drawn - started, "autoencoder": encoded - drawn, "base": based - encoded},
        "autoencoder_final_l1": autoencoder_loss,
        "base_loss_first_last_100": [float(np.mean(base_losses[:100])), float(np.mean(base_losses[-100:]))],
        "base_parameters": sum(p.numel() for p in model.model.diffusion_model.parameters()),
        "uncontrolled_iou": uncontrolled,
        "reconstruction_iou": ceiling,
        "pictures": (heldout * 255).round().to(torch.uint8).numpy(),
        "controls": (heldout_controls * 255).round().to(torch.uint8).numpy(),
        "base_samples": (base_pictures * 255).round().to(torch.uint8).numpy(),
    }
    torch.save(summary, summary_path)
    return summary


def load_world(folder: str):
    """(MODEL, ShapeAutoencoder, data) of a folder ``build_world`` filled; data holds the training
    latents (ComfyUI latents) and controls, and the held-out controls."""
    model, autoencoder = toy_shapes.load_checkpoint(os.path.join(folder, BASE_FILE))
    data = torch.load(os.path.join(folder, DATA_FILE))
    model.model.diffusion_model.requires_grad_(False)
    return model, autoencoder, data
