"""Core tests of the official SVD-v2 training data as the script reads it
(controlnext_core/video_dataset.py): the meta-info file, the frames taken, the hands mask."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import controlnext_core as cn
from controlnext_core import video_dataset as vd


def test_the_meta_info_file_lists_its_clips_and_every_missing_file_at_once(tmp_path):
    for name in ("a.mp4", "a_pose.mp4", "a.json"):
        (tmp_path / name).write_bytes(b"x")
    meta = tmp_path / "meta_info.json"
    meta.write_text(json.dumps([{"video_path": "a.mp4", "guide_path": "a_pose.mp4", "meta_info": "a.json"}]))
    [clip] = vd.read_meta_info(str(meta))
    assert clip == vd.ClipFiles(str(tmp_path / "a.mp4"), str(tmp_path / "a_pose.mp4"), str(tmp_path / "a.json"))
    meta.write_text(json.dumps([{"video_path": "b.mp4", "guide_path": "a_pose.mp4"}, {"video_path": "a.mp4"},
                                {"video_path": "a.mp4", "guide_path": "c.mp4"}]))
    with pytest.raises(cn.ControlNeXtError) as raised:
        vd.read_meta_info(str(meta))
    message = str(raised.value)
    assert "3 problem(s)" in message and "clip 0: its video_path" in message and "b.mp4 does not exist" in message
    assert "clip 1: needs 'video_path' and 'guide_path'" in message and "c.mp4 does not exist" in message
    meta.write_text("{")
    with pytest.raises(cn.ControlNeXtError, match="cannot be read"):
        vd.read_meta_info(str(meta))


def test_frames_are_taken_every_interval_from_a_random_start_and_the_interval_shrinks_for_short_clips():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        frames = vd.frame_indices(100, 14, 3, generator)
        assert len(frames) == 14 and all(b - a == 3 for a, b in zip(frames, frames[1:])) and frames[-1] < 100
    assert vd.frame_indices(28, 14, 3, generator) == list(range(0, 28, 2))  # 28 // 14 = 2
    drawn = {frames[1] - frames[0] for frames in (vd.frame_indices(200, 14, 0, generator) for _ in range(50))}
    assert drawn <= set(range(2, 8)) and len(drawn) > 1
    with pytest.raises(cn.ControlNeXtError, match="shorter than the 14 frames"):
        vd.frame_indices(10, 14, 3, generator)


def test_the_hands_mask_draws_confident_hand_boxes_with_a_margin_and_weights_the_loss():
    detections = {"hands_boxes": [[[0.25, 0.25], [0.5, 0.5]], [[0.75, 0.75], [1.0, 1.0]]],
                  "hands_score": [[0.9, 0.7], [0.4, 0.5]]}  # the second hand averages 0.45: not drawn
    mask = vd.hands_mask(detections, 100, 100, margin=10)
    assert mask.shape == (1, 100, 100)
    assert mask[0, 15, 15].item() == pytest.approx(0.8) and mask[0, 14, 14].item() == 0.0
    assert mask[0, 59, 59].item() == pytest.approx(0.8) and mask[0, 60, 60].item() == 0.0
    assert mask[0, 90, 90].item() == 0.0
    weights = vd.loss_weights(torch.stack([mask, mask]))
    assert weights[0].unique().tolist() == [1.0]  # the reference frame
    assert sorted(weights[1].unique().tolist()) == pytest.approx([1.0, 4.2])
    assert vd.hands_mask({}, 4, 4).sum().item() == 0.0


def write_frames(folder, count: int, width: int = 48, height: int = 32, offset: int = 0) -> None:
    """Frame i is a flat picture of value 5 * i + offset in every channel but the last (0): the value says
    which frame a sample took, and the channel order whether it was flipped."""
    folder.mkdir(parents=True)
    for index in range(count):
        picture = np.zeros((height, width, 3), np.uint8)
        picture[..., :2] = 5 * index + offset
        Image.fromarray(picture).save(folder / f"{index:04d}.png")


def frame_numbers(tensor, offset: int = 0, signed: bool = False) -> list[int]:
    values = (tensor[:, 0] + 1) / 2 if signed else tensor[:, 0]
    return [round((value.mean().item() * 255 - offset) / 5) for value in values]


def test_a_sample_takes_the_frames_every_interval_with_a_reference_frame_first_cut_to_the_aspect(tmp_path):
    write_frames(tmp_path / "frames", 40)
    write_frames(tmp_path / "poses", 40, offset=1)
    detections = [{"hands_boxes": [[[0.0, 0.0], [0.5, 1.0]]], "hands_score": [[0.9]]}] * 40
    video, guide = vd.frame_source(str(tmp_path / "frames")), vd.frame_source(str(tmp_path / "poses"))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        sample = vd.sample_clip(video, guide, detections, 6, 3, 16, 24, generator)
        assert sample.pixels.shape == (6, 3, 24, 16) and sample.poses.shape == (6, 3, 24, 16)
        numbers = frame_numbers(sample.pixels, signed=True)
        assert [b - a for a, b in zip(numbers[1:], numbers[2:])] == [3] * 4  # frames 1.. every 3rd
        assert frame_numbers(sample.poses, offset=1) == numbers  # each pose is its frame's, the reference's too
        assert torch.equal(sample.reference, sample.pixels[0])
        assert sample.pixels.min() >= -1 and sample.pixels.max() <= 1 and sample.pixels[:, 2].max() == -1
        assert sample.weights.shape == (6, 1, 24, 16) and sample.weights[0].unique().tolist() == [1.0]
        assert sample.weights[1:].max().item() == pytest.approx(4.2)  # the hand's box, within the cut
    references = {frame_numbers(vd.sample_clip(video, guide, None, 6, 3, 16, 24, generator).pixels, signed=True)[0]
                  for _ in range(30)}
    assert len(references) > 5  # drawn from the whole clip
    flipped = vd.sample_clip(video, guide, None, 6, 3, 16, 24, torch.Generator().manual_seed(1), guide_bgr=True)
    assert flipped.poses[:, 0].max() == 0 and flipped.poses[:, 2].max() > 0  # blue-first poses turned to RGB


def test_clip_problems_are_named(tmp_path):
    write_frames(tmp_path / "frames", 20)
    write_frames(tmp_path / "poses", 19, offset=1)
    video, guide = vd.frame_source(str(tmp_path / "frames")), vd.frame_source(str(tmp_path / "poses"))
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(cn.ControlNeXtError, match=r"has 20 frames but its poses .*poses have 19"):
        vd.sample_clip(video, guide, None, 4, 2, 16, 16, generator)
    assert vd.sample_clip(video, guide, None, 4, 2, 16, 16, generator, guide_slack=24).pixels.shape[0] == 4
    with pytest.raises(cn.ControlNeXtError, match="cover 3 frames of its 19"):
        vd.sample_clip(video, guide, [{}] * 3, 4, 2, 16, 16, generator, guide_slack=24)
    with pytest.raises(cn.ControlNeXtError, match="shorter than the 30 frames"):
        vd.sample_clip(video, guide, None, 30, 2, 16, 16, generator, guide_slack=24)
    write_frames(tmp_path / "small_poses", 20, width=24, height=16)
    with pytest.raises(cn.ControlNeXtError, match="24x16 but its frames 48x32"):
        vd.sample_clip(video, vd.frame_source(str(tmp_path / "small_poses")), None, 4, 2, 16, 16, generator)
    (tmp_path / "empty").mkdir()
    with pytest.raises(cn.ControlNeXtError, match="holds no frame pictures"):
        vd.frame_source(str(tmp_path / "empty"))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(cn.ControlNeXtError, match="cannot be read as a video"):
        vd.frame_source(str(tmp_path / "broken.mp4"))


def test_a_video_file_gives_its_frames(tmp_path):
    path = str(tmp_path / "video.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 8, (48, 32))
    for index in range(12):
        writer.write(np.full((32, 48, 3), 20 * index, np.uint8))
    writer.release()
    video = vd.frame_source(path)
    assert len(video) == 12 and video.read(0).shape == (32, 48, 3)
    assert [round(float(video.read(index).mean()) / 20) for index in (7, 2, 11)] == [7, 2, 11]  # seeks both ways


def test_clip_folders_are_read_and_every_problem_listed(tmp_path):
    write_frames(tmp_path / "a" / "frames", 4)
    write_frames(tmp_path / "a" / "poses", 4)
    (tmp_path / "a" / "hands.json").write_text("[]")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "video.mp4").write_bytes(b"")
    (tmp_path / "b" / "poses.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a clip")
    clips = vd.read_clip_folders(str(tmp_path))
    assert clips == [vd.ClipFiles(str(tmp_path / "a" / "frames"), str(tmp_path / "a" / "poses"),
                                  str(tmp_path / "a" / "hands.json")),
                     vd.ClipFiles(str(tmp_path / "b" / "video.mp4"), str(tmp_path / "b" / "poses.mp4"), None)]
    (tmp_path / "c").mkdir()
    write_frames(tmp_path / "d" / "frames", 2)
    with pytest.raises(cn.ControlNeXtError) as raised:
        vd.read_clip_folders(str(tmp_path))
    message = str(raised.value)
    assert "3 problem(s)" in message and "- c: no frames/ folder" in message and "- c: no poses/" in message
    assert "- d: no poses/ folder" in message and "DWPose" in message
    with pytest.raises(cn.ControlNeXtError, match="holds no clip folders"):
        vd.read_clip_folders(str(tmp_path / "a" / "frames"))
    assert vd.read_detections(str(tmp_path / "a" / "hands.json")) == []
    (tmp_path / "a" / "hands.json").write_text('{"hands_boxes": []}')
    with pytest.raises(cn.ControlNeXtError, match="not a list of per-frame detections"):
        vd.read_detections(str(tmp_path / "a" / "hands.json"))


def test_every_unusable_clip_is_named_before_training(tmp_path):
    write_frames(tmp_path / "good" / "frames", 8)
    write_frames(tmp_path / "good" / "poses", 8)
    write_frames(tmp_path / "short" / "frames", 3)
    write_frames(tmp_path / "short" / "poses", 3)
    write_frames(tmp_path / "uneven" / "frames", 8)
    write_frames(tmp_path / "uneven" / "poses", 7)
    write_frames(tmp_path / "small" / "frames", 8)
    write_frames(tmp_path / "small" / "poses", 8, width=24, height=16)
    clips = vd.read_clip_folders(str(tmp_path))
    problems = vd.clip_problems(clips, frames=4)
    assert len(problems) == 3
    assert "short/frames: 3 frames, fewer than the 4 a sample takes" in problems[0]
    assert "small/frames: frames 48x32 but poses 24x16" in problems[1]
    assert "uneven/frames: 8 frames but 7 poses in" in problems[2]
    assert vd.clip_problems(clips[3:], frames=4, guide_slack=24) == []  # the official data allows 24 frames
