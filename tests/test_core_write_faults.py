"""Core tests: faults while a run's state is written or read back. A Cancel in the middle of a
checkpoint write and a crash during one; a full disk made by the OS (a small tmpfs, and a file size
limit) under a checkpoint write and under the training cache; a checkpoint folder cut short or from
another run. The earlier checkpoint stays valid and ``latest`` finds it, nothing half-written stays
behind, and every error names the file and says what to do."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import controlnext_core as cn
from controlnext_core import checkpoints
from controlnext_core.training_cache import SHARDS_FOLDER
from test_train import ToyDenoiser, run_steps, shapes_dataset, trained_state, trainer_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(batch_size=2, encoder_lr=1e-3, unet_lr=1e-3, optimizer="adamw", warmup_steps=0)


def folder_bytes(folder) -> dict[str, str]:
    """Each file under ``folder`` (relative path) -> the sha256 of its bytes."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                found[os.path.relpath(path, folder)] = hashlib.sha256(file.read()).hexdigest()
    return found


def trained(steps: int, **settings):
    latents, controls = shapes_dataset(count=5)
    toy, trainer = trainer_for(**{**SETTINGS, **settings})
    run_steps(trainer, toy, latents, controls, steps)
    return toy, trainer


@functools.lru_cache(maxsize=None)
def uninterrupted(steps: int) -> dict[str, torch.Tensor]:
    """The weights after ``steps`` steps in one run."""
    return trained_state(trained(steps)[1])


def continue_run(folder: str, steps: int) -> dict[str, torch.Tensor]:
    """A new trainer resumed from ``folder`` and trained ``steps`` more: its weights."""
    latents, controls = shapes_dataset(count=5)
    toy, resumed = trainer_for(**SETTINGS)
    assert "Resumed" in checkpoints.resume(folder, resumed)
    run_steps(resumed, toy, latents, controls, steps)
    return trained_state(resumed)


# --- Cancel and crash during a checkpoint write ---------------------------------------------------------------------

def cancel_half_way_through(monkeypatch, target: str) -> None:
    """A Cancel (KeyboardInterrupt, as Ctrl-C raises it) once half of ``target`` is on disk: the
    filesystem layer's writer is wrapped, everything else runs as it does."""
    import safetensors.torch

    if target == checkpoints.STATE_FILE:
        def save_file(tensors, path, metadata=None):
            with open(path, "wb") as file:
                file.write(safetensors.torch.save(tensors, metadata)[:1000])
            raise KeyboardInterrupt("Cancel")
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:
        def dump(value, file, **kwargs):
            file.write(json.dumps(value)[:100])
            raise KeyboardInterrupt("Cancel")
        monkeypatch.setattr(checkpoints.json, "dump", dump)


@pytest.mark.parametrize("target", [checkpoints.STATE_FILE, checkpoints.INFO_FILE])
@pytest.mark.parametrize("same_step", [False, True], ids=["next step", "the same step again"])
def test_a_cancel_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, target, same_step):
    """The Cancel goes on (the run stops), the previous checkpoint is byte for byte as it was,
    ``latest`` finds it, it resumes to the weights of an uninterrupted run, and no half-written
    folder is left beside it. "The same step again": a run resumed at step 1 and cancelled before
    its first step writes step-1 once more; the one on disk must survive a Cancel of that write."""
    root = str(tmp_path / "checkpoints")
    toy, trainer = trained(1)
    previous = checkpoints.save_checkpoint(root, trainer)
    before = folder_bytes(root)
    if not same_step:
        run_steps(trainer, toy, *shapes_dataset(count=5), 1)
    cancel_half_way_through(monkeypatch, target)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(root, trainer)
    monkeypatch.undo()
    assert folder_bytes(root) == before and os.listdir(root) == ["step-1"]
    assert checkpoints.latest_checkpoint(root) == previous
    expected = uninterrupted(2)
    assert all(torch.equal(value, expected[name]) for name, value in continue_run(previous, 1).items())


CRASH = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}, os.path.join({repo!r}, "tests")]
    import safetensors.torch
    from controlnext_core import checkpoints
    from test_core_write_faults import trained

    _, trainer = trained(2)
    def save_file(tensors, path, metadata=None):  # the process dies with half the file written
        with open(path, "wb") as file:
            file.write(safetensors.torch.save(tensors, metadata)[:1000])
            file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    safetensors.torch.save_file = save_file
    checkpoints.save_checkpoint(sys.argv[1], trainer)
""")


def test_a_crash_during_a_checkpoint_write_is_never_latest_and_is_cleared_by_the_next_write(tmp_path):
    """A process killed (SIGKILL: no handler runs) in the middle of a checkpoint write: its folder
    is left under a temporary name that ``latest`` never takes, and the next write removes it."""
    root = str(tmp_path / "checkpoints")
    toy, trainer = trained(1)
    previous = checkpoints.save_checkpoint(root, trainer)
    crashed = subprocess.run([sys.executable, "-c", CRASH.format(repo=REPO), root], capture_output=True, text=True,
                             timeout=300)
    assert crashed.returncode == -9, crashed.stderr
    leftovers = [name for name in os.listdir(root) if name != "step-1"]
    assert len(leftovers) == 1 and checkpoints.PARTIAL_PATTERN.match(leftovers[0]), leftovers
    assert checkpoints.latest_checkpoint(root) == previous
    checkpoints.read_checkpoint(previous)
    run_steps(trainer, toy, *shapes_dataset(count=5), 1)
    checkpoints.save_checkpoint(root, trainer)
    assert sorted(os.listdir(root)) == ["step-1", "step-2"]


# --- a full disk, made by the OS ------------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent("""
    import json, os, resource, signal, sys
    sys.path[:0] = [{repo!r}, os.path.join({repo!r}, "tests")]
    import torch
    import controlnext_core as cn
    from controlnext_core import checkpoints
    from controlnext_core.training_cache import TrainingCache
    from test_core_write_faults import SETTINGS, folder_bytes, trained
    from test_train import run_steps, shapes_dataset

    what, folder, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    report = {{}}
    if what == "checkpoint":
        root = os.path.join(folder, "checkpoints")
        toy, trainer = trained(1)
        report["previous"] = checkpoints.save_checkpoint(root, trainer)
        report["before"] = folder_bytes(root)
        run_steps(trainer, toy, *shapes_dataset(count=5), 1)
    elif what == "release":
        from controlnext_core import train
        root = os.path.join(folder, "release")
        toy, trainer = trained(1)
        release = (trainer.encoder, trainer.trained_unet(), {{"family": "sdxl"}})
        train.save_release(root, *release)
        report["before"] = folder_bytes(root)
    else:
        identity = {{"family": "sd15", "resolution": "64"}}
        cache = TrainingCache(os.path.join(folder, "cache"), identity)
        item = {{"latent": torch.randn(4, 64, 64), "control": torch.zeros(3, 256, 256, dtype=torch.uint8)}}
        writer = cache.writer(shard_items=2)
        writer.__enter__()
        for key in ("a", "b"):
            writer.add(key, "d", item)
    if sys.argv[4] == "tmpfs":  # the folder is a tmpfs: filled up to its last ``limit`` bytes
        stats = os.statvfs(folder)
        with open(os.path.join(folder, "filler"), "wb") as file:
            file.write(bytes(stats.f_bavail * stats.f_frsize - limit))
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk does
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        if what == "checkpoint":
            checkpoints.save_checkpoint(root, trainer)
        elif what == "release":
            train.save_release(root, *release, overwrite=True)
        else:
            for key in ("c", "d"):
                writer.add(key, "d", item)
            writer.__exit__(None, None, None)
        report["error"] = None
    except cn.ControlNeXtError as error:
        report["error"] = str(error)
    if what == "checkpoint":
        report["after"] = folder_bytes(root)
        report["latest"] = checkpoints.latest_checkpoint(root)
        report["listing"] = sorted(os.listdir(root))
    elif what == "release":
        report["after"] = folder_bytes(root)
        report["listing"] = sorted(os.listdir(root))
    else:
        report["listing"] = sorted(os.listdir(os.path.join(folder, "cache", "shards")))
        report["cached"] = sorted(TrainingCache(os.path.join(folder, "cache"), identity).keys())
    print(json.dumps(report))
""")


def tmpfs_works() -> bool:
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def run_on_a_full_disk(tmp_path, what: str, how: str, fits: int) -> dict:
    """The FULL_DISK child with ``fits`` bytes left for the second write: on a tmpfs (in a private
    mount namespace) filled up after the first write, or under a file size limit of ``fits``."""
    folder = tmp_path / "disk"
    folder.mkdir()
    command = [sys.executable, "-c", FULL_DISK.format(repo=REPO), what, str(folder), str(fits), how]
    if how == "tmpfs":
        if not tmpfs_works():
            pytest.skip("mounting a tmpfs in a private mount namespace (unshare -r -m) is not allowed here")
        command = ["unshare", "-r", "-m", "sh", "-c", 'mount -t tmpfs -o size=256m tmpfs "$1" && shift && exec "$@"',
                   "sh", str(folder), *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("how", ["tmpfs", "file size limit"])
def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, how):
    """No space for the second checkpoint: a clear error (what happened, that the earlier ones are
    unchanged, to free space), the previous checkpoint byte for byte as it was and still the
    latest, and no half-written folder. (safetensors reports a full disk as a SafetensorError, not
    an OSError: it escaped as a raw error and left the half-written folder behind.)"""
    report = run_on_a_full_disk(tmp_path, "checkpoint", how, fits=20_000)
    error = report["error"]
    assert error is not None, "the second checkpoint was written on a full disk"
    assert ("No space left on device" if how == "tmpfs" else "File too large") in error
    assert f"Could not write the checkpoint {os.path.dirname(report['previous'])}{os.sep}step-2" in error
    assert "the earlier checkpoints in" in error and "are unchanged" in error
    assert "free some disk space and resume from the latest" in error
    assert report["listing"] == ["step-1"] and report["latest"] == report["previous"]
    assert report["after"] == report["before"]


@pytest.mark.parametrize("how", ["tmpfs", "file size limit"])
def test_a_full_disk_during_the_cache_build_keeps_its_whole_shards(tmp_path, how):
    """No space for the second shard of the training cache: a clear error naming the shard, the
    first shard kept and still named by the index, no temporary file left."""
    report = run_on_a_full_disk(tmp_path, "cache", how, fits=20_000)
    error = report["error"]
    assert error is not None, "the second shard was written on a full disk"
    assert ("No space left on device" if how == "tmpfs" else "File too large") in error
    shard = tmp_path / "disk" / "cache" / SHARDS_FOLDER / "1.safetensors"
    assert f"Could not write {shard} of the training cache" in error
    assert "free some disk space, then queue again" in error and "the pairs cached before are kept" in error
    assert report["listing"] == ["0.safetensors"] and report["cached"] == ["a", "b"]


@pytest.mark.parametrize("how", ["tmpfs", "file size limit"])
def test_a_full_disk_while_saving_a_release_keeps_its_files_and_says_what_to_do(tmp_path, how):
    """Save ControlNeXt (and each checkpoint's release refresh) on a full disk: a clear error naming the
    file, the release there before byte for byte, no temporary file (safetensors' own error escaped raw)."""
    report = run_on_a_full_disk(tmp_path, "release", how, fits=20_000)
    error = report["error"]
    assert error is not None, "the release was written on a full disk"
    assert f"Could not write {tmp_path / 'disk' / 'release' / 'controlnet.safetensors'}" in error
    assert "free some disk space and save again" in error
    assert report["listing"] == ["controlnet.safetensors", "unet.safetensors"]
    assert report["after"] == report["before"]


# --- a checkpoint folder cut short, or of another run ----------------------------------------------------------------

def cut(path, keep) -> None:
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(data[:keep(len(data))])


BROKEN = {
    "state.safetensors cut short": (lambda f: cut(f / checkpoints.STATE_FILE, lambda n: n // 2),
                                    checkpoints.STATE_FILE, "cannot be read .*cut short or changed"),
    "state.safetensors cut in its header": (lambda f: cut(f / checkpoints.STATE_FILE, lambda n: 12),
                                            checkpoints.STATE_FILE, "cannot be read .*cut short or changed"),
    "state.safetensors empty": (lambda f: cut(f / checkpoints.STATE_FILE, lambda n: 0),
                                checkpoints.STATE_FILE, "cannot be read .*cut short or changed"),
    "state.safetensors missing": (lambda f: os.remove(f / checkpoints.STATE_FILE),
                                  checkpoints.STATE_FILE, "it has no state.safetensors"),
    "state.json missing": (lambda f: os.remove(f / checkpoints.INFO_FILE),
                           checkpoints.INFO_FILE, "it has no state.json"),
    "state.json cut short": (lambda f: cut(f / checkpoints.INFO_FILE, lambda n: n // 2),
                             checkpoints.INFO_FILE, "cannot be read .*cut short or changed"),
    "state.json without the run's state": (
        lambda f: (f / checkpoints.INFO_FILE).write_text(json.dumps(
            {"format": checkpoints.FORMAT, "version": checkpoints.VERSION, "settings": {}})),
        checkpoints.INFO_FILE, "lacks steps_done, losses, data_order"),
    "state.json of something else": (lambda f: (f / checkpoints.INFO_FILE).write_text("[1, 2]"),
                                     checkpoints.INFO_FILE, "is not a ControlNeXt training checkpoint of this version"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_checkpoint_cut_short_is_named_with_its_file_and_the_one_before_it(tmp_path, case):
    """The newest checkpoint is damaged: resuming it names the folder and the file, and says to
    delete the folder to resume from the one before, whose name it gives; done, ``latest`` is that
    one and the run resumes from it."""
    root = tmp_path / "checkpoints"
    toy, trainer = trained(1)
    earlier = checkpoints.save_checkpoint(str(root), trainer)
    run_steps(trainer, toy, *shapes_dataset(count=5), 1)
    newest = checkpoints.save_checkpoint(str(root), trainer)
    damage, file, problem = BROKEN[case]
    damage(root / "step-2")
    assert checkpoints.latest_checkpoint(str(root)) == newest
    with pytest.raises(cn.ControlNeXtError) as raised:
        checkpoints.resume(newest, trainer_for(**SETTINGS)[1])
    message = str(raised.value)
    assert str(root / "step-2" / file) in message
    assert re.search(problem, message), message
    assert f"Delete the folder {newest} to resume from the checkpoint before it, {earlier}" in message
    shutil.rmtree(newest)
    assert checkpoints.latest_checkpoint(str(root)) == earlier
    expected = uninterrupted(2)
    assert all(torch.equal(value, expected[name]) for name, value in continue_run(earlier, 1).items())


def test_the_only_checkpoint_cut_short_says_to_start_a_new_run(tmp_path):
    folder = checkpoints.save_checkpoint(str(tmp_path), trained(1)[1])
    cut(os.path.join(folder, checkpoints.STATE_FILE), lambda n: n - 100)
    with pytest.raises(cn.ControlNeXtError, match=f"Delete the folder {folder} and start a new run"):
        checkpoints.read_checkpoint(folder)
    with pytest.raises(cn.ControlNeXtError, match="does not exist: resume from another one, or start a new run"):
        checkpoints.read_checkpoint(str(tmp_path / "step-9"))


def test_a_checkpoint_of_another_family_and_settings_is_refused_naming_each_difference(tmp_path):
    """An SDXL run's checkpoint resumed by an SD1.5 run of other learning rates, seed, batch size,
    optimiser and base model: each difference on its own line, the trained UNet weights too; with
    new settings allowed, the other family's UNet weights are still refused, by name."""
    _, sdxl = trained(1, family="sdxl")
    folder = checkpoints.save_checkpoint(str(tmp_path), sdxl, {"base_model": "sd_xl_base_1.0.safetensors"})
    _, sd15 = trainer_for(family="sd15", batch_size=3, encoder_lr=2e-3, unet_lr=1e-3, optimizer="adafactor",
                          warmup_steps=0, seed=5)
    with pytest.raises(cn.ControlNeXtError) as raised:
        checkpoints.resume(folder, sd15, {"base_model": "v1-5-pruned-emaonly.safetensors"})
    lines = str(raised.value).splitlines()
    assert lines[0] == f"The checkpoint {folder} was written by another run:"
    assert any(line.startswith("- the global batch (batch_size x gradient_accumulation_steps x processes): 2 (2 x 1 x 1) "
                               "in the checkpoint, 3 (3 x 1 x 1) now") for line in lines), lines
    for difference in ("family: 'sdxl' in the checkpoint, 'sd15' now",
                       "encoder_lr: 0.001 in the checkpoint, 0.002 now", "seed: 0 in the checkpoint, 5 now",
                       "optimizer: 'adamw' in the checkpoint, 'adafactor' now",
                       "base_model: 'sd_xl_base_1.0.safetensors' in the checkpoint, "
                       "'v1-5-pruned-emaonly.safetensors' now",
                       "the trained UNet weights are another set (another model or train_unet choice)"):
        assert f"- {difference}" in lines, (difference, lines)
    assert not [line for line in lines if "unet_lr" in line or "steps:" in line]  # what is the same is not listed
    before = trained_state(sd15)
    with pytest.raises(cn.ControlNeXtError, match=f"{folder} has no trained UNet weight 'down.attn1.to_out.0.weight'"
                                                  ".*another family"):
        checkpoints.resume(folder, sd15, {"base_model": "v1-5-pruned-emaonly.safetensors"}, new_settings=True)
    assert sd15.steps_done == 0
    assert torch.equal(before[f"unet.{ToyDenoiser.WEIGHT}"], sd15.unet_parameters[ToyDenoiser.WEIGHT])
