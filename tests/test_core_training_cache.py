"""Core tests: the on-disk cache of encoded training items (controlnext_core/training_cache.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import controlnext_core as cn
from controlnext_core.training_cache import INDEX_FILE, SHARDS_FOLDER, TrainingCache

IDENTITY = {"family": "sd15", "vae": "vae-digest", "text_encoder": "clip-digest", "resolution": "512"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def item(seed: int) -> dict[str, torch.Tensor]:
    """One picture's encoded tensors in the dtypes a run stores (fp32 latent, fp16 context, uint8 control)."""
    generator = torch.Generator().manual_seed(seed)
    return {"latent": torch.randn(4, 8, 8, generator=generator),
            "context": torch.randn(77, 16, generator=generator).half(),
            "pooled": torch.randn(32, generator=generator).bfloat16(),
            "control": torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8)}


def build(cache: TrainingCache, keys: list[str], shard_items: int = 4, digest: str = "d") -> None:
    with cache.writer(shard_items=shard_items) as writer:
        for key in keys:
            writer.add(key, digest, item(int(key.split("-")[1])))


def names(count: int) -> list[str]:
    return [f"picture-{number}" for number in range(count)]


def shard_files(folder) -> list[str]:
    return sorted(os.listdir(os.path.join(folder, SHARDS_FOLDER)))


def test_items_read_back_bit_exact_across_shards_and_after_reopening(tmp_path):
    keys = names(10)
    build(TrainingCache(str(tmp_path), IDENTITY), keys)
    assert shard_files(tmp_path) == ["0.safetensors", "1.safetensors", "2.safetensors"]
    cache = TrainingCache(str(tmp_path), IDENTITY)  # a second run
    assert len(cache) == 10 and cache.keys() == keys
    asked = ["picture-9", "picture-0", "picture-5", "picture-0"]  # three shards, one item twice
    batch = cache.read(asked)
    for name, tensor in batch.items():
        expected = torch.stack([item(int(key.split("-")[1]))[name] for key in asked])
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    assert sorted(batch) == ["context", "control", "latent", "pooled"]
    assert cache.size_bytes() == sum(os.path.getsize(os.path.join(root, file))
                                     for root, _, files in os.walk(tmp_path) for file in files)


def test_rows_read_back_as_stored_in_the_order_asked_each_shard_opened_once(tmp_path, monkeypatch):
    keys = names(10)
    build(TrainingCache(str(tmp_path), IDENTITY), keys)
    cache = TrainingCache(str(tmp_path), IDENTITY)
    with cache.writer() as writer:  # an item of other shapes (a longer caption) may share a batch here
        writer.add("long", "d", {**item(20), "context": torch.randn(154, 16).half()})
    opened = []
    original = cache._open_shard
    monkeypatch.setattr(cache, "_open_shard", lambda shard: opened.append(shard) or original(shard))
    asked = ["picture-9", "long", "picture-0", "picture-1", "picture-9"]
    rows = cache.read_rows(asked)
    assert sorted(opened) == [0, 2, 3]  # shards of pictures 0-3, 8-9 and the new one: each once
    for key, row in zip(asked, rows):
        expected = {**item(20), "context": row["context"]} if key == "long" else item(int(key.split("-")[1]))
        assert row.keys() == expected.keys()
        assert all(row[name].dtype == value.dtype and torch.equal(row[name], value) for name, value in expected.items())
    assert rows[1]["context"].shape == (154, 16)
    with pytest.raises(cn.ControlNeXtError, match="not in the training cache"):
        cache.read_rows(["picture-99"])


def test_an_added_item_is_a_copy_so_the_caller_may_reuse_its_buffers(tmp_path):
    latent = torch.empty(4, 8, 8)  # one output buffer for every encoding
    cache = TrainingCache(str(tmp_path), IDENTITY)
    with cache.writer() as writer:
        for number in range(4):
            writer.add(f"picture-{number}", "d", {"latent": latent.fill_(number)})
    assert cache.read(names(4))["latent"].flatten(1).max(dim=1).values.tolist() == [0, 1, 2, 3]


def test_a_changed_picture_is_the_only_one_missing_and_is_replaced(tmp_path):
    cache = TrainingCache(str(tmp_path), IDENTITY)
    build(cache, names(6))
    digests = {key: "d" for key in names(6)} | {"picture-2": "changed", "picture-7": "d"}
    assert cache.missing(digests) == ["picture-2", "picture-7"]
    replacement = {"latent": torch.ones(4, 8, 8)} | {k: v for k, v in item(2).items() if k != "latent"}
    with cache.writer() as writer:
        writer.add("picture-2", "changed", replacement)
        writer.add("picture-7", "d", item(7))
    reopened = TrainingCache(str(tmp_path), IDENTITY)
    assert reopened.missing(digests) == []
    assert torch.equal(reopened.read(["picture-2"])["latent"][0], torch.ones(4, 8, 8))


def test_an_interrupted_build_keeps_its_whole_shards_and_a_rerun_writes_only_the_rest(tmp_path):
    keys = names(10)
    with pytest.raises(KeyboardInterrupt):  # a Cancel after the 10th item: shards of 4, 4 written, 2 pending
        with TrainingCache(str(tmp_path), IDENTITY).writer(shard_items=4) as writer:
            for key in keys:
                writer.add(key, "d", item(int(key.split("-")[1])))
            raise KeyboardInterrupt
    open(os.path.join(tmp_path, SHARDS_FOLDER, ".tmp-0123"), "wb").close()  # a shard a crash left half-written
    cache = TrainingCache(str(tmp_path), IDENTITY)
    todo = cache.missing({key: "d" for key in keys})
    assert len(cache) == 8 and todo == ["picture-8", "picture-9"]
    build(cache, todo)
    assert shard_files(tmp_path) == ["0.safetensors", "1.safetensors", "2.safetensors"]  # the leftover is gone
    assert TrainingCache(str(tmp_path), IDENTITY).missing({key: "d" for key in keys}) == []
    assert torch.equal(cache.read(["picture-9"])["latent"][0], item(9)["latent"])


def test_a_cache_of_another_model_or_resolution_is_ignored_then_replaced(tmp_path):
    build(TrainingCache(str(tmp_path), IDENTITY), names(6))
    other = TrainingCache(str(tmp_path), IDENTITY | {"resolution": "768"})
    assert len(other) == 0 and other.missing({"picture-0": "d"}) == ["picture-0"]
    with pytest.raises(cn.ControlNeXtError, match="not in the training cache"):
        other.read(["picture-0"])
    assert len(TrainingCache(str(tmp_path), IDENTITY)) == 6  # opening alone changes nothing on disk
    with other.writer() as writer:
        writer.add("picture-0", "d", {"latent": torch.zeros(4, 12, 12)})
    assert shard_files(tmp_path) == ["0.safetensors"]  # the old shards 0 and 1 deleted before it was written
    with open(os.path.join(tmp_path, INDEX_FILE), encoding="utf-8") as file:
        assert json.load(file)["identity"]["resolution"] == "768"
    assert len(TrainingCache(str(tmp_path), IDENTITY)) == 0  # and the old model now finds nothing
    replaced = TrainingCache(str(tmp_path), IDENTITY | {"resolution": "768"})
    assert replaced.read(["picture-0"])["latent"].shape == (1, 4, 12, 12)


def test_a_folder_that_is_not_a_cache_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(cn.ControlNeXtError, match="holds other files and no index.json: it is not a training cache"):
        TrainingCache(str(tmp_path), IDENTITY)
    other = tmp_path / "other"
    other.mkdir()
    (other / INDEX_FILE).write_text(json.dumps({"pages": []}))
    with pytest.raises(cn.ControlNeXtError, match="is not a training cache's index"):
        TrainingCache(str(other), IDENTITY)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "other"] and os.listdir(other) == [INDEX_FILE]


def test_items_whose_shard_file_is_gone_count_as_missing(tmp_path):
    build(TrainingCache(str(tmp_path), IDENTITY), names(6))
    os.remove(os.path.join(tmp_path, SHARDS_FOLDER, "1.safetensors"))
    assert TrainingCache(str(tmp_path), IDENTITY).missing({key: "d" for key in names(6)}) == ["picture-4", "picture-5"]


def test_a_batch_of_items_of_different_sizes_is_refused_by_name(tmp_path):
    cache = TrainingCache(str(tmp_path), IDENTITY)
    with cache.writer() as writer:
        writer.add("wide", "d", {"latent": torch.zeros(4, 8, 12)})
        writer.add("tall", "d", {"latent": torch.zeros(4, 12, 8)})
    with pytest.raises(cn.ControlNeXtError, match="'tall' has a latent of .4, 12, 8."):
        cache.read(["wide", "tall"])


def test_prune_drops_gone_items_and_rewrites_their_shards(tmp_path):
    cache = TrainingCache(str(tmp_path), IDENTITY)
    build(cache, names(12))
    with cache.writer() as writer:  # picture-11 re-encoded: its old row in shard 2 is dead
        writer.add("picture-11", "changed", item(11))
    before = cache.size_bytes()
    keep = [key for key in names(12) if key not in ("picture-1", "picture-2", "picture-3", "picture-6")]
    assert cache.prune(keep + ["not-cached"]) == 4
    assert sorted(cache.keys()) == sorted(keep) and cache.size_bytes() < before
    # shards 0, 1 and 2 held dropped or replaced rows: their live rows are now in 4, 5 and 6
    assert shard_files(tmp_path) == ["3.safetensors", "4.safetensors", "5.safetensors", "6.safetensors"]
    reopened = TrainingCache(str(tmp_path), IDENTITY)
    assert sorted(reopened.keys()) == sorted(keep)
    batch = reopened.read(keep)
    assert torch.equal(batch["control"], torch.stack([item(int(key.split("-")[1]))["control"] for key in keep]))
    assert reopened.prune(keep) == 0 and len(shard_files(tmp_path)) == 4


READ_FOUR_ROWS = """
import json, sys
from controlnext_core.training_cache import TrainingCache

def peak_resident_kib():  # this process's own peak (ru_maxrss would start at the forking parent's)
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("VmHWM:"))

TrainingCache(sys.argv[2], {"family": "sd15"}).read(["item-1"])  # first use (imports) on a one-item cache
cache = TrainingCache(sys.argv[1], {"family": "sd15"})
with open("/proc/self/clear_refs", "w") as file:
    file.write("5")  # the peak restarts from the current resident size
before = peak_resident_kib()
batch = cache.read(["item-3", "item-700", "item-1400", "item-1999"])  # four shards
print(json.dumps({"grown_kib": peak_resident_kib() - before, "shape": list(batch["latent"].shape)}))
"""


def test_a_batch_reads_its_rows_not_the_cache(tmp_path):
    """2,000 items of 32 KiB (62 MiB in 8 shards): reading 4 rows must not map or copy whole shards.
    The peak resident memory of a fresh process is measured (safetensors maps the files, so the
    pages a read touches count there, while tracemalloc sees neither mapped nor torch memory)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("measures the peak resident size through Linux's /proc/self/status and clear_refs")
    cache_folder, warm_up_folder = tmp_path / "cache", tmp_path / "warm-up"
    for folder, count in ((cache_folder, 2000), (warm_up_folder, 2)):
        with TrainingCache(str(folder), {"family": "sd15"}).writer() as writer:
            for number in range(count):
                writer.add(f"item-{number}", "d", {"latent": torch.full((8, 32, 32), float(number))})
    assert TrainingCache(str(cache_folder), {"family": "sd15"}).size_bytes() > 60 << 20
    assert len(shard_files(cache_folder)) == 8
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(READ_FOUR_ROWS), str(cache_folder),
                             str(warm_up_folder)], cwd=REPO, capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout)
    assert measured["shape"] == [4, 8, 32, 32]
    # The rows are 4 x 32 KiB (plus the kernel's read-around: 0.4 MiB measured); one whole shard is 7.8 MiB
    # (8 MiB measured when read() loaded each shard in turn, or every row of each shard it opens).
    assert measured["grown_kib"] < 4 << 10, measured
