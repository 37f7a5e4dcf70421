"""Reliability battery, core part (plain torch, no ComfyUI): model files from anywhere, broken or
hostile, and random state dicts. Every failure must be a ControlNeXtError whose message says what
was wrong and what to do; a pickle must never run code. test_core.py covers the basic cases
(0-byte safetensors, two cut points, foreign state dicts, a nested pickle payload, NaN); this
file covers what it does not, and fuzzes the loader and the layout detection for a bounded time.
"""
from __future__ import annotations

import functools
import math
import os
import pickle
import re
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import controlnext_core as cn
from controlnext_testbed.official_layouts import OFFICIAL_KEYS, random_encoder_state_dict
from file_bytes import torch_bytes, write

FAMILY_OF_LAYOUT = {"mid": "sd15", "base": "sdxl", "svd_v1": "svd"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a busy 2-core machine two intra-op threads wait on each other at every small op; one
    is several times faster here. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.lru_cache(maxsize=None)
def encoder_model(layout: str) -> cn.ControlNeXt:
    """One loaded random encoder per layout, for the tests that only run it."""
    return cn.load_controlnext(random_encoder_state_dict(layout), FAMILY_OF_LAYOUT[layout])




def load_file(path: str):
    return cn.load_controlnext(cn.load_state_dict_file(path))


def foreign_message(what: str, keys: list[str]) -> str:
    return (f"This file is {what + ', ' if what else ''}not a ControlNeXt condition encoder (found {len(keys)} tensors, first keys: "
            f"{', '.join(keys[:3])}; expected keys such as 'time_embedding.linear_1.weight' and "
            f"'mid_convs.1.weight'). Load the encoder file of a ControlNeXt release (often named "
            f"controlnet.safetensors).")


# --- files that are not ControlNeXt encoders -------------------------------------------------

# Key styles as the real files have them (one key each is enough for detection; several so the
# message lists the first three in file order).
FOREIGN_FILES = {
    "control_v11p_sd15_canny.safetensors": ("an ordinary ControlNet", [
        "control_model.input_blocks.0.0.bias", "control_model.input_blocks.0.0.weight",
        "control_model.input_hint_block.0.weight", "control_model.zero_convs.0.0.weight"]),
    "diffusers_controlnet_sdxl.safetensors": ("an ordinary ControlNet", [
        "conv_in.weight", "controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.0.weight"]),
    "kohya_lora.safetensors": ("a LoRA", [
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]),
    "peft_lora.safetensors": ("a LoRA", [
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"]),
    "v1-5-pruned-emaonly.safetensors": ("a full Stable Diffusion checkpoint", [
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "first_stage_model.decoder.conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight"]),
    # Fixed: this read "This file is not a ControlNeXt condition encoder, not a ControlNeXt condition encoder".
    "taesd_decoder.safetensors": ("", ["1.weight", "3.conv.0.bias", "3.conv.0.weight"]),
}


@pytest.mark.parametrize("name", sorted(FOREIGN_FILES))
def test_foreign_model_files_are_named_by_what_they_are(tmp_path, name):
    what, keys = FOREIGN_FILES[name]
    path = write(tmp_path, name, safetensors.torch.save({k: torch.zeros(2, 2) for k in keys}))
    state_dict = cn.load_state_dict_file(path)
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_controlnext(state_dict)
    assert str(error.value) == foreign_message(what, list(state_dict))
    assert sorted(state_dict) == sorted(keys)


# --- truncated, empty, renamed ---------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_pickles_are_reported_as_corrupt(tmp_path, legacy):
    data = torch_bytes(random_encoder_state_dict("mid"), legacy=legacy)
    path = write(tmp_path, "controlnet.bin", data[: len(data) // 2])
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_state_dict_file(path)
    message = str(error.value)
    assert message.startswith("'controlnet.bin' is not a readable PyTorch weights file (RuntimeError: ")
    assert message.endswith("); it is probably truncated or corrupt: download it again.")


@pytest.mark.parametrize("name,data", [
    ("controlnet.bin", b""),
    ("unet.pth", b""),
])
def test_zero_byte_pickles(tmp_path, name, data):
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_state_dict_file(write(tmp_path, name, data))
    assert str(error.value) == f"'{name}' is an empty file (0 bytes): the download failed; download it again."


@pytest.mark.parametrize("name,data", [
    ("controlnet.safetensors", safetensors.torch.save({})),
    ("controlnet.bin", torch_bytes({})),
])
def test_files_that_hold_no_tensors(tmp_path, name, data):
    state_dict = cn.load_state_dict_file(write(tmp_path, name, data))
    assert state_dict == {}
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_controlnext(state_dict)
    assert str(error.value) == "The ControlNeXt file is empty: it holds no tensors. Download it again."


HTML_PAGE = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>\n"


def test_an_error_page_saved_as_bin_is_named_as_such(tmp_path):
    # Fixed: it was reported as "a pickle ... could run code" (the weights-only unpickler's error).
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_state_dict_file(write(tmp_path, "controlnet.bin", HTML_PAGE))
    assert str(error.value) == (
        "'controlnet.bin' is neither a PyTorch weights file nor a safetensors file (it starts with "
        "b'<!DOCTYPE html><'); it may be a failed download (an error page) or another kind of file: download it "
        "again.")


def test_an_error_page_saved_as_safetensors(tmp_path):
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_state_dict_file(write(tmp_path, "controlnet.safetensors", HTML_PAGE))
    assert re.fullmatch(r"'controlnet\.safetensors' is not a readable safetensors file \(.+\); it is probably "
                        r"truncated or corrupt: download it again\.", str(error.value))


def test_a_safetensors_file_named_bin_loads_as_safetensors(tmp_path):
    # Fixed: it was refused as an unsafe pickle. The loader recognises a file by its contents.
    state_dict = random_encoder_state_dict("mid", seed=4)
    model = load_file(write(tmp_path, "controlnet.bin", safetensors.torch.save(state_dict)))
    assert (model.layout, model.family) == ("mid", "sd15")
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in state_dict.items())


def test_a_pickle_with_integer_keys_is_not_a_model_file(tmp_path):
    # Fixed: it passed the loader and failed later with a TypeError joining the key names.
    path = write(tmp_path, "controlnet.bin", torch_bytes({0: torch.zeros(2), 1: torch.ones(2)}))
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_state_dict_file(path)
    assert str(error.value) == ("'controlnet.bin' does not hold a flat dictionary of named tensors, so it is not a "
                                "model file.")


@pytest.mark.parametrize("payload,kind", [({"state_dict": {"a": torch.zeros(1)}}, "nested"),
                                          (torch.zeros(3), "tensor"), ([torch.zeros(3)], "list")])
def test_pickles_of_other_shapes(tmp_path, payload, kind):
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_state_dict_file(write(tmp_path, f"{kind}.pt", torch_bytes(payload)))
    assert str(error.value) == (f"'{kind}.pt' does not hold a flat dictionary of named tensors, so it is not a model "
                                f"file.")


def test_state_dict_with_values_that_are_not_tensors():
    # Fixed: load_controlnext raised AttributeError ('float' object has no attribute 'shape').
    state_dict = random_encoder_state_dict("base")
    state_dict["down_res.0.conv1.bias"] = 0.5
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_controlnext(state_dict)
    assert str(error.value) == ("A ControlNeXt state dict maps names to tensors; this one has entries that are not "
                                "tensors (down_res.0.conv1.bias). Load the file with load_state_dict_file.")


# --- code in pickles ---------------------------------------------------------------------

class _Payload:
    """Unpickling this creates a marker directory (what a hostile file would do instead)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("name,build", [
    ("controlnet.bin", lambda p: torch_bytes({"mid_convs.1.weight": p})),            # torch.save zip archive
    ("controlnet.pt", lambda p: torch_bytes({"mid_convs.1.weight": p}, legacy=True)),  # legacy torch format
    ("model.ckpt", lambda p: pickle.dumps(p, protocol=2)),                          # bare GLOBAL opcode
    ("unet.pth", lambda p: pickle.dumps({"state_dict": [p]}, protocol=4)),
])
def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path, name, build):
    marker = os.path.join(tmp_path, "pwned")
    data = build(_Payload(marker))
    assert not os.path.exists(marker)  # building the file ran nothing either
    path = write(tmp_path, name, data)
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_state_dict_file(path)
    assert str(error.value).startswith(f"Refused to load '{name}' (in {tmp_path}): it is a pickle holding more than "
                                       f"plain tensors, and unpickling it could run code")
    assert str(error.value).endswith(". Do not load it by other means: delete it and use a .safetensors copy of the "
                                     "model from its release.")
    assert "weights_only" not in str(error.value)  # torch's own message advises the unsafe loader
    assert not os.path.exists(marker)
    # and the file really would have run code with an unsafe loader
    with open(path, "rb") as file:
        assert file.read() == data


def test_the_hostile_payload_is_live(tmp_path):
    """The test above proves nothing unless the payload runs when unpickled unsafely."""
    marker = os.path.join(tmp_path, "pwned")
    pickle.loads(pickle.dumps(_Payload(marker), protocol=2))
    assert os.path.isdir(marker)


# --- zero-size tensors, dtypes, NaN ------------------------------------------------------

def test_zero_size_final_conv_is_unrecognised():
    state_dict = random_encoder_state_dict("base")
    state_dict["mid_convs.1.weight"] = torch.zeros(0, 256, 1, 1)
    with pytest.raises(cn.ControlNeXtError) as error:
        cn.load_controlnext(state_dict)
    assert str(error.value) == (
        "Unrecognised ControlNeXt encoder: final conv 'mid_convs.1.weight' has shape [0, 256, 1, 1] and "
        "'embedding.0.weight' is present; the official layouts have 320 output channels with an embedding (base), "
        "1280 without (SD1.5) or 1280 with (SVD v1). The file may be truncated or from another project.")


def test_zero_size_weights_are_wrong_shapes(tmp_path):
    state_dict = random_encoder_state_dict("mid")
    state_dict["down_res.0.conv1.weight"] = torch.zeros(128, 3, 0, 3)
    state_dict["scale"] = torch.zeros(0)
    path = write(tmp_path, "controlnet.safetensors", safetensors.torch.save(state_dict))
    with pytest.raises(cn.ControlNeXtError) as error:
        load_file(path)
    assert str(error.value) == (
        'This file looks like a ControlNeXt "mid" layout (1280 channels: SD1.5 releases) encoder but does not match '
        "it (2 wrong shape: scale [0] (expected []), down_res.0.conv1.weight [128, 3, 0, 3] (expected "
        "[128, 3, 3, 3])). It may be truncated, converted with other names, or from another project.")


@pytest.mark.parametrize("dtype,label", [(torch.int8, "int8"), (torch.int64, "int64"), (torch.bool, "bool"),
                                         (torch.uint8, "uint8"), (torch.complex64, "complex64")])
def test_non_float_weights_are_refused_naming_the_dtype(tmp_path, dtype, label):
    state_dict = random_encoder_state_dict("base")
    state_dict["down_res.1.conv2.bias"] = state_dict["down_res.1.conv2.bias"].to(dtype)
    path = write(tmp_path, "controlnet.safetensors", safetensors.torch.save(state_dict))
    with pytest.raises(cn.ControlNeXtError) as error:
        load_file(path)
    assert str(error.value) == (
        f"The ControlNeXt file holds non-float tensors where weights must be floating point (down_res.1.conv2.bias "
        f"({label})); it is corrupt or not a ControlNeXt encoder.")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.float8_e5m2])
def test_other_float_dtypes_load_as_their_float32_values(tmp_path, dtype):
    # Fixed for float8: the NaN check raised NotImplementedError ("isfinite" not implemented).
    state_dict = {k: v.to(dtype) for k, v in random_encoder_state_dict("base", seed=2).items()}
    model = load_file(write(tmp_path, "controlnet.safetensors", safetensors.torch.save(state_dict)))
    assert model.layout == "base"
    for key, value in model.encoder.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state_dict[key].float()), key


@pytest.mark.parametrize("dtype,bad,value", [(torch.float16, "mid_convs.0.3.weight", float("inf")),
                                             (torch.bfloat16, "time_embedding.linear_2.bias", float("-inf")),
                                             (torch.float8_e4m3fn, "embedding.0.bias", float("nan"))])
def test_infinite_and_nan_weights_in_every_float_dtype(tmp_path, dtype, bad, value):
    state_dict = {k: v.to(dtype) for k, v in random_encoder_state_dict("base").items()}
    state_dict[bad] = state_dict[bad].clone()
    state_dict[bad].view(-1)[5] = value
    path = write(tmp_path, "controlnet.safetensors", safetensors.torch.save(state_dict))
    with pytest.raises(cn.ControlNeXtError) as error:
        load_file(path)
    assert str(error.value) == f"The ControlNeXt file holds NaN or infinite weights ({bad}); it is corrupt: download it again."


def test_unet_weights_in_float8_and_not_tensors():
    from controlnext_core.unet_weights import unet_weight_patches

    base = {"w": torch.randn(4, 4)}
    patches = unet_weight_patches({"f": torch.ones(4, 4, dtype=torch.float8_e4m3fn)}, {"f": "w"}, base, "add")
    assert patches["w"][0] == "add" and torch.equal(patches["w"][1].float(), torch.ones(4, 4))
    nan = torch.ones(4, 4, dtype=torch.float8_e4m3fn)
    nan[0, 0] = float("nan")
    with pytest.raises(cn.ControlNeXtError) as error:
        unet_weight_patches({"f": nan}, {"f": "w"}, base, "replace")
    assert str(error.value) == "UNet weight 'f' holds NaN, infinite or non-float values: the file is corrupt."
    with pytest.raises(cn.ControlNeXtError) as error:
        unet_weight_patches({"f": [1.0]}, {"f": "w"}, base, "add")
    assert str(error.value) == "The UNet weights file holds entries that are not tensors: it is not a model file."


# --- control images the core sees --------------------------------------------------------

@pytest.mark.parametrize("layout", ["mid", "base"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_constant_control_images_give_a_bounded_unit_control(layout, value):
    model = encoder_model(layout)
    size = (4, 4) if layout == "mid" else (8, 8)
    control = model.encode_for(torch.full((1, 3, 64, 64), value), torch.tensor([500.0]), size)
    unit = cn.unit_control(control, size, model.rule)
    assert torch.isfinite(unit).all()
    # zero mean, and no element of a unit-std sample can exceed sqrt(n - 1)
    assert unit.abs().max() <= (unit[0].numel() - 1) ** 0.5
    assert abs(float(unit.mean())) < 1e-4


@pytest.mark.parametrize("height,width", [(8, 4096), (4096, 8), (8, 8), (9, 17)])
def test_extreme_aspect_ratios_encode(height, width):
    out = encoder_model("mid").encode(torch.rand(1, 3, height, width), torch.tensor([10.0]))
    assert out.shape == (1, 1280, -(-height // 8), -(-width // 8))
    assert torch.isfinite(out).all()


# --- fuzzing -----------------------------------------------------------------------------

OFFICIAL = {layout: OFFICIAL_KEYS[fixture] for layout, fixture in
            (("base", "encoder_base"), ("mid", "encoder_mid"), ("svd_v1", "encoder_svd_v1"))}
ALL_KEYS = sorted({k for keys in OFFICIAL.values() for k in keys})
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.int8,
          torch.int64, torch.bool, torch.uint8, torch.complex64]
FOREIGN_KEYS = [k for _, keys in FOREIGN_FILES.values() for k in keys] + ["", "scale", "mid_convs.1.weight.extra"]


def rarely(n: int):
    """True about once in ``n`` draws (an integer's bounds would be drawn far more often)."""
    return st.sampled_from([False] * (n - 1) + [True])


@st.composite
def tensors(draw, shape=None, device="cpu"):
    if shape is None or draw(rarely(6)):  # mostly the right shape, sometimes any
        shape = draw(st.lists(st.integers(0, 4), max_size=4))
    elif draw(rarely(8)) and shape:
        shape = list(shape)
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(DTYPES)) if draw(rarely(3)) else torch.float32
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    value = torch.zeros(shape) if draw(st.booleans()) else torch.randn(shape)
    if value.numel() and draw(rarely(8)):
        value.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf")]))
    return value.to(dtype)


@functools.lru_cache(maxsize=None)
def official_zeros(layout: str, key: str, device: str) -> torch.Tensor:
    """Shared between examples (the loader never writes its input): keeps the fuzzing fast."""
    return torch.zeros(OFFICIAL[layout][key], device=device)


@st.composite
def state_dicts(draw, device="cpu"):
    """Mostly official layouts with damage (dropped, added, reshaped, retyped keys), or anything.
    On the meta device (shapes and dtypes only, no memory) for the layout detection."""
    layout = draw(st.sampled_from(["base", "mid", "svd_v1", "base", "mid", "random"]))
    if layout == "random":
        keys = draw(st.lists(st.sampled_from(ALL_KEYS + FOREIGN_KEYS) | st.text(max_size=12), max_size=12,
                             unique=True))
        out = {k: draw(tensors(device=device)) for k in keys}
    else:
        shapes = OFFICIAL[layout]
        keep = draw(st.sets(st.sampled_from(sorted(shapes)), min_size=len(shapes) - 2)) \
            if draw(st.booleans()) else set(shapes)
        damaged = set(draw(st.lists(st.sampled_from(sorted(shapes)), max_size=3)))
        out = {}
        for key in sorted(shapes):
            if key not in keep:
                continue
            if key in damaged:
                out[key] = draw(tensors(shapes[key], device))
            else:
                out[key] = official_zeros(layout, key, device)
        for key in draw(st.lists(st.sampled_from(ALL_KEYS + FOREIGN_KEYS), max_size=2)):
            out[key] = draw(tensors(device=device))
    if draw(rarely(15)) and out:
        out[draw(st.sampled_from(sorted(out)))] = draw(st.sampled_from([None, 1.0, "x", [1, 2]]))
    return out


FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=60)
@given(state_dict=state_dicts(), family=st.sampled_from([None, "sd15", "sdxl", "svd", "flux"]))
def test_fuzz_state_dicts_only_raise_the_packs_error(state_dict, family):
    try:
        model = cn.load_controlnext(state_dict, family)
    except cn.ControlNeXtError as error:
        assert str(error) and "Traceback" not in str(error)
        return
    # accepted: it must then be a complete, finite, float official layout that runs
    assert sorted(state_dict) == sorted(OFFICIAL[model.layout])
    assert all(v.is_floating_point() and math.isfinite(v.double().sum()) for v in state_dict.values())
    assert model.family == (family or FAMILY_OF_LAYOUT[model.layout])
    assert torch.isfinite(model.encode(torch.rand(1, 3, 32, 32), torch.tensor([5.0]))).all()


@FUZZ
@given(state_dict=state_dicts(device="meta"))
def test_fuzz_layout_detection_only_raises_the_packs_error(state_dict):
    try:
        layout = cn.detect_layout(state_dict)
    except cn.ControlNeXtError:
        return
    assert layout in OFFICIAL
    assert "mid_convs.1.weight" in state_dict and "time_embedding.linear_1.weight" in state_dict


def _seed_files() -> dict[str, bytes]:
    small = {"time_embedding.linear_1.weight": torch.randn(4, 3), "mid_convs.1.weight": torch.randn(320, 2, 1, 1),
             "embedding.0.weight": torch.randn(2)}
    return {"safetensors": safetensors.torch.save(small), "zip": torch_bytes(small),
            "legacy": torch_bytes(small, legacy=True), "pickle": pickle.dumps(small, protocol=2)}


SEED_FILES = _seed_files()


@st.composite
def damaged_bytes(draw):
    data = bytearray(SEED_FILES[draw(st.sampled_from(sorted(SEED_FILES)))])
    for _ in range(draw(st.integers(0, 4))):
        operation = draw(st.sampled_from(["flip", "cut", "insert", "header_length"]))
        if operation == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif operation == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif operation == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(max_size=16))
        elif len(data) >= 8:  # a safetensors header length that lies
            data[:8] = struct.pack("<Q", draw(st.sampled_from([0, 1, 2, len(data), 2 ** 40, 2 ** 64 - 1])))
    return bytes(data)


@FUZZ
@given(data=damaged_bytes() | st.binary(max_size=64),
       suffix=st.sampled_from([".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt"]))
def test_fuzz_damaged_files_only_raise_the_packs_error(tmp_path_factory, data, suffix):
    path = write(tmp_path_factory.mktemp("fuzz"), f"model{suffix}", data)
    try:
        state_dict = cn.load_state_dict_file(path)
    except cn.ControlNeXtError as error:
        assert "model" + suffix in str(error)
        return
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items())
    try:
        cn.load_controlnext(state_dict)
    except cn.ControlNeXtError:
        pass

