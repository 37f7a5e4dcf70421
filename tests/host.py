"""Host-test helpers: the pack imported as ComfyUI imports it, tiny random-weight UNets with the
real SD1.5 / SDXL block layout, and a sampler call. Importing this skips the calling test
module when no ComfyUI host was found (see conftest.py).
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from conftest import COMFYUI_PATH, HOST_SKIP_REASON, PACK_ROOT

if not COMFYUI_PATH:
    pytest.skip(HOST_SKIP_REASON, allow_module_level=True)

import comfy.sample  # noqa: E402
import folder_paths  # noqa: E402
import safetensors.torch  # noqa: E402

from controlnext_testbed.official_layouts import random_encoder_state_dict  # noqa: E402
from controlnext_testbed.comfy_library import import_pack  # noqa: E402
from controlnext_testbed.tiny_unet import UNET_CONFIGS, conditioning, real_size_model_on_meta, tiny_model  # noqa: E402,F401

PACK_NAME = "comfyui_controlnext_under_test"


def load_pack():
    """Import the checkout as a package, the way ComfyUI imports a custom node folder."""
    return import_pack(PACK_NAME, PACK_ROOT)


pack = load_pack()
core = importlib.import_module(f"{PACK_NAME}.controlnext_core")
patch_module = importlib.import_module(f"{PACK_NAME}.nodes.patch")
loaders = importlib.import_module(f"{PACK_NAME}.nodes.loaders")
apply_module = importlib.import_module(f"{PACK_NAME}.nodes.apply")

def sample(model, family: str, batch: int = 1, cfg: float = 2.0, steps: int = 2, size: int = 8, seed: int = 7,
           positive=None, negative=None, sampler: str = "euler") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, size, size, generator=generator)
    latent = torch.zeros(batch, 4, size, size)
    positive = positive if positive is not None else conditioning(family, 1)
    negative = negative if negative is not None else conditioning(family, 2)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative, latent,
                               seed=seed, disable_pbar=True)


@pytest.fixture
def models_folder(tmp_path, monkeypatch):
    """An empty models/controlnext folder for the loaders to list (and Save ControlNeXt to write in)."""
    folder = tmp_path / "controlnext"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnext", ([str(folder)], set()))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


def encoder_file(tmp_path, layout: str, seed: int = 0, name: str | None = None) -> str:
    name = name or f"controlnext_{layout}.safetensors"
    path = os.path.join(tmp_path, name)
    safetensors.torch.save_file(random_encoder_state_dict(layout, seed), path)
    return path


def loaded(tmp_path, layout: str, seed: int = 0):
    """A ControlNeXtFile as Load ControlNeXt makes it."""
    path = encoder_file(tmp_path, layout, seed)
    return patch_module.ControlNeXtFile(os.path.basename(path), core.load_encoder(core.load_state_dict_file(path)))


def control_image(batch: int = 1, size: int = 64, seed: int = 3) -> torch.Tensor:
    """A ComfyUI IMAGE [B,H,W,3]: random blocks, like an edge or depth map."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest").movedim(1, -1)


def apply(model, file, image, strength: float = 1.0, start: float = 0.0, end: float = 1.0, mask=None):
    return apply_module.ApplyControlNeXt.execute(model, file, image, strength, start, end, mask).result[0]


def count_encoder_runs(file, monkeypatch) -> list:
    """Counts encoder passes (``features`` runs once per encode, whichever entry point)."""
    calls = []
    original = file.encoder.features

    def counting(image, timestep, inner_padding=1):
        calls.append(image.shape[0])
        return original(image, timestep, inner_padding)

    monkeypatch.setattr(file.encoder, "features", counting)
    return calls


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float rounding, measured against the tensors' scale (random UNets output large values)."""
    scale = expected.abs().max().clamp_min(1e-6)
    difference = (actual - expected).abs().max()
    assert difference <= rel * scale, f"max |difference| {difference:.3g} is over {rel:g} x {scale:.3g}"
