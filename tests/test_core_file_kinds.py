"""What a weights file holds, told from its tensor names without reading its tensors (plain torch,
no ComfyUI): the loaders list only the files of their kind (issue 18, item 12)."""
from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

from controlnext_core import model
from controlnext_core.model import ENCODER, OTHER, UNET, weights_file_kind, weights_kind
from controlnext_testbed.official_layouts import LAYOUT_FIXTURE, OFFICIAL_KEYS, random_encoder_state_dict
from file_bytes import torch_bytes, write


def tensors(*names: str) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(2, 2) for name in names}


SDXL_DELTAS = tensors("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
                      "mid_block.attentions.0.proj_out.weight")
SVD_UNET = tensors("conv_in.weight", "time_embedding.linear_1.weight", "add_embedding.linear_1.weight",
                   "down_blocks.0.resnets.0.spatial_res_block.conv1.weight", "up_blocks.3.attentions.2.proj_out.bias",
                   "conv_norm_out.weight", "conv_out.weight")
LDM_UNET = tensors("input_blocks.0.0.weight", "middle_block.1.proj_in.weight", "output_blocks.2.1.conv.weight",
                   "time_embed.0.weight", "label_emb.0.0.weight", "out.2.weight")
FULL_CHECKPOINT_UNET = tensors("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.bias")
ORDINARY_CONTROLNET = tensors("control_model.input_hint_block.0.weight", "control_model.zero_convs.0.0.weight")
DIFFUSERS_CONTROLNET = tensors("conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight",
                               "controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.0.weight",
                               "controlnet_mid_block.weight")
PLAIN_CONTROLNET = tensors("input_blocks.0.0.weight", "zero_convs.0.0.weight", "input_hint_block.0.weight",
                           "middle_block_out.0.weight")
LORA = tensors("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
CHECKPOINT = tensors("first_stage_model.decoder.conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight")


@pytest.mark.parametrize("names,kind", [
    *[(OFFICIAL_KEYS[LAYOUT_FIXTURE[layout]], ENCODER) for layout in ("mid", "base", "svd_v1")],
    (SDXL_DELTAS, UNET), (SVD_UNET, UNET), (LDM_UNET, UNET), (FULL_CHECKPOINT_UNET, UNET),
    (ORDINARY_CONTROLNET, OTHER), (DIFFUSERS_CONTROLNET, OTHER), (PLAIN_CONTROLNET, OTHER), (LORA, OTHER),
    (CHECKPOINT, OTHER), ({}, OTHER),
], ids=["mid", "base", "svd_v1", "sdxl_deltas", "svd_unet", "ldm_unet", "checkpoint_unet", "controlnet",
        "diffusers_controlnet", "plain_controlnet", "lora", "checkpoint", "empty"])
def test_kinds_from_names(names, kind):
    assert weights_kind(names) == kind




class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("name,kind", [
    ("controlnet.safetensors", ENCODER), ("controlnet.bin", ENCODER), ("unet.safetensors", UNET),
    ("unet.bin", UNET), ("control_v11p_sd15_canny.pth", OTHER), ("lora.safetensors", OTHER),
    ("safetensors_named.bin", ENCODER), ("readme.txt", OTHER), ("controlnet.sft", ENCODER),
])
def test_files_are_told_apart_by_their_names_inside(tmp_path, name, kind):
    content = {"controlnet": random_encoder_state_dict("base"), "safetensors_named": random_encoder_state_dict("base"),
               "unet": SVD_UNET, "control_v11p_sd15_canny": ORDINARY_CONTROLNET, "lora": LORA,
               "readme": random_encoder_state_dict("base")}[name.split(".")[0]]
    as_pickle = name.endswith((".bin", ".pth")) and name != "safetensors_named.bin"
    data = torch_bytes(content) if as_pickle else safetensors.torch.save(content)
    assert weights_file_kind(write(tmp_path, name, data)) == kind


def encoder_bytes() -> bytes:
    return safetensors.torch.save(random_encoder_state_dict("base"))


UNREADABLE = {
    "empty.safetensors": lambda: b"",
    "truncated_header.safetensors": lambda: encoder_bytes()[:200],
    "not_json.safetensors": lambda: (5).to_bytes(8, "little") + b"{nope",
    "huge_header.safetensors": lambda: (10**12).to_bytes(8, "little") + b"{}",
    "error_page.bin": lambda: b"<html><body>Rate limit exceeded</body></html>",
    "legacy.bin": lambda: torch_bytes(random_encoder_state_dict("base"), legacy=True),
    "truncated.bin": lambda: torch_bytes(random_encoder_state_dict("base"))[:5000],
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_files_that_cannot_be_read_cheaply_have_no_kind(tmp_path, name):
    """They stay in the loaders' lists: loading them says what is wrong."""
    assert weights_file_kind(write(tmp_path, name, UNREADABLE[name]())) is None


def test_a_hostile_pickle_has_no_kind_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "hostile.bin", torch_bytes({"mid_convs.1.weight": Payload(str(marker))}))
    assert weights_file_kind(path) is None
    assert not marker.exists()


def test_a_missing_file_has_no_kind(tmp_path):
    assert weights_file_kind(str(tmp_path / "gone.safetensors")) is None


def test_files_are_read_once_until_they_change(tmp_path, monkeypatch):
    """Cached by path, size and modification time: listing a folder again reads nothing."""
    path = write(tmp_path, "weights.safetensors", safetensors.torch.save(tensors("down_blocks.0.w")))
    reads = []
    read = model._weight_names
    monkeypatch.setattr(model, "_weight_names", lambda *args: reads.append(args[0]) or read(*args))
    assert [weights_file_kind(path) for _ in range(3)] == [UNET] * 3
    assert reads == [path]
    write(tmp_path, "weights.safetensors", encoder_bytes())  # another size
    assert weights_file_kind(path) == ENCODER and len(reads) == 2
    modified = os.stat(path).st_mtime_ns
    write(tmp_path, "weights.safetensors", safetensors.torch.save(tensors("xown_blocks.0.w")))  # the first size
    os.utime(path, ns=(modified, modified + 10**9))
    assert weights_file_kind(path) == OTHER and len(reads) == 3
