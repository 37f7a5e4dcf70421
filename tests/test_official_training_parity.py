"""Agreement with the official training code (opt-in; README, "Agreement with the official
training code").

Two optimiser steps of dvlab-research/ControlNeXt's ``ControlNeXt-SD1.5-Training/`` and
``ControlNeXt-SDXL-Training/`` against ``controlnext_core.train.Trainer``, from the same tiny
random weights, batches, noise and timesteps, fp32 on the CPU:

- official: the training script's own encoder class and modified training UNet (its built-in
  injection), its argument defaults plus the flags of its shell examples, its optimiser, LR
  schedule and clipping as the script builds them, through an ``accelerate.Accelerator``, and
  its saving code (SDXL ``save_models``; the SD1.5 checkpoint block, which lives inside
  ``main()``, with the same calls);
- ours: the Trainer, whose denoiser is a STOCK diffusers ``UNet2DConditionModel`` with the same
  weights: the control goes in through hooks at the official point and the UNet reads the
  trained weights from ``trainer.unet_parameters``.

It runs only where the official code runs: diffusers 0.30.3 with transformers, accelerate,
datasets, opencv and einops, and a checkout of the official repository at
``CONTROLNEXT_OFFICIAL_PATH`` (default ``~/ControlNeXt-official``); anywhere else it skips.
``-s`` prints the measured differences.
"""
from __future__ import annotations

import copy
import os
import re
import types
from dataclasses import dataclass, field

import pytest
import torch
from torch.nn import functional as F

from official_reference import load_script, missing_reference

FOLDERS = {"sd15": "ControlNeXt-SD1.5-Training", "sdxl": "ControlNeXt-SDXL-Training"}
DIFFUSERS_VERSION = "0.30.3"  # the version the official training code was written against
REFERENCE_MODULES = ("transformers", "accelerate", "datasets", "cv2", "einops")  # what its scripts import


MISSING = missing_reference(DIFFUSERS_VERSION, REFERENCE_MODULES,
                            [os.path.join(folder, "train_controlnext.py") for folder in FOLDERS.values()])
if MISSING:
    pytest.skip(f"official training parity needs the reference environment, here no {MISSING} "
                f"(README, 'Agreement with the official training code')", allow_module_level=True)

from transformers.optimization import Adafactor as TransformersAdafactor  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from controlnext_core import train  # noqa: E402

# the official encoder passes its time embedding to diffusers' Downsample2D, which warns and ignores it
pytestmark = pytest.mark.filterwarnings("ignore:`scale` is deprecated:FutureWarning")

TOLERANCE = 1e-5  # relative: loss, gradients, weights and updates after each step
FILE_TOLERANCE = 1e-6  # absolute: the values in the saved release files
STEPS = 2  # the first Adafactor / AdamW step is nearly sign(grad); the second uses the optimiser state

# Tiny UNets with the official block types and a first width of 320, the channel count the
# official encoders output: SD1.5 injects after down block 0, SDXL after conv_in, both 320 wide,
# so no official class needs changing.
TINY_UNETS = {
    "sd15": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32),
    "sdxl": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
                 transformer_layers_per_block=1, norm_num_groups=32, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
}
LATENT_SIZE = 8
# Control image side per latent pixel. SD1.5: the encoder's /8 output is pooled to down block 0's
# /16. SDXL: twice the usual size, so that the encoder output is pooled there too and the order
# (normalise, then pool) matters.
CONTROL_PER_LATENT = {"sd15": 8, "sdxl": 16}

# The flags of the official shell examples that change a step (SD1.5 README / scripts.sh, SDXL
# examples/vidit_depth/train.sh), plus, for SDXL, no warm-up (else the first step has lr 0) and
# increments saved (its ``type=bool`` flag takes any non-empty value as True).
REQUIRED_FLAGS = ["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused"]
EXAMPLE_FLAGS = {
    "sd15": ["--learning_rate=1e-5", "--controlnext_scale", "0.35", "--save_load_weights_increaments"],
    "sdxl": ["--controlnet_scale_factor", "1.0", "--set_grads_to_none", "--lr_warmup_steps", "0",
             "--save_weights_increaments", "1"],
}
# (family, prediction type, extra flags): v-prediction on both, and SDXL's canny control scale
CASES = [
    ("sd15", "epsilon", []),
    ("sd15", "v_prediction", []),
    ("sdxl", "epsilon", []),
    ("sdxl", "v_prediction", ["--controlnet_scale_factor", "0.35"]),
]
CASE_IDS = [f"{family}-{prediction}" for family, prediction, _ in CASES]


# ------------------------------------------------------------------------------------------------
# loading the official code
# ------------------------------------------------------------------------------------------------

def _load_script(family: str) -> types.ModuleType:
    return load_script(FOLDERS[family], "train_controlnext.py", f"official_{family}_train")


@pytest.fixture(scope="module")
def scripts() -> dict[str, types.ModuleType]:
    return {family: _load_script(family) for family in FOLDERS}


def official_args(script: types.ModuleType, flags: list[str]):
    return script.parse_args(REQUIRED_FLAGS + flags)


# ------------------------------------------------------------------------------------------------
# one run on each side
# ------------------------------------------------------------------------------------------------

def make_batch(family: str, seed: int) -> dict:
    """One step's inputs: latents as the VAE gives them (scaled), noise, integer timesteps,
    control images in [0,1], text conditioning (SDXL: pooled embeds and the official time ids)."""
    generator = torch.Generator().manual_seed(seed)
    size, control = LATENT_SIZE, LATENT_SIZE * CONTROL_PER_LATENT[family]
    batch = {
        "latents": torch.randn(2, 4, size, size, generator=generator),
        "noise": torch.randn(2, 4, size, size, generator=generator),
        "timesteps": torch.randint(0, train.TRAIN_TIMESTEPS, (2,), generator=generator),
        "control": torch.rand(2, 3, control, control, generator=generator),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=generator),
    }
    if family == "sdxl":
        resolution = float(8 * size)  # (original size, crop top-left, target size), as the script builds them
        batch["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=generator),
                                      "time_ids": torch.tensor([[resolution, resolution, 0.0, 0.0,
                                                                 resolution, resolution]] * 2)}
    return batch


@dataclass
class Run:
    """What one side did: per step the loss, the gradients from backward, the gradients the
    optimiser used (after clipping) and the trained values after the step; then the saved files."""

    initial: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    used_grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    after: list[dict[str, torch.Tensor]] = field(default_factory=list)
    files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _snapshot(named: dict[str, torch.Tensor], grads: bool = False) -> dict[str, torch.Tensor]:
    return {name: (tensor.grad if grads else tensor).detach().clone() for name, tensor in named.items()}


def _target(scheduler: DDPMScheduler, batch: dict) -> torch.Tensor:
    if scheduler.config.prediction_type == "epsilon":
        return batch["noise"]
    return scheduler.get_velocity(batch["latents"], batch["noise"], batch["timesteps"])


def official_run(family: str, script, args, prediction: str, unet, encoder, batches: list[dict],
                 replay: Run | None = None, folder: str | None = None) -> Run:
    """The official steps, line for line from ``train_controlnext.py``'s ``main()`` (which needs a
    hub model and a dataset), on the official modules, everything on the CPU; then the official
    saving into ``folder``.

    With ``replay`` (a run of ours) each step still computes the official loss and gradients, at
    the weights the official optimiser reached, then steps with the replayed run's gradients: each
    stage (forward and backward, clipping and optimiser, saving) meets the same inputs as ours.
    """
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, cpu=True)
    # from_pretrained(base, subfolder="scheduler"): these are the keys of the SD1.5 / SDXL configs that
    # add_noise and get_velocity read
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", prediction_type=prediction)
    if family == "sd15":
        unet.requires_grad_(False)
        encoder.train()
        unet.train()
        params_to_optimize = [{"params": encoder.parameters(), "lr": args.learning_rate * 10}]
        pretrained_trainable_params = {}
        for name, para in unet.named_parameters():
            if "to_out" in name:
                para.requires_grad = True
                para.data = para.to(torch.float32)
                params_to_optimize.append({"params": para})
                # the script's para.detach().cpu() is a snapshot on a GPU run; on the CPU it would alias
                pretrained_trainable_params[name] = para.detach().cpu().clone()
            else:
                para.requires_grad = False
        optimizer = torch.optim.AdamW(params_to_optimize, lr=args.learning_rate,
                                      betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    else:
        orig_unet_sd = copy.deepcopy(unet.state_dict()) if args.save_weights_increaments else None
        assert args.optimizer_type == "adafactor"
        optimizer_kwargs = dict(relative_step=args.adafactor_relative_step,
                                scale_parameter=args.adafactor_scale_parameter,
                                warmup_init=args.adafactor_warmup_init)
        encoder.train()
        encoder.requires_grad_(True)
        params_to_optimize = [{"params": list(encoder.parameters()), "lr": args.learning_rate_controlnet}]
        unet.train()
        unet.requires_grad_(True)
        unet_params = []
        pattern = re.compile(args.unet_trainable_param_pattern)
        for name, param in unet.named_parameters():
            if pattern.match(name):
                param.requires_grad = True
                unet_params.append(param)
            else:
                param.requires_grad = False
        params_to_optimize.append({"params": unet_params, "lr": args.learning_rate})
        optimizer = TransformersAdafactor(params_to_optimize, lr=args.learning_rate, **optimizer_kwargs)
        encoder = encoder.to(accelerator.device, dtype=torch.float32)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=1000 * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    encoder, unet, optimizer, lr_scheduler = accelerator.prepare(encoder, unet, optimizer, lr_scheduler)
    trained = {**{f"encoder.{n}": p for n, p in encoder.named_parameters()},
               **{f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}}
    run = Run(initial=_snapshot(trained))

    for step, batch in enumerate(batches):
        with accelerator.accumulate(encoder, unet):
            latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            if family == "sd15":
                controlnext_output = encoder(batch["control"].to(dtype=torch.float32), timesteps)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=batch["encoder_hidden_states"],
                                  conditional_controls=controlnext_output, return_dict=False)[0]
            else:
                controls = encoder(batch["control"].to(accelerator.device, dtype=torch.float32), timesteps)
                controls["scale"] *= args.controlnet_scale_factor
                with accelerator.autocast():
                    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=batch["encoder_hidden_states"],
                                      added_cond_kwargs=batch["added_cond_kwargs"], controls=controls,
                                      return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), _target(noise_scheduler, batch).float(), reduction="mean")
            accelerator.backward(loss)
            run.losses.append(loss.item())
            run.grads.append(_snapshot(trained, grads=True))
            if replay is not None:
                for name, param in trained.items():
                    param.grad.copy_(replay.grads[step][name])
            if family == "sdxl" and accelerator.sync_gradients:  # SD1.5: the clipping call is commented out
                params_to_clip = [p for group in params_to_optimize for p in group["params"]]
                accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
            run.used_grads.append(_snapshot(trained, grads=True))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=args.set_grads_to_none)
            run.after.append(_snapshot(trained))
    if folder is None:
        return run

    os.makedirs(folder)
    if family == "sd15":  # the checkpoint block of main(), both branches of --save_load_weights_increaments
        torch.save(accelerator.unwrap_model(copy.deepcopy(encoder)).cpu().state_dict(),
                   os.path.join(folder, "controlnext.bin"))
        unet_state_dict = accelerator.unwrap_model(unet).state_dict()
        torch.save({name: copy.deepcopy(unet_state_dict[name]).detach().cpu() for name in pretrained_trainable_params},
                   os.path.join(folder, "unet.bin"))
        torch.save({name: copy.deepcopy(unet_state_dict[name]).detach().cpu() - paras
                    for name, paras in pretrained_trainable_params.items()},
                   os.path.join(folder, "unet_weight_increasements.bin"))
        run.files = {name: torch.load(os.path.join(folder, name), weights_only=True) for name in os.listdir(folder)}
    else:
        script.save_models(accelerator.unwrap_model(unet), accelerator.unwrap_model(encoder), folder, args,
                           orig_unet_sd)
        run.files = {name: load_file(os.path.join(folder, name)) for name in os.listdir(folder)}
    return run


class StockUNetDenoiser:
    """A stock diffusers UNet as the Trainer's denoiser: ``inject`` at the official point through a
    hook, the trained weights read from ``trainer.unet_parameters``."""

    def __init__(self, unet: UNet2DConditionModel, family: str, trainer: train.Trainer):
        self.unet, self.family, self.trainer = unet, family, trainer

    def __call__(self, noisy, timesteps, conditioning, inject):
        first_block = self.unet.down_blocks[0]
        if self.family == "sd15":
            # after down block 0 (its downsampler included), once its skips are stored: only the
            # path into down block 1 is controlled
            def after_first_block(module, args, output):
                sample, res_samples = output
                return inject(sample), res_samples

            handle = first_block.register_forward_hook(after_first_block)
        else:
            # after conv_in, whose output was already stored as the first skip
            def before_first_block(module, args, kwargs):
                return args, {**kwargs, "hidden_states": inject(kwargs["hidden_states"])}

            handle = first_block.register_forward_pre_hook(before_first_block, with_kwargs=True)
        try:
            return torch.func.functional_call(self.unet, dict(self.trainer.unet_parameters), (noisy, timesteps),
                                              conditioning).sample
        finally:
            handle.remove()


def training_batch(batch: dict) -> train.TrainingBatch:
    conditioning = {key: batch[key] for key in ("encoder_hidden_states", "added_cond_kwargs") if key in batch}
    return train.TrainingBatch(batch["latents"], batch["control"], conditioning, noise=batch["noise"],
                               timesteps=batch["timesteps"])


def our_run(family: str, settings: train.TrainingSettings, unet_state: dict, encoder_state: dict,
            batches: list[dict], folder: str) -> Run:
    unet = UNet2DConditionModel(**TINY_UNETS[family])
    unet.load_state_dict(unet_state)
    unet.requires_grad_(False).train()
    encoder = train.new_encoder(0)
    encoder.load_state_dict(encoder_state)
    trainer = train.Trainer(encoder, dict(unet.named_parameters()), settings)
    denoiser = StockUNetDenoiser(unet, family, trainer)
    trained = {**{f"encoder.{n}": p for n, p in trainer.encoder.named_parameters()},
               **{f"unet.{n}": p for n, p in trainer.unet_parameters.items()}}
    run = Run(initial=_snapshot(trained))
    trainer.optimizer.register_step_pre_hook(lambda *_: run.used_grads.append(_snapshot(trained, grads=True)))
    for batch in batches:
        step_batch = training_batch(batch)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.loss(denoiser, step_batch).backward()
        run.grads.append(_snapshot(trained, grads=True))
        run.losses.append(trainer.step(denoiser, step_batch))
        run.after.append(_snapshot(trained))
    base = {name: tensor.detach() for name, tensor in unet.named_parameters()}
    unet_file = train.release_unet_weights(trainer.trained_unet(), base, family)
    metadata = train.release_metadata(family, settings.control_scale, trainer.steps_done, "tiny test UNet")
    paths = train.save_release(folder, trainer.finish(), unet_file, metadata)
    run.files = {os.path.basename(path): load_file(path) for path in paths}
    return run


def our_settings(family: str, args, prediction: str) -> train.TrainingSettings:
    """Our settings for the official arguments: the values a user of the nodes would enter."""
    if family == "sd15":
        return train.TrainingSettings(family="sd15", steps=STEPS, unet_lr=args.learning_rate,
                                      encoder_lr=10 * args.learning_rate, control_scale=args.controlnext_scale,
                                      prediction=prediction)
    return train.TrainingSettings(family="sdxl", steps=STEPS, unet_lr=args.learning_rate,
                                  encoder_lr=args.learning_rate_controlnet, max_grad_norm=args.max_grad_norm,
                                  warmup_steps=args.lr_warmup_steps, control_scale=1.0 * args.controlnet_scale_factor,
                                  prediction=prediction)


def build_official_models(script, family: str, args, seed: int = 0):
    torch.manual_seed(seed)
    unet = script.UNet2DConditionModel(**TINY_UNETS[family])
    encoder = (script.ControlNeXtModel(controlnext_scale=args.controlnext_scale) if family == "sd15"
               else script.ControlNetModel())
    return unet, encoder


@dataclass
class Runs:
    case: str
    ours: Run  # STEPS steps of our Trainer
    replayed: Run  # STEPS official steps, each stepping with our gradients (``official_run``)
    alone: Run  # one official step with its own gradients


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def runs(request, scripts, tmp_path_factory) -> Runs:
    """The three runs of a case, from the same weights and batches."""
    family, prediction, flags = request.param
    case = f"{family}-{prediction}"
    script = scripts[family]
    args = official_args(script, EXAMPLE_FLAGS[family] + flags)
    batches = [make_batch(family, seed) for seed in range(1, STEPS + 1)]
    folder = tmp_path_factory.mktemp(case)
    unet, encoder = build_official_models(script, family, args)
    ours = our_run(family, our_settings(family, args, prediction), unet.state_dict(), encoder.state_dict(), batches,
                   os.path.join(folder, "ours"))
    replayed = official_run(family, script, args, prediction, *build_official_models(script, family, args), batches,
                            replay=ours, folder=os.path.join(folder, "official"))
    alone = official_run(family, script, args, prediction, *build_official_models(script, family, args), batches[:1])
    return Runs(case, ours, replayed, alone)


# ------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------

def relative(ours: torch.Tensor, official: torch.Tensor) -> float:
    """max |ours - official| / max |official| (the absolute difference where official is all zero)."""
    difference = (ours.double() - official.double()).abs().max().item()
    scale = official.double().abs().max().item()
    return difference / scale if scale > 0 else difference


def worst_by_group(ours: dict[str, torch.Tensor], official: dict[str, torch.Tensor]) -> dict[str, tuple[float, str]]:
    """Per group (encoder, unet): the largest relative difference over its tensors, and that tensor."""
    assert sorted(ours) == sorted(official), f"trained tensors differ: {sorted(set(ours) ^ set(official))}"
    worst: dict[str, tuple[float, str]] = {}
    for name in official:
        assert ours[name].shape == official[name].shape, name
        group = name.split(".", 1)[0]
        worst[group] = max(worst.get(group, (-1.0, "")), (relative(ours[name], official[name]), name))
    return worst


def changes(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: after[name] - before[name] for name in before}


def describe(worst: dict[str, tuple[float, str]]) -> str:
    return ", ".join(f"{group} {value:.1e}" for group, (value, _) in worst.items())


def check(worst: dict[str, tuple[float, str]], what: str) -> None:
    for group, (value, name) in worst.items():
        assert value <= TOLERANCE, f"{what}: {group} differs by {value:.2e} relative at {name}"


def test_loss_and_gradients_agree(runs):
    """At the same weights: the same loss and the same gradient for every trained tensor."""
    assert all(torch.equal(runs.ours.initial[name], runs.replayed.initial[name]) for name in runs.replayed.initial)
    for step in range(STEPS):
        official, ours = runs.replayed.losses[step], runs.ours.losses[step]
        grads = worst_by_group(runs.ours.grads[step], runs.replayed.grads[step])
        print(f"\n{runs.case} step {step + 1}: loss {official:.6f} rel {abs(ours - official) / official:.1e}; "
              f"gradients rel {describe(grads)}", end="")
        assert abs(ours - official) <= TOLERANCE * official, f"step {step + 1}: loss {ours} vs official {official}"
        check(grads, f"step {step + 1} gradients")


def test_the_official_optimiser_takes_our_steps(runs):
    """From the same gradients: the same clipped gradients and the same weights after each step
    (learning rates, schedule, clipping and optimiser state)."""
    replayed, ours = runs.replayed, runs.ours
    for step in range(STEPS):
        used = worst_by_group(ours.used_grads[step], replayed.used_grads[step])
        weights = worst_by_group(ours.after[step], replayed.after[step])
        updates = worst_by_group(changes(ours.after[step], ours.after[step - 1] if step else ours.initial),
                                 changes(replayed.after[step], replayed.after[step - 1] if step else replayed.initial))
        print(f"\n{runs.case} step {step + 1}: clipped gradients rel {describe(used)}; weights after rel "
              f"{describe(weights)}; updates rel {describe(updates)}", end="")
        check(used, f"step {step + 1} gradients after clipping")
        check(weights, f"weights after step {step + 1}")
        check(updates, f"updates of step {step + 1}")
    assert all(not torch.equal(replayed.after[-1][name], replayed.initial[name]) for name in replayed.initial)


def test_one_step_with_each_sides_own_gradients_agrees(runs):
    """End to end, each side stepping with its own gradients, measured over each group's weights
    as one vector. Element by element the updates differ by up to a few percent of a learning
    rate where a gradient is near zero (1e-9 against AdamW's eps of 1e-8, small rows and columns
    under Adafactor's normalisation): there fp32 rounding decides the update, in any
    reimplementation; the steps from the same gradients are compared element by element above."""
    alone, ours = runs.alone, runs.ours
    line = f"\n{runs.case} own gradients, weights after step 1:"
    for group in ("encoder", "unet"):
        names = [name for name in alone.initial if name.startswith(group + ".")]
        official = torch.cat([alone.after[0][name].flatten().double() for name in names])
        difference = torch.cat([ours.after[0][name].flatten().double() for name in names]) - official
        update = torch.cat([(alone.after[0][name] - alone.initial[name]).flatten().double() for name in names])
        l2 = (difference.norm() / official.norm()).item()
        line += (f" {group} rel {l2:.1e} (L2), max|d| {difference.abs().max().item():.1e} = "
                 f"{(difference.abs().max() / official.abs().max()).item():.1e} of the largest weight, "
                 f"{(difference.abs().max() / update.abs().max()).item():.1e} of the largest update;")
        assert l2 <= TOLERANCE, f"{group}: weights differ by {l2:.2e} relative"
    print(line, end="")


def _file_difference(ours: dict[str, torch.Tensor], official: dict[str, torch.Tensor]) -> float:
    assert sorted(ours) == sorted(official)
    for name in official:
        assert ours[name].shape == official[name].shape and ours[name].dtype == official[name].dtype, name
    return max((ours[name] - official[name]).abs().max().item() for name in official)


def test_release_files_agree(runs):
    """After the same training, our files hold what the official ones do: the encoder, and for
    SD1.5 the trained weights (its unet.bin; the released SD1.5 files hold those too), for SDXL
    their increments."""
    family = runs.case.split("-")[0]
    official, ours = runs.replayed.files, runs.ours.files
    encoder_file = "controlnext.bin" if family == "sd15" else "controlnet.safetensors"
    unet_file = "unet.bin" if family == "sd15" else "unet_weight_increasements.safetensors"
    encoder = _file_difference(ours[train.ENCODER_FILE], official[encoder_file])
    unet = _file_difference(ours[train.UNET_FILE], official[unet_file])
    line = f"\n{runs.case} files: {train.ENCODER_FILE} vs {encoder_file} max|d| {encoder:.1e}; " \
           f"{train.UNET_FILE} vs {unet_file} max|d| {unet:.1e}"
    if family == "sd15":  # the --save_load_weights_increaments branch: our weights minus the base
        base = {name.split(".", 1)[1]: tensor for name, tensor in runs.ours.initial.items() if name.startswith("unet.")}
        increments = _file_difference({name: value - base[name] for name, value in ours[train.UNET_FILE].items()},
                                      official["unet_weight_increasements.bin"])
        line += f"; our weights - base vs unet_weight_increasements.bin max|d| {increments:.1e}"
        assert increments <= FILE_TOLERANCE
    print(line, end="")
    assert encoder <= FILE_TOLERANCE and unet <= FILE_TOLERANCE


# ------------------------------------------------------------------------------------------------
# defaults and the warm-up
# ------------------------------------------------------------------------------------------------

def test_our_defaults_are_the_official_defaults(scripts):
    sd15_args, sdxl_args = official_args(scripts["sd15"], []), official_args(scripts["sdxl"], [])
    sd15 = train.TrainingSettings(family="sd15", steps=1).resolved()
    assert sd15_args.lr_scheduler == "constant" and not sd15_args.use_8bit_adam  # constant ignores the warm-up
    assert (sd15.optimizer, sd15.unet_lr, sd15.encoder_lr, sd15.warmup_steps, sd15.control_scale) == \
        ("adamw", sd15_args.learning_rate, 10 * sd15_args.learning_rate, 0, sd15_args.controlnext_scale)
    assert sd15.max_grad_norm is None  # the script's clipping call is commented out
    sdxl = train.TrainingSettings(family="sdxl", steps=1).resolved()
    assert sdxl_args.lr_scheduler == "constant_with_warmup"
    assert not (sdxl_args.adafactor_relative_step or sdxl_args.adafactor_scale_parameter
                or sdxl_args.adafactor_warmup_init)  # what our Adafactor implements
    assert (sdxl.optimizer, sdxl.unet_lr, sdxl.encoder_lr, sdxl.max_grad_norm, sdxl.warmup_steps,
            sdxl.control_scale) == (sdxl_args.optimizer_type, sdxl_args.learning_rate,
                                    sdxl_args.learning_rate_controlnet, sdxl_args.max_grad_norm,
                                    sdxl_args.lr_warmup_steps, 1.0 * sdxl_args.controlnet_scale_factor)
    names = [name for name, _ in UNet2DConditionModel(**TINY_UNETS["sdxl"]).named_parameters()]
    pattern = re.compile(sdxl_args.unet_trainable_param_pattern)
    official = [name for name in names if pattern.match(name)]
    assert train.trainable_unet_names(names, "sdxl") == official and len(official) == 8


def test_sdxl_warmup_gives_the_official_learning_rates(scripts):
    """With the default 500 warm-up steps the first step has lr 0 (weights unchanged), then 1/500..."""
    args = official_args(scripts["sdxl"], [])
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr": args.learning_rate_controlnet},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": args.learning_rate}]
    optimizer = TransformersAdafactor(groups, lr=args.learning_rate, relative_step=args.adafactor_relative_step,
                                      scale_parameter=args.adafactor_scale_parameter,
                                      warmup_init=args.adafactor_warmup_init)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=1000)
    official_lrs = []
    for _ in range(3):
        official_lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()  # no gradients: a no-op that keeps the scheduler's call order
        lr_scheduler.step()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNETS["sdxl"])
    trainer = train.Trainer(train.new_encoder(0), dict(unet.named_parameters()),
                            train.TrainingSettings(family="sdxl", steps=3))
    denoiser = StockUNetDenoiser(unet.requires_grad_(False), "sdxl", trainer)
    our_lrs = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, *_: our_lrs.append([group["lr"] for group in optimizer.param_groups]))
    trained = [*trainer.encoder.parameters(), *trainer.unet_parameters.values()]
    initial = [p.detach().clone() for p in trained]
    for step in range(3):
        trainer.step(denoiser, training_batch(make_batch("sdxl", step + 1)))
        if step == 0:
            assert all(torch.equal(before, p) for before, p in zip(initial, trained))
    print(f"\nsdxl warm-up 500: official lrs {official_lrs}, ours {our_lrs}", end="")
    assert official_lrs[0] == [0.0, 0.0]
    assert [lr for lrs in our_lrs for lr in lrs] == pytest.approx([lr for lrs in official_lrs for lr in lrs], rel=1e-12)
