"""Host tests: the partial UNet weights of the SD1.5 and SDXL releases as ModelPatcher patches."""
from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

import host  # skips this module without a ComfyUI host
from controlnext_testbed.official_layouts import OFFICIAL_KEYS
from host import models_folder, real_size_model_on_meta, sample, tiny_model  # noqa: F401 (models_folder: a fixture)

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths

UnetWeights = host.loaders.LoadControlNeXtUNetWeights
unet_key_map = host.importlib.import_module(f"{host.PACK_NAME}.nodes.unet_keys").unet_key_map


@pytest.mark.parametrize("family,fixture", [("sdxl", "sdxl_unet_deltas"), ("sd15", "sd15_unet_subset")])
def test_every_official_unet_key_lands_on_a_distinct_weight_of_the_real_architecture(family, fixture):
    model = real_size_model_on_meta(family)
    key_map = unet_key_map(model)
    state = model.model_state_dict(filter_prefix="diffusion_model.")
    official = OFFICIAL_KEYS[fixture]
    targets = {key_map[name] for name in official}
    assert len(targets) == len(official)  # distinct targets, none dropped
    assert all(list(state[key_map[name]].shape) == shape for name, shape in official.items())
    clone = model.clone()
    patches = {key_map[name]: (torch.empty(shape, device="meta"),) for name, shape in official.items()}
    assert len(clone.add_patches(patches, 1.0)) == len(official)


def _tiny_to_out_weights(model, attention: str, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """A release-style file for the tiny model: diffusers names of its attention output projections."""
    diffusers_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    state = model.model_state_dict(filter_prefix="diffusion_model.")
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(state[f"diffusion_model.{ldm}"].shape, generator=generator)
            for name, ldm in diffusers_map.items() if attention in name and "to_out" in name}


def _base_weights(model):
    """The model's own weights: a clone another test sampled may still be loaded, its patches on the
    shared tensors (ComfyUI takes them off when it unloads it)."""
    comfy.model_management.unload_all_models()
    return model.model_state_dict()


def _patched_weights(model, keys):
    """The weights ComfyUI computes from the patches when it loads the model."""
    state = model.model_state_dict()
    return {k: comfy.lora.calculate_weight(model.patches[k], state[k].clone().float(), k) for k in keys}


def test_sdxl_deltas_are_added_reversibly(models_folder):
    model = tiny_model("sdxl")
    deltas = _tiny_to_out_weights(model, "attn2", seed=1, scale=0.05)
    safetensors.torch.save_file(deltas, os.path.join(models_folder, "unet_weight_increasements.safetensors"))
    bare = sample(model, "sdxl", steps=2)
    patched = UnetWeights.execute(model, "unet_weight_increasements.safetensors", 1.0, "auto").result[0]
    key_map = unet_key_map(model)
    originals = _base_weights(model)
    after = _patched_weights(patched, [key_map[k] for k in deltas])
    for name, delta in deltas.items():
        assert torch.allclose(after[key_map[name]], originals[key_map[name]] + delta, atol=1e-6)
    assert (sample(patched, "sdxl", steps=2) - bare).abs().max() > 1e-4
    assert torch.equal(sample(model, "sdxl", steps=2), bare)  # the input MODEL is unchanged
    unpatched = UnetWeights.execute(model, "unet_weight_increasements.safetensors", 0.0, "auto").result[0]
    assert torch.equal(sample(unpatched, "sdxl", steps=2), bare)


def test_sd15_subset_replaces_weights_and_strength_interpolates(models_folder):
    model = tiny_model("sd15")
    weights = _tiny_to_out_weights(model, "attn", seed=2, scale=0.05)
    safetensors.torch.save_file(weights, os.path.join(models_folder, "unet.safetensors"))
    key_map = unet_key_map(model)
    originals = _base_weights(model)
    full = UnetWeights.execute(model, "unet.safetensors", 1.0, "auto").result[0]
    half = UnetWeights.execute(model, "unet.safetensors", 0.5, "auto").result[0]
    after_full = _patched_weights(full, [key_map[k] for k in weights])
    after_half = _patched_weights(half, [key_map[k] for k in weights])
    for name, value in weights.items():
        key = key_map[name]
        assert torch.allclose(after_full[key], value, atol=1e-6)
        assert torch.allclose(after_half[key], 0.5 * (originals[key] + value), atol=1e-6)
    assert all(torch.equal(model.model_state_dict()[key_map[k]], originals[key_map[k]]) for k in weights)


def test_a_key_that_matches_nothing_is_named(models_folder):
    model = tiny_model("sdxl")
    deltas = _tiny_to_out_weights(model, "attn2", seed=1, scale=0.05)
    deltas["down_blocks.7.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"] = torch.zeros(4, 4)
    safetensors.torch.save_file(deltas, os.path.join(models_folder, "bad.safetensors"))
    with pytest.raises(host.core.ControlNeXtError, match=r"1 of \d+ weights .* match nothing in this model "
                                                          r"\(first: down_blocks.7.attentions.0"):
        UnetWeights.execute(model, "bad.safetensors", 1.0, "auto")


def test_a_wrong_shape_is_named(models_folder):
    model = tiny_model("sdxl")
    deltas = _tiny_to_out_weights(model, "attn2", seed=1, scale=0.05)
    name = next(iter(deltas))
    deltas[name] = torch.zeros(3, 3)
    safetensors.torch.save_file(deltas, os.path.join(models_folder, "bad_shape.safetensors"))
    with pytest.raises(host.core.ControlNeXtError, match=f"UNet weight '{name}' has shape \\[3, 3\\]"):
        UnetWeights.execute(model, "bad_shape.safetensors", 1.0, "auto")


def test_a_missing_file_is_a_clear_error(models_folder):
    with pytest.raises(host.core.ControlNeXtError, match="'nope.safetensors' is not in the models/controlnext"):
        UnetWeights.execute(tiny_model("sd15"), "nope.safetensors", 1.0, "auto")


def test_loader_lists_both_folders_and_loads(models_folder, tmp_path, monkeypatch):
    controlnet_folder = tmp_path / "controlnet"
    controlnet_folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnet", ([str(controlnet_folder)], set()))
    host.encoder_file(models_folder, "mid", name="sd15_controlnext.safetensors")
    host.encoder_file(controlnet_folder, "base", name="sdxl_controlnext.safetensors")
    assert host.loaders.model_files() == ["sd15_controlnext.safetensors", "sdxl_controlnext.safetensors"]
    output = host.loaders.LoadControlNeXt.execute("sdxl_controlnext.safetensors")
    file, control_net = output.result
    assert file.layout == "base" and control_net.file is file
    assert "3.53 M parameters" in output.ui["controlnext_info"][0]
