"""Random-weight files in the official layouts; shared by the tests and the benchmarks.

Key names and shapes come from ``official_keys.json`` beside this file (taken from the official
ControlNeXt modules), never from our own modules, so a loader that drifts from the official
layout fails here. Plain torch: no ComfyUI needed.
"""
from __future__ import annotations

import json
import math
import os

import torch

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_keys.json")) as _file:
    OFFICIAL_KEYS: dict[str, dict[str, list[int]]] = json.load(_file)

LAYOUT_FIXTURE = {"base": "encoder_base", "mid": "encoder_mid", "svd_v1": "encoder_svd_v1"}


def random_tensor(name: str, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("scale") and not shape:
        return torch.tensor(0.8)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    if name.endswith(".weight"):  # norms
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return 0.1 * torch.randn(shape, generator=generator)


def random_state_dict(fixture: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, shape, generator).to(dtype) for name, shape in OFFICIAL_KEYS[fixture].items()}


def random_encoder_state_dict(layout: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return random_state_dict(LAYOUT_FIXTURE[layout], seed, dtype)
