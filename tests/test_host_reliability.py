"""Reliability battery, in-process host part: every model family against every encoder layout
(and model types ControlNeXt does not support), bad control inputs, chained applies, and
ControlNeXt + ControlNet + LoRA together, on tiny models inside a real ComfyUI. The HTTP part
(bad files on disk, validation, load, interrupt) is test_host_reliability_server.py.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import safetensors.torch
import torch

import host  # skips this module without a ComfyUI host
from host import apply, assert_close, conditioning, control_image, loaded, tiny_model
from test_host_reliability_nodes import CHEAP_CONFIGS, cheap_model, randomise
from controlnext_testbed.tiny_unet import SVD_CONFIG

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_management
import comfy.ldm.flux.model
import comfy.lora
import comfy.model_patcher
import comfy.sample
import comfy.sd
import comfy.supported_models
import folder_paths
import nodes as comfy_nodes

patch_module = host.patch_module
video = host.importlib.import_module(f"{host.PACK_NAME}.nodes.video")
ControlNeXtError = host.core.ControlNeXtError

ENCODER_NAMES = {"mid": "controlnext_mid.safetensors", "base": "controlnext_base.safetensors",
                 "svd_v1": "controlnext_svd_v1.safetensors"}
LAYOUT_TEXT = {"mid": '"mid" layout (1280 channels: SD1.5 releases)',
               "base": '"base" layout (320 channels: SDXL releases, SVD-v2, SD1.5 training code)',
               "svd_v1": '"SVD v1" layout (1280 channels with GroupNorm)'}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a busy 2-core machine two intra-op threads wait on each other at every small op (a
    cheap sampler call measured 3 s with 2 threads, 0.1 s with 1); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- models ------------------------------------------------------------------------------

def on_meta(config_class, unet_config: dict) -> comfy.model_patcher.ModelPatcher:
    """A model of another ComfyUI model type, with no memory behind it (only its type matters)."""
    model_config = config_class(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(base, torch.device("meta"), torch.device("meta"))


def flux_config() -> dict:
    config = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=32, context_in_dim=32,
                  hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
                  theta=10000, qkv_bias=True, guidance_embed=False, txt_ids_dims=[])
    known = {field.name for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams)} | {"image_model"}
    return {k: v for k, v in config.items() if k in known}  # FluxParams gained fields between versions


def unsupported_model(kind: str) -> comfy.model_patcher.ModelPatcher:
    if kind == "SD3":
        return on_meta(comfy.supported_models.SD3, dict(
            in_channels=16, pos_embed_scaling_factor=None, patch_size=2, depth=2, num_patches=64, pos_embed_max_size=8,
            adm_in_channels=64, context_embedder_config={"target": "torch.nn.Linear",
                                                         "params": {"in_features": 32, "out_features": 128}}))
    if kind == "Flux":
        return on_meta(comfy.supported_models.Flux, flux_config())
    return on_meta(comfy.supported_models.SDXLRefiner, dict(
        use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
        num_classes="sequential", adm_in_channels=2560, in_channels=4, model_channels=32, num_res_blocks=[1, 1],
        channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_middle=1, use_linear_in_transformer=True,
        context_dim=64, transformer_depth_output=[0, 0, 1, 1], use_temporal_resblock=False,
        use_temporal_attention=False))


def svd_three_levels_on_meta() -> comfy.model_patcher.ModelPatcher:
    """SVD with the real channel widths down to 1280 (the tiny SVD stops at 640): where an SVD v1
    encoder injects (before the middle block)."""
    config = dict(SVD_CONFIG, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4], transformer_depth=[1, 1, 1],
                  transformer_depth_output=[1, 1, 1, 1, 1, 1])
    model = on_meta(comfy.supported_models.SVD_img2vid, config)
    model.model.model_config.unet_config["num_head_channels"] = 64
    return model


MODELS = {"sd15": lambda: tiny_model("sd15"), "sdxl": lambda: tiny_model("sdxl"), "svd": lambda: tiny_model("svd"),
          "svd_1280": svd_three_levels_on_meta, "SD3": lambda: unsupported_model("SD3"),
          "Flux": lambda: unsupported_model("Flux"), "SDXLRefiner": lambda: unsupported_model("SDXLRefiner")}
MODEL_TYPE = {"sd15": "SD15", "sdxl": "SDXL", "svd": "SVD_img2vid", "svd_1280": "SVD_img2vid"}
FAMILY_TEXT = {"sd15": "SD1.5", "sdxl": "SDXL", "svd": "Stable Video Diffusion", "svd_1280": "Stable Video Diffusion"}


@pytest.fixture(scope="module")
def models_folder(tmp_path_factory):
    """models/controlnext and models/controlnet in a temp dir, holding one encoder of each layout,
    with a valid encoder just OUTSIDE them (models/secret.safetensors)."""
    models = tmp_path_factory.mktemp("models")
    for folder in ("controlnext", "controlnet"):
        (models / folder).mkdir()
    for layout, name in ENCODER_NAMES.items():
        safetensors.torch.save_file(host.random_encoder_state_dict(layout), str(models / "controlnext" / name))
    safetensors.torch.save_file(host.random_encoder_state_dict("mid"), str(models / "secret.safetensors"))
    patch = pytest.MonkeyPatch()
    for folder in ("controlnext", "controlnet"):
        patch.setitem(folder_paths.folder_names_and_paths, folder, ([str(models / folder)], set()))
    patch.setattr(folder_paths, "filename_list_cache", {})
    yield models
    patch.undo()


@pytest.fixture(scope="module")
def files(models_folder):
    return {layout: patch_module.ControlNeXtFile(name, host.core.load_encoder(host.core.load_state_dict_file(
        str(models_folder / "controlnext" / name)))) for layout, name in ENCODER_NAMES.items()}


# --- every model family against every layout ----------------------------------------------

def mismatch(model: str, layout: str, served: str) -> str:
    family = FAMILY_TEXT[model]
    return (f"'{ENCODER_NAMES[layout]}' on a {family} model ({MODEL_TYPE[model]}): This ControlNeXt file has the "
            f"{LAYOUT_TEXT[layout]}, which cannot serve a {family} model; it serves {served}. Use a ControlNeXt "
            f"release made for {family}, or a {served} model.")


def unsupported(model: str, layout: str) -> str:
    return (f"'{ENCODER_NAMES[layout]}' ({LAYOUT_TEXT[layout]}) cannot be applied to this {model} model: ControlNeXt "
            f"works with SD1.5, SDXL and Stable Video Diffusion models. Load one of those.")


NEEDS_SVD = ("This node needs a Stable Video Diffusion model (SVD-XT 1.1 for ControlNeXt-SVD-v2); got a {} model. "
             "For images use Apply ControlNeXt.")
TINY_SVD_CHANNELS = ("'controlnext_svd_v1.safetensors' outputs 1280 channels but this SVD_img2vid UNet has 640 at "
                     "block ('input', 3): it is not the architecture ControlNeXt Stable Video Diffusion releases are "
                     "made for.")


def use_svd_nodes(layout: str) -> str:
    return (f"This is a Stable Video Diffusion model: use Load ControlNeXt SVD and Apply ControlNeXt SVD, which take "
            f"one pose image per video frame ('{ENCODER_NAMES[layout]}' has the {LAYOUT_TEXT[layout]}).")


# What each node route gives: the patched block, or the exact message. "image": Apply ControlNeXt
# for image models, Load + Apply ControlNeXt SVD for SVD; "control_net": Load ControlNeXt's
# CONTROL_NET through ComfyUI's Apply ControlNet.
EXPECTED = {
    ("sd15", "mid"): (("output", 0), ("output", 0)),
    ("sd15", "base"): (("input", 2), ("input", 2)),
    ("sd15", "svd_v1"): (mismatch("sd15", "svd_v1", "Stable Video Diffusion"),) * 2,
    ("sdxl", "mid"): (mismatch("sdxl", "mid", "SD1.5"),) * 2,
    ("sdxl", "base"): (("input", 0), ("input", 0)),
    ("sdxl", "svd_v1"): (mismatch("sdxl", "svd_v1", "Stable Video Diffusion"),) * 2,
    ("svd", "mid"): (mismatch("svd", "mid", "SD1.5"),) * 2,
    ("svd", "base"): (("input", 2), ("input", 2)),
    ("svd", "svd_v1"): (TINY_SVD_CHANNELS,) * 2,  # the tiny SVD is 2 levels deep: the channel guard speaks
    ("svd_1280", "svd_v1"): (("input", 5), ("input", 5)),
    **{(kind, layout): (unsupported(kind, layout),) * 2
       for kind in ("SD3", "Flux", "SDXLRefiner") for layout in ENCODER_NAMES},
}


def image_route(model, model_key: str, file):
    image = control_image()
    if model_key.startswith("svd"):
        loaded_model, svd_file = video.LoadControlNeXtSVD.execute(model, file.name, "none").result
        out = video.ApplyControlNeXtSVD.execute(loaded_model, svd_file, image, 1.0, 0.0, 1.0, "error", False).result[0]
    else:
        out = apply(model, file, image)
    patches = out.model_options["transformer_options"]["patches"]
    (kind, (patch,)), = patches.items()
    assert kind == patch.kind
    return patch.block


def control_net_route(model, file, start: float = 0.0, end: float = 1.0):
    cnet = patch_module.ControlNeXtControlNet(file)
    positive, _ = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        conditioning("sd15", 1), conditioning("sd15", 2), cnet, control_image(), 1.0, start, end)
    control = positive[0][1]["control"]
    control.pre_run(model.model, lambda percent: 999.0 * (1.0 - percent))
    return control.patch.block


@pytest.mark.parametrize("route", ["image", "control_net"])
@pytest.mark.parametrize("model_key,layout", sorted(EXPECTED))
def test_every_model_against_every_layout(files, model_key, layout, route):
    model = MODELS[model_key]()
    options_before = copy.deepcopy(model.model_options)
    expected = EXPECTED[(model_key, layout)][route == "control_net"]
    run = (lambda: image_route(model, model_key, files[layout])) if route == "image" else \
        (lambda: control_net_route(model, files[layout]))
    if isinstance(expected, tuple):
        assert run() == expected
    else:
        with pytest.raises(ControlNeXtError) as error:
            run()
        assert str(error.value) == expected
    assert model.model_options == options_before


@pytest.mark.parametrize("model_key", ["svd", "svd_1280"])
@pytest.mark.parametrize("layout", sorted(ENCODER_NAMES))
def test_apply_controlnext_on_svd_points_to_the_svd_nodes(files, model_key, layout):
    with pytest.raises(ControlNeXtError) as error:
        apply(MODELS[model_key](), files[layout], control_image())
    assert str(error.value) == use_svd_nodes(layout)


@pytest.mark.parametrize("model_key", ["sd15", "sdxl", "SD3", "Flux", "SDXLRefiner"])
def test_svd_nodes_refuse_other_models(files, model_key):
    model = MODELS[model_key]()
    type_name = MODEL_TYPE.get(model_key, model_key)
    with pytest.raises(ControlNeXtError) as error:
        video.LoadControlNeXtSVD.execute(model, ENCODER_NAMES["base"], "none")
    assert str(error.value) == NEEDS_SVD.format(type_name)
    with pytest.raises(ControlNeXtError) as error:
        video.ApplyControlNeXtSVD.execute(model, files["base"], control_image(), 1.0, 0.0, 1.0, "error", False)
    assert str(error.value) == NEEDS_SVD.format(type_name)


@pytest.mark.parametrize("model_key", ["SD3", "Flux", "SDXLRefiner"])
def test_unet_weights_on_unsupported_models_name_file_and_model(models_folder, model_key):
    with pytest.raises(ControlNeXtError) as error:
        host.loaders.LoadControlNeXtUNetWeights.execute(unsupported_model(model_key), ENCODER_NAMES["mid"], 1.0, "auto")
    assert str(error.value) == (f"'{ENCODER_NAMES['mid']}': ControlNeXt UNet weights apply to SD1.5, SDXL and SVD "
                                f"models; this is a {model_key} model.")


# --- file names that point outside the models folders --------------------------------------

NOT_IN_FOLDERS = ("'{}' is not in the models/controlnext or models/controlnet folders (or their "
                  "extra_model_paths.yaml entries). Put the file there and refresh the page.")


def test_names_outside_the_models_folders_never_resolve(models_folder):
    secret = models_folder / "secret.safetensors"
    assert secret.is_file()
    for name in ("../secret.safetensors", "../../models/secret.safetensors", str(secret),
                 "controlnext/../../secret.safetensors"):
        with pytest.raises(ControlNeXtError) as error:
            host.loaders.resolve(name)
        assert str(error.value) == NOT_IN_FOLDERS.format(name)
        with pytest.raises(ControlNeXtError) as error:
            host.loaders.LoadControlNeXt.execute(name)
        assert str(error.value) == NOT_IN_FOLDERS.format(name)
    # "../" is normalised away: such a name can only reach a file INSIDE the folder
    inside = str(models_folder / "controlnext" / ENCODER_NAMES["mid"])
    assert host.loaders.resolve(f"../../{ENCODER_NAMES['mid']}") == inside
    assert "secret.safetensors" not in host.loaders.model_files()



class _Payload:
    """Unpickling this creates a marker directory (what a hostile file would do instead)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_hostile_pickle_is_refused_naming_its_folder_and_never_the_unsafe_loader(models_folder, tmp_path):
    folder = models_folder / "controlnet"
    marker = tmp_path / "pwned"
    torch.save({"mid_convs.1.weight": _Payload(str(marker))}, str(folder / "hostile_encoder.bin"))
    try:
        with pytest.raises(ControlNeXtError) as error:
            host.loaders.LoadControlNeXt.execute("hostile_encoder.bin")
    finally:
        os.remove(folder / "hostile_encoder.bin")
    assert str(error.value) == (
        f"Refused to load 'hostile_encoder.bin' (in {folder}): it is a pickle holding more than plain tensors, and "
        f"unpickling it could run code (it imports {os.mkdir.__module__}.mkdir). Do not load it by other means: "
        f"delete it and use a .safetensors copy of the model from its release.")
    assert not marker.exists()

# --- control inputs ------------------------------------------------------------------------
# Sampled on the cheap two-level UNets with the "base" layout: SD1.5 pools then normalises at
# ("input", 2), SDXL normalises then pools at ("input", 0), so both orders are exercised.

def sample_hw(model, family: str, height: int, width: int, batch: int = 1, steps: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(batch, 4, height, width, generator=generator)
    return comfy.sample.sample(model, noise, steps, 2.0, "euler", "normal", conditioning(family, 1),
                               conditioning(family, 2), torch.zeros_like(noise), seed=11, disable_pbar=True)


FAMILY_FILES = [("sd15", "base"), ("sdxl", "base")]


@pytest.mark.parametrize("family,layout", FAMILY_FILES)
def test_control_batch_that_fits_no_latent_batch(files, family, layout):
    patched = apply(cheap_model(family), files[layout], control_image(batch=3))
    with pytest.raises(ControlNeXtError) as error:
        sample_hw(patched, family, 8, 8, batch=2)
    assert str(error.value) == "3 control images for 2 latents: give one image (used for the whole batch) or exactly 2."


@pytest.mark.parametrize("family,layout", FAMILY_FILES)
@pytest.mark.parametrize("latent_hw,image_hw", [
    ((5, 7), (63, 65)),    # 40x56 px: multiples of 8, not of 64; control image a multiple of neither
    ((9, 3), (72, 24)),    # odd latent sizes
    ((2, 64), (16, 512)),  # 1:32
    ((64, 2), (7, 3)),     # 32:1, with a control image of another aspect
    ((4, 4), (4096, 8)),   # control image 512:1 on a square latent
])
def test_odd_sizes_and_huge_aspect_ratios_sample(files, family, layout, latent_hw, image_hw):
    model = cheap_model(family)
    image = torch.rand(1, *image_hw, 3, generator=torch.Generator().manual_seed(4))
    bare = sample_hw(model, family, *latent_hw)
    controlled = sample_hw(apply(model, files[layout], image), family, *latent_hw)
    assert controlled.shape == bare.shape == (1, 4, *latent_hw)
    assert torch.isfinite(controlled).all()
    assert (controlled - bare).abs().max() > 1e-4


@pytest.mark.parametrize("family,layout", FAMILY_FILES)
def test_one_pixel_control_image_is_a_flat_image_of_its_colour(files, family, layout):
    model = cheap_model(family)
    colour = torch.tensor([0.2, 0.7, 0.4])
    one_pixel = sample_hw(apply(model, files[layout], colour.view(1, 1, 1, 3)), family, 8, 8)
    flat = sample_hw(apply(model, files[layout], colour.view(1, 1, 1, 3).expand(1, 64, 64, 3)), family, 8, 8)
    assert torch.isfinite(one_pixel).all()
    assert_close(one_pixel, flat)


@pytest.mark.parametrize("family,layout", FAMILY_FILES)
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_control_images_sample_finite(files, family, layout, value):
    model = cheap_model(family)
    out = sample_hw(apply(model, files[layout], torch.full((1, 64, 64, 3), value)), family, 8, 8)
    assert torch.isfinite(out).all()
    assert (out - sample_hw(model, family, 8, 8)).abs().max() > 1e-4


@pytest.mark.parametrize("family,layout", FAMILY_FILES)
def test_masks_of_other_sizes(files, family, layout):
    model = cheap_model(family)
    image = control_image()
    unmasked = sample_hw(apply(model, files[layout], image), family, 8, 8)
    bare = sample_hw(model, family, 8, 8)
    # a mask of any size is resized to the injection block: all-white is no mask, all-black no control
    assert torch.equal(sample_hw(apply(model, files[layout], image, mask=torch.ones(1, 17, 33)), family, 8, 8), unmasked)
    assert torch.equal(sample_hw(apply(model, files[layout], image, mask=torch.zeros(5, 3)), family, 8, 8), bare)
    assert torch.equal(sample_hw(apply(model, files[layout], image, mask=torch.ones(1, 1)), family, 8, 8), unmasked)
    half = torch.zeros(1, 7, 300)
    half[..., :150] = 1.0
    partial = sample_hw(apply(model, files[layout], image, mask=half), family, 8, 8)
    assert not torch.equal(partial, unmasked) and not torch.equal(partial, bare)
    with pytest.raises(ControlNeXtError) as error:
        sample_hw(apply(model, files[layout], image, mask=torch.ones(3, 64, 64)), family, 8, 8, batch=2)
    assert str(error.value) == "3 masks for a batch of 2 latents: give one mask or exactly 2."


START_AFTER_END = ("start_percent (0.8) is after end_percent (0.2): control would never act. Make start_percent <= "
                   "end_percent.")


def test_start_after_end_is_refused_on_every_route(files):
    model = cheap_model("sd15")
    with pytest.raises(ControlNeXtError) as error:
        apply(model, files["base"], control_image(), start=0.8, end=0.2)
    assert str(error.value) == START_AFTER_END
    # Fixed: through ComfyUI's Apply ControlNet (which allows start > end) control silently never acted.
    with pytest.raises(ControlNeXtError) as error:
        control_net_route(model, files["base"], start=0.8, end=0.2)
    assert str(error.value) == START_AFTER_END
    svd_model, svd_file = video.LoadControlNeXtSVD.execute(tiny_model("svd"), ENCODER_NAMES["base"], "none").result
    with pytest.raises(ControlNeXtError) as error:
        video.ApplyControlNeXtSVD.execute(svd_model, svd_file, control_image(), 1.0, 0.8, 0.2, "error", False)
    assert str(error.value) == START_AFTER_END


def test_strength_at_the_limits_of_the_input(files):
    model = cheap_model("sd15")
    bare = sample_hw(model, "sd15", 8, 8)
    ten = sample_hw(apply(model, files["base"], control_image(), strength=10.0), "sd15", 8, 8)
    assert torch.isfinite(ten).all() and (ten - bare).abs().max() > 1e-3
    assert torch.equal(sample_hw(apply(model, files["base"], control_image(), strength=0.0), "sd15", 8, 8), bare)


# --- chained applies, and ControlNeXt + ControlNet + LoRA --------------------------------

def test_two_applies_at_different_blocks_commute_and_both_act(files):
    model = tiny_model("sd15")  # the "mid" layout needs the 1280-channel middle block
    options_before = copy.deepcopy(model.model_options)
    a, b = control_image(seed=1), control_image(seed=2)
    mid_then_base = apply(apply(model, files["mid"], a), files["base"], b, strength=0.7)
    base_then_mid = apply(apply(model, files["base"], b, strength=0.7), files["mid"], a)
    assert {kind: [p.block for p in patches] for kind, patches in
            mid_then_base.model_options["transformer_options"]["patches"].items()} == {
        "output_block_patch": [("output", 0)], "input_block_patch_after_skip": [("input", 2)]}
    chained = sample_hw(mid_then_base, "sd15", 8, 8)
    assert torch.equal(chained, sample_hw(base_then_mid, "sd15", 8, 8))
    only_mid = sample_hw(apply(model, files["mid"], a), "sd15", 8, 8)
    only_base = sample_hw(apply(model, files["base"], b, strength=0.7), "sd15", 8, 8)
    assert min((chained - only_mid).abs().max(), (chained - only_base).abs().max()) > 1e-4
    assert model.model_options == options_before


def test_two_applies_at_the_same_block_stack_without_touching_their_inputs(files, monkeypatch):
    model = cheap_model("sdxl")
    first = apply(model, files["base"], control_image(seed=1), strength=0.5)
    first_options = copy.deepcopy(first.model_options)
    second = apply(first, files["base"], control_image(seed=2), strength=0.8)
    assert first.model_options == first_options  # the intermediate MODEL is untouched
    (patches,) = second.model_options["transformer_options"]["patches"].values()
    assert [p.gains for p in patches] == [(0.5, 0.5), (0.8, 0.8)]
    calls = host.count_encoder_runs(files["base"], monkeypatch)
    both = sample_hw(second, "sdxl", 8, 8, steps=2)
    assert calls == [1, 1, 1, 1]  # each apply encodes its own image once per step (2 steps)
    single = sample_hw(first, "sdxl", 8, 8, steps=2)
    assert torch.isfinite(both).all() and (both - single).abs().max() > 1e-4
    # a second apply at strength 0 is bit-identical to the first alone
    assert torch.equal(sample_hw(apply(first, files["base"], control_image(seed=2), strength=0.0), "sdxl", 8, 8,
                                 steps=2), single)


@pytest.fixture(scope="module")
def ordinary_controlnet():
    """A ComfyUI ControlNet (comfy.cldm) of the cheap SD1.5 UNet's layout, every weight random
    (zero convs included, or it would add nothing)."""
    config = {k: v for k, v in CHEAP_CONFIGS["sd15"].items() if k not in ("out_channels", "transformer_depth_output")}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, num_head_channels=64, **config)
    randomise(control, seed=6)
    return comfy.controlnet.ControlNet(control, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None)


def tiny_lora(model, rank: int = 4, seed: int = 8) -> dict:
    """A kohya-style LoRA on the tiny UNet's attention projections, in ComfyUI's key names."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    state = model.model_state_dict()
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, key in sorted(key_map.items()):
        if not (isinstance(key, str) and name.startswith("lora_unet_") and key.endswith(("to_q.weight", "to_v.weight"))):
            continue
        out_features, in_features = state[key].shape
        lora[f"{name}.lora_up.weight"] = 0.05 * torch.randn(out_features, rank, generator=generator)
        lora[f"{name}.lora_down.weight"] = 0.05 * torch.randn(rank, in_features, generator=generator)
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    assert lora
    return lora


def with_lora(model, lora):
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    return patched


def with_controlnet(controlnet, image, previous=None, strength=0.6):
    positive, negative = conditioning("sd15", 1), conditioning("sd15", 2)
    if previous is not None:
        positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, previous, image, 1.0, 0.0, 1.0)
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, image, strength,
                                                                   0.0, 1.0)


def sample_with(model, conds=None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    positive, negative = conds if conds is not None else (conditioning("sd15", 1), conditioning("sd15", 2))
    return comfy.sample.sample(model, noise, 1, 2.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                               seed=5, disable_pbar=True)


def test_controlnext_with_controlnet_and_lora(files, ordinary_controlnet):
    model = cheap_model("sd15")
    options_before = copy.deepcopy(model.model_options)
    bare = sample_with(model)
    lora = tiny_lora(model)
    image = control_image(seed=6)
    conds = with_controlnet(ordinary_controlnet, image)
    all_three = sample_with(apply(with_lora(model, lora), files["base"], image), conds)
    assert torch.isfinite(all_three).all()
    # each of the three acts: leaving any one out changes the result
    without = {"lora": sample_with(apply(model, files["base"], image), conds),
               "controlnext": sample_with(with_lora(model, lora), conds),
               "controlnet": sample_with(apply(with_lora(model, lora), files["base"], image))}
    for left_out, result in without.items():
        assert (all_three - result).abs().max() > 1e-4, left_out
    # LoRA after ControlNeXt: the same (each keeps the other's patches on its clone)
    assert torch.equal(sample_with(with_lora(apply(model, files["base"], image), lora), conds), all_three)
    # ControlNeXt as a CONTROL_NET chained with the ordinary ControlNet gives the MODEL route's result
    cnext = patch_module.ControlNeXtControlNet(files["base"])
    stacked = with_controlnet(ordinary_controlnet, image, previous=cnext)
    assert_close(sample_with(with_lora(model, lora), stacked), all_three)
    # and the input MODEL is as it was
    assert model.model_options == options_before and not model.patches
    assert torch.equal(sample_with(model), bare)
