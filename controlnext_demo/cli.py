"""python -m controlnext_demo [--comfyui PATH] [--server URL] [--out DIR] [--seed N]

Trains the toy world (controlnext_demo/toy.py; once, then cached), puts its files into the ComfyUI's
folders (models/checkpoints, models/controlnext, input), queues the template TEMPLATE with the queue
command on a running server or on one started here, and prints where the picture it saved is: the
control, a sample without it and the same sample with it, side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image

from controlnext_queue import cli as queue_cli
from controlnext_testbed import comfy_library, toy_shapes

from . import toy

TEMPLATE = "ControlNeXt Toy Shapes Demo"
TEMPLATE_FILE = os.path.join(comfy_library.PACK_ROOT, "workflows", "api", f"{TEMPLATE}.json")
SAMPLERS = ("Without Control", "With Control")  # the titles of the template's two samplers
# where the template expects its files, under ComfyUI's models/checkpoints, models/controlnext and input/
INSTALLED_BASE = "controlnext_demo/toy_shapes_base.safetensors"
INSTALLED_RELEASE = "controlnext_demo/toy_shapes_canny"
INSTALLED_PICTURE = "controlnext_demo_shapes.png"
PICTURE_SEED = 3_000_000  # + --seed: pictures neither trained on nor held out (those use seeds 0 and 1,000,000)
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "comfyui-controlnext", "demo")
SERVER_START_S = 300


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m controlnext_demo",
        description="See ControlNeXt work without downloading anything: trains a toy world (pictures of shapes, a "
                    "small base model, a canny ControlNeXt; minutes on a CPU, once) into a ComfyUI and queues the "
                    f"template '{TEMPLATE}': the control, a sample without it and with it, side by side.")
    parser.add_argument("--comfyui", metavar="PATH",
                        help="the ComfyUI folder (main.py); default: COMFYUI_PATH, or the ComfyUI whose custom_nodes "
                             "holds this pack. Run this with that ComfyUI's python")
    parser.add_argument("--base-directory", metavar="DIR",
                        help="as ComfyUI's own option: the folder of its models/, input/, output/ and custom_nodes/ "
                             "(default: the ComfyUI folder)")
    parser.add_argument("--server", metavar="URL",
                        help="queue on this running ComfyUI (it must read the same folders) instead of starting one")
    parser.add_argument("--out", metavar="DIR",
                        help="folder the picture is downloaded into, with the log of a server started here "
                             "(default: output/controlnext_demo in the base directory)")
    parser.add_argument("--seed", type=int, default=0, help="draws another picture and another sampling noise")
    parser.add_argument("--cache", default=os.environ.get("CONTROLNEXT_DEMO_CACHE", DEFAULT_CACHE),
                        help="folder of the trained toy world (default: CONTROLNEXT_DEMO_CACHE or %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="every piece trained a few steps: a smoke run of the command (the picture shows no "
                             "control)")
    parser.add_argument("--train-only", action="store_true",
                        help="only train the toy world and its ControlNeXt into --cache (or find them there) and print "
                             "the folder: a later run, or the tests, then start at once")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # Train ControlNeXt's progress lines
    comfyui = comfy_library.use_comfyui(args.comfyui)
    if args.train_only:
        print(toy.trained_toy_world(args.cache, "quick" if args.quick else "demo"))
        return 0
    base_directory = os.path.abspath(args.base_directory or comfyui)
    if not args.server and not loads_this_pack(base_directory):
        raise SystemExit(f"The ComfyUI in {base_directory} does not load this pack: its custom_nodes folder has no "
                         f"link to {comfy_library.PACK_ROOT}. Install the pack there (README, Install), or give a "
                         f"running server that has it with --server.")
    trained = toy.trained_toy_world(args.cache, "quick" if args.quick else "demo")
    install(trained, base_directory, args.seed)
    out = args.out or os.path.join(base_directory, "output", "controlnext_demo")
    os.makedirs(out, exist_ok=True)
    with server(args.server, comfyui, base_directory, os.path.join(out, "comfyui.log")) as url:
        code, saved = queue(url, out, args.seed)
    if code != 0:
        return code
    with open(os.path.join(trained, toy.REPORT_FILE)) as file:
        scores = json.load(file)["heldout_iou"]
    picture = os.path.join(base_directory, "input", INSTALLED_PICTURE)
    print(f"The picture, left to right: the control (the canny edges of {picture}), the toy base's sample without "
          f"ControlNeXt, the same sample (same seed) with it at strength {toy.STRENGTH:g}. What the training "
          f"measured on {len(scores['with'])} pictures it had not seen: the samples' edges overlap the control's by "
          f"{mean(scores['without']):.3f} without ControlNeXt and {mean(scores['with']):.3f} with it (edge IoU; "
          f"1 = the same edges).", file=sys.stderr)
    print(saved[0])
    return 0


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def loads_this_pack(base_directory: str) -> bool:
    """Whether an entry of custom_nodes/ is this checkout (a clone there or a link to it)."""
    custom_nodes = os.path.join(base_directory, "custom_nodes")
    here = os.path.realpath(comfy_library.PACK_ROOT)
    return os.path.isdir(custom_nodes) and any(
        os.path.realpath(os.path.join(custom_nodes, name)) == here for name in os.listdir(custom_nodes))


def install(trained: str, base_directory: str, seed: int) -> None:
    """The toy base into models/checkpoints, the ControlNeXt into models/controlnext and a picture
    drawn with ``seed`` into input/, under the names the template uses."""
    models = os.path.join(base_directory, "models")
    copy(os.path.join(trained, toy.BASE_FILE), os.path.join(models, "checkpoints", INSTALLED_BASE))
    release = os.path.join(trained, toy.RELEASE_FOLDER)
    for name in os.listdir(release):
        copy(os.path.join(release, name), os.path.join(models, "controlnext", INSTALLED_RELEASE, name))
    picture = toy_shapes.draw_pictures(1, PICTURE_SEED + seed)[0]
    os.makedirs(os.path.join(base_directory, "input"), exist_ok=True)
    Image.fromarray((picture.numpy() * 255).round().astype(np.uint8)).save(
        os.path.join(base_directory, "input", INSTALLED_PICTURE))


def copy(source: str, target: str) -> None:
    if os.path.exists(target) and filecmp.cmp(source, target, shallow=False):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(source, target)
    print(f"installed {target}", file=sys.stderr)


@contextlib.contextmanager
def server(url: str | None, comfyui: str, base_directory: str, log_path: str):
    """``url``, or a ComfyUI started from ``comfyui`` on a free local port (stopped afterwards)."""
    if url:
        yield url
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch"]
    if base_directory != comfyui:
        command += ["--base-directory", base_directory]
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        command.append("--cpu")
    url = f"http://127.0.0.1:{port}"
    print(f"starting ComfyUI at {url} (log: {log_path})", file=sys.stderr)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_server(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for_server(url: str, process: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"ComfyUI exited with code {process.returncode} while starting; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/system_stats", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise SystemExit(f"ComfyUI did not answer at {url} within {SERVER_START_S} s; see {log_path}")


def queue(url: str, out: str, seed: int) -> tuple[int, list[str]]:
    """The template through the queue command (its progress and messages on stderr): its exit code
    and the files it downloaded."""
    settings = [arg for title in SAMPLERS for arg in ("--set", f"{title}.seed={seed}")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = queue_cli.main([TEMPLATE_FILE, "--server", url, "--out", out, *settings])
    return code, printed.getvalue().split()
