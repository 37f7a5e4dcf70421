"""Host tests: two or more ControlNeXts on one model, on both routes and with a ControlNet in the
chain: each acts as it does alone, its encoder runs once per step (README, "Several controls")."""
from __future__ import annotations

import pytest
import torch

import host  # skips this module without a ComfyUI host
from host import apply, assert_close, conditioning, control_image, count_encoder_runs, sample, tiny_model
from test_host_reliability_nodes import cheap_model, randomise
from controlnext_testbed.tiny_unet import UNET_CONFIGS

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_management
import comfy.utils
import nodes as comfy_nodes

patch_module = host.patch_module
video = host.importlib.import_module(f"{host.PACK_NAME}.nodes.video")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stacking")
    return {name: patch_module.ControlNeXtFile(f"{name}.safetensors", host.core.load_encoder(host.core.load_state_dict_file(
        host.encoder_file(folder, layout, seed, f"{name}.safetensors"))))
        for name, layout, seed in (("canny", "base", 1), ("depth", "base", 2), ("mid", "mid", 3), ("pose", "base", 4),
                                   ("pose2", "base", 5))}


def patches_of(model) -> list:
    return [p for kind in model.model_options["transformer_options"]["patches"].values() for p in kind]


def block_options(patches, rows: int, sigma: float, chunks=(1, 0)) -> dict:
    """What the UNet gives the patches at their block in one model call."""
    return {"block": patches[0].block, "sigmas": torch.full((rows,), sigma), "cond_or_uncond": list(chunks),
            "original_shape": [rows * len(chunks), 4, 8, 8], "patches": {patches[0].kind: list(patches)}}


@pytest.mark.parametrize("family, first, second", [("sdxl", "canny", "depth"), ("svd", "pose", "pose2")])
def test_controlnexts_at_one_block_each_add_what_they_add_alone(files, family, first, second):
    """Each is normalised against the UNet's own hidden state, not the other's output: the sum of
    the single-control terms, whatever the order."""
    model = cheap_model(family) if family == "sdxl" else tiny_model("svd")
    rows = 1 if family == "sdxl" else 3
    images = control_image(batch=rows, seed=1), control_image(batch=rows, seed=2)
    if family == "sdxl":
        stacked = apply(apply(model, files[first], images[0], 0.6), files[second], images[1], 0.9)
    else:
        stacked = model
        for name, image, strength in ((first, images[0], 0.6), (second, images[1], 0.9)):
            stacked = video.ApplyControlNeXtSVD.execute(stacked, files[name], image, strength, 0.0, 1.0, "error",
                                                        False).result[0]
    patches = patches_of(stacked)
    assert len(patches) == 2 and patches[0].block == patches[1].block
    sigma = model.get_model_object("model_sampling").percent_to_sigma(0.3)
    hidden = torch.randn(2 * rows, 320, 8, 8, generator=torch.Generator().manual_seed(3))
    alone = [p(hidden, block_options([p], rows, sigma)) - hidden for p in patches]
    for order in (patches, patches[::-1]):
        options = block_options(order, rows, sigma)
        out = hidden
        for patch in order:
            out = patch(out, options)
        assert_close(out, hidden + alone[0] + alone[1])


def test_the_order_of_two_applies_at_one_block_does_not_matter_on_either_route(files):
    model = cheap_model("sdxl")
    canny, depth = control_image(seed=1), control_image(seed=2)
    one_way = sample(apply(apply(model, files["canny"], canny, 0.6), files["depth"], depth, 0.9), "sdxl")
    other_way = sample(apply(apply(model, files["depth"], depth, 0.9), files["canny"], canny, 0.6), "sdxl")
    assert_close(one_way, other_way)
    positive, negative = conditioning("sdxl", 1), conditioning("sdxl", 2)
    for name, image, strength in (("depth", depth, 0.9), ("canny", canny, 0.6)):
        positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, patch_module.ControlNeXtControlNet(files[name]), image, strength, 0.0, 1.0)
    assert_close(sample(model, "sdxl", positive=positive, negative=negative), one_way)


@pytest.fixture(scope="module")
def ordinary_controlnet():
    """A ComfyUI ControlNet (comfy.cldm) of the tiny SD1.5 UNet's layout, every weight random."""
    config = {k: v for k, v in UNET_CONFIGS["sd15"].items() if k not in ("out_channels", "transformer_depth_output")}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, num_head_channels=64, **config)
    randomise(control, seed=6)
    return comfy.controlnet.ControlNet(control, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None)


def chain(controls, image):
    """Conditioning with ``controls`` ((CONTROL_NET, strength), ...) chained by Apply ControlNet, first first."""
    positive, negative = conditioning("sd15", 1), conditioning("sd15", 2)
    for control, strength in controls:
        positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control, image, strength, 0.0, 1.0)
    return positive, negative


def test_a_mid_and_a_base_file_on_sd15_with_a_controlnet_each_encode_once_per_step(files, ordinary_controlnet,
                                                                                monkeypatch):
    model = tiny_model("sd15")
    image = control_image(seed=5)
    mid_runs, base_runs = count_encoder_runs(files["mid"], monkeypatch), count_encoder_runs(files["canny"], monkeypatch)
    positive, negative = chain([(ordinary_controlnet, 0.5)], image)
    both = apply(apply(model, files["mid"], image, 0.8), files["canny"], image, 0.6)
    on_model = sample(both, "sd15", batch=2, positive=positive, negative=negative)
    assert mid_runs == [1, 1] and base_runs == [1, 1]  # 2 steps, cond + uncond of 2 latents: one run each
    # every control acts: leaving one out changes the result
    for without in (apply(model, files["mid"], image, 0.8), apply(model, files["canny"], image, 0.6)):
        assert (sample(without, "sd15", batch=2, positive=positive, negative=negative) - on_model).abs().max() > 1e-4
    assert (sample(both, "sd15", batch=2) - on_model).abs().max() > 1e-4
    # the same through the CONTROL_NET route, and mixed, in one chain with the ControlNet
    mid_runs.clear(), base_runs.clear()
    chained = chain([(ordinary_controlnet, 0.5), (patch_module.ControlNeXtControlNet(files["mid"]), 0.8),
                     (patch_module.ControlNeXtControlNet(files["canny"]), 0.6)], image)
    assert_close(sample(model, "sd15", batch=2, positive=chained[0], negative=chained[1]), on_model)
    assert mid_runs == [1, 1] and base_runs == [1, 1]
    mixed = chain([(patch_module.ControlNeXtControlNet(files["canny"]), 0.6), (ordinary_controlnet, 0.5)], image)
    assert_close(sample(apply(model, files["mid"], image, 0.8), "sd15", batch=2, positive=mixed[0],
                        negative=mixed[1]), on_model)


# --- a control image of another shape than the latent ------------------------------------------

def encoder_inputs(file, monkeypatch) -> list:
    """The images ``file``'s encoder receives, one batch per encoder run."""
    images = []
    original = file.encoder.features

    def recording(image, timestep, inner_padding=1):
        images.append(image.clone())
        return original(image, timestep, inner_padding)

    monkeypatch.setattr(file.encoder, "features", recording)
    return images


def controlnet_hints(control_model, monkeypatch) -> list:
    """The hint images ComfyUI's ControlNet model receives, one batch per call."""
    hints = []
    original = control_model.forward

    def recording(*args, **kwargs):
        hints.append(kwargs["hint"].clone())
        return original(*args, **kwargs)

    monkeypatch.setattr(control_model, "forward", recording)
    return hints


@pytest.mark.parametrize("height, width", [(40, 100), (100, 40), (30, 43), (20, 33), (30, 45), (64, 64)])
def test_control_images_are_fitted_with_comfyuis_centre_crop(height, width):
    image = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    for target_height, target_width in ((64, 64), (64, 96), (96, 64)):
        assert torch.equal(host.core.fit_control(image, target_height, target_width),
                           comfy.utils.common_upscale(image, target_width, target_height, "nearest-exact", "center"))


def test_a_photo_of_another_shape_covers_the_same_region_as_for_the_controlnet_beside_it(files, ordinary_controlnet,
                                                                                      monkeypatch):
    """The 'SD1.5 + ControlNet' template with a wide photo on a square latent: the ControlNeXt sees
    the centre crop the ControlNet sees, on both routes (it was stretched, the ControlNet's cut)."""
    model = tiny_model("sd15")
    wide = torch.rand(1, 40, 100, 3, generator=torch.Generator().manual_seed(8))
    hints = controlnet_hints(ordinary_controlnet.control_model, monkeypatch)
    encoded = encoder_inputs(files["mid"], monkeypatch)
    chained = chain([(ordinary_controlnet, 0.5), (patch_module.ControlNeXtControlNet(files["mid"]), 0.8)], wide)
    sample(model, "sd15", positive=chained[0], negative=chained[1], steps=1)
    beside = chain([(ordinary_controlnet, 0.5)], wide)
    applied = host.apply_module.ApplyControlNeXt.execute(model, files["mid"], wide, 0.8, 0.0, 1.0)
    assert applied.ui["controlnext_detail"][1].startswith("control image 100x40: fitted to the generated size as "
                                                          "ComfyUI's ControlNets fit theirs")
    sample(applied.result[0], "sd15", positive=beside[0], negative=beside[1], steps=1)
    assert len(hints) == 2 and len(encoded) == 2  # one step of each route, cond and uncond in one call
    for hint in hints:
        assert torch.equal(hint, hints[0][:1].expand_as(hint))
    for image in encoded:
        assert image.shape == (1, 3, 64, 64) and torch.equal(image, hints[0][:1])
