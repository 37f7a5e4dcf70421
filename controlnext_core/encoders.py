"""The ControlNeXt condition encoders, with the official state-dict names.

Submodule names mirror diffusers' ResnetBlock2D / Downsample2D / TimestepEmbedding as the
official ControlNeXt code uses them, so released files load with ``strict=True`` without
diffusers installed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class EncoderConfig:
    """One official encoder structure.

    ``embedding``: "none" (SD1.5 releases), "convs" (SDXL, SVD-v2, SD1.5 training) or
    "convs_maxpool" (SVD v1). Whether the 2nd and 3rd embedding convs pad is not in the file:
    the family decides it at run time (``inner_padding``).
    ``levels``: (in, out, GroupNorm groups) of each ResnetBlock2D + Downsample2D pair.
    """

    embedding: str
    levels: tuple[tuple[int, int, int], ...]
    mid_norm: bool  # GroupNorms inside mid_convs.0 and a residual around it
    out_channels: int
    scale_parameter: bool  # a learned ``scale`` stored in the file


BASE = EncoderConfig("convs", ((128, 128, 4), (128, 256, 8)), True, 320, False)
MID = EncoderConfig("none", ((3, 128, 1), (128, 256, 8), (256, 256, 8)), False, 1280, True)
SVD_V1 = EncoderConfig("convs_maxpool", ((128, 128, 4), (128, 256, 8), (256, 256, 8)), True, 1280, True)
CONFIGS = {"base": BASE, "mid": MID, "svd_v1": SVD_V1}


def timestep_features(timesteps: torch.Tensor, dim: int = 128, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos, sin]."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D with its defaults (eps 1e-6, SiLU, additive time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


INNER_EMBEDDING_CONVS = (3, 6)  # the convs whose padding differs between SDXL and SVD


def _embedding(kind: str) -> nn.Sequential:
    layers = [
        nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.GroupNorm(2, 64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(2, 64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(2, 128), nn.ReLU(),
    ]
    if kind == "convs_maxpool":
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class ConditionEncoder(nn.Module):
    """Control image [B,3,H,W] in [0,1] + UNet timestep [B] -> one feature map."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.layout = next(name for name, known in CONFIGS.items() if known is config)
        self.time_embedding = TimestepEmbedding(128, 256)
        if config.embedding != "none":
            self.embedding = _embedding(config.embedding)
        self.down_res = nn.ModuleList(ResnetBlock2D(i, o, 256, g) for i, o, g in config.levels)
        self.down_sample = nn.ModuleList(Downsample2D(o) for _, o, _ in config.levels)
        width = config.levels[-1][1]
        if config.mid_norm:
            mid = [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, width),
                   nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width)]
        else:
            mid = [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
        self.mid_convs = nn.ModuleList([nn.Sequential(*mid), nn.Conv2d(width, config.out_channels, 1)])
        if config.scale_parameter:
            self.scale = nn.Parameter(torch.tensor(1.0))
        # layouts without a learned scale: the control scale a file was trained with (its metadata)
        self.control_scale = 1.0

    def embed(self, image: torch.Tensor, inner_padding: int) -> torch.Tensor:
        x = image
        for index, layer in enumerate(self.embedding):
            if index in INNER_EMBEDDING_CONVS and inner_padding != 1:
                x = F.conv2d(x, layer.weight, layer.bias, padding=inner_padding)
            else:
                x = layer(x)
        return x

    def features(self, image: torch.Tensor, timestep: torch.Tensor, inner_padding: int = 1) -> torch.Tensor:
        """Everything before the final 1x1 conv (``project``), which commutes with pooling."""
        emb = self.time_embedding(timestep_features(timestep).to(image.dtype))
        x = self.embed(image, inner_padding) if self.config.embedding != "none" else image
        for res, down in zip(self.down_res, self.down_sample):
            x = down(res(x, emb))
        mid = self.mid_convs[0](x)
        return mid + x if self.config.mid_norm else mid

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.mid_convs[1](features)

    def forward(self, image: torch.Tensor, timestep: torch.Tensor, inner_padding: int = 1) -> torch.Tensor:
        return self.project(self.features(image, timestep, inner_padding))
