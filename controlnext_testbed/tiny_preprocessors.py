"""Tiny random-weight preprocessor models with the real input/output signatures, shared by the
preprocessor tests and the workflow server tests.

DWPose models are TorchScript files: a detector taking [1, 3, 640, 640] and giving [1, 8400, 85],
and a pose model taking exactly 5 crops [5, 3, 384, 288] (like the traced
``dw-ll_ucoco_384_bs5.torchscript.pt``) and giving SimCC maps [5, 133, 576] and [5, 133, 768].
"Planted" models give fixed outputs, so the geometry can be checked. Depth Anything is the real
transformers architecture, a few layers wide.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

ANCHORS = 80 * 80 + 40 * 40 + 20 * 20


class RandomDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 85, kernel_size=8, stride=8)
        self.pool16 = nn.AvgPool2d(2)
        self.pool32 = nn.AvgPool2d(4)

    def forward(self, x):
        level8 = self.features(x / 255.0)
        levels = [level8, self.pool16(level8), self.pool32(level8)]
        return torch.cat([level.flatten(2) for level in levels], dim=2).transpose(1, 2)


class RandomPose(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 8, kernel_size=32, stride=32)
        self.to_x = nn.Linear(8 * 12 * 9, 133 * 576)
        self.to_y = nn.Linear(8 * 12 * 9, 133 * 768)

    def forward(self, x):
        hidden = self.features(x).flatten(1)
        return self.to_x(hidden).view(5, 133, 576), self.to_y(hidden).view(5, 133, 768)


class PlantedDetector(nn.Module):
    """Always one person: the anchor at stride-8 cell (row, col) says box centre/size (cx, cy, w, h)."""

    def __init__(self, cx: float, cy: float, w: float, h: float):
        super().__init__()
        output = torch.full((1, ANCHORS, 85), -20.0)
        row, col = int(cy // 8), int(cx // 8)
        anchor = row * 80 + col
        output[0, anchor, :4] = torch.tensor([cx / 8 - col, cy / 8 - row, np.log(w / 8), np.log(h / 8)])
        output[0, :, 4:] = 0.0
        output[0, anchor, 4:6] = 1.0  # objectness x person = 1
        self.register_buffer("output", output)
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.output + 0 * x.mean()


class PlantedPose(nn.Module):
    """Every crop: keypoint k peaks at SimCC bin (bins_x[k], bins_y[k]) with value ``peak``."""

    def __init__(self, bins_x: torch.Tensor, bins_y: torch.Tensor, peak: float = 0.9):
        super().__init__()
        simcc_x = torch.zeros(133, 576)
        simcc_y = torch.zeros(133, 768)
        simcc_x[torch.arange(133), bins_x] = peak
        simcc_y[torch.arange(133), bins_y] = peak
        self.register_buffer("simcc_x", simcc_x)
        self.register_buffer("simcc_y", simcc_y)
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        zero = 0 * x.mean()
        return self.simcc_x.expand(5, -1, -1) + zero, self.simcc_y.expand(5, -1, -1) + zero


def save_torchscript(module: nn.Module, example: torch.Tensor, path) -> str:
    torch.manual_seed(0)
    traced = torch.jit.trace(module.eval(), example, check_trace=False)
    traced.save(str(path))
    return str(path)


def tiny_depth_anything(folder) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                                 reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(config)
    for parameter in model.parameters():  # random weights big enough to give a varied map
        parameter.data.normal_(0, 0.2)
    model.save_pretrained(str(folder))
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as file:
        json.dump({"size": {"height": 56, "width": 56}, "ensure_multiple_of": 14,
                   "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, file)
