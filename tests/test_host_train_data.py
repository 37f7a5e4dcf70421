"""Host tests: the training cache of Load Training Data -> Train ControlNeXt on tiny SD1.5 models in a
real ComfyUI. A cache written by another VAE, text encoder (other weights, a LoRA, another CLIP
layer) or resolution is rebuilt, never read for this one; a picture that cannot be decoded stops the
build before anything is trained, naming the file, and the pairs encoded before it stay cached."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import host  # skips this module without a ComfyUI host
from host import models_folder  # noqa: F401 (a fixture)
from test_host_train import input_folder, run_train, training_folder  # noqa: F401 (input_folder: a fixture)

train_data = host.importlib.import_module(f"{host.PACK_NAME}.nodes.train_data")
training_cache = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.training_cache")
LOAD_ARGUMENTS = dict(layout="auto", control_folder="conditioning_images", caption_extension=".txt",
                      default_caption="", make_controls="none", image_column="image",
                      conditioning_image_column="conditioning_image", caption_column="text")
CACHED = re.compile(r"(?:Encoded (\d+) of (\d+) pairs into|All (\d+) pairs were in) the cache (\S+)\.")


def load(folder: str, resolution: int = 64):
    return train_data.LoadTrainingData.execute(folder, resolution=resolution, **LOAD_ARGUMENTS).result[0]


def train_on(data, vae, clip, **settings):
    """One step of Train ControlNeXt on ``data``: (pairs encoded, the cache folder, its cache)."""
    result = run_train("sd15", steps=1, latents=None, positive=None, control_images=None, data=data, vae=vae,
                       clip=clip, **settings)
    match = CACHED.search(result.ui["controlnext_info"][0])
    assert match, result.ui["controlnext_info"][0]
    encoded, _, _, folder = match.groups()
    with open(os.path.join(folder, training_cache.INDEX_FILE), encoding="utf-8") as file:
        identity = json.load(file)["identity"]
    return int(encoded or 0), folder, training_cache.TrainingCache(folder, identity)


def other_vae():
    """A VAE of the tiny one's shape with other weights (another model's VAE)."""
    import comfy.sd
    import comfy.taesd.taesd
    from server_nodes.tiny_checkpoint import randomise

    taesd = comfy.taesd.taesd.TAESD()
    randomise(taesd, seed=5)
    return comfy.sd.VAE(sd=taesd.state_dict())


def with_lora(clip):
    """The CLIP with a patch on every linear weight, as Load LoRA adds one (ComfyUI's add_patches)."""
    patched = clip.clone()
    state = clip.cond_stage_model.state_dict()
    generator = torch.Generator().manual_seed(9)
    patched.add_patches({name: (0.05 * torch.randn(value.shape, generator=generator),)
                         for name, value in state.items() if name.endswith("weight") and value.ndim == 2}, 1.0)
    return patched


def last_layer(clip, layer: int):
    """CLIP Set Last Layer."""
    clipped = clip.clone()
    clipped.clip_layer(layer)
    return clipped


@pytest.mark.slow
def test_a_cache_of_another_vae_text_encoder_or_resolution_is_rebuilt_not_misused(input_folder):
    """Each change of what the cached tensors depend on encodes every pair again into a cache of its
    own, holding what this model makes (not the other's tensors); going back to the first model
    finds its cache as it was. Before the fix, a CLIP with another last layer or a LoRA not yet
    applied to the weights counted as the same text encoder (its weights alone were compared) and
    trained on the first CLIP's embeddings."""
    from server_nodes.tiny_checkpoint import tiny_clip, tiny_vae

    training_folder(input_folder / "blocks")
    data, clip, vae = load("blocks"), tiny_clip("sd15"), tiny_vae()
    items = {item.key(): item for item in data.items}
    encoded, first, _ = train_on(data, vae, clip)
    assert encoded == 5
    assert train_on(data, vae, clip)[:2] == (0, first)  # the same model: nothing encoded

    def caption_embedding(text_clip, key):
        return train_data.encode_text(text_clip, items[key].caption)[0][0][0]

    folders = {first}
    for change, (new_vae, new_clip) in {"another VAE": (other_vae(), clip),
                                        "CLIP Set Last Layer -2": (vae, last_layer(clip, -2)),
                                        "a LoRA on the CLIP": (vae, with_lora(clip))}.items():
        encoded, folder, cache = train_on(data, new_vae, new_clip)
        assert encoded == 5 and folder not in folders, change
        folders.add(folder)
        for key, item in items.items():
            row = cache.read([key])
            assert torch.equal(row["context"][0], caption_embedding(new_clip, key)), (change, key)
            picture, _ = train_data.load_training_pair(item, 64)
            with torch.no_grad():
                assert torch.equal(row["latent"][0], new_vae.encode(picture[None])[0].cpu()), (change, key)
    encoded, folder, cache = train_on(load("blocks", resolution=128), vae, clip)
    assert encoded == 5 and folder not in folders and cache.read(["block_0.png"])["control"].shape == (1, 3, 128, 128)
    folders.add(folder)
    encoded, folder, cache = train_on(data, vae, clip)
    assert (encoded, folder) == (0, first)  # back to the first model, after the LoRA was applied and removed
    assert torch.equal(cache.read(["block_0.png"])["context"][0], caption_embedding(clip, "block_0.png"))
    assert sorted(os.listdir(input_folder / "blocks" / train_data.CACHE_FOLDER)) == sorted(
        os.path.basename(folder) for folder in folders)  # one cache per model and resolution, none overwritten


def test_the_text_encoders_identity_does_not_depend_on_whether_its_patches_are_applied():
    """ComfyUI applies a LoRA to the shared weights while the patched CLIP is loaded and takes it off
    when another clone is: the identity is the same before, during and after."""
    from server_nodes.tiny_checkpoint import tiny_clip

    clip = tiny_clip("sd15")
    lora = with_lora(clip)
    plain_before, lora_before = train_data.text_encoder_fingerprint(clip), train_data.text_encoder_fingerprint(lora)
    assert plain_before != lora_before
    train_data.encode_text(lora, "loaded with its patches applied")
    assert train_data.text_encoder_fingerprint(lora) == lora_before
    assert train_data.text_encoder_fingerprint(clip) == plain_before
    train_data.encode_text(clip, "the patches taken off again")
    assert (train_data.text_encoder_fingerprint(clip), train_data.text_encoder_fingerprint(lora)) == (plain_before,
                                                                                                      lora_before)
    assert train_data.text_encoder_fingerprint(last_layer(clip, -2)) != plain_before


def test_a_truncated_picture_stops_the_build_before_training_and_keeps_the_pairs_encoded(input_folder, models_folder):
    """block_3.png is cut short (its header is whole, so Load Training Data lists it): the cache build
    stops there with an error naming the file and what to do, before any step (no checkpoint is
    written); block_0..2, encoded before it, stay in the cache, and once the picture is replaced the
    next run encodes only block_3..5."""
    from server_nodes.tiny_checkpoint import tiny_clip, tiny_vae

    training_folder(input_folder / "blocks", count=6)
    path = input_folder / "blocks" / "block_3.png"
    Image.fromarray((np.random.default_rng(3).random((72, 96, 3)) * 255).astype(np.uint8)).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    data = load("blocks")
    assert len(data.items) == 6
    with pytest.raises(host.core.ControlNeXtError) as raised:
        run_train("sd15", steps=1, latents=None, positive=None, control_images=None, data=data, vae=tiny_vae(),
                  clip=tiny_clip("sd15"), checkpoint_name="truncated", checkpoint_every=1)
    assert str(raised.value).startswith(f"'{path}' is not a readable picture (OSError: image file is truncated")
    assert str(raised.value).endswith("replace or remove it.")
    assert not (models_folder / "truncated").exists()  # nothing was trained
    [cache_folder] = os.listdir(input_folder / "blocks" / train_data.CACHE_FOLDER)
    with open(input_folder / "blocks" / train_data.CACHE_FOLDER / cache_folder / training_cache.INDEX_FILE) as file:
        assert sorted(json.load(file)["entries"]) == ["block_0.png", "block_1.png", "block_2.png"]
    path.write_bytes(whole)
    encoded, _, cache = train_on(data, tiny_vae(), tiny_clip("sd15"))
    assert encoded == 3 and len(cache) == 6
