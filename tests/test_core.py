"""Core tests: plain torch, no ComfyUI."""
from __future__ import annotations

import logging
import math
import os
import pickle

import pytest
import safetensors.torch
import torch
from torch.nn import functional as F

import controlnext_core as cn
from controlnext_testbed.official_layouts import OFFICIAL_KEYS, random_encoder_state_dict

SPEC_ROWS = {  # (family, layout): (pool first, eps, k), as the README's injection table gives them
    ("sd15", "mid"): (True, 1e-12, 1.0),
    ("sd15", "base"): (True, 1e-12, 1.0),
    ("sdxl", "base"): (False, 1e-12, 1.0),
    ("svd", "base"): (False, 1e-5, 0.2),
    ("svd", "svd_v1"): (False, 1e-5, 1.0),
}


def official_formula(h, c, pool_first, eps, k, scale):
    """The official cross normalisation transcribed literally (fp64, torch.std unbiased)."""
    h, c = h.double(), c.double()
    if pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    mu_h, sd_h = h.mean(dim=(1, 2, 3), keepdim=True), h.std(dim=(1, 2, 3), keepdim=True)
    mu_c, sd_c = c.mean(dim=(1, 2, 3), keepdim=True), c.std(dim=(1, 2, 3), keepdim=True)
    c = (c - mu_c) * sd_h / (sd_c + eps) + mu_h
    if not pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    return h + c * scale * k


def save(tmp_path, state_dict, name="controlnet.safetensors"):
    path = os.path.join(tmp_path, name)
    if name.endswith(".safetensors"):
        safetensors.torch.save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path


# --- loading -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout,family,out_channels", [("base", "sdxl", 320), ("mid", "sd15", 1280),
                                                        ("svd_v1", "svd", 1280)])
def test_official_layouts_load_strictly(tmp_path, dtype, layout, family, out_channels):
    state_dict = random_encoder_state_dict(layout, dtype=dtype)
    model = cn.load_controlnext(cn.load_state_dict_file(save(tmp_path, state_dict)))
    assert (model.layout, model.family) == (layout, family)
    assert set(model.encoder.state_dict()) == set(OFFICIAL_KEYS[{"base": "encoder_base", "mid": "encoder_mid",
                                                                  "svd_v1": "encoder_svd_v1"}[layout]])
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, state_dict[key].float()), key
    out = model.encode(torch.rand(2, 3, 64, 64), torch.tensor([999.0, 10.0]))
    assert out.shape[:2] == (2, out_channels) and torch.isfinite(out).all()


def test_parameter_counts_match_the_paper():
    assert cn.load_controlnext(random_encoder_state_dict("base")).num_parameters == pytest.approx(3.53e6, rel=0.005)
    assert cn.load_controlnext(random_encoder_state_dict("mid")).num_parameters == pytest.approx(5.35e6, rel=0.005)


def test_scale_is_read_from_the_file_or_defaults():
    assert cn.load_controlnext(random_encoder_state_dict("mid")).scale == pytest.approx(0.8)
    assert cn.load_controlnext(random_encoder_state_dict("base")).scale == 1.0
    v1 = cn.load_controlnext(random_encoder_state_dict("svd_v1"))
    assert v1.scale == pytest.approx(1.3 / (1 + math.exp(-0.8)))


def test_output_sizes_follow_each_structure():
    image = torch.rand(1, 3, 64, 96)
    t = torch.tensor([500.0])
    assert cn.load_controlnext(random_encoder_state_dict("base"), "sdxl").encode(image, t).shape == (1, 320, 8, 12)
    assert cn.load_controlnext(random_encoder_state_dict("base"), "sd15").encode(image, t).shape == (1, 320, 8, 12)
    assert cn.load_controlnext(random_encoder_state_dict("mid")).encode(image, t).shape == (1, 1280, 8, 12)
    # SVD-v2 inference encoder: no padding in two embedding convs: ceil((H/2 - 4) / 4)
    assert cn.load_controlnext(random_encoder_state_dict("base"), "svd").encode(image, t).shape == (1, 320, 7, 11)
    assert cn.load_controlnext(random_encoder_state_dict("svd_v1")).encode(image, t).shape == (1, 1280, 2, 3)


def test_base_layout_without_hint_assumes_sdxl_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="ControlNeXt"):
        model = cn.load_controlnext(random_encoder_state_dict("base"))
    assert model.family == "sdxl"
    assert "assuming it serves SDXL" in caplog.text


@pytest.mark.parametrize("layout,family,message", [
    ("mid", "sdxl", "cannot serve a SDXL model; it serves SD1.5"),
    ("mid", "svd", "cannot serve a Stable Video Diffusion model"),
    ("svd_v1", "sd15", "cannot serve a SD1.5 model"),
    ("base", "flux", "Unsupported model family 'flux'"),
])
def test_family_hint_the_layout_cannot_serve(layout, family, message):
    with pytest.raises(cn.ControlNeXtError, match=message):
        cn.load_controlnext(random_encoder_state_dict(layout), family)


def test_pickle_is_loaded_safely(tmp_path):
    state_dict = random_encoder_state_dict("mid")
    model = cn.load_controlnext(cn.load_state_dict_file(save(tmp_path, state_dict, "controlnet.bin")))
    assert model.layout == "mid"


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.path.join(os.environ["CONTROLNEXT_TEST_MARKER"]),))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    marker = os.path.join(tmp_path, "pwned")
    monkeypatch.setenv("CONTROLNEXT_TEST_MARKER", marker)
    path = os.path.join(tmp_path, "controlnet.bin")
    with open(path, "wb") as file:
        pickle.dump({"scale": _Payload()}, file)
    with pytest.raises(cn.ControlNeXtError, match="Refused to load 'controlnet.bin'.*could run code"):
        cn.load_state_dict_file(path)
    assert not os.path.exists(marker)


def test_malicious_pickle_message_names_the_folder_and_never_the_unsafe_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLNEXT_TEST_MARKER", os.path.join(tmp_path, "pwned"))
    folder = os.path.join(tmp_path, "models", "controlnext")
    os.makedirs(folder)
    path = os.path.join(folder, "controlnet.bin")
    torch.save({"scale": _Payload()}, path)
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_state_dict_file(path)
    message = str(error.value)
    assert f"'controlnet.bin' (in {folder})" in message and f"(it imports {os.mkdir.__module__}.mkdir)" in message
    assert "weights_only" not in message and "False" not in message


# --- which family a "base" file was made for --------------------------------------------------

RELEASE_LIKE = "is probably an SDXL release's encoder (the published \"base\" files are SDXL and SVD-v2 releases)"


@pytest.mark.parametrize("family,layout,metadata,warned", [
    ("sd15", "base", {}, RELEASE_LIKE),
    ("sd15", "base", {"format": "pt"}, RELEASE_LIKE),
    ("sd15", "base", {"family": "sdxl"}, "was made for SDXL (its metadata says family=sdxl)"),
    ("sd15", "base", {"family": "sd15"}, None),  # trained for SD1.5 (the official SD1.5 training code's layout)
    ("sdxl", "base", {}, None),
    ("svd", "base", {}, None),
    ("sd15", "mid", {}, None),
])
def test_a_base_file_on_sd15_is_flagged_unless_made_for_sd15(family, layout, metadata, warned):
    warning = cn.families.mixed_up_pairing(family, layout, metadata)
    if warned is None:
        assert warning is None
    else:
        assert warning.startswith(f"This file {warned}. On SD1.5 a \"base\" encoder is added after the UNet's first "
                                  f"down block, which is right only for encoders trained for SD1.5 with the official "
                                  f"SD1.5 training code.")
        assert "safetensors metadata says family=sd15 are not flagged" in warning


def test_file_metadata_is_read_from_safetensors_and_empty_for_pickles(tmp_path):
    state_dict = random_encoder_state_dict("base")
    path = os.path.join(tmp_path, "controlnet.safetensors")
    safetensors.torch.save_file(state_dict, path, metadata={"family": "sd15", "layout": "base"})
    assert cn.read_file_metadata(path) == {"family": "sd15", "layout": "base"}
    renamed = os.path.join(tmp_path, "controlnet.bin")  # a safetensors file is read as one, whatever its name
    os.rename(path, renamed)
    assert cn.read_file_metadata(renamed) == {"family": "sd15", "layout": "base"}
    assert cn.read_file_metadata(save(tmp_path, state_dict, "controlnext.bin")) == {}
    assert cn.read_file_metadata(save(tmp_path, state_dict, "plain.safetensors")) == {}
    with open(renamed, "rb") as file:
        whole = file.read()
    truncated = os.path.join(tmp_path, "truncated.safetensors")
    with open(truncated, "wb") as file:
        file.write(whole[: len(whole) // 3])
    assert cn.read_file_metadata(truncated) == {}  # the loader, not the metadata read, reports the damage
    with pytest.raises(cn.ControlNeXtError, match="'truncated.safetensors' is not a readable safetensors file"):
        cn.load_state_dict_file(truncated)


def _foreign(kind):
    t = torch.zeros(4, 4)
    return {
        "controlnet": {"input_hint_block.0.weight": t, "zero_convs.0.0.weight": t, "input_blocks.0.0.weight": t},
        "diffusers_controlnet": {"controlnet_cond_embedding.conv_in.weight": t, "controlnet_down_blocks.0.weight": t},
        "lora": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": t},
        "checkpoint": {"model.diffusion_model.input_blocks.0.0.weight": t, "first_stage_model.decoder.conv_in.weight": t},
        "unet_subset": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": t},
    }[kind]


@pytest.mark.parametrize("kind,what", [("controlnet", "an ordinary ControlNet"),
                                       ("diffusers_controlnet", "an ordinary ControlNet"),
                                       ("lora", "a LoRA"), ("checkpoint", "a full Stable Diffusion checkpoint"),
                                       ("unet_subset", "UNet weights")])
def test_foreign_files_are_named(kind, what):
    with pytest.raises(cn.ControlNeXtError, match=f"This file is {what}.*not a ControlNeXt condition encoder"):
        cn.load_controlnext(_foreign(kind))


def test_empty_state_dict_and_empty_file(tmp_path):
    with pytest.raises(cn.ControlNeXtError, match="empty"):
        cn.load_controlnext({})
    path = os.path.join(tmp_path, "controlnet.safetensors")
    open(path, "wb").close()
    with pytest.raises(cn.ControlNeXtError, match=r"empty file \(0 bytes\)"):
        cn.load_state_dict_file(path)


def test_truncated_file(tmp_path):
    path = save(tmp_path, random_encoder_state_dict("base"))
    with open(path, "rb") as file:
        data = file.read()
    for name, cut in (("a.safetensors", len(data) // 2), ("b.safetensors", 5)):
        truncated = os.path.join(tmp_path, name)
        with open(truncated, "wb") as file:
            file.write(data[:cut])
        with pytest.raises(cn.ControlNeXtError, match="truncated or corrupt"):
            cn.load_state_dict_file(truncated)
    assert os.path.getsize(path) == len(data)  # the user's file is untouched


def test_missing_and_wrong_shape_keys_are_listed():
    state_dict = random_encoder_state_dict("base")
    del state_dict["down_res.1.conv2.bias"]
    state_dict["down_sample.0.conv.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(cn.ControlNeXtError, match=r"1 missing: down_res.1.conv2.bias; 1 wrong shape: "
                                                  r"down_sample.0.conv.weight \[128, 128, 1, 1\]"):
        cn.load_controlnext(state_dict)


def test_unrecognised_final_conv():
    state_dict = random_encoder_state_dict("base")
    state_dict["mid_convs.1.weight"] = torch.zeros(640, 256, 1, 1)
    with pytest.raises(cn.ControlNeXtError, match=r"shape \[640, 256, 1, 1\]"):
        cn.load_controlnext(state_dict)


def test_nan_weights_are_refused():
    state_dict = random_encoder_state_dict("mid")
    state_dict["mid_convs.1.bias"][3] = float("nan")
    with pytest.raises(cn.ControlNeXtError, match="NaN or infinite weights.*mid_convs.1.bias"):
        cn.load_controlnext(state_dict)


# --- encoder details ---------------------------------------------------------------------

def test_timestep_features_match_diffusers_definition():
    t = torch.tensor([0.0, 1.0, 999.0, 12.5])
    half = 64
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None] * freqs[None]
    expected = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # flip_sin_to_cos=True
    from controlnext_core.encoders import timestep_features
    assert torch.allclose(timestep_features(t), expected, atol=1e-6)


def test_timestep_changes_the_output():
    model = cn.load_controlnext(random_encoder_state_dict("mid"))
    image = torch.rand(1, 3, 32, 32)
    assert not torch.allclose(model.encode(image, torch.tensor([900.0])), model.encode(image, torch.tensor([10.0])))


@pytest.mark.parametrize("family,layout", [("sd15", "mid"), ("sd15", "base"), ("sdxl", "base")])
def test_encode_for_equals_encode_then_the_injection_pooling(family, layout):
    model = cn.load_controlnext(random_encoder_state_dict(layout), family)
    image, t = torch.rand(2, 3, 64, 64), torch.tensor([700.0, 700.0])
    size = (2, 2) if layout == "mid" else (4, 4)
    hidden = torch.randn(2, 1280 if layout == "mid" else 320, *size)
    via_encode = cn.inject(hidden, model.encode(image, t), family, 1.0, layout=layout)
    via_encode_for = cn.inject(hidden, model.encode_for(image, t, size), family, 1.0, layout=layout)
    assert torch.allclose(via_encode, via_encode_for, rtol=1e-5, atol=1e-5)


def test_bad_control_images():
    model = cn.load_controlnext(random_encoder_state_dict("mid"))
    with pytest.raises(cn.ControlNeXtError, match=r"must be \[B,3,H,W\] RGB; got shape \[1, 4, 64, 64\]"):
        model.encode(torch.rand(1, 4, 64, 64), torch.tensor([1.0]))
    with pytest.raises(cn.ControlNeXtError, match="at least 8 pixels"):
        model.encode(torch.rand(1, 3, 1, 1), torch.tensor([1.0]))
    with pytest.raises(cn.ControlNeXtError, match="3 timesteps for 2 control images"):
        model.encode(torch.rand(2, 3, 16, 16), torch.tensor([1.0, 2.0, 3.0]))


# --- cross normalisation -------------------------------------------------------------------

@pytest.mark.parametrize("family,layout", list(SPEC_ROWS))
def test_injection_matches_the_spec_formula(family, layout):
    pool_first, eps, k = SPEC_ROWS[(family, layout)]
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 8, 6, 10, generator=generator) * 3 + 1
    control = torch.randn(3, 8, 24, 40, generator=generator) * 0.5 - 2
    out = cn.inject(hidden, control, family, 0.7, layout=layout)
    expected = official_formula(hidden, control, pool_first, eps, k, 0.7)
    assert out.dtype == hidden.dtype
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    # the order of pooling and normalising matters: the other order is measurably different
    other = official_formula(hidden, control, not pool_first, eps, k, 0.7)
    assert (other - expected).abs().max() > 1e-3


def test_inject_leaves_inputs_alone_and_strength_zero_is_identity():
    hidden, control = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 16, 16)
    hidden_copy, control_copy = hidden.clone(), control.clone()
    out = cn.inject(hidden, control, "sdxl", 1.5)
    assert torch.equal(hidden, hidden_copy) and torch.equal(control, control_copy)
    assert not torch.equal(out, hidden)
    assert cn.inject(hidden, control, "sdxl", 0.0) is hidden


@pytest.mark.parametrize("family", ["sd15", "sdxl", "svd"])
def test_flat_control_gives_a_bounded_change(family):
    hidden = torch.randn(2, 8, 8, 8) * 2 + 0.5
    control = torch.full((2, 8, 16, 16), 0.3183)
    out = cn.inject(hidden, control, family, 1.0)
    assert torch.isfinite(out).all()
    k = SPEC_ROWS[(family, {"sd15": "mid", "sdxl": "base", "svd": "base"}[family])][2]
    mean_h = hidden.mean(dim=(1, 2, 3), keepdim=True)
    # only the normalised mean is added
    assert torch.allclose(out - hidden, (mean_h * k).expand_as(hidden), atol=1e-5)
    # while the official formula, on the same input, adds rounding noise divided by eps
    official = official_formula(hidden, control.float(), family == "sd15", 1e-12, 1.0, 1.0)
    assert torch.isfinite(official).all()


def official_code_fp32(h, c, pool_first, eps, k, scale):
    """The official code's own operations in fp32: torch.mean and torch.std taken separately."""
    if pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    mean_h, std_h = torch.mean(h, dim=(1, 2, 3), keepdim=True), torch.std(h, dim=(1, 2, 3), keepdim=True)
    mean_c, std_c = torch.mean(c, dim=(1, 2, 3), keepdim=True), torch.std(c, dim=(1, 2, 3), keepdim=True)
    c = (c - mean_c) * (std_h / (std_c + eps)) + mean_h
    if not pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    return h + c * scale * k


def faint_control(spread: float, hidden_size: tuple[int, int], factor: int = 4, seed: int = 5) -> torch.Tensor:
    """An encoder output around 2.5 with a relative spread ``spread``, constant over each pooling
    window (so pooling keeps its spread)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(2, 8, *hidden_size, generator=generator)
    return (2.5 * (1 + spread * coarse)).repeat_interleave(factor, -2).repeat_interleave(factor, -1)


@pytest.mark.parametrize("family,layout", list(SPEC_ROWS))
@pytest.mark.parametrize("spread", [1e-2, 1e-3, 1e-4, 1e-5, 3e-6, 1e-6])
def test_faint_controls_follow_the_official_code(family, layout, spread):
    pool_first, eps, k = SPEC_ROWS[(family, layout)]
    hidden = torch.randn(2, 8, 6, 10, generator=torch.Generator().manual_seed(2)) * 3 + 1
    control = faint_control(spread, (6, 10))
    out = cn.inject(hidden, control, family, 0.7, layout=layout)
    expected = official_code_fp32(hidden, control, pool_first, eps, k, 0.7)
    scale = hidden.std() * k  # the size of the added term
    assert (out - expected).abs().max() <= 2e-5 * scale
    # a faint control is still a control: scaled up to the hidden state's spread (SVD's eps 1e-5
    # damps spreads near it, in the official formula too)
    std_c = control.std(dim=(1, 2, 3))
    assert (out - hidden - hidden.mean(dim=(1, 2, 3), keepdim=True) * 0.7 * k).std() > \
        0.3 * scale * (std_c / (std_c + eps)).min()


@pytest.mark.parametrize("family,layout", list(SPEC_ROWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_spread_at_the_level_of_rounding_is_flat(family, layout, dtype):
    """Below a few units of rounding of the control's own dtype, its spread is noise: only the
    normalised mean is added (the official formula would add that noise, scaled to unit spread)."""
    k = SPEC_ROWS[(family, layout)][2]
    hidden = torch.randn(2, 8, 6, 10, generator=torch.Generator().manual_seed(2)) * 3 + 1
    ulp = torch.finfo(dtype).eps * 2.5
    control = (faint_control(0.0, (6, 10)) + ulp * torch.randint(-1, 2, (2, 8, 24, 40))).to(dtype)
    out = cn.inject(hidden, control, family, 1.0, layout=layout)
    mean_h = hidden.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out - hidden, (mean_h * k).expand_as(hidden), atol=1e-5)


def test_fp16_hidden_keeps_its_dtype_and_uses_fp32_statistics():
    hidden = (torch.randn(2, 8, 8, 8) * 30).half()
    control = torch.randn(2, 8, 8, 8).half()
    out = cn.inject(hidden, control, "sdxl", 1.0)
    assert out.dtype == torch.float16
    expected = official_formula(hidden.float(), control.float(), False, 1e-12, 1.0, 1.0)
    # the term is rounded to fp16, then the sum (the hidden state is never copied to fp32): each
    # rounding is within fp16's unit roundoff of its value
    term = expected - hidden.double()
    bound = 2.0 ** -11 * (term.abs() + expected.abs()) * 1.01 + 1e-4
    assert ((out.double() - expected).abs() <= bound).all()


def test_mask_limits_where_control_acts():
    hidden, control = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    out = cn.inject(hidden, control, "sdxl", 1.0, mask=mask)
    assert torch.equal(out[..., 5:], hidden[..., 5:])
    assert not torch.equal(out[..., :3], hidden[..., :3])


def test_per_row_strength():
    hidden, control = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = cn.add_control(hidden, control, cn.rule_for("svd", "base"), torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], hidden[0])
    assert torch.allclose(out[1:], cn.inject(hidden[1:], control[1:], "svd", 1.0))


def test_injection_points_on_the_real_architectures():
    sd = [2, 2, 2, 2]
    assert cn.injection_block(cn.rule_for("sd15", "mid"), sd) == ("output", 0)
    assert cn.injection_block(cn.rule_for("sd15", "base"), sd) == ("input", 3)
    assert cn.injection_block(cn.rule_for("sdxl", "base"), [2, 2, 2]) == ("input", 0)
    assert cn.injection_block(cn.rule_for("svd", "base"), sd) == ("input", 3)
    assert cn.injection_block(cn.rule_for("svd", "svd_v1"), sd) == ("input", 11)
