"""Preprocessor nodes in a real ComfyUI: schemas, model folders and lists, their models under
ComfyUI's model management, the nodes end to end on tiny models, canny on ComfyUI's example
photograph, and the depth path on a tiny random-weight Depth Anything (the real transformers
architecture) saved to a temp folder."""
from __future__ import annotations

import asyncio
import json
import os

import host
import comfy.model_management
import cv2
import folder_paths
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COMFYUI_PATH
from controlnext_testbed.tiny_preprocessors import PlantedPose, RandomDetector, save_torchscript, tiny_depth_anything

nodes = host.importlib.import_module(f"{host.PACK_NAME}.nodes.preprocessors")
pack_nodes = host.importlib.import_module(f"{host.PACK_NAME}.nodes")
canny_module = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.preprocess.canny")
depth_module = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.preprocess.depth")
ControlNeXtError = host.core.ControlNeXtError


def example_photo() -> np.ndarray:
    return np.array(Image.open(os.path.join(COMFYUI_PATH, "input", "example.png")).convert("RGB"))


@pytest.fixture
def model_folders(tmp_path, monkeypatch):
    """Empty models/dwpose and models/depth_estimation folders registered as the only ones."""
    dwpose, depth = tmp_path / "dwpose", tmp_path / "depth_estimation"
    dwpose.mkdir()
    depth.mkdir()
    paths = dict(folder_paths.folder_names_and_paths)
    paths[nodes.DWPOSE_FOLDER] = ([str(dwpose)], set())
    paths[nodes.DEPTH_FOLDER] = ([str(depth)], set())
    paths.pop("detection", None)
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", paths)
    nodes._torchscript_patcher.cache_clear()
    nodes._depth_model.cache_clear()
    return dwpose, depth


def install_tiny_dwpose(dwpose) -> tuple[str, str]:
    torch.manual_seed(0)
    save_torchscript(RandomDetector(), torch.rand(1, 3, 640, 640) * 255, dwpose / "yolox_l.torchscript.pt")
    generator = torch.Generator().manual_seed(2)
    save_torchscript(PlantedPose(torch.randint(150, 420, (133,), generator=generator),
                                 torch.randint(150, 600, (133,), generator=generator)),
                     torch.zeros(5, 3, 384, 288), dwpose / "dw-ll_ucoco_384_bs5.torchscript.pt")
    return "yolox_l.torchscript.pt", "dw-ll_ucoco_384_bs5.torchscript.pt"


def preprocessor_models() -> list:
    """The ModelPatchers of this pack's preprocessors in ComfyUI's loaded-model list."""
    return [patcher for patcher in comfy.model_management.loaded_models()
            if isinstance(patcher.model, nodes.ManagedModule)]


def combo(schema, name: str) -> dict:
    return next(item for item in schema.inputs if item.id == name).as_dict()


def test_every_node_is_listed_under_the_preprocessor_category_with_tooltips():
    node_list = asyncio.run(pack_nodes.comfy_entrypoint().get_node_list())
    for node in nodes.PREPROCESSOR_NODES:
        assert node in node_list
        schema = node.define_schema()
        assert schema.category == "ControlNeXt/preprocessors" and schema.description
        for item in schema.inputs:
            assert item.tooltip, f"{schema.node_id}.{item.id} has no tooltip"


def test_folders_are_registered_with_comfyui():
    assert nodes.DWPOSE_FOLDER in folder_paths.folder_names_and_paths
    assert nodes.DEPTH_FOLDER in folder_paths.folder_names_and_paths
    assert folder_paths.get_folder_paths(nodes.DWPOSE_FOLDER)[0].endswith(os.path.join("models", "dwpose"))


@pytest.mark.parametrize("size", [None, (333, 517)])
def test_canny_node_agrees_with_cv2_on_the_example_photograph(size):
    photo = example_photo()
    if size:
        photo = cv2.resize(photo, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    image = torch.from_numpy(photo).float()[None] / 255.0
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    for auto, low, high in ((True, 0, 0), (False, 60, 140)):
        result = nodes.ControlNeXtCanny.execute(image, auto, low, high, 0.0).result[0]
        if auto:
            median = np.median(gray)
            low, high = int(max(0, (1.0 - 0.33) * median)), int(min(255, (1.0 + 0.33) * median))
        reference = cv2.Canny(gray, low, high) > 0
        assert np.array_equal(result[0, ..., 0].numpy() > 0, reference)
        batched = canny_module.canny_batched(image, *((None, None) if auto else (low, high)))
        assert torch.equal(batched, result), "the GPU route gives the same edges (measured 100 %)"
        assert 0.002 < reference.mean() < 0.3, "a photograph: some edges, mostly not edges"


def test_a_fresh_models_folder_lists_no_dwpose_or_depth_model(model_folders):
    assert nodes.dwpose_files() == [] and nodes.depth_models() == []
    for node, names in ((nodes.ControlNeXtDWPose, ("detector_model", "pose_model")),
                        (nodes.ControlNeXtDepth, ("depth_model",))):
        for name in names:
            spec = combo(node.define_schema(), name)
            assert spec["options"] == [] and "default" not in spec, f"{name} lists what is not installed"


def test_installed_models_are_listed_with_the_official_name_as_default(model_folders):
    dwpose, depth = model_folders
    detector, pose = install_tiny_dwpose(dwpose)
    tiny_depth_anything(depth / nodes.DEFAULT_DEPTH_MODEL)
    assert nodes.dwpose_files() == sorted([detector, pose])
    schema = nodes.ControlNeXtDWPose.define_schema()
    assert combo(schema, "detector_model")["default"] == detector and combo(schema, "pose_model")["default"] == pose
    assert combo(nodes.ControlNeXtDepth.define_schema(), "depth_model")["default"] == nodes.DEFAULT_DEPTH_MODEL


def test_dwpose_node_names_the_missing_files_and_folder(model_folders):
    dwpose, _ = model_folders
    with pytest.raises(ControlNeXtError) as error:
        nodes.ControlNeXtDWPose.execute(torch.rand(1, 32, 32, 3), "yolox_l.onnx", "dw-ll_ucoco_384.onnx", True, True,
                                        True)
    message = str(error.value)
    for needed in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx", str(dwpose), "models/dwpose", "extra_model_paths.yaml"):
        assert needed in message


def test_dwpose_node_runs_on_tiny_models_and_its_keypoints_redraw_identically(model_folders):
    dwpose, _ = model_folders
    detector, pose = install_tiny_dwpose(dwpose)
    frames = torch.rand(3, 96, 80, 3)
    drawn, keypoints = nodes.ControlNeXtDWPose.execute(frames, detector, pose, True, True, True).result
    assert drawn.shape == (3, 96, 80, 3) and 0.0 <= drawn.min() and drawn.max() <= 1.0 and drawn.max() > 0
    assert len(keypoints) == 3 and keypoints[0]["canvas_width"] == 80
    json.dumps(keypoints)  # plain JSON, as other packs expect
    redrawn = nodes.ControlNeXtDrawPose.execute(keypoints, 0, 0, True, True, True).result[0]
    assert torch.equal(redrawn, drawn)
    resized = nodes.ControlNeXtDrawPose.execute(json.dumps(keypoints), 64, 48, True, False, False).result[0]
    assert resized.shape == (3, 48, 64, 3)


def test_depth_node_runs_a_tiny_depth_anything_from_the_models_folder(model_folders):
    _, depth = model_folders
    with pytest.raises(ControlNeXtError, match="depth-anything/Depth-Anything-V2-Small-hf"):
        nodes.ControlNeXtDepth.execute(torch.rand(1, 32, 32, 3), nodes.DEFAULT_DEPTH_MODEL, "viridis", "batch")
    tiny_depth_anything(depth / "tiny-depth-anything")
    assert nodes.depth_models() == ["tiny-depth-anything"]
    frames = torch.rand(3, 70, 45, 3)
    viridis = nodes.ControlNeXtDepth.execute(frames, "tiny-depth-anything", "viridis", "batch").result[0]
    grey = nodes.ControlNeXtDepth.execute(frames, "tiny-depth-anything", "grayscale", "per_frame").result[0]
    assert viridis.shape == grey.shape == (3, 70, 45, 3)
    assert 0.0 <= viridis.min() and viridis.max() <= 1.0
    for frame in grey:
        assert frame.min() == 0.0 and frame.max() == pytest.approx(1.0), "per_frame spans the full range"
    assert not torch.equal(grey[0], grey[1]), "frames differ, so do their depth maps"


def run_dwpose(detector: str, pose: str) -> None:
    nodes.ControlNeXtDWPose.execute(torch.rand(1, 48, 40, 3), detector, pose, True, True, True)


def run_depth(name: str) -> None:
    nodes.ControlNeXtDepth.execute(torch.rand(1, 30, 30, 3), name, "viridis", "batch")


@pytest.mark.parametrize("node", ["dwpose", "depth"])
def test_preprocessor_models_are_loaded_and_freed_by_comfyui_model_management(model_folders, node):
    dwpose, depth = model_folders
    if node == "dwpose":
        run, arguments, expected = run_dwpose, install_tiny_dwpose(dwpose), 2
    else:
        tiny_depth_anything(depth / "tiny-depth-anything")
        run, arguments, expected = run_depth, ("tiny-depth-anything",), 1
    comfy.model_management.unload_all_models()
    run(*arguments)
    loaded = preprocessor_models()
    assert len(loaded) == expected, "the node's models are in ComfyUI's loaded-model list"
    assert all(patcher.loaded_size() == patcher.model_size() > 0 for patcher in loaded), "loaded whole"
    comfy.model_management.unload_all_models()
    assert preprocessor_models() == [], "ComfyUI unloads them like any model"
    for patcher in loaded:
        assert patcher.loaded_size() == 0
        assert {weight.device for weight in patcher.model.state_dict().values()} == {patcher.offload_device}
    run(*arguments)
    again = preprocessor_models()
    assert {id(patcher) for patcher in again} == {id(patcher) for patcher in loaded}, "the files are read once"
    comfy.model_management.free_memory(1e30, comfy.model_management.get_torch_device())
    assert preprocessor_models() == []


def test_viridis_style_maps_near_to_dark_purple_and_far_to_yellow():
    disparity = torch.tensor([[[2.0, 1.0, 0.0]]])
    control = depth_module.depth_control(disparity, "viridis", "batch")[0, 0]
    table = depth_module.viridis_table()
    assert torch.allclose(control[0], table[0]) and torch.allclose(control[2], table[255])
    assert torch.allclose(control[0] * 255, torch.tensor([68.0, 1.0, 84.0]), atol=1.0), "matplotlib viridis(0)"
    grey = depth_module.depth_control(disparity, "grayscale", "batch")[0, 0, :, 0]
    assert torch.equal(grey, torch.tensor([1.0, 0.5, 0.0]))


def test_mask_node_from_mask_image_and_size_like():
    mask = torch.zeros(1, 20, 20)
    mask[0, 5:15, 5:15] = 1.0
    control = nodes.ControlNeXtMask.execute(2, 0, False, 0.0, mask=mask).result[0]
    assert control.shape == (1, 20, 20, 3) and control[0, 4, 10, 0] == 1.0 and control[0, 2, 10, 0] == 0.0
    from_image = nodes.ControlNeXtMask.execute(0, 0, True, 0.5, image=mask[..., None].expand(-1, -1, -1, 3)).result[0]
    assert torch.equal(from_image[..., 0], 1.0 - mask)
    resized = nodes.ControlNeXtMask.execute(0, 0, False, 0.5, mask=mask, size_like=torch.zeros(1, 40, 60, 3)).result[0]
    assert resized.shape == (1, 40, 60, 3), "a mask of another size is resized to size_like (documented)"
    with pytest.raises(ControlNeXtError, match="exactly one"):
        nodes.ControlNeXtMask.execute(0, 0, False, 0.0)
    with pytest.raises(ControlNeXtError, match="exactly one"):
        nodes.ControlNeXtMask.execute(0, 0, False, 0.0, mask=mask, image=torch.zeros(1, 20, 20, 3))


@pytest.mark.parametrize("node, arguments", [
    (nodes.ControlNeXtCanny, (True, 100, 200, 0.0)),
    (nodes.ControlNeXtDWPose, ("yolox_l.onnx", "dw-ll_ucoco_384.onnx", True, True, True)),
    (nodes.ControlNeXtDepth, ("Depth-Anything-V2-Small-hf", "viridis", "batch")),
])
def test_empty_batches_are_refused_before_any_model_loads(node, arguments):
    with pytest.raises(ControlNeXtError, match="empty"):
        node.execute(torch.zeros(0, 16, 16, 3), *arguments)
