"""Core tests: the official long-video window plan and the per-half gains (no ComfyUI)."""
from __future__ import annotations

import pytest
import torch

import controlnext_core as cn
from controlnext_testbed.official_layouts import random_encoder_state_dict
from controlnext_core.video import control_frames, fusion_weights, linear_guidance, plan_windows, resample_frames


def official_window_starts(num_frames: int, frames_per_batch: int, overlap: int) -> list[int]:
    """Transcribed from the official SVD-v2 pipeline's denoising loop."""
    starts = []
    for start in range(0, num_frames - overlap, frames_per_batch - overlap):
        starts.append(num_frames - frames_per_batch if start + frames_per_batch > num_frames else start)
    return starts


@pytest.mark.parametrize("frames,window,overlap", [(40, 14, 4), (72, 24, 6), (25, 24, 6), (30, 24, 6), (10, 4, 1)])
def test_windows_match_the_official_loop(frames, window, overlap):
    windows = plan_windows(frames, window, overlap)
    assert [w[0] for w in windows] == official_window_starts(frames, window, overlap)
    assert all(len(w) == window for w in windows)
    assert sorted({f for w in windows for f in w}) == list(range(frames))


def test_short_video_is_one_window_and_bad_plans_are_refused():
    assert plan_windows(6, 14, 4) == [list(range(6))]
    with pytest.raises(cn.ControlNeXtError, match="no frames"):
        plan_windows(0, 14, 4)
    with pytest.raises(cn.ControlNeXtError, match="overlap 14 must be .* smaller than the window"):
        plan_windows(40, 14, 14)


def test_first_frame_control_and_fusion_weights():
    assert control_frames([10, 11, 12]) == [0, 11, 12]
    assert fusion_weights([0, 1, 2]).tolist() == [1, 1, 1]
    assert fusion_weights([10, 11, 12]).tolist() == [0, 1, 1]  # the replaced frame does not count
    assert linear_guidance(3, 1.0, 3.0).tolist() == [1.0, 2.0, 3.0]


def test_resample_frames_picks_evenly():
    images = torch.arange(5.0).view(5, 1, 1, 1)
    assert resample_frames(images, 9).flatten().tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert resample_frames(images, 5) is images


def test_gains_per_cfg_half():
    sd15 = cn.load_controlnext(random_encoder_state_dict("mid"))
    assert sd15.gains(2.0) == pytest.approx((1.6, 1.6))  # file scale 0.8, both halves
    svd_v2 = cn.load_controlnext(random_encoder_state_dict("base"), "svd")
    assert svd_v2.gains(1.5) == (1.5, 0.0)  # cond half only
    svd_v1 = cn.load_controlnext(random_encoder_state_dict("svd_v1"))
    cond, uncond = svd_v1.gains(1.0)
    assert cond == pytest.approx(torch.sigmoid(torch.tensor(0.8)).item() * 1.3) and uncond == pytest.approx(0.65)
    assert svd_v1.gains(1.0, cond_only=True)[1] == 0.0
