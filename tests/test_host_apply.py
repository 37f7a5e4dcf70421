"""Host tests: the MODEL and CONTROL_NET routes on tiny SD1.5 / SDXL UNets in a real ComfyUI."""
from __future__ import annotations

import copy
import logging

import pytest
import safetensors.torch
import torch

import host  # skips this module without a ComfyUI host
from host import (apply, assert_close, conditioning, control_image, count_encoder_runs, loaded,  # noqa: F401
                  models_folder, sample, tiny_model)  # models_folder: a fixture

import comfy.controlnet
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models
import nodes as comfy_nodes

FAMILY_LAYOUTS = [("sd15", "mid"), ("sd15", "base"), ("sdxl", "base")]


def controlnet_route(family, file, image, strength=1.0, start=0.0, end=1.0):
    cnet = host.patch_module.ControlNeXtControlNet(file)  # what Load ControlNeXt's second output carries
    positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        conditioning(family, 1), conditioning(family, 2), cnet, image, strength, start, end)
    return positive, negative


@pytest.mark.parametrize("family,layout", FAMILY_LAYOUTS)
def test_control_changes_the_output_and_strength_zero_is_bit_identical(tmp_path, family, layout):
    model = tiny_model(family)
    file = loaded(tmp_path, layout)
    bare = sample(model, family)
    controlled = sample(apply(model, file, control_image()), family)
    assert torch.isfinite(controlled).all()
    assert (controlled - bare).abs().max() > 1e-3
    assert torch.equal(sample(apply(model, file, control_image(), strength=0.0), family), bare)
    positive, negative = controlnet_route(family, file, control_image(), strength=0.0)
    assert torch.equal(sample(model, family, positive=positive, negative=negative), bare)


@pytest.mark.parametrize("family,layout", FAMILY_LAYOUTS)
def test_model_route_and_controlnet_route_agree(tmp_path, family, layout):
    model = tiny_model(family)
    file = loaded(tmp_path, layout)
    image = control_image()
    via_model = sample(apply(model, file, image, strength=0.8), family)
    positive, negative = controlnet_route(family, file, image, strength=0.8)
    via_controlnet = sample(model, family, positive=positive, negative=negative)
    assert_close(via_model, via_controlnet)


def test_input_model_is_unchanged_and_nothing_leaks(tmp_path):
    model = tiny_model("sd15")
    options_before = copy.deepcopy(model.model_options)
    bare = sample(model, "sd15")
    file = loaded(tmp_path, "mid")
    first = sample(apply(model, file, control_image(seed=1)), "sd15")
    assert model.model_options == options_before
    assert torch.equal(sample(model, "sd15"), bare)
    # re-queue with new inputs, then the first inputs again: no state carried between runs
    second = sample(apply(model, file, control_image(seed=2), strength=1.5), "sd15")
    assert (second - first).abs().max() > 1e-4
    assert torch.equal(sample(apply(model, file, control_image(seed=1)), "sd15"), first)
    # the CONTROL_NET route leaves no patch in the model either
    positive, negative = controlnet_route("sd15", file, control_image(seed=1))
    sample(model, "sd15", positive=positive, negative=negative)
    assert torch.equal(sample(model, "sd15"), bare)


def test_clones_of_a_patched_model_share_the_patch_and_stay_correct(tmp_path):
    model = tiny_model("sdxl")
    file = loaded(tmp_path, "base")
    patched = apply(model, file, control_image())
    reference = sample(patched, "sdxl")
    clone = patched.clone()
    assert torch.equal(sample(clone, "sdxl"), reference)


def test_encoder_runs_once_per_step_for_cond_and_uncond(tmp_path, monkeypatch):
    model = tiny_model("sd15")
    file = loaded(tmp_path, "mid")
    calls = count_encoder_runs(file, monkeypatch)
    sample(apply(model, file, control_image()), "sd15", batch=2, cfg=3.0, steps=3)
    assert calls == [1, 1, 1]  # one image, 3 steps, cond+uncond of a batch of 2 share it


def test_memory_split_cfg_gives_the_same_result_and_still_encodes_once(tmp_path, monkeypatch):
    model = tiny_model("sdxl")
    file = loaded(tmp_path, "base")
    patched = apply(model, file, control_image())
    batched = sample(patched, "sdxl", steps=2)
    calls = count_encoder_runs(file, monkeypatch)
    seen_chunks = []
    original = host.patch_module.ControlNeXtPatch.inject

    def spy(self, h, transformer_options):
        if transformer_options.get("block") == self.block:
            seen_chunks.append(list(transformer_options["cond_or_uncond"]))
        return original(self, h, transformer_options)

    monkeypatch.setattr(host.patch_module.ControlNeXtPatch, "inject", spy)
    # a model that "needs" more memory than any device has: ComfyUI runs cond and uncond apart
    monkeypatch.setattr(patched.model, "memory_required", lambda *args, **kwargs: 1e30)
    split = sample(patched, "sdxl", steps=2)
    assert all(len(chunk) == 1 for chunk in seen_chunks) and len(seen_chunks) == 4
    assert calls == [1, 1]
    assert_close(split, batched)


@pytest.mark.parametrize("route", ["model", "controlnet"])
def test_the_patch_finds_the_step_sigmas_read_before_the_unet(tmp_path, monkeypatch, route):
    """Reading sigmas from the device waits for the GPU: it happens once per model call before the
    UNet's kernels are queued, never at the injection block inside the UNet."""
    model = tiny_model("sd15")
    file = loaded(tmp_path, "mid")
    ready = []
    original = host.patch_module.ControlNeXtPatch.inject

    def spy(self, h, transformer_options):
        if transformer_options.get("block") == self.block:
            cached = transformer_options.get(host.patch_module.STEP_SIGMAS)
            ready.append(cached is not None and cached[0] is transformer_options["sigmas"])
        return original(self, h, transformer_options)

    monkeypatch.setattr(host.patch_module.ControlNeXtPatch, "inject", spy)
    if route == "model":
        sample(apply(model, file, control_image()), "sd15", steps=3)
    else:
        positive, negative = controlnet_route("sd15", file, control_image())
        sample(model, "sd15", positive=positive, negative=negative, steps=3)
    assert ready == [True] * 3


def test_stacked_applies_register_one_sigma_reader(tmp_path):
    model = tiny_model("sd15")
    file = loaded(tmp_path, "mid")
    twice = apply(apply(model, file, control_image(seed=1)), file, control_image(seed=2))
    wrapper_type = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    assert twice.get_wrappers(wrapper_type, host.patch_module.WRAPPER_KEY) == \
        [host.patch_module.read_sigmas_before_the_unet]
    assert model.get_wrappers(wrapper_type, host.patch_module.WRAPPER_KEY) == []


def test_cfg_one_runs_the_cond_half_only(tmp_path):
    model = tiny_model("sd15")
    file = loaded(tmp_path, "mid")
    out = sample(apply(model, file, control_image()), "sd15", cfg=1.0)
    assert torch.isfinite(out).all()
    assert (out - sample(model, "sd15", cfg=1.0)).abs().max() > 1e-3


def test_start_end_percent_and_mask_act_where_they_should(tmp_path, monkeypatch):
    model = tiny_model("sdxl")
    file = loaded(tmp_path, "base")
    image = control_image()
    bare = sample(model, "sdxl", steps=3)
    full = sample(apply(model, file, image), "sdxl", steps=3)
    calls = count_encoder_runs(file, monkeypatch)
    first_half = sample(apply(model, file, image, start=0.0, end=0.5), "sdxl", steps=3)
    assert 1 <= len(calls) < 3
    assert (first_half - full).abs().max() > 1e-5 and (first_half - bare).abs().max() > 1e-5
    calls.clear()
    assert torch.equal(sample(apply(model, file, image, start=1.0, end=1.0), "sdxl", steps=3), bare)
    assert calls == []
    # a black mask removes control everywhere; a white one changes nothing
    assert torch.equal(sample(apply(model, file, image, mask=torch.zeros(1, 64, 64)), "sdxl", steps=3), bare)
    white = sample(apply(model, file, image, mask=torch.ones(64, 64)), "sdxl", steps=3)
    assert_close(white, full)
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1
    half = sample(apply(model, file, image, mask=left), "sdxl", steps=1, cfg=1.0)
    bare_1 = sample(model, "sdxl", steps=1, cfg=1.0)
    full_1 = sample(apply(model, file, image), "sdxl", steps=1, cfg=1.0)
    assert (half - bare_1)[..., :3].abs().max() > 1e-4 and (half - full_1).abs().max() > 1e-4


def test_sd15_with_a_base_file_injects_after_the_first_down_block(tmp_path, monkeypatch):
    model = tiny_model("sd15")
    file = loaded(tmp_path, "base")
    patched = apply(model, file, control_image())
    (patch,) = patched.model_options["transformer_options"]["patches"]["input_block_patch_after_skip"]
    assert patch.block == ("input", 2)  # conv_in, one res block, then the first downsampler
    blocks = []
    original = host.patch_module.ControlNeXtPatch.inject

    def spy(self, h, transformer_options):
        out = original(self, h, transformer_options)
        if out is not h:
            blocks.append(transformer_options["block"])
        return out

    monkeypatch.setattr(host.patch_module.ControlNeXtPatch, "inject", spy)
    sample(patched, "sd15", steps=2)
    assert set(blocks) == {("input", 2)}
    mid = apply(model, loaded(tmp_path, "mid"), control_image())
    assert mid.model_options["transformer_options"]["patches"]["output_block_patch"][0].block == ("output", 0)
    sdxl = apply(tiny_model("sdxl"), file, control_image())
    assert sdxl.model_options["transformer_options"]["patches"]["input_block_patch_after_skip"][0].block == ("input", 0)


@pytest.mark.parametrize("images", [1, 2])
def test_batches_take_one_image_or_one_per_latent(tmp_path, images):
    model = tiny_model("sd15")
    file = loaded(tmp_path, "mid")
    out = sample(apply(model, file, control_image(batch=images)), "sd15", batch=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    if images == 2:  # each latent follows its own image
        single = sample(apply(model, file, control_image(batch=2)[:1]), "sd15", batch=2)
        assert_close(out[0], single[0])
        assert (out[1] - single[1]).abs().max() > 1e-3 * single[1].abs().max()


def test_image_count_that_matches_nothing_is_a_clear_error(tmp_path):
    model = tiny_model("sd15")
    file = loaded(tmp_path, "mid")
    with pytest.raises(host.core.ControlNeXtError, match=r"3 control images for 2 latents: give one image \(used for the whole batch\) or exactly 2"):
        sample(apply(model, file, control_image(batch=3)), "sd15", batch=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(tmp_path, dtype):
    model = tiny_model("sdxl", dtype=dtype)
    file = loaded(tmp_path, "base")
    bare = sample(model, "sdxl", steps=1)
    out = sample(apply(model, file, control_image()), "sdxl", steps=1)
    assert torch.isfinite(out).all() and (out - bare).abs().max() > 1e-3
    assert torch.equal(sample(apply(model, file, control_image(), strength=0.0), "sdxl", steps=1), bare)
    assert file.encoder.mid_convs[1].weight.dtype == torch.float32  # stored weights are never cast


def test_wrong_family_is_refused_before_sampling(tmp_path):
    mid = loaded(tmp_path, "mid")
    with pytest.raises(host.core.ControlNeXtError,
                       match=r"'controlnext_mid.safetensors' on a SDXL model \(SDXL\).*cannot serve a SDXL model; "
                             r"it serves SD1.5"):
        apply(tiny_model("sdxl"), mid, control_image())
    refiner_config = dict(host.UNET_CONFIGS["sdxl"], adm_in_channels=2560)
    with pytest.raises(host.core.ControlNeXtError, match="cannot be applied to this SDXLRefiner model"):
        apply(_unsupported_model(refiner_config), mid, control_image())
    with pytest.raises(host.core.ControlNeXtError, match="start_percent \\(0.8\\) is after end_percent \\(0.2\\)"):
        apply(tiny_model("sd15"), mid, control_image(), start=0.8, end=0.2)


def _unsupported_model(unet_config):
    model_config = comfy.supported_models.SDXLRefiner(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    return comfy.model_patcher.ModelPatcher(base, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


def test_control_image_conversions(tmp_path):
    convert = host.patch_module.control_image_from_comfy
    assert convert(torch.rand(2, 16, 16, 1)).shape == (2, 3, 16, 16)
    assert convert(torch.rand(1, 16, 16, 4)).shape == (1, 3, 16, 16)
    with pytest.raises(host.core.ControlNeXtError, match="has 2 channels"):
        convert(torch.rand(1, 16, 16, 2))
    with pytest.raises(host.core.ControlNeXtError, match="N >= 1"):
        convert(torch.rand(0, 16, 16, 3))


# --- a "base" file on SD1.5: the SDXL releases' layout, right only for SD1.5-trained files ----

def load_node(folder, name: str, metadata: dict | None = None):
    """A "base" file as Load ControlNeXt reads it from the models folder."""
    safetensors.torch.save_file(host.random_encoder_state_dict("base"), str(folder / name), metadata=metadata)
    return host.loaders.LoadControlNeXt.execute(name).result


RELEASE_WARNING = ("Warning: 'sdxl_release.safetensors' on a SD1.5 model: This file is probably an SDXL release's "
                   "encoder (the published \"base\" files are SDXL and SVD-v2 releases). On SD1.5")


def test_an_sdxl_like_base_file_on_sd15_is_warned_on_the_node_and_in_the_log(models_folder, caplog):
    release, _ = load_node(models_folder, "sdxl_release.safetensors")
    trained, trained_cnet = load_node(models_folder, "trained_sd15.safetensors", {"family": "sd15", "layout": "base"})
    image = control_image()
    with caplog.at_level(logging.WARNING, logger="ControlNeXt"):
        info = host.apply_module.ApplyControlNeXt.execute(tiny_model("sd15"), release, image, 1.0, 0.0, 1.0).ui
    assert info["controlnext_info"][1].startswith(RELEASE_WARNING)
    assert [r.getMessage() for r in caplog.records] == [f"ControlNeXt: {info['controlnext_info'][1][len('Warning: '):]}"]
    caplog.clear()
    _, release_cnet = load_node(models_folder, "sdxl_release.safetensors")  # loaded again: not yet warned
    with caplog.at_level(logging.WARNING, logger="ControlNeXt"):  # the CONTROL_NET route: the log, once per file
        for _ in range(2):
            positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
                conditioning("sd15", 1), conditioning("sd15", 2), release_cnet, image, 1.0, 0.0, 1.0)
            sample(tiny_model("sd15"), "sd15", positive=positive, negative=negative)
    assert [r.getMessage() for r in caplog.records] == [f"ControlNeXt: {info['controlnext_info'][1][len('Warning: '):]}"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ControlNeXt"):  # the legitimate pairings: not a word
        for file, model in ((trained, tiny_model("sd15")), (release, tiny_model("sdxl"))):
            assert len(host.apply_module.ApplyControlNeXt.execute(model, file, image, 1.0, 0.0, 1.0)
                       .ui["controlnext_info"]) == 1
        positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            conditioning("sd15", 1), conditioning("sd15", 2), trained_cnet, image, 1.0, 0.0, 1.0)
        sample(tiny_model("sd15"), "sd15", positive=positive, negative=negative)
    assert caplog.records == []


# --- lifecycle under ComfyUI's memory management and multi-GPU sampling ----------------------

def test_the_patch_drops_its_cached_controls_when_comfyui_unloads_the_model(tmp_path):
    model = tiny_model("sd15")
    file = loaded(tmp_path, "mid")
    patched = host.apply_module.ApplyControlNeXt.execute(model, file, control_image(), 1.0, 0.0, 1.0,
                                                         refresh_every=2).result[0]
    (patch,) = patched.model_options["transformer_options"]["patches"]["output_block_patch"]
    first = sample(patched, "sd15", steps=3)
    assert patch.cache.last is not None and patch.cache.held  # the last unit controls are cached...
    comfy.model_management.unload_all_models()  # ...until ComfyUI detaches the model (model_patches_to)
    assert patch.cache.last is None and patch.cache.held == {}
    assert torch.equal(sample(patched, "sd15", steps=3), first)


multigpu_host = pytest.mark.skipif(not hasattr(comfy.controlnet.ControlBase, "deepclone_multigpu"),
                                   reason="this ComfyUI has no multi-GPU sampling (ControlBase.deepclone_multigpu)")


@multigpu_host
def test_multi_gpu_sampling_runs_an_independent_copy_of_the_control_net_on_each_device(tmp_path, monkeypatch):
    model = tiny_model("sd15")
    file = loaded(tmp_path, "mid")
    positive, negative = controlnet_route("sd15", file, control_image(), strength=0.8)
    reference = sample(model, "sd15", positive=positive, negative=negative, batch=2)
    # ComfyUI's multi-GPU nodes give the model a clone per extra device; a second CPU device stands in for a GPU
    extra_device = torch.device("cpu", 0)
    extra = model.clone()
    extra.load_device, extra.is_multigpu_base_clone = extra_device, True
    multigpu = model.clone()
    multigpu.set_additional_models("multigpu", [extra])
    assert_close(sample(multigpu, "sd15", positive=positive, negative=negative, batch=2), reference)
    control = positive[0][1]["control"]
    clone = control.multigpu_clones[extra_device]  # made by ComfyUI with deepclone_multigpu(autoregister=True)
    assert type(clone) is type(control) and clone.file.patcher.load_device == extra_device
    assert clone.file.encoder is not control.file.encoder and clone.file.name == control.file.name
    assert (clone.strength, clone.timestep_percent_range) == (control.strength, control.timestep_percent_range)
    # each device encodes with its own copy, once per step
    runs, clone_runs = count_encoder_runs(control.file, monkeypatch), count_encoder_runs(clone.file, monkeypatch)
    assert_close(sample(multigpu, "sd15", positive=positive, negative=negative, batch=2), reference)
    assert len(runs) == len(clone_runs) == 2
    # independent: the copy's weights are its own
    with torch.no_grad():
        clone.file.encoder.mid_convs[1].weight.mul_(-1.0)
    changed = sample(multigpu, "sd15", positive=positive, negative=negative, batch=2)
    assert (changed - reference).abs().max() > 1e-3 * reference.abs().max()
    assert torch.equal(sample(model, "sd15", positive=positive, negative=negative, batch=2), reference)
