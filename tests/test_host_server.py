"""Host tests against a real ComfyUI server: the pack loads, its nodes are in /object_info with
tooltips, and SD1.5 / SDXL graphs queued over HTTP produce images (tiny random-weight models)."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

import host  # skips this module without a ComfyUI host
from controlnext_testbed.official_layouts import random_encoder_state_dict
from conftest import COMFYUI_PATH
from server import PACK_LINK_NAME, ComfyServer, comfy_command, execution_error, make_base_directory, read_log

import safetensors.torch
from PIL import Image

pytestmark = [pytest.mark.server, pytest.mark.slow]

OUR_NODES = ("ControlNeXtLoader", "ControlNeXtApply", "ControlNeXtUNetWeights")
ENCODERS = {"controlnext_sd15_mid.safetensors": "mid", "controlnext_sdxl_base.safetensors": "base"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_directory(str(tmp_path_factory.mktemp("comfy_base")))
    for name, layout in ENCODERS.items():
        safetensors.torch.save_file(random_encoder_state_dict(layout), os.path.join(base, "models", "controlnext", name))
    blocks = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(blocks).resize((64, 64), Image.NEAREST).save(os.path.join(base, "input", "control.png"))
    running = ComfyServer(base).start()
    yield running
    running.stop()


def test_pack_passes_quick_test_for_ci(tmp_path):
    base = make_base_directory(str(tmp_path), with_test_nodes=False)
    log_path = os.path.join(base, "quick.log")
    with open(log_path, "w") as log:
        result = subprocess.run(comfy_command(base, "--quick-test-for-ci"), cwd=COMFYUI_PATH, stdout=log,
                                stderr=subprocess.STDOUT, timeout=300)
    log = read_log(log_path)
    assert result.returncode == 0, log[-3000:]
    # --quick-test-for-ci exits 0 even when a pack failed: the log is the real check
    assert f"custom_nodes/{PACK_LINK_NAME}" in log
    failures = [line for line in log.splitlines() if PACK_LINK_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failures, "\n".join(failures)


def test_nodes_are_listed_with_tooltips(server):
    info = server.get("/object_info")
    for node in OUR_NODES:
        assert node in info, f"{node} missing from /object_info"
        entry = info[node]
        assert entry["category"] == "ControlNeXt"
        assert entry["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"
        for group in ("required", "optional"):
            for name, spec in entry["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    kind, options = info["ControlNeXtLoader"]["input"]["required"]["controlnext_name"][:2]
    assert options["options"] == sorted(ENCODERS)  # v0.33 says "COMBO" first, v0.3.64 the list itself
    assert kind in ("COMBO", sorted(ENCODERS))


def graph(family: str, encoder: str, route: str = "model", prefix: str = "controlnext") -> dict:
    prompt = {
        "1": {"class_type": "ControlNeXtTestTinyModel", "inputs": {"family": family}},
        "2": {"class_type": "ControlNeXtLoader", "inputs": {"controlnext_name": encoder}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "control.png"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["1", 1], "negative": ["1", 2],
                                                   "latent_image": ["5", 0]}},
        "7": {"class_type": "ControlNeXtTestLatentAsImage", "inputs": {"samples": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["7", 0]}},
    }
    if route == "model":
        prompt["4"] = {"class_type": "ControlNeXtApply", "inputs": {
            "model": ["1", 0], "controlnext": ["2", 0], "image": ["3", 0], "strength": 1.0,
            "start_percent": 0.0, "end_percent": 1.0}}
    else:
        prompt["9"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["1", 1], "negative": ["1", 2], "control_net": ["2", 1], "image": ["3", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        prompt["6"]["inputs"].update(model=["1", 0], positive=["9", 0], negative=["9", 1])
    return prompt


def saved_images(server, entry: dict) -> list[str]:
    files = [image["filename"] for output in entry["outputs"].values() for image in output.get("images", [])
             if image.get("type") == "output"]  # not Apply ControlNeXt's preview of its control image (temp/)
    return [os.path.join(server.base, "output", name) for name in files]


@pytest.mark.parametrize("family,encoder,route", [
    ("sd15", "controlnext_sd15_mid.safetensors", "model"),
    ("sdxl", "controlnext_sdxl_base.safetensors", "model"),
    ("sdxl", "controlnext_sdxl_base.safetensors", "control_net"),
])
def test_graphs_sample_an_image(server, family, encoder, route):
    entry = server.run(graph(family, encoder, route, prefix=f"{family}_{route}"))
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    (path,) = saved_images(server, entry)
    image = np.asarray(Image.open(path))
    assert image.shape == (8, 8, 3) and image.std() > 0


def test_wrong_family_shows_a_clear_message_on_the_node(server):
    entry = server.run(graph("sdxl", "controlnext_sd15_mid.safetensors", prefix="wrong"))
    assert entry["status"]["status_str"] == "error"
    message = execution_error(entry)
    assert "cannot serve a SDXL model; it serves SD1.5" in message
    assert "Traceback" not in message
