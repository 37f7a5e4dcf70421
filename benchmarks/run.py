"""ControlNeXt vs ComfyUI's ControlNet, side by side: the whole benchmark in one command.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/run.py [--quick] [--device cuda]

Runs, each in its own process (one model family in memory at a time):
- denoiser.py for SD1.5, SDXL and SVD: per-step time of the bare UNet, + ControlNeXt (this pack's
  patch), + ComfyUI's own ControlNet (SD1.5/SDXL), + ControlNeXt refreshing every k steps;
  parameter counts, FLOP floors (torch's counter) and the extra peak memory of each;
- refresh.py: how far the refresh-every-k mode moves a result from the exact mode (tiny models);
- preprocess_throughput.py: canny batched vs a cv2 loop, DWPose and depth per frame.
Prints the tables and the targets (README, "Benchmarks"), writes benchmarks/results/benchmark.json, .md
and .png. ``--quick`` runs everything on the tests' shallow models at 64x64 (a smoke run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)
import report  # noqa: E402

FAMILIES = ("sd15", "sdxl", "svd")


def run_worker(script: str, arguments: list[str], label: str) -> dict:
    out = os.path.join(tempfile.mkdtemp(prefix="controlnext_bench_"), "result.json")
    command = [sys.executable, os.path.join(HERE, script), *arguments, "--out", out]
    started = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    process = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if process.returncode != 0:
        print(process.stdout[-6000:], file=sys.stderr)
        raise SystemExit(f"{label} failed (exit {process.returncode}): {' '.join(command)}")
    with open(out) as file:
        result = json.load(file)
    print(f"[{time.strftime('%H:%M:%S')}] {label}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return result


def git_commit(path: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def comfyui_version(path: str) -> str | None:
    try:
        with open(os.path.join(path, "comfyui_version.py")) as file:
            for line in file:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        return None
    return None


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as file:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
        with open("/proc/meminfo") as file:
            info["ram_gib"] = round(int(file.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, StopIteration):
        pass
    return info


def process_status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS:, VmHWM:...) in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_results(folder: str, name: str, summary: dict, table: str) -> None:
    """``<folder>/<name>.json`` (every figure) and ``.md`` (the table), and where they went."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as file:
        json.dump(summary, file, indent=1)
    with open(os.path.join(folder, f"{name}.md"), "w") as file:
        file.write(table)
    print(f"wrote {os.path.relpath(folder, ROOT)}/{name}.json and {name}.md", flush=True)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shallow test models at 64x64, one round: a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: sd15,sdxl,svd")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds per variant (default 5; quick 1)")
    parser.add_argument("--refresh", type=int, default=None, help="k of the refresh variant (default 3; quick 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default on the CPU: 1, the stable choice on a shared machine)")
    parser.add_argument("--no-preprocessors", action="store_true")
    parser.add_argument("--results", default=RESULTS, help="output folder (default benchmarks/results)")
    args = parser.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        raise SystemExit("Set COMFYUI_PATH to a ComfyUI checkout and run this with that ComfyUI's python.")
    runs = args.runs or (1 if args.quick else 5)
    refresh = args.refresh if args.refresh is not None else (2 if args.quick else 3)
    quick = ["--quick"] if args.quick else []
    threads = ["--threads", str(args.threads)] if args.threads else []

    started = time.perf_counter()
    summary = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
               "command": " ".join([os.path.basename(sys.executable), "benchmarks/run.py", *sys.argv[1:]]),
               "machine": machine(), "load_average_start": load_average(),
               "comfyui": {"version": comfyui_version(comfy_path), "commit": git_commit(comfy_path)},
               "pack_commit": git_commit(ROOT), "runs": runs, "refresh_k": refresh, "families": {}}
    for family in args.families.split(","):
        summary["families"][family] = run_worker(
            "denoiser.py", ["--family", family, "--device", args.device, "--runs", str(runs),
                            "--refresh", str(refresh), *threads, *quick], f"denoiser {family}")
    summary["refresh_accuracy"] = run_worker("refresh.py", quick, "refresh-every-k accuracy (tiny models)")
    if not args.no_preprocessors:
        summary["preprocessors"] = run_worker("preprocess_throughput.py", [*threads, *quick], "preprocessors")
    summary["load_average_end"] = load_average()
    summary["wall_s"] = time.perf_counter() - started
    summary["targets"] = report.targets(summary)

    os.makedirs(args.results, exist_ok=True)
    markdown = report.markdown(summary)
    print()
    print(markdown)
    with open(os.path.join(args.results, "benchmark.json"), "w") as file:
        json.dump(summary, file, indent=1)
    with open(os.path.join(args.results, "benchmark.md"), "w") as file:
        file.write(markdown)
    chart = report.chart(summary, os.path.join(args.results, "benchmark.png"))
    print(f"wrote {os.path.relpath(args.results, ROOT)}/benchmark.json, benchmark.md and {chart} "
          f"in {summary['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
