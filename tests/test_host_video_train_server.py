"""Host tests: the SVD training template (Train ControlNeXt SVD, then a video generated with what it
trained) on a real ComfyUI server, queued with the queue command as a user queues it. A real POST
/interrupt during training keeps what was trained: Save ControlNeXt writes it and the video is still
made; a run cancelled that way and queued again with resume = latest gives the files of an
uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import host  # noqa: F401  (skips this module without a ComfyUI host)
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
from PIL import Image  # noqa: E402
from conftest import PACK_ROOT  # noqa: E402
from server import (ComfyServer, install_dwpose_models, make_base_directory, queue_command,  # noqa: E402
                    runnable_on_tiny_models)
from test_host_train_server import release_tensors, wait_for_log  # noqa: E402
from test_host_workflows import (API_WORKFLOWS, DRIVING_FRAMES, RUNS, VIDEO_CLIPS, VIDEO_TRAINING,  # noqa: E402
                                 image_args, images)  # noqa: F401 (images: a fixture)
from train_command_fixtures import write_clips  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]
LONG_RUN = 4000  # steps: far more than the test waits for
RESUMED_RUN = 12  # steps: enough left after step 2 for an /interrupt to land


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_directory(str(tmp_path_factory.mktemp("video_train_server_base")))
    install_dwpose_models(os.path.join(base, "models", "dwpose"))
    write_clips(os.path.join(base, "input", VIDEO_CLIPS), 2)
    running = ComfyServer(base).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, images) -> tuple[str, list[str]]:
    """The template with the tiny checkpoint, and its two pictures (the workflow tests'): a reference and
    a driving video."""
    path = str(tmp_path_factory.mktemp("video_train_workflow") / "training.json")
    with open(os.path.join(API_WORKFLOWS, f"{VIDEO_TRAINING}.json"), encoding="utf-8") as file:
        prompt = runnable_on_tiny_models(json.load(file))
    with open(path, "w", encoding="utf-8") as file:
        json.dump(prompt, file)
    return path, image_args(VIDEO_TRAINING, images)


def queue_args(server, workflow, out, checkpoint_name: str, steps: int, *extra: str) -> list[str]:
    path, images = workflow
    return [path, "--server", server.url, "--out", str(out), *images, *RUNS[VIDEO_TRAINING][0],
            "--set", f"Train ControlNeXt SVD.steps={steps}", "--set", f"Train ControlNeXt SVD.checkpoint_name="
            f"{checkpoint_name}", "--set", f"Save ControlNeXt.name={checkpoint_name}_save", *extra]


def cancelled_run(server, args: list[str], at_step: str) -> tuple[int, str, str]:
    """Queues the prompt, POSTs /interrupt once ``at_step`` is in the server log; the queue command's
    exit code and output."""
    since = len(server.log())
    run = subprocess.Popen([sys.executable, "-S", "-m", "controlnext_queue", *args], cwd=PACK_ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log(server, at_step, since, timeout=600)
        assert server.post("/interrupt", {})[0] == 200
        stdout, stderr = run.communicate(timeout=600)
    finally:
        run.kill()
    return run.returncode, stdout, stderr


def test_cancel_during_svd_training_keeps_saves_and_generates_with_what_was_trained(server, workflow, tmp_path):
    code, stdout, stderr = cancelled_run(server, queue_args(server, workflow, tmp_path, "cancelled", LONG_RUN),
                                         "ControlNeXt training: step ")  # a line every 200 steps
    log = server.log()
    assert code == 0, stderr + log[-3000:]
    assert f"of {LONG_RUN} steps; kept what was trained" in log
    folder = os.path.join(server.base, "models", "controlnext", "cancelled_save")
    assert sorted(os.listdir(folder)) == ["controlnet.safetensors", "unet.safetensors"]
    with safetensors.safe_open(os.path.join(folder, "controlnet.safetensors"), "np") as file:
        metadata = file.metadata()
    assert 1 <= int(metadata["steps"]) < LONG_RUN and metadata["family"] == "svd"
    checkpoints = os.listdir(os.path.join(server.base, "models", "controlnext", "cancelled", "checkpoints"))
    assert f"step-{metadata['steps']}" in checkpoints  # the checkpoint written on Cancel
    saved = stdout.split()
    assert len(saved) == 1 and os.path.isfile(saved[0])  # the video after it was made too
    with Image.open(saved[0]) as video:
        assert video.n_frames == DRIVING_FRAMES


def test_an_svd_run_cancelled_and_resumed_gives_the_files_of_an_uninterrupted_one(server, workflow, tmp_path):
    def args(name: str, *extra: str) -> list[str]:
        return queue_args(server, workflow, tmp_path / name, name, RESUMED_RUN, "--set",
                          "Save ControlNeXt.overwrite=true", "--set", "Train ControlNeXt SVD.resume=no", *extra)

    straight = queue_command(*args("straight"), timeout=600)
    assert straight.returncode == 0, straight.stderr + server.log()[-3000:]
    code, _, stderr = cancelled_run(server, args("resumed"), f"ControlNeXt training: step 2/{RESUMED_RUN}")
    assert code == 0, stderr + server.log()[-3000:]
    checkpoints = os.listdir(os.path.join(server.base, "models", "controlnext", "resumed", "checkpoints"))
    stopped = max(int(name.split("-")[1]) for name in checkpoints)
    assert 2 <= stopped < RESUMED_RUN, checkpoints
    resumed = queue_command(*args("resumed", "--set", "Train ControlNeXt SVD.resume=latest"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr + server.log()[-3000:]
    assert "Resumed" in server.log()
    expected, actual = release_tensors(server, "straight"), release_tensors(server, "resumed")
    assert expected.keys() == actual.keys()
    assert all(np.array_equal(actual[key], value) for key, value in expected.items())
