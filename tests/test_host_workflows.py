"""Host tests: the workflows in workflows/ and the queue command, against a real ComfyUI server.

The workflows run as shipped but for one substitution, documented in tests/server.py
(``runnable_on_tiny_models``): the checkpoint loaders become test nodes building tiny models with
ComfyUI's own classes, since ComfyUI only recognises full-size checkpoints. Every other node,
input and file name is the file's own; the ControlNeXt and ControlNet files are tiny random
ones under the official names, and the demo's toy base and ControlNeXt untrained ones under the
names python -m controlnext_demo installs (tests/test_host_demo.py runs trained ones). Image size
and steps are made small with the command's --set, which also points the DWPose nodes at
TorchScript stand-ins of the ONNX files the workflows name.
"""
from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

import host  # noqa: F401  (skips this module without a ComfyUI host; before the host's packages below)
import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
from PIL import Image  # noqa: E402
from conftest import PACK_ROOT  # noqa: E402
from controlnext_demo.cli import INSTALLED_BASE, INSTALLED_RELEASE  # noqa: E402
from controlnext_testbed import toy_shapes  # noqa: E402
from controlnext_testbed.official_layouts import random_encoder_state_dict  # noqa: E402
from train_command_fixtures import write_clips  # noqa: E402
from server import (CONTROLNEXT_FILES, DWPOSE_FILES, ORDINARY_CONTROLNET, PACK_LINK_NAME,  # noqa: E402
                    SD15_UNET_SUBSET, SDXL_UNET_DELTAS, SVD_UNET, TRAINING_PICTURES, ComfyServer,
                    install_official_model_files, install_training_pictures, make_base_directory, queue_command,
                    runnable_on_tiny_models)

pytestmark = [pytest.mark.server, pytest.mark.slow]

WORKFLOWS = os.path.join(PACK_ROOT, "workflows")
API_WORKFLOWS = os.path.join(WORKFLOWS, "api")
# Every workflow in workflows/ (UI format) and workflows/api/, with the titles of the Load Image
# nodes the shell run uploads an image to. A new workflow is one entry here.
WORKFLOW_IMAGES = {
    "ControlNeXt SD1.5 Depth": ("Photo",),
    "ControlNeXt SD1.5 Mask": ("Mask",),
    "ControlNeXt SDXL Canny": ("Photo",),
    "ControlNeXt SDXL Canny + UNet": ("Photo",),
    "ControlNeXt SD1.5 + ControlNet": ("Depth Map", "Photo"),
    "ControlNeXt SVD Pose Video": ("Reference", "Driving Video"),
    "ControlNeXt SVD Pose Fade Out": ("Reference", "Driving Video"),
    "ControlNeXt SDXL Canny + Depth": ("Photo",),
    "ControlNeXt SD1.5 Training": ("Test Photo",),
    "ControlNeXt SDXL Training": ("Test Photo",),
    "ControlNeXt SD1.5 Pairs Training": ("Validation Control",),
    "ControlNeXt SDXL Photos Training": ("Validation Photo",),
    "ControlNeXt SVD Pose Training": ("Reference", "Driving Video"),
    "ControlNeXt Toy Shapes Demo": ("Shapes Picture",),
}
DRIVING_FRAMES = 6


def settings(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


SMALL = settings("Empty Latent Image.width=64", "Empty Latent Image.height=64", "KSampler.steps=2")
SMALL_VIDEO = settings("Reference at Video Size.width=64", "Reference at Video Size.height=64",
                       "SVD_img2vid_Conditioning.width=64", "SVD_img2vid_Conditioning.height=64",
                       "BasicScheduler.steps=2", "ControlNeXt SVD Window Guider.window=4",
                       "ControlNeXt SVD Window Guider.overlap=2",
                       *(f"{node}.{name}={file}" for node in ("DWPose Reference", "DWPose Driving Video")
                         for name, file in DWPOSE_FILES.items()))
# Per workflow: the settings that make it small, its sampler's title and the frames it saves.
RUNS = {name: (SMALL, "KSampler", 1) for name in WORKFLOW_IMAGES}
for _video in ("ControlNeXt SVD Pose Video", "ControlNeXt SVD Pose Fade Out"):
    RUNS[_video] = (SMALL_VIDEO, "SamplerCustomAdvanced", DRIVING_FRAMES)
for _training in ("ControlNeXt SD1.5 Training", "ControlNeXt SDXL Training"):
    RUNS[_training] = (SMALL + settings("Training Pictures.resolution=64", "Train ControlNeXt.steps=2",
                                        "Train ControlNeXt.batch_size=2", "Save ControlNeXt.overwrite=true"),
                       "KSampler", 1)
# The templates training from a folder on disk (Load Training Data) save no picture of their own: their one saved
# file is the validation strip, a column per round (before the first step, every validation_every steps and after
# the last), and they write a checkpoint every step. Data title, validation size title, validation_every: the SD1.5
# stand-in samples its rounds slowly (20 steps, about 20 s on a CPU), so it has 2, SDXL 3.
DATA_TRAINING = {"ControlNeXt SD1.5 Pairs Training": ("Training Pairs", "Validation Control at Training Size", 2),
                 "ControlNeXt SDXL Photos Training": ("Training Photos", "Validation Photo at Training Size", 1)}
TRAINING_STEPS = 2
for _training, (_data, _validation, _every) in DATA_TRAINING.items():
    RUNS[_training] = (settings(f"{_data}.resolution=64", f"{_validation}.width=64", f"{_validation}.height=64",
                                f"Train ControlNeXt.steps={TRAINING_STEPS}", "Train ControlNeXt.batch_size=2",
                                f"Train ControlNeXt.validation_every={_every}", "Train ControlNeXt.checkpoint_every=1",
                                "Save ControlNeXt.overwrite=true"),
                       "Train ControlNeXt", 1)


# The SVD training template trains on the clips in input/ (2 steps of 3 frames, a checkpoint each; DWPose finds
# their hands first), saves the encoder and generates the driving video with it.
VIDEO_TRAINING, VIDEO_CLIPS = "ControlNeXt SVD Pose Training", "controlnext_clips"
RUNS[VIDEO_TRAINING] = (SMALL_VIDEO + settings(*(f"Train ControlNeXt SVD.{name}={value}" for name, value in (
    ("steps", TRAINING_STEPS), ("frames", 3), ("interval_frame", 1), ("width", 64), ("height", 64),
    ("checkpoint_every", 1), *DWPOSE_FILES.items())), "Save ControlNeXt.overwrite=true"), "SamplerCustomAdvanced",
    DRIVING_FRAMES)


def video_training_files() -> list[str]:
    """What the SVD training template writes besides its video: the clips' hands found by DWPose, a
    checkpoint per step with release files beside them, and Save ControlNeXt's release."""
    nodes = read_json(os.path.join(API_WORKFLOWS, f"{VIDEO_TRAINING}.json")).values()
    train = next(node["inputs"] for node in nodes if node["class_type"] == "ControlNeXtTrainSVD")
    save = next(node["inputs"] for node in nodes if node["class_type"] == "ControlNeXtSave")
    checkpoints = f"models/controlnext/{train['checkpoint_name']}"
    return [f"input/{VIDEO_CLIPS}/.controlnext_poses/clip0/hands.json",
            *(f"{checkpoints}/checkpoints/step-{step}/state.safetensors" for step in range(1, TRAINING_STEPS + 1)),
            f"{checkpoints}/controlnet.safetensors", f"{checkpoints}/unet.safetensors",
            f"models/controlnext/{save['name']}/controlnet.safetensors",
            f"models/controlnext/{save['name']}/unet.safetensors"]


def validation_rounds(name: str) -> range:
    """The steps at which a data training template's test run samples its validation control."""
    return range(0, TRAINING_STEPS + 1, DATA_TRAINING[name][2])


DEMO = "ControlNeXt Toy Shapes Demo"
RUNS[DEMO] = (settings("Without Control.steps=2", "With Control.steps=2"), "With Control", 1)
# (height, width) of the saved pictures: 64x64, but the demo's three panels side by side (2 px apart), 4x larger,
# and the validation strips' rounds side by side
SAVED_SIZES = ({name: (64, 64) for name in WORKFLOW_IMAGES} | {DEMO: (4 * 64, 4 * (3 * 64 + 2 * 2))}
               | {name: (64, len(validation_rounds(name)) * 64) for name in DATA_TRAINING})
DEMO_CONTROLNEXT = f"{INSTALLED_RELEASE}/controlnet.safetensors"
SAVE_NODES = ("SaveImage", "SaveAnimatedWEBP")
MODEL_INPUTS = ("ckpt_name", "controlnext_name", "unet_name", "control_net_name", "detector_model", "pose_model",
                "depth_model")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_directory(str(tmp_path_factory.mktemp("workflows_base")))
    install_official_model_files(base)
    install_training_pictures(os.path.join(base, "input", TRAINING_PICTURES))
    install_training_pairs(os.path.join(base, "input", TRAINING_PAIRS))
    install_training_pictures(os.path.join(base, "input", TRAINING_PHOTOS))  # photos only: their controls made by canny
    write_clips(os.path.join(base, "input", VIDEO_CLIPS), 2)
    install_untrained_demo_files(os.path.join(base, "models"))
    running = ComfyServer(base).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """A depth-like gradient, a mask of it, photo-like images of blocks and an animated WEBP of
    them, a picture of the demo's toy shapes and a square's edges, as files to upload."""
    folder = tmp_path_factory.mktemp("images")
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    depth = np.repeat(np.add.outer(ramp, ramp[::-1])[:, :, None] // 2, 3, axis=2).astype(np.uint8)
    rng = np.random.default_rng(0)
    blocks = [Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((64, 64), Image.NEAREST)
              for _ in range(1 + DRIVING_FRAMES)]
    paths = {"Depth Map": str(folder / "depth_in.png"), "Photo": str(folder / "photo_in.png"),
             "Reference": str(folder / "photo_in.png"), "Driving Video": str(folder / "dance.webp"),
             "Mask": str(folder / "mask_in.png"), "Test Photo": str(folder / "photo_in.png"),
             "Shapes Picture": str(folder / "shapes_in.png"), "Validation Photo": str(folder / "photo_in.png"),
             "Validation Control": str(folder / "outline_in.png")}
    Image.fromarray(depth).save(paths["Depth Map"])
    Image.fromarray(np.where(depth > 64, 255, 0).astype(np.uint8)).save(paths["Mask"])
    outline = np.zeros((64, 64, 3), np.uint8)  # a square's edges, as a canny map draws them
    outline[[16, 47], 16:48] = outline[16:48, [16, 47]] = 255
    Image.fromarray(outline).save(paths["Validation Control"])
    blocks[0].save(paths["Photo"])
    blocks[1].save(paths["Driving Video"], save_all=True, append_images=blocks[2:], duration=125, loop=0)
    shapes = toy_shapes.draw_pictures(1, seed=0)[0]
    Image.fromarray((shapes.numpy() * 255).round().astype(np.uint8)).save(paths["Shapes Picture"])
    return paths


TRAINING_PAIRS, TRAINING_PHOTOS = "controlnext_pairs", "controlnext_photos"  # the folders in input/ they read


def install_training_pairs(folder: str) -> None:
    """The training pictures, each with its control of the same name in conditioning_images/ (the
    outline of its block, as a canny map draws it): the "folders" layout."""
    install_training_pictures(folder)
    controls = os.path.join(folder, "conditioning_images")
    os.makedirs(controls)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png"):
            with Image.open(os.path.join(folder, name)) as picture:
                block = np.asarray(picture.convert("L")) > 100
            inside = np.roll(block, 1, 0) & np.roll(block, -1, 0) & np.roll(block, 1, 1) & np.roll(block, -1, 1)
            edges = block & ~inside
            Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB").save(os.path.join(controls, name))


def data_training_files(name: str) -> list[str]:
    """What a template training from a folder writes, relative to the server's base directory: the
    folder's cache, a checkpoint per step with release files beside them, every validation round's
    picture and Save ControlNeXt's release."""
    nodes = read_json(os.path.join(API_WORKFLOWS, f"{name}.json")).values()
    train = next(node["inputs"] for node in nodes if node["class_type"] == "ControlNeXtTrain")
    save = next(node["inputs"] for node in nodes if node["class_type"] == "ControlNeXtSave")
    data = next(node["inputs"] for node in nodes if node["class_type"] == "ControlNeXtLoadTrainingData")
    checkpoints = f"models/controlnext/{train['checkpoint_name']}"
    return [f"input/{data['folder']}/.controlnext_cache",
            *(f"{checkpoints}/checkpoints/step-{step}/state.safetensors" for step in range(1, TRAINING_STEPS + 1)),
            f"{checkpoints}/controlnet.safetensors", f"{checkpoints}/unet.safetensors",
            *(f"output/controlnext_validation/{train['checkpoint_name']}/step-{step:06d}_0.png"
              for step in validation_rounds(name)),
            f"models/controlnext/{save['name']}/controlnet.safetensors",
            f"models/controlnext/{save['name']}/unet.safetensors"]


def saved_subfolder(name: str) -> str:
    """Where the server saves the template's picture: its Save node's folder, or the validation
    strip's folder (output/controlnext_validation/<checkpoint_name>)."""
    nodes = read_json(os.path.join(API_WORKFLOWS, f"{name}.json")).values()
    prefix = next((n["inputs"]["filename_prefix"] for n in nodes if n["class_type"] in SAVE_NODES), None)
    if prefix is not None:
        return os.path.dirname(prefix)
    train = next(n["inputs"] for n in nodes if n["class_type"] == "ControlNeXtTrain")
    return f"controlnext_validation/{train['checkpoint_name']}"


def install_untrained_demo_files(models: str) -> None:
    """The demo's toy base and ControlNeXt as python -m controlnext_demo names them, untrained."""
    base = os.path.join(models, "checkpoints", INSTALLED_BASE)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    toy_shapes.save_checkpoint(base, toy_shapes.new_base(), toy_shapes.ShapeAutoencoder(), {})
    encoder = os.path.join(models, "controlnext", DEMO_CONTROLNEXT)
    os.makedirs(os.path.dirname(encoder), exist_ok=True)
    safetensors.torch.save_file(random_encoder_state_dict("base"), encoder)


def start_queue(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-S", "-m", "controlnext_queue", *args], cwd=PACK_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_json(path: str):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def runnable_copy(name: str, folder, edit=None) -> str:
    prompt = runnable_on_tiny_models(read_json(os.path.join(API_WORKFLOWS, f"{name}.json")))
    if edit:
        edit(prompt)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as file:
        json.dump(prompt, file)
    return path


def with_optional_defaults(prompt: dict, object_info: dict) -> dict:
    """Each node's class and inputs, optional inputs left out filled with their defaults: a file
    saved before a node gained an optional input means the same as one saved after."""
    nodes = {}
    for node_id, node in prompt.items():
        optional = object_info[node["class_type"]]["input"].get("optional", {})
        defaults = {name: spec[1]["default"] for name, spec in optional.items()
                    if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
        nodes[node_id] = (node["class_type"], {**defaults, **node["inputs"]})
    return nodes


def image_args(name: str, images: dict[str, str]) -> list[str]:
    return [arg for title in WORKFLOW_IMAGES[name] for arg in ("--image", f"{title}={images[title]}")]


def node_counters(stderr: str) -> list[tuple[int, int]]:
    """The ``[done/total]`` of each per-node progress line."""
    return [(int(done), int(total)) for done, total in re.findall(r"^\[(\d+)/(\d+)\] ", stderr, re.M)]


def test_every_workflow_has_both_formats_and_a_test_entry():
    ui = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(WORKFLOWS, "*.json"))}
    api = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(API_WORKFLOWS, "*.json"))}
    assert ui == api == set(WORKFLOW_IMAGES)


def test_ui_workflows_are_served_as_the_packs_templates(server):
    listed = server.get("/api/workflow_templates")
    assert sorted(listed[PACK_LINK_NAME]) == sorted(WORKFLOW_IMAGES)  # the api/ twins are not templates
    for name in WORKFLOW_IMAGES:
        assert server.get(f"/api/workflow_templates/{PACK_LINK_NAME}/{urllib.parse.quote(name)}.json") == \
            read_json(os.path.join(WORKFLOWS, f"{name}.json"))


@pytest.mark.parametrize("name", sorted(WORKFLOW_IMAGES))
def test_ui_workflow_nodes_exist_on_the_server_with_the_inputs_the_file_uses(server, name):
    object_info = server.get("/object_info")
    workflow = read_json(os.path.join(WORKFLOWS, f"{name}.json"))
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        assert node["type"] in object_info, f"{name}: node {node['id']} {node['type']} is not on the server"
        spec = object_info[node["type"]]["input"]
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                assert slot["name"] in declared, f"{name}: {node['type']} has no input {slot['name']}"


@pytest.mark.parametrize("name", sorted(WORKFLOW_IMAGES))
def test_ui_workflow_converts_to_its_api_twin(server, name, tmp_path):
    converted = tmp_path / "converted.json"
    result = queue_command(os.path.join(WORKFLOWS, f"{name}.json"), "--server", server.url, "--save-api", str(converted))
    assert result.returncode == 0, result.stderr
    api = read_json(os.path.join(API_WORKFLOWS, f"{name}.json"))
    ui_titles = {str(n["id"]): n.get("title") for n in read_json(os.path.join(WORKFLOWS, f"{name}.json"))["nodes"]}
    object_info = server.get("/object_info")
    assert with_optional_defaults(read_json(converted), object_info) == with_optional_defaults(api, object_info)
    for node_id, title in ui_titles.items():
        if title and node_id in api:  # default titles follow the server's display names
            assert api[node_id]["_meta"]["title"] == title


@pytest.mark.parametrize("name", sorted(WORKFLOW_IMAGES))
def test_notes_in_the_graph_say_where_each_model_file_goes(name):
    notes = " ".join(str(v) for n in read_json(os.path.join(WORKFLOWS, f"{name}.json"))["nodes"]
                     if n["type"] in ("Note", "MarkdownNote") for v in n.get("widgets_values", []))
    for node in read_json(os.path.join(API_WORKFLOWS, f"{name}.json")).values():
        for key in MODEL_INPUTS:
            if key in node["inputs"]:
                assert node["inputs"][key] in notes, f"no note names {node['inputs'][key]}"
    for folder in ("models/checkpoints", "models/controlnext"):
        assert folder in notes
    for key, folder in (("detector_model", "models/dwpose"), ("depth_model", "models/depth_estimation")):
        if any(key in node["inputs"] for node in read_json(os.path.join(API_WORKFLOWS, f"{name}.json")).values()):
            assert folder in notes


def test_official_file_names_are_the_ones_the_server_has():
    """The test base directory holds exactly the names the workflows use, so the runs below
    exercise the workflows' own file names."""
    used = {node["inputs"][key] for name in WORKFLOW_IMAGES
            for node in read_json(os.path.join(API_WORKFLOWS, f"{name}.json")).values()
            for key in ("controlnext_name", "unet_name", "control_net_name") if key in node["inputs"]}
    assert used == set(CONTROLNEXT_FILES) | {SDXL_UNET_DELTAS, SD15_UNET_SUBSET, SVD_UNET, ORDINARY_CONTROLNET,
                    DEMO_CONTROLNEXT}


@pytest.mark.parametrize("name", sorted(WORKFLOW_IMAGES))
def test_api_workflow_runs_from_the_shell(server, name, images, tmp_path):
    small, sampler, frames = RUNS[name]
    out = tmp_path / "out"
    result = queue_command(runnable_copy(name, tmp_path), "--server", server.url, "--out", str(out),
                   *image_args(name, images), *small)
    assert result.returncode == 0, result.stderr + server.log()[-2000:]
    saved = result.stdout.split()
    assert len(saved) == 1 and saved[0].startswith(str(out))
    with Image.open(saved[0]) as picture:
        assert getattr(picture, "n_frames", 1) == frames
        for frame in range(frames):
            picture.seek(frame)
            pixels = np.asarray(picture.convert("RGB"))
            assert pixels.shape == (*SAVED_SIZES[name], 3) and pixels.std() > 0
    for title in WORKFLOW_IMAGES[name]:
        assert f"'{title}'" in result.stderr and "uploaded" in result.stderr
    assert sampler in result.stderr and "2/2" in result.stderr  # the per-node progress bar
    done, total = node_counters(result.stderr)[-1]
    assert done == total, result.stderr  # cached nodes (from earlier runs) count
    assert os.path.relpath(saved[0], out).startswith(saved_subfolder(name))  # kept the server's subfolder
    written = data_training_files(name) if name in DATA_TRAINING else video_training_files() if (
        name == VIDEO_TRAINING) else []
    missing = [path for path in written if not os.path.exists(os.path.join(server.base, path))]
    assert not missing, f"not written: {missing}\n{result.stderr}"


def test_a_rerun_counts_its_cached_nodes_and_downloads_previews_on_request(server, images, tmp_path):
    """Both runs execute Apply ControlNeXt (a strength no other test uses), whose control image
    preview is in the history only when it runs (ComfyUI v0.33 leaves cached nodes' out); the
    second one finds the loaders, prompts and canny image in the server's cache."""
    name = "ControlNeXt SDXL Canny"
    path = runnable_copy(name, tmp_path)
    runs = [queue_command(path, "--server", server.url, "--out", str(tmp_path / f"out{index}"), *image_args(name, images),
                  *SMALL, *settings(f"KSampler.seed={11 + index}", f"Apply ControlNeXt.strength={strength}"), *extra)
            for index, (strength, extra) in enumerate(((0.31, ()), (0.32, ("--previews",))))]
    for result in runs:
        assert result.returncode == 0, result.stderr + server.log()[-2000:]
        done, total = node_counters(result.stderr)[-1]
        assert done == total, result.stderr
    assert "preview image(s) from node 7 'Apply ControlNeXt'" in runs[0].stderr and "--previews" in runs[0].stderr
    assert re.search(r"^\[\d+/\d+\] cached: Load Checkpoint \(1\)", runs[1].stderr, re.M), runs[1].stderr
    assert [line for line in runs[1].stderr.splitlines() if line.startswith("[")][-4:] == [
        f"[{total - 3}/{total}] Apply ControlNeXt (7)", f"[{total - 2}/{total}] KSampler (9)",
        f"[{total - 1}/{total}] VAE Decode (10)", f"[{total}/{total}] Save Image (11)"]
    previews = [path for path in runs[1].stdout.split() if path.startswith(str(tmp_path / "out1" / "previews"))]
    assert len(previews) == 1, runs[1].stdout
    with Image.open(previews[0]) as picture:
        assert picture.size == (64, 64)


def test_a_refused_workflow_lists_the_node_errors(server, images, tmp_path):
    name = "ControlNeXt SD1.5 Depth"
    result = queue_command(runnable_copy(name, tmp_path), "--server", server.url, "--out", str(tmp_path),
                   *image_args(name, images), "--set", "KSampler.steps=0", "--set", "Apply ControlNeXt.strength=-1")
    assert result.returncode == 4, result.stderr
    assert "'KSampler'" in result.stderr and "steps" in result.stderr
    assert "'Apply ControlNeXt'" in result.stderr and "strength" in result.stderr


def test_an_unknown_node_type_names_the_node_and_the_fix(server, images, tmp_path):
    def use_an_uninstalled_pack(prompt):
        prompt["6"]["class_type"] = "CannyEdgePreprocessor"  # comfyui_controlnet_aux, not installed here

    result = queue_command(runnable_copy("ControlNeXt SDXL Canny", tmp_path, use_an_uninstalled_pack), "--server",
                   server.url, "--out", str(tmp_path))
    assert result.returncode == 5, result.stderr
    assert "CannyEdgePreprocessor" in result.stderr and "Install the custom node pack" in result.stderr


def test_a_missing_model_file_says_which_and_where(server, images, tmp_path):
    missing = "ControlNeXt-SD1.5/deepfashion_caption/controlnet.safetensors"
    result = queue_command(runnable_copy("ControlNeXt SDXL Canny", tmp_path), "--server", server.url, "--out",
                   str(tmp_path), *image_args("ControlNeXt SDXL Canny", images),
                   "--set", f"Load ControlNeXt.controlnext_name={missing}")
    assert result.returncode == 6, result.stderr
    assert missing in result.stderr and "ComfyUI/models/controlnext/" in result.stderr


@pytest.mark.parametrize("name, assignments, folder, missing", [
    ("ControlNeXt SVD Pose Video", (), "ComfyUI/models/dwpose/", ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")),
    ("ControlNeXt SD1.5 Depth", ("ControlNeXtDepth.depth_model=Depth-Anything-V2-Large-hf",),
     "ComfyUI/models/depth_estimation/", ("Depth-Anything-V2-Large-hf",)),
])
def test_a_missing_preprocessor_model_says_which_and_where(server, images, tmp_path, name, assignments, folder,
                                                           missing):
    """The server has TorchScript stand-ins in models/dwpose, not the ONNX files the pose workflow
    names, and a depth model under another name than the one set here."""
    result = queue_command(runnable_copy(name, tmp_path), "--server", server.url, "--out", str(tmp_path),
                   *image_args(name, images), *settings(*assignments))
    assert result.returncode == 6, result.stderr
    for file in missing:
        assert f"'{file}' is not installed" in result.stderr
    assert folder in result.stderr and ("yzd-v/DWPose" if "dwpose" in folder else "config.json") in result.stderr


def test_a_failing_node_gives_its_message(server, images, tmp_path):
    sd15_file = next(name for name, layout in CONTROLNEXT_FILES.items() if layout == "mid")
    result = queue_command(runnable_copy("ControlNeXt SDXL Canny", tmp_path), "--server", server.url, "--out",
                   str(tmp_path), *image_args("ControlNeXt SDXL Canny", images), *SMALL,
                   "--set", f"Load ControlNeXt.controlnext_name={sd15_file}")
    assert result.returncode == 7, result.stderr
    assert "'Apply ControlNeXt'" in result.stderr and "cannot serve a SDXL model" in result.stderr
    assert "Traceback" not in result.stderr


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 60) -> list[str]:
    """Reads the command's stderr until a line contains ``text``."""
    lines = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no line with {text!r} in:\n{''.join(lines)}")


def test_an_interrupted_prompt_says_so(server, images, tmp_path):
    name = "ControlNeXt SD1.5 Depth"
    process = start_queue(runnable_copy(name, tmp_path), "--server", server.url, "--out", str(tmp_path),
                          *image_args(name, images), *SMALL, "--set", "KSampler.steps=10000")
    try:
        wait_for_line(process, "KSampler")
        assert server.post("/interrupt", {})[0] == 200
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 8, stderr
    assert "interrupted" in stderr and "'KSampler'" in stderr
    server.wait_until_idle()


class DroppingProxy:
    """Forwards a local port to the server until ``drop()``, which cuts every connection and
    stops listening: to the client, the server went away."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def drop(self):
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_a_dropped_connection_is_reported(server, images, tmp_path):
    name = "ControlNeXt SD1.5 Depth"
    proxy = DroppingProxy(server.port)
    process = start_queue(runnable_copy(name, tmp_path), "--server", f"http://127.0.0.1:{proxy.port}", "--out",
                          str(tmp_path), *image_args(name, images), *SMALL, "--set", "KSampler.steps=10000")
    try:
        wait_for_line(process, "KSampler")
        proxy.drop()
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        server.post("/interrupt", {})
    assert process.returncode == 9, stderr
    assert "lost the connection" in stderr
    server.wait_until_idle()


def test_an_unreachable_server_and_a_bad_argument_have_their_own_codes(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    path = os.path.join(API_WORKFLOWS, "ControlNeXt SD1.5 Depth.json")
    result = queue_command(path, "--server", f"http://127.0.0.1:{closed_port}", "--out", str(tmp_path), timeout=30)
    assert result.returncode == 3 and "cannot reach ComfyUI" in result.stderr
    result = queue_command(path, "--out", str(tmp_path), "--set", "steps=20", timeout=30)
    assert result.returncode == 2 and "NODE.input=value" in result.stderr
