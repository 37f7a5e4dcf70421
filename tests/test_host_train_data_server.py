"""Host tests on a real ComfyUI server: Cancel while Train ControlNeXt builds the training cache of a
folder (Load Training Data). A real POST /interrupt, sent when the node's progress (over the
websocket, as the browser sees it) shows some pairs encoded, stops the build; the cache then holds
every pair encoded before the Cancel and nothing half-written; the next queue encodes only the rest,
and trains the same weights, from the same cached tensors, as a folder whose cache was built in one go."""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

import host  # noqa: F401  (skips this module without a ComfyUI host)
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from controlnext_core.training_cache import INDEX_FILE, SHARDS_FOLDER, TrainingCache  # noqa: E402
from controlnext_queue.websocket import WebSocket  # noqa: E402
from server import ComfyServer, execution_error, make_base_directory  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]
PAIRS = 60  # pictures in the folder: at the tiny models' pace, seconds of encoding for the Cancel to land in
CANCEL_AFTER = 5  # pairs the progress shows encoded when the Cancel is sent
TRAIN = "3"  # the Train ControlNeXt node's id in the prompt
CACHE_FOLDER = ".controlnext_cache"


def pairs_folder(folder: str) -> None:
    """PAIRS pictures of a block at places of their own, each block's outline as its control, captions."""
    os.makedirs(os.path.join(folder, "conditioning_images"))
    generator = np.random.default_rng(0)
    for index in range(PAIRS):
        y, x = generator.integers(0, 40, 2)
        picture = np.full((64, 64, 3), 20, np.uint8)
        picture[y:y + 24, x:x + 24] = generator.integers(60, 255, 3)
        control = np.zeros((64, 64, 3), np.uint8)
        control[y:y + 24, x:x + 24] = 255
        Image.fromarray(picture).save(os.path.join(folder, f"pair_{index:03d}.png"))
        Image.fromarray(control).save(os.path.join(folder, "conditioning_images", f"pair_{index:03d}.png"))
        with open(os.path.join(folder, f"pair_{index:03d}.txt"), "w", encoding="utf-8") as file:
            file.write(f"a block, number {index}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_directory(str(tmp_path_factory.mktemp("train_data_server_base")))
    pairs_folder(os.path.join(base, "input", "pairs"))
    shutil.copytree(os.path.join(base, "input", "pairs"), os.path.join(base, "input", "pairs_in_one_go"))
    running = ComfyServer(base).start()
    yield running
    running.stop()


def training_prompt(folder: str, name: str) -> dict:
    """Load Training Data -> Train ControlNeXt (3 steps, its cache built first) -> Save ControlNeXt."""
    return {
        "1": {"class_type": "ControlNeXtTestTinyCheckpoint",
              "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": {"class_type": "ControlNeXtLoadTrainingData",
              "inputs": {"folder": folder, "layout": "auto", "resolution": 64, "control_folder": "conditioning_images",
                         "caption_extension": ".txt", "default_caption": "", "make_controls": "none",
                         "image_column": "image", "conditioning_image_column": "conditioning_image",
                         "caption_column": "text"}},
        TRAIN: {"class_type": "ControlNeXtTrain",
                "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "data": ["2", 0], "steps": 3,
                           "batch_size": 2, "encoder_lr": 1e-3, "unet_lr": 1e-3, "train_unet": "official subset",
                           "optimizer": "adamw", "warmup_steps": 0, "control_scale": 0.0,
                           "proportion_empty_prompts": 0.0, "seed": 3, "gradient_checkpointing": False,
                           "precision": "fp32"}},
        "4": {"class_type": "ControlNeXtSave", "inputs": {"name": name, "overwrite": True, "controlnext": [TRAIN, 0]}},
    }


def cancel_during_the_cache_build(server, prompt: dict, timeout: float = 240.0) -> tuple[dict, int]:
    """Queues ``prompt`` and sends POST /interrupt once Train ControlNeXt's progress over the
    websocket shows CANCEL_AFTER of the PAIRS pairs encoded: (its history entry, the count shown then)."""
    websocket = WebSocket.connect(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}")
    try:
        status, answer = server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})
        assert status == 200, answer
        prompt_id, shown, deadline = answer["prompt_id"], None, time.time() + timeout
        websocket.settimeout(5)
        while time.time() < deadline:
            try:
                message = websocket.receive()
            except TimeoutError:
                continue
            if not isinstance(message, str):
                continue  # a preview picture
            message = json.loads(message)
            kind, data = message.get("type"), message.get("data") or {}
            if kind == "progress" and data.get("node") == TRAIN and data["max"] == PAIRS and shown is None:
                if data["value"] >= CANCEL_AFTER:
                    assert data["value"] < PAIRS - 10, "the cache was almost built before the Cancel could land"
                    shown = data["value"]
                    assert server.post("/interrupt", {})[0] == 200
            if kind in ("execution_interrupted", "execution_error", "execution_success") \
                    and data.get("prompt_id") == prompt_id:
                break
        else:
            raise AssertionError(f"the prompt did not end within {timeout} s:\n{server.log()[-3000:]}")
    finally:
        websocket.close()
    server.wait_until_idle()
    return server.get(f"/history/{prompt_id}")[prompt_id], shown


def cache_of(server, folder: str) -> tuple[str, TrainingCache, dict]:
    """The folder's one cache: its path, the cache, its index."""
    root = os.path.join(server.base, "input", folder, CACHE_FOLDER)
    [digest] = os.listdir(root)
    with open(os.path.join(root, digest, INDEX_FILE), encoding="utf-8") as file:
        index = json.load(file)
    return os.path.join(root, digest), TrainingCache(os.path.join(root, digest), index["identity"]), index


def release_tensors(server, name: str) -> dict:
    folder = os.path.join(server.base, "models", "controlnext", name)
    tensors = {}
    for file in sorted(os.listdir(folder)):
        with safetensors.safe_open(os.path.join(folder, file), "pt") as opened:
            tensors.update({f"{file}:{key}": opened.get_tensor(key) for key in opened.keys()})
    return tensors


def test_a_cancel_during_the_cache_build_keeps_what_was_encoded_and_the_next_queue_goes_on(server):
    names = [f"pair_{index:03d}.png" for index in range(PAIRS)]
    since = len(server.log())
    entry, shown = cancel_during_the_cache_build(server, training_prompt("pairs", "cancelled"))
    assert shown is not None, f"no progress of the cache build came over the websocket:\n{server.log()[since:]}"
    assert [kind for kind, _ in entry["status"]["messages"]][-1] == "execution_interrupted", entry["status"]
    assert "ControlNeXt training: step" not in server.log()[since:]  # nothing was trained
    assert not os.path.exists(os.path.join(server.base, "models", "controlnext", "cancelled"))

    # the cache: every pair encoded before the Cancel (at least those the progress showed), in
    # whole shards the index names; nothing else, nothing half-written
    folder, cache, index = cache_of(server, "pairs")
    kept = len(index["entries"])
    assert shown <= kept < PAIRS, (shown, kept)
    assert sorted(index["entries"]) == names[:kept]  # encoded in order, each one kept
    assert sorted(os.listdir(folder)) == [INDEX_FILE, SHARDS_FOLDER]
    assert sorted(os.listdir(os.path.join(folder, SHARDS_FOLDER))) == sorted(
        f"{shard}.safetensors" for shard in index["shards"])
    assert sum(index["shards"].values()) == kept and len(cache) == kept
    assert cache.read(names[:kept])["latent"].shape[0] == kept

    # the next queue encodes the rest only, then trains
    since = len(server.log())
    resumed = server.run(training_prompt("pairs", "resumed"), timeout=600)
    assert resumed["status"]["status_str"] == "success", execution_error(resumed) + server.log()[-3000:]
    assert f"Encoded {PAIRS - kept} of {PAIRS} pairs into the cache {folder}" in server.log()[since:]
    in_one_go = server.run(training_prompt("pairs_in_one_go", "in_one_go"), timeout=600)
    assert in_one_go["status"]["status_str"] == "success", execution_error(in_one_go) + server.log()[-3000:]
    assert re.search(f"Encoded {PAIRS} of {PAIRS} pairs into the cache .*pairs_in_one_go", server.log())

    # the same tensors cached for every pair, and the same weights trained from them
    _, built_in_one_go, _ = cache_of(server, "pairs_in_one_go")
    _, continued, _ = cache_of(server, "pairs")
    for name in names:
        expected, actual = built_in_one_go.read([name]), continued.read([name])
        assert expected.keys() == actual.keys() and all(torch.equal(actual[key], value)
                                                          for key, value in expected.items()), name
    expected, actual = release_tensors(server, "in_one_go"), release_tensors(server, "resumed")
    assert expected.keys() == actual.keys() and len(expected) > 0
    assert all(torch.equal(actual[key], value) for key, value in expected.items())
