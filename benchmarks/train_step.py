"""One training step: ControlNeXt as Train ControlNeXt trains it, against ComfyUI's own ControlNet
trained the usual way, on the same frozen UNet, batch and resolution.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/train_step.py [--quick] [--checkpointing]

One process per model family (SD1.5, SDXL), as benchmarks/run.py runs them. In each:
- ControlNeXt: the loop of Train ControlNeXt (controlnext_core.train.Trainer with nodes/train.py's
  ComfyDenoiser, trained_weights_in and gradient_checkpointing), one ``Trainer.step`` each: the
  family's official recipe, with the encoder and the official UNet subset trained, and with the
  encoder only;
- ControlNet: comfy.cldm.cldm.ControlNet of the UNet's architecture started as ControlNet training
  starts one (encoder and middle block copied from the UNet, zero convolutions at zero), its
  residuals merged and added by ComfyUI's own code (``control_merge``, the UNet's ``control``
  argument), all its weights trained with AdamW and gradient clipping at 1.0 (diffusers'
  train_controlnet.py); the same loss as ControlNeXt's (DDPM add_noise, uniform timesteps, MSE on eps);
- bare: a forward and backward pass through the frozen UNet alone (to its input), the reference.
``--checkpointing`` adds ControlNeXt and ControlNet with gradient checkpointing. Every variant runs
once per round, rounds rotate the order, the figure is the median over rounds after a warm-up step
(which creates the optimiser states) and a memory step. Prints the tables and writes
benchmarks/results/train_step.json and .md. ``--quick``: the tests' shallow UNets at 64x64.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402
import run  # noqa: E402
from denoiser import MemoryProbe, device_name  # noqa: E402

FAMILIES = ("sd15", "sdxl")
NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
# Sizes that keep the run near 10 minutes on 2 CPU cores. ControlNet's trained weights: fp32 as
# diffusers keeps them, except SDXL's: fp32 weights, gradients and AdamW moments take 16 bytes for
# each of its 1,251 M parameters (20 GB, with 5 GB of UNet beside them), more than this machine's
# 23.5 GiB; in bf16 they take half. Lighter than the usual way, so SDXL's ratios favour ControlNet.
SETTINGS = {
    "sd15": dict(pixels=256, controlnet_dtype=torch.float32),
    "sdxl": dict(pixels=128, controlnet_dtype=torch.bfloat16),
}
QUICK_PIXELS = 64
UNET_DTYPE = torch.bfloat16  # frozen UNet weights and autocast compute: the CPU's fast path (README, Benchmarks)
CONTROLNET_LR = 1e-5
CONTROLNET_MAX_GRAD_NORM = 1.0
# (variant, method, gradient checkpointing); methods share their weights and optimiser between variants
VARIANTS = (
    ("bare", "bare", False),
    ("controlnext", "controlnext", False),
    ("controlnext_encoder", "controlnext_encoder", False),
    ("controlnet", "controlnet", False),
    ("controlnext_checkpointing", "controlnext", True),
    ("controlnet_checkpointing", "controlnet", True),
)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def new_controlnet(model, dtype: torch.dtype):
    """ComfyUI's ControlNet for the UNet's architecture as ControlNet training starts it: every
    weight it shares with the UNet copied (time and label embeddings, input blocks, middle block),
    the zero convolutions and the hint block's last convolution at zero, the hint block's other
    convolutions at PyTorch's default initialisation. Returns comfy.controlnet.ControlNet around it
    and how many weights started each way."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management

    config = comfy_host.controlnet_config(model.model.model_config.unet_config, dtype, torch.device("cpu"))
    control_model = comfy.cldm.cldm.ControlNet(**config)
    unet_state = dict(model.model.diffusion_model.named_parameters())
    zero = [*control_model.zero_convs, control_model.middle_block_out, control_model.input_hint_block[-1]]
    hint_convs = [m for m in control_model.input_hint_block if isinstance(m, torch.nn.Conv2d)][:-1]
    with torch.no_grad():
        for name, param in control_model.named_parameters():
            if name in unet_state:
                param.copy_(unet_state[name])
        for module in hint_convs:
            torch.nn.Conv2d.reset_parameters(module)  # ComfyUI's ops skip initialisation
        for module in zero:
            for param in module.parameters():
                param.zero_()
    fresh = ("zero_convs.", "middle_block_out.", "input_hint_block.")
    missing = [n for n, _ in control_model.named_parameters() if n not in unet_state and not n.startswith(fresh)]
    assert not missing, f"ControlNet weights neither copied from the UNet nor initialised here: {missing[:5]}"
    start = {"copied_from_unet": sum(p.numel() for n, p in control_model.named_parameters() if n in unet_state),
             "zero": sum(p.numel() for m in zero for p in m.parameters()),
             "default": sum(p.numel() for m in hint_convs for p in m.parameters())}
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device()), start


class Step:
    """What every variant's step takes: the batch, the frozen UNet and how the pack calls it."""

    def __init__(self, model, family: str, latents: torch.Tensor, controls: torch.Tensor, conditioning):
        self.model, self.family = model, family
        self.unet = model.model.diffusion_model
        self.latents, self.controls, self.conditioning = latents, controls, conditioning
        self.dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        self.generator = torch.Generator().manual_seed(11)
        train = comfy_host.pack("controlnext_core.train")
        self.alphas_cumprod = train.ddpm_alphas_cumprod()

    def noisy_inputs(self):
        """The official step's inputs: uniform integer timesteps, add_noise of the DDPM schedule."""
        train = comfy_host.pack("controlnext_core.train")
        noise = torch.randn(self.latents.shape, generator=self.generator)
        timesteps = torch.randint(0, train.TRAIN_TIMESTEPS, (self.latents.shape[0],), generator=self.generator)
        return train.add_noise(self.latents, noise, timesteps, self.alphas_cumprod), noise, timesteps

    def unet_call(self, noisy, timesteps, **extra):
        """The frozen UNet called as nodes/train.py's ComfyDenoiser calls it (raw DDPM inputs)."""
        context, y = self.conditioning
        return self.unet(noisy.to(self.dtype), timesteps.float(), context=context.to(self.dtype),
                         y=None if y is None else y.to(self.dtype), transformer_options={}, **extra)


class BareStep:
    """Forward and backward through the frozen UNet to its input: no control, nothing trained."""

    def __init__(self, step: Step):
        self.step = step

    def contexts(self, checkpointing: bool) -> list:
        return []

    def __call__(self) -> float:
        noisy, noise, timesteps = self.step.noisy_inputs()
        noisy.requires_grad_(True)
        with torch.autocast("cpu", dtype=UNET_DTYPE):
            prediction = self.step.unet_call(noisy, timesteps)
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        return float(loss.detach())

    def persistent_bytes(self) -> int:
        return 0

    def trained_parameters(self) -> int:
        return 0


class ControlNeXtStep:
    """One ``Trainer.step`` through ComfyDenoiser: the training loop of Train ControlNeXt."""

    def __init__(self, step: Step, train_unet: bool):
        train, nodes_train = comfy_host.pack("controlnext_core.train"), comfy_host.pack("nodes.train")
        self.step = step
        settings = train.TrainingSettings(family=step.family, steps=1_000_000, batch_size=step.latents.shape[0],
                                          train_unet=train_unet)
        unet_state = dict(step.unet.named_parameters())
        names = train.trainable_unet_names(unet_state, step.family) if train_unet else []
        self.trainer = train.Trainer(train.new_encoder(0), {name: unet_state[name] for name in names}, settings)
        self.denoiser = nodes_train.ComfyDenoiser(step.model, step.family, names)
        self.denoiser.train_through(self.trainer.unet_parameters)
        self.batch = train.TrainingBatch(step.latents, step.controls, step.conditioning)

    def contexts(self, checkpointing: bool) -> list:
        """What Train ControlNeXt's loop runs in: the MODEL's clone loaded with the trained weights as
        weight wrappers, checkpointing."""
        return [self.denoiser.loaded(checkpointing)]

    def __call__(self) -> float:
        return self.trainer.step(self.denoiser, self.batch, autocast_dtype=UNET_DTYPE)

    def persistent_bytes(self) -> int:
        return tensor_bytes(self.trainer.trainable_parameters()) + optimizer_state_bytes(self.trainer.optimizer)

    def trained_parameters(self) -> int:
        return sum(p.numel() for p in self.trainer.trainable_parameters())


class ControlNetStep:
    """ControlNet's usual training step: the same loss, every ControlNet weight trained with AdamW
    (diffusers' defaults) and the gradient norm clipped at 1.0; the UNet frozen."""

    def __init__(self, step: Step, dtype: torch.dtype):
        self.step = step
        self.net, self.start = new_controlnet(step.model, dtype)
        self.control_model = self.net.control_model.train()
        self.parameters = list(self.control_model.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=CONTROLNET_LR, betas=(0.9, 0.999), weight_decay=1e-2,
                                           eps=1e-8)
        # ControlNet's input and middle blocks, for nodes/train.py's gradient_checkpointing
        self.control_blocks = SimpleNamespace(input_blocks=self.control_model.input_blocks,
                                              middle_block=self.control_model.middle_block, output_blocks=[])

    def contexts(self, checkpointing: bool) -> list:
        """Checkpointing of both the UNet and the ControlNet, as diffusers' train_controlnet.py turns it on."""
        gradient_checkpointing = comfy_host.pack("nodes.train").gradient_checkpointing
        return [gradient_checkpointing(self.step.unet, checkpointing),
                gradient_checkpointing(self.control_blocks, checkpointing)]

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        noisy, noise, timesteps = self.step.noisy_inputs()
        context, y = self.step.conditioning
        dtype = self.control_model.dtype
        with torch.autocast("cpu", dtype=UNET_DTYPE):
            # comfy.controlnet.ControlNet.get_control's call and merge, at the training timesteps
            residuals = self.control_model(x=noisy.to(dtype), hint=self.step.controls.to(dtype),
                                           timesteps=timesteps.to(dtype), context=context.to(dtype),
                                           y=None if y is None else y.to(dtype))
            control = self.net.control_merge(residuals, None, output_dtype=None)
            prediction = self.step.unet_call(noisy, timesteps, control=control)
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, CONTROLNET_MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def persistent_bytes(self) -> int:
        return tensor_bytes(self.parameters) + optimizer_state_bytes(self.optimizer)

    def trained_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters)


def timed(method, enabled: bool) -> dict:
    """One step: this thread's CPU time (the whole step runs on it with one torch thread) and wall time."""
    with contextlib.ExitStack() as stack:
        for context in method.contexts(enabled):
            stack.enter_context(context)
        cpu, wall = time.thread_time(), time.perf_counter()
        loss = method()
        record = {"cpu": time.thread_time() - cpu, "wall": time.perf_counter() - wall}
    if loss != loss or abs(loss) == float("inf"):
        raise RuntimeError("the training loss is not finite: the random model overflowed at this dtype")
    return record


def memory_available() -> int:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def check_memory(model, dtype: torch.dtype) -> None:
    """Stop with a clear message before ControlNet's weights, gradients and AdamW moments (and the UNet
    copy it trains with) fill the machine."""
    import comfy.cldm.cldm

    with torch.device("meta"):
        config = comfy_host.controlnet_config(model.model.model_config.unet_config, dtype, torch.device("meta"))
        count = sum(p.numel() for p in comfy.cldm.cldm.ControlNet(**config).parameters())
    need = count * torch.finfo(dtype).bits // 8 * 4 + (1 << 30)  # weights, gradients, two moments, 1 GiB of activations
    need += sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())  # its own UNet
    available = memory_available()
    if available and need > available:
        raise SystemExit(f"ControlNet training needs about {need / 2 ** 30:.1f} GiB free for its {count / 1e6:,.0f} M "
                         f"weights, gradients and AdamW moments; {available / 2 ** 30:.1f} GiB is available. Stop "
                         f"other jobs, or run --families without this one.")


def worker(args) -> None:
    comfy_host.setup("cpu")
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    family = args.family
    pixels = QUICK_PIXELS if args.quick else SETTINGS[family]["pixels"]
    controlnet_dtype = SETTINGS[family]["controlnet_dtype"]
    patch, train_data = comfy_host.pack("nodes.patch"), comfy_host.pack("nodes.train_data")
    core = comfy_host.pack("controlnext_core")
    started = time.perf_counter()

    # ComfyUI loads checkpoints inside torch.inference_mode, and so is this UNet built: Train ControlNeXt
    # trains through such weights (its weight wrappers on a clone that ComfyUI loads)
    with torch.inference_mode():
        model = comfy_host.build_unet(family, args.quick, UNET_DTYPE)
    unet = model.model.diffusion_model
    check_memory(model, controlnet_dtype)
    generator = torch.Generator().manual_seed(5)
    latent = pixels // patch.LATENT_SCALE
    latents = model.model.process_latent_in(torch.randn(args.batch, 4, latent, latent, generator=generator))
    controls = core.resize_control(patch.control_image_from_comfy(comfy_host.control_image(args.batch, pixels, pixels)),
                                   pixels, pixels)
    context_dim = model.model.model_config.unet_config["context_dim"]
    entries = [comfy_host.conditioning(family, context_dim, seed)[0] for seed in range(args.batch)]
    conditioning = train_data.batch_conditioning(model, family, entries, latents.shape)
    step = Step(model, family, latents, controls, conditioning)

    # the ControlNet trained the usual way calls a UNet directly: its own copy, never loaded by ComfyUI,
    # with ordinary frozen weights, for it and the bare step
    plain = comfy_host.build_unet(family, args.quick, UNET_DTYPE)
    plain.model.diffusion_model.requires_grad_(False)
    plain_step = Step(plain, family, latents, controls, conditioning)
    methods = {"bare": BareStep(plain_step), "controlnext": ControlNeXtStep(step, True),
               "controlnext_encoder": ControlNeXtStep(step, False),
               "controlnet": ControlNetStep(plain_step, controlnet_dtype)}
    variants = [(name, methods[method], enabled) for name, method, enabled in VARIANTS
                if args.checkpointing or not enabled]
    build_s = time.perf_counter() - started

    for _, method, enabled in variants:  # warm-up: creates the optimiser states
        timed(method, enabled)
    probe = MemoryProbe(torch.device("cpu"))
    probe.cpu_precise(True)
    transient = {}
    for name, method, enabled in variants:
        probe.start()
        timed(method, enabled)
        transient[name] = probe.stop()
    probe.cpu_precise(False)

    times = {name: [] for name, _, _ in variants}
    for round_index in range(args.runs):
        shift = round_index % len(variants)
        for name, method, enabled in variants[shift:] + variants[:shift]:  # no variant always runs first
            times[name].append(timed(method, enabled))

    medians = {name: statistics.median(r[clock] for r in records) for name, records in times.items()}
    persistent = {name: method.persistent_bytes() for name, method, _ in variants}
    extra = {name: persistent[name] + transient[name] for name, _, _ in variants}
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    result = {
        "family": family, "quick": args.quick, "pixels": [pixels, pixels], "batch": args.batch, "clock": clock,
        "threads": torch.get_num_threads(), "device_name": device_name(torch.device("cpu")),
        "unet_dtype": str(UNET_DTYPE).removeprefix("torch."), "autocast": str(UNET_DTYPE).removeprefix("torch."),
        "controlnet_dtype": str(controlnet_dtype).removeprefix("torch."), "torch": torch.__version__,
        "recipe": {"controlnext": {k: v for k, v in dataclasses.asdict(methods["controlnext"].trainer.settings).items()
                                   if k in ("optimizer", "encoder_lr", "unet_lr", "max_grad_norm")},
                   "controlnet": {"optimizer": "adamw", "lr": CONTROLNET_LR,
                                  "max_grad_norm": CONTROLNET_MAX_GRAD_NORM}},
        "params": {"unet": sum(p.numel() for p in unet.parameters()),
                   **{name: methods[name].trained_parameters() for name in ("controlnext", "controlnext_encoder",
                                                                            "controlnet")}},
        "controlnet_start": methods["controlnet"].start,
        "variants": {name: {"method": type(method).__name__, "gradient_checkpointing": enabled}
                     for name, method, enabled in variants},
        "time_s": times, "median_s": medians,
        "wall_median_s": {name: statistics.median(r["wall"] for r in records) for name, records in times.items()},
        "memory": {
            "method": "extra = trained weights + optimiser state (tensor bytes) + the step's growth of the peak "
                      "resident set (VmHWM, glibc mapping blocks >= 64 KiB), over the frozen UNet's weights",
            "unet_bytes": unet_bytes, "persistent_bytes": persistent, "transient_bytes": transient,
            "extra_bytes": extra},
        "build_s": build_s,
    }
    result["ratios"] = ratios(result)
    result["wall_s"] = time.perf_counter() - started
    with open(args.out, "w") as out:
        json.dump(result, out, indent=1)


def ratios(family: dict) -> dict:
    """ControlNeXt against ControlNet: step time and extra memory, with checkpointing off (and on)."""
    out = {}
    for suffix in ("", "_checkpointing"):
        ours, theirs = f"controlnext{suffix}", f"controlnet{suffix}"
        if ours in family["median_s"]:
            out[f"time{suffix}"] = family["median_s"][ours] / family["median_s"][theirs]
            out[f"memory{suffix}"] = family["memory"]["extra_bytes"][ours] / family["memory"]["extra_bytes"][theirs]
    out["time_encoder"] = family["median_s"]["controlnext_encoder"] / family["median_s"]["controlnet"]
    out["memory_encoder"] = (family["memory"]["extra_bytes"]["controlnext_encoder"]
                             / family["memory"]["extra_bytes"]["controlnet"])
    return out


def targets(summary: dict) -> list[dict]:
    rows = []
    for key, family in summary["families"].items():
        for suffix, label in (("", ""), ("_checkpointing", ", gradient checkpointing")):
            if f"time{suffix}" in family["ratios"]:
                rows.append({"target": f"{NAMES[key]}{label}: ControlNeXt step time <= ControlNet's",
                             "value": family["ratios"][f"time{suffix}"], "limit": 1.0})
                rows.append({"target": f"{NAMES[key]}{label}: ControlNeXt extra memory <= 1/2 of ControlNet's",
                             "value": family["ratios"][f"memory{suffix}"], "limit": 0.5})
    for row in rows:
        row["met"] = row["value"] <= row["limit"]
    return rows


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2 ** 20:,.0f} MiB"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _millions(count: int) -> str:
    return f"{count / 1e6:,.2f} M" if count < 1e7 else f"{count / 1e6:,.1f} M"


def markdown(summary: dict) -> str:
    families = summary["families"]
    first = next(iter(families.values()))
    quick = " (quick smoke run: shallow test models)" if summary["quick"] else ""
    lines = [
        f"Measured {summary['date'][:10]} on {first['device_name']}, torch {first['torch']}, ComfyUI "
        f"{summary['comfyui'].get('version') or '?'}{quick}. "
        f"One training step, batch {first['batch']}, UNet weights and autocast in {first['autocast']}; median of "
        f"{summary['runs']} rotating rounds after a warm-up step; time = the step's "
        f"{'CPU time on one thread' if first['clock'] == 'cpu' else 'wall time'}.",
        "",
        "| model | size | bare UNet fwd+bwd | ControlNeXt (encoder + UNet subset) | ControlNeXt (encoder only) "
        "| ControlNet | ControlNeXt ÷ ControlNet | with checkpointing: ControlNeXt | ControlNet | ÷ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, family in families.items():
        m, r = family["median_s"], family["ratios"]
        lines.append(f"| {NAMES[key]} | {family['pixels'][0]}² | {_seconds(m['bare'])} | {_seconds(m['controlnext'])} "
                     f"| {_seconds(m['controlnext_encoder'])} | {_seconds(m['controlnet'])} | {r['time']:.2f} "
                     f"| {_seconds(m.get('controlnext_checkpointing'))} "
                     f"| {_seconds(m.get('controlnet_checkpointing'))} | {_ratio(r.get('time_checkpointing'))} |")
    lines += [
        "",
        "| model | UNet params | trained: ControlNeXt (encoder + UNet subset) | encoder only | ControlNet "
        "| extra memory: ControlNeXt | encoder only | ControlNet | ControlNeXt ÷ ControlNet "
        "| with checkpointing: ControlNeXt | ControlNet | ÷ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, family in families.items():
        p, e, r = family["params"], family["memory"]["extra_bytes"], family["ratios"]
        dtype = "" if family["controlnet_dtype"] == "float32" else f" ({family['controlnet_dtype']})"
        lines.append(f"| {NAMES[key]} | {_millions(p['unet'])} | {_millions(p['controlnext'])} "
                     f"| {_millions(p['controlnext_encoder'])} | {_millions(p['controlnet'])}{dtype} "
                     f"| {_mib(e['controlnext'])} | {_mib(e['controlnext_encoder'])} | {_mib(e['controlnet'])} "
                     f"| {r['memory']:.2f} | {_mib(e.get('controlnext_checkpointing'))} "
                     f"| {_mib(e.get('controlnet_checkpointing'))} | {_ratio(r.get('memory_checkpointing'))} |")
    lines += ["", "| target | value | limit | met |", "|---|---|---|---|"]
    lines += [f"| {row['target']} | {row['value']:.2f} | {row['limit']:.2f} | {'yes' if row['met'] else 'no'} |"
              for row in summary["targets"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the tests' shallow UNets at 64x64, one round: a smoke run")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: sd15,sdxl")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds (default 3; quick 1)")
    parser.add_argument("--batch", type=int, default=1, help="training batch size (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the stable choice on a shared machine, README Benchmarks)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also ControlNeXt and ControlNet with gradient checkpointing (about 1.5x the time)")
    parser.add_argument("--results", default=run.RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--family", choices=FAMILIES, help=argparse.SUPPRESS)  # a worker process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    if args.family:
        worker(args)
        return
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        raise SystemExit("Set COMFYUI_PATH to a ComfyUI checkout and run this with that ComfyUI's python.")
    started = time.perf_counter()
    summary = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
               "command": " ".join([os.path.basename(sys.executable), "benchmarks/train_step.py", *sys.argv[1:]]),
               "machine": run.machine(), "load_average_start": run.load_average(),
               "comfyui": {"version": run.comfyui_version(comfy_path), "commit": run.git_commit(comfy_path)},
               "pack_commit": run.git_commit(run.ROOT), "runs": args.runs, "families": {}}
    options = ["--runs", str(args.runs), "--batch", str(args.batch), "--threads", str(args.threads),
               *(["--quick"] if args.quick else []), *(["--checkpointing"] if args.checkpointing else [])]
    for family in args.families.split(","):
        summary["families"][family] = run.run_worker("train_step.py", ["--family", family, *options],
                                                     f"training step {family}")
    summary["load_average_end"] = run.load_average()
    summary["wall_s"] = time.perf_counter() - started
    summary["targets"] = targets(summary)
    table = markdown(summary)
    print()
    print(table)
    run.write_results(args.results, "train_step", summary, table)
    print(f"in {summary['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
