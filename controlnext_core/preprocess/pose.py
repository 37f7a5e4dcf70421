"""Whole-body pose keypoints: the format, OpenPose JSON in and out, and the official drawing.

Keypoint format (``PoseFrame.keypoints``): a float64 array ``[people, 134, 3]`` of
``(x, y, score)`` per point, x and y normalised to [0, 1] of the frame's width and height (as
the official DWPose code keeps them), score in [0, 1] (0 = not found). The 134 points are
DWPose's whole-body set after the official re-ordering:

- 0-17 body, OpenPose COCO-18 order (nose, neck, right shoulder/elbow/wrist, left
  shoulder/elbow/wrist, right hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right
  ear, left ear); the neck is the shoulders' midpoint, score 1 when both shoulders > 0.3 else 0
- 18-23 feet (not drawn), 24-91 face (68 points), 92-112 left hand, 113-133 right hand (21 each)

A body point counts as detected when its score is > 0.3 (``BODY_VISIBLE``). Hands and face are
always drawn, their colours scaled by score, as the official code does.

``draw_pose`` reproduces ``ControlNeXt-SVD-v2/dwpose/util.py``'s ``draw_pose`` exactly: the
drawing is made on a canvas whose short side is 2160 px (stick width 4, joint radius 4, hand
lines 2, face dots 3 at that scale), the limbs dimmed to 60 %, then resized to the output with
bilinear interpolation, and its colour tuples, written in RGB into a canvas then read as BGR,
come out with red and blue swapped. That is what the SVD and SD pose models saw in training.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import cv2
import numpy as np
import torch

from ..errors import ControlNeXtError

KEYPOINT_COUNT = 134
BODY = slice(0, 18)
FEET = slice(18, 24)
FACE = slice(24, 92)
LEFT_HAND = slice(92, 113)
RIGHT_HAND = slice(113, 134)
BODY_VISIBLE = 0.3
REFERENCE_SIZE = 2160  # official ``ref_w``: the canvas' short side while drawing

# Official drawing tables (dwpose/util.py). Limbs are 1-based joint pairs; only the first 17 are drawn.
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18))
DRAWN_LIMBS = 17
BODY_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
                (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
STICK_WIDTH = 4
JOINT_RADIUS = 4
HAND_LINE_WIDTH = 2
HAND_POINT_RADIUS = 4
FACE_POINT_RADIUS = 3
LIMB_DIMMING = 0.6
PIXEL_EPS = 0.01  # official ``eps``: hand/face points at pixel 0 are taken as missing

# OpenPose BODY_25 -> COCO-18 (drops the mid-hip; its 19-24 are the feet).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
BODY25_FEET = slice(19, 25)


@dataclass
class PoseFrame:
    """The people found in one frame: ``keypoints`` [P, 134, 3] normalised (see module doc), and the
    frame's size in pixels (what the normalised coordinates refer to)."""
    keypoints: np.ndarray
    width: int
    height: int

    def __post_init__(self) -> None:
        self.keypoints = np.asarray(self.keypoints, dtype=np.float64).reshape(-1, KEYPOINT_COUNT, 3)

    @property
    def people(self) -> int:
        return self.keypoints.shape[0]

    @property
    def body(self) -> np.ndarray:
        return self.keypoints[:, BODY]

    @property
    def face(self) -> np.ndarray:
        return self.keypoints[:, FACE]

    @property
    def left_hand(self) -> np.ndarray:
        return self.keypoints[:, LEFT_HAND]

    @property
    def right_hand(self) -> np.ndarray:
        return self.keypoints[:, RIGHT_HAND]


def hsv_to_rgb(hue: float) -> tuple[float, float, float]:
    """Full saturation and value, with matplotlib.colors.hsv_to_rgb's arithmetic (the official hand colours)."""
    saturation = value = 1.0
    sector = int(hue * 6.0)
    fraction = hue * 6.0 - sector
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    return ((value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q))[sector % 6]


HAND_COLOURS = tuple(hsv_to_rgb(index / float(len(HAND_EDGES))) for index in range(len(HAND_EDGES)))


def _draw_body(canvas: np.ndarray, body: np.ndarray) -> np.ndarray:
    height, width = canvas.shape[:2]
    for limb in range(DRAWN_LIMBS):
        first, second = LIMBS[limb][0] - 1, LIMBS[limb][1] - 1
        for person in body:
            score_a, score_b = person[first, 2], person[second, 2]
            if score_a < BODY_VISIBLE or score_b < BODY_VISIBLE:
                continue
            xs = person[[first, second], 0] * float(width)
            ys = person[[first, second], 1] * float(height)
            length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH),
                                       int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(c * (score_a * score_b)) for c in BODY_COLOURS[limb]])
    canvas = (canvas * LIMB_DIMMING).astype(np.uint8)
    for joint in range(len(BODY_COLOURS)):
        for person in body:
            x, y, score = person[joint]
            if score <= BODY_VISIBLE:
                continue
            cv2.circle(canvas, (int(x * width), int(y * height)), JOINT_RADIUS,
                       [int(c * score) for c in BODY_COLOURS[joint]], thickness=-1)
    return canvas


def _draw_hands(canvas: np.ndarray, hands: Iterable[np.ndarray]) -> None:
    height, width = canvas.shape[:2]
    for hand in hands:
        for index, (start, end) in enumerate(HAND_EDGES):
            x1, y1 = int(hand[start, 0] * width), int(hand[start, 1] * height)
            x2, y2 = int(hand[end, 0] * width), int(hand[end, 1] * height)
            score = int(hand[start, 2] * hand[end, 2] * 255)
            if x1 > PIXEL_EPS and y1 > PIXEL_EPS and x2 > PIXEL_EPS and y2 > PIXEL_EPS:
                cv2.line(canvas, (x1, y1), (x2, y2), [c * score for c in HAND_COLOURS[index]],
                         thickness=HAND_LINE_WIDTH)
        for x, y, score in hand:
            x, y = int(x * width), int(y * height)
            if x > PIXEL_EPS and y > PIXEL_EPS:
                cv2.circle(canvas, (x, y), HAND_POINT_RADIUS, (0, 0, int(score * 255)), thickness=-1)


def _draw_faces(canvas: np.ndarray, faces: np.ndarray) -> None:
    height, width = canvas.shape[:2]
    for face in faces:
        for x, y, score in face:
            x, y = int(x * width), int(y * height)
            level = int(score * 255)
            if x > PIXEL_EPS and y > PIXEL_EPS:
                cv2.circle(canvas, (x, y), FACE_POINT_RADIUS, (level, level, level), thickness=-1)


def draw_pose(frame: PoseFrame, width: int | None = None, height: int | None = None, body: bool = True,
              hands: bool = True, face: bool = True) -> np.ndarray:
    """The official pose image of ``frame``: uint8 RGB [height, width, 3], black background.

    ``width``/``height`` default to the frame's. The body, hands and face can be left out.
    Left hands are drawn before right ones, person after person, as the official code stacks them.
    """
    width = int(width or frame.width)
    height = int(height or frame.height)
    if width <= 0 or height <= 0:
        raise ControlNeXtError(f"Cannot draw a pose on a {width}x{height} canvas: give a positive width and height.")
    short_side = min(height, width)
    scale = (REFERENCE_SIZE / short_side) if short_side != REFERENCE_SIZE else 1
    canvas = np.zeros((int(height * scale), int(width * scale), 3), dtype=np.uint8)
    if body:
        canvas = _draw_body(canvas, frame.body)
    if hands:
        _draw_hands(canvas, [*frame.left_hand, *frame.right_hand])
    if face:
        _draw_faces(canvas, frame.face)
    return np.ascontiguousarray(cv2.resize(canvas, (width, height))[..., ::-1])


def draw_poses(frames: list[PoseFrame], width: int | None = None, height: int | None = None, body: bool = True,
               hands: bool = True, face: bool = True,
               on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``draw_pose`` for each frame -> IMAGE [B, H, W, 3] floats; the size defaults to the first frame's."""
    if not frames:
        raise ControlNeXtError("No pose frames to draw (the keypoint list is empty).")
    width = int(width or frames[0].width)
    height = int(height or frames[0].height)
    drawn = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        drawn[index] = draw_pose(frame, width, height, body, hands, face)
        if on_progress is not None:
            on_progress(1)
    return torch.from_numpy(drawn).float() / 255.0


# ---- OpenPose JSON (the POSE_KEYPOINT of ComfyUI preprocessor packs) ----

def _flat(points: np.ndarray) -> list[float]:
    return [float(v) for v in points.reshape(-1)]


def to_openpose(frame: PoseFrame) -> dict[str, Any]:
    """One frame as an OpenPose-style dict: ``people`` with ``pose_keypoints_2d`` (COCO-18),
    ``face_keypoints_2d`` (70: the 68 points plus the two eyes, as OpenPose lists pupils),
    ``hand_left_keypoints_2d``/``hand_right_keypoints_2d`` (21) and ``foot_keypoints_2d`` (6),
    each a flat ``[x, y, score, ...]`` list with x, y normalised to [0, 1]; plus
    ``canvas_width``/``canvas_height``. Scores are the detector's, not rounded to 0/1."""
    people = []
    for person in frame.keypoints:
        face = np.concatenate([person[FACE], person[[14, 15]]])
        people.append({
            "pose_keypoints_2d": _flat(person[BODY]),
            "face_keypoints_2d": _flat(face),
            "hand_left_keypoints_2d": _flat(person[LEFT_HAND]),
            "hand_right_keypoints_2d": _flat(person[RIGHT_HAND]),
            "foot_keypoints_2d": _flat(person[FEET]),
        })
    return {"people": people, "canvas_width": int(frame.width), "canvas_height": int(frame.height)}


def _points(values: Any, count: int, what: str) -> np.ndarray:
    """A flat [x, y, score, ...] list -> [n, 3] (missing or empty -> no points)."""
    if values is None or len(values) == 0:
        return np.zeros((0, 3))
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size % 3:
        raise ControlNeXtError(f"'{what}' must be a flat list of x, y, score triples; got {array.size} numbers.")
    return array.reshape(-1, 3)[:count]


def _person_from_openpose(person: dict[str, Any]) -> np.ndarray:
    keypoints = np.zeros((KEYPOINT_COUNT, 3))
    body = _points(person.get("pose_keypoints_2d"), 25, "pose_keypoints_2d")
    if len(body) == 25:
        keypoints[BODY] = body[list(BODY25_TO_COCO18)]
        keypoints[FEET] = body[BODY25_FEET]
    else:
        keypoints[BODY][:len(body)] = body
    for key, part, count in (("face_keypoints_2d", FACE, 68), ("hand_left_keypoints_2d", LEFT_HAND, 21),
                             ("hand_right_keypoints_2d", RIGHT_HAND, 21), ("foot_keypoints_2d", FEET, 6)):
        points = _points(person.get(key), count, key)
        if len(points):
            keypoints[part][:len(points)] = points
    return keypoints


def from_openpose(data: dict[str, Any]) -> PoseFrame:
    """One OpenPose-style frame dict -> PoseFrame.

    Coordinates may be normalised or in pixels: when every point with a score lies within
    [0, 1] they are taken as normalised, else divided by the canvas size. A missing part is
    all-zero (score 0); a BODY_25 body is mapped to COCO-18 (its feet kept).
    """
    if not isinstance(data, dict):
        raise ControlNeXtError(f"A pose frame must be a dict with 'people'; got {type(data).__name__}.")
    try:
        width, height = int(data["canvas_width"]), int(data["canvas_height"])
    except (KeyError, TypeError, ValueError):
        raise ControlNeXtError("A pose frame needs 'canvas_width' and 'canvas_height' (the image size the "
                               "keypoints refer to).") from None
    people = [_person_from_openpose(person) for person in data.get("people") or []]
    keypoints = np.stack(people) if people else np.zeros((0, KEYPOINT_COUNT, 3))
    found = keypoints[..., 2] > 0
    if found.any() and np.abs(keypoints[..., :2][found]).max() > 1.0:
        keypoints[..., 0] /= width
        keypoints[..., 1] /= height
    return PoseFrame(keypoints, width, height)


def frames_from_openpose(data: Any) -> list[PoseFrame]:
    """POSE_KEYPOINT data (a list of frame dicts, one dict, or their JSON text) -> PoseFrames."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise ControlNeXtError(f"The pose keypoints are not valid JSON ({error}).") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise ControlNeXtError("Pose keypoints must be a non-empty list of OpenPose frames (POSE_KEYPOINT).")
    return [from_openpose(frame) for frame in data]
