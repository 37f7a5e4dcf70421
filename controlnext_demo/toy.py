"""The demo's trained toy world: the convergence study's toy base (controlnext_testbed/toy_world.py)
and a canny ControlNeXt trained on it by the pack's own Train ControlNeXt node, kept in a cache
folder under a digest of the code that trains them (a change to that code trains them again). The
world, most of the time, is kept apart under a digest of its own code and settings: a change to
the pack's nodes trains the ControlNeXt again, on the same world.

Needs ComfyUI on sys.path (controlnext_testbed.comfy_library.use_comfyui).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from controlnext_testbed import comfy_library, toy_shapes, toy_world

BASE_FILE = "toy_shapes_base.safetensors"
RELEASE_FOLDER = "toy_shapes_canny"  # holds controlnet.safetensors, as Save ControlNeXt writes a release
REPORT_FILE = "trained.json"
# Apply ControlNeXt's strength in the template and in the training's measurement: at the strength it
# is trained with, 1, this toy's control moves the samples too little to see.
STRENGTH = 2.0
# What the world depends on (with its settings: its pictures, canny and the DDPM noising of
# controlnext_core.train), and what the trained ControlNeXt depends on (the whole pack).
WORLD_SOURCES = ("controlnext_testbed/toy_shapes.py", "controlnext_testbed/toy_world.py",
                 "controlnext_core/preprocess", "controlnext_core/train.py")
TRAINING_SOURCES = ("controlnext_demo/toy.py", *WORLD_SOURCES, "controlnext_core", "nodes")


@dataclasses.dataclass(frozen=True)
class Preset:
    world: toy_world.World
    controlnext_steps: int
    controlnext_batch: int


PRESETS = {
    # the world of a few minutes on two CPU cores and an encoder-only ControlNeXt at the official
    # SD1.5 recipe (the convergence study's encoder-only run is at 90 % of its final score by step 200)
    "demo": Preset(toy_world.World(train_pictures=1024, heldout_pictures=16, autoencoder_steps=800,
                                   autoencoder_batch=32, base_steps=300, base_batch=16, base_lr=3e-4,
                                   sampler_steps=10),
                   controlnext_steps=600, controlnext_batch=4),
    # every piece at a few steps: a smoke run of the command, barely trained
    "quick": Preset(toy_world.World(train_pictures=64, heldout_pictures=2, autoencoder_steps=20, autoencoder_batch=8,
                                    base_steps=10, base_batch=4, base_lr=3e-4, sampler_steps=2),
                    controlnext_steps=3, controlnext_batch=2),
}


def digest(sources: tuple[str, ...], *settings: str) -> str:
    """Of the .py files under ``sources`` (paths in the pack) and ``settings``."""
    digest = hashlib.sha256("\n".join(settings).encode())
    for source in sources:
        path = os.path.join(comfy_library.PACK_ROOT, source)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names if name.endswith(".py"))
        for file in files:
            digest.update(os.path.relpath(file, comfy_library.PACK_ROOT).encode())
            with open(file, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def cache_folder(cache: str, preset: str) -> str:
    """Where ``trained_toy_world`` keeps what the current code trains."""
    return os.path.join(cache, f"toy-shapes-{preset}-{digest(TRAINING_SOURCES)}")


def trained_toy_world(cache: str, preset: str) -> str:
    """The folder holding the toy base (BASE_FILE), the trained ControlNeXt (RELEASE_FOLDER) and what
    its training measured (REPORT_FILE); trained into ``cache`` the first time."""
    folder = cache_folder(cache, preset)

    def make(staged: str) -> None:
        print(f"training the toy world's ControlNeXt into {folder} (once)", file=sys.stderr)
        train(PRESETS[preset], built_world(cache, PRESETS[preset].world), staged)

    made_once(folder, REPORT_FILE, make)
    return folder


def built_world(cache: str, world: toy_world.World) -> str:
    """The folder of the toy world (toy_world.build_world), built into ``cache`` the first time."""
    folder = os.path.join(cache, f"toy-world-{digest(WORLD_SOURCES, repr(world))}")

    def make(staged: str) -> None:
        print(f"building the toy world into {folder} (once: the demo's takes about 17 minutes of CPU time)",
              file=sys.stderr)
        toy_world.build_world(world, staged)

    made_once(folder, toy_world.SUMMARY_FILE, make)
    return folder


def made_once(folder: str, marker: str, make) -> None:
    """``folder`` made by ``made_whole`` unless it holds ``marker``; a second process asking for the
    same folder meanwhile (CI's early start, the other host's tests) waits for the first instead of
    making it too."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, however it ends
        if not os.path.exists(os.path.join(folder, marker)):
            made_whole(folder, make)


def made_whole(folder: str, make) -> None:
    """``make(staged)`` fills a new folder beside ``folder``, which then takes its name: a run stopped
    midway leaves no half entry, and of two runs at once the first to finish wins."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staged = tempfile.mkdtemp(prefix=".making-", dir=os.path.dirname(folder))
    try:
        make(staged)
        try:
            os.rename(staged, folder)
        except OSError:  # a concurrent run got there first
            pass
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def train(preset: Preset, world_folder: str, folder: str) -> None:
    """ControlNeXt on the world through Train ControlNeXt (encoder only, the SD1.5 recipe), then the
    held-out controls sampled with it at STRENGTH (Apply ControlNeXt) and scored against the
    uncontrolled base's samples of the same noise."""
    nodes_train, apply = comfy_library.pack("nodes.train"), comfy_library.pack("nodes.apply")
    save_release = comfy_library.pack("controlnext_core.train").save_release
    started = time.process_time()
    world = toy_world.build_world(preset.world, world_folder)  # its summary: the folder holds it
    model, autoencoder, data = toy_world.load_world(world_folder)
    trained, patched, losses = nodes_train.TrainControlNeXt.execute(
        model=model, latents={"samples": data["latents"]}, positive=toy_shapes.conditioning(),
        control_images=data["controls"], steps=preset.controlnext_steps, batch_size=preset.controlnext_batch,
        encoder_lr=1e-4, unet_lr=1e-5, train_unet="none", optimizer="official", warmup_steps=0, control_scale=0.0,
        proportion_empty_prompts=0.0, seed=0, gradient_checkpointing=False, precision="bf16").result
    trained_s = time.process_time() - started
    save_release(os.path.join(folder, RELEASE_FOLDER), trained.encoder, None, trained.metadata, overwrite=True)
    applied = apply.ApplyControlNeXt.execute(patched, trained, data["heldout_controls"], STRENGTH, 0.0,
                                             1.0).result[0]
    controlled, _ = toy_world.score(autoencoder, toy_world.sample(applied, preset.world.heldout_pictures, preset.world),
                                    data["heldout_controls"])
    toy_world.release_comfy_models()
    try:  # the world keeps its copy for the next training: a second name for the same file where possible
        os.link(os.path.join(world_folder, toy_world.BASE_FILE), os.path.join(folder, BASE_FILE))
    except OSError:
        shutil.copyfile(os.path.join(world_folder, toy_world.BASE_FILE), os.path.join(folder, BASE_FILE))
    report = {"preset": dataclasses.asdict(preset), "world_cpu_s": world["cpu_s"], "controlnext_cpu_s": trained_s,
              "torch": torch.__version__,
              "loss_first_last_10": [sum(losses["loss"][:10]) / len(losses["loss"][:10]),
                                     sum(losses["loss"][-10:]) / len(losses["loss"][-10:])],
              "strength": STRENGTH, "heldout_iou": {"without": world["uncontrolled_iou"], "with": controlled}}
    with open(os.path.join(folder, REPORT_FILE), "w") as file:
        json.dump(report, file, indent=1)
