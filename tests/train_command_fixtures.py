"""What the headless command's tests train with: tiny SD1.5 and SVD checkpoint files written by
ComfyUI's own saver (controlnext_testbed.checkpoint_files), a folder of training pairs, and one of
clips."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from controlnext_testbed.checkpoint_files import write_checkpoint


def write_sd15_checkpoint(path: str) -> None:
    write_checkpoint(path, "sd15")


def shape_picture(index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A picture of a filled square on a plain ground, and its edge map as the control."""
    generator = np.random.default_rng(index)
    picture = np.empty((size, size, 3), np.uint8)
    picture[:] = generator.integers(0, 256, 3)
    left, top = generator.integers(4, size // 2, 2)
    width = int(generator.integers(size // 4, size // 2))
    picture[top:top + width, left:left + width] = generator.integers(0, 256, 3)
    control = np.zeros((size, size, 3), np.uint8)
    control[top:top + width, [left, left + width - 1]] = 255
    control[[top, top + width - 1], left:left + width] = 255
    return picture, control


def write_pairs(folder: str, count: int, size: int = 64) -> None:
    """The folders layout: pictures with captions, controls in conditioning_images/."""
    os.makedirs(os.path.join(folder, "conditioning_images"), exist_ok=True)
    for index in range(count):
        picture, control = shape_picture(index, size)
        Image.fromarray(picture).save(os.path.join(folder, f"{index:03d}.png"))
        Image.fromarray(control).save(os.path.join(folder, "conditioning_images", f"{index:03d}.png"))
        with open(os.path.join(folder, f"{index:03d}.txt"), "w") as file:
            file.write(f"a square, number {index}")


def write_svd_checkpoint(path: str) -> None:
    write_checkpoint(path, "svd")


def write_clips(folder: str, count: int, frames: int = 6, size: int = 64) -> None:
    """Clip folders of the simple layout: a square moving down, its pose a white square, frames/ and
    poses/ of pictures."""
    for clip in range(count):
        for part in ("frames", "poses"):
            os.makedirs(os.path.join(folder, f"clip{clip}", part), exist_ok=True)
            for frame in range(frames):
                picture = np.zeros((size, size, 3), np.uint8)
                top = 4 * frame + 8 * clip
                picture[top:top + 24, 16:40] = 255 if part == "poses" else 150
                Image.fromarray(picture).save(os.path.join(folder, f"clip{clip}", part, f"{frame:02d}.png"))
