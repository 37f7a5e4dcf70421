"""Core tests of the SVD-v2 training objective (controlnext_core/video_train.py): the official
script's sigma distribution, UNet inputs, denoising, loss weighting, hands mask and conditioning
dropout, on values worked out by hand."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from controlnext_core import train, video_dataset
from controlnext_core import video_train as vt


def test_sigmas_run_from_the_largest_to_the_smallest_and_one_falls_in_each_stratum():
    ends = vt.sigmas_from_uniform(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == pytest.approx([vt.SIGMA_MAX, vt.SIGMA_MIN], rel=1e-6)
    quantiles = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert bool((vt.sigmas_from_uniform(quantiles).diff() < 0).all())  # monotone: high noise first
    draws = vt.stratified_uniform(8, torch.Generator().manual_seed(0))
    assert ((draws * 8).floor().tolist()) == list(range(8))
    first = vt.draw_sigmas(8, torch.Generator().manual_seed(3))
    assert torch.equal(first, vt.draw_sigmas(8, torch.Generator().manual_seed(3)))  # the generator decides
    assert bool(((first >= vt.SIGMA_MIN * 0.999) & (first <= vt.SIGMA_MAX * 1.001)).all())


def test_unet_inputs_scale_the_noisy_latents_and_take_a_quarter_log_sigma():
    latents, noise = torch.ones(2, 3, 4, 2, 2), torch.full((2, 3, 4, 2, 2), 2.0)
    sigmas = torch.tensor([1.0, 3.0])
    noisy, scaled, timesteps = vt.unet_inputs(latents, noise, sigmas)
    assert noisy[0].unique().tolist() == [3.0] and noisy[1].unique().tolist() == [7.0]
    assert scaled[1].unique().item() == pytest.approx(7.0 / 10 ** 0.5)
    assert timesteps.tolist() == pytest.approx([0.0, 0.25 * torch.tensor(3.0).log().item()])


def test_the_loss_is_the_edm_weighted_error_of_the_denoised_latents():
    latents, noise, sigmas = torch.ones(1, 2, 4, 2, 2), torch.zeros(1, 2, 4, 2, 2), torch.tensor([1.0])
    noisy, _, _ = vt.unet_inputs(latents, noise, sigmas)
    # a zero prediction denoises to c_skip x noisy = 0.5: error 0.25, weighted (1 + 1) / 1
    assert vt.video_loss(torch.zeros_like(latents), noisy, latents, sigmas).item() == pytest.approx(0.5)
    # the prediction that denoises exactly: (latents - c_skip noisy) / c_out
    c_out, c_skip = -1 / 2 ** 0.5, 0.5
    exact = (latents - c_skip * noisy) / c_out
    assert vt.video_loss(exact, noisy, latents, sigmas).item() == pytest.approx(0.0, abs=1e-12)


def test_the_hands_mask_is_pooled_to_the_latents_and_weights_each_place():
    latents, sigmas = torch.ones(2, 1, 4, 2, 2), torch.tensor([1.0, 1.0])
    noisy, _, _ = vt.unet_inputs(latents, torch.zeros_like(latents), sigmas)
    mask = torch.zeros(2, 1, 1, 16, 16)
    mask[0, :, :, :8, :] = 1.0  # the top half of the first sample's frame
    loss = vt.video_loss(torch.zeros_like(latents), noisy, latents, sigmas, mask)
    # sample 0: half its places weighted 1 (loss 0.5 there), sample 1: none; mean over the batch
    assert loss.item() == pytest.approx((0.5 * 0.5 + 0.0) / 2)
    assert vt.pooled_mask(mask, (2, 2))[0, 0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_conditioning_dropout_drops_the_embedding_below_2p_and_the_reference_in_p_to_3p():
    drop, keep = vt.dropout_masks(torch.tensor([0.01, 0.06, 0.12, 0.2, 0.5]), 0.05)
    assert drop.tolist() == [True, True, False, False, False]
    assert keep.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert vt.added_time_ids(2).flatten().tolist() == pytest.approx([6.0, 127.0, 0.02] * 2)


class ToyVideoDenoiser(nn.Module):
    """conv_in -> inject -> one "attention output" linear -> conv_out over frames flattened into the
    batch, with the reference latents in the input's last 4 channels: the shape of SVD's UNet around
    its injection point (after the first down block, 320 channels)."""

    WEIGHT = "down_blocks.0.attentions.0.proj_out.to_out.0.weight"

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(8, 320, 3, padding=1)
        self.to_out = nn.Linear(320, 320)
        self.conv_out = nn.Conv2d(320, 4, 3, padding=1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        self.requires_grad_(False)
        self.trainer, self.calls = None, []

    def unet_weights(self) -> dict[str, torch.Tensor]:
        return {self.WEIGHT: self.to_out.weight, "conv_in.weight": self.conv_in.weight}

    def __call__(self, unet_input, timesteps, image_embeddings, time_ids, inject):
        self.calls.append((unet_input.detach().clone(), image_embeddings.detach().clone(), time_ids))
        batch, frames = unet_input.shape[:2]
        weight = self.trainer.unet_parameters.get(self.WEIGHT, self.to_out.weight)
        h = inject(self.conv_in(unet_input.flatten(0, 1)) + image_embeddings.mean() * 0)
        h = nn.functional.linear(h.movedim(1, -1), weight, self.to_out.bias).movedim(-1, 1)
        return self.conv_out(nn.functional.silu(h)).reshape(batch, frames, 4, *unet_input.shape[-2:])


def toy_reference_latents(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE encoder: 8x8 average pooling, the mean of the colours as a fourth channel."""
    pooled = nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def toy_clips(count: int = 4, frames: int = 3, size: int = 8) -> list[vt.VideoBatch]:
    """Clips whose latents show a square where their pose frames are white, moving a pixel a frame."""
    generator = torch.Generator().manual_seed(1)
    clips = []
    for _ in range(count):
        y, x = torch.randint(0, size * 8 - 24 - frames * 8, (2,), generator=generator).tolist()
        controls = torch.zeros(frames, 3, size * 8, size * 8)
        for frame in range(frames):
            controls[frame, :, y + frame * 8:y + frame * 8 + 24, x:x + 24] = 1.0
        latents = nn.functional.avg_pool2d(controls[:, :1], 8).expand(-1, 4, -1, -1) * 2 - 1
        clips.append(vt.VideoBatch(latents[None], controls[None], torch.randn(1, 1, 16, generator=generator),
                                   controls[0][None] * 2 - 1))
    return clips


def video_trainer(steps: int = 10, **settings):
    toy = ToyVideoDenoiser()
    trainer = vt.VideoTrainer(train.new_encoder(0), toy.unet_weights(),
                              train.TrainingSettings(family="svd", steps=steps, **settings), toy_reference_latents)
    toy.trainer = trainer
    return toy, trainer


def test_the_video_trainer_follows_the_pose_and_trains_the_official_set():
    toy, trainer = video_trainer(steps=40, encoder_lr=1e-3, unet_lr=1e-3)
    assert set(trainer.unet_parameters) == set(toy.unet_weights())  # SVD-v2 trains every UNet weight
    clips, generator = toy_clips(), torch.Generator().manual_seed(2)
    for step in range(40):  # at one noise level: the EDM weighting of the drawn ones spans 1 to 250,000
        clip = clips[step % len(clips)]
        draws = vt.VideoDraws(torch.randn(clip.latents.shape, generator=generator), torch.tensor([1.0]),
                              torch.zeros_like(clip.reference_pixels), torch.tensor([0.5]))
        trainer.step(toy, replace(clip, draws=draws))
    first, last = sum(trainer.losses[:8]) / 8, sum(trainer.losses[-8:]) / 8
    assert last < 0.7 * first, trainer.losses
    trainer.step(toy, clips[0])  # drawn by the trainer
    assert len(trainer.losses) == 41 and math.isfinite(trainer.losses[-1])
    _, selective = video_trainer(unet_pattern=vt.SELECTIVE_UNET_PATTERN)
    assert list(selective.unet_parameters) == [ToyVideoDenoiser.WEIGHT]


def test_the_step_feeds_the_unet_the_scaled_noisy_frames_the_reference_and_the_official_time_ids():
    toy, trainer = video_trainer()
    clip = toy_clips(1)[0]
    draws = vt.VideoDraws(noise=torch.zeros_like(clip.latents), sigmas=torch.tensor([1.0]),
                          reference_noise=torch.zeros_like(clip.reference_pixels), dropout=torch.tensor([0.5]))
    trainer.step(toy, replace(clip, draws=draws))
    unet_input, embeddings, time_ids = toy.calls[-1]
    assert torch.allclose(unet_input[:, :, :4], clip.latents / 2 ** 0.5)  # sigma 1: noisy / sqrt(2)
    assert torch.equal(unet_input[0, 2, 4:], toy_reference_latents(clip.reference_pixels)[0])  # every frame
    assert torch.equal(embeddings, clip.image_embeddings)
    assert time_ids.flatten().tolist() == pytest.approx([6.0, 127.0, 0.02])


def test_the_encoder_pads_as_the_official_training_encoder_does(monkeypatch):
    """train_svd.py's ControlNeXtSDVModel pads every embedding conv (the SVD-v2 inference code, which
    Apply ControlNeXt SVD follows, does not pad two of them)."""
    toy, trainer = video_trainer()
    paddings = []
    forward = type(trainer.encoder).forward
    monkeypatch.setattr(type(trainer.encoder), "forward",
                        lambda self, image, timestep, inner_padding=1: paddings.append(inner_padding) or forward(
                            self, image, timestep, inner_padding))
    trainer.step(toy, toy_clips(1)[0])
    assert paddings == [1] and trainer.rule.embedding_padding == 0


@pytest.mark.parametrize("draw, embedding_kept, reference_kept", [(0.05, False, True), (0.15, False, False),
                                                                   (0.25, True, False), (0.35, True, True)])
def test_conditioning_dropout_reaches_the_unet(draw, embedding_kept, reference_kept):
    toy, trainer = video_trainer()
    clip = toy_clips(1)[0]
    draws = vt.VideoDraws(torch.zeros_like(clip.latents), torch.tensor([1.0]), torch.zeros_like(clip.reference_pixels),
                          torch.tensor([draw]))
    trainer.step(toy, replace(clip, draws=draws))
    unet_input, embeddings, _ = toy.calls[-1]
    assert bool(embeddings.abs().sum() > 0) == embedding_kept
    assert bool(unet_input[:, :, 4:].abs().sum() > 0) == reference_kept


def test_a_resumed_video_run_continues_bit_for_bit(tmp_path):
    from controlnext_core import checkpoints

    clips = toy_clips()
    toy, straight = video_trainer(steps=6, encoder_lr=1e-3, unet_lr=1e-3)
    for step in range(6):
        straight.step(toy, clips[step % 4])
    toy, first = video_trainer(steps=6, encoder_lr=1e-3, unet_lr=1e-3)
    for step in range(3):
        first.step(toy, clips[step % 4])
    folder = checkpoints.save_checkpoint(str(tmp_path), first)
    toy, resumed = video_trainer(steps=6, encoder_lr=1e-3, unet_lr=1e-3)
    checkpoints.resume(folder, resumed)
    for step in range(3, 6):
        resumed.step(toy, clips[step % 4])
    assert resumed.losses == straight.losses
    assert all(torch.equal(p, straight.unet_parameters[n]) for n, p in resumed.unet_parameters.items())


def clip_folders(root, count: int = 3, frames: int = 12, size: int = 64) -> list:
    """Clip folders of the simple layout: a white square moving 2 pixels a frame, drawn on the frames
    and on their poses."""
    generator = torch.Generator().manual_seed(4)
    for clip in range(count):
        y, x = torch.randint(0, size - 24 - 2 * frames, (2,), generator=generator).tolist()
        for part in ("frames", "poses"):
            (root / f"clip{clip}" / part).mkdir(parents=True)
            for frame in range(frames):
                picture = np.zeros((size, size, 3), np.uint8)
                picture[y + 2 * frame:y + 2 * frame + 24, x:x + 24] = 255 if part == "poses" else 180
                Image.fromarray(picture).save(root / f"clip{clip}" / part / f"{frame:03d}.png")
    return video_dataset.read_clip_folders(str(root))


def toy_image_embedding(reference: torch.Tensor) -> torch.Tensor:
    """A stand-in CLIP image embedding: the reference's red channel pooled to 4x4, [1, 16]."""
    return nn.functional.adaptive_avg_pool2d(reference[:1], 4).reshape(1, 16)


def clip_source(root, frames: int = 3) -> vt.ClipSource:
    return vt.ClipSource(clip_folders(root), vt.ClipSampling(frames=frames, interval=2, width=64, height=64),
                         toy_reference_latents, toy_image_embedding)


def test_clips_train_through_the_loop_and_a_resumed_run_draws_the_same_samples(tmp_path):
    from controlnext_core import checkpoints
    from controlnext_core.training_loop import run_training

    source = clip_source(tmp_path)
    batch = source.batch([1], [7])
    assert batch.latents.shape == (1, 3, 4, 8, 8) and batch.controls.shape == (1, 3, 3, 64, 64)
    assert batch.image_embeddings.shape == (1, 1, 16) and batch.reference_pixels.shape == (1, 3, 64, 64)
    assert torch.equal(batch.reference_pixels[0], source.batch([1], [7]).reference_pixels[0])  # the seed decides
    toy, straight = video_trainer(steps=6, encoder_lr=1e-3, unet_lr=1e-3, batch_size=2)
    run_training(straight, toy, source)
    assert len(straight.losses) == 6 and all(math.isfinite(loss) for loss in straight.losses)
    toy, first = video_trainer(steps=3, encoder_lr=1e-3, unet_lr=1e-3, batch_size=2)
    run_training(first, toy, source)
    folder = checkpoints.save_checkpoint(str(tmp_path / "checkpoints"), first)
    toy, resumed = video_trainer(steps=6, encoder_lr=1e-3, unet_lr=1e-3, batch_size=2)
    checkpoints.resume(folder, resumed)  # steps may grow: 3 -> 6
    run_training(resumed, toy, source)
    assert resumed.losses == straight.losses


def test_each_process_reads_its_share_of_the_samples_one_process_draws(tmp_path):
    """Two processes with a batch of one each draw the clips and samples one process with a batch of
    two draws, and each reads only its own."""
    from controlnext_core.processes import Processes

    source = clip_source(tmp_path)
    _, alone = video_trainer(batch_size=2)
    whole = alone.next_batches(source)
    shares = []
    for rank in (0, 1):
        toy = ToyVideoDenoiser()
        trainer = vt.VideoTrainer(train.new_encoder(0), toy.unet_weights(),
                                  train.TrainingSettings(family="svd", steps=10, batch_size=1), toy_reference_latents,
                                  processes=Processes(rank, 2))
        [share] = trainer.next_batches(source)
        shares.append(share)
    [together] = whole
    assert torch.equal(torch.cat([share.latents for share in shares]), together.latents)
    assert torch.equal(torch.cat([share.controls for share in shares]), together.controls)


@pytest.mark.slow
def test_two_gloo_processes_make_the_steps_of_one_process(tmp_path):
    """torchrun, gloo, 2 processes x 1 clip against 1 process x 2 micro-batches of 1 clip (both on one
    thread each): the same clips, samples and draws, the gradients summed over the processes as over
    the micro-batches: losses after 4 steps equal bit for bit, every weight but one too; the toy UNet's
    input convolution to 1e-4 of its size (measured 4.0e-5: its last gradient sums in another order,
    and Adam turns that into part of a step where a gradient is near zero)."""
    import json
    import os
    import subprocess
    import sys

    import safetensors.torch
    from distributed_video_run import trained_state, video_run
    from controlnext_core.processes import Processes

    clip_folders(tmp_path / "clips")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker (OMP_NUM_THREADS=1): a convolution's gradient sums per thread
    try:
        single = video_run(str(tmp_path / "clips"), 4, 1, 2, Processes())
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "two"
    out.mkdir()
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_video_run.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             worker, "--clips", str(tmp_path / "clips"), "--out", str(out), "--steps", "4",
                             "--batch-size", "1"], env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 2 and run["steps_done"] == 4
    assert run["losses"] == single.losses
    weights, expected = safetensors.torch.load_file(str(out / "weights.safetensors")), trained_state(single)
    different = {name: ((weights[name] - value).norm() / value.norm()).item() for name, value in expected.items()
                 if not torch.equal(weights[name], value)}
    assert max(different.values(), default=0.0) <= 1e-4, different
    assert len(different) <= 1, different  # measured: every weight equal bit for bit but the UNet's input conv
    assert not torch.equal(expected["unet." + ToyVideoDenoiser.WEIGHT], ToyVideoDenoiser().unet_weights()[
        ToyVideoDenoiser.WEIGHT])  # it trained


def test_the_commands_video_defaults_are_the_official_recipe():
    """controlnext_train cannot import the core before ComfyUI is found, so it writes the recipe's values
    again: they must stay the recipe's."""
    from controlnext_train import cli

    defaults = cli.build_parser().parse_args([])
    recipe = vt.OFFICIAL_VIDEO_RECIPE
    assert (defaults.sample_n_frames, defaults.interval_frame, defaults.width, defaults.height,
            defaults.conditioning_dropout_prob) == (recipe.frames, recipe.interval_frame, recipe.width, recipe.height,
                                                    recipe.conditioning_dropout)
    assert set(cli.TRAIN_UNET_SVD.values()) == set(vt.VIDEO_TRAINED_SETS)
