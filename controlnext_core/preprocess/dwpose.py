"""DWPose whole-body detection, as the official ControlNeXt-SVD-v2 ``dwpose/`` code runs it.

Two models: a YOLOX person detector (``yolox_l.onnx``: [1, 3, 640, 640] -> [1, 8400, 85]) and
the DWPose RTMPose whole-body model (``dw-ll_ucoco_384.onnx``: [N, 3, 384, 288] -> SimCC
x [N, 133, 576] and y [N, 133, 768]). Either may be ONNX (run by onnxruntime when it is
installed, on the GPU with onnxruntime-gpu, else by OpenCV's DNN module on the CPU) or
TorchScript (``*.torchscript.pt``, run by torch wherever its weights are; traced pose models
take batches of 5, which is what the pose batch is padded to).

The steps follow the official code: letterbox to 640 (pad 114, image top-left), YOLOX grid
decoding, person boxes by NMS (IoU 0.45, score > 0.1) kept over 0.3 (none found: the whole
image is one box), each box padded x1.25 and fixed to the pose model's aspect ratio, cropped
by an affine warp, normalised with ImageNet mean/std (RGB, as the official code feeds frames),
SimCC argmax decoding (split ratio 2), then the neck inserted and points re-ordered to
OpenPose order (see ``pose``).
"""
from __future__ import annotations

import itertools
import mmap
import os
from typing import Callable, Protocol

import cv2
import numpy as np
import torch

from ..errors import ControlNeXtError
from .images import check_image_batch
from .pose import KEYPOINT_COUNT, PoseFrame

DETECTOR_INPUT = (640, 640)  # (height, width)
DETECTOR_STRIDES = (8, 16, 32)
LETTERBOX_FILL = 114
NMS_IOU = 0.45
NMS_SCORE = 0.1
PERSON_SCORE = 0.3
BOX_PADDING = 1.25
POSE_MEAN = np.array([123.675, 116.28, 103.53])
POSE_STD = np.array([58.395, 57.12, 57.375])
SIMCC_SPLIT = 2.0
DEFAULT_POSE_INPUT = (384, 288)  # (height, width) of dw-ll_ucoco_384
TORCHSCRIPT_POSE_BATCH = 5  # the TorchScript DWPose files are traced for batches of 5
POSE_BATCH = 32
# mmpose whole-body order -> OpenPose: the neck (inserted at 17) and the body points move.
MMPOSE_INDEX = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
OPENPOSE_INDEX = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
TORCHSCRIPT_SUFFIXES = (".torchscript.pt", ".torchscript", ".pt", ".pth", ".jit")


class ModelRunner(Protocol):
    """Runs one model on a float32 NCHW batch and returns its outputs as float32 arrays."""
    batch_size: int | None  # a fixed batch the model needs (padded to), or None for any

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]: ...


# ---- reading the image input shape of an ONNX file (for OpenCV, which cannot tell it) ----

def _varint(buffer, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def _fields(buffer, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) of a protobuf message."""
    position = start
    while position < end:
        key, position = _varint(buffer, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(buffer, position)
            yield number, wire, value
        elif wire == 2:
            length, position = _varint(buffer, position)
            yield number, wire, (position, position + length)
            position += length
        elif wire in (1, 5):
            position += 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire}")


def _first(buffer, span: tuple[int, int], number: int):
    return next((value for field, _, value in _fields(buffer, *span) if field == number), None)


def onnx_input_shape(path: str) -> list[int | None]:
    """Dims of the ONNX model's first graph input (None where symbolic), read straight from the file."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        graph = _first(buffer, (0, len(buffer)), 7)  # ModelProto.graph
        value_info = _first(buffer, graph, 11)  # GraphProto.input[0]
        tensor = _first(buffer, _first(buffer, value_info, 2), 1)  # ValueInfoProto.type.tensor_type
        shape = _first(buffer, tensor, 2)
        dims = []
        for field, _, dim in _fields(buffer, *shape):
            if field == 1:
                dims.append(_first(buffer, dim, 1))  # Dimension.dim_value (absent when symbolic)
        return dims


class OnnxRuntimeRunner:
    def __init__(self, path: str, device: torch.device):
        import onnxruntime

        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = onnxruntime.InferenceSession(path, providers=providers)
        shape = self.session.get_inputs()[0].shape
        self.input_shape = [dim if isinstance(dim, int) else None for dim in shape]
        self.batch_size = self.input_shape[0]

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        name = self.session.get_inputs()[0].name
        return [np.asarray(out, dtype=np.float32) for out in self.session.run(None, {name: batch})]


class OpenCVRunner:
    def __init__(self, path: str):
        self.net = cv2.dnn.readNetFromONNX(path)
        self.input_shape = onnx_input_shape(path)
        self.batch_size = self.input_shape[0]
        self.outputs = self.net.getUnconnectedOutLayersNames()

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.net.setInput(np.ascontiguousarray(batch))
        return [np.asarray(out, dtype=np.float32) for out in self.net.forward(self.outputs)]


class TorchScriptRunner:
    """Runs a TorchScript module where its weights are at call time, so whoever manages the
    module's memory (ComfyUI's model management in the nodes) may move it between runs."""

    def __init__(self, module: torch.nn.Module, role: str):
        self.module = module
        self.batch_size = TORCHSCRIPT_POSE_BATCH if role == "pose" else 1

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        weight = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        device = weight.device if weight is not None else torch.device("cpu")
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(batch).to(device, dtype))
        outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        return [out.float().cpu().numpy() for out in outputs]


def is_torchscript(path: str) -> bool:
    return path.lower().endswith(TORCHSCRIPT_SUFFIXES)


def _unreadable(path: str, role: str, error: Exception) -> ControlNeXtError:
    return ControlNeXtError(f"Could not load the DWPose {role} model '{os.path.basename(path)}' "
                            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). The file "
                            f"is probably truncated or not a {role} model: download it again.")


def load_torchscript(path: str, device: torch.device | str, role: str) -> torch.jit.ScriptModule:
    """A TorchScript DWPose file as an eval-mode module on ``device``; ``role`` as in ``load_runner``."""
    try:
        return torch.jit.load(path, map_location=torch.device(device)).eval()
    except Exception as error:
        raise _unreadable(path, role, error) from None


def load_runner(path: str, device: torch.device | str, role: str) -> ModelRunner:
    """A runner for an ONNX or TorchScript file; ``role`` is "detector" or "pose" (for messages and batching)."""
    device = torch.device(device)
    if is_torchscript(path):
        return TorchScriptRunner(load_torchscript(path, device, role), role)
    if not path.lower().endswith(".onnx"):
        raise ControlNeXtError(f"'{os.path.basename(path)}' is neither an ONNX (.onnx) nor a TorchScript "
                               f"(.torchscript.pt) file.")
    try:
        try:
            return OnnxRuntimeRunner(path, device)
        except ImportError:
            return OpenCVRunner(path)
    except Exception as error:
        raise _unreadable(path, role, error) from None


def pose_input_size(runner: ModelRunner, path: str) -> tuple[int, int]:
    """(height, width) the pose model takes: from the ONNX input, else from the file name (…_256 = 256x192)."""
    shape = getattr(runner, "input_shape", None)
    if shape is not None and len(shape) == 4 and shape[2] and shape[3]:
        return int(shape[2]), int(shape[3])
    return (256, 192) if "256" in os.path.basename(path) else DEFAULT_POSE_INPUT


# ---- detection ----

def letterbox(image: np.ndarray) -> tuple[np.ndarray, float]:
    """uint8 HWC -> float32 CHW 640x640 (resized to fit, top-left, grey 114 around) and the resize ratio."""
    height, width = DETECTOR_INPUT
    ratio = min(height / image.shape[0], width / image.shape[1])
    resized = cv2.resize(image, (int(image.shape[1] * ratio), int(image.shape[0] * ratio)),
                         interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    padded = np.full((height, width, 3), LETTERBOX_FILL, dtype=np.uint8)
    padded[:resized.shape[0], :resized.shape[1]] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32), ratio


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression (areas with the +1 pixel convention of the official code)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        overlap = width * height
        order = rest[overlap / (areas[best] + areas[rest] - overlap) <= iou_threshold]
    return keep


def person_boxes(prediction: np.ndarray, ratio: float) -> np.ndarray:
    """YOLOX output [anchors, 5 + classes] -> person boxes [K, 4] (x1, y1, x2, y2) in image pixels."""
    grids, strides = [], []
    for stride in DETECTOR_STRIDES:
        rows, cols = DETECTOR_INPUT[0] // stride, DETECTOR_INPUT[1] // stride
        xs, ys = np.meshgrid(np.arange(cols), np.arange(rows))
        grids.append(np.stack((xs, ys), 2).reshape(-1, 2))
        strides.append(np.full((rows * cols, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    if prediction.shape[0] != grid.shape[0]:
        raise ControlNeXtError(f"The detector gave {prediction.shape[0]} anchors; a YOLOX model at 640x640 gives "
                               f"{grid.shape[0]}. Use yolox_l.onnx (or its TorchScript version) as the detector.")
    centres = (prediction[:, :2] + grid) * stride
    sizes = np.exp(prediction[:, 2:4]) * stride
    boxes = np.concatenate([centres - sizes / 2.0, centres + sizes / 2.0], axis=1) / ratio
    scores = prediction[:, 4] * prediction[:, 5]  # objectness x person class
    valid = scores > NMS_SCORE
    boxes, scores = boxes[valid], scores[valid]
    if not len(scores):
        return np.zeros((0, 4))
    keep = nms(boxes, scores, NMS_IOU)
    boxes, scores = boxes[keep], scores[keep]
    return boxes[scores > PERSON_SCORE]


# ---- pose ----

def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direction = a - b
    return b + np.r_[-direction[1], direction[0]]


def crop_person(image: np.ndarray, box: np.ndarray, input_size: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box -> normalised crop (HWC float), centre and scale (w, h) in image pixels, as the official top-down affine."""
    height, width = input_size
    x1, y1, x2, y2 = box
    centre = np.array([x1 + x2, y1 + y2]) * 0.5
    scale = np.array([x2 - x1, y2 - y1]) * BOX_PADDING
    aspect = width / height
    scale = np.array([scale[0], scale[0] / aspect]) if scale[0] > scale[1] * aspect else np.array(
        [scale[1] * aspect, scale[1]])
    source = np.zeros((3, 2), dtype=np.float32)
    source[0] = centre
    source[1] = centre + np.array([0.0, scale[0] * -0.5])
    source[2] = _third_point(source[0], source[1])
    target = np.zeros((3, 2), dtype=np.float32)
    target[0] = [width * 0.5, height * 0.5]
    target[1] = np.array([width * 0.5, height * 0.5]) + np.array([0.0, width * -0.5])
    target[2] = _third_point(target[0], target[1])
    warp = cv2.getAffineTransform(source, target)
    crop = cv2.warpAffine(image, warp, (int(width), int(height)), flags=cv2.INTER_LINEAR)
    return (crop - POSE_MEAN) / POSE_STD, centre, scale


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, input_size: tuple[int, int], centre: np.ndarray,
                 scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One person's SimCC vectors [133, Wx], [133, Wy] -> keypoints [133, 2] in image pixels, scores [133]."""
    locations = np.stack([simcc_x.argmax(axis=1), simcc_y.argmax(axis=1)], axis=-1).astype(np.float32)
    scores = np.minimum(simcc_x.max(axis=1), simcc_y.max(axis=1))
    locations[scores <= 0.0] = -1
    keypoints = locations / SIMCC_SPLIT
    model_size = np.array([input_size[1], input_size[0]])
    return keypoints / model_size * scale + centre - scale / 2, scores


def openpose_order(keypoints: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[P, 133, 2] + [P, 133] in mmpose order -> [P, 134, 3] with the neck, in OpenPose order."""
    info = np.concatenate([keypoints, scores[..., None]], axis=-1)
    neck = info[:, [5, 6]].mean(axis=1)
    neck[:, 2] = np.logical_and(info[:, 5, 2] > PERSON_SCORE, info[:, 6, 2] > PERSON_SCORE).astype(int)
    info = np.insert(info, 17, neck, axis=1)
    info[:, OPENPOSE_INDEX] = info[:, MMPOSE_INDEX]
    return info


def _run_batched(runner: ModelRunner, batch: np.ndarray) -> list[np.ndarray]:
    """Runs ``batch`` in the runner's fixed batch size (zero-padded) or in chunks of POSE_BATCH."""
    size = runner.batch_size or POSE_BATCH
    outputs: list[list[np.ndarray]] = []
    for start in range(0, len(batch), size):
        chunk = batch[start:start + size]
        count = len(chunk)
        if runner.batch_size and count < size:
            chunk = np.concatenate([chunk, np.zeros((size - count, *chunk.shape[1:]), dtype=chunk.dtype)])
        outputs.append([out[:count] for out in runner(np.ascontiguousarray(chunk))])
    return [np.concatenate(parts) for parts in zip(*outputs)]


def _simcc_pair(outputs: list[np.ndarray], input_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if len(outputs) != 2 or outputs[0].ndim != 3:
        raise ControlNeXtError(f"The pose model gave {len(outputs)} outputs of shapes "
                               f"{[tuple(o.shape) for o in outputs]}; a DWPose model gives two SimCC maps "
                               f"[N, 133, 2*width] and [N, 133, 2*height]. Use dw-ll_ucoco_384.onnx as the pose model.")
    first, second = outputs
    if first.shape[-1] == 2 * input_size[0] and second.shape[-1] == 2 * input_size[1]:
        first, second = second, first  # outputs listed y first
    return first, second


class DWPoseDetector:
    """Person detector + whole-body pose model -> one PoseFrame per image."""

    def __init__(self, detector: ModelRunner, pose: ModelRunner, pose_input: tuple[int, int] = DEFAULT_POSE_INPUT):
        self.detector = detector
        self.pose = pose
        self.pose_input = pose_input

    @classmethod
    def from_files(cls, detector_path: str, pose_path: str, device: torch.device | str = "cpu") -> "DWPoseDetector":
        pose = load_runner(pose_path, device, "pose")
        return cls(load_runner(detector_path, device, "detector"), pose, pose_input_size(pose, pose_path))

    def boxes(self, image: np.ndarray) -> np.ndarray:
        """Person boxes of one uint8 RGB image; the whole image when nobody is found (official)."""
        batch, ratio = letterbox(image)
        output = self.detector(batch[None])[0]
        boxes = person_boxes(output.reshape(-1, output.shape[-1]), ratio)
        if not len(boxes):
            boxes = np.array([[0, 0, image.shape[1], image.shape[0]]], dtype=np.float64)
        return boxes

    def detect(self, images: torch.Tensor, on_progress: Callable[[int], None] | None = None) -> list[PoseFrame]:
        """IMAGE [B, H, W, C] -> PoseFrames (normalised keypoints). Boxes per frame, then every person
        of the batch through the pose model together."""
        images = check_image_batch(images)
        frames = np.rint(np.clip(images.float().cpu().numpy(), 0.0, 1.0) * 255.0).astype(np.uint8)
        crops, centres, scales, owners = [], [], [], []
        for index, frame in enumerate(frames):
            for box in self.boxes(frame):
                crop, centre, scale = crop_person(frame, box, self.pose_input)
                crops.append(crop.transpose(2, 0, 1))
                centres.append(centre)
                scales.append(scale)
                owners.append(index)
            if on_progress is not None:
                on_progress(1)
        simcc_x, simcc_y = _simcc_pair(_run_batched(self.pose, np.stack(crops).astype(np.float32)), self.pose_input)
        height, width = frames.shape[1:3]
        people: list[list[np.ndarray]] = [[] for _ in frames]
        for crop_index, owner in enumerate(owners):
            keypoints, scores = decode_simcc(simcc_x[crop_index], simcc_y[crop_index], self.pose_input,
                                             centres[crop_index], scales[crop_index])
            people[owner].append(openpose_order(keypoints[None], scores[None])[0])
        result = []
        for found in people:
            keypoints = np.stack(found) if found else np.zeros((0, KEYPOINT_COUNT, 3))
            keypoints[..., 0] /= float(width)
            keypoints[..., 1] /= float(height)
            result.append(PoseFrame(keypoints, width, height))
        return result
