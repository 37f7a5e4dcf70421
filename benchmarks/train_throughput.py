"""Training throughput of the headless command (python -m controlnext_train) on GPUs: time per step,
pictures per second and peak memory per GPU for 1 and N processes under torchrun, real-size SD1.5 at
512² and SDXL at 1024², random weights, bf16.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/train_throughput.py [--processes 1,2,4]

For each family: a random checkpoint of the released size (controlnext_testbed.checkpoint_files) and
a folder of random pairs at the training size, written once into --work; then the command, unchanged,
for --steps steps with each process count (the counts above the GPUs present are left out), batch
--batch per process, the family's official recipe, gradient checkpointing. The figure is the median
step time after --warmup steps, from the first process's --report_json (the cache build and model
loading are not in it); scaling efficiency is N-process pictures per second over N x 1-process.
The official scripts' step is not run: their code and diffusers are not part of this pack.
``--quick``: the tiny SD1.5 checkpoint at 64², on the CPU with 1 and 2 processes (the tests' smoke
run). Writes benchmarks/results/train_throughput.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import run  # noqa: E402

NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
RESOLUTIONS = {"sd15": 512, "sdxl": 1024}
PAIRS = 16


def write_pairs(folder: str, count: int, size: int) -> None:
    """Random pictures with captions and random edge-like controls (the folders layout)."""
    os.makedirs(os.path.join(folder, "conditioning_images"), exist_ok=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        picture = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
        control = (generator.random((size, size, 3)) > 0.9).astype(np.uint8) * 255
        Image.fromarray(picture).save(os.path.join(folder, f"{index:03d}.png"))
        Image.fromarray(control).save(os.path.join(folder, "conditioning_images", f"{index:03d}.png"))
        with open(os.path.join(folder, f"{index:03d}.txt"), "w") as file:
            file.write(f"a random picture, number {index}")


def prepare(work: str, family: str, real: bool, resolution: int) -> tuple[str, str]:
    """(checkpoint, data folder), written the first time."""
    checkpoint = os.path.join(work, f"{family}-{'real' if real else 'tiny'}.safetensors")
    if not os.path.exists(checkpoint):
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from controlnext_testbed import comfy_library; "
                "comfy_library.use_comfyui(None, cpu=True); from controlnext_testbed.checkpoint_files import "
                "write_checkpoint; write_checkpoint(sys.argv[2], sys.argv[3], sys.argv[4] == 'real')")
        partial = checkpoint.replace(".safetensors", ".partial.safetensors")  # ComfyUI reads files by their suffix
        subprocess.run([sys.executable, "-c", code, ROOT, partial, family, "real" if real else "tiny"], check=True)
        os.replace(partial, checkpoint)
    data = os.path.join(work, f"pairs-{resolution}")
    if not os.path.isdir(data):
        write_pairs(data + ".partial", PAIRS, resolution)
        os.replace(data + ".partial", data)
    return checkpoint, data


def train(checkpoint: str, data: str, resolution: int, processes: int, args, label: str) -> dict:
    """One run of the command; its first process's step times and every process's peak memory."""
    out = os.path.join(args.work, f"run-{label}-{processes}")
    report = os.path.join(args.work, f"report-{label}-{processes}")
    subprocess.run(["rm", "-rf", out], check=True)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, "-m", "controlnext_train", "--pretrained_model_name_or_path", checkpoint,
               "--train_data_dir", data, "--resolution", str(resolution), "--output_dir", out, "--max_train_steps",
               str(args.steps), "--train_batch_size", str(args.batch), "--checkpointing_steps", "0",
               "--mixed_precision", "bf16", "--gradient_checkpointing", "--report_json", report]
    if args.quick:
        command.append("--cpu")
    started = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {label}, {processes} process(es) ...", flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if result.returncode != 0:
        print(result.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"{label} on {processes} process(es) failed (exit {result.returncode}): {' '.join(command)}")
    reports = []
    for rank in range(processes):
        with open(f"{report}.{rank}.json") as file:
            reports.append(json.load(file))
    ends = reports[0]["step_ends"]
    steps = [later - earlier for earlier, later in zip(ends[args.warmup:], ends[args.warmup + 1:])]
    median = statistics.median(steps)
    peaks = [entry["peak_gpu_bytes"] for entry in reports if entry["peak_gpu_bytes"] is not None]
    print(f"[{time.strftime('%H:%M:%S')}] done in {time.perf_counter() - started:.0f} s: {median:.3f} s a step",
          flush=True)
    return {"processes": processes, "batch_per_process": args.batch, "global_batch": args.batch * processes,
            "step_s": steps, "median_step_s": median, "pictures_per_s": args.batch * processes / median,
            "peak_gpu_bytes_per_process": max(peaks) if peaks else None,
            "peak_rss_bytes_per_process": max(entry["peak_rss_bytes"] for entry in reports),
            "device": reports[0]["device"]}


def markdown(summary: dict) -> str:
    lines = ["| model | size | processes | global batch | s / step | pictures / s | scaling efficiency | "
             "peak GPU memory per process |", "|---|---|---|---|---|---|---|---|"]
    for family, runs in summary["families"].items():
        one = runs[0]
        for entry in runs:
            efficiency = entry["pictures_per_s"] / (entry["processes"] * one["pictures_per_s"])
            memory = (f"{entry['peak_gpu_bytes_per_process'] / 2 ** 30:.1f} GiB"
                      if entry["peak_gpu_bytes_per_process"] else "(CPU)")
            lines.append(f"| {NAMES[family]} | {summary['resolutions'][family]}² | {entry['processes']} | "
                         f"{entry['global_batch']} | {entry['median_step_s']:.3f} | {entry['pictures_per_s']:.2f} | "
                         f"{efficiency:.2f} | {memory} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny SD1.5 at 64² on the CPU, 1 and 2 processes")
    parser.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15,sdxl")
    parser.add_argument("--processes", default=None,
                        help="comma-separated process counts (default: 1 and every GPU present; quick: 1,2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 20; quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the median (default 3; quick 1)")
    parser.add_argument("--batch", type=int, default=1, help="pictures per process per step (default 1)")
    parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "controlnext-throughput"),
                        help="where the checkpoints, pairs and runs are written (default %(default)s)")
    parser.add_argument("--results", default=run.RESULTS, help="output folder (default benchmarks/results)")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.steps < args.warmup + 2:
        raise SystemExit("--steps must leave at least two steps after --warmup")
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        raise SystemExit("Set COMFYUI_PATH to a ComfyUI checkout and run this with its python.")
    import torch

    gpus = 0 if args.quick else torch.cuda.device_count()
    if not args.quick and gpus == 0:
        raise SystemExit("No GPU: this benchmark measures GPUs (--quick runs the CPU smoke run).")
    counts = ([int(count) for count in args.processes.split(",")] if args.processes
              else [1, 2] if args.quick else sorted({1, gpus}))
    counts = [count for count in counts if args.quick or count <= gpus]
    os.makedirs(args.work, exist_ok=True)
    families = ["sd15"] if args.quick else args.families.split(",")
    resolutions = {family: 64 if args.quick else RESOLUTIONS[family] for family in families}
    started = time.perf_counter()
    summary = {"date": datetime.date.today().isoformat(), "quick": args.quick, "resolutions": resolutions,
               "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
               "comfyui": run.comfyui_version(comfyui), "commit": run.git_commit(ROOT), "families": {}}
    for family in families:
        checkpoint, data = prepare(args.work, family, not args.quick, resolutions[family])
        summary["families"][family] = [train(checkpoint, data, resolutions[family], count, args, family)
                                       for count in counts]
    summary["seconds"] = time.perf_counter() - started
    table = markdown(summary)
    device = summary["families"][families[0]][0]["device"]
    print(f"\nTraining throughput, {device}, {summary['seconds'] / 60:.1f} min:\n\n{table}")
    run.write_results(args.results, "train_throughput", summary,
                      f"Training throughput, {device}, {summary['date']}:\n\n{table}")


if __name__ == "__main__":
    main()
