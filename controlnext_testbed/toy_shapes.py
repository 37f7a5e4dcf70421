"""The pieces of the toy world of the convergence study (benchmarks/convergence.py) and of the demo
(python -m controlnext_demo; toy_world.py trains them): pictures of simple shapes drawn in code,
their canny controls, a small autoencoder and an SD1.5-layout base UNet built with ComfyUI's own
classes, saved together as one "toy checkpoint" file.

Scale (README, Benchmarks: "Convergence"): 64x64 pictures, 8x8x4 latents. The SD1.5 training
layout injects after the UNet's first down block, where the encoder gives 320 channels, and
ComfyUI's UNetModel ends on a conv of ``model_channels`` inputs, so the first level cannot be
wider than ``model_channels``: the toy UNet is 320 channels wide but two levels deep, attention
only in the middle (whose ``to_out`` weights are the SD1.5 recipe's subset), and no res block on
the input side of its first level. With one there, 8x8 latents lie inside that level's receptive
field: the base did its work there and left the path through the injection point nearly unused
(a perturbation the size of the hidden state after the first down block moved its output by about
1 %), and no ControlNeXt trained on it moved its samples. Without it, conv_in feeds the down block
directly and the work goes through the injection point, as in the real SD1.5 UNet at 64x64 latents.
The base needs ComfyUI on sys.path (imported there); the pictures and the autoencoder do not.
"""
from __future__ import annotations

import math

import numpy as np
import safetensors.torch
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

PICTURE = 64  # pixels; latents are PICTURE // 8
CONTEXT_DIM = 64
# the canny of the controls and of the metric: fixed thresholds (the Canny node with auto_thresholds
# off), so a sample's edges are found the same way whatever its grey levels
CANNY_THRESHOLDS = (50, 100)
UNET_CONFIG = dict(
    use_checkpoint=False, image_size=PICTURE // 8, use_spatial_transformer=True, legacy=False, in_channels=4,
    out_channels=4, model_channels=320, num_res_blocks=[0, 1], channel_mult=[1, 1], transformer_depth=[0, 0],
    transformer_depth_output=[0, 0, 0, 0], transformer_depth_middle=1, context_dim=CONTEXT_DIM,
    use_linear_in_transformer=False, adm_in_channels=None, num_classes=None, use_temporal_attention=False,
    use_temporal_resblock=False)
SHAPES = ("circle", "square", "triangle")
MIN_GREY_CONTRAST = 90  # between each shape and the background under it: canny sees every outline


def grey(colour: np.ndarray) -> float:
    """cv2's RGB -> grey weights (what the canny reads)."""
    return float(colour @ np.array([0.299, 0.587, 0.114]))


def draw_picture(rng: np.random.Generator) -> np.ndarray:
    """One to three shapes (circle, square, triangle; random colour, size and place) on a smooth
    background (a linear blend of two colours in a random direction); uint8 [H, W, 3]."""
    size = PICTURE
    supersample = 4  # drawn 4x larger and reduced: smooth outlines
    big = size * supersample
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    high = low + np.clip(high - low, -60, 60)  # a gentle gradient: no edges of its own
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:big, 0:big] / big - 0.5
    blend = np.clip(0.5 + xs * math.cos(angle) + ys * math.sin(angle), 0, 1)[..., None]
    background = low * (1 - blend) + high * blend
    canvas = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(1, 4)):
        radius = rng.uniform(7, 14) * supersample
        cx, cy = rng.uniform(radius, big - radius, 2)
        under = grey(background[int(cy), int(cx)])
        while True:
            colour = rng.uniform(0, 255, 3)
            if abs(grey(colour) - under) >= MIN_GREY_CONTRAST:
                break
        fill = tuple(int(c) for c in colour)
        kind = SHAPES[rng.integers(len(SHAPES))]
        if kind == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        elif kind == "square":
            half = radius * 0.85
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        else:
            turn = rng.uniform(0, 2 * math.pi / 3)
            draw.polygon([(cx + radius * math.cos(turn + k * 2 * math.pi / 3),
                           cy + radius * math.sin(turn + k * 2 * math.pi / 3)) for k in range(3)], fill=fill)
    return np.asarray(canvas.resize((size, size), Image.LANCZOS))


def draw_pictures(count: int, seed: int) -> torch.Tensor:
    """``count`` pictures as a ComfyUI IMAGE [N, H, W, 3] in [0, 1]."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([draw_picture(rng) for _ in range(count)])).float() / 255.0


def edge_iou(images: torch.Tensor, control_edges: torch.Tensor, canny, radius: int = 2) -> torch.Tensor:
    """Per picture: IoU of the picture's canny edges and the control's edges, both dilated by
    ``radius`` pixels (a square); images and controls ComfyUI IMAGEs [N, H, W, 3]. 0 where neither has edges."""
    found = canny(images, *CANNY_THRESHOLDS)[..., 0]
    wanted = control_edges[..., 0].float()

    def dilated(edges: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(edges[:, None], 2 * radius + 1, 1, radius)[:, 0] > 0.5

    a, b = dilated(found), dilated(wanted)
    union = (a | b).sum(dim=(1, 2)).float()
    return torch.where(union > 0, (a & b).sum(dim=(1, 2)).float() / union.clamp(min=1), torch.zeros_like(union))


class ShapeAutoencoder(nn.Module):
    """A small convolutional autoencoder: 64x64x3 pictures <-> 8x8x4 latents (8x down, as SD's VAE).

    ``encode`` gives ComfyUI latents: the UNet sees them times the SD1.5 latent format's 0.18215
    (``process_latent_in``), so ``latent_scale`` (set after training) makes that unit spread.
    """

    def __init__(self, width: int = 128):
        super().__init__()

        def conv(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.SiLU()]

        def up(cin, cout):
            return [nn.Upsample(scale_factor=2, mode="nearest"), *conv(cin, cout)]

        # no normalisation layers: a per-picture norm would take out the background's colour
        self.encoder = nn.Sequential(*conv(3, width // 4, 2), *conv(width // 4, width // 2, 2),
                                     *conv(width // 2, width, 2), *conv(width, width), *conv(width, width),
                                     nn.Conv2d(width, 4, 1))
        self.decoder = nn.Sequential(*conv(4, width), *conv(width, width), *conv(width, width),
                                     *up(width, width // 2), *up(width // 2, width // 4), *up(width // 4, width // 8),
                                     nn.Conv2d(width // 8, 3, 3, 1, 1))
        self.register_buffer("latent_scale", torch.tensor(1.0))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE [N, H, W, 3] -> ComfyUI LATENT samples [N, 4, H/8, W/8]."""
        return self.encoder(images.movedim(-1, 1) * 2 - 1) * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """ComfyUI LATENT samples -> IMAGE [N, H, W, 3] in [0, 1]."""
        return ((self.decoder(latents / self.latent_scale) + 1) / 2).clamp(0, 1).movedim(1, -1)


def init_like_torch(module: nn.Module) -> None:
    """PyTorch's default initialisation for every layer: ComfyUI's layer classes skip it (they
    expect weights from a file), which leaves a new UNet's memory uninitialised."""
    for layer in module.modules():
        for klass in type(layer).__mro__:
            if klass.__module__.startswith("torch.nn.modules") and "reset_parameters" in vars(klass):
                klass.reset_parameters(layer)
                break


def new_base(dtype: torch.dtype = torch.float32, state: dict | None = None):
    """The toy base as a ComfyUI MODEL (a ModelPatcher; an SD1.5 model config, ComfyUI's UNetModel):
    PyTorch's default initialisation with the output conv at zero, or the weights in ``state``."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model({})
    unet = base.diffusion_model
    if state is None:
        init_like_torch(unet)
        with torch.no_grad():
            for param in unet.out[-1].parameters():  # the output conv (not its norm: that would stop all learning)
                param.zero_()
    else:
        unet.load_state_dict(state)
    unet.to(dtype)
    return comfy.model_patcher.ModelPatcher(base, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


def conditioning(batch: int = 1) -> list:
    """The fixed text conditioning the base is trained and sampled with: one token of zeros."""
    return [[torch.zeros(batch, 1, CONTEXT_DIM), {}]]


UNET_PREFIX = "unet."
AUTOENCODER_PREFIX = "autoencoder."


def save_checkpoint(path: str, model, autoencoder: ShapeAutoencoder, metadata: dict[str, str]) -> None:
    """The base UNet and its autoencoder in one safetensors file (fp32)."""
    tensors = {UNET_PREFIX + k: v.detach().float().contiguous()
               for k, v in model.model.diffusion_model.state_dict().items()}
    tensors.update({AUTOENCODER_PREFIX + k: v.detach().float().contiguous() for k, v in autoencoder.state_dict().items()})
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def is_checkpoint(path: str) -> bool:
    """Whether the file holds ``save_checkpoint``'s keys (read without loading its tensors)."""
    if not path.endswith(".safetensors"):
        return False
    with safetensors.safe_open(path, "pt") as file:
        keys = list(file.keys())
    return any(k.startswith(UNET_PREFIX) for k in keys) and any(k.startswith(AUTOENCODER_PREFIX) for k in keys)


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32):
    """(MODEL, ShapeAutoencoder) from a file of ``save_checkpoint``."""
    tensors = safetensors.torch.load_file(path)
    unet = {k[len(UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    autoencoder = ShapeAutoencoder()
    autoencoder.load_state_dict({k[len(AUTOENCODER_PREFIX):]: v for k, v in tensors.items()
                                 if k.startswith(AUTOENCODER_PREFIX)})
    return new_base(dtype, unet), autoencoder.eval().requires_grad_(False)
