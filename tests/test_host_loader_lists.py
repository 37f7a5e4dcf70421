"""The loaders in a real ComfyUI: each file list shows what can load there (issue 18, item 12), and
Load ControlNeXt says which models a file serves from its metadata when it has some (item 9)."""
from __future__ import annotations

import io
import os

import pytest
import safetensors.torch
import torch

import host
import folder_paths
from host import models_folder  # noqa: F401 (a fixture)
from controlnext_testbed.official_layouts import random_encoder_state_dict

video = host.importlib.import_module(f"{host.PACK_NAME}.nodes.video")
train_core = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.train")

SDXL_DELTAS = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": torch.zeros(2, 2)}
SVD_UNET = {"conv_in.weight": torch.zeros(2, 2), "down_blocks.0.resnets.0.spatial_res_block.conv1.weight": torch.zeros(2)}
ORDINARY_CONTROLNET = {"control_model.input_hint_block.0.weight": torch.zeros(2, 2),
                       "control_model.zero_convs.0.0.weight": torch.zeros(2, 2)}
LORA = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)}
ENCODERS = ["ControlNeXt-SD1.5/canny/controlnet.safetensors", "ControlNeXt-SVD-v2/controlnet.bin"]
UNETS = ["ControlAny-SDXL/anime_canny/unet.safetensors", "ControlNeXt-SVD-v2/unet.bin"]
UNREADABLE = ["empty.safetensors", "old_pickle.bin"]  # no cheap answer: listed, their loaders say what is wrong


def torch_save(obj, path, legacy: bool = False) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    with open(path, "wb") as file:
        file.write(buffer.getvalue())


@pytest.fixture
def installed(models_folder, tmp_path, monkeypatch):
    """Releases' files in models/controlnext, other models beside them and in models/controlnet."""
    controlnet = tmp_path / "controlnet"
    controlnet.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnet", ([str(controlnet)], {".pth", ".safetensors"}))
    for name in ENCODERS + UNETS:
        os.makedirs(models_folder / os.path.dirname(name), exist_ok=True)
    safetensors.torch.save_file(random_encoder_state_dict("mid"), models_folder / ENCODERS[0])
    torch_save(random_encoder_state_dict("base"), models_folder / ENCODERS[1])
    safetensors.torch.save_file(SDXL_DELTAS, models_folder / UNETS[0])
    torch_save(SVD_UNET, models_folder / UNETS[1])
    (models_folder / UNREADABLE[0]).touch()
    torch_save(random_encoder_state_dict("base"), models_folder / UNREADABLE[1], legacy=True)
    (models_folder / "notes.txt").write_text("where the files came from")
    safetensors.torch.save_file(LORA, models_folder / "lora_style.safetensors")
    torch_save(ORDINARY_CONTROLNET, controlnet / "control_v11p_sd15_canny.pth")
    safetensors.torch.save_file(SDXL_DELTAS, controlnet / "sdxl_unet_deltas.safetensors")
    return models_folder


def listed(node, name: str) -> list[str]:
    """The options /object_info serves for a combo input."""
    return node.GET_NODE_INFO_V1()["input"]["required"][name][1]["options"]


def test_each_list_shows_the_files_that_load_there(installed):
    encoders = sorted(ENCODERS + UNREADABLE)
    unets = sorted(UNETS + UNREADABLE) + ["sdxl_unet_deltas.safetensors"]
    assert listed(host.loaders.LoadControlNeXt, "controlnext_name") == encoders
    assert listed(host.loaders.LoadControlNeXtUNetWeights, "unet_name") == unets
    assert listed(video.LoadControlNeXtSVD, "controlnext_name") == encoders
    assert listed(video.LoadControlNeXtSVD, "unet_name") == [video.NO_UNET] + unets


def test_listed_files_load(installed):
    for name in ENCODERS:
        assert host.loaders.LoadControlNeXt.execute(name).result[0].name == name


def test_a_file_read_as_another_kind_still_fails_clearly_when_named(installed):
    """A workflow can still name it (ComfyUI v0.3.64 does not check V3 lists): the loader says what it is."""
    with pytest.raises(host.core.ControlNeXtError, match="UNet weights .*'Load ControlNeXt UNet Weights'"):
        host.loaders.LoadControlNeXt.execute(UNETS[0])


@pytest.mark.parametrize("metadata,layout,served", [
    (None, "base", "SDXL models (the published releases of its kind)"),
    (None, "mid", "SD1.5 models (the published releases of its kind)"),
    (train_core.release_metadata("sd15", 1.0, 400, "v1-5-pruned.safetensors"), "base",
     "SD1.5 models (trained for them, its metadata says)"),
    (train_core.release_metadata("sdxl", 1.0, 400, "sd_xl_base_1.0.safetensors"), "base",
     "SDXL models (trained for them, its metadata says)"),
    ({"family": "sdxl"}, "mid", "SD1.5 models (the published releases of its kind)"),  # SDXL cannot take "mid"
    ({"family": "flux"}, "base", "SDXL models (the published releases of its kind)"),
], ids=["release-base", "release-mid", "saved-sd15", "saved-sdxl", "family-for-another-layout", "unknown-family"])
def test_the_description_follows_the_files_metadata(models_folder, metadata, layout, served):
    safetensors.torch.save_file(random_encoder_state_dict(layout), models_folder / "encoder.safetensors",
                                metadata=metadata)
    summary = host.loaders.LoadControlNeXt.execute("encoder.safetensors").ui["controlnext_info"][0]
    assert summary.startswith(f"Encoder for {served}, ") and summary.endswith(" M parameters")
