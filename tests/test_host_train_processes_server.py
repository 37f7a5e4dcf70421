"""Host tests: Train ControlNeXt (several GPUs) on a real ComfyUI server. The node starts the headless
command under torchrun (two processes; on this machine's CPU), shows its result, and a real
POST /interrupt stops the processes after their step with a checkpoint and the release written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

import host  # noqa: F401  (skips this module without a ComfyUI host)
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from server import ComfyServer, execution_error, make_base_directory  # noqa: E402
from train_command_fixtures import write_pairs, write_sd15_checkpoint  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_directory(str(tmp_path_factory.mktemp("train_processes_base")))
    os.makedirs(os.path.join(base, "models", "checkpoints"), exist_ok=True)
    write_sd15_checkpoint(os.path.join(base, "models", "checkpoints", "sd15.safetensors"))
    safetensors.torch.save_file({"weight": torch.zeros(2)}, os.path.join(base, "models", "checkpoints", "weights.safetensors"))
    write_pairs(os.path.join(base, "input", "pairs"), 8)
    shutil.copy(os.path.join(base, "input", "pairs", "conditioning_images", "000.png"),
                os.path.join(base, "input", "control.png"))
    running = ComfyServer(base).start()
    yield running
    running.stop()


def graph(name: str, steps: int, ckpt_name: str = "sd15.safetensors", **train) -> dict:
    return {
        "1": {"class_type": "ControlNeXtLoadTrainingData",
              "inputs": {"folder": "pairs", "layout": "auto", "resolution": 64, "control_folder": "conditioning_images",
                         "caption_extension": ".txt", "default_caption": "", "make_controls": "none",
                         "image_column": "image", "conditioning_image_column": "conditioning_image",
                         "caption_column": "text"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "control.png"}},
        "3": {"class_type": "ControlNeXtTrainProcesses",
              "inputs": {"ckpt_name": ckpt_name, "data": ["1", 0], "name": name, "processes": 2, "gpus": "",
                         "steps": steps, "batch_size": 2, "gradient_accumulation_steps": 1, "optimizer": "adamw",
                         "encoder_lr": 1e-3, "unet_lr": 1e-3, "warmup_steps": 0, "train_unet": "official subset",
                         "control_scale": 0.5, "proportion_empty_prompts": 0.0, "seed": 0,
                         "gradient_checkpointing": False, "precision": "auto", "checkpoint_every": 2, "resume": "no",
                         **train}},
    }


def node_text(entry: dict) -> str:
    return entry["outputs"]["3"]["controlnext_info"][0]


def test_the_node_trains_on_two_processes_and_shows_the_run(server):
    entry = server.run(graph("launched", 4, validation_images=["2", 0], validation_prompt="a square",
                             validation_every=2), timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    release = os.path.join(server.base, "models", "controlnext", "launched")
    assert "Trained 4 steps." in node_text(entry) and os.path.join(release, "train.log") in node_text(entry)
    assert sorted(os.listdir(os.path.join(release, "checkpoints"))) == ["step-2", "step-4"]
    assert os.path.isfile(os.path.join(release, "controlnet.safetensors"))
    assert entry["outputs"]["3"]["images"] == [{"filename": "strip.png", "type": "output",
                                                "subfolder": "controlnext_validation/launched"}]
    assert "[0/2]" in open(os.path.join(release, "train.log")).read()  # the first of two processes


def test_a_real_interrupt_stops_the_processes_with_a_checkpoint(server):
    release = os.path.join(server.base, "models", "controlnext", "interrupted")
    status, answer = server.post("/prompt", {"prompt": graph("interrupted", 400), "client_id": server.client_id})
    assert status == 200, answer
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(release, "checkpoints", "step-2")):
        assert time.time() < deadline, server.log()[-3000:]
        time.sleep(0.5)
    interrupted_at = time.monotonic()
    assert server.post("/interrupt", {})[0] == 200
    deadline = time.time() + 300
    while answer["prompt_id"] not in server.get(f"/history/{answer['prompt_id']}"):
        assert time.time() < deadline, server.log()[-3000:]
        time.sleep(0.5)
    stopped_in = time.monotonic() - interrupted_at
    entry = server.get(f"/history/{answer['prompt_id']}")[answer["prompt_id"]]
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = node_text(entry)
    stopped_at = int(text.split("Cancelled after ")[1].split(" ")[0])
    assert 2 <= stopped_at < 400 and f"Checkpoint: {os.path.join(release, 'checkpoints', f'step-{stopped_at}')}" in text
    assert os.path.isfile(os.path.join(release, "controlnet.safetensors")) and stopped_in < 120
    left = subprocess.run(["pgrep", "-f", "controlnext_train"], capture_output=True, text=True).stdout.split()
    assert not left, "training processes were left running"


def test_a_run_that_fails_shows_the_commands_own_error_and_where_its_log_is(server):
    entry = server.run(graph("not_a_model", 4, ckpt_name="weights.safetensors"), timeout=300)
    assert entry["status"]["status_str"] == "error"
    message = execution_error(entry)
    release = os.path.join(server.base, "models", "controlnext", "not_a_model")
    assert "The training processes ended with exit code" in message and "is not a checkpoint ComfyUI can load" in message
    assert f"(the whole log: {os.path.join(release, 'train.log')})" in message
    os.makedirs(os.path.join(server.base, "models", "controlnext", "taken", "checkpoints", "step-2"))
    status, answer = server.post("/prompt", {"prompt": graph("taken", 4), "client_id": server.client_id})
    assert status == 400 and "already has checkpoints of a run" in json.dumps(answer)  # a new run into another's
