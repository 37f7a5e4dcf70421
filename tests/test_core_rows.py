"""Core tests: the row plan of one UNet call (controlnext_core/rows.py), the patch's encoding cache
and fitting control images to the latent (plain torch, no ComfyUI)."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import controlnext_core as cn
from controlnext_testbed.official_layouts import random_encoder_state_dict
from controlnext_core.encoding_cache import EncodingCache, refresh_block
from controlnext_core.rows import (CallLayout, add_planned_control, combined_mask, controls_any_chunk, encode_rows,
                                   plan_rows, row_images, row_masks, row_strengths)
from controlnext_core.schedule import LatentStrengths, parse_latent_strengths

UNCOND, COND = 1, 0


# --- the row plan ----------------------------------------------------------------------------

def test_each_cfg_half_gets_its_gain_times_the_schedule():
    plan = plan_rows(CallLayout((UNCOND, COND), rows=2), half_gains=(2.0, 0.5), over_time=0.5)
    assert plan.gains == ((0.25, 0.25), (1.0, 1.0))
    assert plan.active == (0, 1)


def test_a_control_that_leaves_every_chunk_alone_needs_no_plan():
    assert controls_any_chunk((1.0, 0.0), (COND, UNCOND), 1.0)
    assert not controls_any_chunk((1.0, 0.0), (UNCOND,), 1.0)  # cond only (SVD-v2) on an uncond call
    assert not controls_any_chunk((1.0, 1.0), (COND, UNCOND), 0.0)  # the schedule at 0


def test_latent_strengths_and_a_control_nets_call_scales_multiply_per_row():
    layout = CallLayout((UNCOND, COND), rows=3, total=3)
    plan = plan_rows(layout, (1.0, 1.0), latent_strengths=LatentStrengths(values=(1.0, 0.0, 0.5)),
                     call_strengths=(1.0, 1.0, 0.0, 0.5, 2.0, 0.0))
    assert plan.gains == ((1.0, 0.0, 0.0), (0.5, 0.0, 0.0))
    assert plan.active == (0,)  # row 1 is at 0 in both chunks: not worth encoding
    with pytest.raises(cn.ControlNeXtError, match="The control gave 4 strengths for 6 rows"):
        plan_rows(layout, (1.0, 1.0), call_strengths=(1.0,) * 4)


def test_under_a_window_each_row_takes_its_video_frames_strength():
    fade = parse_latent_strengths("-3=1, -1=0")  # the last three of 8 frames fade out
    layout = CallLayout((COND,), rows=3, frames=(0, 6, 7), total=8)
    assert row_strengths(fade, layout, "frames") == (1.0, 0.5, 0.0)
    assert plan_rows(layout, (1.0, 0.0), latent_strengths=fade, unit="frames").gains == ((1.0, 0.5, 0.0),)
    with pytest.raises(cn.ControlNeXtError, match="need the video's length.*ControlNeXt SVD Window Guider"):
        row_strengths(fade, CallLayout((COND,), rows=3, frames=(0, 1, 2), total=None), "frames")


def test_a_window_must_list_one_frame_per_row():
    with pytest.raises(cn.ControlNeXtError, match="lists 2 frames for 3 latent rows"):
        CallLayout((COND,), rows=3, frames=(0, 1))


def test_row_images_one_for_all_one_per_latent_or_the_windows_frames():
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 8, 8)
    one = images[:1]
    assert row_images(one, CallLayout((COND,), 4, total=4), "latents") is one
    assert row_images(images, CallLayout((COND,), 6, total=6), "latents") is images
    window = row_images(images, CallLayout((COND,), 3, frames=(0, 4, 5), total=6), "frames")
    assert window[:, 0, 0, 0].tolist() == [0.0, 4.0, 5.0]
    with pytest.raises(cn.ControlNeXtError, match=r"6 control images for 4 latents: give one image \(used for the "
                                                  r"whole batch\) or exactly 4\.$"):
        row_images(images, CallLayout((COND,), 4, total=4), "latents")
    with pytest.raises(cn.ControlNeXtError, match="6 control images for 12 frames: give one per video frame, or set "
                                                  "frame_count to resample"):
        row_images(images, CallLayout((COND,), 12, total=12), "frames")
    resampled = row_images(images, CallLayout((COND,), 12, total=12), "frames", frame_policy="resample")
    assert resampled.shape[0] == 12 and resampled[0, 0, 0, 0] == 0.0 and resampled[-1, 0, 0, 0] == 5.0
    with pytest.raises(cn.ControlNeXtError, match="window reaches frame 7 but there are only 6 control images"):
        row_images(images, CallLayout((COND,), 2, frames=(0, 6), total=None), "frames")


def test_row_masks_one_for_all_one_per_latent_or_the_windows_frames():
    masks = torch.arange(4.0).view(4, 1, 1).expand(4, 8, 8)
    assert row_masks(None, CallLayout((COND,), 2), "latents") is None
    one = masks[:1]
    assert row_masks(one, CallLayout((COND,), 2, total=2), "latents") is one
    assert row_masks(masks, CallLayout((COND,), 4, total=4), "latents") is masks
    assert row_masks(masks, CallLayout((COND,), 2, frames=(0, 3), total=4), "frames")[:, 0, 0].tolist() == [0.0, 3.0]
    with pytest.raises(cn.ControlNeXtError, match="4 masks for a batch of 2 latents: give one mask or exactly 2"):
        row_masks(masks, CallLayout((COND,), 2, total=2), "latents")
    with pytest.raises(cn.ControlNeXtError, match="4 masks for 6 frames: give one mask or one per video frame"):
        row_masks(masks, CallLayout((COND,), 2, frames=(0, 1), total=6), "frames")
    with pytest.raises(cn.ControlNeXtError, match="window reaches frame 6 but there are only 4 masks"):
        row_masks(masks, CallLayout((COND,), 2, frames=(0, 5), total=None), "frames")


def test_combined_mask_is_the_product_at_the_first_masks_size():
    left = torch.zeros(1, 8, 8)
    left[..., :4] = 1.0
    top = torch.zeros(2, 4, 4)
    top[:, :2] = 1.0
    both = combined_mask(left, top)
    assert both.shape == (2, 8, 8)
    assert both[:, 0, 0].tolist() == [1.0, 1.0] and both[:, 0, 7].tolist() == [0.0, 0.0]
    assert both[:, 7, 0].tolist() == [0.0, 0.0]
    assert combined_mask(None, top) is top and combined_mask(left, None) is left


def test_add_planned_control_adds_each_chunk_at_its_rows_strengths():
    rule = cn.rule_for("sdxl", "base")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 8, 6, 6, generator=generator)
    unit = torch.randn(2, 8, 6, 6, generator=generator)
    mask = torch.ones(2, 6, 6)
    mask[1, :, 3:] = 0.0
    plan = plan_rows(CallLayout((UNCOND, COND), 2, total=2), (1.0, 0.0), latent_strengths=LatentStrengths((1.0, 0.5)))
    out = add_planned_control(hidden, unit, rule, plan, mask)
    assert torch.equal(out[:2], hidden[:2])  # the uncond chunk at 0: untouched
    expected = cn.add_unit_control(hidden[2:], unit, rule, torch.tensor([1.0, 0.5]), mask)
    assert torch.equal(out[2:], expected)
    # a CONTROL_NET's per-call mask (one per row of every chunk) multiplies the options' mask
    call_mask = torch.zeros(4, 6, 6)
    call_mask[3] = 1.0
    masked = add_planned_control(hidden, unit, rule, plan, mask, call_mask)
    assert torch.equal(masked[2], hidden[2])
    assert torch.equal(masked[3], expected[1])


def test_add_planned_control_takes_the_statistics_of_the_unets_own_hidden_state():
    rule = cn.rule_for("sdxl", "base")
    generator = torch.Generator().manual_seed(1)
    own, unit = torch.randn(2, 8, 4, 4, generator=generator), torch.randn(1, 8, 4, 4, generator=generator)
    plan = plan_rows(CallLayout((UNCOND, COND), 1), (0.7, 0.7))
    first = add_planned_control(own, unit, rule, plan)
    second = add_planned_control(first, unit, rule, plan, statistics_of=own)
    assert torch.allclose(second - first, first - own, atol=1e-5)


def test_encode_rows_encodes_one_image_once_and_only_the_rows_asked_for():
    controlnext = cn.load_controlnext(random_encoder_state_dict("base", 3), "sdxl")
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([700.0, 500.0, 300.0])
    every_row = encode_rows(controlnext, images, timesteps, (8, 8), torch.float32, rows=3, subset=None)
    assert every_row.shape == (3, 320, 8, 8)
    subset = encode_rows(controlnext, images, timesteps, (8, 8), torch.float32, rows=3, subset=(0, 2))
    assert torch.allclose(subset[[0, 2]], every_row[[0, 2]], atol=1e-5)
    assert torch.equal(subset[1], torch.zeros_like(subset[1]))
    shared = encode_rows(controlnext, images[:1], timesteps[:1], (8, 8), torch.float32, rows=3, subset=None)
    assert shared.shape[0] == 1 and torch.allclose(shared, every_row[:1], atol=1e-5)


# --- the encoding cache ----------------------------------------------------------------------

def test_the_cache_reuses_the_last_encoding_only_for_the_same_sigmas_and_inputs():
    cache, unit = EncodingCache(), torch.ones(1)
    cache.store((5.0,), ("size",), None, unit)
    assert cache.find((5.0,), ("size",), None) is unit
    assert cache.find((4.0,), ("size",), None) is None and cache.find((5.0,), ("other",), None) is None
    cache.clear()
    assert cache.last is None and cache.find((5.0,), ("size",), None) is None


def test_refresh_mode_holds_one_encoding_per_block_of_steps_and_forgets_the_last_block():
    run = (10.0, 7.0, 4.0, 2.0, 0.0)  # 4 steps
    assert [refresh_block(run, sigma, 2)[1] for sigma in (10.0, 8.0, 7.0, 4.0, 3.0, 2.0)] == [0, 0, 0, 1, 1, 1]
    assert refresh_block(run, 7.0, 1)[1] == 1
    cache, first, later = EncodingCache(), torch.ones(1), torch.zeros(1)
    cache.store((10.0,), ("size",), refresh_block(run, 10.0, 2), first)
    assert cache.find((7.0,), ("size",), refresh_block(run, 7.0, 2)) is first  # step 1: the block's control
    assert cache.find((4.0,), ("size",), refresh_block(run, 4.0, 2)) is None  # step 2: a new block...
    assert cache.held == {}  # ...and the last one's controls are let go
    cache.store((4.0,), ("size",), refresh_block(run, 4.0, 2), later)
    assert cache.find((2.0,), ("size",), refresh_block(run, 2.0, 2)) is later
    other_run = (10.0, 7.0, 4.0, 2.0, 1.0, 0.0)  # another run, where 2.0 is in a block of the same index
    assert cache.find((2.0,), ("size",), refresh_block(other_run, 2.0, 2)) is None


def test_a_runs_sigmas_are_read_once_per_run():
    cache = EncodingCache()
    run = torch.tensor([3.0, 1.0, 0.0])
    assert cache.run_sigmas(run) == (3.0, 1.0, 0.0)
    run[0] = 2.0  # the same tensor: not read again
    assert cache.run_sigmas(run) == (3.0, 1.0, 0.0)
    assert cache.run_sigmas(torch.tensor([2.0, 0.0])) == (2.0, 0.0)


# --- fitting control images to the latent ----------------------------------------------------

def pixels(height: int, width: int) -> torch.Tensor:
    """[1,3,H,W] whose every pixel differs: where each one lands can be read back."""
    return (torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width) / (height * width)).expand(
        1, 3, height, width)


@pytest.mark.parametrize("height, width, top, left, crop_height, crop_width", [
    (40, 100, 0, 30, 40, 40),  # wider than the 1:1 target: the sides are cut
    (100, 40, 30, 0, 40, 40),  # taller: top and bottom are cut
    (30, 43, 0, 6, 30, 31),  # (43 - 30) / 2 = 6.5 rounds to even, as ComfyUI's round() does
    (32, 32, 0, 0, 32, 32),  # the target's aspect ratio: all of it, scaled
])
def test_fit_control_cuts_the_centre_at_the_targets_aspect_ratio_then_scales_nearest(height, width, top, left,
                                                                                    crop_height, crop_width):
    image = pixels(height, width)
    crop = image[..., top:top + crop_height, left:left + crop_width]
    assert torch.equal(cn.fit_control(image, 64, 64), F.interpolate(crop, size=(64, 64), mode="nearest-exact"))


def test_fit_control_of_the_target_size_is_the_image_and_training_still_stretches():
    image = pixels(64, 64)
    assert cn.fit_control(image, 64, 64) is image
    wide = pixels(32, 64)
    assert cn.resize_control(wide, 64, 64).shape == (1, 3, 64, 64)
    assert not torch.equal(cn.resize_control(wide, 64, 64), cn.fit_control(wide, 64, 64))
    assert cn.fit_control(wide, 64, 64)[..., 0, 0].tolist() == wide[..., 0, 16].tolist()  # from the centre


def test_fit_control_keeps_a_pixel_of_a_tiny_image():
    image = pixels(2, 2)
    fitted = cn.fit_control(image, 64, 192)  # the exact cut of a 2-pixel-high image to 1:3 would be empty
    assert torch.equal(fitted, F.interpolate(image, size=(64, 192), mode="nearest-exact"))
    assert cn.fit_control(pixels(3, 3), 64, 192).unique().tolist() == pixels(3, 3)[0, 0, 1].tolist()  # the middle row
