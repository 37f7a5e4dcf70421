"""Training checkpoints: the whole state of a ``Trainer`` (encoder, trained UNet weights, optimiser
state, learning-rate position, random generators, the rest of the epoch's data order, the loss
history, the settings) as ``state.safetensors`` + ``state.json`` in ``<root>/step-<N>/``, so that a
resumed run continues the same run: its weights are bit-identical to an uninterrupted one.

A checkpoint folder is written under a temporary name and renamed into place, so a crash or a full
disk during the write leaves the previous checkpoints as they were; the last ``keep`` are kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from typing import Mapping

import torch

from .errors import ControlNeXtError
from .train import Trainer
from .training_cache import write_advice

FORMAT = "ControlNeXt training checkpoint"
VERSION = 1
STATE_FILE, INFO_FILE = "state.safetensors", "state.json"
FOLDER_PATTERN = re.compile(r"^step-(\d+)$")
PARTIAL_PATTERN = re.compile(r"^\.step-\d+\.partial-[0-9a-f]{8}$")
# what resume reads of state.json and of state.safetensors
INFO_KEYS = ("settings", "steps_done", "losses", "data_order", "optimizer_groups", "optimizer_scalars", "schedule",
             "unet_names")
STATE_TENSORS = ("rng.noise", "rng.data")
# settings a resumed run may change without being a new run: how long it goes on
EXTENDABLE = ("steps",)
# settings whose product with the number of processes a resume keeps, not each of them
GLOBAL_BATCH = ("batch_size", "gradient_accumulation_steps")


def schedule_digest(trainer: Trainer) -> str:
    return hashlib.sha256(trainer.alphas_cumprod.detach().cpu().float().numpy().tobytes()).hexdigest()[:16]


def trainer_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, the JSON part) of everything a resume needs."""
    tensors = {f"encoder.{name}": value for name, value in trainer.encoder.state_dict().items()}
    tensors.update({f"unet.{name}": param.detach() for name, param in trainer.unet_parameters.items()})
    optimizer = trainer.optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.noise"] = trainer.generator.get_state()
    tensors["rng.data"] = trainer.data_generator.get_state()
    info = {"format": FORMAT, "version": VERSION, "settings": dataclasses.asdict(trainer.settings),
            "steps_done": trainer.steps_done, "losses": trainer.losses, "data_order": trainer.data_order,
            "optimizer_groups": optimizer["param_groups"], "optimizer_scalars": scalars,
            "schedule": schedule_digest(trainer), "unet_names": sorted(trainer.unet_parameters),
            "processes": trainer.processes.count}
    return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}, info


def save_checkpoint(root: str, trainer: Trainer, identity: Mapping[str, str] | None = None,
                    keep: int = 3) -> str:
    """Writes ``<root>/step-<N>/`` atomically and removes all but the newest ``keep``; returns the folder.
    A write that fails (a full disk) or is stopped (Cancel, Ctrl-C) leaves nothing of itself behind,
    and the folders of writes a crash stopped are removed here."""
    import safetensors
    import safetensors.torch

    tensors, info = trainer_state(trainer)
    info["identity"] = dict(identity or {})
    final = os.path.join(root, f"step-{trainer.steps_done}")
    partial = os.path.join(root, f".step-{trainer.steps_done}.partial-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(root, exist_ok=True)
        _remove_partial_folders(root)
        os.makedirs(partial)
        safetensors.torch.save_file(tensors, os.path.join(partial, STATE_FILE))
        with open(os.path.join(partial, INFO_FILE), "w", encoding="utf-8") as file:
            json.dump(info, file)
            file.flush()
            os.fsync(file.fileno())
        if os.path.exists(final):  # the same step written again (a Cancel right after a checkpoint)
            shutil.rmtree(final)
        os.replace(partial, final)
    except (OSError, safetensors.SafetensorError) as error:  # safetensors reports a full disk as its own error
        shutil.rmtree(partial, ignore_errors=True)
        raise ControlNeXtError(f"Could not write the checkpoint {final} ({error}); the earlier checkpoints in "
                               f"{root} are unchanged. {write_advice(error)} and resume from the latest.") from None
    except BaseException:  # Cancel or Ctrl-C in the middle of the write
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for step, folder in checkpoint_folders(root)[:-keep or None] if keep > 0 else []:
        shutil.rmtree(folder, ignore_errors=True)
    return final


def _remove_partial_folders(root: str) -> None:
    """Removes what writes stopped by a crash (power cut, killed process) left: never a checkpoint."""
    for name in os.listdir(root):
        if PARTIAL_PATTERN.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def checkpoint_folders(root: str) -> list[tuple[int, str]]:
    """The ``step-<N>`` folders of ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(match.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (match := FOLDER_PATTERN.match(name))]
    return sorted(found)


def read_checkpoint(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint's tensors and JSON, or a clear error naming the file that makes the folder no
    whole checkpoint (missing, cut short, of something else) and what to do."""
    import safetensors
    import safetensors.torch

    if not os.path.isdir(folder):
        raise ControlNeXtError(f"The checkpoint folder {folder} does not exist: resume from another one, or start "
                               f"a new run.")
    info_path, state_path = os.path.join(folder, INFO_FILE), os.path.join(folder, STATE_FILE)
    for path in (info_path, state_path):
        if not os.path.isfile(path):
            raise ControlNeXtError(f"{folder} is not a complete training checkpoint: it has no "
                                   f"{os.path.basename(path)} ({path}). {_instead(folder)}.")
    try:
        with open(info_path, encoding="utf-8") as file:
            info = json.load(file)
    except (OSError, ValueError) as error:  # json: ValueError, also for bytes that are not UTF-8
        raise ControlNeXtError(f"{folder} is not a complete training checkpoint: {info_path} cannot be read "
                               f"({type(error).__name__}: {error}); it was cut short or changed. "
                               f"{_instead(folder)}.") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        found = (info.get("format"), info.get("version")) if isinstance(info, dict) else (None, None)
        raise ControlNeXtError(f"{info_path} is not a ControlNeXt training checkpoint of this version (format "
                               f"{found[0]!r}, version {found[1]!r}, expected {FORMAT!r}, {VERSION}). "
                               f"{_instead(folder)}.")
    absent = [key for key in INFO_KEYS if key not in info]
    if absent:
        raise ControlNeXtError(f"{folder} is not a complete training checkpoint: {info_path} lacks "
                               f"{', '.join(absent)}. {_instead(folder)}.")
    try:
        tensors = safetensors.torch.load_file(state_path)
    except (OSError, safetensors.SafetensorError, RuntimeError, ValueError) as error:
        raise ControlNeXtError(f"{folder} is not a complete training checkpoint: {state_path} cannot be read "
                               f"({type(error).__name__}: {error}); it was cut short or changed. "
                               f"{_instead(folder)}.") from None
    absent = [name for name in STATE_TENSORS if name not in tensors]
    if absent:
        raise ControlNeXtError(f"{folder} is not a complete training checkpoint: {state_path} lacks "
                               f"{', '.join(absent)}. {_instead(folder)}.")
    return tensors, info


def _instead(folder: str) -> str:
    """What to do instead of resuming a broken checkpoint: the one before it, or a new run."""
    folder = os.path.abspath(folder)
    match = FOLDER_PATTERN.match(os.path.basename(folder))
    step = int(match.group(1)) if match else None
    earlier = [path for number, path in checkpoint_folders(os.path.dirname(folder))
               if os.path.abspath(path) != folder and (step is None or number < step)]
    if earlier:
        return f"Delete the folder {folder} to resume from the checkpoint before it, {earlier[-1]}"
    return f"Delete the folder {folder} and start a new run"


def latest_checkpoint(root: str) -> str | None:
    """The newest checkpoint folder of ``root``, or None where there is none."""
    folders = checkpoint_folders(root)
    return folders[-1][1] if folders else None


def differences(info: Mapping, trainer: Trainer, identity: Mapping[str, str] | None) -> list[str]:
    """What differs between a checkpoint and the run about to continue it, one line each."""
    saved, now = info["settings"], dataclasses.asdict(trainer.settings)
    found = [f"{name}: {saved.get(name)!r} in the checkpoint, {now[name]!r} now"
             for name in now if name not in EXTENDABLE + GLOBAL_BATCH and saved.get(name) != now[name]]
    saved_batch = global_batch(saved, info.get("processes", 1))
    if saved_batch != global_batch(now, trainer.processes.count):
        found.append(f"the global batch (batch_size x gradient_accumulation_steps x processes): "
                     f"{_batch_text(saved, info.get('processes', 1))} in the checkpoint, "
                     f"{_batch_text(now, trainer.processes.count)} now; keep {saved_batch} pictures per step (on "
                     f"another number of processes, change batch_size or gradient_accumulation_steps to match)")
    if info["schedule"] != schedule_digest(trainer):
        found.append("the model's noise schedule differs (another prediction type or zsnr setting)")
    saved_identity, identity = info.get("identity", {}), dict(identity or {})
    found += [f"{key}: {saved_identity.get(key)!r} in the checkpoint, {identity.get(key)!r} now"
              for key in sorted(set(saved_identity) | set(identity)) if saved_identity.get(key) != identity.get(key)]
    if info["unet_names"] != sorted(trainer.unet_parameters):
        found.append("the trained UNet weights are another set (another model or train_unet choice)")
    return found


def global_batch(settings: Mapping, processes: int) -> int:
    """Pictures per optimiser step over all processes: what a resume must keep (how it is split
    into processes and micro-batches changes neither the draws nor the step)."""
    return int(settings.get("batch_size", 1)) * int(settings.get("gradient_accumulation_steps", 1)) * processes


def _batch_text(settings: Mapping, processes: int) -> str:
    return (f"{global_batch(settings, processes)} ({settings.get('batch_size', 1)} x "
            f"{settings.get('gradient_accumulation_steps', 1)} x {processes})")


def resume(folder: str, trainer: Trainer, identity: Mapping[str, str] | None = None,
           new_settings: bool = False) -> str:
    """Puts ``trainer`` in the state the checkpoint was written in, so it continues that run. A
    checkpoint of other settings, model or data is refused naming each difference, unless
    ``new_settings``: then only the weights (and the optimiser state where it fits) carry over and
    the run restarts its step count, generators and data order from the new settings. Returns
    what was done, in words."""
    tensors, info = read_checkpoint(folder)
    found = differences(info, trainer, identity)
    if found and not new_settings:
        raise ControlNeXtError(f"The checkpoint {folder} was written by another run:\n- " + "\n- ".join(found)
                               + "\nResume with the same settings, or allow new settings to carry over only the "
                                 "trained weights.")
    _load_weights(folder, tensors, trainer)
    if found:
        carried = _load_optimizer(tensors, info, trainer, strict=False)
        return (f"Started from the weights of {folder} with new settings ({'; '.join(found)})"
                + ("; the optimiser state carried over." if carried else "; the optimiser starts afresh."))
    _load_optimizer(tensors, info, trainer, strict=True)
    trainer.generator.set_state(tensors["rng.noise"])
    trainer.data_generator.set_state(tensors["rng.data"])
    trainer.data_order = list(info["data_order"])
    trainer.steps_done = int(info["steps_done"])
    trainer.losses = [float(loss) for loss in info["losses"]]
    was = _batch_text(info["settings"], info.get("processes", 1))
    now = _batch_text(dataclasses.asdict(trainer.settings), trainer.processes.count)
    split = (f" with its global batch split anew: {now} (batch_size x gradient_accumulation_steps x processes), "
             f"was {was}") if now != was else ""
    return f"Resumed {folder} at step {trainer.steps_done}{split}."


def _load_weights(folder: str, tensors: Mapping[str, torch.Tensor], trainer: Trainer) -> None:
    for name, param in trainer.unet_parameters.items():  # all checked before any is loaded
        saved = tensors.get(f"unet.{name}")
        if saved is None or saved.shape != param.shape:
            raise ControlNeXtError(f"{folder} has no trained UNet weight '{name}' of shape {list(param.shape)}: "
                                   f"it was trained for another model (another family or train_unet choice).")
    encoder = {name[len("encoder."):]: value for name, value in tensors.items() if name.startswith("encoder.")}
    try:
        trainer.encoder.load_state_dict(encoder)
    except RuntimeError as error:
        raise ControlNeXtError(f"The encoder in {folder} does not fit this run's encoder: {error}") from None
    with torch.no_grad():
        for name, param in trainer.unet_parameters.items():
            param.copy_(tensors[f"unet.{name}"])


def _load_optimizer(tensors: Mapping[str, torch.Tensor], info: Mapping, trainer: Trainer, strict: bool) -> bool:
    """The optimiser's state (not its learning rates: those are the run's settings)."""
    current = trainer.optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in info["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    shapes_fit = (len(info["optimizer_groups"]) == len(current["param_groups"])
                  and all(len(saved["params"]) == len(group["params"])
                          for saved, group in zip(info["optimizer_groups"], current["param_groups"])))
    if not shapes_fit:
        if strict:
            raise ControlNeXtError("The checkpoint's optimiser state does not fit this run's trained weights.")
        return False
    try:
        trainer.optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    except (ValueError, RuntimeError, KeyError) as error:
        if strict:
            raise ControlNeXtError(f"The checkpoint's optimiser state does not fit this run: {error}") from None
        return False
    return True
