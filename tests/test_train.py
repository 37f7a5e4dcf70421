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
    svd = train.TrainingSettings(family="svd", steps=5).resolved()  # SVD-v2's official recipe
    assert (svd.optimizer, svd.unet_lr, svd.encoder_lr, svd.max_grad_norm, svd.warmup_steps) == \
        ("adamw", 1e-5, 1e-5, 1.0, 0)
    with pytest.raises(cn.ControlNeXtError, match="trains SD1.5, SDXL and SVD"):
        train.TrainingSettings(family="flux", steps=5).resolved()
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


def run_steps(trainer, toy, latents, controls, steps):
    for _ in range(steps):
        indices = trainer.batch_indices(len(latents))
        trainer.step(toy, [train.TrainingBatch(latents[part], controls[part], torch.zeros(1))
                           for part in trainer.micro_batches(indices)])


def trained_state(trainer) -> dict[str, torch.Tensor]:
    return {**{f"encoder.{n}": p.detach().clone() for n, p in trainer.encoder.named_parameters()},
            **{f"unet.{n}": p.detach().clone() for n, p in trainer.unet_parameters.items()}}


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_gradient_accumulation_gives_the_step_of_the_whole_batch(optimizer):
    """2 micro-batches of 2 make the same steps as batches of 4 (same draws, gradients summed). fp32
    sums in another order: the losses agree to 1e-6, the first step's gradient to 1e-5 of its size
    (measured 2.6e-6; each tensor to 1e-4: up to 1.5e-5 where a gradient is a small rest of large
    terms), the weights after 3 steps likewise (all to 1e-5, each tensor to 1e-4: a bias measured
    1.5e-5 on one CPU, under 1e-5 on another, where Adam divides by a tiny second moment)."""
    latents, controls = shapes_dataset(count=6)
    settings = dict(optimizer=optimizer, encoder_lr=1e-3, unet_lr=1e-3, warmup_steps=0)
    runs = []
    for split in ({"batch_size": 4}, {"batch_size": 2, "gradient_accumulation_steps": 2}):
        toy, trainer = trainer_for(**settings, **split)
        gradients = []
        trainer.optimizer.register_step_pre_hook(lambda *_, t=trainer, g=gradients: g.append(
            [p.grad.clone() for p in t.trainable_parameters()]))
        run_steps(trainer, toy, latents, controls, 3)
        runs.append((trainer, gradients))
    (whole, whole_gradients), (parts, parts_gradients) = runs
    assert parts.losses == pytest.approx(whole.losses, rel=1e-6)
    first_whole, first_parts = (torch.cat([g.flatten() for g in step[0]]) for step in (whole_gradients, parts_gradients))
    assert (first_parts - first_whole).norm() <= 1e-5 * first_whole.norm()  # from the same weights
    for expected, actual in zip(whole_gradients[0], parts_gradients[0], strict=True):
        assert (actual - expected).norm() <= 1e-4 * expected.norm()
    expected, actual = trained_state(whole), trained_state(parts)
    assert (torch.cat([v.flatten() for v in actual.values()]) - torch.cat([v.flatten() for v in expected.values()])
            ).norm() <= 1e-5 * torch.cat([v.flatten() for v in expected.values()]).norm()
    for name, value in actual.items():
        assert (value - expected[name]).norm() <= 1e-4 * expected[name].norm(), name  # Adam divides by tiny moments
    assert not torch.equal(expected["unet." + ToyDenoiser.WEIGHT], ToyDenoiser().to_out.weight)  # it trained


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, optimizer):
    """7 steps, a checkpoint, a new process's trainer resumed from it, 5 more steps: the same
    weights, losses and data order as 12 steps in one go (step 7 falls in the middle of an epoch)."""
    from controlnext_core import checkpoints

    latents, controls = shapes_dataset(count=5)
    settings = dict(optimizer=optimizer, encoder_lr=1e-3, unet_lr=1e-3, warmup_steps=4, batch_size=3,
                    proportion_empty_prompts=0.0, steps=12)
    toy, straight = trainer_for(**settings)
    run_steps(straight, toy, latents, controls, 12)

    toy, first = trainer_for(**settings)
    run_steps(first, toy, latents, controls, 7)
    assert first.data_order  # mid-epoch: part of an epoch's order is still to come
    folder = checkpoints.save_checkpoint(str(tmp_path / "checkpoints"), first, {"data": "shapes"})
    toy, resumed = trainer_for(**settings)
    assert "at step 7" in checkpoints.resume(folder, resumed, {"data": "shapes"})
    run_steps(resumed, toy, latents, controls, 5)
    assert resumed.losses == straight.losses and resumed.steps_done == 12
    expected = trained_state(straight)
    assert all(torch.equal(value, expected[name]) for name, value in trained_state(resumed).items())


def test_a_checkpoint_of_another_run_is_refused_naming_each_difference(tmp_path):
    from controlnext_core import checkpoints

    latents, controls = shapes_dataset()
    toy, trainer = trainer_for(batch_size=2, encoder_lr=1e-3)
    run_steps(trainer, toy, latents, controls, 2)
    folder = checkpoints.save_checkpoint(str(tmp_path), trainer, {"data": "a"})
    _, other = trainer_for(batch_size=3, encoder_lr=1e-3, steps=50)  # steps may grow: not a difference
    with pytest.raises(cn.ControlNeXtError) as error:
        checkpoints.resume(folder, other, {"data": "b"})
    assert "2 (2 x 1 x 1) in the checkpoint, 3 (3 x 1 x 1) now" in str(error.value)
    assert "data: 'a' in the checkpoint, 'b' now" in str(error.value) and "steps:" not in str(error.value)
    message = checkpoints.resume(folder, other, {"data": "b"}, new_settings=True)
    assert "new settings" in message and other.steps_done == 0
    assert torch.equal(other.unet_parameters[ToyDenoiser.WEIGHT], trainer.unet_parameters[ToyDenoiser.WEIGHT])


def test_truncated_checkpoints_are_named_and_the_last_k_are_kept(tmp_path, monkeypatch):
    from controlnext_core import checkpoints

    latents, controls = shapes_dataset()
    toy, trainer = trainer_for(batch_size=2)
    for _ in range(4):
        run_steps(trainer, toy, latents, controls, 1)
        checkpoints.save_checkpoint(str(tmp_path), trainer, keep=2)
    assert [step for step, _ in checkpoints.checkpoint_folders(str(tmp_path))] == [3, 4]
    assert checkpoints.latest_checkpoint(str(tmp_path)).endswith("step-4")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import safetensors.torch
    run_steps(trainer, toy, latents, controls, 1)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(cn.ControlNeXtError, match="No space left.*earlier checkpoints .* are unchanged"):
        checkpoints.save_checkpoint(str(tmp_path), trainer, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step-3", "step-4"]  # nothing half-written beside them
    monkeypatch.undo()
    os.remove(tmp_path / "step-4" / checkpoints.STATE_FILE)
    with pytest.raises(cn.ControlNeXtError, match="step-4 is not a complete training checkpoint"):
        checkpoints.resume(str(tmp_path / "step-4"), trainer_for(batch_size=2)[1])
    (tmp_path / "step-3" / checkpoints.INFO_FILE).write_text('{"format": "something else", "version": 1}')
    with pytest.raises(cn.ControlNeXtError, match="not a ControlNeXt training checkpoint"):
        checkpoints.resume(str(tmp_path / "step-3"), trainer_for(batch_size=2)[1])


def test_a_step_stopped_half_way_leaves_the_draws_of_the_last_whole_step(tmp_path):
    """Cancel inside a layer (ComfyUI v0.33) stops a step after its draws: rewound, a checkpoint
    then resumes to the steps of an uninterrupted run."""
    from controlnext_core import checkpoints

    latents, controls = shapes_dataset(count=5)
    settings = dict(batch_size=3, encoder_lr=1e-3, unet_lr=1e-3, optimizer="adamw", warmup_steps=0)
    toy, straight = trainer_for(**settings)
    run_steps(straight, toy, latents, controls, 4)

    toy, stopped = trainer_for(**settings)
    run_steps(stopped, toy, latents, controls, 2)
    before = stopped.draw_state()

    def cancelled_in_a_layer(*args):
        raise KeyboardInterrupt("Cancel")

    indices = stopped.batch_indices(len(latents))
    with pytest.raises(KeyboardInterrupt):
        stopped.step(cancelled_in_a_layer, train.TrainingBatch(latents[indices], controls[indices], torch.zeros(1)))
    stopped.rewind(before)
    folder = checkpoints.save_checkpoint(str(tmp_path), stopped)
    toy, resumed = trainer_for(**settings)
    checkpoints.resume(folder, resumed)
    run_steps(resumed, toy, latents, controls, 2)
    assert resumed.losses == straight.losses
