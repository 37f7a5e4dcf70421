"""Host tests: the SD1.5 training template on a real ComfyUI server, queued with the queue command as
a user queues it. A real POST /interrupt during training keeps what was trained (Save ControlNeXt
still writes it), a Save name that is taken is flagged when the prompt is queued and stops the run
before anything is trained, and the loss reaches the server log and the node's text."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import host  # noqa: F401  (skips this module without a ComfyUI host)
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
from PIL import Image  # noqa: E402
from conftest import PACK_ROOT  # noqa: E402
from server import (TRAINING_PICTURES, ComfyServer, install_training_pictures, make_base_directory,  # noqa: E402
                    queue_command, runnable_on_tiny_models)

pytestmark = [pytest.mark.server, pytest.mark.slow]
TEMPLATE = os.path.join(PACK_ROOT, "workflows", "api", "ControlNeXt SD1.5 Training.json")
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # the template's, kept by the tiny-checkpoint test node
LONG_RUN = 400  # steps: far more than the test waits for (the log has a line every 20, and each minute)
RESUMED_RUN = 16  # steps: a log line for each; enough left after step 2 for an /interrupt to land
SMALL = ["--set", "Training Pictures.resolution=64", "--set", "Train ControlNeXt.batch_size=2",
         "--set", "Empty Latent Image.width=64", "--set", "Empty Latent Image.height=64", "--set", "KSampler.steps=2"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_directory(str(tmp_path_factory.mktemp("train_server_base")))
    install_training_pictures(os.path.join(base, "input", TRAINING_PICTURES))
    running = ComfyServer(base).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> tuple[str, str]:
    """The template with the tiny checkpoint, and a test photo."""
    folder = tmp_path_factory.mktemp("train_workflow")
    with open(TEMPLATE, encoding="utf-8") as file:
        prompt = runnable_on_tiny_models(json.load(file))
    path, photo = str(folder / "training.json"), str(folder / "photo.png")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(prompt, file)
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(photo)
    return path, photo


def queue_args(server, workflow, out, name: str, steps: int) -> list[str]:
    path, photo = workflow
    return [path, "--server", server.url, "--out", str(out), "--image", f"Test Photo={photo}", *SMALL,
            "--set", f"Train ControlNeXt.steps={steps}", "--set", f"Save ControlNeXt.name={name}"]


def wait_for_log(server, text: str, since: int = 0, timeout: float = 240.0) -> None:
    """Until ``text`` is in the server log after its first ``since`` characters (an earlier run's lines
    do not count)."""
    deadline = time.time() + timeout
    while text not in server.log()[since:]:
        if time.time() > deadline:
            raise AssertionError(f"'{text}' did not reach the server log in {timeout} s:\n{server.log()[-3000:]}")
        time.sleep(0.5)


def test_cancel_during_training_keeps_and_saves_what_was_trained(server, workflow, tmp_path):
    since = len(server.log())
    run = subprocess.Popen([sys.executable, "-S", "-m", "controlnext_queue",
                            *queue_args(server, workflow, tmp_path, "cancelled_run", LONG_RUN)],
                           cwd=PACK_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log(server, "ControlNeXt training: step ", since, timeout=600)  # a loaded machine: the minute's line
        status, _ = server.post("/interrupt", {})
        assert status == 200
        stdout, stderr = run.communicate(timeout=240)
    finally:
        run.kill()
    log = server.log()
    assert run.returncode == 0, stderr + log[-3000:]
    assert f"of {LONG_RUN} steps; kept what was trained" in log
    folder = os.path.join(server.base, "models", "controlnext", "cancelled_run")
    assert sorted(os.listdir(folder)) == ["controlnet.safetensors", "unet.safetensors"]
    with safetensors.safe_open(os.path.join(folder, "controlnet.safetensors"), "np") as file:
        metadata = file.metadata()
    assert 1 <= int(metadata["steps"]) < LONG_RUN
    assert metadata["base_model"] == CHECKPOINT
    assert len(stdout.split()) == 1 and os.path.isfile(stdout.split()[0])  # the test generation after it ran too


def test_the_loss_reaches_the_log_and_the_nodes_text(server, workflow, tmp_path):
    result = queue_command(*queue_args(server, workflow, tmp_path, "short_run", 4), "--set",
                           "Save ControlNeXt.overwrite=true")
    assert result.returncode == 0, result.stderr + server.log()[-3000:]
    log = server.log()
    assert "ControlNeXt training: step 4/4  loss " in log
    assert "ControlNeXt training: Trained 4 steps. loss " in log and "(mean of the first and last 2 steps)" in log


def test_a_taken_save_name_is_refused_when_queued(server, workflow, tmp_path):
    folder = os.path.join(server.base, "models", "controlnext", "taken")
    os.makedirs(folder)
    with open(os.path.join(folder, "controlnet.safetensors"), "wb") as file:
        file.write(b"the user's file")
    steps_before = server.log().count("ControlNeXt training: step")
    result = queue_command(*queue_args(server, workflow, tmp_path, "taken", 3))
    assert result.returncode == 7, result.stderr  # Train ControlNeXt refused to start
    assert "Save ControlNeXt (node 6)" in result.stderr and "already holds controlnet.safetensors" in result.stderr
    assert "Failed to validate prompt for output 6" in server.log()  # and ComfyUI flagged Save when queued
    server.wait_until_idle()
    assert server.log().count("ControlNeXt training: step") == steps_before  # nothing was trained
    with open(os.path.join(folder, "controlnet.safetensors"), "rb") as file:
        assert file.read() == b"the user's file"


def release_tensors(server, name: str) -> dict:
    folder = os.path.join(server.base, "models", "controlnext", name)
    tensors = {}
    for file in ("controlnet.safetensors", "unet.safetensors"):
        with safetensors.safe_open(os.path.join(folder, file), "np") as opened:
            tensors.update({f"{file}:{key}": opened.get_tensor(key) for key in opened.keys()})
    return tensors


def test_a_run_cancelled_and_resumed_gives_the_files_of_an_uninterrupted_one(server, workflow, tmp_path):
    """RESUMED_RUN steps in one run, and as many cancelled by a real /interrupt part-way (a
    checkpoint is written on Cancel) then queued again with resume = latest: the release files are
    the same."""
    def args(name: str, *extra: str) -> list[str]:
        return [*queue_args(server, workflow, tmp_path / name, f"{name}_save", RESUMED_RUN), "--set",
                "Save ControlNeXt.overwrite=true", "--set", f"Train ControlNeXt.checkpoint_name={name}", *extra]

    straight = queue_command(*args("straight"), timeout=600)
    assert straight.returncode == 0, straight.stderr + server.log()[-3000:]
    since = len(server.log())
    run = subprocess.Popen([sys.executable, "-S", "-m", "controlnext_queue", *args("resumed")], cwd=PACK_ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log(server, f"ControlNeXt training: step 2/{RESUMED_RUN}", since)
        assert server.post("/interrupt", {})[0] == 200
        _, stderr = run.communicate(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 0, stderr + server.log()[-3000:]
    checkpoints = os.listdir(os.path.join(server.base, "models", "controlnext", "resumed", "checkpoints"))
    assert len(checkpoints) == 1 and 2 <= int(checkpoints[0].split("-")[1]) < RESUMED_RUN, checkpoints
    resumed = queue_command(*args("resumed", "--set", "Train ControlNeXt.resume=latest"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr + server.log()[-3000:]
    assert "Resumed" in server.log() and f"step-{RESUMED_RUN}" in os.listdir(
        os.path.join(server.base, "models", "controlnext", "resumed", "checkpoints"))
    expected, actual = release_tensors(server, "straight"), release_tensors(server, "resumed")
    assert expected.keys() == actual.keys()
    assert all(np.array_equal(actual[key], value) for key, value in expected.items())
