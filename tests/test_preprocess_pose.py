"""Pose keypoints (core): the official drawing pixel for pixel, and OpenPose JSON in and out."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from controlnext_core import ControlNeXtError
from controlnext_core.preprocess.pose import (BODY, FACE, FEET, KEYPOINT_COUNT, LEFT_HAND, RIGHT_HAND, PoseFrame,
                                              draw_pose, draw_poses, frames_from_openpose, from_openpose,
                                              to_openpose)


# ---- a transcription of ControlNeXt-SVD-v2/dwpose/util.py, in its own data layout ----
# (candidate [P*18, 2] + subset [P, 18] of indices or -1 + score [P, 18]; hands stacked left
#  hands then right hands; matplotlib's hsv_to_rgb written out for s = v = 1)

OFFICIAL_LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
                  [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
OFFICIAL_COLOURS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
                    [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
                    [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]


def official_hsv(h):
    i = int(h * 6.0)
    f = h * 6.0 - i
    p, q, t = 0.0, 1.0 * (1 - f), 1.0 * (1 - (1 - f))
    return np.array([[1.0, t, p], [q, 1.0, p], [p, 1.0, t], [p, q, 1.0], [t, p, 1.0], [1.0, p, q]][i % 6])


def official_draw(frame: PoseFrame, H: int, W: int) -> np.ndarray:
    people = frame.keypoints
    candidate = people[:, :18, :2].reshape(-1, 2)
    score = people[:, :18, 2]
    subset = np.where(score > 0.3, np.arange(people.shape[0])[:, None] * 18 + np.arange(18), -1)
    hands = np.vstack([people[:, 92:113, :2], people[:, 113:, :2]])
    hands_score = np.vstack([people[:, 92:113, 2], people[:, 113:, 2]])
    faces, faces_score = people[:, 24:92, :2], people[:, 24:92, 2]
    sr = 2160 / min(H, W) if min(H, W) != 2160 else 1
    canvas = np.zeros((int(H * sr), int(W * sr), 3), dtype=np.uint8)
    h, w = canvas.shape[:2]
    for i in range(17):
        for n in range(len(subset)):
            index = subset[n][np.array(OFFICIAL_LIMBS[i]) - 1]
            conf = score[n][np.array(OFFICIAL_LIMBS[i]) - 1]
            if conf[0] < 0.3 or conf[1] < 0.3:
                continue
            Y = candidate[index.astype(int), 0] * float(w)
            X = candidate[index.astype(int), 1] * float(h)
            length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
            polygon = cv2.ellipse2Poly((int(np.mean(Y)), int(np.mean(X))), (int(length / 2), 4), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(c * conf[0] * conf[1]) for c in OFFICIAL_COLOURS[i]])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(18):
        for n in range(len(subset)):
            if subset[n][i] == -1:
                continue
            x, y = candidate[int(subset[n][i])]
            cv2.circle(canvas, (int(x * w), int(y * h)), 4, [int(c * score[n][i]) for c in OFFICIAL_COLOURS[i]], -1)
    for peaks, scores in zip(hands, hands_score):
        for ie, (a, b) in enumerate([[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10],
                                     [10, 11], [11, 12], [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18],
                                     [18, 19], [19, 20]]):
            x1, y1 = int(peaks[a][0] * w), int(peaks[a][1] * h)
            x2, y2 = int(peaks[b][0] * w), int(peaks[b][1] * h)
            level = int(scores[a] * scores[b] * 255)
            if x1 > 0.01 and y1 > 0.01 and x2 > 0.01 and y2 > 0.01:
                cv2.line(canvas, (x1, y1), (x2, y2), official_hsv(ie / 20.0) * level, thickness=2)
        for (x, y), s in zip(peaks, scores):
            x, y = int(x * w), int(y * h)
            if x > 0.01 and y > 0.01:
                cv2.circle(canvas, (x, y), 4, (0, 0, int(s * 255)), thickness=-1)
    for lmks, scores in zip(faces, faces_score):
        for (x, y), s in zip(lmks, scores):
            x, y = int(x * w), int(y * h)
            if x > 0.01 and y > 0.01:
                cv2.circle(canvas, (x, y), 3, (int(s * 255),) * 3, thickness=-1)
    return cv2.cvtColor(cv2.resize(canvas, (W, H)), cv2.COLOR_BGR2RGB)


def random_people(people: int, seed: int) -> np.ndarray:
    """Plausible-ish people: points scattered around a centre, scores across the 0.3 threshold."""
    rng = np.random.default_rng(seed)
    keypoints = np.zeros((people, KEYPOINT_COUNT, 3))
    for person in keypoints:
        centre = rng.uniform(0.25, 0.75, 2)
        person[:, :2] = np.clip(centre + rng.normal(0, 0.12, (KEYPOINT_COUNT, 2)), 0, 1)
        person[:, 2] = rng.uniform(0.0, 1.0, KEYPOINT_COUNT)
    return keypoints


@pytest.mark.parametrize("size, people, seed", [((512, 512), 1, 0), ((576, 1024), 2, 1), ((333, 250), 3, 2),
                                                ((64, 48), 1, 3)])
def test_drawing_matches_the_official_rules_pixel_for_pixel(size, people, seed):
    height, width = size
    frame = PoseFrame(random_people(people, seed), width, height)
    ours = draw_pose(frame)
    assert ours.shape == (height, width, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, official_draw(frame, height, width))
    assert (ours > 0).any(axis=-1).mean() > 0.01, "something was drawn"


def test_limb_colour_and_swapped_channels_at_reference_scale():
    """At 2160 px nothing is resized: the neck->right-shoulder limb (official colour [255, 0, 0],
    scores 1) is (0, 0, 153) RGB: dimmed to 60 %, red and blue swapped like the official output."""
    keypoints = np.zeros((1, KEYPOINT_COUNT, 3))
    keypoints[0, 1] = (0.5, 0.3, 1.0)  # neck
    keypoints[0, 2] = (0.3, 0.3, 1.0)  # right shoulder
    image = draw_pose(PoseFrame(keypoints, 2160, 2160), hands=False, face=False)
    assert tuple(image[648, 864]) == (0, 0, 153)  # middle of the limb (y = 0.3 * 2160, x = 0.4 * 2160)
    assert tuple(image[648, 1080]) == (0, 85, 255)  # the neck joint on top, undimmed (official [255, 85, 0])
    assert tuple(image[648 + 6, 864]) == (0, 0, 0), "stick half-width is 4 px at the reference scale"
    assert tuple(image[648 + 4, 864]) == (0, 0, 153)


def test_low_confidence_body_points_are_not_drawn_but_hands_and_face_fade():
    keypoints = np.zeros((1, KEYPOINT_COUNT, 3))
    keypoints[0, 1] = (0.5, 0.3, 0.29)
    keypoints[0, 2] = (0.3, 0.3, 1.0)
    assert (draw_pose(PoseFrame(keypoints, 256, 256), body=True)[..., 0] == 0).all(), "only the shoulder (blue)"
    keypoints[0, FACE.start] = (0.5, 0.5, 0.5)
    face_only = draw_pose(PoseFrame(keypoints, 2160, 2160), body=False, hands=False)
    assert tuple(face_only[1080, 1080]) == (127, 127, 127)


def test_parts_can_be_left_out():
    frame = PoseFrame(random_people(1, 5), 300, 300)
    nothing = draw_pose(frame, body=False, hands=False, face=False)
    assert not nothing.any()
    assert draw_pose(frame, body=True, hands=False, face=False).any()


def test_draw_poses_batches_frames_as_an_image():
    frames = [PoseFrame(random_people(1, seed), 96, 64) for seed in range(3)]
    progress = []
    image = draw_poses(frames, on_progress=progress.append)
    assert image.shape == (3, 64, 96, 3) and image.dtype == torch.float32 and sum(progress) == 3
    assert torch.equal(image[1], torch.from_numpy(draw_pose(frames[1])).float() / 255)
    assert draw_poses(frames, width=48, height=32).shape == (3, 32, 48, 3)


def test_openpose_round_trip_keeps_every_drawn_value():
    frame = PoseFrame(random_people(2, 7), 640, 480)
    data = to_openpose(frame)
    assert data["canvas_width"] == 640 and data["canvas_height"] == 480
    person = data["people"][0]
    assert len(person["pose_keypoints_2d"]) == 18 * 3 and len(person["face_keypoints_2d"]) == 70 * 3
    assert len(person["hand_left_keypoints_2d"]) == 21 * 3 and len(person["foot_keypoints_2d"]) == 6 * 3
    back = frames_from_openpose(json.dumps([data]))[0]
    assert np.array_equal(back.keypoints, frame.keypoints)
    assert np.array_equal(draw_pose(back), draw_pose(frame))


def test_pixel_coordinates_and_controlnet_aux_style_frames_are_read():
    """controlnet_aux-style data: 70 face points, score 1 for found, [0, 0, 0] for missing; pixels here."""
    body = [0.0] * 54
    body[3:6] = [320.0, 120.0, 1.0]  # neck
    body[6:9] = [200.0, 120.0, 1.0]  # right shoulder
    data = {"people": [{"pose_keypoints_2d": body, "face_keypoints_2d": [10.0, 20.0, 1.0] * 70,
                        "hand_left_keypoints_2d": None, "hand_right_keypoints_2d": []}],
            "canvas_width": 640, "canvas_height": 480}
    frame = from_openpose(data)
    assert frame.people == 1
    assert np.allclose(frame.body[0, 1], (0.5, 0.25, 1.0)) and np.allclose(frame.body[0, 2], (0.3125, 0.25, 1.0))
    assert np.allclose(frame.face[0, :, :2], (10 / 640, 20 / 480)) and frame.face.shape == (1, 68, 3)
    assert not frame.left_hand.any() and not frame.right_hand.any()


def test_body25_is_mapped_to_coco18():
    body25 = np.zeros((25, 3))
    body25[:, 0] = np.arange(25) / 100
    body25[:, 2] = 1.0
    frame = from_openpose({"people": [{"pose_keypoints_2d": body25.reshape(-1).tolist()}],
                           "canvas_width": 10, "canvas_height": 10})
    assert np.allclose(frame.body[0, :, 0] * 100, [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18])
    assert np.allclose(frame.keypoints[0, FEET, 0] * 100, np.arange(19, 25))


def test_part_slices_cover_all_134_points_once():
    covered = np.zeros(KEYPOINT_COUNT, dtype=int)
    for part in (BODY, FEET, FACE, LEFT_HAND, RIGHT_HAND):
        covered[part] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("data, message", [
    ("{not json", "not valid JSON"),
    ([], "non-empty"),
    ([{"people": []}], "canvas_width"),
    ([{"people": [{"pose_keypoints_2d": [1.0, 2.0]}], "canvas_width": 4, "canvas_height": 4}], "triples"),
    ([7], "dict"),
])
def test_bad_keypoint_data_is_refused(data, message):
    with pytest.raises(ControlNeXtError, match=message):
        frames_from_openpose(data)


def test_empty_frames_draw_black_and_bad_sizes_are_refused():
    empty = frames_from_openpose({"people": [], "canvas_width": 32, "canvas_height": 16})[0]
    assert not draw_pose(empty).any() and draw_pose(empty).shape == (16, 32, 3)
    with pytest.raises(ControlNeXtError, match="canvas"):
        draw_pose(PoseFrame(np.zeros((0, KEYPOINT_COUNT, 3)), 0, 0))
    with pytest.raises(ControlNeXtError, match="empty"):
        draw_poses([])
