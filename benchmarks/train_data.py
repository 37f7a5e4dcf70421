"""Training from a data set on disk: Load Training Data -> Train ControlNeXt's ``data`` input, which
encodes the folder once into its cache (controlnext_core.training_cache) and streams batches from it.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/train_data.py [--quick] [--work DIR]

Tiny random-weight stand-ins throughout, in a real ComfyUI: the test server's tiny checkpoint
(tests/server_nodes/tiny_checkpoint.py: shallow SD1.5 / SDXL UNets of the real layout, ComfyUI's CLIP
classes with three thin layers, a TAESD-shaped VAE), pictures of 64x64 made here (a coloured block on
a gradient, its outline as the control, a caption in a .txt file: the "folders" layout). Each part
runs in fresh processes (one torch thread each), side by side in one run:

1. memory: peak resident set (VmHWM) of a process that trains a fixed number of steps through the
   node from a folder of 100 and of 10,000 pictures whose caches were built before, alternating
   100 / 10,000 / 100 / 10,000; and, for scale, the same 10,000 pictures given in memory (LATENT /
   IMAGE / CONDITIONING);
2. step time: Train ControlNeXt's loop (nodes/train.py ``train``) with its batches taken alternately
   from the cache and from in-memory inputs holding the same tensors (A B A B, same trainer, model
   and batch size), median CPU time per source; in-call: the difference of the two sources' batch
   reads (timed inside the same steps) over the in-memory step, the figure that noise does not swamp;
3. cache building: pictures per second per family and bytes on disk per picture, with the time
   split into the VAE, the text encoder and the rest (reading, hashing, cropping, writing); the
   10,000-picture cache is built with an 8x8 average pool in place of the VAE (TAESD alone would take
   12 minutes of this CPU), so its rate is the pack's own cost per picture at that size; bytes per
   picture at the real sizes computed from the cached tensors' shapes and dtypes.

Prints the tables and writes benchmarks/results/train_data.json and .md. ``--quick``: 20 / 200
pictures and a few steps (a smoke run).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

RESOLUTION = 64
BATCH = 4
FAMILIES = ("sd15", "sdxl")
NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
SETTINGS = {  # full run / --quick
    False: dict(small=100, large=10_000, repeats=2, memory_steps=8, throughput={"sd15": 300, "sdxl": 120},
                timed_steps=30),
    True: dict(small=20, large=200, repeats=1, memory_steps=3, throughput={"sd15": 16, "sdxl": 8}, timed_steps=2),
}
WARMUP_STEPS = 2  # the first creates the optimiser states
MEMORY_GOAL, STEP_GOAL = 1.1, 1.05
CONTROL_FOLDER = "conditioning_images"
# The real sizes of what the cache stores per picture (controlnext_core.training_cache, nodes/train_data.py):
# the VAE latent, the caption's embedding (77 tokens for a caption of up to 75 tokens; longer ones take
# multiples of 77), SDXL's pooled output, the control at the training resolution.
REAL_SHAPES = {
    "sd15": dict(pixels=512, latent=(4, 64, 64), context=(77, 768), control=(3, 512, 512)),
    "sdxl": dict(pixels=1024, latent=(4, 128, 128), context=(77, 2048), pooled=(1280,), control=(3, 1024, 1024)),
}


# ---------------------------------------------------------------- the data set (no torch needed)

def make_folder(root: str, count: int, seed: int) -> float | None:
    """``count`` pictures (a coloured block on a two-colour gradient), their controls (the block's outline)
    in conditioning_images/ and a caption each: the "folders" layout. Reused when it is already there."""
    import numpy as np
    from PIL import Image

    controls = os.path.join(root, CONTROL_FOLDER)
    if os.path.isdir(controls) and len(os.listdir(controls)) == count:
        return None  # made by an earlier run (--work)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(controls)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    size = RESOLUTION
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    for index in range(count):
        start, end, block = rng.integers(0, 256, (3, 3))
        angle = rng.uniform(0, 2 * math.pi)
        along = (np.cos(angle) * xs + np.sin(angle) * ys + 1.5) / 3.0
        picture = start * (1 - along[..., None]) + end * along[..., None]
        top, left = rng.integers(0, size // 2, 2)
        height, width = rng.integers(size // 4, size // 2, 2)
        picture[top:top + height, left:left + width] = block
        control = np.zeros((size, size, 3), np.uint8)
        control[top:top + height, left:left + width] = 255
        control[top + 1:top + height - 1, left + 1:left + width - 1] = 0
        name = f"{index:05d}"
        Image.fromarray(picture.round().astype(np.uint8)).save(os.path.join(root, name + ".png"))
        Image.fromarray(control).save(os.path.join(controls, name + ".png"))
        with open(os.path.join(root, name + ".txt"), "w", encoding="utf-8") as file:
            file.write(f"a block of colour {block[0]} {block[1]} {block[2]} at {left}, {top} on a gradient")
    return time.perf_counter() - started


def folder_bytes(root: str) -> int:
    """The data set's own files (pictures, controls, captions), not its cache."""
    total = 0
    for folder, names, files in os.walk(root):
        names[:] = [name for name in names if not name.startswith(".")]
        total += sum(os.path.getsize(os.path.join(folder, name)) for name in files)
    return total


# ---------------------------------------------------------------- inside a worker process

class Peaks:
    """Peak resident set per phase: Linux VmHWM, reset through /proc/self/clear_refs at each mark."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self._reset()

    def _reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        self._started = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Ends a phase: its peak, the resident set after it, its wall time."""
        self.phases[phase] = {"peak": run.process_status_bytes("VmHWM:"), "after": run.process_status_bytes("VmRSS:"),
                              "wall_s": time.perf_counter() - self._started}
        self._reset()

    def peak(self) -> int:
        return max(phase["peak"] for phase in self.phases.values())


def _tiny_checkpoint():
    """tests/server_nodes/tiny_checkpoint.py (the test server's Load Checkpoint stand-in), imported alone."""
    path = os.path.join(run.ROOT, "tests", "server_nodes", "tiny_checkpoint.py")
    spec = importlib.util.spec_from_file_location("controlnext_bench_tiny_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pool_vae(tiny):
    """A VAE whose encoding costs nearly nothing: 8x8 average pooling and a fixed 3 -> 4 channel projection
    (its own random TAESD weights, so its cache never passes for the TAESD stand-in's)."""
    import comfy.sd
    import comfy.taesd.taesd
    import torch

    taesd = comfy.taesd.taesd.TAESD()
    tiny.randomise(taesd, seed=20)
    vae = comfy.sd.VAE(sd=taesd.state_dict())
    projection = torch.randn(4, 3, generator=torch.Generator().manual_seed(21)) / 3 ** 0.5

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float() * 2 - 1, 8)
        return torch.einsum("oc,bchw->bohw", projection, pooled)

    vae.encode = encode
    return vae


def models(family: str, encoder: str):
    """MODEL, CLIP and VAE: the tiny checkpoint's (the VAE: TAESD-shaped, or the pooling one)."""
    tiny = _tiny_checkpoint()
    vae = tiny.tiny_vae() if encoder == "taesd" else pool_vae(tiny)
    return tiny.tiny_unet(family), tiny.tiny_clip(family), vae


def load_data(folder: str):
    """Load Training Data's output for ``folder`` (a subfolder of the work folder, set as ComfyUI's input)."""
    import comfy_host

    train_data = comfy_host.pack("nodes.train_data")
    output = train_data.LoadTrainingData.execute(folder, "folders", RESOLUTION, CONTROL_FOLDER, ".txt", "", "none",
                                                 "image", "conditioning_image", "text")
    return output.result[0]


class Timer:
    """Wraps methods of an object and adds their CPU and wall time to one account; ``stamps``: the wall
    clock at the end of each call of the first method (one call per picture)."""

    def __init__(self, owner, names: tuple[str, ...]):
        self.cpu = self.wall = 0.0
        self.stamps: list[float] = []
        for index, name in enumerate(names):
            setattr(owner, name, self._wrap(getattr(owner, name), index == 0))

    def _wrap(self, method, stamp: bool):
        def timed(*args, **kwargs):
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.cpu += time.thread_time() - cpu
                self.wall += time.perf_counter() - wall
                if stamp:
                    self.stamps.append(time.perf_counter())
        return timed


def worker_setup(args):
    import comfy_host

    comfy_host.setup("cpu")
    import folder_paths
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder_paths.set_input_directory(args.work)
    return comfy_host.pack("nodes.train_data"), comfy_host.pack("nodes.train")


def build_worker(args) -> dict:
    """Builds the folder's cache from nothing through nodes/train_data.py's cached_pictures (what Train
    ControlNeXt runs first): time split by encoder, bytes on disk, the cached tensors' shapes."""
    train_data, _ = worker_setup(args)
    import comfy.model_management
    peaks = Peaks()
    model, clip, vae = models(args.family, args.encoder)
    root = os.path.join(args.work, args.folder)
    shutil.rmtree(os.path.join(root, train_data.CACHE_FOLDER), ignore_errors=True)
    peaks.mark("setup")
    data = load_data(args.folder)
    peaks.mark("load")
    vae_time, text_time = Timer(vae, ("encode",)), Timer(clip, ("encode_from_tokens", "tokenize"))
    cpu = time.thread_time()
    pictures, text = train_data.cached_pictures(data, model, vae, clip, args.family, None,
                                                comfy.model_management.get_torch_device())
    build_cpu = time.thread_time() - cpu
    peaks.mark("build")
    assert text.startswith(f"Encoded {len(data.items)} of {len(data.items)} pairs"), text
    cache, count = pictures.cache, len(data.items)
    row = cache.read([pictures.keys[0]])
    tensors = {name: {"shape": list(tensor.shape[1:]), "dtype": str(tensor.dtype).removeprefix("torch."),
                      "bytes": tensor[0].numel() * tensor.element_size()} for name, tensor in row.items()}
    shards = os.listdir(os.path.join(cache.folder, "shards"))
    build_s = peaks.phases["build"]["wall_s"]
    stamps = vae_time.stamps
    ends = [stamps[round(count * k / 10) - 1] for k in range(1, 11)] if count >= 10 else []  # of each tenth
    return {
        "family": args.family, "encoder": args.encoder, "pictures": count, "resolution": RESOLUTION,
        "load_s": peaks.phases["load"]["wall_s"], "build_s": build_s, "build_cpu_s": build_cpu,
        "pictures_per_s": count / build_s,
        "per_picture_ms": {"vae": 1e3 * vae_time.wall / count, "text": 1e3 * text_time.wall / count,
                           "rest": 1e3 * (build_s - vae_time.wall - text_time.wall) / count},
        "tenths_pictures_per_s": [count / 10 / (end - start) for start, end in zip(ends, ends[1:])],  # 2nd to 10th
        "cache_bytes": cache.size_bytes(), "bytes_per_picture": cache.size_bytes() / count,
        "tensor_bytes_per_picture": sum(t["bytes"] for t in tensors.values()), "tensors": tensors,
        "shards": len(shards), "folder_bytes_per_picture": folder_bytes(root) / count,
        "memory": {"phases": peaks.phases, "peak": peaks.peak()},
    }


def training_arguments(args) -> dict:
    """Train ControlNeXt's settings: the official recipe (encoder + UNet subset), batch 4, no gradient
    checkpointing (a lighter step: the stricter comparison), the model's precision."""
    return dict(steps=args.steps, batch_size=BATCH, encoder_lr=1e-4, unet_lr=1e-5, train_unet="official subset",
                optimizer="official", warmup_steps=0, control_scale=0.0, proportion_empty_prompts=0.0, seed=0,
                gradient_checkpointing=False, precision="auto")


def in_memory_inputs(cache, keys: list[str]) -> tuple[dict, list, "object"]:
    """Train ControlNeXt's in-memory inputs holding exactly the cached tensors: LATENT, CONDITIONING (one per
    picture, each picture's caption) and the controls as an IMAGE."""
    rows = cache.read(keys)
    latents = {"samples": rows["latent"]}
    images = rows["control"].float().div(255.0).movedim(1, -1).contiguous()
    positive = [[rows["context"][i:i + 1], {"pooled_output": rows["pooled"][i:i + 1]} if "pooled" in rows else {}]
                for i in range(len(keys))]
    return latents, positive, images


def train_worker(args) -> dict:
    """Trains ``args.steps`` steps through the Train ControlNeXt node from the folder's cache (built before),
    or, with ``--in-memory``, from LATENT / IMAGE / CONDITIONING inputs holding the same tensors. Peak
    resident set per phase."""
    train_data, train_nodes = worker_setup(args)
    import comfy.model_management
    import torch

    peaks = Peaks()
    model, clip, vae = models(args.family, args.encoder)
    peaks.mark("setup")
    data = load_data(args.folder)
    peaks.mark("load")
    arguments = training_arguments(args)
    if args.in_memory:
        pictures, text = train_data.cached_pictures(data, model, vae, clip, args.family, None,
                                                    comfy.model_management.get_torch_device())
        latents, positive, images = in_memory_inputs(pictures.cache, pictures.keys)
        del pictures, data
        peaks.mark("inputs")
        input_bytes = sum(t.numel() * t.element_size() for t in (latents["samples"], images))
        input_bytes += sum(entry[0].numel() * entry[0].element_size() for entry in positive)
        with torch.inference_mode():  # as ComfyUI runs its nodes
            output = train_nodes.TrainControlNeXt.execute(model=model, latents=latents, positive=positive,
                                                          control_images=images, **arguments)
        peaks.mark("train")
    else:
        cached_pictures, notes = train_nodes.cached_pictures, []

        def checked(*given, **named):  # the node's cache check, as its own phase
            result = cached_pictures(*given, **named)
            notes.append(result[1])
            peaks.mark("cache check")
            return result

        train_nodes.cached_pictures = checked
        with torch.inference_mode():
            output = train_nodes.TrainControlNeXt.execute(model=model, data=data, vae=vae, clip=clip, **arguments)
        peaks.mark("train")
        text, input_bytes = notes[0], 0
        assert text.startswith(f"All {len(data.items)} pairs were in the cache"), text
    losses = output.result[2]["loss"]
    assert len(losses) == args.steps and all(math.isfinite(loss) for loss in losses), losses
    return {"pictures": args.count, "in_memory": args.in_memory, "steps": args.steps, "batch": BATCH,
            "note": text, "input_bytes": input_bytes, "phases": peaks.phases, "peak": peaks.peak()}


class Alternating:
    """The ``pictures`` of nodes/train.py's ``train``: each step's batch from the next source in turn
    (A B A B ...), with the time each ``batch`` call takes and the clock when it starts (a step starts with
    its batch: from one start to the next is one whole step of the loop)."""

    def __init__(self, sources: list):
        self.sources = sources
        self.count = sources[0].count
        assert all(source.count == self.count for source in sources)
        self.digest = "benchmark"
        self.calls: list[dict] = []

    def batch(self, indices, empty, empties):
        cpu, wall = time.thread_time(), time.perf_counter()
        source = len(self.calls) % len(self.sources)
        batch = self.sources[source].batch(indices, empty, empties)
        self.calls.append({"source": source, "start_cpu": cpu, "start_wall": wall,
                           "fetch_cpu": time.thread_time() - cpu, "fetch_wall": time.perf_counter() - wall})
        return batch


def steps_worker(args) -> dict:
    """Train ControlNeXt's loop (nodes/train.py ``train``, as the node calls it) with its batches taken
    alternately from the in-memory inputs and from the cache, the same tensors in both."""
    train_data, train_nodes = worker_setup(args)
    import comfy.model_management
    import torch

    train = comfy_host_pack("controlnext_core.train")
    model, clip, vae = models(args.family, args.encoder)
    device = comfy.model_management.get_torch_device()
    data = load_data(args.folder)
    cached, text = train_data.cached_pictures(data, model, vae, clip, args.family, None, device)
    assert text.startswith(f"All {len(data.items)} pairs were in the cache"), text
    latents, positive, images = in_memory_inputs(cached.cache, cached.keys)
    with torch.inference_mode(False):
        memory = train_data.InMemoryPictures(model, args.family, latents["samples"],
                                             comfy_host_pack("nodes.patch").control_image_from_comfy(images),
                                             positive, device)
    generator = torch.Generator().manual_seed(1)
    identical = True
    for _ in range(3):  # both sources give the same batch for the same pictures
        indices = torch.randint(0, cached.count, (BATCH,), generator=generator).tolist()
        a, b = memory.batch(indices, None, [False] * BATCH), cached.batch(indices, None, [False] * BATCH)
        identical &= (torch.equal(a.latents, b.latents) and torch.equal(a.controls, b.controls)
                      and all(torch.equal(x, y) for x, y in zip(a.conditioning, b.conditioning) if x is not None))
    assert identical, "the cache and the in-memory inputs give different batches"
    reads = read_probe(cached.cache, cached.keys[:BATCH])
    sources = {"memory": memory, "cache": cached}
    order = list(sources)
    alternating = Alternating([sources[name] for name in order])
    steps = WARMUP_STEPS + 2 * args.timed_steps + 1  # the last step only closes the one before it
    prediction, alphas_cumprod = train_nodes.training_objective(model)
    settings = train.TrainingSettings(family=args.family, steps=steps, batch_size=BATCH, train_unet=True,
                                      control_scale=1.0, prediction=prediction, seed=0).resolved()
    with torch.inference_mode(False):
        encoder = train.new_encoder(settings.seed)
    run_output = train_nodes.train(model, args.family, alternating, None, settings, encoder, False,
                                   train_nodes._autocast_dtype("auto", model), alphas_cumprod, None)
    assert run_output.trainer.steps_done == steps, run_output.message
    calls = alternating.calls
    records = {name: [] for name in order}
    for call, following in zip(calls[WARMUP_STEPS:], calls[WARMUP_STEPS + 1:]):
        records[order[call["source"]]].append({
            "cpu": following["start_cpu"] - call["start_cpu"], "wall": following["start_wall"] - call["start_wall"],
            "fetch_cpu": call["fetch_cpu"], "fetch_wall": call["fetch_wall"]})
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
               for name, rows in records.items()}
    return {"family": args.family, "encoder": args.encoder, "pictures": cached.count, "batch": BATCH,
            "resolution": RESOLUTION, "steps": steps, "warmup": WARMUP_STEPS, "order": order,
            "batches_identical": identical, "recipe": {"optimizer": settings.optimizer, "train_unet": True,
                                                       "gradient_checkpointing": False},
            "records": records, "median": medians,
            "ratio": {"cpu": medians["cache"]["cpu"] / medians["memory"]["cpu"],
                      "wall": medians["cache"]["wall"] / medians["memory"]["wall"],
                      # the steps differ only in their batch reads: their difference over the in-memory step
                      "in_call": 1 + (medians["cache"]["fetch_cpu"] - medians["memory"]["fetch_cpu"])
                      / medians["memory"]["cpu"]},
            "reads": reads,
            "params": {"unet": sum(p.numel() for p in model.model.diffusion_model.parameters())}}


def read_probe(cache, keys: list[str], repeats: int = 50) -> dict:
    """What reading a batch from the cache costs: its rows one call each (as CachedPictures.batch reads
    them) or in one call, median CPU ms; ``keys``: rows written one after the other (one shard)."""
    def timed(read) -> float:
        times = []
        for _ in range(repeats):
            cpu = time.thread_time()
            read()
            times.append(time.thread_time() - cpu)
        return 1e3 * statistics.median(times)

    row = cache.read(keys[:1])
    return {"rows": len(keys), "row_bytes": sum(t.numel() * t.element_size() for t in row.values()),
            "row_by_row_ms": timed(lambda: [cache.read([key]) for key in keys]),
            "one_call_ms": timed(lambda: cache.read(keys))}


def comfy_host_pack(module: str):
    import comfy_host

    return comfy_host.pack(module)


# ---------------------------------------------------------------- the run

def computed_sizes(builds: dict, overhead: float) -> dict:
    """Bytes per picture at the real sizes, from the dtypes the cache stores (those of the tiny run:
    ComfyUI returns latents and text embeddings in fp32, the control is uint8) and the shapes of the real
    models; ``overhead``: the measured bytes per picture beyond its tensors (shard headers, index entry)."""
    sizes = {}
    for family, shapes in REAL_SHAPES.items():
        tensors = builds[family]["tensors"]
        parts = {name: math.prod(shape) * _dtype_bytes(tensors[name]["dtype"])
                 for name, shape in shapes.items() if name != "pixels"}
        total = sum(parts.values()) + overhead
        sizes[family] = {"pixels": shapes["pixels"], "parts": parts, "bytes_per_picture": total,
                         "dtypes": {name: tensors[name]["dtype"] for name in parts},
                         "in_memory_image_bytes": 3 * shapes["pixels"] ** 2 * 4}
    return sizes


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}[dtype]


def summarise(summary: dict) -> None:
    memory = summary["memory"]
    small, large = memory["small"], memory["large"]
    memory["peak_small"] = max(r["peak"] for r in small)
    memory["peak_large"] = max(r["peak"] for r in large)
    memory["ratio"] = memory["peak_large"] / memory["peak_small"]
    memory["extra_bytes"] = memory["peak_large"] - memory["peak_small"]
    memory["extra_bytes_per_picture"] = memory["extra_bytes"] / (large[0]["pictures"] - small[0]["pictures"])
    builds = memory["builds"]
    memory["build_ratio"] = builds["large"]["memory"]["peak"] / builds["small"]["memory"]["peak"]
    throughput = summary["throughput"]
    overhead = statistics.median(b["bytes_per_picture"] - b["tensor_bytes_per_picture"] for b in throughput.values())
    summary["computed"] = {"overhead_bytes_per_picture": overhead, "families": computed_sizes(throughput, overhead)}
    summary["targets"] = [
        {"target": f"peak memory, {large[0]['pictures']:,} pictures ÷ {small[0]['pictures']:,}",
         "value": memory["ratio"], "limit": MEMORY_GOAL},
        *[{"target": f"{NAMES[family]}: step time from the cache ÷ in memory", "value": steps["ratio"]["cpu"],
           "in_call": steps["ratio"]["in_call"], "limit": STEP_GOAL} for family, steps in summary["steps"].items()],
    ]
    for row in summary["targets"]:
        row["met"] = row["value"] <= row["limit"]
        if "in_call" in row:
            row["met_in_call"] = row["in_call"] <= row["limit"]


def _mib(value: float) -> str:
    return f"{value / 2 ** 20:,.1f} MiB"


def _size(value: float) -> str:
    if value >= 2 ** 20:
        return f"{value / 2 ** 20:,.2f} MiB"
    return f"{value / 1024:,.1f} KiB"


def markdown(summary: dict) -> str:
    machine, memory = summary["machine"], summary["memory"]
    quick = " (quick smoke run)" if summary["quick"] else ""
    lines = [
        f"Measured {summary['date'][:10]} on {machine.get('cpu', '?')} ({machine.get('cpu_cores', '?')} cores, "
        f"{machine.get('ram_gib', '?')} GiB RAM), torch {machine['torch']}, ComfyUI "
        f"{summary['comfyui'].get('version') or '?'}{quick}; load average {summary['load_average_start']} → "
        f"{summary['load_average_end']}. Tiny random-weight stand-ins (the test server's tiny checkpoint), "
        f"{RESOLUTION}×{RESOLUTION} pictures, batch {BATCH}, one torch thread per process.",
        "",
        f"Memory: peak resident set of a fresh process training {memory['small'][0]['steps']} steps through Train "
        f"ControlNeXt from a folder's cache (SD1.5 stand-in; runs alternated, the highest of "
        f"{len(memory['small'])} each):",
        "",
        "| data | pictures | peak RSS | ÷ first row | load the folder | cache check | training | after setup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("cache", memory["small"]), ("cache", memory["large"])]
    if memory.get("in_memory"):
        rows.append(("in memory", [memory["in_memory"]]))
    for kind, runs in rows:
        best = max(runs, key=lambda r: r["peak"])
        phases = best["phases"]

        def phase(name: str) -> str:
            if name not in phases:
                return "–"
            return f"{_mib(phases[name]['peak'])}, {phases[name]['wall_s']:.1f} s"

        check = phase("cache check") if kind == "cache" else f"inputs: {phase('inputs')}"
        lines.append(f"| {kind} | {best['pictures']:,} | {_mib(best['peak'])} | "
                     f"{best['peak'] / memory['peak_small']:.3f} | {phase('load')} | {check} | {phase('train')} | "
                     f"{_mib(phases['setup']['after'])} |")
    builds = memory["builds"]
    lines += ["", f"Peak of the {builds['small']['pictures']:,}- and {builds['large']['pictures']:,}-picture "
              f"cache builds: {_mib(builds['small']['memory']['peak'])} and "
              f"{_mib(builds['large']['memory']['peak'])} ({memory['build_ratio']:.3f}×).", ""]
    lines += ["Step time: Train ControlNeXt's loop, batches alternately from in-memory inputs and from the cache "
              "(the same tensors), median CPU time per step after a warm-up (wall in brackets); in-call: the "
              "steps' difference in their batch reads over the in-memory step:", "",
              "| model | pictures | in memory | from the cache | ratio | in-call | batch read: in memory "
              "| from the cache | 4 rows row by row / in one call |", "|---|---|---|---|---|---|---|---|---|"]
    for family, steps in summary["steps"].items():
        m, c = steps["median"]["memory"], steps["median"]["cache"]
        lines.append(f"| {NAMES[family]} | {steps['pictures']:,} | {1e3 * m['cpu']:.1f} ms ({1e3 * m['wall']:.1f}) "
                     f"| {1e3 * c['cpu']:.1f} ms ({1e3 * c['wall']:.1f}) | {steps['ratio']['cpu']:.3f} "
                     f"({steps['ratio']['wall']:.3f}) | {steps['ratio']['in_call']:.3f} "
                     f"| {1e3 * m['fetch_cpu']:.2f} ms | {1e3 * c['fetch_cpu']:.2f} ms "
                     f"| {steps['reads']['row_by_row_ms']:.2f} / {steps['reads']['one_call_ms']:.2f} ms |")
    lines += ["", f"Cache building ({RESOLUTION}² pictures; wall time, one thread):", "",
              "| model (stand-in) | VAE | pictures | pictures/s | ms per picture: VAE / text / rest "
              "| on disk per picture | of which tensors | the folder's files per picture |",
              "|---|---|---|---|---|---|---|---|"]
    entries = [(NAMES[f], b) for f, b in summary["throughput"].items()] + [("SD1.5", builds["large"])]
    for name, build in entries:
        ms = build["per_picture_ms"]
        vae = "TAESD-shaped" if build["encoder"] == "taesd" else "8×8 pooling"
        lines.append(f"| {name} | {vae} | {build['pictures']:,} | {build['pictures_per_s']:,.1f} | {ms['vae']:.1f} / "
                     f"{ms['text']:.1f} / {ms['rest']:.1f} | {_size(build['bytes_per_picture'])} | "
                     f"{_size(build['tensor_bytes_per_picture'])} | {_size(build['folder_bytes_per_picture'])} |")
    tenths = builds["large"]["tenths_pictures_per_s"]
    if tenths:
        made = summary["make_s"]["large"]
        lines += ["", f"Building the {builds['large']['pictures']:,}-picture cache, pictures/s in its second tenth and "
                  f"its last: {tenths[0]:,.1f} and {tenths[-1]:,.1f} (slowest tenth {min(tenths):,.1f}); the "
                  f"folder itself " + (f"took {made:.0f} s to write" if made is not None else "came from an earlier "
                                       "run") + f", Load Training Data {builds['large']['load_s']:.1f} s to read."]
    computed = summary["computed"]
    lines += ["", f"Computed (not measured) bytes per picture at the real sizes, in the dtypes the cache stores, "
              f"plus the {computed['overhead_bytes_per_picture']:.0f} bytes per picture of shard header and index "
              f"measured above:", "",
              "| model | size | latent | text embedding | pooled | control | per picture | 1,000 pictures "
              "| one IMAGE in memory |", "|---|---|---|---|---|---|---|---|---|"]
    for family, size in computed["families"].items():
        parts, dtypes = size["parts"], size["dtypes"]

        def part(name: str) -> str:
            if name not in parts:
                return "–"
            shape = "×".join(str(n) for n in REAL_SHAPES[family][name])
            return f"{shape} {dtypes[name]}: {_size(parts[name])}"

        lines.append(f"| {NAMES[family]} | {size['pixels']}² | {part('latent')} | {part('context')} | "
                     f"{part('pooled')} | {part('control')} | {_size(size['bytes_per_picture'])} | "
                     f"{size['bytes_per_picture'] * 1000 / 2 ** 30:.2f} GiB | "
                     f"{_size(size['in_memory_image_bytes'])} |")
    lines += ["", "| target | value (in-call) | limit | met (in-call) |", "|---|---|---|---|"]
    for row in summary["targets"]:
        value, met = f"{row['value']:.3f}", "yes" if row["met"] else "no"
        if "in_call" in row:
            value += f" ({row['in_call']:.3f})"
            met += f" ({'yes' if row['met_in_call'] else 'no'})"
        lines.append(f"| {row['target']} | {value} | {row['limit']:.2f} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 / 200 pictures, a few steps: a smoke run")
    parser.add_argument("--work", help="folder for the data sets and their caches (default: a new temporary "
                                       "folder, removed at the end; a given one is kept and its data sets reused)")
    parser.add_argument("--results", default=run.RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--worker", choices=("build", "train", "steps"), help=argparse.SUPPRESS)
    for name in ("--folder", "--family", "--encoder", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--count", "--steps", "--timed-steps"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = {"build": build_worker, "train": train_worker, "steps": steps_worker}[args.worker](args)
        with open(args.out, "w") as out:
            json.dump(result, out, indent=1)
        return
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        raise SystemExit("Set COMFYUI_PATH to a ComfyUI checkout and run this with that ComfyUI's python.")
    settings = SETTINGS[args.quick]
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="controlnext_train_data_")
    os.makedirs(work, exist_ok=True)
    started = time.perf_counter()
    summary = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
               "command": " ".join([os.path.basename(sys.executable), "benchmarks/train_data.py", *sys.argv[1:]]),
               "machine": run.machine(), "load_average_start": run.load_average(),
               "comfyui": {"version": run.comfyui_version(comfy_path), "commit": run.git_commit(comfy_path)},
               "pack_commit": run.git_commit(run.ROOT), "resolution": RESOLUTION, "batch": BATCH,
               "settings": {k: v for k, v in settings.items()}}
    try:
        folders = {"small": (f"pairs_{settings['small']}", settings["small"]),
                   "large": (f"pairs_{settings['large']}", settings["large"]),
                   **{family: (f"{family}_{count}", count) for family, count in settings["throughput"].items()}}
        summary["make_s"] = {}
        for index, (key, (folder, count)) in enumerate(folders.items()):
            print(f"[{time.strftime('%H:%M:%S')}] making {count:,} pictures in {folder} ...", flush=True)
            summary["make_s"][key] = make_folder(os.path.join(work, folder), count, seed=index)

        def worker(kind: str, folder: str, family: str, encoder: str, label: str, *extra: str) -> dict:
            return run.run_worker("train_data.py", ["--worker", kind, "--work", work, "--folder", folder,
                                                    "--family", family, "--encoder", encoder, *extra], label)

        builds = {size: worker("build", folders[size][0], "sd15", "pool", f"cache of {folders[size][1]:,} "
                               "pictures (SD1.5, pooling VAE)") for size in ("small", "large")}
        summary["throughput"] = {family: worker("build", folders[family][0], family, "taesd",
                                                f"cache of {folders[family][1]:,} pictures ({NAMES[family]}, "
                                                "TAESD-shaped VAE)") for family in FAMILIES}
        memory = {"builds": builds, "small": [], "large": []}
        for repeat in range(settings["repeats"]):
            for size in ("small", "large"):
                folder, count = folders[size]
                memory[size].append(worker("train", folder, "sd15", "pool", f"training from the cache of {count:,} "
                                           f"pictures ({repeat + 1}/{settings['repeats']})", "--count", str(count),
                                           "--steps", str(settings["memory_steps"])))
        folder, count = folders["large"]
        memory["in_memory"] = worker("train", folder, "sd15", "pool", f"training from {count:,} pictures in memory",
                                     "--count", str(count), "--steps", str(settings["memory_steps"]), "--in-memory")
        summary["memory"] = memory
        step_folders = {"sd15": ("large", "pool"), "sdxl": ("sdxl", "taesd")}
        summary["steps"] = {family: worker("steps", folders[key][0], family, encoder,
                                           f"step time {NAMES[family]}, cache against memory ({folders[key][1]:,} "
                                           "pictures)", "--timed-steps", str(settings["timed_steps"]))
                            for family, (key, encoder) in step_folders.items()}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary["load_average_end"] = run.load_average()
    summary["wall_s"] = time.perf_counter() - started
    summarise(summary)
    table = markdown(summary)
    print()
    print(table)
    run.write_results(args.results, "train_data", summary, table)
    print(f"in {summary['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
