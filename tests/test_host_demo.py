"""Host tests of the try-it command (python -m controlnext_demo) and of the ControlNeXt it trains.

Quick preset: the whole command on a real ComfyUI (toy world and ControlNeXt trained a few steps,
files installed into a base directory holding the pack, a server started by the command, the
template queued, the side-by-side picture saved), and its refusals.

Demo preset (the one users run): the command trains the toy world and an encoder-only ControlNeXt
(minutes, cached in CONTROLNEXT_TEST_CACHE under the digest of the code that trains them: the
next run, the other ComfyUI version's or a rerun, reuses them) and queues the template on a test
server; then the template is queued for 16 new pictures: in each picture the sample with the
control must match the control's edges better than the sample without it, on average by at least
half the margin the training measured on its own held-out pictures, and for most of the pictures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import host  # noqa: F401  (skips this module without a ComfyUI host)
from conftest import COMFYUI_PATH, PACK_ROOT  # noqa: E402
from controlnext_demo import cli as demo  # noqa: E402
from controlnext_demo import toy  # noqa: E402
from controlnext_testbed import toy_shapes  # noqa: E402
from server import ComfyServer, make_base_directory, one_thread_env, queue_command  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]

canny = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.preprocess.canny").canny
CONTROLS = 16  # new pictures queued: one sample each is noisy, their mean is not
PANEL, SPACING, SCALE = toy_shapes.PICTURE, 2, 4  # the template's side-by-side picture: 3 panels, 2 px apart, 4x
TEST_CACHE = os.environ.get("CONTROLNEXT_TEST_CACHE", os.path.expanduser("~/.cache/comfyui-controlnext-tests"))


def run_demo(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """The command as a user runs it: from the pack's folder, with the host's python; one torch
    thread, as the test servers (two threads on a shared 2-core machine spend most of their time
    waiting for each other)."""
    return subprocess.run([sys.executable, "-m", "controlnext_demo", "--comfyui", COMFYUI_PATH, *args], cwd=PACK_ROOT,
                          env=one_thread_env(), capture_output=True, text=True, timeout=timeout)


def panels(path: str) -> list[np.ndarray]:
    """The control, the sample without it and the sample with it, at the toy's size."""
    with Image.open(path) as image:
        stitched = np.asarray(image.convert("RGB"))[::SCALE, ::SCALE]  # nearest-exact 4x: every 4th pixel
    assert stitched.shape == (PANEL, 3 * PANEL + 2 * SPACING, 3), stitched.shape
    return [stitched[:, k * (PANEL + SPACING):k * (PANEL + SPACING) + PANEL] for k in range(3)]


def test_quick_demo_trains_installs_starts_a_server_and_saves_the_side_by_side_picture(tmp_path):
    base = make_base_directory(str(tmp_path / "comfyui"), with_test_nodes=False)
    out = tmp_path / "out"
    result = run_demo("--quick", "--base-directory", base, "--cache", str(tmp_path / "cache"), "--out", str(out),
                      "--seed", "3")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "building the toy world" in result.stderr and "training the toy world's ControlNeXt" in result.stderr
    assert "starting ComfyUI" in result.stderr
    picture = result.stdout.strip()
    assert os.path.dirname(picture).startswith(str(out)) and os.path.isfile(out / "comfyui.log")
    control, without, with_control = panels(picture)
    drawn = toy_shapes.draw_pictures(1, demo.PICTURE_SEED + 3)
    expected = canny(drawn, *toy_shapes.CANNY_THRESHOLDS)[0]  # the template's Canny settings are the training's
    assert np.array_equal(control, (expected.numpy() * 255).round().astype(np.uint8))
    assert without.std() > 0 and with_control.std() > 0
    for path in (os.path.join("models", "checkpoints", demo.INSTALLED_BASE),
                 os.path.join("models", "controlnext", demo.INSTALLED_RELEASE, "controlnet.safetensors"),
                 os.path.join("input", demo.INSTALLED_PICTURE)):
        assert os.path.isfile(os.path.join(base, path)), path
    assert toy_shapes.is_checkpoint(os.path.join(base, "models", "checkpoints", demo.INSTALLED_BASE))


def test_a_comfyui_without_the_pack_is_refused_before_training(tmp_path):
    base = tmp_path / "comfyui"
    (base / "custom_nodes").mkdir(parents=True)
    result = run_demo("--quick", "--base-directory", str(base), "--cache", str(tmp_path / "cache"), timeout=300)
    assert result.returncode == 1
    assert "does not load this pack" in result.stderr and "--server" in result.stderr
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def trained_server(tmp_path_factory):
    """A test server with the demo's trained files, installed by the command itself (which queues
    the template there once), and what the training measured."""
    base = make_base_directory(str(tmp_path_factory.mktemp("demo_base")), with_test_nodes=False)
    trained = toy.cache_folder(TEST_CACHE, "demo")  # before the run: the code may change while it trains
    running = ComfyServer(base).start()
    try:
        result = run_demo("--base-directory", base, "--server", running.url, "--cache", TEST_CACHE, "--out",
                          str(tmp_path_factory.mktemp("demo_out")), timeout=5400)
        assert result.returncode == 0, result.stderr[-4000:]
        with open(os.path.join(trained, toy.REPORT_FILE)) as file:
            yield running, json.load(file)
    finally:
        running.stop()


def test_the_trained_controlnext_makes_served_samples_follow_the_control(trained_server, tmp_path):
    server, report = trained_server
    with open(demo.TEMPLATE_FILE) as file:
        strengths = [node["inputs"]["strength"] for node in json.load(file).values()
                     if node["class_type"] == "ControlNeXtApply"]
    assert strengths == [report["strength"]] == [toy.STRENGTH]  # the training measured what the template shows
    measured = np.mean(report["heldout_iou"]["with"]) - np.mean(report["heldout_iou"]["without"])
    assert measured > 0.02, f"the training did not learn to follow the control (gain {measured:.3f})"
    pictures = toy_shapes.draw_pictures(CONTROLS, seed=2_000_000)  # neither trained on nor the training's held-out
    samples = {"without": [], "with": []}
    for index, picture in enumerate(pictures):
        path = str(tmp_path / f"picture_{index}.png")
        Image.fromarray((picture.numpy() * 255).round().astype(np.uint8)).save(path)
        out = tmp_path / f"out_{index}"
        result = queue_command(demo.TEMPLATE_FILE, "--server", server.url, "--image", f"Shapes Picture={path}",
                               "--out", str(out), *(arg for title in demo.SAMPLERS
                                                    for arg in ("--set", f"{title}.seed={index}")), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        _, without, with_control = panels(result.stdout.split()[0])
        samples["without"].append(without)
        samples["with"].append(with_control)
    controls = canny(pictures, *toy_shapes.CANNY_THRESHOLDS)
    scores = {kind: toy_shapes.edge_iou(torch.from_numpy(np.stack(found)).float() / 255.0, controls, canny)
              for kind, found in samples.items()}
    gain = scores["with"] - scores["without"]
    print(f"served: edge IoU {float(scores['without'].mean()):.3f} without the control, "
          f"{float(scores['with'].mean()):.3f} with it (gain {float(gain.mean()):.3f}, positive for "
          f"{int((gain > 0).sum())} of {CONTROLS}); the training measured a gain of {measured:.3f}")
    assert float(gain.mean()) >= measured / 2, (scores, measured)
    assert int((gain > 0).sum()) > CONTROLS // 2, (scores, measured)  # for most controls, not a few strong ones
