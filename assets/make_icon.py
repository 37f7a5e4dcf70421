"""Draws the pack's icon, assets/icon.png (pyproject.toml [tool.comfy] Icon points at it on GitHub).

A star as a line drawing on the left, the same star painted on the right: a control image
turned into a picture. Remake it with ``.venv/bin/python assets/make_icon.py`` (Pillow only).
"""
from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw

SIZE = 256
SCALE = 4  # drawn larger, then scaled down: smooth edges
BACKGROUND = (27, 29, 34)


def star(centre: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for index in range(10):
        angle = -math.pi / 2 + index * math.pi / 5
        length = radius if index % 2 == 0 else radius * 0.45
        points.append((centre + length * math.cos(angle), centre + 0.06 * radius + length * math.sin(angle)))
    return points


def main() -> None:
    size = SIZE * SCALE
    outline = star(size / 2, size * 0.4)
    painted = Image.new("RGB", (size, size))
    for y in range(size):  # pink at the top to orange at the bottom
        t = y / size
        ImageDraw.Draw(painted).line([(0, y), (size, y)], fill=(int(235 + 15 * t), int(90 + 100 * t), int(170 - 120 * t)))
    shape = Image.new("L", (size, size))
    ImageDraw.Draw(shape).polygon(outline, fill=255)
    icon = Image.new("RGB", (size, size), BACKGROUND)
    icon.paste(painted, (0, 0), shape)
    draw = ImageDraw.Draw(icon)
    draw.rectangle([0, 0, size // 2, size], fill=BACKGROUND)  # the left half stays a line drawing
    draw.line(outline + outline[:1], fill=(240, 240, 240), width=3 * SCALE, joint="curve")
    icon_mask = Image.new("L", (size, size))
    ImageDraw.Draw(icon_mask).rounded_rectangle([0, 0, size - 1, size - 1], radius=size // 5, fill=255)
    result = Image.new("RGBA", (size, size))
    result.paste(icon, (0, 0), icon_mask)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "icon.png")
    result.resize((SIZE, SIZE), Image.LANCZOS).save(path, optimize=True)
    print(f"{path}: {os.path.getsize(path) // 1024} KB")


if __name__ == "__main__":
    main()
