"""A real ComfyUI server for tests: started headless on 127.0.0.1 with a temporary base
directory holding this pack (and the test helper nodes), driven through its HTTP API."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from conftest import COMFYUI_PATH, PACK_ROOT

PACK_LINK_NAME = "ComfyUI-ControlNeXt"
TEST_NODES = os.path.join(PACK_ROOT, "tests", "server_nodes")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_base_directory(base: str, with_test_nodes: bool = True) -> str:
    custom_nodes = os.path.join(base, "custom_nodes")
    os.makedirs(custom_nodes, exist_ok=True)
    os.symlink(PACK_ROOT, os.path.join(custom_nodes, PACK_LINK_NAME))
    if with_test_nodes:
        os.symlink(TEST_NODES, os.path.join(custom_nodes, "controlnext_test_nodes"))
    for folder in ("models/controlnext", "models/controlnet", "models/dwpose", "models/depth_estimation", "input",
                   "output"):
        os.makedirs(os.path.join(base, folder), exist_ok=True)
    return base


def comfy_command(base: str, *extra: str) -> list[str]:
    return [sys.executable, "main.py", "--cpu", "--disable-auto-launch", "--base-directory", base,
            "--database-url", "sqlite:///:memory:", *extra]


def queue_command(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The queue command as a user runs it; ``-S`` (no site-packages) proves it needs only the stdlib."""
    return subprocess.run([sys.executable, "-S", "-m", "controlnext_queue", *args], cwd=PACK_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def one_thread_env() -> dict[str, str]:
    """The tiny test models run fastest on one thread; more only contend on a 2-core CI box."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def read_log(path: str) -> str:
    with open(path, errors="replace") as file:
        return ANSI.sub("", file.read())


class ComfyServer:
    def __init__(self, base: str):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "server.log")
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "ComfyServer":
        log = open(self.log_path, "w")
        # unbuffered: tests that wait for a log line see it when it is written
        self.process = subprocess.Popen(comfy_command(self.base, "--listen", "127.0.0.1", "--port", str(self.port)),
                                        cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT,
                                        env={**one_thread_env(), "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                self.get("/object_info/KSampler")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def wait_until_idle(self, timeout: float = 60.0) -> None:
        """Until nothing runs or waits in the queue (after an interrupted or abandoned prompt)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.get("/queue")
            if not state["queue_running"] and not state["queue_pending"]:
                return
            time.sleep(0.2)
        raise AssertionError(f"the server did not become idle within {timeout} s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue an API-format graph and wait for its history entry."""
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise AssertionError(f"/prompt answered {status}: {answer}")
        prompt_id = answer["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log()[-3000:]}")


def execution_error(entry: dict) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return data.get("exception_message", "")
    return ""


# Official file names the workflows in workflows/ use, with what a tiny stand-in is: the
# ControlNeXt files and the ordinary ControlNet are real files of those names (random weights,
# the official key layout, sized for tiny_unet's UNets); only the base checkpoints are swapped
# for the ControlNeXtTestTinyCheckpoint node (see runnable_on_tiny_models).
CONTROLNEXT_FILES = {
    "ControlNeXt-SD1.5/vidit_depth/controlnet.safetensors": "mid",
    "ControlAny-SDXL/anime_canny/controlnet.safetensors": "base",
    "ControlAny-SDXL/vidit_depth/controlnet.safetensors": "base",
    "ControlNeXt-SD1.5/deepfashoin_mask/controlnet.safetensors": "mid",  # sic: the official folder name
    "ControlNeXt-SVD-v2/controlnet.bin": "base",  # the release's torch pickle
}
SDXL_UNET_DELTAS = "ControlAny-SDXL/anime_canny/unet.safetensors"
SD15_UNET_SUBSET = "ControlNeXt-SD1.5/deepfashoin_mask/unet.safetensors"
SVD_UNET = "ControlNeXt-SVD-v2/unet.bin"
DEPTH_MODEL = "Depth-Anything-V2-Small-hf"  # a tiny random Depth Anything under the official folder name
ORDINARY_CONTROLNET = "control_v11p_sd15_canny.pth"
CHECKPOINT_LOADERS = {"CheckpointLoaderSimple": "ControlNeXtTestTinyCheckpoint",
                      "ImageOnlyCheckpointLoader": "ControlNeXtTestTinyImageOnlyCheckpoint"}
# DWPose models in models/dwpose: TorchScript stand-ins (the workflows name the ONNX files, which
# need onnxruntime or OpenCV's DNN to write; the tests set these names with --set). The detector
# always finds one person and the pose model puts every keypoint at a fixed place in the crop.
DWPOSE_FILES = {"detector_model": "yolox_l.torchscript.pt", "pose_model": "dw-ll_ucoco_384_bs5.torchscript.pt"}
# The top-level module names of a diffusers UNet state dict.
DIFFUSERS_ROOTS = {"conv_in", "conv_out", "conv_norm_out", "time_embedding", "add_embedding", "down_blocks",
                   "mid_block", "up_blocks"}


def install_official_model_files(base: str, ordinary_controlnet: bool = True) -> None:
    """Writes tiny random-weight files under the official names into ``base``/models (the
    ordinary ControlNet is the one big file, 300 MB: only for the stacked workflow)."""
    import safetensors.torch
    import torch

    from controlnext_testbed.official_layouts import random_encoder_state_dict
    from controlnext_testbed.tiny_preprocessors import tiny_depth_anything

    controlnext = os.path.join(base, "models", "controlnext")
    for name, layout in CONTROLNEXT_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(controlnext, name)), exist_ok=True)
        if name.endswith(".bin"):
            torch.save(random_encoder_state_dict(layout), os.path.join(controlnext, name))
        else:
            safetensors.torch.save_file(random_encoder_state_dict(layout), os.path.join(controlnext, name))
    safetensors.torch.save_file(tiny_release_unet("sdxl", is_attention_output, deltas=True, change=0.02),
                                os.path.join(controlnext, SDXL_UNET_DELTAS))
    safetensors.torch.save_file(tiny_release_unet("sd15", is_attention_output),
                                os.path.join(controlnext, SD15_UNET_SUBSET))
    torch.save(tiny_release_unet("svd"), os.path.join(controlnext, SVD_UNET))
    install_dwpose_models(os.path.join(base, "models", "dwpose"))
    tiny_depth_anything(os.path.join(base, "models", "depth_estimation", DEPTH_MODEL))
    if ordinary_controlnet:
        torch.save(tiny_ordinary_controlnet(), os.path.join(base, "models", "controlnet", ORDINARY_CONTROLNET))


def is_attention_output(name: str) -> bool:
    """The weights the SDXL and SD1.5 releases' UNet files hold: attention output projections."""
    return "to_out" in name


def tiny_release_unet(family: str, keep=None, deltas: bool = False, change: float = 0.01) -> dict:
    """A release's UNet file for the test checkpoint's tiny UNet of ``family``, in diffusers names:
    its own weights slightly changed, all of them (SVD-v2's unet.bin, a whole UNet) or those
    ``keep`` selects (SD1.5 releases: a subset); or only the changes (SDXL releases: deltas)."""
    import torch

    import host
    from server_nodes.tiny_checkpoint import tiny_unet

    unet_keys = host.importlib.import_module(f"{host.PACK_NAME}.nodes.unet_keys")
    model = tiny_unet(family)
    state = model.model_state_dict(filter_prefix="diffusion_model.")
    names = {name: key for name, key in unet_keys.unet_key_map(model).items()
             if name.split(".")[0] in DIFFUSERS_ROOTS and key in state}  # the map also names absent layers
    assert sorted(names.values()) == sorted(state), f"the diffusers map does not cover the tiny {family} UNet"
    if keep is not None:
        names = {name: key for name, key in names.items() if keep(name)}
    generator = torch.Generator().manual_seed(7)
    return {name: (0.0 if deltas else state[key]) + change * torch.randn(state[key].shape, generator=generator)
            for name, key in names.items()}


def install_dwpose_models(folder: str) -> None:
    import torch

    from controlnext_testbed.tiny_preprocessors import PlantedDetector, PlantedPose, save_torchscript

    generator = torch.Generator().manual_seed(2)
    save_torchscript(PlantedDetector(320.0, 320.0, 240.0, 480.0), torch.zeros(1, 3, 640, 640),
                     os.path.join(folder, DWPOSE_FILES["detector_model"]))
    save_torchscript(PlantedPose(torch.randint(150, 420, (133,), generator=generator),
                                 torch.randint(150, 600, (133,), generator=generator)),
                     torch.zeros(5, 3, 384, 288), os.path.join(folder, DWPOSE_FILES["pose_model"]))


def tiny_ordinary_controlnet() -> dict:
    """An SD1.5 ControlNet 1.1 style .pth (keys under "control_model.") with tiny_unet's SD1.5
    layout, so ComfyUI's own ControlNet loader reads it and its outputs fit that UNet."""
    import torch

    import comfy.cldm.cldm
    from controlnext_testbed.tiny_unet import UNET_CONFIGS

    config = {k: v for k, v in UNET_CONFIGS["sd15"].items() if k not in ("out_channels", "transformer_depth_output")}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, num_head_channels=64, device="meta", **config)
    generator = torch.Generator().manual_seed(6)
    state = {}
    for name, param in control.state_dict().items():
        value = torch.empty(param.shape, dtype=torch.float16)
        if param.ndim >= 2:
            value.normal_(0.0, 1.0 / max(1, param[0].numel()) ** 0.5, generator=generator)
        else:
            value.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=generator)
        state[f"control_model.{name}"] = value
    return state


TRAINING_PICTURES = "controlnext_training"  # the folder in input/ the training templates read


def install_training_pictures(folder: str, count: int = 3) -> None:
    """Pictures of a bright block on a dark ground, one with a caption file beside it."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        picture = np.full((80, 96, 3), 30, np.uint8)
        picture[10 + 10 * index:50 + 10 * index, 20:60] = (220, 180, 40)
        Image.fromarray(picture).save(os.path.join(folder, f"picture_{index}.png"))
    with open(os.path.join(folder, "picture_0.txt"), "w", encoding="utf-8") as file:
        file.write("a yellow block on a dark ground")


def runnable_on_tiny_models(prompt: dict) -> dict:
    """The one test-time substitution: checkpoint loaders become the tiny-checkpoint test node,
    with the same inputs. Every other node, input and file name is the workflow's own."""
    return {node_id: dict(node, class_type=CHECKPOINT_LOADERS.get(node["class_type"], node["class_type"]))
            for node_id, node in prompt.items()}
