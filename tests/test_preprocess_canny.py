"""Canny preprocessor (core, no ComfyUI): the batched tensor route against cv2.Canny itself.

Measured pixel agreement of ``canny_batched`` with ``cv2.Canny`` (same 8-bit grey image, same
thresholds): 100 % on every image here (synthetic shapes, noise, odd sizes, batches of 1 and
48, fixed and automatic thresholds) and on ComfyUI's example photograph (host tests). With a
blur, cv2's fixed-point Gaussian kernel moves some grey levels by one: 99.87-99.95 % there.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlnext_core import ControlNeXtError
from controlnext_core.preprocess.canny import AUTO_SIGMA, auto_thresholds, blur_levels, canny, canny_batched, canny_cv2
from controlnext_core.preprocess.images import gray_levels


def official_canny(rgb: np.ndarray, low=None, high=None, blur_sigma: float = 0.0) -> np.ndarray:
    """The official SDXL canny_extractor (utils/preprocess.py) on one uint8 RGB image, optional blur first.

    (The official code writes ``threshold1 or auto``, so 0 means automatic there; here only None does.)
    """
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if blur_sigma > 0:
        gray = cv2.GaussianBlur(gray, (0, 0), blur_sigma)
    median = np.median(gray)
    low = low if low is not None else int(max(0, (1.0 - AUTO_SIGMA) * median))
    high = high if high is not None else int(min(255, (1.0 + AUTO_SIGMA) * median))
    return cv2.Canny(gray, low, high)


def as_image(frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> ComfyUI IMAGE floats, exactly as Load Image makes them (x / 255)."""
    return torch.from_numpy(frames).float() / 255.0


def edges_of(result: torch.Tensor) -> np.ndarray:
    assert result.shape[-1] == 3 and torch.equal(result[..., 0], result[..., 2])
    assert set(torch.unique(result).tolist()) <= {0.0, 1.0}
    return (result[..., 0].numpy() * 255).astype(np.uint8)


def agreement(ours: np.ndarray, reference: np.ndarray) -> float:
    return float((ours == reference).mean())


def shapes_image(height: int, width: int, seed: int) -> np.ndarray:
    """Synthetic shapes on a smooth background: circles, boxes, lines, text, a gradient."""
    rng = np.random.default_rng(seed)
    background = cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (width, height),
                            interpolation=cv2.INTER_CUBIC)
    image = np.ascontiguousarray(background)
    for _ in range(6):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            cv2.circle(image, (x, y), int(rng.integers(3, max(4, min(height, width) // 3))), colour, -1)
        elif kind == 1:
            cv2.rectangle(image, (x, y), (int(rng.integers(0, width)), int(rng.integers(0, height))), colour, -1)
        else:
            cv2.line(image, (x, y), (int(rng.integers(0, width)), int(rng.integers(0, height))), colour, 2)
    cv2.putText(image, "CN", (width // 5, height // 2), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (250, 250, 250), 2)
    return image


def test_grey_levels_are_cv2s():
    colours = np.random.default_rng(1).integers(0, 256, (1, 50, 70, 3), dtype=np.uint8)
    ours = gray_levels(as_image(colours))[0, 0].numpy()
    assert np.array_equal(ours, cv2.cvtColor(colours[0], cv2.COLOR_RGB2GRAY))


@pytest.mark.parametrize("size", [(97, 131), (64, 64), (5, 3), (1, 17)])
@pytest.mark.parametrize("thresholds", [(100, 200), (30, 60), (200, 100), (0, 0), (None, None)])
def test_batched_canny_equals_cv2_on_shapes(size, thresholds):
    height, width = size
    frame = shapes_image(height, width, seed=height * width)
    ours = edges_of(canny_batched(as_image(frame[None]), *thresholds))[0]
    reference = official_canny(frame, *thresholds)
    assert agreement(ours, reference) == 1.0
    if min(size) >= 64 and thresholds[1] is not None and thresholds != (0, 0):
        assert 0.0 < (reference > 0).mean() < 0.5, "the scene should have edges and background"


def test_batch_of_48_with_per_frame_automatic_thresholds():
    frames = np.stack([shapes_image(40, 56, seed) for seed in range(48)])
    ours = edges_of(canny_batched(as_image(frames)))
    reference = np.stack([official_canny(frame) for frame in frames])
    assert agreement(ours, reference) == 1.0
    lows, highs = auto_thresholds(gray_levels(as_image(frames)))
    assert len(set(zip(lows, highs))) > 10, "frames differ, so do their automatic thresholds"


def test_noise_keeps_every_nms_branch_and_long_hysteresis_chains():
    frame = np.random.default_rng(3).integers(0, 256, (150, 170, 3), dtype=np.uint8)
    for low, high in [(50, 400), (300, 900), (0, 1000)]:
        ours = edges_of(canny_batched(as_image(frame[None]), low, high))[0]
        assert agreement(ours, cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), low, high)) == 1.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), height=st.integers(3, 48), width=st.integers(3, 48),
       low=st.integers(0, 500), high=st.integers(0, 900), smooth=st.booleans())
def test_batched_canny_equals_cv2_on_random_images(seed, height, width, low, high, smooth):
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if smooth:
        frame = cv2.GaussianBlur(frame, (0, 0), 1.5)
    ours = edges_of(canny_batched(as_image(frame[None]), low, high))[0]
    assert agreement(ours, cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), low, high)) == 1.0


def test_automatic_thresholds_follow_numpy_median_for_even_and_odd_pixel_counts():
    rng = np.random.default_rng(4)
    for height, width in [(10, 10), (9, 11), (1, 2)]:
        frames = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
        lows, highs = auto_thresholds(gray_levels(as_image(frames)))
        for frame, low, high in zip(frames, lows, highs):
            median = np.median(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
            assert (low, high) == (int(max(0, (1.0 - AUTO_SIGMA) * median)), int(min(255, (1.0 + AUTO_SIGMA) * median)))


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_blur_agrees_with_cv2_gaussian_blur_closely(sigma):
    frame = shapes_image(120, 90, seed=5)
    blurred = blur_levels(gray_levels(as_image(frame[None])), sigma)[0, 0].numpy()
    cv2_blurred = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (0, 0), sigma)
    assert np.abs(blurred - cv2_blurred.astype(np.int64)).max() <= 1, "cv2 rounds its 8-bit kernel: one level at most"
    ours = edges_of(canny_batched(as_image(frame[None]), blur_sigma=sigma))[0]
    assert agreement(ours, official_canny(frame, blur_sigma=sigma)) >= 0.998  # measured 99.87 % and 99.95 %
    assert agreement(edges_of(canny_cv2(as_image(frame[None]), blur_sigma=sigma))[0],
                     official_canny(frame, blur_sigma=sigma)) == 1.0


def test_cpu_route_is_cv2_and_matches_the_batched_route():
    frames = np.stack([shapes_image(33, 47, seed) for seed in range(4)])
    images = as_image(frames)
    progress = []
    on_cpu = canny(images, 60, 120, device="cpu", on_progress=progress.append)
    assert sum(progress) == 4
    assert torch.equal(on_cpu, canny_cv2(images, 60, 120))
    assert torch.equal(on_cpu, canny_batched(images, 60, 120))


def test_one_channel_and_rgba_inputs_are_documented_conversions():
    frame = shapes_image(30, 40, seed=6)
    rgb = as_image(frame[None])
    grey = gray_levels(rgb).float().movedim(1, -1) / 255.0
    grey_as_rgb = canny_batched(grey.expand(-1, -1, -1, 3), 50, 100)
    assert torch.equal(canny_batched(grey, 50, 100), grey_as_rgb), "one channel is read as grey"
    rgba = torch.cat([rgb, torch.rand(1, 30, 40, 1)], dim=-1)
    assert torch.equal(canny_batched(rgba, 50, 100), canny_batched(rgb, 50, 100)), "alpha is ignored"
    assert torch.equal(canny_cv2(rgba, 50, 100), canny_cv2(rgb, 50, 100))


@pytest.mark.parametrize("images, message", [
    (torch.zeros(0, 8, 8, 3), "empty"),
    (torch.zeros(8, 8, 3), "image batch"),
    (torch.zeros(1, 8, 8, 2), "2 channels"),
])
def test_bad_images_are_refused_with_a_reason(images, message):
    for route in (canny_batched, canny_cv2):
        with pytest.raises(ControlNeXtError, match=message):
            route(images, 10, 20)


def test_bad_thresholds_are_refused():
    images = torch.zeros(1, 8, 8, 3)
    with pytest.raises(ControlNeXtError, match="both"):
        canny(images, 10, None)
    with pytest.raises(ControlNeXtError, match=">= 0"):
        canny(images, -1, 20)
    with pytest.raises(ControlNeXtError, match="blur_sigma"):
        canny(images, 1, 20, blur_sigma=-1)
