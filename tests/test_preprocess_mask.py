"""Mask preprocessor (core): grow/shrink/feather/invert on shapes whose answer is known."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from controlnext_core import ControlNeXtError
from controlnext_core.preprocess.mask import dilate_disc, grow_mask, mask_control, mask_from_image


def square_mask(size: int = 40, top: int = 10, side: int = 20) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[0, top:top + side, top:top + side] = 1.0
    return mask


def euclidean_distance_to(mask: np.ndarray) -> np.ndarray:
    """Exact distance of every pixel to the nearest white one (cv2's precise L2 transform)."""
    return cv2.distanceTransform((mask == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


@pytest.mark.parametrize("radius", [1, 2, 5, 9])
def test_growing_a_point_gives_the_euclidean_disc(radius):
    mask = torch.zeros(1, 31, 31)
    mask[0, 15, 15] = 1.0
    grown = grow_mask(mask, radius)[0].numpy()
    rows, cols = np.mgrid[:31, :31]
    assert np.array_equal(grown == 1.0, (rows - 15) ** 2 + (cols - 15) ** 2 <= radius ** 2)


def test_growing_any_shape_keeps_the_pixels_within_the_radius():
    rng = np.random.default_rng(0)
    shape = (rng.random((2, 48, 64)) > 0.985).astype(np.float32)
    grown = grow_mask(torch.from_numpy(shape), 6).numpy()
    for frame, result in zip(shape, grown):
        assert np.array_equal(result == 1.0, euclidean_distance_to(frame) <= 6 + 1e-4)


def test_shrinking_a_square_removes_the_radius_from_each_side():
    shrunk = grow_mask(square_mask(), -3)[0]
    expected = square_mask(top=13, side=14)[0]
    assert torch.equal(shrunk, expected)


def test_shrinking_does_not_eat_the_image_border():
    full = torch.ones(1, 12, 12)
    assert torch.equal(grow_mask(full, -4), full)


def test_grey_level_dilation_takes_the_neighbourhood_maximum():
    mask = torch.zeros(1, 9, 9)
    mask[0, 4, 4] = 0.25
    mask[0, 4, 6] = 0.75
    grown = dilate_disc(mask, 1)[0]
    assert grown[4, 5] == 0.75 and grown[4, 3] == 0.25 and grown[3, 4] == 0.25 and grown[3, 3] == 0.0


def test_feather_softens_edges_symmetrically_and_keeps_the_inside():
    control = mask_control(square_mask(size=64, top=16, side=32), feather=6)[0, ..., 0]
    assert control[32, 32] == pytest.approx(1.0, abs=1e-4) and control[2, 2] == pytest.approx(0.0, abs=1e-4)
    edge_row = control[32]
    assert 0.3 < edge_row[16] < 0.7 and 0.3 < edge_row[47] < 0.7
    assert torch.all(edge_row[8:32].diff() >= -1e-6), "rises monotonically across the edge"
    assert torch.allclose(edge_row, edge_row.flip(0), atol=1e-5), "the square's two edges feather alike"
    assert control.sum() == pytest.approx(32 * 32, rel=1e-3), "blurring moves mass, it does not add any"


def test_invert_threshold_and_output_layout():
    soft = torch.linspace(0, 1, 50).reshape(1, 5, 10)
    control = mask_control(soft, invert=True, threshold=0.5)
    assert control.shape == (1, 5, 10, 3)
    assert torch.equal(control[..., 0], (soft <= 0.5).float())
    assert torch.equal(control[..., 0], control[..., 2])
    assert torch.equal(mask_control(soft)[..., 1], soft)


def test_mask_from_image_is_luminance_white_inside():
    image = torch.zeros(2, 6, 6, 3)
    image[0, 1:3, 1:3] = 1.0
    image[1, ..., 1] = 1.0  # pure green
    mask = mask_from_image(image)
    assert torch.equal(mask[0] == 1.0, image[0, ..., 0] == 1.0)
    assert mask[1, 0, 0] == pytest.approx(0.587)
    rgba = torch.cat([image, torch.zeros(2, 6, 6, 1)], dim=-1)
    assert torch.equal(mask_from_image(rgba), mask), "alpha is ignored"
    grey = image[..., :1]
    assert torch.allclose(mask_from_image(grey)[0], image[0, ..., 0]), "one channel is the grey level"


def test_a_single_mask_without_batch_becomes_a_batch_of_one():
    assert mask_control(torch.ones(4, 5)).shape == (1, 4, 5, 3)


@pytest.mark.parametrize("masks, message", [
    (torch.zeros(0, 4, 4), "empty"),
    (torch.zeros(1, 1, 4, 4), "batch, height, width"),
])
def test_bad_masks_are_refused(masks, message):
    with pytest.raises(ControlNeXtError, match=message):
        mask_control(masks)


def test_bad_threshold_is_refused():
    with pytest.raises(ControlNeXtError, match="threshold"):
        mask_control(torch.zeros(1, 4, 4), threshold=1.0)
