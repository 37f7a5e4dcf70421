"""Per-step denoiser cost of one model family: bare UNet, + ControlNeXt, + ComfyUI's ControlNet.

One process per family (``run.py`` starts them), so each measures its peak memory from a clean
start and frees its models on exit. All variants run in the same process, side by side: every
round runs each variant once, in a rotating order, and the figure is the median over rounds.

A "step" is one call of the sampler's model function: ComfyUI's whole denoiser with CFG (cond
and uncond in one batch of 2 rows per latent, SVD: 2 x frames), ComfyUI's ControlNet
``get_control``, our patch, and the CFG mix; the sampler around it is a timing loop (a KSAMPLER)
inside ComfyUI's own sampling, so model loading and condition processing are outside the timed
calls. The first call of every variant (its warm-up) is not timed: it measures peak memory.

    COMFYUI_PATH=... python benchmarks/denoiser.py --family sd15 --out /tmp/sd15.json
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402
from run import process_status_bytes  # noqa: E402

# Sizes on this CPU (2 cores) keep the whole benchmark under 10 minutes; the FLOP floors are also
# counted at the paper's sizes. (height, width) in pixels; frames only for SVD.
SETTINGS = {
    "sd15": dict(layout="mid", pixels=(256, 256), frames=1, paper_pixels=(512, 512), paper_frames=1,
                 controlnet=True, scheduler="normal"),
    "sdxl": dict(layout="base", pixels=(128, 128), frames=1, paper_pixels=(1024, 1024), paper_frames=1,
                 controlnet=True, scheduler="normal"),
    "svd": dict(layout="base", pixels=(128, 128), frames=4, paper_pixels=(576, 1024), paper_frames=14,
                controlnet=False, scheduler="karras"),
}
GPU_PIXELS = {"sd15": (512, 512), "sdxl": (1024, 1024), "svd": (576, 1024)}
GPU_FRAMES = {"svd": 14}
QUICK = dict(pixels=(64, 64), frames=2)
SCHEDULE_STEPS = 1000  # long enough for every slot of the benchmark to have steps of its own
# Variants measuring what a schedule saves and what a second control costs (README, Benchmarks)
HALF_SCHEDULE, TWO_CONTROLS = "controlnext_half_schedule", "controlnext_two"
CFG = 2.5


# ---------------------------------------------------------------- FLOPs (torch's counter, on meta)

@contextlib.contextmanager
def countable_attention():
    """ComfyUI's CPU attention (sub-quadratic) asks the device for free memory, which meta tensors
    cannot answer; the basic attention does the same matmuls in a form the FLOP counter sees."""
    import comfy.ldm.modules.attention as attention

    saved = attention.optimized_attention, attention.optimized_attention_masked
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_basic
    try:
        yield
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = saved


def count_flops(function) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


def flop_table(family: str, quick: bool, pixels: tuple[int, int], frames: int) -> dict:
    """Matmul/conv FLOPs of one CFG step (batch 2 rows per latent) for each part, at ``pixels``."""
    import comfy.cldm.cldm

    core = comfy_host.pack("controlnext_core")
    encoders = comfy_host.pack("controlnext_core.encoders")
    layout = SETTINGS[family]["layout"]
    meta = torch.device("meta")
    model = comfy_host.unet_on_meta(family, quick)
    unet = model.model.diffusion_model
    config = model.model.model_config.unet_config
    latent = (pixels[0] // 8, pixels[1] // 8)
    rows = 2 * frames
    dtype = torch.float16
    x = torch.zeros(rows, config["in_channels"], *latent, device=meta, dtype=dtype)
    timesteps = torch.zeros(rows, device=meta)
    tokens = 1 if family == "svd" else 77
    context = torch.zeros(rows, tokens, config["context_dim"], device=meta, dtype=dtype)
    extra = {}
    if config.get("adm_in_channels"):
        extra["y"] = torch.zeros(rows, config["adm_in_channels"], device=meta, dtype=dtype)
    if family == "svd":
        extra.update(num_video_frames=frames, image_only_indicator=torch.zeros(1, device=meta), time_context=context)
    result = {"pixels": list(pixels), "frames": frames}
    with countable_attention(), torch.no_grad():
        result["unet"] = count_flops(lambda: unet(x, timesteps, context, transformer_options={}, **extra))
        with meta:
            encoder = encoders.ConditionEncoder(encoders.CONFIGS[layout])
        controlnext = core.bind(encoder, family)
        block = core.injection_block(controlnext.rule, list(unet.num_res_blocks))
        # the hidden size there: input block i sits at level i // (res blocks + 1); output 0 is the deepest
        level = block[1] // (unet.num_res_blocks[0] + 1) if block[0] == "input" else len(unet.channel_mult) - 1
        size = (latent[0] // 2 ** level, latent[1] // 2 ** level)
        per_step = frames  # one image (SD) or one per frame (SVD), encoded once per step
        image = torch.zeros(per_step, 3, *pixels, device=meta)
        result["controlnext"] = count_flops(lambda: controlnext.encode_for(image, torch.zeros(per_step, device=meta),
                                                                          size))
        # the official pipelines encode for every row of the CFG batch, at full size before pooling
        both = torch.zeros(rows, 3, *pixels, device=meta)
        result["controlnext_official"] = count_flops(lambda: controlnext.encode(both, torch.zeros(rows, device=meta)))
        if SETTINGS[family]["controlnet"]:
            cn_config = comfy_host.controlnet_config(config, dtype, meta)
            controlnet = comfy.cldm.cldm.ControlNet(**cn_config)
            hint = torch.zeros(rows, 3, *pixels, device=meta, dtype=dtype)
            result["controlnet"] = count_flops(lambda: controlnet(x, hint, timesteps, context, **extra))
            del controlnet
    result["floor"] = result["controlnext"] / result["unet"]
    result["official"] = result["controlnext_official"] / result["unet"]
    if "controlnet" in result:
        result["controlnet_ratio"] = result["controlnet"] / result["unet"]
    del model, unet
    return result


# ---------------------------------------------------------------- memory

class MemoryProbe:
    """Peak memory of one call above what was allocated just before it.

    CUDA: the caching allocator's statistics. CPU: the process's peak resident set (Linux VmHWM,
    reset through /proc/self/clear_refs) with glibc told to map every block of 64 KiB or more on
    its own and to give freed memory back (``malloc_trim``), so the resident set follows the live
    tensors. ``cpu_precise(False)`` restores glibc's usual reuse of freed blocks for the timed calls.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    def cpu_precise(self, precise: bool) -> None:
        if self.libc is not None:
            M_MMAP_THRESHOLD = -3
            self.libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024 if precise else 32 * 1024 * 1024)

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self.base = process_status_bytes("VmRSS:")

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return process_status_bytes("VmHWM:") - self.base


# ---------------------------------------------------------------- timing

def synchronizer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_sampler(start: int, calls: int, record: list, sync, probe: MemoryProbe | None = None,
                  inside: InsideTimer | None = None):
    """A KSAMPLER whose steps are ``calls`` timed model calls at steps ``start``... of the schedule;
    each appends {"wall": s, "cpu": s (this thread's CPU time)[, "peak": bytes]} to ``record``.

    Every slot of the benchmark starts at new steps of a long schedule, as a sampler's steps do:
    the patch never finds the sigma of a call in its memo from an earlier call, so it encodes at
    every step (exact mode) or at every k-th (refresh mode), exactly as in real sampling. The
    latent is not updated between calls: with random weights it would drift far from any real
    range, and the cost of a call does not depend on its values.
    """
    import comfy.samplers

    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        denoised = x
        for i in range(start, start + calls):
            if probe is not None:
                probe.start()
            if inside is not None:
                inside.take()  # whatever ran outside the timed calls (warm-up, memory pass)
            sync()
            cpu, wall = time.thread_time(), time.perf_counter()
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            sync()
            record.append({"wall": time.perf_counter() - wall, "cpu": time.thread_time() - cpu})
            if inside is not None:
                record[-1]["inside"] = inside.take()
            if probe is not None:
                record[-1]["peak"] = probe.stop()
        if not torch.isfinite(denoised).all():
            raise RuntimeError("the denoiser gave non-finite values: the random model overflowed at this dtype")
        return denoised

    return comfy.samplers.KSAMPLER(sampler_function)


class InsideTimer:
    """CPU time spent inside the added part during a call: our patch's ``inject`` or ComfyUI's
    ControlNet ``get_control``. Measured within the very call whose total is measured, so the two
    share the machine's state of the moment: the in-call overhead, inside / (total - inside), is
    far less noisy on a shared machine than the difference of two separately timed calls."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start

        setattr(owner, name, timed)

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def patches_of(model) -> list:
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    return [p for kind in ("input_block_patch_after_skip", "output_block_patch") for p in patches.get(kind, [])]


def run_variant(variant: dict, noise: torch.Tensor, sigmas: torch.Tensor, sampler) -> None:
    import comfy.sample

    comfy.sample.sample_custom(variant["model"], noise, CFG, sampler, sigmas, variant["positive"],
                               variant["negative"], torch.zeros_like(noise), disable_pbar=True, seed=0)


def per_step(run: list[dict], clock: str) -> float:
    """A run's mean time per step (a run of k calls covers one refresh cycle)."""
    return sum(call[clock] for call in run) / len(run)


def median_per_step(runs: list[list[dict]], clock: str) -> float:
    return statistics.median(per_step(run, clock) for run in runs)


# ---------------------------------------------------------------- the benchmark

def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--quick", action="store_true", help="the tests' shallow models at 64x64: a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=None, help="UNet dtype: bf16 on the CPU (its fast path here), fp16 on a GPU")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default on the CPU: 1, see README; on a GPU: torch's default)")
    parser.add_argument("--refresh", type=int, default=3, help="k of the refresh-every-k-steps variant (0: none)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    comfy_host.setup(args.device)
    import comfy.model_management
    import comfy.samplers
    import nodes as comfy_nodes

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    device = comfy.model_management.get_torch_device()
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    # On the CPU the headline clock is the step's CPU time (one thread: all the work runs on it),
    # which other jobs on the machine do not inflate; wall-clock is kept beside it. On a GPU: wall.
    clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    dtype_name = args.dtype or ("bf16" if device.type == "cpu" else "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    family = args.family
    settings = SETTINGS[family]
    pixels, frames = settings["pixels"], settings["frames"]
    if args.quick:
        pixels, frames = QUICK["pixels"], (QUICK["frames"] if family == "svd" else 1)
    elif device.type == "cuda":
        pixels, frames = GPU_PIXELS[family], GPU_FRAMES.get(family, 1)
    latent = (pixels[0] // 8, pixels[1] // 8)
    started = time.perf_counter()

    result = {"family": family, "layout": settings["layout"], "quick": args.quick, "dtype": dtype_name,
              "device": str(device), "device_name": device_name(device), "pixels": list(pixels),
              "latent": list(latent), "frames": frames, "rows_per_step": 2 * frames, "cfg": CFG,
              "torch": torch.__version__}
    result["flops"] = {"benchmark": flop_table(family, args.quick, pixels, frames)}
    if not args.quick:
        result["flops"]["paper"] = flop_table(family, False, settings["paper_pixels"], settings["paper_frames"])
    gc.collect()

    build_start = time.perf_counter()
    model = comfy_host.build_unet(family, args.quick, dtype)
    file = comfy_host.controlnext_file(settings["layout"])
    context_dim = model.model.model_config.unet_config["context_dim"]
    noise = torch.randn(frames, 4, *latent, generator=torch.Generator().manual_seed(5))
    positive = comfy_host.conditioning(family, context_dim, 1, noise)
    negative = comfy_host.conditioning(family, context_dim, 2, noise)
    image = comfy_host.control_image(frames, *pixels)
    unet_module = model.model.diffusion_model
    params = {"unet": sum(p.numel() for p in unet_module.parameters()),
              "controlnext": sum(p.numel() for p in file.encoder.parameters())}
    param_bytes = {"unet": parameter_bytes(unet_module), "controlnext": parameter_bytes(file.encoder)}

    variants = {"bare": {"model": model, "positive": positive, "negative": negative}}
    if family == "svd":
        video = comfy_host.pack("nodes.video")
        patched = video.ApplyControlNeXtSVD.execute(model, file, image, 1.0, 0.0, 1.0, "error", False).result[0]
    else:
        apply = comfy_host.pack("nodes.apply")
        patched = apply.ApplyControlNeXt.execute(model, file, image, 1.0, 0.0, 1.0).result[0]
    variants["controlnext"] = {"model": patched, "positive": positive, "negative": negative}
    if settings["controlnet"]:
        controlnet, params["controlnet"] = comfy_host.comfy_controlnet(model)
        param_bytes["controlnet"] = parameter_bytes(controlnet.control_model)
        cn_positive, cn_negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, controlnet, image, 1.0, 0.0, 1.0)
        variants["controlnet"] = {"model": model, "positive": cn_positive, "negative": cn_negative}
    refresh = refresh_variant(family, model, file, image, args.refresh)
    if refresh is not None:
        variants[f"controlnext_refresh{args.refresh}"] = {"model": refresh, "positive": positive, "negative": negative,
                                                          "calls": args.refresh}
        param_bytes[f"controlnext_refresh{args.refresh}"] = param_bytes["controlnext"]
    for name, (variant_model, calls, extra_bytes) in schedule_variants(family, model, file, image).items():
        variants[name] = {"model": variant_model, "positive": positive, "negative": negative, "calls": calls}
        param_bytes[name] = param_bytes["controlnext"] + extra_bytes
    if clock == "cpu":  # the in-call attribution (one thread: everything runs on this thread)
        for name, variant in variants.items():
            if name == "bare":
                continue
            variant["inside"] = InsideTimer()
            if name == "controlnet":
                for net in {id(c[1]["control"]): c[1]["control"] for c in cn_positive + cn_negative}.values():
                    variant["inside"].wrap(net, "get_control")
            else:
                for patch in patches_of(variant["model"]):
                    variant["inside"].wrap(patch, "inject")
    result["threads"] = torch.get_num_threads()
    result["build_s"] = time.perf_counter() - build_start
    result["params"] = params
    result["param_bytes"] = param_bytes

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), settings["scheduler"],
                                             SCHEDULE_STEPS)
    sync = synchronizer(device)
    probe = MemoryProbe(device)

    # Slots of steps: every variant runs at the same steps of the schedule within a slot, and each
    # slot starts at new steps (a multiple of the refresh k, so that a refresh run covers one cycle).
    slot = max(v.get("calls", 1) for v in variants.values())
    slots = iter(range(0, SCHEDULE_STEPS - slot, slot))
    # warm-up (not timed): the bare model once, then every variant once with its peak memory measured
    run_variant(variants["bare"], noise, sigmas, timed_sampler(next(slots), 1, [], sync))
    probe.cpu_precise(True)
    transient = {}
    start = next(slots)
    for name, variant in variants.items():
        record = []
        run_variant(variant, noise, sigmas, timed_sampler(start, 1, record, sync, probe))
        transient[name] = record[0]["peak"]
    probe.cpu_precise(False)

    times = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(args.runs):
        start = next(slots)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order: no variant always runs first
            record = []
            run_variant(variants[name], noise, sigmas,
                        timed_sampler(start, variants[name].get("calls", 1), record, sync,
                                      inside=variants[name].get("inside")))
            times[name].append(record)

    result["clock"] = clock
    result["time_s"] = times
    for label, which in (("", clock), ("wall_", "wall")):
        medians = {name: median_per_step(runs, which) for name, runs in times.items()}
        overhead = {name: medians[name] / medians["bare"] - 1 for name in variants if name != "bare"}
        # the same from each round's own bare run (adjacent in time): robust to slow drifts of the machine
        paired = {name: statistics.median(per_step(run, which) / per_step(bare, which) - 1
                                          for run, bare in zip(times[name], times["bare"]))
                  for name in variants if name != "bare"}
        result[f"{label}median_s"], result[f"{label}overhead"], result[f"{label}overhead_paired"] = medians, overhead, paired
        if "controlnet" in overhead:
            result[f"{label}overhead_vs_controlnet"] = overhead["controlnext"] / overhead["controlnet"]
    if clock == "cpu":
        result["overhead_in_call"] = {
            name: statistics.median(sum(c["inside"] for c in run) / sum(c["cpu"] - c["inside"] for c in run)
                                    for run in runs)
            for name, runs in times.items() if name != "bare"}
        if "controlnet" in times:
            result["overhead_in_call_vs_controlnet"] = (result["overhead_in_call"]["controlnext"]
                                                        / result["overhead_in_call"]["controlnet"])
    # what the schedule saves and a second control costs, as shares of one exact ControlNeXt's added time
    result["schedule"] = {}
    for label, added in (("", result["overhead"]), ("_in_call", result.get("overhead_in_call"))):
        if added is not None:
            result["schedule"][f"half_zero_vs_exact{label}"] = added[HALF_SCHEDULE] / added["controlnext"]
            result["schedule"][f"two_vs_one{label}"] = added[TWO_CONTROLS] / added["controlnext"]
    bare_memory = param_bytes["unet"] + transient["bare"]
    result["memory"] = {
        "method": "CUDA allocator peak" if device.type == "cuda" else
                  "peak resident set (VmHWM) growth during one call, glibc mapping blocks >= 64 KiB",
        "transient_bytes": transient,
        "bare_bytes": bare_memory,
        "extra_bytes": {name: param_bytes[name] + transient[name] - transient["bare"]
                        for name in variants if name != "bare"},
    }
    result["memory"]["extra_fraction"] = {name: value / bare_memory
                                          for name, value in result["memory"]["extra_bytes"].items()}
    result["wall_s"] = time.perf_counter() - started
    with open(args.out, "w") as out:
        json.dump(result, out, indent=1)


def refresh_variant(family: str, model, file, image, k: int):
    """Apply ControlNeXt with the opt-in refresh-every-k-steps mode (SD1.5/SDXL), or None."""
    if k <= 1 or family == "svd":
        return None
    apply = comfy_host.pack("nodes.apply")
    return apply.ApplyControlNeXt.execute(model, file, image, 1.0, 0.0, 1.0, refresh_every=k).result[0]


def schedule_variants(family: str, model, file, image) -> dict[str, tuple]:
    """name -> (patched model, calls per round, added weight bytes): ControlNeXt at strength 0 on every
    other step (a per-step list; a round covers one step on and one off), and a second ControlNeXt (another
    random file of the same layout, its own image encoding) on top of the first."""
    every_other = comfy_host.pack("nodes.schedule").StrengthPerStepNode.execute(
        ", ".join(["1", "0"] * (SCHEDULE_STEPS // 2))).result[0]
    second = comfy_host.controlnext_file(SETTINGS[family]["layout"], seed=1)
    if family == "svd":
        node = comfy_host.pack("nodes.video").ApplyControlNeXtSVD

        def apply(base, controlnext, **options):
            return node.execute(base, controlnext, image, 1.0, 0.0, 1.0, "error", False, **options).result[0]
    else:
        node = comfy_host.pack("nodes.apply").ApplyControlNeXt

        def apply(base, controlnext, **options):
            return node.execute(base, controlnext, image, 1.0, 0.0, 1.0, **options).result[0]
    return {HALF_SCHEDULE: (apply(model, file, schedule=every_other), 2, 0),
            TWO_CONTROLS: (apply(apply(model, file), second), 1, parameter_bytes(second.encoder))}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
