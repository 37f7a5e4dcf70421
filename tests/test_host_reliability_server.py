"""Reliability battery, HTTP part: one real headless ComfyUI with the pack linked, driven through
its API. Bad model files on disk fail on the loader with the pack's message (and a hostile
pickle runs nothing in the server), other kinds of model are not in its list, names outside the
models folders and out-of-range inputs are refused by validation, many prompts in a row complete
without memory growth or a patch leaking into later prompts, and an interrupted prompt leaves the
server working.

Models: the cheap two-level UNets of test_host_reliability_nodes.py ("base" layout); with one
torch thread in the server, the 50-prompt load test takes about 10 s on a busy 2-core machine.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import time

import numpy as np
import pytest

import host  # noqa: F401  (skips this module without a ComfyUI host)
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from controlnext_testbed.official_layouts import random_encoder_state_dict  # noqa: E402
from conftest import COMFYUI_PATH, PACK_ROOT  # noqa: E402
from server import ComfyServer, execution_error, make_base_directory  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]

LOAD_PROMPTS = 50
GOOD = ("good_a.safetensors", "good_b.safetensors")
CONTROL_IMAGES = 4


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _safetensors(state_dict: dict) -> bytes:
    return safetensors.torch.save(state_dict)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def bad_files(marker: str) -> dict[str, bytes]:
    encoder = random_encoder_state_dict("base")
    whole = _safetensors(encoder)
    zero_size = dict(encoder, **{"down_res.0.conv1.weight": torch.zeros(128, 128, 0, 3)})
    integer = dict(encoder, **{"down_res.0.conv1.bias": torch.zeros(128, dtype=torch.int32)})
    nan = dict(encoder, **{"mid_convs.1.bias": torch.full((320,), float("nan"))})
    def t():
        return torch.zeros(4, 4)

    return {
        "control_v11p_sd15_canny.safetensors": _safetensors({"control_model.input_hint_block.0.weight": t(),
                                                              "control_model.zero_convs.0.0.weight": t()}),
        "lora_style.safetensors": _safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t()}),
        "sd15_checkpoint.safetensors": _safetensors({"first_stage_model.decoder.conv_in.weight": t(),
                                                     "model.diffusion_model.input_blocks.0.0.weight": t()}),
        "truncated.safetensors": whole[: len(whole) // 3],
        "empty.safetensors": b"",
        "zero_size.safetensors": _safetensors(zero_size),
        "int_weights.safetensors": _safetensors(integer),
        "nan_weights.safetensors": _safetensors(nan),
        "hostile.bin": _torch_bytes({"mid_convs.1.weight": _Payload(marker)}),
        "error_page.bin": b"<html><body>Rate limit exceeded</body></html>",
    }


FOREIGN = ("This file is {}, not a ControlNeXt condition encoder (found 2 tensors, first keys: {}; expected keys such "
           "as 'time_embedding.linear_1.weight' and 'mid_convs.1.weight'). Load the encoder file of a ControlNeXt "
           "release (often named controlnet.safetensors).")
EXPECTED = {  # exact message, or (start, end) of one that quotes a library's error text or a temporary folder
    "control_v11p_sd15_canny.safetensors": FOREIGN.format(
        "an ordinary ControlNet", "control_model.input_hint_block.0.weight, control_model.zero_convs.0.0.weight"),
    "sd15_checkpoint.safetensors": FOREIGN.format(
        "a full Stable Diffusion checkpoint",
        "first_stage_model.decoder.conv_in.weight, model.diffusion_model.input_blocks.0.0.weight"),
    "lora_style.safetensors": FOREIGN.replace("found 2 tensors", "found 1 tensors").format(
        "a LoRA", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"),
    "truncated.safetensors": ("'truncated.safetensors' is not a readable safetensors file (",
                              "); it is probably truncated or corrupt: download it again."),
    "empty.safetensors": "'empty.safetensors' is an empty file (0 bytes): the download failed; download it again.",
    "zero_size.safetensors": ('This file looks like a ControlNeXt "base" layout (320 channels: SDXL releases, SVD-v2, '
                              'SD1.5 training code) encoder but does not match it (1 wrong shape: '
                              'down_res.0.conv1.weight [128, 128, 0, 3] (expected [128, 128, 3, 3])). It may be '
                              'truncated, converted with other names, or from another project.'),
    "int_weights.safetensors": ("The ControlNeXt file holds non-float tensors where weights must be floating point "
                                "(down_res.0.conv1.bias (int32)); it is corrupt or not a ControlNeXt encoder."),
    "nan_weights.safetensors": ("The ControlNeXt file holds NaN or infinite weights (mid_convs.1.bias); it is corrupt: "
                                "download it again."),
    "hostile.bin": ("Refused to load 'hostile.bin' (in ", "): it is a pickle holding more than plain tensors, and "
                    f"unpickling it could run code (it imports {os.mkdir.__module__}.mkdir). Do not load it by other "
                    "means: delete it and use a .safetensors copy of the model from its release."),
    "error_page.bin": ("'error_page.bin' is neither a PyTorch weights file nor a safetensors file (it starts with "
                       "b'<html><body>Rate'); it may be a failed download (an error page) or another kind of file: "
                       "download it again."),
}


def control_png(seed: int) -> Image.Image:
    blocks = (np.random.default_rng(seed).random((8, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(blocks).resize((64, 64), Image.NEAREST)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_directory(str(tmp_path_factory.mktemp("reliability_base")))
    os.symlink(os.path.join(PACK_ROOT, "tests", "test_host_reliability_nodes.py"),
               os.path.join(base, "custom_nodes", "controlnext_reliability_nodes.py"))
    folder = os.path.join(base, "models", "controlnext")
    for seed, name in enumerate(GOOD):
        safetensors.torch.save_file(random_encoder_state_dict("base", seed), os.path.join(folder, name))
    marker = os.path.join(base, "pwned")
    for name, data in bad_files(marker).items():
        with open(os.path.join(folder, name), "wb") as file:
            file.write(data)
    # a valid encoder just outside the models folders
    safetensors.torch.save_file(random_encoder_state_dict("base"), os.path.join(base, "models", "secret.safetensors"))
    for index in range(CONTROL_IMAGES):
        control_png(index).save(os.path.join(base, "input", f"control_{index}.png"))
    with pytest.MonkeyPatch.context() as env:
        # one intra-op thread: on a busy 2-core machine two wait on each other at every small op
        env.setenv("OMP_NUM_THREADS", "1")
        running = ComfyServer(base).start()
    running.marker = marker
    running.copies = 0
    yield running
    running.stop()


def image_copy(server, index: int) -> str:
    """A new file name for control image ``index``: ComfyUI re-executes everything downstream of
    a LoadImage with a new name, so each prompt builds a fresh patch."""
    server.copies += 1
    name = f"copy_{server.copies}_{index}.png"
    shutil.copyfile(os.path.join(server.base, "input", f"control_{index}.png"), os.path.join(server.base, "input", name))
    return name


def graph(encoder: str | None = GOOD[0], image: str = "control_0.png", strength: float = 1.0, start: float = 0.0,
          end: float = 1.0, steps: int = 1, prefix: str = "latents/reliability", nonce: int | None = None) -> dict:
    prompt = {
        "1": {"class_type": "ControlNeXtReliabilityCheapModel", "inputs": {"family": "sd15"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": steps, "cfg": 2.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["1", 1], "negative": ["1", 2],
                                                   "latent_image": ["5", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }
    if nonce is not None:  # run it again even if an identical graph ran before
        prompt["9"] = {"class_type": "ControlNeXtReliabilityNonce", "inputs": {"samples": ["5", 0], "nonce": nonce}}
        prompt["6"]["inputs"]["latent_image"] = ["9", 0]
    if encoder is not None:
        prompt["2"] = {"class_type": "ControlNeXtLoader", "inputs": {"controlnext_name": encoder}}
        prompt["3"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        prompt["4"] = {"class_type": "ControlNeXtApply", "inputs": {
            "model": ["1", 0], "controlnext": ["2", 0], "image": ["3", 0], "strength": strength,
            "start_percent": start, "end_percent": end}}
        prompt["6"]["inputs"]["model"] = ["4", 0]
    return prompt


def queue(server, prompt: dict) -> str:
    status, answer = server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})
    assert status == 200, answer
    return answer["prompt_id"]


def wait(server, prompt_id: str, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        time.sleep(0.05)
    raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s:\n{server.log()[-3000:]}")


def run(server, prompt: dict) -> dict:
    return wait(server, queue(server, prompt))


def error_of(entry: dict) -> dict:
    """The execution_error message; ComfyUI ends exception_message with a newline (v0.3.64)."""
    error = next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")
    return dict(error, exception_message=error["exception_message"].removesuffix("\n"))


def saved_latent(server, entry: dict) -> torch.Tensor:
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    (saved,) = entry["outputs"]["7"]["latents"]
    path = os.path.join(server.base, "output", saved["subfolder"], saved["filename"])
    return safetensors.torch.load_file(path)["latent_tensor"]


def rss_mib(server) -> float:
    with open(f"/proc/{server.process.pid}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


# --- bad files ---------------------------------------------------------------------------

def assert_message(message: str, expected) -> None:
    if isinstance(expected, tuple):
        start, end = expected
        assert message.startswith(start) and message.endswith(end), message
    else:
        assert message == expected
    assert "Traceback" not in message


# Read as other kinds of model from their tensor names: Load ControlNeXt does not list them.
NOT_ENCODERS = ("control_v11p_sd15_canny.safetensors", "lora_style.safetensors", "sd15_checkpoint.safetensors")


def test_the_loader_lists_the_broken_encoders_and_not_other_kinds_of_model(server):
    """A damaged or refused file cannot be told apart cheaply: it stays listed, and loading it says what is wrong."""
    options = server.get("/object_info/ControlNeXtLoader")["ControlNeXtLoader"]["input"]["required"][
        "controlnext_name"][1]["options"]
    assert options == sorted(set(EXPECTED) - set(NOT_ENCODERS) | set(GOOD))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_files_fail_on_the_loader_with_the_packs_message(server, name):
    if name in NOT_ENCODERS and host_validates_v3_combos():
        status, answer = server.post("/prompt", {"prompt": graph(encoder=name), "client_id": server.client_id})
        assert_not_in_list(status, answer, name)
        return
    entry = run(server, graph(encoder=name))
    assert entry["status"]["status_str"] == "error"
    error = error_of(entry)
    assert (error["node_id"], error["node_type"]) == ("2", "ControlNeXtLoader")
    assert error["exception_type"].endswith("ControlNeXtError")
    assert_message(error["exception_message"], EXPECTED[name])
    assert not os.path.exists(server.marker)


def test_a_hostile_pickle_as_unet_weights_runs_nothing(server):
    prompt = graph(encoder=None)
    prompt["8"] = {"class_type": "ControlNeXtUNetWeights", "inputs": {"model": ["1", 0], "unet_name": "hostile.bin",
                                                                      "strength": 1.0, "mode": "auto"}}
    prompt["6"]["inputs"]["model"] = ["8", 0]
    entry = run(server, prompt)
    error = error_of(entry)
    assert error["node_id"] == "8"
    assert_message(error["exception_message"], EXPECTED["hostile.bin"])
    assert not os.path.exists(server.marker)
    assert server.process.poll() is None


# --- validation --------------------------------------------------------------------------

def host_validates_v3_combos() -> bool:
    """ComfyUI v0.3.64 checks only V1 combos (a list as the input type) against their options;
    V3 combos ("COMBO" + options) are checked from later versions on (v0.33.0 does)."""
    with open(os.path.join(COMFYUI_PATH, "execution.py")) as file:
        return 'extra_info.get("options"' in file.read()


def assert_not_in_list(status: int, answer: dict, name: str) -> None:
    """Validation refused the prompt: ``name`` is not in Load ControlNeXt's list."""
    assert status == 400
    ((node_id, node),) = answer["node_errors"].items()
    assert node_id == "2" and node["class_type"] == "ControlNeXtLoader"
    ((error),) = node["errors"]
    assert (error["type"], error["message"]) == ("value_not_in_list", "Value not in list")
    assert error["extra_info"]["input_name"] == "controlnext_name"
    assert error["extra_info"]["received_value"] == name


NOT_IN_FOLDERS = ("'{}' is not in the models/controlnext or models/controlnet folders (or their "
                  "extra_model_paths.yaml entries). Put the file there and refresh the page.")


@pytest.mark.parametrize("name", ["../secret.safetensors", "../../models/secret.safetensors",
                                  "/etc/passwd", "controlnext/../../secret.safetensors"])
def test_names_outside_the_models_folders_never_load(server, name):
    status, answer = server.post("/prompt", {"prompt": graph(encoder=name), "client_id": server.client_id})
    if host_validates_v3_combos():
        assert_not_in_list(status, answer, name)
    else:  # the name reaches the loader, which resolves it only inside the models folders
        assert status == 200
        error = error_of(wait(server, answer["prompt_id"]))
        assert (error["node_id"], error["node_type"]) == ("2", "ControlNeXtLoader")
        assert error["exception_message"] == NOT_IN_FOLDERS.format(name)


@pytest.mark.parametrize("strength,kind,message", [
    (-0.5, "value_smaller_than_min", "Value -0.5 smaller than min of 0.0"),
    (10.5, "value_bigger_than_max", "Value 10.5 bigger than max of 10.0"),
    (-1e9, "value_smaller_than_min", "Value -1000000000.0 smaller than min of 0.0"),
])
def test_strength_outside_its_range_is_refused_by_validation(server, strength, kind, message):
    status, answer = server.post("/prompt", {"prompt": graph(strength=strength), "client_id": server.client_id})
    assert status == 400
    ((error),) = answer["node_errors"]["4"]["errors"]
    assert (error["type"], error["message"], error["details"]) == (kind, message, "strength")
    assert error["extra_info"]["received_value"] == strength


def test_start_after_end_fails_on_the_apply_node(server):
    entry = run(server, graph(start=0.9, end=0.1))
    error = error_of(entry)
    assert (error["node_id"], error["node_type"]) == ("4", "ControlNeXtApply")
    assert error["exception_message"] == ("start_percent (0.9) is after end_percent (0.1): control would never act. "
                                          "Make start_percent <= end_percent.")


# --- load ----------------------------------------------------------------------------------

STRENGTHS = (0.35, 0.8, 1.5, 3.0)
# RSS may grow while the first prompts warm caches (allocator pools, conv kernels). After that
# it stayed flat on v0.3.64 and grew 0.9 MiB over 46 prompts on v0.33.0 (its RAM-pressure cache
# keeps earlier prompts' outputs), except for one-off allocator arena steps (6.3 MiB once, at
# prompt 33 of a CI run). A leak grows RSS in every prompt, so both halves of the run must grow:
# the smaller half's growth over 4 MiB flags any per-prompt leak over ~180 KiB (a copy of the
# encoder (14 MiB), of the model's weights, or of a sampled latent batch), while one arena step
# lands in a single half.
WARM_PROMPTS = 4
HALF_GROWTH_LIMIT_MIB = 4.0


def test_many_prompts_complete_without_growth_or_leaks(server, record_property):
    bare_before = saved_latent(server, run(server, graph(encoder=None, nonce=1)))
    latents, rss = [], []
    started = time.perf_counter()
    for n in range(LOAD_PROMPTS):
        combo = n % CONTROL_IMAGES
        entry = run(server, graph(encoder=GOOD[combo % 2], image=image_copy(server, combo),
                                  strength=STRENGTHS[combo], prefix=f"latents/load_{n}"))
        latents.append(saved_latent(server, entry))
        rss.append(rss_mib(server))
    elapsed = time.perf_counter() - started
    bare_after = saved_latent(server, run(server, graph(encoder=None, nonce=2)))
    record_property("load_prompts", LOAD_PROMPTS)
    record_property("load_seconds", round(elapsed, 1))
    record_property("rss_mib", [round(value, 1) for value in rss])
    print(f"\n{LOAD_PROMPTS} prompts in {elapsed:.1f} s; server RSS MiB: {[round(v, 1) for v in rss]}")

    # no patch leaks into the MODEL: the bare graph gives the same latent before and after
    assert torch.equal(bare_after, bare_before)
    # every repeat of a combination equals its first (fresh) run; every combination acts
    for n in range(CONTROL_IMAGES, LOAD_PROMPTS):
        assert torch.equal(latents[n], latents[n % CONTROL_IMAGES]), f"prompt {n} differs from prompt {n % 4}"
    firsts = latents[:CONTROL_IMAGES]
    assert all(torch.isfinite(latent).all() and not torch.equal(latent, bare_before) for latent in firsts)
    assert len({latent.numpy().tobytes() for latent in firsts}) == CONTROL_IMAGES
    # memory does not grow prompt after prompt once the first ones have warmed the caches
    middle = (WARM_PROMPTS - 1 + LOAD_PROMPTS) // 2
    halves = (max(rss[WARM_PROMPTS:middle + 1]) - rss[WARM_PROMPTS - 1], max(rss[middle + 1:]) - rss[middle])
    assert min(halves) <= HALF_GROWTH_LIMIT_MIB, f"RSS grew {halves[0]:.1f} then {halves[1]:.1f} MiB: {rss}"


# --- interrupt ---------------------------------------------------------------------------

LONG_STEPS = 1000
PROGRESS = re.compile(rf"\b([1-9]\d*)/{LONG_STEPS} \[")


def test_interrupt_mid_sampling_then_the_next_prompt_runs_normally(server):
    reference = saved_latent(server, run(server, graph(image=image_copy(server, 1), strength=0.8)))
    log_start = len(server.log())
    prompt_id = queue(server, graph(image=image_copy(server, 2), steps=LONG_STEPS))
    deadline = time.time() + 60
    while not PROGRESS.search(server.log()[log_start:]):  # the sampler's progress bar: steps are running
        assert time.time() < deadline, f"sampling never started:\n{server.log()[-3000:]}"
        time.sleep(0.05)
    status, _ = server.post("/interrupt", {})
    assert status == 200
    entry = wait(server, prompt_id)
    assert entry["status"]["status_str"] == "error"
    interrupted = [data for kind, data in entry["status"]["messages"] if kind == "execution_interrupted"]
    assert [(data["node_id"], data["node_type"]) for data in interrupted] == [("6", "KSampler")]
    done = [int(m) for m in PROGRESS.findall(server.log()[log_start:])]
    assert max(done) < LONG_STEPS  # stopped mid-way
    assert "7" not in entry.get("outputs", {})
    # the next prompt runs normally, and as it did before the interrupt
    after = saved_latent(server, run(server, graph(image=image_copy(server, 1), strength=0.8)))
    assert torch.equal(after, reference)
    assert server.process.poll() is None
