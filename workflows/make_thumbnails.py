"""Draws the template pictures of the editor's template browser: workflows/<template>.jpg.

ComfyUI's editor shows, for a template of a custom node pack, the picture of the same name beside
the workflow (see README, Workflows). Each picture is the control image a template makes (with
this pack's own preprocessors: Canny, Depth Map's colouring, Mask Control Image, Draw Pose) beside
a drawing of what the prompt asks for along that control, and one line saying what it does.
Remake them from the checkout with ``.venv/bin/python workflows/make_thumbnails.py``.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from controlnext_core.preprocess.canny import canny  # noqa: E402
from controlnext_core.preprocess.depth import depth_control  # noqa: E402
from controlnext_core.preprocess.mask import mask_control  # noqa: E402
from controlnext_core.preprocess.pose import KEYPOINT_COUNT, PoseFrame, draw_pose  # noqa: E402
from controlnext_testbed import toy_shapes  # noqa: E402

SIZE = 384  # square: both editors fit it into a square card
PANEL = (160, 230)  # two panels side by side, below the corner the newer editor covers with a badge
PANEL_TOP = 40
CAPTION_TOP = 284
BACKGROUND = (27, 29, 34)
SUPERSAMPLING = 3  # shapes are drawn larger, then scaled down: smooth edges
SKIN, HAIR, WHITE = (238, 203, 176), (92, 58, 44), (246, 246, 242)

# The standing person of the mask and video pictures: OpenPose COCO-18 points (x, y) in [0, 1].
STANDING = np.array([(.5, .16), (.5, .25), (.38, .27), (.34, .41), (.33, .55), (.62, .27), (.66, .41), (.67, .55),
                     (.44, .55), (.43, .73), (.43, .92), (.56, .55), (.57, .73), (.57, .92), (.48, .145),
                     (.52, .145), (.46, .16), (.54, .16)])


def draw_scaled(size: tuple[int, int], paint, background=(0, 0, 0)) -> np.ndarray:
    """RGB uint8 [h, w, 3]: ``paint(draw, w, h)`` on a larger canvas, scaled down. The background is
    a colour or an RGB picture of ``size``."""
    width, height = size[0] * SUPERSAMPLING, size[1] * SUPERSAMPLING
    if isinstance(background, np.ndarray):
        picture = Image.fromarray(background).resize((width, height), Image.BICUBIC)
    else:
        picture = Image.new("RGB", (width, height), background)
    paint(ImageDraw.Draw(picture), width, height)
    return np.asarray(picture.resize(size, Image.LANCZOS))


def batch(picture: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(picture.copy()).float()[None] / 255.0


def pixels(images: torch.Tensor) -> np.ndarray:
    return (images[0].clamp(0, 1) * 255).round().byte().numpy()


def dance(phase: float) -> np.ndarray:
    """STANDING with the arms raised and swung by ``phase`` (0..1) and a step to the side."""
    points = STANDING.copy()
    for shoulder, elbow, wrist, side in ((2, 3, 4, -1), (5, 6, 7, 1)):
        angle = np.pi * (0.15 + 0.6 * phase if side < 0 else 0.75 - 0.6 * phase)
        upper = np.array([side * np.cos(angle), -np.sin(angle) + 0.4]) * 0.14
        points[elbow] = points[shoulder] + upper
        points[wrist] = points[elbow] + upper * 0.95
    points[[12, 13], 0] += 0.08 * phase
    return points


def paint_person(points: np.ndarray, colours: dict, draw, width: int, height: int) -> None:
    """A simple person along the 18 points: limbs, torso, shorts, head, in the given colours."""
    at = np.array([(x * width, y * height) for x, y in points])
    limb = 0.055 * height
    for a, b, c in ((8, 9, 10), (11, 12, 13)):
        draw.line([tuple(at[a]), tuple(at[b]), tuple(at[c])], fill=colours["skin"], width=int(limb), joint="curve")
    thighs = at[[9, 12]] * 0.45 + at[[8, 11]] * 0.55
    crotch = (at[8] + at[11]) / 2 + (0, 0.07 * height)
    draw.polygon([tuple(p) for p in (at[8] - (limb * .7, 0), at[11] + (limb * .7, 0), thighs[1] + (limb * .7, 0),
                                     crotch, thighs[0] - (limb * .7, 0))], fill=colours["shorts"])
    for a, b, c in ((2, 3, 4), (5, 6, 7)):
        draw.line([tuple(at[a]), tuple(at[b]), tuple(at[c])], fill=colours["skin"], width=int(limb * .8),
                  joint="curve")
    draw.polygon([tuple(p) for p in (at[2] + (0, -limb * .3), at[5] + (0, -limb * .3), at[11] + (limb * .6, 0),
                                     at[8] - (limb * .6, 0))], fill=colours["top"])
    at = [tuple(p) for p in at]
    draw.line([at[0], at[1]], fill=colours["skin"], width=int(limb))
    radius = 0.065 * height
    draw.ellipse([at[0][0] - radius, at[0][1] - radius * 1.2, at[0][0] + radius, at[0][1] + radius],
                 fill=colours["skin"])
    draw.chord([at[0][0] - radius * 1.1, at[0][1] - radius * 1.35, at[0][0] + radius * 1.1, at[0][1] + radius * 0.6],
               180, 360, fill=colours["hair"])


def pose_frame(points: np.ndarray) -> PoseFrame:
    keypoints = np.zeros((1, KEYPOINT_COUNT, 3))
    keypoints[0, :18, :2], keypoints[0, :18, 2] = points, 1.0
    return PoseFrame(keypoints, *PANEL)


def lava_tower(size: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor]:
    """'A diamond tower in the middle of a lava lake': the painting and its disparity (near = large)."""
    width, height = size
    horizon, base = 0.45, 0.72
    tower = [(.5, .1), (.6, .3), (.58, base), (.42, base), (.4, .3)]

    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    glow = np.sin(14 * x + 5 * np.sin(11 * y)) * np.sin(30 * y + 3 * x)  # crust and molten streaks
    lava = np.stack([np.full_like(glow, 250), 120 + 90 * glow.clip(0), 30 + 50 * glow.clip(0)], -1)
    lava[glow < -0.3] = (110, 25, 20)
    sky = np.stack([60 + 150 * y / horizon, 20 + 40 * y / horizon, np.full_like(y, 40)], -1)
    scene = np.where((y < horizon)[..., None], sky, lava).astype(np.uint8)

    def paint(draw, w, h):
        draw.polygon([(0, horizon * h), (.15 * w, .33 * h), (.3 * w, .4 * h), (.72 * w, .3 * h), (w, horizon * h)],
                     fill=(45, 25, 35))
        draw.polygon([(x * w, y * h) for x, y in tower], fill=(150, 230, 255))
        draw.polygon([(x * w, y * h) for x, y in (tower[0], tower[1], tower[2], (.5, base))], fill=(60, 130, 220))
        draw.line([(.5 * w, .1 * h), (.5 * w, base * h)], fill=(235, 250, 255), width=w // 80)

    ys = (torch.arange(height).float() + 0.5) / height
    disparity = ((ys - horizon).clamp(min=0) / (1 - horizon))[:, None].expand(height, width).clone()
    disparity[ys < horizon] = 0.05
    mask = draw_scaled(size, lambda d, w, h: d.polygon([(x * w, y * h) for x, y in tower], fill=(255, 255, 255)))
    disparity[torch.from_numpy(mask[..., 0] > 127)] = (base - horizon) / (1 - horizon)
    return draw_scaled(size, paint, background=scene), disparity


def anime_portrait(size: tuple[int, int], outlined: bool) -> np.ndarray:
    """'1girl, upper body, white background, anime style', optionally with dark outlines."""
    outline = (40, 30, 50) if outlined else None

    def paint(draw, w, h):
        line = w // 60 if outlined else 0
        draw.ellipse([.16 * w, .12 * h, .84 * w, .7 * h], fill=(210, 110, 160), outline=outline, width=line)
        draw.polygon([(.1 * w, h), (.22 * w, .68 * h), (.78 * w, .68 * h), (.9 * w, h)], fill=WHITE,
                     outline=outline, width=line)
        draw.polygon([(.3 * w, .68 * h), (.5 * w, .86 * h), (.7 * w, .68 * h)], fill=(40, 60, 120),
                     outline=outline, width=line)
        draw.rectangle([.44 * w, .52 * h, .56 * w, .7 * h], fill=SKIN)
        draw.ellipse([.27 * w, .2 * h, .73 * w, .62 * h], fill=SKIN, outline=outline, width=line)
        draw.chord([.24 * w, .14 * h, .76 * w, .5 * h], 180, 360, fill=(210, 110, 160), outline=outline, width=line)
        for x in (.38, .62):
            draw.ellipse([(x - .06) * w, .36 * h, (x + .06) * w, .47 * h], fill=(70, 40, 120), outline=outline,
                         width=line)
            draw.ellipse([(x - .02) * w, .38 * h, (x + .01) * w, .41 * h], fill=(255, 255, 255))
        draw.arc([.45 * w, .5 * h, .55 * w, .56 * h], 20, 160, fill=(150, 60, 70), width=max(2, w // 120))

    return draw_scaled(size, paint, background=(255, 255, 255))


def stone_tower(size: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor]:
    """'A stone tower on a rocky island, sunset': the painting and its disparity."""
    width, height = size
    horizon = 0.55
    island = [(.1, .78), (.3, .58), (.7, .56), (.92, .8)]
    tower = [(.4, .2), (.6, .2), (.6, .62), (.4, .62)]

    def paint(draw, w, h):
        for y in range(h):
            t = y / h
            colour = (255, int(120 + 100 * t), int(90 + 60 * t)) if t < horizon else (40, 70, int(110 + 60 * t))
            draw.line([(0, y), (w, y)], fill=colour)
        draw.ellipse([.62 * w, .3 * h, .82 * w, .5 * h], fill=(255, 225, 120))
        draw.polygon([(x * w, y * h) for x, y in island], fill=(90, 75, 70))
        draw.polygon([(x * w, y * h) for x, y in tower], fill=(150, 145, 140))
        for x in (.4, .47, .53):  # battlements
            draw.rectangle([x * w, .15 * h, (x + .04) * w, .2 * h], fill=(150, 145, 140))
        for y in np.arange(.26, .6, .07):
            draw.line([(.4 * w, y * h), (.6 * w, y * h)], fill=(110, 105, 100), width=w // 100)
        draw.rectangle([.47 * w, .5 * h, .53 * w, .62 * h], fill=(50, 40, 40))

    ys = (torch.arange(height).float() + 0.5) / height
    disparity = ((ys - horizon).clamp(min=0) / (1 - horizon))[:, None].expand(height, width).clone()
    near = draw_scaled(size, lambda d, w, h: [d.polygon([(x * w, y * h) for x, y in shape], fill=(255, 255, 255))
                                              for shape in (island, tower)])
    disparity[torch.from_numpy(near[..., 0] > 127)] = 0.45
    return draw_scaled(size, paint), disparity


def canny_pair(outlined: bool) -> list[np.ndarray]:
    drawing = anime_portrait(PANEL, outlined)
    return [pixels(canny(batch(anime_portrait(PANEL, False)))), drawing]


def depth_pair() -> list[np.ndarray]:
    painting, disparity = lava_tower(PANEL)
    return [pixels(depth_control(disparity[None])), painting]


def mask_pair() -> list[np.ndarray]:
    clothes = {"skin": (0, 0, 0), "hair": (0, 0, 0), "top": (255, 255, 255), "shorts": (255, 255, 255)}
    region = draw_scaled(PANEL, lambda d, w, h: paint_person(STANDING, clothes, d, w, h))
    dressed = {"skin": SKIN, "hair": HAIR, "top": WHITE, "shorts": (215, 222, 235)}
    person = draw_scaled(PANEL, lambda d, w, h: paint_person(STANDING, dressed, d, w, h), background=(150, 170, 190))
    return [pixels(mask_control(batch(region)[..., 0], feather=2)), person]


def stacked_pair() -> list[np.ndarray]:
    """Two controls in one panel (depth over edges), and the painting."""
    half = (PANEL[0], PANEL[1] // 2 - 2)
    painting = stone_tower(PANEL)[0]
    small_painting, small_disparity = stone_tower(half)
    controls = np.full((*PANEL[::-1], 3), BACKGROUND, dtype=np.uint8)
    controls[:half[1]] = pixels(depth_control(small_disparity[None]))
    controls[-half[1]:] = pixels(canny(batch(small_painting)))
    return [controls, painting]


def two_controls_pair() -> list[np.ndarray]:
    """Edges over depth in one panel (the edges' schedule as a fading bar between them), and the painting."""
    half = (PANEL[0], PANEL[1] // 2 - 8)
    painting = lava_tower(PANEL)[0]
    small_painting, small_disparity = lava_tower(half)
    controls = np.full((*PANEL[::-1], 3), BACKGROUND, dtype=np.uint8)
    controls[:half[1]] = pixels(canny(batch(small_painting)))
    fade = np.clip(1.0 - np.linspace(0.0, 1.0, PANEL[0]) / 0.6, 0.0, 1.0)  # canny: 1 -> 0 at 60 % of sampling
    controls[half[1] + 4:half[1] + 12] = (fade[None, :, None] * 235).astype(np.uint8)
    controls[-half[1]:] = pixels(depth_control(small_disparity[None]))
    return [controls, painting]


def video_strip(fade_out: bool = False) -> np.ndarray:
    """Three pose frames over the person dancing them: one picture the size of both panels; with
    ``fade_out`` the last frames' poses fade, as their control does."""
    width = 2 * PANEL[0] + 32
    frame = (width // 3 - 6, PANEL[1] // 2 - 4)
    strip = np.full((PANEL[1], width, 3), BACKGROUND, dtype=np.uint8)
    dressed = {"skin": SKIN, "hair": HAIR, "top": (220, 80, 90), "shorts": (60, 70, 120)}
    for index, phase in enumerate((0.0, 0.5, 1.0)):
        points = dance(phase)
        x = index * (frame[0] + 9)
        keypoints = pose_frame(points)
        lines = Image.fromarray(draw_pose(keypoints, *frame)).filter(ImageFilter.MaxFilter(3))  # visible when small
        strength = (1.0, 0.45, 0.12)[index] if fade_out else 1.0
        strip[:frame[1], x:x + frame[0]] = (np.asarray(lines) * strength).astype(np.uint8)
        strip[-frame[1]:, x:x + frame[0]] = draw_scaled(frame, lambda d, w, h: paint_person(points, dressed, d, w, h),
                                                        background=(235, 225, 205))
    return strip


def demo_strip() -> np.ndarray:
    """The demo's side-by-side picture, drawn: a toy shapes picture's edges, a sample of the toy base
    without them (soft blobs anywhere) and one with them (blobs gathered along the shapes)."""
    rng = np.random.default_rng(0)
    shapes, other = toy_shapes.draw_picture(rng), toy_shapes.draw_picture(rng)
    panels = [pixels(canny(batch(shapes), *toy_shapes.CANNY_THRESHOLDS)),
              np.asarray(Image.fromarray(other).filter(ImageFilter.GaussianBlur(4))),
              np.asarray(Image.fromarray(shapes).filter(ImageFilter.GaussianBlur(2.5)))]
    width, gap = 2 * PANEL[0] + 32, 8
    side = (width - 2 * gap) // 3
    strip = np.full((PANEL[1], width, 3), BACKGROUND, dtype=np.uint8)
    top = (PANEL[1] - side) // 2
    for index, panel in enumerate(panels):
        resample = Image.NEAREST if index == 0 else Image.BICUBIC
        x = index * (side + gap)
        strip[top:top + side, x:x + side] = np.asarray(Image.fromarray(panel).resize((side, side), resample))
    return strip


def video_training_pair() -> list[np.ndarray]:
    """Left: frames of your clips beside their poses (what training learns from); right: the
    reference picture dancing a new pose with the trained ControlNeXt."""
    tile = (PANEL[0] // 2, PANEL[1] // 3)
    clip = {"skin": SKIN, "hair": HAIR, "top": (90, 160, 110), "shorts": (50, 50, 60)}
    grid = np.zeros((PANEL[1], PANEL[0], 3), np.uint8)
    for row, phase in enumerate((0.0, 0.4, 0.8)):
        points = dance(phase)
        grid[row * tile[1]:(row + 1) * tile[1], :tile[0]] = draw_scaled(
            tile, lambda d, w, h: paint_person(points, clip, d, w, h), background=(235, 225, 205))
        lines = Image.fromarray(draw_pose(pose_frame(points), *tile)).filter(ImageFilter.MaxFilter(3))
        grid[row * tile[1]:(row + 1) * tile[1], tile[0]:] = np.asarray(lines)
    reference = {"skin": SKIN, "hair": HAIR, "top": (220, 80, 90), "shorts": (60, 70, 120)}
    points = dance(0.6)
    return [grid, draw_scaled(PANEL, lambda d, w, h: paint_person(points, reference, d, w, h),
                              background=(235, 225, 205))]


# Template name -> (its pictures, one line on what it does).
def training_pair(painting) -> list[np.ndarray]:
    """Left: your pictures over their edges (what training learns from); right: a picture the trained
    ControlNeXt draws from new edges."""
    tile = (PANEL[0] // 2, PANEL[1] // 3)
    pictures = [stone_tower(tile)[0], lava_tower(tile)[0], anime_portrait(tile, False)]
    grid = np.zeros((PANEL[1], PANEL[0], 3), np.uint8)
    for row, picture in enumerate(pictures):
        grid[row * tile[1]:(row + 1) * tile[1], :tile[0]] = picture
        grid[row * tile[1]:(row + 1) * tile[1], tile[0]:] = pixels(canny(batch(picture)))
    result = painting(PANEL)
    return [grid, result[0] if isinstance(result, tuple) else result]


TEMPLATES = {
    "ControlNeXt SD1.5 Depth": (depth_pair, "The depth of your photo shapes a new picture"),
    "ControlNeXt SD1.5 Mask": (mask_pair, "Dresses a person where your mask is white"),
    "ControlNeXt SDXL Canny": (lambda: canny_pair(False), "The edges of your photo, drawn anime style"),
    "ControlNeXt SDXL Canny + UNet": (lambda: canny_pair(True), "Tighter control: the release's UNet weights added"),
    "ControlNeXt SD1.5 + ControlNet": (stacked_pair, "Depth by ControlNeXt, edges by a ControlNet"),
    "ControlNeXt SVD Pose Video": (video_strip, "Your picture dances the moves of a video"),
    "ControlNeXt SVD Pose Fade Out": (lambda: video_strip(fade_out=True),
                                      "A dance whose pose control fades out at the end"),
    "ControlNeXt SDXL Canny + Depth": (two_controls_pair, "Edges and depth at once, the edges easing off"),
    "ControlNeXt SD1.5 Training": (lambda: training_pair(stone_tower), "Train your own control on your pictures (SD1.5)"),
    "ControlNeXt SDXL Training": (lambda: training_pair(lambda size: anime_portrait(size, True)),
                                  "Train your own control on your pictures (SDXL)"),
    "ControlNeXt SD1.5 Pairs Training": (lambda: training_pair(lava_tower),
                                              "Train from a folder of pictures and their controls (SD1.5)"),
    "ControlNeXt SDXL Photos Training": (lambda: training_pair(lambda size: anime_portrait(size, False)),
                                              "Train a canny control from a folder of photos (SDXL)"),
    "ControlNeXt SVD Pose Training": (video_training_pair, "Train a pose control on your clips, then dance (SVD)"),
    "ControlNeXt Toy Shapes Demo": (demo_strip, "Try it: a toy model trained here, without and with control"),
}


def arrow(draw, x: int, y: int) -> None:
    draw.line([(x, y), (x + 20, y)], fill=(200, 200, 200), width=4)
    draw.polygon([(x + 18, y - 8), (x + 28, y), (x + 18, y + 8)], fill=(200, 200, 200))


def thumbnail(pictures, caption: str) -> Image.Image:
    canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    panels = pictures()
    if isinstance(panels, np.ndarray):  # one picture over the whole width
        canvas.paste(Image.fromarray(panels), (16, PANEL_TOP))
    else:
        for picture, x in zip(panels, (16, SIZE - 16 - PANEL[0])):
            canvas.paste(Image.fromarray(picture), (x, PANEL_TOP))
        arrow(draw, SIZE // 2 - 14, PANEL_TOP + PANEL[1] // 2)
    font = ImageFont.load_default(22)
    words, lines = caption.split(), [""]
    for word in words:  # at most two centred lines
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) <= SIZE - 32:
            lines[-1] = candidate
        else:
            lines.append(word)
    for row, line in enumerate(lines):
        draw.text((SIZE // 2, CAPTION_TOP + 14 + row * 30), line, font=font, fill=(235, 235, 235), anchor="mt")
    return canvas


def main() -> None:
    for name, (pictures, caption) in TEMPLATES.items():
        path = os.path.join(HERE, f"{name}.jpg")
        thumbnail(pictures, caption).save(path, quality=85, optimize=True, progressive=True)
        print(f"{path}: {os.path.getsize(path) // 1024} KB")


if __name__ == "__main__":
    main()
