"""Agreement with the official SVD-v2 training step (opt-in; README, "Agreement with the official
training code").

One optimiser step of dvlab-research/ControlNeXt's ``ControlNeXt-SVD-v2-Training/train_svd.py``
against ``controlnext_core.video_train.VideoTrainer``, from the same tiny random weights, frames,
poses, image embeddings, hands weights and draws (noise, sigmas, reference noise, dropout), fp32 on
the CPU, batch 2 (one sample with its image embedding and reference latents dropped):

- official: the script's own encoder (``ControlNeXtSDVModel``) and training UNet
  (``UNetSpatioTemporalConditionControlNeXtModel``, its built-in injection after down block 0), its
  ``tensor_to_vae_latent`` and ``rand_cosine_interpolated``, its loop body (lines 1204-1333 at
  ab4b3ac) with the draws given where it calls the random generators, its argument defaults plus
  script.sh's flags, its optimiser (AdamW over every encoder and UNet weight) and LR schedule;
- ours: the VideoTrainer, whose denoiser is a STOCK diffusers ``UNetSpatioTemporalConditionModel``
  with the same weights: the control goes in through a hook after down block 0 and the UNet reads
  the trained weights from ``trainer.unet_parameters``.

Both sides encode with the same deterministic VAE stand-in (the script samples the VAE's latent
distribution; what differs in ComfyUI is said in the README). The image embedding is given (the
script's ``encode_image`` is a closure inside ``main()``). The script clips gradients only through
its DeepSpeed config, so the step is compared without clipping.

It runs only where the official SVD-v2 code runs: diffusers 0.25.1 (the newest release that has
``diffusers.models.unet_3d_blocks``, which the official SVD-v2 models import), with transformers,
accelerate, einops, imageio and opencv, and a checkout of the official repository at
``CONTROLNEXT_OFFICIAL_PATH`` (default ``~/ControlNeXt-official``); anywhere else it skips.
``-s`` prints the measured differences.
"""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch.nn import functional as F

from official_reference import load_script, missing_reference

FOLDER = "ControlNeXt-SVD-v2-Training"
DIFFUSERS_VERSION = "0.25.1"
REFERENCE_MODULES = ("transformers", "accelerate", "einops", "imageio", "cv2")


MISSING = missing_reference(DIFFUSERS_VERSION, REFERENCE_MODULES, [os.path.join(FOLDER, "train_svd.py")])
if MISSING:
    pytest.skip(f"official SVD-v2 training parity needs its reference environment, here no {MISSING} "
                f"(README, 'Agreement with the official training code')", allow_module_level=True)

from diffusers import UNetSpatioTemporalConditionModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402

from controlnext_core import train  # noqa: E402
from controlnext_core import video_train as vt  # noqa: E402

TOLERANCE = 1e-5  # relative: the loss, and the gradients of the encoder and of the UNet
TENSOR_TOLERANCE = 1e-4  # relative: each gradient tensor
NOISE_FLOOR = 1e-6  # of the largest gradient: below it a gradient is rounding noise (see the test)
FRAMES, SIZE, BATCH = 2, 64, 2
# A tiny UNet of the official block types whose first level is 320 wide, the width the official
# encoder outputs; time ids embedded 8 wide each (3 of them), image embeddings 32 wide.
TINY_UNET = dict(sample_size=SIZE // 8, in_channels=8, out_channels=4,
                 down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                 up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                 block_out_channels=(320, 64), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
                 layers_per_block=1, cross_attention_dim=32, transformer_layers_per_block=1,
                 num_attention_heads=(5, 4), num_frames=FRAMES)
# script.sh's flags that change a step; the rest are the script's defaults
SCRIPT_FLAGS = ["--pretrained_model_name_or_path", "unused", "--width=576", "--height=1024", "--lr_warmup_steps", "500",
                "--sample_n_frames", "14", "--interval_frame", "3", "--learning_rate=1e-5", "--per_gpu_batch_size=1",
                "--gradient_accumulation_steps=1"]


class StandInVAE(torch.nn.Module):
    """A deterministic VAE for both sides: 8x8 average pooling and a fixed 1x1 conv to 4 channels,
    what ``tensor_to_vae_latent`` reads as ``latent_dist.sample()``."""

    config = SimpleNamespace(scaling_factor=0.18215)

    def __init__(self, seed: int = 2):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) / 3)
            self.conv.bias.copy_(torch.randn(4, generator=generator) / 10)
        self.requires_grad_(False)  # the script freezes its VAE

    @property
    def dtype(self) -> torch.dtype:
        return self.conv.weight.dtype

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(F.avg_pool2d(pixels, 8))

    def encode(self, pixels: torch.Tensor):
        latents = self.latents(pixels)
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda: latents))


@pytest.fixture(scope="module")
def script():
    return load_script(FOLDER, "train_svd.py", "official_svd_train")


def make_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    hands = torch.zeros(BATCH, FRAMES, 1, SIZE, SIZE)
    hands[:, 1:, :, 8:40, 16:48] = 0.8  # a confident hand after the reference frame
    return {
        "pixel_values": torch.rand(BATCH, FRAMES, 3, SIZE, SIZE, generator=generator) * 2 - 1,
        "guide_values": torch.rand(BATCH, FRAMES, 3, SIZE, SIZE, generator=generator),
        "reference_image": torch.rand(BATCH, 3, SIZE, SIZE, generator=generator) * 2 - 1,
        "image_embeddings": torch.randn(BATCH, 1, 32, generator=generator),
        "hands_mask": hands * 4 + 1,
    }


def make_draws(seed: int = 1) -> vt.VideoDraws:
    generator = torch.Generator().manual_seed(seed)
    return vt.VideoDraws(noise=torch.randn(BATCH, FRAMES, 4, SIZE // 8, SIZE // 8, generator=generator),
                         sigmas=vt.draw_sigmas(BATCH, generator),
                         reference_noise=torch.randn(BATCH, 3, SIZE, SIZE, generator=generator),
                         dropout=torch.tensor([0.15, 0.5]))  # the first sample loses both conditionings


def official_models(script, seed: int = 0):
    torch.manual_seed(seed)
    unet = script.UNetSpatioTemporalConditionControlNeXtModel(**TINY_UNET)
    encoder = script.ControlNeXtSDVModel()
    with torch.no_grad():  # diffusers zero-initialises some layers: give every weight a value
        for parameter in [*unet.parameters(), *encoder.parameters()]:
            parameter.add_(0.02 * torch.randn_like(parameter))
    return unet, encoder


def trained_snapshot(named: dict[str, torch.Tensor], grads: bool = False) -> dict[str, torch.Tensor]:
    return {name: (tensor.grad if grads else tensor).detach().clone() for name, tensor in named.items()}


def official_step(script, args, unet, controlnext, vae, batch: dict, draws: vt.VideoDraws,
                  step_with: dict[str, torch.Tensor] | None = None) -> SimpleNamespace:
    """train_svd.py's loop body for one batch (fp32, one process), its random calls given;
    ``step_with``: gradients the optimiser steps with instead of its own (ours, to compare the
    optimiser alone)."""
    controlnext.requires_grad_(True)
    parameters_list = [{"params": para, "lr": args.learning_rate} for _, para in controlnext.named_parameters()]
    for _, para in unet.named_parameters():  # its "pretraining" branch: every UNet weight
        para.requires_grad = True
        parameters_list.append({"params": para})
    optimizer = torch.optim.AdamW(parameters_list, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=10)
    trained = {**{f"encoder.{n}": p for n, p in controlnext.named_parameters()},
               **{f"unet.{n}": p for n, p in unet.named_parameters()}}
    weight_dtype = torch.float32
    pixel_values = batch["pixel_values"].to(weight_dtype)
    conditional_pixel_values = batch["reference_image"].to(weight_dtype)
    latents = script.tensor_to_vae_latent(pixel_values, vae).to(dtype=weight_dtype)
    encoder_hidden_states = batch["image_embeddings"].to(dtype=weight_dtype)  # encode_image(...)
    train_noise_aug = 0.02
    conditional_pixel_values = conditional_pixel_values + train_noise_aug * draws.reference_noise  # randn_tensor
    conditional_latents = script.tensor_to_vae_latent(conditional_pixel_values, vae, scale=False)
    noise = draws.noise  # torch.randn_like(latents)
    bsz = latents.shape[0]
    sigmas = draws.sigmas.to(latents.device, dtype=weight_dtype)  # rand_cosine_interpolated (checked apart)
    sigmas_reshaped = sigmas.clone()
    while len(sigmas_reshaped.shape) < len(latents.shape):
        sigmas_reshaped = sigmas_reshaped.unsqueeze(-1)
    noisy_latents = latents + noise * sigmas_reshaped
    timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas]).to(latents.device, dtype=weight_dtype)
    inp_noisy_latents = noisy_latents / ((sigmas_reshaped ** 2 + 1) ** 0.5)
    added_time_ids = torch.tensor([[6, 127.0, train_noise_aug]], dtype=encoder_hidden_states.dtype).repeat(bsz, 1)
    random_p = draws.dropout  # torch.rand(bsz, generator=generator)
    prompt_mask = (random_p < 2 * args.conditioning_dropout_prob).reshape(bsz, 1, 1)
    encoder_hidden_states = torch.where(prompt_mask, torch.zeros_like(encoder_hidden_states), encoder_hidden_states)
    image_mask_dtype = conditional_latents.dtype
    image_mask = 1 - ((random_p >= args.conditioning_dropout_prob).to(image_mask_dtype)
                      * (random_p < 3 * args.conditioning_dropout_prob).to(image_mask_dtype))
    conditional_latents = image_mask.reshape(bsz, 1, 1, 1) * conditional_latents
    conditional_latents = conditional_latents.unsqueeze(1).repeat(1, noisy_latents.shape[1], 1, 1, 1)
    controlnext_output = controlnext(batch["guide_values"].to(dtype=weight_dtype), timesteps)
    inp_noisy_latents = torch.cat([inp_noisy_latents, conditional_latents], dim=2)
    target = latents
    model_pred = unet(inp_noisy_latents, timesteps, encoder_hidden_states, added_time_ids=added_time_ids,
                      conditional_controls=controlnext_output).sample
    sigmas = sigmas_reshaped
    c_out = -sigmas / ((sigmas ** 2 + 1) ** 0.5)
    c_skip = 1 / (sigmas ** 2 + 1)
    denoised_latents = model_pred * c_out + c_skip * noisy_latents
    weighing = (1 + sigmas ** 2) * (sigmas ** -2.0)
    hands_mask = batch["hands_mask"].to(dtype=weight_dtype).flatten(0, 1)  # rearrange "b f c h w -> (b f) c h w"
    hands_mask = F.adaptive_avg_pool2d(hands_mask, denoised_latents.shape[-2:])
    hands_mask = hands_mask.reshape(bsz, -1, *hands_mask.shape[1:])
    loss = torch.mean((weighing.float() * (denoised_latents.float() - target.float()) ** 2 * hands_mask
                       ).reshape(target.shape[0], -1), dim=1).mean()
    loss.backward()
    grads = trained_snapshot(trained, grads=True)
    for name, gradient in (step_with or {}).items():
        trained[name].grad.copy_(gradient)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()
    return SimpleNamespace(loss=loss.item(), grads=grads, after=trained_snapshot(trained), latents=latents)


class StockVideoUNet:
    """A stock diffusers SVD UNet as the VideoTrainer's denoiser: ``inject`` on the hidden state after
    down block 0 (its downsampler included, once its skips are stored), the trained weights read
    from ``trainer.unet_parameters``."""

    def __init__(self, unet: UNetSpatioTemporalConditionModel, trainer: vt.VideoTrainer):
        self.unet, self.trainer = unet, trainer

    def __call__(self, unet_input, timesteps, image_embeddings, time_ids, inject):
        def after_first_block(module, args, output):
            sample, res_samples = output
            return inject(sample), res_samples

        handle = self.unet.down_blocks[0].register_forward_hook(after_first_block)
        try:
            return torch.func.functional_call(self.unet, dict(self.trainer.unet_parameters),
                                              (unet_input, timesteps, image_embeddings),
                                              {"added_time_ids": time_ids}).sample
        finally:
            handle.remove()


def our_step(settings: train.TrainingSettings, unet_state: dict, encoder_state: dict, vae: StandInVAE,
             batch: dict, draws: vt.VideoDraws, latents: torch.Tensor) -> SimpleNamespace:
    unet = UNetSpatioTemporalConditionModel(**TINY_UNET)
    unet.load_state_dict(unet_state)
    unet.requires_grad_(False).train()
    encoder = train.new_encoder(0)
    encoder.load_state_dict(encoder_state)
    trainer = vt.VideoTrainer(encoder, dict(unet.named_parameters()), settings, vae.latents,
                              conditioning_dropout=vt.OFFICIAL_VIDEO_RECIPE.conditioning_dropout)
    denoiser = StockVideoUNet(unet, trainer)
    trained = {**{f"encoder.{n}": p for n, p in trainer.encoder.named_parameters()},
               **{f"unet.{n}": p for n, p in trainer.unet_parameters.items()}}
    video_batch = vt.VideoBatch(latents, batch["guide_values"], batch["image_embeddings"], batch["reference_image"],
                                batch["hands_mask"], draws)
    used = []  # the gradients the optimiser steps with
    trainer.optimizer.register_step_pre_hook(lambda *_: used.append(trained_snapshot(trained, grads=True)))
    loss = trainer.step(denoiser, video_batch)
    return SimpleNamespace(loss=loss, grads=used[0], after=trained_snapshot(trained))


def relative(ours: torch.Tensor, official: torch.Tensor) -> float:
    return ((ours - official).norm() / official.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def steps(script):
    with mock.patch.object(sys, "argv", ["train_svd.py", *SCRIPT_FLAGS]):  # it reads the command line itself
        args = script.parse_args()
    vae = StandInVAE()
    unet, encoder = official_models(script)
    unet_state = {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()}
    encoder_state = {name: tensor.detach().clone() for name, tensor in encoder.state_dict().items()}
    initial = {**{f"encoder.{n}": t for n, t in encoder_state.items()}, **{f"unet.{n}": t for n, t in unet_state.items()}}
    batch, draws = make_batch(), make_draws()
    official = official_step(script, args, unet, encoder, vae, batch, draws)
    settings = train.TrainingSettings(family="svd", steps=1, batch_size=BATCH, max_grad_norm=0,
                                      warmup_steps=0)  # 0: no clipping (the script clips only under DeepSpeed)
    ours = our_step(settings, unet_state, encoder_state, vae, batch, draws, official.latents)
    replayed = official_step(script, args, *official_models(script), vae, batch, draws, step_with=ours.grads)
    return SimpleNamespace(args=args, official=official, ours=ours, replayed=replayed, initial=initial)


def test_the_sigmas_are_the_scripts_draws(script):
    """The same uniform draws give the script's sigmas (it draws them from torch's global generator)."""
    for seed in range(5):
        torch.manual_seed(seed)
        official = script.rand_cosine_interpolated(
            shape=[4], image_d=script.image_d, noise_d_low=script.noise_d_low, noise_d_high=script.noise_d_high,
            sigma_data=script.sigma_data, min_value=script.min_value, max_value=script.max_value)
        torch.manual_seed(seed)
        uniform = (torch.arange(4, dtype=torch.float32) + torch.rand(4)) / 4
        assert relative(vt.sigmas_from_uniform(uniform), official) <= 1e-6


def test_loss_and_gradients_agree(steps):
    """The loss; the gradients of the encoder and of the UNet, each group as one vector, to
    TOLERANCE, and each tensor to TENSOR_TOLERANCE (a scalar like a mix factor's gradient is one long
    sum, which fp32 adds in another order); a gradient under NOISE_FLOOR of the largest (the query,
    key and norm of cross-attention over a one-token image embedding: zero in exact arithmetic) is
    rounding noise on both sides."""
    official, ours = steps.official, steps.ours
    assert ours.loss == pytest.approx(official.loss, rel=TOLERANCE)
    assert ours.grads.keys() == official.grads.keys()  # every encoder and UNet weight trained
    floor = NOISE_FLOOR * max(grad.norm().item() for grad in official.grads.values())
    compared = {name: grad for name, grad in official.grads.items() if grad.norm() > floor}
    groups = {group: relative(torch.cat([ours.grads[n].flatten() for n in compared if n.startswith(group)]),
                              torch.cat([compared[n].flatten() for n in compared if n.startswith(group)]))
              for group in ("encoder.", "unet.")}
    worst = max((relative(ours.grads[name], grad), name) for name, grad in compared.items())
    noise = max(ours.grads[name].norm().item() for name in official.grads.keys() - compared.keys())
    print(f"\nSVD-v2 step: loss {ours.loss:.7g} vs {official.loss:.7g} (relative {abs(ours.loss / official.loss - 1):.1e}); "
          f"gradients: encoder {groups['encoder.']:.1e}, UNet {groups['unet.']:.1e}; {len(compared)} of "
          f"{len(official.grads)} tensors compared, worst {worst[0]:.1e} ({worst[1]}); the others at most "
          f"{noise:.1e} on our side (floor {floor:.1e})")
    assert max(groups.values()) <= TOLERANCE, groups
    assert worst[0] <= TENSOR_TOLERANCE, worst
    assert noise <= floor


def test_the_official_optimiser_takes_our_step(steps):
    """The script's AdamW and schedule, given our gradients, leave the weights our trainer leaves."""
    replayed, ours = steps.replayed, steps.ours
    worst = max((ours.after[name] - value).abs().max().item() for name, value in replayed.after.items())
    print(f"\nSVD-v2 weights after the step, ours against the script's optimiser on our gradients: {worst:.1e}")
    assert worst <= 1e-7


def test_our_recipe_is_the_scripts(steps):
    args, recipe = steps.args, train.RECIPES["svd"]
    assert (recipe.encoder_lr, recipe.unet_lr) == (args.learning_rate, args.learning_rate)
    assert args.lr_scheduler == "constant" and recipe.warmup_steps == 0  # 'constant' ignores --lr_warmup_steps
    video = vt.OFFICIAL_VIDEO_RECIPE
    assert video.conditioning_dropout == args.conditioning_dropout_prob
    assert (video.frames, video.interval_frame, video.width, video.height) == (
        args.sample_n_frames, args.interval_frame, args.width, args.height)


