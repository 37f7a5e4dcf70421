"""Throughput of the batch command with 1, 2, 3... ComfyUI servers, and the client's own cost per job.

    COMFYUI_PATH=~/ComfyUI ~/comfy-venv/bin/python benchmarks/queue_batch.py [--jobs 30] [--steps 1] [--servers 3]

Starts the servers as the host tests do (tests/server.py: headless, a temporary base directory
each, one torch thread each) with the tests' tiny workflow (tests/fixtures/tiny_batch_workflow.json:
the tiny SDXL test model, Apply ControlNeXt with a random encoder, one 64x64 step; ``--steps``
makes each job longer), or uses servers already running with those nodes and files (``--server``,
as tests/test_host_queue_batch.py does). Every server runs the workflow once to warm up; then the same seed sweep of ``--jobs`` jobs
runs with the batch command as a user runs it, on the first 1, 2, ... servers. Per run:
- jobs per minute: jobs / the command's wall-clock time;
- the client's CPU time per job: the command's user + system time / jobs;
- the time outside the run per job: each job's time in the manifest (upload to download) minus
  the server's own run of it (its history: execution_start to execution_success), median over
  the jobs: the client's exchanges with the server, and the server's pauses between prompts
  (ComfyUI collects garbage at most every 10 s after a prompt, and its messages wait meanwhile).
On a machine with fewer free cores than servers the servers share the cores: read the scaling
with the load average printed beside it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
WORKFLOW = os.path.join(TESTS, "fixtures", "tiny_batch_workflow.json")
ENCODER_LAYOUT = "base"  # the encoder file the workflow names: the SDXL releases' layout


def start_servers(count: int, folder: str) -> list:
    """``count`` test servers, started side by side (each spends seconds importing nodes)."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)  # the tests' server harness and nodes
        sys.path.append(ROOT)  # controlnext_testbed
    import safetensors.torch

    from controlnext_testbed.official_layouts import random_encoder_state_dict
    from server import ComfyServer, make_base_directory

    with open(WORKFLOW, encoding="utf-8") as file:
        encoder = next(node["inputs"]["controlnext_name"] for node in json.load(file).values()
                       if node["class_type"] == "ControlNeXtLoader")
    servers = []
    for index in range(count):
        base = make_base_directory(os.path.join(folder, f"server{index}"))
        safetensors.torch.save_file(random_encoder_state_dict(ENCODER_LAYOUT),
                                    os.path.join(base, "models", "controlnext", encoder))
        servers.append(ComfyServer(base))
    try:
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda server: server.start(timeout=180), servers))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def write_inputs(folder: str, jobs: int, first_seed: int, steps: int) -> str:
    """A control image and a jobs file: a sweep of ``jobs`` seeds from ``first_seed``."""
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 90)).save(os.path.join(folder, "control.png"))
    path = os.path.join(folder, f"jobs{first_seed}.csv")
    with open(path, "w", encoding="utf-8") as file:
        file.write("name,Control,KSampler.seed,KSampler.steps\n")
        file.writelines(f"seed{seed},control.png,{seed},{steps}\n" for seed in range(first_seed, first_seed + jobs))
    return path


def run_batch(jobs_file: str, urls: list[str], out: str) -> dict:
    """One run of the batch command: wall-clock and CPU time, and the manifest's records."""
    command = [sys.executable, "-S", "-m", "controlnext_queue", "batch", WORKFLOW, "--jobs", jobs_file,
               *(arg for url in urls for arg in ("--server", url)), "--out", out]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(f"the batch failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as file:
        records = list(json.load(file)["jobs"].values())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "records": records}


def measure(urls: list[str], jobs: int, steps: int, folder: str) -> dict:
    warm_up = write_inputs(folder, len(urls), first_seed=0, steps=steps)
    run_batch(warm_up, urls, os.path.join(folder, "warm_up"))
    runs = []
    for count in range(1, len(urls) + 1):
        jobs_file = write_inputs(folder, jobs, 1000 * count, steps)  # new seeds: nothing from a server's cache
        load_before = os.getloadavg()[0]
        result = run_batch(jobs_file, urls[:count], os.path.join(folder, f"run{count}"))
        outside = [record["seconds"] - record["server_seconds"] for record in result["records"]]
        runs.append({"servers": count, "jobs": jobs, "wall_s": result["wall_s"],
                     "jobs_per_minute": jobs / result["wall_s"] * 60,
                     "client_cpu_ms_per_job": result["cpu_s"] / jobs * 1000,
                     "outside_run_ms_per_job": statistics.median(outside) * 1000,
                     "server_s_per_job": statistics.median(record["server_seconds"] for record in result["records"]),
                     "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
    for run in runs:
        run["scaling"] = run["jobs_per_minute"] / runs[0]["jobs_per_minute"]
    return {"cpu_count": os.cpu_count(), "steps": steps, "runs": runs}


def table(result: dict) -> str:
    lines = ["| servers | jobs/min | scaling | server s/job | client CPU ms/job | outside the run ms/job | load |",
             "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        lines.append(f"| {run['servers']} | {run['jobs_per_minute']:.1f} | {run['scaling']:.2f}x | "
                     f"{run['server_s_per_job']:.2f} | {run['client_cpu_ms_per_job']:.1f} | "
                     f"{run['outside_run_ms_per_job']:.0f} | {run['load_average'][0]:.1f}-"
                     f"{run['load_average'][1]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30, help="jobs per run (default %(default)s)")
    parser.add_argument("--steps", type=int, default=1, help="sampler steps per job (default %(default)s)")
    parser.add_argument("--servers", type=int, default=3, help="servers to start (default %(default)s)")
    parser.add_argument("--server", dest="urls", action="append", default=[], metavar="URL",
                        help="use this running server (with the tests' nodes and encoder) instead of starting them")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not args.urls and not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("Starting servers needs a ComfyUI host: set COMFYUI_PATH to a ComfyUI checkout and run this "
                         "with that ComfyUI's python (README, Benchmarks), or give running servers with --server.")
    folder = tempfile.mkdtemp(prefix="controlnext_queue_batch_")
    servers = [] if args.urls else start_servers(args.servers, folder)
    try:
        result = measure(args.urls or [server.url for server in servers], args.jobs, args.steps, folder)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(table(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
