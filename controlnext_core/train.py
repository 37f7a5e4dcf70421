"""Training a ControlNeXt the way the official training scripts do, given a denoiser callable.

One step (``ControlNeXt-SD1.5-Training/`` and ``ControlNeXt-SDXL-Training/`` of the official
repository): timesteps uniform over the 1000 DDPM training steps, ``add_noise`` of the
scaled-linear schedule, the encoder on the control images at those timesteps, its output times
the control scale cross-normalised into the UNet where the (family, "base") row of the injection
table says, MSE on epsilon (or v), then the official optimiser over two parameter groups.

Unlike the official scripts the trained parameters stay in fp32 (they cast the UNet's to fp16,
where updates of 1e-5 relative round away); the frozen UNet runs in its own dtype and is never
copied: the denoiser reads the trained UNet weights from ``Trainer.unet_parameters``.
"""
from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import torch
from torch.nn import functional as F

from . import encoders, families
from .cross_norm import add_control
from .encoders import ConditionEncoder
from .errors import ControlNeXtError
from .processes import Processes

TRAIN_LAYOUT = "base"  # both official training codes train the 320-channel encoder
TRAIN_TIMESTEPS = 1000
PREDICTIONS = ("epsilon", "v_prediction")
OPTIMIZERS = ("adamw", "adafactor")


@dataclass(frozen=True)
class Recipe:
    """What a family's official training script does, beside the numbers a user may change."""

    unet_pattern: str  # re.search over UNet parameter names (diffusers and ComfyUI names agree here)
    optimizer: str
    unet_lr: float
    encoder_lr: float
    max_grad_norm: float | None  # one global norm over both groups; None: no clipping
    warmup_steps: int  # diffusers' constant_with_warmup: lr x step / warmup before it


RECIPES = {
    # SD1.5: AdamW, encoder at 10x the UNet's lr, every attention output (attn1 and attn2), no clipping.
    "sd15": Recipe(r"to_out", "adamw", 5e-6, 5e-5, None, 0),
    # SDXL: Adafactor, cross-attention outputs only, clipping at 1.0, 500 warm-up steps.
    "sdxl": Recipe(r"attn2.*to_out", "adafactor", 1e-5, 1e-4, 1.0, 500),
    # SVD-v2 (controlnext_core.video_train.VideoRecipe): AdamW at 1e-5 for the encoder and every UNet
    # weight, clipping at 1.0 (its DeepSpeed config), no warm-up in effect.
    "svd": Recipe(r".", "adamw", 1e-5, 1e-5, 1.0, 0),
}
# The empty prompt each script uses for ``proportion_empty_prompts``.
EMPTY_PROMPT = {"sd15": "PBH", "sdxl": ""}


@dataclass(frozen=True)
class TrainingSettings:
    family: str
    steps: int
    batch_size: int = 1  # pictures computed at once; a step takes batch_size x gradient_accumulation_steps
    gradient_accumulation_steps: int = 1
    encoder_lr: float | None = None  # None: the family's official value
    unet_lr: float | None = None
    train_unet: bool = True
    optimizer: str | None = None
    max_grad_norm: float | None = None  # None: the official value; 0: no clipping
    warmup_steps: int | None = None
    control_scale: float = 1.0
    prediction: str = "epsilon"
    proportion_empty_prompts: float = 0.0
    seed: int = 0
    unet_pattern: str | None = None  # the trained UNet weights (re.search); None: the recipe's

    def resolved(self) -> "TrainingSettings":
        """The settings with every None filled from the family's official recipe, checked."""
        if self.family not in RECIPES:
            raise ControlNeXtError(
                f"ControlNeXt trains SD1.5, SDXL and SVD (v2) models, as the official training code does; "
                f"this is a {families.FAMILY_NAMES.get(self.family, self.family)} model.")
        recipe = RECIPES[self.family]
        settings = replace(
            self,
            encoder_lr=recipe.encoder_lr if self.encoder_lr is None else self.encoder_lr,
            unet_lr=recipe.unet_lr if self.unet_lr is None else self.unet_lr,
            optimizer=recipe.optimizer if self.optimizer is None else self.optimizer,
            max_grad_norm=self.max_grad_norm if self.max_grad_norm is not None else recipe.max_grad_norm,
            warmup_steps=recipe.warmup_steps if self.warmup_steps is None else self.warmup_steps,
        )
        problems = []
        if settings.steps < 1:
            problems.append(f"steps is {settings.steps}: train for 1 step or more")
        if settings.batch_size < 1:
            problems.append(f"batch_size is {settings.batch_size}: use 1 or more")
        if settings.gradient_accumulation_steps < 1:
            problems.append(f"gradient_accumulation_steps is {settings.gradient_accumulation_steps}: use 1 or more")
        if settings.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {settings.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if settings.prediction not in PREDICTIONS:
            problems.append(f"prediction {settings.prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if not 0.0 <= settings.proportion_empty_prompts <= 1.0:
            problems.append(f"proportion_empty_prompts is {settings.proportion_empty_prompts}: give 0 to 1")
        if settings.encoder_lr < 0 or settings.unet_lr < 0 or settings.warmup_steps < 0:
            problems.append("learning rates and warm-up steps cannot be negative")
        if problems:
            raise ControlNeXtError("Cannot train: " + "; ".join(problems) + ".")
        return settings


def trainable_unet_names(names: Iterable[str], family: str, pattern: str | None = None) -> list[str]:
    """The UNet parameters the family's official script trains (SD1.5: every ``to_out``;
    SDXL: ``attn2 ... to_out``; SVD-v2: all), or those ``pattern`` finds, in the given order."""
    pattern = re.compile(pattern or RECIPES[family].unet_pattern)
    return [name for name in names if pattern.search(name)]


def ddpm_alphas_cumprod(steps: int = TRAIN_TIMESTEPS, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> torch.Tensor:
    """The scaled-linear schedule of SD1.5 and SDXL, in fp32 as diffusers' DDPMScheduler builds it."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDPMScheduler.add_noise: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` per sample."""
    a = alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps].reshape(-1, 1, 1, 1)
    return a ** 0.5 * latents + (1 - a) ** 0.5 * noise


def noise_schedule(sigmas: torch.Tensor) -> torch.Tensor:
    """The alphas_cumprod of a model's discrete sigmas (``sigma = sqrt((1 - a) / a)``). The scaled-linear
    schedule comes back as the official fp32 numbers, so SD1.5 / SDXL steps stay bit-exact; another
    schedule (zero terminal SNR, other betas) is the model's own."""
    derived = 1.0 / (1.0 + sigmas.detach().double().cpu() ** 2)
    official = ddpm_alphas_cumprod(len(derived))
    if torch.allclose(derived, official.double(), rtol=1e-5, atol=0.0):
        return official
    return derived.float()


def velocity(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDPMScheduler.get_velocity: the v-prediction target."""
    a = alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps].reshape(-1, 1, 1, 1)
    return a ** 0.5 * noise - (1 - a) ** 0.5 * latents


class Adafactor(torch.optim.Optimizer):
    """transformers' Adafactor as the official SDXL script configures it (``relative_step``,
    ``scale_parameter`` and ``warmup_init`` off): the step size is the group's lr, a factored
    second moment for matrices, updates clipped to RMS 1, no momentum, no weight decay."""

    def __init__(self, params, lr: float, eps: float = 1e-30, clip_threshold: float = 1.0, decay_rate: float = -0.8):
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate))

    @staticmethod
    def _rms(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.norm(2) / (tensor.numel() ** 0.5)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                factored = grad.ndim >= 2
                if not state:
                    state["step"] = 0
                    if factored:
                        state["row"] = torch.zeros(grad.shape[:-1], device=grad.device)
                        state["col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], device=grad.device)
                    else:
                        state["second_moment"] = torch.zeros_like(grad)
                state["step"] += 1
                beta2 = 1.0 - math.pow(state["step"], group["decay_rate"])
                update = grad ** 2 + group["eps"]
                if factored:
                    row, col = state["row"], state["col"]
                    row.mul_(beta2).add_(update.mean(dim=-1), alpha=1.0 - beta2)
                    col.mul_(beta2).add_(update.mean(dim=-2), alpha=1.0 - beta2)
                    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                    update = row_factor * col.unsqueeze(-2).rsqrt()
                    update.mul_(grad)
                else:
                    moment = state["second_moment"]
                    moment.mul_(beta2).add_(update, alpha=1.0 - beta2)
                    update = moment.rsqrt().mul_(grad)
                update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
                param.add_(update.mul_(group["lr"]).to(param.dtype), alpha=-1.0)


def make_optimizer(encoder_parameters: list[torch.nn.Parameter], unet_parameters: list[torch.nn.Parameter],
                   settings: TrainingSettings) -> torch.optim.Optimizer:
    """The official optimiser over two groups: the encoder, then the trained UNet weights."""
    groups = [{"params": encoder_parameters, "lr": settings.encoder_lr}]
    if unet_parameters:
        groups.append({"params": unet_parameters, "lr": settings.unet_lr})
    if settings.optimizer == "adafactor":
        return Adafactor(groups, lr=settings.unet_lr)
    return torch.optim.AdamW(groups, lr=settings.unet_lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """diffusers' constant_with_warmup at optimiser step ``step`` (0-based): 0 at the first."""
    return 1.0 if step >= warmup_steps else step / max(1, warmup_steps)


def trainable_copy(encoder: ConditionEncoder) -> ConditionEncoder:
    """A copy to train further: the encoder given (a loaded file, a CONTROLNEXT) stays as it was."""
    copy = type(encoder)(encoder.config)
    copy.load_state_dict(encoder.state_dict())
    copy.control_scale = encoder.control_scale
    return copy


def new_encoder(seed: int) -> ConditionEncoder:
    """A "base" encoder with PyTorch's default initialisation, as the official scripts start one."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return ConditionEncoder(encoders.CONFIGS[TRAIN_LAYOUT])
    finally:
        torch.random.set_rng_state(state)


class Denoiser(Protocol):
    """The frozen UNet: ``(noisy latents, integer timesteps, conditioning, inject) -> prediction``.

    It must call ``inject(h)`` on its hidden state at the family's injection point (after the
    skip is stored) and read the trained UNet weights from ``Trainer.unet_parameters``.
    """

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Any,
                 inject: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


@dataclass
class TrainingBatch:
    latents: torch.Tensor  # [B,4,h,w], already scaled as the UNet takes them
    controls: torch.Tensor  # [B,3,8h,8w] in [0,1]
    conditioning: Any  # what the denoiser takes for these samples (empty prompts already swapped in)
    noise: torch.Tensor | None = None  # given: reproduce a step exactly; None: drawn
    timesteps: torch.Tensor | None = None


class TrainingSource(Protocol):
    """Training pictures by index (in memory, or streamed from a cache on disk)."""

    count: int

    def batch(self, indices: list[int], empty: Any, empty_flags: list[bool]) -> TrainingBatch:
        """The samples ``indices``, the empty prompt's conditioning ``empty`` where a flag says so."""


class TrainingDiverged(ControlNeXtError):
    """The loss or a gradient stopped being finite; the weights are those of the last good step."""


class Trainer:
    """Trains an encoder (and optionally the official UNet subset) with one ``step`` per batch."""

    def __init__(self, encoder: ConditionEncoder, unet_weights: Mapping[str, torch.Tensor],
                 settings: TrainingSettings, device: torch.device | str = "cpu",
                 alphas_cumprod: torch.Tensor | None = None, processes: Processes = Processes()):
        if encoder.layout != TRAIN_LAYOUT:
            raise ControlNeXtError(
                f"Only {families.LAYOUT_DESCRIPTIONS[TRAIN_LAYOUT]} encoders can be trained here (the layout of the "
                f"official training code); this one has the {families.LAYOUT_DESCRIPTIONS[encoder.layout]}.")
        self.settings = settings.resolved()
        self.processes = processes
        self.rule = families.rule_for(self.settings.family, TRAIN_LAYOUT)
        self.device = torch.device(device)
        self.encoder = encoder.to(device=self.device, dtype=torch.float32).train().requires_grad_(True)
        names = (trainable_unet_names(unet_weights, self.settings.family, self.settings.unet_pattern)
                 if self.settings.train_unet else [])
        # fp32 masters of the trained UNet weights; the frozen UNet itself is not copied
        self.unet_parameters = {name: torch.nn.Parameter(unet_weights[name].detach().to(self.device, torch.float32,
                                                                                        copy=True))
                                for name in names}
        self.optimizer = make_optimizer(list(self.encoder.parameters()), list(self.unet_parameters.values()),
                                        self.settings)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        # the model's own noise schedule where it has one (noise_schedule), else the official one
        schedule = ddpm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.float()
        if schedule.shape != (TRAIN_TIMESTEPS,):
            raise ControlNeXtError(f"The model's noise schedule has {schedule.shape[0]} steps; ControlNeXt trains "
                                   f"models of {TRAIN_TIMESTEPS} discrete timesteps as SD1.5 and SDXL have.")
        self.alphas_cumprod = schedule.to(self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(self.settings.seed)  # noise, timesteps
        self.data_generator = torch.Generator().manual_seed(self.settings.seed)  # batches, empty prompts
        self.data_order: list[int] = []
        self.steps_done = 0
        self.losses: list[float] = []

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.encoder.parameters()) + list(self.unet_parameters.values())

    def loss(self, denoiser: Denoiser, batch: TrainingBatch,
             autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The official step's loss, with gradients to the encoder and the trained UNet weights."""
        batch = self._with_draws([batch])[0]
        latents = batch.latents.to(self.device)
        noise, timesteps = batch.noise.to(self.device), batch.timesteps.to(self.device).long()
        noisy = add_noise(latents, noise, timesteps, self.alphas_cumprod)
        target = noise if self.settings.prediction == "epsilon" else velocity(
            latents, noise, timesteps, self.alphas_cumprod)
        autocast = (torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else torch.autocast(self.device.type, enabled=False))
        with autocast:
            control = self.encoder(batch.controls.to(self.device), timesteps)
            scale = self.settings.control_scale

            def inject(hidden: torch.Tensor) -> torch.Tensor:
                return add_control(hidden, control, self.rule, scale)

            prediction = denoiser(noisy, timesteps, batch.conditioning, inject)
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")

    def step(self, denoiser: Denoiser, batch: TrainingBatch | Sequence[TrainingBatch],
             autocast_dtype: torch.dtype | None = None, scaler: "torch.amp.GradScaler | None" = None) -> float:
        """One optimiser step over one batch, or over micro-batches whose gradients add up to the
        step of their union (gradient accumulation: the noise and timesteps are drawn for the union,
        as one batch of that size draws them). Over several processes each passes its share of the
        global batch; the gradients and the loss are summed over them. Raises TrainingDiverged
        (weights untouched) on a non-finite loss or gradient."""
        parts = self._with_draws(list(batch) if isinstance(batch, (list, tuple)) else [batch])
        total = sum(part.latents.shape[0] for part in parts) * self.processes.count
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for part in parts:
            part_loss = self.loss(denoiser, part, autocast_dtype) * (part.latents.shape[0] / total)
            if not torch.isfinite(part_loss):
                loss = part_loss
                break
            (scaler.scale(part_loss) if scaler is not None else part_loss).backward()
            loss = loss + part_loss.detach()
        loss = self.processes.sum(loss)
        step_number = self.steps_done + 1
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"The training loss became {float(loss.detach())} at step {step_number}: training stopped there and kept the "
                f"weights of step {self.steps_done}. Lower the learning rates, or train in fp32/bf16 instead of fp16.")
        parameters = self.trainable_parameters()
        self.processes.sum_gradients(parameters)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if scaler is None and not all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"A gradient became NaN or infinite at step {step_number}: training stopped there and kept the "
                f"weights of step {self.steps_done}. Lower the learning rates.")
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(parameters, self.settings.max_grad_norm)
        factor = warmup_factor(self.steps_done, self.settings.warmup_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done = step_number
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def draw_state(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """What the next step's draws depend on (see ``rewind``)."""
        return self.generator.get_state(), self.data_generator.get_state(), list(self.data_order)

    def rewind(self, state: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
        """Back to ``draw_state()``'s moment: a step stopped half-way (Cancel, divergence) leaves the
        draws as they were after the last whole step, so a checkpoint written then resumes exactly."""
        self.generator.set_state(state[0])
        self.data_generator.set_state(state[1])
        self.data_order = list(state[2])

    def _with_draws(self, parts: list[TrainingBatch]) -> list[TrainingBatch]:
        """The parts with their noise and timesteps: drawn for the whole global batch at once, noise
        first, as a single batch of that size draws them (so neither accumulation nor the number of
        processes changes the draws); this process takes its share."""
        if all(part.noise is not None and part.timesteps is not None for part in parts):
            return parts
        sizes = [part.latents.shape[0] for part in parts]
        first, count = parts[0].latents, sum(sizes) * self.processes.count
        noise = torch.randn((count, *first.shape[1:]), generator=self.generator, device=self.device,
                            dtype=first.dtype)
        timesteps = torch.randint(0, TRAIN_TIMESTEPS, (count,), generator=self.generator, device=self.device)
        mine = slice(self.processes.rank * sum(sizes), (self.processes.rank + 1) * sum(sizes))
        noise, timesteps = noise[mine], timesteps[mine]
        return [replace(part, noise=part.noise if part.noise is not None else part_noise,
                        timesteps=part.timesteps if part.timesteps is not None else part_timesteps)
                for part, part_noise, part_timesteps in zip(parts, noise.split(sizes), timesteps.split(sizes))]

    def next_batches(self, source: "TrainingSource", empty: Any = None) -> list[TrainingBatch]:
        """This process's micro-batches of the next step: the global batch's indices and empty-prompt
        draws, the share of this process, read from ``source``."""
        indices = self.batch_indices(source.count)
        empties = self.empty_prompt_mask(len(indices))
        indices, empties = self.processes.share(indices), self.processes.share(empties)
        return [source.batch(part, empty, flags)
                for part, flags in zip(self.micro_batches(indices), self.micro_batches(empties))]

    def batch_indices(self, count: int) -> list[int]:
        """The sample indices of the next step over all processes (``batch_size`` x
        ``gradient_accumulation_steps`` x processes): shuffled epochs, as the official data loaders
        draw them."""
        size = self.settings.batch_size * self.settings.gradient_accumulation_steps * self.processes.count
        while len(self.data_order) < size:
            self.data_order += torch.randperm(count, generator=self.data_generator).tolist()
        batch, self.data_order = self.data_order[:size], self.data_order[size:]
        return batch

    def micro_batches(self, values: Sequence) -> list[list]:
        """A step's indices (or anything drawn per index) in the micro-batches computed one after the other."""
        size = self.settings.batch_size
        return [list(values[start:start + size]) for start in range(0, len(values), size)]

    def empty_prompt_mask(self, size: int) -> list[bool]:
        """Which samples of a batch train with the empty prompt (``proportion_empty_prompts``)."""
        draws = torch.rand(size, generator=self.data_generator)
        return (draws < self.settings.proportion_empty_prompts).tolist()

    def trained_unet(self) -> dict[str, torch.Tensor]:
        """The trained UNet weights (fp32, by the names they were given), detached on the CPU."""
        return {name: param.detach().cpu().clone() for name, param in self.unet_parameters.items()}

    def finish(self) -> ConditionEncoder:
        """The trained encoder, frozen for inference, carrying its control scale."""
        self.encoder.eval().requires_grad_(False)
        self.encoder.control_scale = self.settings.control_scale
        return self.encoder


def release_unet_weights(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                         family: str) -> dict[str, torch.Tensor]:
    """The UNet file of a release, by the trained weights' names: SD1.5 releases hold the trained
    weights themselves, SDXL releases their deltas from the base (so they apply to fine-tunes)."""
    if family == "sdxl":
        return {name: (value.float() - base[name].detach().to(value.device, torch.float32)).contiguous()
                for name, value in trained.items()}
    return {name: value.float().contiguous() for name, value in trained.items()}


def loss_summary(losses: Sequence[float], window: int = 10) -> str:
    """The loss at the start and the end of a run, each the mean of up to ``window`` steps (one
    step's loss mostly says which timesteps it drew)."""
    if not losses:
        return "no step trained"
    window = max(1, min(window, len(losses) // 2 or 1))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    span = f"mean of the first and last {window} steps" if window > 1 else "first and last step"
    return f"loss {first:.4f} -> {last:.4f} ({span})"


METADATA_FORMAT = "ControlNeXt"
ENCODER_FILE = "controlnet.safetensors"
UNET_FILE = "unet.safetensors"


def release_metadata(family: str, control_scale: float, steps: int, base_model: str) -> dict[str, str]:
    """What a saved file says about itself (safetensors metadata is text). The loader applies
    ``control_scale``; the official scripts keep theirs outside the file (files without it load at 1.0)."""
    return {"format": METADATA_FORMAT, families.METADATA_FAMILY: family, "layout": TRAIN_LAYOUT,
            "control_scale": repr(float(control_scale)), "steps": str(int(steps)), "base_model": base_model}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_release(folder: str, encoder: ConditionEncoder, unet_weights: Mapping[str, torch.Tensor] | None,
                 metadata: Mapping[str, str], overwrite: bool = False) -> list[str]:
    """Write ``controlnet.safetensors`` (and ``unet.safetensors``) into ``folder``, each atomically
    (a temporary file renamed into place); an existing file is an error unless ``overwrite``."""
    import safetensors
    import safetensors.torch

    from .training_cache import write_advice

    files = {ENCODER_FILE: {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}}
    if unet_weights:
        files[UNET_FILE] = {k: v.detach().cpu().contiguous() for k, v in unet_weights.items()}
    paths = [os.path.join(folder, name) for name in files]
    existing = [path for path in paths if os.path.exists(path)]
    if existing and not overwrite:
        raise ControlNeXtError(
            f"{', '.join(existing)} already exists: choose another name, or allow overwriting.")
    os.makedirs(folder, exist_ok=True)
    for path, tensors in zip(paths, files.values()):
        temporary = os.path.join(folder, f".controlnext-{uuid.uuid4().hex}.tmp")
        try:
            safetensors.torch.save_file(tensors, temporary, metadata=dict(metadata))
            os.chmod(temporary, 0o666 & ~_umask())  # as ComfyUI's outputs (safetensors writes 0600)
            os.replace(temporary, path)
        except (OSError, safetensors.SafetensorError) as error:  # safetensors reports a full disk as its own error
            raise ControlNeXtError(f"Could not write {path} ({error}): {write_advice(error)} and save "
                                   f"again.") from None
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    return paths
