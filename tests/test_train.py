"""Core tests of the trainer (plain torch, no ComfyUI): the official step's pieces, a toy
denoiser that learns, divergence, and the release files it saves."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import controlnext_core as cn
from controlnext_core import train
from controlnext_testbed.official_layouts import OFFICIAL_KEYS, random_encoder_state_dict


class ToyDenoiser(nn.Module):
    """conv_in -> inject -> one "attention output" linear -> conv_out: the shape of a UNet around
    SDXL's injection point, with a weight named like the trained UNet subset."""

    WEIGHT = "down.attn2.to_out.0.weight"

    def __init__(self, channels: int = 320):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(4, channels, 3, padding=1)
        self.to_out = nn.Linear(channels, channels)
        self.conv_out = nn.Conv2d(channels, 4, 3, padding=1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        self.requires_grad_(False)
        self.trainer = None

    def unet_weights(self) -> dict[str, torch.Tensor]:
        return {self.WEIGHT: self.to_out.weight, "down.attn1.to_out.0.weight": self.to_out.weight,
                "conv_in.weight": self.conv_in.weight}

    def __call__(self, noisy, timesteps, conditioning, inject):
        weight = self.trainer.unet_parameters.get(self.WEIGHT, self.to_out.weight)
        h = inject(self.conv_in(noisy + conditioning))
        h = nn.functional.linear(h.movedim(1, -1), weight, self.to_out.bias).movedim(-1, 1)
        return self.conv_out(nn.functional.silu(h))


def shapes_dataset(count: int = 4, size: int = 8):
    """Latents whose content the control image says: a bright square where the control is white."""
    generator = torch.Generator().manual_seed(1)
    controls, latents = [], []
    for _ in range(count):
        y, x = torch.randint(0, size * 8 - 24, (2,), generator=generator).tolist()
        control = torch.zeros(3, size * 8, size * 8)
        control[:, y:y + 24, x:x + 24] = 1.0
        controls.append(control)
        latents.append(nn.functional.avg_pool2d(control[:1], 8).expand(4, -1, -1) * 2 - 1)
    return torch.stack(latents), torch.stack(controls)


def trainer_for(family="sdxl", **settings):
    toy = ToyDenoiser()
    trainer = train.Trainer(train.new_encoder(0), toy.unet_weights(),
                            train.TrainingSettings(family=family, **{"steps": 10, **settings}))
    toy.trainer = trainer
    return toy, trainer


def test_schedule_and_targets_are_diffusers_ddpm():
    alphas = train.ddpm_alphas_cumprod()
    assert alphas.dtype == torch.float32 and alphas.shape == (1000,)
    assert alphas[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert alphas[-1].item() == pytest.approx(0.0047, abs=1e-4)
    x0, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0, 999])
    noisy = train.add_noise(x0, noise, t, alphas)
    a = alphas[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert torch.allclose(train.velocity(x0, noise, t, alphas), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_official_unet_subsets_on_the_released_names():
    sd15 = list(OFFICIAL_KEYS["sd15_unet_subset"])
    sdxl = list(OFFICIAL_KEYS["sdxl_unet_deltas"])
    assert train.trainable_unet_names(sd15, "sd15") == sd15  # attn1 and attn2 outputs: 64 tensors
    assert train.trainable_unet_names(sdxl, "sdxl") == sdxl  # attn2 outputs only: 140 tensors
    assert not [n for n in train.trainable_unet_names(sd15, "sdxl") if "attn1" in n]
    assert len(sd15) == 64 and len(sdxl) == 140


def test_recipes_resolve_and_bad_settings_are_named():
    sd15 = train.TrainingSettings(family="sd15", steps=5).resolved()
    assert (sd15.optimizer, sd15.unet_lr, sd15.encoder_lr, sd15.max_grad_norm) == ("adamw", 5e-6, 5e-5, None)
    sdxl = train.TrainingSettings(family="sdxl", steps=5).resolved()
    assert (sdxl.optimizer, sdxl.unet_lr, sdxl.encoder_lr, sdxl.max_grad_norm, sdxl.warmup_steps) == \
        ("adafactor", 1e-5, 1e-4, 1.0, 500)
    with pytest.raises(cn.ControlNeXtError, match="trains SD1.5 and SDXL"):
        train.TrainingSettings(family="svd", steps=5).resolved()
    with pytest.raises(cn.ControlNeXtError, match="steps is 0"):
        train.TrainingSettings(family="sd15", steps=0).resolved()
    with pytest.raises(cn.ControlNeXtError, match="proportion_empty_prompts"):
        train.TrainingSettings(family="sd15", steps=1, proportion_empty_prompts=1.5).resolved()


def test_warmup_starts_at_zero_as_diffusers_constant_with_warmup():
    assert [train.warmup_factor(step, 4) for step in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert train.warmup_factor(0, 0) == 1.0


def test_only_the_base_layout_trains():
    with pytest.raises(cn.ControlNeXtError, match="official training code"):
        train.Trainer(cn.load_encoder(random_encoder_state_dict("mid")), {},
                      train.TrainingSettings(family="sd15", steps=1))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_a_toy_denoiser_learns_to_follow_the_control(optimizer):
    latents, controls = shapes_dataset()
    toy, trainer = trainer_for(optimizer=optimizer, encoder_lr=1e-3, unet_lr=1e-3, warmup_steps=0, batch_size=2)
    base_weight = toy.to_out.weight.clone()
    fixed = train.TrainingBatch(latents, controls, torch.zeros(1), noise=torch.randn(latents.shape),
                                timesteps=torch.full((4,), 500))
    before = trainer.loss(toy, fixed).item()
    for _ in range(30):
        indices = trainer.batch_indices(len(latents))
        trainer.step(toy, train.TrainingBatch(latents[indices], controls[indices], torch.zeros(1)))
    after = trainer.loss(toy, fixed).item()
    assert after < 0.9 * before, (before, after)
    assert len(trainer.losses) == 30 and trainer.steps_done == 30
    # the trained UNet weight moved in its fp32 master; the frozen module was never written
    assert torch.equal(toy.to_out.weight, base_weight)
    assert not torch.equal(trainer.unet_parameters[ToyDenoiser.WEIGHT], base_weight)
    assert trainer.unet_parameters[ToyDenoiser.WEIGHT].dtype == torch.float32


def test_train_unet_off_trains_the_encoder_only():
    _, trainer = trainer_for(train_unet=False)
    assert trainer.unet_parameters == {}
    assert len(trainer.optimizer.param_groups) == 1


def test_sdxl_trains_attn2_outputs_and_sd15_every_attention_output():
    _, sdxl = trainer_for("sdxl")
    _, sd15 = trainer_for("sd15")
    assert list(sdxl.unet_parameters) == [ToyDenoiser.WEIGHT]
    assert sorted(sd15.unet_parameters) == sorted([ToyDenoiser.WEIGHT, "down.attn1.to_out.0.weight"])


def test_nan_loss_stops_and_keeps_the_last_good_weights():
    latents, controls = shapes_dataset(2)
    toy, trainer = trainer_for(warmup_steps=0)
    batch = train.TrainingBatch(latents, controls, torch.zeros(1))
    trainer.step(toy, batch)
    good = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    with pytest.raises(train.TrainingDiverged, match="at step 2.*weights of step 1"):
        trainer.step(toy, train.TrainingBatch(latents, controls, torch.full((1,), float("nan"))))
    assert all(torch.equal(good[k], v) for k, v in trainer.encoder.state_dict().items())
    assert trainer.steps_done == 1


def test_batches_cover_each_epoch_and_empty_prompts_follow_the_proportion():
    _, trainer = trainer_for(batch_size=3, proportion_empty_prompts=0.25)
    drawn = [i for _ in range(4) for i in trainer.batch_indices(6)]
    assert sorted(drawn[:6]) == list(range(6)) and sorted(drawn[6:12]) == list(range(6))
    draws = [flag for _ in range(400) for flag in trainer.empty_prompt_mask(10)]
    assert 0.2 < sum(draws) / len(draws) < 0.3


def test_saved_release_loads_back_identically_and_never_overwrites(tmp_path):
    latents, controls = shapes_dataset(2)
    toy, trainer = trainer_for(control_scale=0.35, warmup_steps=0)
    trainer.step(toy, train.TrainingBatch(latents, controls, torch.zeros(1)))
    encoder = trainer.finish()
    unet = train.release_unet_weights(trainer.trained_unet(), toy.unet_weights(), "sdxl")
    assert torch.allclose(unet[ToyDenoiser.WEIGHT] + toy.to_out.weight, trainer.unet_parameters[ToyDenoiser.WEIGHT])
    metadata = train.release_metadata("sdxl", 0.35, trainer.steps_done, "toy.safetensors")
    folder = os.path.join(tmp_path, "mine")
    paths = train.save_release(folder, encoder, unet, metadata)
    assert sorted(os.listdir(folder)) == ["controlnet.safetensors", "unet.safetensors"]  # no temporary left
    loaded = cn.load_encoder(cn.load_state_dict_file(paths[0]), cn.read_file_metadata(paths[0]))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in encoder.state_dict().items())
    bound = cn.bind(loaded, "sdxl")
    assert bound.scale == 0.35 and cn.read_file_metadata(paths[0])["family"] == "sdxl"
    image, t = torch.rand(1, 3, 64, 64), torch.tensor([300])
    assert torch.equal(bound.encode(image, t), cn.bind(encoder, "sdxl").encode(image, t))
    assert torch.equal(cn.load_state_dict_file(paths[1])[ToyDenoiser.WEIGHT], unet[ToyDenoiser.WEIGHT])
    before = open(paths[0], "rb").read()
    with pytest.raises(cn.ControlNeXtError, match="already exists"):
        train.save_release(folder, encoder, unet, metadata)
    assert open(paths[0], "rb").read() == before
    train.save_release(folder, encoder, None, metadata, overwrite=True)


def test_official_files_without_metadata_load_at_scale_one(tmp_path):
    import safetensors.torch

    path = os.path.join(tmp_path, "controlnet.safetensors")
    safetensors.torch.save_file(random_encoder_state_dict("base"), path)
    assert cn.bind(cn.load_encoder(cn.load_state_dict_file(path), cn.read_file_metadata(path)), "sdxl").scale == 1.0
    with pytest.raises(cn.ControlNeXtError, match="not a number"):
        cn.load_encoder(random_encoder_state_dict("base"), {"control_scale": "lots"})
