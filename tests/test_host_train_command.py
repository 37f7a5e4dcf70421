"""The headless training command (python -m controlnext_train) on a real ComfyUI used as a library:
an SD1.5 checkpoint file written by ComfyUI's own saver, a folder of pairs, one process, and two
processes started by torchrun and by ``accelerate launch`` (gloo on the CPU).

Every run has one thread per process (OMP_NUM_THREADS=1, as torchrun sets it), so one process with
two micro-batches of 2 sums its gradients in the same order as two processes with a batch of 2 each:
the releases are compared bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

import host
from host import models_folder  # noqa: F401 (a fixture)
from conftest import COMFYUI_PATH, PACK_ROOT
from server import free_port
from train_command_fixtures import write_pairs, write_sd15_checkpoint

pytestmark = pytest.mark.slow
STEPS, KILLED_AFTER = 8, 5
SETTINGS = ["--resolution", "64", "--max_train_steps", str(STEPS), "--checkpointing_steps", "2", "--optimizer",
            "adamw", "--learning_rate", "1e-3", "--learning_rate_controlnet", "1e-3", "--controlnext_scale", "0.5"]
RUN_LIMIT_S = 300


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_command")
    write_sd15_checkpoint(str(folder / "sd15.safetensors"))
    write_pairs(str(folder / "pairs"), 8)
    return folder


def command(world, output: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(world / "sd15.safetensors"), "--train_data_dir",
            str(world / "pairs"), "--output_dir", str(world / output), *SETTINGS, *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "COMFYUI_PATH": COMFYUI_PATH, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launcher(kind: str) -> list[str]:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if kind == "accelerate":  # its multi-GPU launcher; on a machine without GPUs the command trains on the CPU
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(free_port())]  # not its fixed default: two runs at once (CI's two hosts) would share it
    return [sys.executable]


def run(args: list[str], kind: str = "one") -> subprocess.CompletedProcess:
    return subprocess.run([*launcher(kind), "-m", "controlnext_train", *args], cwd=PACK_ROOT, env=environment(),
                          capture_output=True, text=True, timeout=RUN_LIMIT_S)


def trained(output, steps: int = STEPS) -> dict:
    """The release files and the loss history of the last checkpoint (at ``steps``)."""
    weights = {name: safetensors.torch.load_file(str(output / f"{name}.safetensors")) for name in ("controlnet", "unet")}
    with open(output / "checkpoints" / f"step-{steps}" / "state.json") as file:
        return {"weights": weights, "losses": json.load(file)["losses"]}


def identical(a: dict, b: dict) -> bool:
    return a["losses"] == b["losses"] and all(
        set(a["weights"][name]) == set(b["weights"][name])
        and all(bool((a["weights"][name][key] == b["weights"][name][key]).all()) for key in a["weights"][name])
        for name in a["weights"])


@pytest.fixture(scope="module")
def one_process(world):
    """One process, two micro-batches of 2 (the global batch of two processes with a batch of 2)."""
    result = run(command(world, "one", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                         "--validation_image", str(world / "pairs" / "conditioning_images" / "000.png"),
                         "--validation_prompt", "a square", "--validation_steps", "4", "--progress_lines"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_one_process_trains_from_a_folder_and_its_release_loads_in_load_controlnext(world, one_process, models_folder):
    output = world / "one"
    assert [line for line in one_process.stdout.splitlines() if line.startswith("step ")][-1].startswith(
        f"step {STEPS}/{STEPS} loss ")
    assert f"Saved {output / 'controlnet.safetensors'}, {output / 'unet.safetensors'}" in one_process.stdout
    assert sorted(os.listdir(output / "checkpoints")) == ["step-4", "step-6", "step-8"]  # the last 3 kept
    assert sorted(os.listdir(output / "validation")) == ["step-000000_0.png", "step-000004_0.png",
                                                        "step-000008_0.png", "strip.png"]
    assert "Encoded 8 of 8 pairs into the cache" in one_process.stderr
    release = models_folder / "trained"
    release.mkdir()
    for name in ("controlnet.safetensors", "unet.safetensors"):
        (release / name).write_bytes((output / name).read_bytes())
    file, _ = host.loaders.LoadControlNeXt.execute("trained/controlnet.safetensors").args
    assert file.encoder.control_scale == 0.5 and file.metadata["base_model"] == "sd15.safetensors"
    saved = trained(output)["weights"]["controlnet"]
    assert all(bool((tensor == saved[name]).all()) for name, tensor in file.encoder.state_dict().items()
               if name in saved)


@pytest.fixture(scope="module")
def torchrun_result(world, one_process):
    result = run(command(world, "torchrun", "--train_batch_size", "2"), "torchrun")
    assert result.returncode == 0, result.stderr[-3000:]
    return trained(world / "torchrun")


def test_two_processes_under_torchrun_make_the_one_process_run_bit_for_bit(world, torchrun_result):
    assert identical(torchrun_result, trained(world / "one"))
    assert len(torchrun_result["losses"]) == STEPS


def test_two_processes_under_accelerate_launch_make_the_same_run(world, torchrun_result):
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    result = run(command(world, "accelerate", "--train_batch_size", "2"), "accelerate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert identical(trained(world / "accelerate"), torchrun_result)


def test_a_killed_process_ends_the_other_with_a_clear_error_and_the_resume_completes_the_run(world, torchrun_result):
    args = command(world, "killed", "--train_batch_size", "2", "--progress_lines")
    log = world / "killed.log"
    with open(log, "w") as stderr_file:
        process = subprocess.Popen([*launcher("torchrun"), "-m", "controlnext_train", *args], cwd=PACK_ROOT,
                                   env=environment(), stdout=subprocess.PIPE, stderr=stderr_file, text=True,
                                   start_new_session=True)
    try:
        for line in process.stdout:
            if line.startswith(f"step {KILLED_AFTER}/"):
                break
        workers = subprocess.run(["ps", "-ww", "--ppid", str(process.pid), "-o", "pid=,args="], capture_output=True,
                                 text=True).stdout.splitlines()
        rank_1 = sorted(int(line.split()[0]) for line in workers if "controlnext_train" in line)[1]
        killed_at = time.monotonic()
        os.kill(rank_1, signal.SIGKILL)
        process.communicate(timeout=120)
        ended_in = time.monotonic() - killed_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert process.returncode != 0 and ended_in < 60
    checkpoints = world / "killed" / "checkpoints"
    assert re.search(r"controlnext-train: error: Process 0 of 2: (a sum over the processes|the check for a stop) "
                     r"failed because another process of this run ended", stderr), stderr[-3000:]
    assert (f"The last checkpoint is {checkpoints / 'step-4'}: run the same command with --resume_from_checkpoint "
            f"latest to continue.") in stderr
    assert sorted(os.listdir(checkpoints)) == ["step-2", "step-4"]  # whole checkpoints only, nothing half-written
    resumed = run([*args, "--resume_from_checkpoint", "latest"], "torchrun")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed {checkpoints / 'step-4'} at step 4" in resumed.stderr
    assert identical(trained(world / "killed"), torchrun_result)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_release(world):
    args = command(world, "interrupted", "--train_batch_size", "2", "--progress_lines", "--max_train_steps", "40")
    process = subprocess.Popen([sys.executable, "-m", "controlnext_train", *args], cwd=PACK_ROOT, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGINT)
            break
    stdout, stderr = process.communicate(timeout=RUN_LIMIT_S)
    assert process.returncode == 0, stderr[-3000:]
    stopped_at = int(stderr.split("Cancelled after ")[1].split(" ")[0])
    assert 3 <= stopped_at < 40
    assert f"Checkpoint: {world / 'interrupted' / 'checkpoints' / f'step-{stopped_at}'}" in stderr
    assert "Saved" in stdout and (world / "interrupted" / "controlnet.safetensors").is_file()


def test_bad_input_gets_a_clear_error(world, tmp_path):
    def error(args: list[str], kind: str = "one") -> str:
        result = run(args, kind)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        return result.stderr.strip().splitlines()[-1]

    assert "unrecognized arguments: --learning-rate-unet" in error(["--learning-rate-unet", "1"])
    assert "the following arguments are required: --pretrained_model_name_or_path, --train_data_dir, --output_dir" in (
        error([]))
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"train_batch_size": 2, "learnig_rate": 1e-4}))
    assert "names unknown options: learnig_rate" in error(command(world, "bad", "--config_file", str(config)))
    not_a_model = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(not_a_model))
    assert ("is not a checkpoint ComfyUI can load" in error([*command(world, "bad"), "--pretrained_model_name_or_path",
                                                             str(not_a_model)]))
    assert "does not exist or is not a folder" in error([*command(world, "bad"), "--train_data_dir",
                                                         str(tmp_path / "missing")])
    assert "already has checkpoints of a run: add --resume_from_checkpoint latest" in error(command(world, "one"))
