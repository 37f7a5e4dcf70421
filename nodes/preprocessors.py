"""Preprocessor nodes: canny, DWPose, pose drawing, depth and mask control images (core: controlnext_core.preprocess).

Model files come only from ComfyUI's models folders (registered here, so extra_model_paths.yaml
entries work): nothing is downloaded at run time, and the model lists show only what is installed.
Models that torch runs (TorchScript DWPose files, Depth Anything) are ModelPatchers that ComfyUI
loads when a node runs and unloads like any model; see ``model_patcher`` and ``onnx_runner``.
"""
from __future__ import annotations

import functools
import os

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError
from ..controlnext_core.preprocess.canny import canny
from ..controlnext_core.preprocess.depth import NORMALISATIONS, STYLES, DepthEstimator, depth_control
from ..controlnext_core.preprocess.dwpose import (DWPoseDetector, ModelRunner, TorchScriptRunner, is_torchscript,
                                                  load_runner, load_torchscript, pose_input_size)
from ..controlnext_core.preprocess.images import check_image_batch
from ..controlnext_core.preprocess.mask import check_mask_batch, mask_control, mask_from_image, resize_masks
from ..controlnext_core.preprocess.pose import draw_poses, frames_from_openpose, to_openpose
from .loaders import CATEGORY, register_model_folder

PREPROCESSOR_CATEGORY = f"{CATEGORY}/preprocessors"
PoseKeypointType = io.Custom("POSE_KEYPOINT")

DWPOSE_FOLDER = "dwpose"
DWPOSE_EXTRA_FOLDERS = ("detection",)  # ComfyUI's own folder for detection models (recent versions)
DWPOSE_SUFFIXES = (".onnx", ".torchscript.pt", ".pt")
# The official files (Hugging Face yzd-v/DWPose), then their TorchScript versions: a combo's default.
DETECTOR_FILES = ("yolox_l.onnx", "yolox_l.torchscript.pt")
POSE_FILES = ("dw-ll_ucoco_384.onnx", "dw-ll_ucoco_384_bs5.torchscript.pt")
DEPTH_FOLDER = "depth_estimation"
DEFAULT_DEPTH_MODEL = "Depth-Anything-V2-Small-hf"


register_model_folder(DWPOSE_FOLDER)
register_model_folder(DEPTH_FOLDER)


def _search_paths(folder: str, extra: tuple[str, ...] = ()) -> list[str]:
    paths: list[str] = []
    for name in (folder, *extra):
        if name in folder_paths.folder_names_and_paths:
            paths += [path for path in folder_paths.get_folder_paths(name) if path not in paths]
    return paths


def dwpose_files() -> list[str]:
    """Model files (relative names) in models/dwpose and models/detection; none when none is installed."""
    names: set[str] = set()
    for root in _search_paths(DWPOSE_FOLDER, DWPOSE_EXTRA_FOLDERS):
        for directory, _, files in os.walk(root, followlinks=True):
            for file in files:
                if file.lower().endswith(DWPOSE_SUFFIXES):
                    names.add(os.path.relpath(os.path.join(directory, file), root).replace(os.sep, "/"))
    return sorted(names)


def installed_default(files: list[str], official: tuple[str, ...]) -> str | None:
    """The first of ``official`` that is installed (no default when none is: the combo shows its first file)."""
    return next((name for name in official if name in files), None)


def depth_models() -> list[str]:
    """Model folders (with a config.json) in models/depth_estimation; none when none is installed."""
    names: set[str] = set()
    for root in _search_paths(DEPTH_FOLDER):
        if os.path.isdir(root):
            names |= {entry for entry in os.listdir(root) if os.path.isfile(os.path.join(root, entry, "config.json"))}
    return sorted(names)


def missing_dwpose_message(name: str) -> str:
    searched = ", ".join(_search_paths(DWPOSE_FOLDER, DWPOSE_EXTRA_FOLDERS))
    return (f"The DWPose model file '{name}' is not in models/{DWPOSE_FOLDER} (searched: {searched}). DWPose needs "
            f"two files there: {DETECTOR_FILES[0]} (person detector) and {POSE_FILES[0]} (whole-body pose), from "
            f"the Hugging Face repository yzd-v/DWPose; or their TorchScript versions {DETECTOR_FILES[1]} and "
            f"{POSE_FILES[1]}. A '{DWPOSE_FOLDER}:' entry in extra_model_paths.yaml can point at "
            f"files you already have. Then refresh the page.")


def resolve_dwpose(name: str) -> str:
    for root in _search_paths(DWPOSE_FOLDER, DWPOSE_EXTRA_FOLDERS):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise ControlNeXtError(missing_dwpose_message(name))


def resolve_depth(name: str) -> str:
    for root in _search_paths(DEPTH_FOLDER):
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    searched = ", ".join(_search_paths(DEPTH_FOLDER))
    raise ControlNeXtError(
        f"The depth model '{name}' is not in models/{DEPTH_FOLDER} (searched: {searched}). Put a transformers-format "
        f"Depth Anything folder there, e.g. models/{DEPTH_FOLDER}/{DEFAULT_DEPTH_MODEL}/ holding config.json, "
        f"model.safetensors and preprocessor_config.json from the Hugging Face repository "
        f"depth-anything/{DEFAULT_DEPTH_MODEL}. A '{DEPTH_FOLDER}:' entry in extra_model_paths.yaml works too. "
        f"Then refresh the page.")


class ManagedModule(torch.nn.Module):
    """The module a ModelPatcher holds. ModelPatcher sets attributes on its model (``device``, load
    counters), which a transformers model refuses (its ``device`` is a read-only property), so every
    preprocessor model is wrapped alike."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def model_patcher(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(ManagedModule(module),
                                            load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def load_for_run(patchers: list[comfy.model_patcher.ModelPatcher]) -> None:
    """Loads the patchers together (so one does not unload the other), whole: their modules cannot run split."""
    if patchers:
        comfy.model_management.load_models_gpu(patchers, force_full_load=True)


# The caches hold ModelPatchers (keyed by path and modification time, so a file is read once):
# where their weights are is ComfyUI's loaded-model list's business, not the cache's.
@functools.lru_cache(maxsize=2)  # a detector and a pose model
def _torchscript_patcher(path: str, mtime: float, role: str) -> comfy.model_patcher.ModelPatcher:
    return model_patcher(load_torchscript(path, comfy.model_management.unet_offload_device(), role))


@functools.lru_cache(maxsize=1)
def _depth_model(folder: str, config_mtime: float) -> tuple[DepthEstimator, comfy.model_patcher.ModelPatcher]:
    estimator = DepthEstimator.from_folder(folder, comfy.model_management.unet_offload_device())
    return estimator, model_patcher(estimator.model)


def onnx_runner(path: str, role: str) -> ModelRunner:
    """ONNX files run outside torch (onnxruntime, or OpenCV on the CPU), where no ModelPatcher can
    hold them: the session is made for this run only, so onnxruntime-gpu's memory is given back when
    the node ends instead of staying out of ComfyUI's reach."""
    return load_runner(path, comfy.model_management.get_torch_device(), role)


def dwpose_detector(detector_path: str, pose_path: str) -> DWPoseDetector:
    """The detector for one run: TorchScript files through their ModelPatchers, ONNX files by ``onnx_runner``."""
    roles = {"detector": detector_path, "pose": pose_path}
    patchers = {role: _torchscript_patcher(path, os.path.getmtime(path), role)
                for role, path in roles.items() if is_torchscript(path)}
    load_for_run(list(patchers.values()))
    runners = {role: TorchScriptRunner(patchers[role].model.module, role) if role in patchers
               else onnx_runner(path, role) for role, path in roles.items()}
    return DWPoseDetector(runners["detector"], runners["pose"], pose_input_size(runners["pose"], pose_path))


def progress_bar(total: int):
    bar = comfy.utils.ProgressBar(total)
    return bar.update


class ControlNeXtCanny(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtCanny",
            display_name="Canny (ControlNeXt)",
            category=PREPROCESSOR_CATEGORY,
            description="Canny edge maps exactly as cv2.Canny draws them (the canny releases' training images). A "
                        "video batch runs at once on the GPU; on a CPU OpenCV runs frame by frame (faster there).",
            inputs=[
                io.Image.Input("image", tooltip="Pictures or video frames. 1-channel images are read as grey, RGBA "
                                                "ignores the alpha."),
                io.Boolean.Input("auto_thresholds", default=True,
                                 tooltip="Thresholds from each frame's median grey level (0.67x and 1.33x), as the "
                                         "official SDXL canny examples compute them. Off: use the two below."),
                io.Int.Input("low_threshold", default=100, min=0, max=1000, step=1,
                             tooltip="Edges weaker than this are dropped (cv2 scale: 8-bit grey, L1 Sobel). Used "
                                     "when auto_thresholds is off."),
                io.Int.Input("high_threshold", default=200, min=0, max=1000, step=1,
                             tooltip="Edges stronger than this always stay; weaker ones stay when connected to one. "
                                     "Used when auto_thresholds is off."),
                io.Float.Input("blur_sigma", default=0.0, min=0.0, max=10.0, step=0.1,
                               tooltip="Gaussian blur of the grey image first, in pixels (0 = none, as the official "
                                       "examples). Fewer edges from noise and texture."),
            ],
            outputs=[io.Image.Output(tooltip="White edges on black, one per input image.")],
        )

    @classmethod
    def execute(cls, image, auto_thresholds: bool, low_threshold: int, high_threshold: int,
                blur_sigma: float) -> io.NodeOutput:
        image = check_image_batch(image)
        low, high = (None, None) if auto_thresholds else (low_threshold, high_threshold)
        edges = canny(image, low, high, blur_sigma, device=comfy.model_management.get_torch_device(),
                      on_progress=progress_bar(image.shape[0]))
        return io.NodeOutput(edges)


class ControlNeXtDWPose(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = dwpose_files()
        return io.Schema(
            node_id="ControlNeXtDWPose",
            display_name="DWPose Estimator (ControlNeXt)",
            category=PREPROCESSOR_CATEGORY,
            description="Whole-body poses (body, hands, face) with DWPose, drawn exactly as the official ControlNeXt "
                        "SVD code draws them. Models from models/dwpose only; nothing is downloaded.",
            inputs=[
                io.Image.Input("image", tooltip="Pictures or video frames; every frame is detected."),
                io.Combo.Input("detector_model", options=files, default=installed_default(files, DETECTOR_FILES),
                               tooltip="Person detector in models/dwpose: yolox_l.onnx (or yolox_l.torchscript.pt)."),
                io.Combo.Input("pose_model", options=files, default=installed_default(files, POSE_FILES),
                               tooltip="Whole-body pose model in models/dwpose: dw-ll_ucoco_384.onnx (or "
                                       "dw-ll_ucoco_384_bs5.torchscript.pt)."),
                io.Boolean.Input("draw_body", default=True, tooltip="Draw the body skeleton."),
                io.Boolean.Input("draw_hands", default=True, tooltip="Draw the hands."),
                io.Boolean.Input("draw_face", default=True, tooltip="Draw the face points."),
            ],
            outputs=[
                io.Image.Output(tooltip="The poses drawn on black, the size of the input."),
                PoseKeypointType.Output(display_name="POSE_KEYPOINT",
                                        tooltip="The keypoints as OpenPose JSON per frame (normalised x, y and the "
                                                "detector's scores), for Draw Pose or other packs' pose nodes."),
            ],
        )

    @classmethod
    def execute(cls, image, detector_model: str, pose_model: str, draw_body: bool, draw_hands: bool,
                draw_face: bool) -> io.NodeOutput:
        image = check_image_batch(image)
        detector = dwpose_detector(resolve_dwpose(detector_model), resolve_dwpose(pose_model))
        update = progress_bar(2 * image.shape[0])
        frames = detector.detect(image, on_progress=update)
        drawn = draw_poses(frames, body=draw_body, hands=draw_hands, face=draw_face, on_progress=update)
        return io.NodeOutput(drawn, [to_openpose(frame) for frame in frames])


class ControlNeXtDrawPose(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtDrawPose",
            display_name="Draw Pose (ControlNeXt)",
            category=PREPROCESSOR_CATEGORY,
            description="Draws pose keypoints (POSE_KEYPOINT / OpenPose JSON, from this pack or another) exactly as "
                        "the official ControlNeXt SVD code draws DWPose results.",
            inputs=[
                PoseKeypointType.Input("pose_keypoint",
                                       tooltip="Keypoints per frame (OpenPose JSON: COCO-18 or BODY_25 body, hands, "
                                               "face; normalised or pixel coordinates)."),
                io.Int.Input("width", default=0, min=0, max=16384, step=8,
                             tooltip="Output width in pixels; 0 = the keypoints' canvas width."),
                io.Int.Input("height", default=0, min=0, max=16384, step=8,
                             tooltip="Output height in pixels; 0 = the keypoints' canvas height."),
                io.Boolean.Input("draw_body", default=True, tooltip="Draw the body skeleton."),
                io.Boolean.Input("draw_hands", default=True, tooltip="Draw the hands."),
                io.Boolean.Input("draw_face", default=True, tooltip="Draw the face points."),
            ],
            outputs=[io.Image.Output(tooltip="One pose image per keypoint frame.")],
        )

    @classmethod
    def execute(cls, pose_keypoint, width: int, height: int, draw_body: bool, draw_hands: bool,
                draw_face: bool) -> io.NodeOutput:
        frames = frames_from_openpose(pose_keypoint)
        drawn = draw_poses(frames, width or None, height or None, draw_body, draw_hands, draw_face,
                           on_progress=progress_bar(len(frames)))
        return io.NodeOutput(drawn)


class ControlNeXtDepth(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        models = depth_models()
        return io.Schema(
            node_id="ControlNeXtDepth",
            display_name="Depth Map (ControlNeXt)",
            category=PREPROCESSOR_CATEGORY,
            description="Monocular depth with a Depth Anything model (transformers format) from "
                        "models/depth_estimation, coloured the way the vidit-depth releases were trained (viridis, "
                        "near = dark) or as grey. Nothing is downloaded.",
            inputs=[
                io.Image.Input("image", tooltip="Pictures or video frames."),
                io.Combo.Input("depth_model", options=models, default=installed_default(models, (DEFAULT_DEPTH_MODEL,)),
                               tooltip="A model folder in models/depth_estimation (config.json + model.safetensors), "
                                       "e.g. Depth-Anything-V2-Small-hf."),
                io.Combo.Input("style", options=list(STYLES), default="viridis",
                               tooltip="viridis: as the ControlNeXt vidit-depth releases (SD1.5, SDXL) expect, near "
                                       "dark purple, far yellow. grayscale: near white (ControlNet style)."),
                io.Combo.Input("normalise", options=list(NORMALISATIONS), default="batch",
                               tooltip="batch: one depth range for all frames (no flicker in videos). per_frame: each "
                                       "frame spans the full range."),
            ],
            outputs=[io.Image.Output(tooltip="Depth control images, the size of the input.")],
        )

    @classmethod
    def execute(cls, image, depth_model: str, style: str, normalise: str) -> io.NodeOutput:
        image = check_image_batch(image)
        folder = resolve_depth(depth_model)
        estimator, patcher = _depth_model(folder, os.path.getmtime(os.path.join(folder, "config.json")))
        load_for_run([patcher])
        disparity = estimator.estimate(image, on_progress=progress_bar(image.shape[0]))
        return io.NodeOutput(depth_control(disparity, style, normalise))


class ControlNeXtMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtMask",
            display_name="Mask Control Image (ControlNeXt)",
            category=PREPROCESSOR_CATEGORY,
            description="Turns a MASK (or an image's brightness) into the control image the mask releases expect: "
                        "the region white on black, with grow/shrink, feather and invert.",
            inputs=[
                io.Mask.Input("mask", optional=True, tooltip="The region (white = 1). Give this or image."),
                io.Image.Input("image", optional=True,
                               tooltip="Or an image whose brightness is the region (a black-and-white mask picture)."),
                io.Int.Input("grow", default=0, min=-512, max=512, step=1,
                             tooltip="Grow (positive) or shrink (negative) the region by this many pixels, round."),
                io.Int.Input("feather", default=0, min=0, max=256, step=1,
                             tooltip="Soften the edge over about this many pixels on each side (0 = sharp)."),
                io.Boolean.Input("invert", default=False, tooltip="Swap the region and the background."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="Above 0: values over it become 1, the rest 0 (before grow and feather). "
                                       "0 keeps soft values."),
                io.Image.Input("size_like", optional=True,
                               tooltip="Optional: the output takes this image's size (the mask is resized, "
                                       "bilinear), e.g. the generation's size when the mask has another."),
            ],
            outputs=[io.Image.Output(tooltip="White region on black, [0, 1].")],
        )

    @classmethod
    def execute(cls, grow: int, feather: int, invert: bool, threshold: float, mask=None, image=None,
                size_like=None) -> io.NodeOutput:
        if (mask is None) == (image is None):
            raise ControlNeXtError("Connect either a mask or an image to Mask Control Image (exactly one of them).")
        masks = check_mask_batch(mask) if mask is not None else mask_from_image(image)
        if size_like is not None:
            target = check_image_batch(size_like, "size_like image")
            masks = resize_masks(masks, target.shape[1], target.shape[2])
        return io.NodeOutput(mask_control(masks, grow, feather, invert, threshold))


PREPROCESSOR_NODES = [ControlNeXtCanny, ControlNeXtDWPose, ControlNeXtDrawPose, ControlNeXtDepth, ControlNeXtMask]
