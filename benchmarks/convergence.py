"""Convergence study: how many training steps ControlNeXt and ControlNet need before their samples
follow the control, on a toy base trained here, sampled end to end through ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/convergence.py [--quick]

What it does (README, Benchmarks: "Convergence"), all on the CPU, nothing downloaded:
1. draws pictures of one to three shapes on smooth backgrounds and their canny controls (the pack's
   Canny), a training set and a held-out set (controlnext_testbed/toy_shapes.py);
2. trains a small autoencoder (64x64 pictures <-> 8x8x4 latents) and then, on its latents, a toy
   SD1.5-layout base UNet (ComfyUI's UNetModel) unconditionally; both then stay frozen
   (controlnext_testbed/toy_world.py, which the demo shares);
3. trains on that base, with the same data, batch, steps and seeds: ControlNeXt with this pack's
   trainer (controlnext_core.train.Trainer through nodes/train.py's ComfyDenoiser, the SD1.5 recipe),
   encoder only and encoder + the recipe's UNet subset; and ComfyUI's own ControlNet (comfy.cldm)
   started and trained the usual way (benchmarks/train_step.py's ``new_controlnet``, AdamW, clipping);
4. at each checkpoint step samples the held-out controls through ComfyUI's sampler, ControlNeXt
   applied by the Apply ControlNeXt node, ControlNet by ComfyUI's Apply ControlNet, decodes the
   samples and scores them: IoU of their canny edges with the control's, both dilated by 2 px;
5. writes benchmarks/results/convergence.json (every figure), convergence.md (the table) and
   benchmarks/figures/convergence.png (metric against step) and convergence_samples.png (a grid).
Runs are spread over worker processes of one torch thread each; times are CPU times.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from torch.nn import functional as F

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)
import comfy_host  # noqa: E402
from controlnext_testbed import toy_shapes  # noqa: E402  (comfy_host puts the checkout on sys.path)
from controlnext_testbed.toy_world import (COMPUTE_DTYPE, World, build_world, load_world, noisy_batch,  # noqa: E402
                                          release_comfy_models, sample, score, unet_call)

RESULTS = os.path.join(BENCHMARKS, "results")
FIGURES = os.path.join(BENCHMARKS, "figures")
METHODS = {  # method -> (label, ControlNeXt trains the UNet subset; None: a ControlNet)
    "controlnext": ("ControlNeXt (encoder + UNet subset)", True),
    "controlnext_encoder": ("ControlNeXt (encoder only)", False),
    "controlnet": ("ControlNet", None),
    "controlnet_fast": ("ControlNet, 10x learning rate", None),
}
SHORT_NAMES = {"controlnext": "CNX+U", "controlnext_encoder": "CNX", "controlnet": "CN", "controlnet_fast": "CN 10x"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Study(World):
    checkpoints: tuple[int, ...]  # training steps at which samples are scored; the last is the run's length
    batch: int
    seeds: tuple[int, ...]
    grid_steps: tuple[int, ...]  # checkpoints shown in the sample grid
    encoder_lr: float = 1e-4  # Train ControlNeXt's defaults (the official SD1.5 examples)
    unet_lr: float = 1e-5
    controlnet_lr: float = 1e-5  # ControlNet's usual rate (train_step.CONTROLNET_LR)
    # At 1e-5 the ControlNet had not moved its samples after 1,600 steps: the same ControlNet at
    # ControlNeXt's encoder rate, so that its slowness is not only its learning rate's.
    controlnet_fast_lr: float = 1e-4
    methods: tuple[str, ...] = tuple(METHODS)


FULL = Study(train_pictures=4096, heldout_pictures=16, autoencoder_steps=1500, autoencoder_batch=32,
             base_steps=1000, base_batch=16, base_lr=3e-4,
             checkpoints=(0, 25, 50, 100, 200, 400, 800, 1600), batch=4, seeds=(0, 1, 2), sampler_steps=10,
             grid_steps=(0, 100, 400, 1600))
QUICK = Study(train_pictures=64, heldout_pictures=2, autoencoder_steps=20, autoencoder_batch=8,
              base_steps=10, base_batch=4, base_lr=3e-4, checkpoints=(0, 3, 6), batch=2, seeds=(0,),
              sampler_steps=2, grid_steps=(0, 6), methods=("controlnext", "controlnext_encoder", "controlnet"))
PRESETS = {"full": FULL, "quick": QUICK}


def controlnext_samples(model, trainer, name: str, controls: torch.Tensor, study: Study) -> torch.Tensor:
    """What Train ControlNeXt outputs at this step (a CONTROLNEXT and the MODEL with the trained UNet
    weights as patches), applied by the Apply ControlNeXt node at strength 1, sampled."""
    train, nodes_train = comfy_host.pack("controlnext_core.train"), comfy_host.pack("nodes.train")
    loaders, apply = comfy_host.pack("nodes.loaders"), comfy_host.pack("nodes.apply")
    unet_weights = comfy_host.pack("controlnext_core.unet_weights")
    encoder = train.trainable_copy(trainer.encoder).eval().requires_grad_(False)  # training goes on
    encoder.control_scale = trainer.settings.control_scale
    names = nodes_train.diffusers_names(model)
    state = dict(model.model.diffusion_model.named_parameters())
    file_weights = {names[k]: v for k, v in train.release_unet_weights(
        trainer.trained_unet(), {k: state[k] for k in trainer.unet_parameters}, "sd15").items()}
    metadata = train.release_metadata("sd15", trainer.settings.control_scale, trainer.steps_done, "toy")
    trained = nodes_train.TrainedControlNeXt(name, encoder, file_weights, metadata)
    patched = (loaders.patch_unet_weights_from(model, file_weights, name, 1.0, unet_weights.OFFICIAL_MODE["sd15"])
               if file_weights else model)
    applied = apply.ApplyControlNeXt.execute(patched, trained, controls, 1.0, 0.0, 1.0).result[0]
    latents = sample(applied, controls.shape[0], study)
    release_comfy_models()
    return latents


def controlnet_samples(model, net, controls: torch.Tensor, study: Study) -> torch.Tensor:
    """ComfyUI's Apply ControlNet (advanced) at strength 1 on the conditioning, sampled."""
    import nodes

    positive, _ = nodes.ControlNetApplyAdvanced().apply_controlnet(
        toy_shapes.conditioning(), toy_shapes.conditioning(), net, controls, 1.0, 0.0, 1.0)
    latents = sample(model, controls.shape[0], study, positive)
    release_comfy_models()
    return latents


# --- one training run per (method, seed), in a worker ---------------------------------------------

def _worker_setup() -> None:
    comfy_host.setup("cpu")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def measured_step(step, probe) -> dict:
    """One step with its loss, its CPU time and, when ``probe`` is given, the growth of the peak resident set."""
    if probe is not None:
        probe.cpu_precise(True)
        probe.start()
    started = time.thread_time()
    loss = step()
    record = {"cpu_s": time.thread_time() - started, "loss": loss}
    if probe is not None:
        record["peak_bytes"] = probe.stop()
        probe.cpu_precise(False)
    return record


def run(job: dict) -> dict:
    """Train one method with one seed to the last checkpoint, scoring samples at each checkpoint."""
    from denoiser import MemoryProbe

    study = Study(**job["study"])
    method, seed = job["method"], job["seed"]
    # a worker runs several jobs: what each starts from (the ControlNet's hint convolutions are drawn
    # from the global generator) must not depend on which jobs that worker ran before
    torch.manual_seed(seed)
    model, autoencoder, data = load_world(job["world"])
    train, nodes_train = comfy_host.pack("controlnext_core.train"), comfy_host.pack("nodes.train")
    latents = model.model.process_latent_in(data["latents"])
    controls = data["controls"].movedim(-1, 1)  # [N,3,H,W] in [0,1], as both trainers take control images
    heldout = data["heldout_controls"]
    probe = MemoryProbe(torch.device("cpu"))
    result = {"method": method, "seed": seed, "steps": [], "iou": [], "step_cpu_s": [], "loss": [], "grid": {}}
    unet = model.model.diffusion_model

    if METHODS[method][1] is None:
        import train_step

        net, _ = train_step.new_controlnet(model, torch.float32)
        control_model = net.control_model.train()
        parameters = list(control_model.parameters())
        rate = study.controlnet_fast_lr if method == "controlnet_fast" else study.controlnet_lr
        optimizer = torch.optim.AdamW(parameters, lr=rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []

        def step():
            nonlocal order
            while len(order) < study.batch:
                order += torch.randperm(len(latents), generator=generator).tolist()
            indices, order = order[:study.batch], order[study.batch:]
            noisy, noise, timesteps = noisy_batch(latents[indices], generator)
            with torch.autocast("cpu", dtype=COMPUTE_DTYPE):
                context = toy_shapes.conditioning(len(indices))[0][0]
                residuals = control_model(x=noisy, hint=controls[indices], timesteps=timesteps.float(),
                                          context=context)
                prediction = unet_call(model, noisy, timesteps,
                                       control=net.control_merge(residuals, None, output_dtype=None))
            loss = F.mse_loss(prediction.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, train_step.CONTROLNET_MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        def samples():
            control_model.eval()
            try:
                return controlnet_samples(model, net, heldout, study)
            finally:
                control_model.train()

        result["trained_parameters"] = sum(p.numel() for p in parameters)
        optimizer_of = optimizer
        contexts = []
    else:
        train_unet = METHODS[method][1]
        settings = train.TrainingSettings(family="sd15", steps=study.checkpoints[-1], batch_size=study.batch,
                                          encoder_lr=study.encoder_lr, unet_lr=study.unet_lr, train_unet=train_unet,
                                          seed=seed)
        state = dict(unet.named_parameters())
        names = train.trainable_unet_names(state, "sd15") if train_unet else []
        trainer = train.Trainer(train.new_encoder(seed), {n: state[n] for n in names}, settings)
        denoiser = nodes_train.ComfyDenoiser(model, "sd15", names)
        denoiser.train_through(trainer.unet_parameters)

        def step():
            indices = trainer.batch_indices(len(latents))
            context = toy_shapes.conditioning(len(indices))[0][0]
            return trainer.step(denoiser, train.TrainingBatch(latents[indices], controls[indices], (context, None)),
                         autocast_dtype=COMPUTE_DTYPE)

        def samples():
            return controlnext_samples(model, trainer, f"{method} seed {seed}", heldout, study)

        parameters = trainer.trainable_parameters()
        result["trained_parameters"] = sum(p.numel() for p in parameters)
        optimizer_of = trainer.optimizer
        contexts = [lambda: denoiser.loaded(use_checkpointing=False)]  # loaded again after each sampling

    def evaluate(done: int) -> None:
        latents_out = samples()
        ious, pictures = score(autoencoder, latents_out, heldout)
        result["steps"].append(done)
        result["iou"].append(ious)
        if done in study.grid_steps:
            result["grid"][done] = (pictures * 255).round().to(torch.uint8).numpy()

    started = time.process_time()
    done = 0
    evaluate(0)
    for checkpoint in study.checkpoints[1:]:
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context())
            while done < checkpoint:
                record = measured_step(step, probe if done == 2 else None)
                done += 1
                result["step_cpu_s"].append(record["cpu_s"])
                result["loss"].append(record["loss"])
                if "peak_bytes" in record:
                    result["peak_step_bytes"] = record["peak_bytes"]
        evaluate(done)
    import train_step

    # trained weights and optimiser state, which live through the whole run beside the step's peak
    result["persistent_bytes"] = train_step.tensor_bytes(parameters) + train_step.optimizer_state_bytes(optimizer_of)
    result["run_cpu_s"] = time.process_time() - started
    return result


def steps_to_fraction(steps: list[int], values: list[float], final: float, start: float, fraction: float = 0.9):
    """The first checkpoint from which the curve stays at or above ``start + fraction (final - start)``;
    None when it never gets there (or the final value is not above the start)."""
    if final <= start:
        return None
    target = start + fraction * (final - start)
    for index, step in enumerate(steps):
        if all(v >= target for v in values[index:]):
            return step
    return None


def summarise(world: dict, runs: list[dict], study: Study) -> dict:
    uncontrolled = float(np.mean(world["uncontrolled_iou"]))
    methods = {}
    for method, (label, _) in METHODS.items():
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        steps = mine[0]["steps"]
        per_seed = np.array([[np.mean(ious) for ious in r["iou"]] for r in mine])  # [seeds, checkpoints]
        mean = per_seed.mean(axis=0)
        final = float(mean[-1])
        step_cpu = [t for r in mine for t in r["step_cpu_s"][3:]]  # after the warm-up steps
        methods[method] = {
            "label": label, "steps": steps, "mean_iou": mean.tolist(), "min_iou": per_seed.min(axis=0).tolist(),
            "max_iou": per_seed.max(axis=0).tolist(), "per_seed_iou": per_seed.tolist(),
            "final_iou": final, "step0_iou": float(mean[0]),
            "steps_to_90pct_of_final": steps_to_fraction(steps, mean.tolist(), final, 0.0)
            if final > mean[0] else None,
            "steps_to_90pct_of_gain_over_base": steps_to_fraction(steps, mean.tolist(), final, uncontrolled),
            "trained_parameters": mine[0]["trained_parameters"],
            "step_cpu_s_median": float(np.median(step_cpu)) if step_cpu else None,
            "peak_step_bytes": int(np.median([r["peak_step_bytes"] for r in mine if "peak_step_bytes" in r]))
            if any("peak_step_bytes" in r for r in mine) else None,
            "persistent_bytes": mine[0]["persistent_bytes"],
        }
    return {"uncontrolled_iou": uncontrolled, "reconstruction_iou": float(np.mean(world["reconstruction_iou"])),
            "methods": methods}


def plot(summary: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.2), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    colours = {"controlnext": "tab:blue", "controlnext_encoder": "tab:cyan", "controlnet": "tab:red",
               "controlnet_fast": "tab:orange"}
    for method, data in summary["methods"].items():
        x = data["steps"]
        axes.plot(x, data["mean_iou"], marker="o", color=colours[method], label=data["label"])
        axes.fill_between(x, data["min_iou"], data["max_iou"], color=colours[method], alpha=0.18)
    axes.axhline(summary["uncontrolled_iou"], color="grey", linestyle="--", label="uncontrolled base")
    axes.set_xscale("symlog", linthresh=25)
    checkpoints = max((data["steps"] for data in summary["methods"].values()), key=len)
    axes.set_xlim(0, checkpoints[-1] * 1.15)
    axes.set_xticks(checkpoints, [str(step) for step in checkpoints])
    axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    # the autoencoder's ceiling is far above the curves: said in words, so the curves keep the height
    axes.text(0.99, 0.02, "ceiling (the autoencoder's own reconstructions): %.2f" % summary["reconstruction_iou"],
              transform=axes.transAxes, ha="right", va="bottom", fontsize=8)
    axes.set_xlabel("training step (batch %d)" % summary["batch"])
    axes.set_ylabel("edge IoU with the control (held-out)")
    axes.set_title("Following the control while training (mean, band: min-max over seeds)")
    axes.legend(fontsize=8, loc="upper left")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def grid(world: dict, runs: list[dict], study: Study, path: str, rows: int = 4) -> None:
    """Rows: held-out controls. Columns: picture, control, uncontrolled base, then each method
    at the grid steps (first seed)."""
    from PIL import Image, ImageDraw

    size = world["pictures"].shape[1]
    columns = [("picture", world["pictures"]), ("control", world["controls"]), ("base", world["base_samples"])]
    for method in METHODS:
        first = next((r for r in runs if r["method"] == method and r["seed"] == study.seeds[0]), None)
        if first is None:
            continue
        for step in study.grid_steps:
            columns.append((f"{SHORT_NAMES[method]} {step}", first["grid"][step]))
    header = 14
    canvas = Image.new("RGB", (len(columns) * (size + 2), header + min(rows, len(world["pictures"])) * (size + 2)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for c, (title, images) in enumerate(columns):
        draw.text((c * (size + 2) + 2, 1), title, fill="black")
        for r in range(min(rows, len(images))):
            canvas.paste(Image.fromarray(images[r]), (c * (size + 2), header + r * (size + 2)))
    canvas.save(path)


def table(summary: dict) -> str:
    lines = ["| method | trainable parameters | IoU at step 0 | final IoU (step %d) | steps to 90 %% of final IoU "
             "| steps to 90 %% of the gain over the base | CPU time per step | peak memory per step (+ weights and "
             "optimiser state) |" % summary["last_step"],
             "|---|---|---|---|---|---|---|---|"]
    for data in summary["methods"].values():
        def steps(value):
            if data["final_iou"] <= data["step0_iou"]:
                return "no gain over step 0"
            return "not reached" if value is None else str(value)
        peak = data["peak_step_bytes"]
        lines.append(
            f"| {data['label']} | {data['trained_parameters'] / 1e6:.2f} M | {data['step0_iou']:.3f} | "
            f"{data['final_iou']:.3f} | {steps(data['steps_to_90pct_of_final'])} | "
            f"{steps(data['steps_to_90pct_of_gain_over_base'])} | {data['step_cpu_s_median']:.3f} s | "
            f"{'–' if peak is None else f'{peak / 2 ** 20:.0f} MiB'} (+ {data['persistent_bytes'] / 2 ** 20:.0f} MiB) |")
    lines.append(f"| uncontrolled base | – | {summary['uncontrolled_iou']:.3f} | – | – | – | – | – |")
    lines.append(f"| autoencoder reconstruction (ceiling) | – | {summary['reconstruction_iou']:.3f} | – | – | – | – | – |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="full: the study; quick: a one-minute smoke run (CI)")
    parser.add_argument("--quick", action="store_const", dest="preset", const="quick", help="--preset quick")
    parser.add_argument("--workers", type=int, default=2, help="training runs at once (one torch thread each)")
    parser.add_argument("--results", default=RESULTS, help="folder for convergence.json and convergence.md")
    parser.add_argument("--figures", default=FIGURES, help="folder for the plot and the sample grid")
    parser.add_argument("--world", help="keep the data, autoencoder and base in this folder, or reuse them from "
                                        "it (default: a temporary folder)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="only these methods (a variant run)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    parser.add_argument("--encoder-lr", type=float, help="ControlNeXt's encoder learning rate (default 1e-4)")
    parser.add_argument("--controlnet-lr", type=float, help="ControlNet's learning rate (default 1e-5)")
    args = parser.parse_args(argv)
    overrides = {"methods": tuple(args.methods) if args.methods else None,
                 "seeds": tuple(args.seeds) if args.seeds else None,
                 "encoder_lr": args.encoder_lr, "controlnet_lr": args.controlnet_lr}
    study = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    _worker_setup()
    torch.set_num_threads(args.workers)  # the world is built by this process alone, before the workers start
    wall = time.perf_counter()
    with contextlib.ExitStack() as stack:
        folder = args.world or stack.enter_context(tempfile.TemporaryDirectory(prefix="controlnext_convergence_"))
        os.makedirs(folder, exist_ok=True)
        world = build_world(study, folder)
        torch.set_num_threads(1)
        print(f"world built: {world['cpu_s']} CPU s; uncontrolled IoU {np.mean(world['uncontrolled_iou']):.3f}, "
              f"reconstruction IoU {np.mean(world['reconstruction_iou']):.3f}", flush=True)
        jobs = [{"method": m, "seed": s, "world": folder, "study": dataclasses.asdict(study)}
                for s in study.seeds for m in study.methods]
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context,
                                                    initializer=_worker_setup) as pool:
            runs = []
            for result in pool.map(run, jobs):
                runs.append(result)
                print(f"{result['method']} seed {result['seed']}: IoU "
                      + " ".join(f"{s}:{np.mean(v):.3f}" for s, v in zip(result["steps"], result["iou"]))
                      + f" ({result['run_cpu_s']:.0f} CPU s)", flush=True)
    summary = summarise(world, runs, study)
    summary.update(batch=study.batch, last_step=study.checkpoints[-1])
    os.makedirs(args.results, exist_ok=True)
    os.makedirs(args.figures, exist_ok=True)
    plot(summary, os.path.join(args.figures, "convergence.png"))
    grid(world, runs, study, os.path.join(args.figures, "convergence_samples.png"))
    cpu_total = sum(world["cpu_s"].values()) + sum(r["run_cpu_s"] for r in runs)
    report = {
        "date": datetime.date.today().isoformat(), "preset": args.preset, "machine": platform.machine(),
        "cpu": _cpu_name(), "torch": torch.__version__,
        "settings": dataclasses.asdict(study), "wall_s": time.perf_counter() - wall, "cpu_s": cpu_total,
        "world": {k: v for k, v in world.items() if k not in ("pictures", "controls", "base_samples")},
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "grid"} for r in runs],
    }
    with open(os.path.join(args.results, "convergence.json"), "w") as file:
        json.dump(report, file, indent=1)
    text = table(summary)
    with open(os.path.join(args.results, "convergence.md"), "w") as file:
        file.write(text + "\n")
    print(text)
    print(f"{report['wall_s']:.0f} s wall, {cpu_total:.0f} CPU s")


def _cpu_name() -> str:
    from denoiser import device_name

    return device_name(torch.device("cpu"))


if __name__ == "__main__":
    main()
