"""DWPose detection (core): the official pipeline on tiny models with the real input/output
signatures (tests/tiny_preprocessors.py), written to a temp folder. Random weights check that
everything runs; "planted" outputs check the geometry.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch
from torch import nn

from controlnext_core import ControlNeXtError
from controlnext_core.preprocess.dwpose import (DWPoseDetector, crop_person, decode_simcc, load_runner, nms,
                                                onnx_input_shape, openpose_order, person_boxes)
from controlnext_core.preprocess.pose import KEYPOINT_COUNT, draw_pose
from controlnext_testbed.tiny_preprocessors import ANCHORS, PlantedDetector, PlantedPose, RandomDetector, RandomPose, save_torchscript


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dwpose")
    torch.manual_seed(0)
    detector = save_torchscript(RandomDetector(), torch.rand(1, 3, 640, 640) * 255,
                                folder / "yolox_l.torchscript.pt")
    pose = save_torchscript(RandomPose(), torch.rand(5, 3, 384, 288), folder / "dw-ll_ucoco_384_bs5.torchscript.pt")
    return detector, pose


def test_random_weight_models_run_end_to_end_on_a_batch(random_models):
    detector = DWPoseDetector.from_files(*random_models, device="cpu")
    frames = torch.rand(7, 120, 90, 3)
    progress = []
    poses = detector.detect(frames, on_progress=progress.append)
    assert len(poses) == 7 and sum(progress) == 7
    for pose in poses:
        assert pose.width == 90 and pose.height == 120
        assert pose.people >= 1 and pose.keypoints.shape[1:] == (KEYPOINT_COUNT, 3)
        assert np.isfinite(pose.keypoints).all()
        assert draw_pose(pose).shape == (120, 90, 3)


def test_planted_person_keypoints_land_where_the_geometry_says(tmp_path):
    """A box (100, 60)-(160, 220) in a 320x240 frame and SimCC peaks at known bins: each keypoint
    must come back at box-centre + (bin / 2 / model size - 1/2) x padded box size."""
    width, height = 320, 240
    x1, y1, x2, y2 = 100.0, 60.0, 160.0, 220.0
    ratio = 640 / width  # letterbox scale
    detector = PlantedDetector((x1 + x2) / 2 * ratio, (y1 + y2) / 2 * ratio, (x2 - x1) * ratio, (y2 - y1) * ratio)
    generator = torch.Generator().manual_seed(1)
    bins_x = torch.randint(100, 476, (133,), generator=generator)
    bins_y = torch.randint(100, 668, (133,), generator=generator)
    detector_path = save_torchscript(detector, torch.zeros(1, 3, 640, 640), tmp_path / "det.torchscript.pt")
    pose_path = save_torchscript(PlantedPose(bins_x, bins_y), torch.zeros(5, 3, 384, 288),
                                 tmp_path / "pose_384.torchscript.pt")
    found = DWPoseDetector.from_files(detector_path, pose_path).detect(torch.zeros(2, height, width, 3))
    assert [pose.people for pose in found] == [1, 1]
    # padded box 60x160 -> x1.25 = 75x200, aspect 288/384 = 0.75 -> 150x200 around (130, 140)
    expected_x = 130 + (bins_x.numpy() / 2 / 288 - 0.5) * 150
    expected_y = 140 + (bins_y.numpy() / 2 / 384 - 0.5) * 200
    mmpose_xy = np.stack([expected_x, expected_y], -1)
    expected = openpose_order(mmpose_xy[None], np.full((1, 133), 0.9))[0]
    keypoints = found[0].keypoints[0]
    assert np.allclose(keypoints[:, 0] * width, expected[:, 0], atol=1e-3)
    assert np.allclose(keypoints[:, 1] * height, expected[:, 1], atol=1e-3)
    assert np.allclose(keypoints[:, 2], expected[:, 2])
    assert keypoints[1, 2] == 1.0, "neck score is 1 when both shoulders are over 0.3"
    assert np.allclose(keypoints[1, :2] * [width, height], (mmpose_xy[5] + mmpose_xy[6]) / 2, atol=1e-3)


def test_nobody_found_means_the_whole_image_is_one_box(tmp_path):
    class Nobody(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            scores = torch.zeros(1, ANCHORS, 81)  # YOLOX outputs probabilities for objectness and classes
            return torch.cat([torch.full((1, ANCHORS, 4), -20.0), scores], dim=2) + 0 * x.mean()

    path = save_torchscript(Nobody(), torch.zeros(1, 3, 640, 640), tmp_path / "nobody.torchscript.pt")
    runner = load_runner(path, "cpu", "detector")
    detector = DWPoseDetector(runner, runner)
    assert np.array_equal(detector.boxes(np.zeros((50, 70, 3), np.uint8)), [[0, 0, 70, 50]])


def test_openpose_order_inserts_the_neck_and_moves_body_points():
    keypoints = np.arange(133 * 2, dtype=np.float64).reshape(1, 133, 2)
    scores = np.full((1, 133), 0.5)
    scores[0, 6] = 0.2  # one shoulder too weak: neck score 0
    ordered = openpose_order(keypoints, scores)[0]
    assert ordered.shape == (134, 3)
    assert np.array_equal(ordered[2, :2], keypoints[0, 6]) and np.array_equal(ordered[5, :2], keypoints[0, 5])
    assert np.array_equal(ordered[1, :2], (keypoints[0, 5] + keypoints[0, 6]) / 2) and ordered[1, 2] == 0
    assert np.array_equal(ordered[0, :2], keypoints[0, 0]) and np.array_equal(ordered[24:, :2], keypoints[0, 23:])


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=np.float64)
    assert nms(boxes, np.array([0.5, 0.9, 0.4]), 0.45) == [1, 2]


def test_detections_below_the_person_score_are_dropped():
    prediction = np.full((ANCHORS, 85), -20.0)
    prediction[:, 4:] = 0.0
    prediction[10, :6] = [0.5, 0.5, 1.0, 1.0, 0.5, 0.5]  # score 0.25: over NMS's 0.1, under the 0.3 kept
    assert len(person_boxes(prediction, 1.0)) == 0
    prediction[10, 4:6] = [1.0, 0.5]
    box = person_boxes(prediction, 2.0)
    centre, size = (np.array([10.5, 0.5]) * 8), np.exp(1.0) * 8
    assert np.allclose(box, [np.r_[centre - size / 2, centre + size / 2] / 2.0])


def test_crop_and_decode_are_inverse():
    image = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    crop, centre, scale = crop_person(image, np.array([50.0, 20.0, 130.0, 180.0]), (384, 288))
    assert crop.shape == (384, 288, 3)
    simcc_x, simcc_y = np.zeros((133, 576)), np.zeros((133, 768))
    simcc_x[:, 288], simcc_y[:, 384] = 1.0, 1.0  # the crop's centre
    keypoints, scores = decode_simcc(simcc_x, simcc_y, (384, 288), centre, scale)
    assert np.allclose(keypoints, centre) and np.allclose(scores, 1.0)
    simcc_x[:, :] = 0.0  # no response: location -1 (official)
    keypoints, scores = decode_simcc(simcc_x, simcc_y, (384, 288), centre, scale)
    assert (scores == 0).all()


def protobuf_field(number: int, payload: bytes | int) -> bytes:
    def varint(value: int) -> bytes:
        out = b""
        while True:
            byte, value = value & 0x7F, value >> 7
            out += struct.pack("B", byte | (0x80 if value else 0))
            if not value:
                return out
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_onnx_input_shape_is_read_from_the_file(tmp_path):
    dims = b"".join(protobuf_field(1, protobuf_field(1, d)) for d in (1, 3, 384, 288))
    symbolic = protobuf_field(1, protobuf_field(2, b"batch")) + b"".join(
        protobuf_field(1, protobuf_field(1, d)) for d in (3, 640, 640))
    for shape_bytes, expected in ((dims, [1, 3, 384, 288]), (symbolic, [None, 3, 640, 640])):
        tensor_type = protobuf_field(1, 1) + protobuf_field(2, shape_bytes)
        value_info = protobuf_field(1, b"input") + protobuf_field(2, protobuf_field(1, tensor_type))
        initializer = protobuf_field(5, protobuf_field(8, b"weight") + protobuf_field(9, os.urandom(3000)))
        graph = protobuf_field(1, protobuf_field(4, b"Conv")) + initializer + protobuf_field(11, value_info)
        model = protobuf_field(1, 8) + protobuf_field(7, graph) + protobuf_field(8, protobuf_field(2, 17))
        path = tmp_path / "model.onnx"
        path.write_bytes(model)
        assert onnx_input_shape(str(path)) == expected


def test_unreadable_or_foreign_model_files_say_what_to_do(tmp_path):
    broken = tmp_path / "yolox_l.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ControlNeXtError, match="download it again"):
        load_runner(str(broken), "cpu", "detector")
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"x")
    with pytest.raises(ControlNeXtError, match="ONNX"):
        load_runner(str(other), "cpu", "pose")
