"""Host test: a ControlNeXt trained here steers generations through a real ComfyUI server.

The convergence study (benchmarks/convergence.py ``--preset server``) trains the toy world (shapes,
autoencoder, base UNet) and one encoder-only ControlNeXt, saves the encoder as a release and the
base as a toy checkpoint, and measures, in process, how much closer to the control its samples come
than the uncontrolled base's. Here both files go under a server's ``models/``, and for 16 new
pictures a workflow (Load Image -> Canny -> Load / Apply ControlNeXt -> KSampler -> the
toy decoder -> Save Image) is queued with the queue command at strength 1 and 0: the samples'
edges must match the control's better at strength 1, on average by at least half the margin the
training run measured, and for most of the pictures.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import host  # noqa: F401  (skips this module without a ComfyUI host)
from conftest import COMFYUI_PATH, PACK_ROOT  # noqa: E402
from server import ComfyServer, make_base_directory, queue_command  # noqa: E402
import toy_shapes  # noqa: E402

canny = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.preprocess.canny").canny
RELEASE = "toy_shapes/controlnet.safetensors"
CONTROLS = 16  # new pictures queued, at both strengths: one sample each is noisy, their mean is not


def workflow(strength: float, seed: int) -> dict:
    """The graph a user builds, with the toy checkpoint loader and decoder in place of ComfyUI's."""
    low, high = toy_shapes.CANNY_THRESHOLDS
    size = toy_shapes.PICTURE
    return {
        "1": {"class_type": "ControlNeXtTestToyShapesCheckpoint", "inputs": {"ckpt_name": "toy_base.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Picture"}},
        "3": {"class_type": "ControlNeXtCanny", "inputs": {"image": ["2", 0], "auto_thresholds": False,
                                                            "low_threshold": low, "high_threshold": high,
                                                            "blur_sigma": 0.0}},
        "4": {"class_type": "ControlNeXtLoader", "inputs": {"controlnext_name": RELEASE}},
        "5": {"class_type": "ControlNeXtApply", "inputs": {"model": ["1", 0], "controlnext": ["4", 0], "image": ["3", 0],
                                                            "strength": strength, "start_percent": 0.0,
                                                            "end_percent": 1.0}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": seed, "steps": 10, "cfg": 1.0,
                                                    "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                    "positive": ["1", 1], "negative": ["1", 1],
                                                    "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "ControlNeXtTestToyShapesDecode", "inputs": {"samples": ["7", 0], "autoencoder": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "toy"}},
    }


# What the trained toy world depends on: a change to any of these trains it again.
TRAINING_SOURCES = ("benchmarks/convergence.py", "tests/toy_shapes.py", "controlnext_core", "nodes")


def training_digest() -> str:
    digest = hashlib.sha256()
    for source in TRAINING_SOURCES:
        path = os.path.join(PACK_ROOT, source)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names if name.endswith(".py"))
        for file in files:
            digest.update(os.path.relpath(file, PACK_ROOT).encode())
            with open(file, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, dict]:
    """The study's server preset: the toy base, a trained encoder-only release, and the study's report.

    Training takes minutes, so the result is kept in CONTROLNEXT_TEST_CACHE (default
    ~/.cache/comfyui-controlnext-tests) under the digest of the code that trains it, and the next
    run (the other ComfyUI version's, or a rerun) serves the same files."""
    cache = os.environ.get("CONTROLNEXT_TEST_CACHE", os.path.expanduser("~/.cache/comfyui-controlnext-tests"))
    folder = os.path.join(cache, f"toy-shapes-{training_digest()}")
    if not os.path.exists(os.path.join(folder, "convergence.json")):
        os.makedirs(cache, exist_ok=True)
        work = tmp_path_factory.mktemp("trained")
        command = [sys.executable, os.path.join(PACK_ROOT, "benchmarks", "convergence.py"), "--preset", "server",
                   "--release", str(work / "release"), "--results", str(work), "--figures", str(work),
                   "--world", str(work / "world")]
        process = subprocess.run(command, env=dict(os.environ, COMFYUI_PATH=COMFYUI_PATH), capture_output=True,
                                 text=True, timeout=1800)
        assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
        staged = tempfile.mkdtemp(dir=cache)
        shutil.move(str(work / "release"), os.path.join(staged, "release"))
        shutil.move(str(work / "convergence.json"), os.path.join(staged, "convergence.json"))
        try:
            os.rename(staged, folder)  # whole or not at all: a run stopped midway leaves no half entry
        except OSError:  # a concurrent run got there first
            shutil.rmtree(staged)
    with open(os.path.join(folder, "convergence.json")) as file:
        return os.path.join(folder, "release"), json.load(file)


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    release, _ = trained
    base = make_base_directory(str(tmp_path_factory.mktemp("convergence_base")))
    os.makedirs(os.path.join(base, "models", "checkpoints"), exist_ok=True)
    shutil.copy(os.path.join(release, "toy_base.safetensors"), os.path.join(base, "models", "checkpoints"))
    shutil.copytree(os.path.join(release, "controlnext"), os.path.join(base, "models", "controlnext", "toy_shapes"))
    running = ComfyServer(base).start()
    yield running
    running.stop()


def generate(server, prompt: dict, picture: str, out: str) -> np.ndarray:
    """One picture through the workflow, queued with the queue command; the saved sample."""
    os.makedirs(out)
    path = os.path.join(out, "workflow.json")
    with open(path, "w") as file:
        json.dump(prompt, file)
    result = queue_command(path, "--server", server.url, "--image", f"Picture={picture}", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = [name for name in os.listdir(out) if name.endswith(".png")]
    assert len(saved) == 1, saved
    with Image.open(os.path.join(out, saved[0])) as image:
        return np.asarray(image.convert("RGB"))


def test_a_trained_controlnext_makes_served_samples_follow_the_control(trained, server, tmp_path):
    _, report = trained
    measured = report["summary"]["methods"]["controlnext_encoder"]["final_iou"] - report["summary"]["uncontrolled_iou"]
    assert measured > 0.02, f"the study's own run did not learn to follow the control (gain {measured:.3f})"
    pictures = toy_shapes.draw_pictures(CONTROLS, seed=2_000_000)  # neither trained on nor the study's held-out
    controls = canny(pictures, *toy_shapes.CANNY_THRESHOLDS)
    scores = {}
    for strength in (1.0, 0.0):
        samples = []
        for index, picture in enumerate(pictures):
            path = str(tmp_path / f"picture_{index}.png")
            Image.fromarray((picture.numpy() * 255).round().astype(np.uint8)).save(path)
            out = tmp_path / f"out_{strength}_{index}"
            samples.append(generate(server, workflow(strength, seed=index), path, str(out)))
        images = torch.from_numpy(np.stack(samples)).float() / 255.0
        scores[strength] = toy_shapes.edge_iou(images, controls, canny)
    gain = scores[1.0] - scores[0.0]
    print(f"served: edge IoU {float(scores[0.0].mean()):.3f} at strength 0, {float(scores[1.0].mean()):.3f} at 1 "
          f"(gain {float(gain.mean()):.3f}, positive for {int((gain > 0).sum())} of {CONTROLS}); "
          f"the training run measured a gain of {measured:.3f}")
    assert float(gain.mean()) >= measured / 2, (scores, measured)
    assert int((gain > 0).sum()) > CONTROLS // 2, (scores, measured)  # for most controls, not a few strong ones
