"""Train ControlNeXt on several GPUs from the editor: the headless command (controlnext_train) started
as a subprocess under torchrun, followed (progress bar, loss, the validation strip) and stopped by
Cancel with a checkpoint written, as a terminal user's Ctrl-C does. The single-process node, Train
ControlNeXt, stays the simple path; this one trains what a graph cannot hold in one process.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import torch

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError
from ..controlnext_core.checkpoints import latest_checkpoint
from ..controlnext_core.model import load_encoder_file
from .loaders import ControlNeXtType
from .patch import ControlNeXtFile
from .train import (CHECKPOINTS_KEPT, OFFICIAL, OPTIMIZERS, PRECISIONS, RESUME_CHOICES, TRAIN_CATEGORY, LossMapType,
                    _progress_text, cancelled, release_folder, release_for_run_problem)
from .train_data import TrainingDataType

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_ROOT = os.path.dirname(os.path.abspath(folder_paths.__file__))  # folder_paths.py sits beside main.py
LOG_FILE = "train.log"
STOP_WAIT_S = 600  # after Cancel: the step in progress and the checkpoint, then the processes are killed
PRECISION_FLAGS = {"auto": "auto", "fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class TrainControlNeXtProcesses(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtTrainProcesses",
            display_name="Train ControlNeXt (several GPUs)",
            category=TRAIN_CATEGORY,
            description="Trains a ControlNeXt from a checkpoint file and a training folder on several GPUs: starts the "
                        "headless command (python -m controlnext_train) under torchrun, one process per GPU, and "
                        "shows its progress and loss. Cancel stops it after the step in progress with a checkpoint; "
                        "the release in models/controlnext/<name> then holds the weights trained.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="The SD1.5 or SDXL checkpoint to train for (models/checkpoints); each process "
                                       "loads it."),
                TrainingDataType.Input("data", tooltip="The folder from Load Training Data (read again, the same way, "
                                                       "by every process; its cache is built once)."),
                io.String.Input("name", default="my_controlnext",
                                tooltip="The release folder under models/controlnext: controlnet.safetensors, "
                                        "unet.safetensors, checkpoints/ and the run's log (train.log)."),
                io.Int.Input("processes", default=max(1, gpu_count()), min=1, max=64,
                             tooltip="Training processes, one per GPU. The global batch is batch_size x "
                                     "gradient_accumulation_steps x processes. Without GPUs they train on the CPU."),
                io.String.Input("gpus", default="",
                                tooltip="Which GPUs, e.g. 0,1,2,3 (as CUDA_VISIBLE_DEVICES); empty: the first "
                                        "'processes' GPUs."),
                io.Int.Input("steps", default=2000, min=1, max=1000000, tooltip="Optimiser steps."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Pictures per process per micro-batch."),
                io.Int.Input("gradient_accumulation_steps", default=1, min=1, max=1024,
                             tooltip="Micro-batches per optimiser step."),
                io.Combo.Input("optimizer", options=[OFFICIAL, *OPTIMIZERS], default=OFFICIAL,
                               tooltip="official: the family's whole official recipe, whatever the learning rates "
                                       "and warm-up say here; adamw / adafactor: with the values set here."),
                io.Float.Input("encoder_lr", default=1e-4, min=0.0, max=1.0, step=1e-6,
                               tooltip="The encoder's learning rate (not used with official)."),
                io.Float.Input("unet_lr", default=1e-5, min=0.0, max=1.0, step=1e-7,
                               tooltip="The trained UNet weights' learning rate (not used with official)."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                             tooltip="Linear warm-up steps (not used with official)."),
                io.Combo.Input("train_unet", options=["official subset", "none"], default="official subset",
                               tooltip="official subset: the UNet weights the official scripts train; none: the "
                                       "encoder only."),
                io.Float.Input("control_scale", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="The control scale trained at and saved in the file (official SD1.5 "
                                       "examples: 0.35)."),
                io.Float.Input("proportion_empty_prompts", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of pictures trained with an empty prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the encoder, the noise, the timesteps and the data order."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Less memory for a little more time."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="Compute precision (trained weights stay fp32); auto: the model's own."),
                io.Int.Input("checkpoint_every", default=500, min=1, max=100000,
                             tooltip=f"Steps between checkpoints (the last {CHECKPOINTS_KEPT} kept; also on Cancel "
                                     f"and at the end)."),
                io.Combo.Input("resume", options=list(RESUME_CHOICES[:2]), default=RESUME_CHOICES[0],
                               tooltip="latest: continue the newest checkpoint of name exactly; no: a new run "
                                       "(refused where name already has checkpoints)."),
                io.Image.Input("validation_images", optional=True,
                               tooltip="Control images sampled every validation_every steps by the first process "
                                       "(saved under output/controlnext_validation/<name>, shown at the end)."),
                io.String.Input("validation_prompt", default="", multiline=True, optional=True,
                                tooltip="The validation prompt."),
                io.Int.Input("validation_every", default=500, min=1, max=100000, optional=True,
                             tooltip="Steps between validation samples."),
            ],
            outputs=[
                ControlNeXtType.Output(display_name="CONTROLNEXT", tooltip="The trained release's encoder."),
                LossMapType.Output(display_name="loss", tooltip="The loss of every step (Plot Loss Graph)."),
                io.String.Output(display_name="folder", tooltip="The release folder."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name: str = "", resume: str = RESUME_CHOICES[0]) -> bool | str:
        return release_for_run_problem(name, resume, "name") or True

    @classmethod
    def execute(cls, ckpt_name: str, data, name: str, processes: int, gpus: str, steps: int, batch_size: int,
                gradient_accumulation_steps: int, optimizer: str, encoder_lr: float, unet_lr: float,
                warmup_steps: int, train_unet: str, control_scale: float, proportion_empty_prompts: float, seed: int,
                gradient_checkpointing: bool, precision: str, checkpoint_every: int, resume: str,
                validation_images=None, validation_prompt: str = "", validation_every: int = 500) -> io.NodeOutput:
        folder = release_folder(name)
        checkpoint = folder_paths.get_full_path("checkpoints", ckpt_name)
        if checkpoint is None:
            raise ControlNeXtError(f"'{ckpt_name}' is not in models/checkpoints: pick a checkpoint from the list.")
        validation_folder = os.path.join(folder_paths.get_output_directory(), "controlnext_validation",
                                         name.strip().strip("/\\"))
        args = ["--pretrained_model_name_or_path", checkpoint, "--train_data_dir", data.root, "--resolution",
                str(data.resolution), "--output_dir", folder, "--max_train_steps", str(steps), "--train_batch_size",
                str(batch_size), "--gradient_accumulation_steps", str(gradient_accumulation_steps), "--optimizer",
                optimizer, "--learning_rate", repr(unet_lr), "--learning_rate_controlnet", repr(encoder_lr),
                "--lr_warmup_steps", str(warmup_steps), "--train_unet",
                "none" if train_unet == "none" else "official", "--controlnext_scale", repr(control_scale),
                "--proportion_empty_prompts", repr(proportion_empty_prompts), "--seed", str(seed),
                "--mixed_precision", PRECISION_FLAGS[precision], "--checkpointing_steps", str(checkpoint_every),
                "--checkpoints_total_limit", str(CHECKPOINTS_KEPT), "--validation_dir", validation_folder,
                "--progress_lines"]
        args += [item for option, value in data.reading for item in (f"--{option}", value)]
        if gradient_checkpointing:
            args.append("--gradient_checkpointing")
        if resume == RESUME_CHOICES[1]:
            args += ["--resume_from_checkpoint", "latest"]
        if validation_images is not None:
            args += ["--validation_image", *save_controls(validation_images, os.path.join(folder, "validation_controls")),
                     "--validation_prompt", validation_prompt, "--validation_steps", str(validation_every)]
        run = CommandRun(folder, processes, gpus, getattr(cls.hidden, "unique_id", None), steps)
        message = run.follow(args)
        encoder, metadata = load_encoder_file(os.path.join(folder, "controlnet.safetensors"))
        trained = ControlNeXtFile(f"{name.strip()} ({run.last_step} steps)", encoder, metadata)
        ui = {"controlnext_info": [message]}
        strip = os.path.join(validation_folder, "strip.png")
        if validation_images is not None and os.path.isfile(strip):
            ui["images"] = [{"filename": "strip.png", "type": "output",
                             "subfolder": os.path.relpath(validation_folder, folder_paths.get_output_directory())}]
        return io.NodeOutput(trained, {"loss": run.losses()}, folder, ui=ui)


def save_controls(images: torch.Tensor, folder: str) -> list[str]:
    """The validation control images as PNG files the command reads."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = os.path.join(folder, f"{index:03d}.png")
        Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")).save(path)
        paths.append(path)
    return paths


class CommandRun:
    """One run of the command: started, its step lines read into the progress bar, stopped on Cancel."""

    def __init__(self, folder: str, processes: int, gpus: str, node_id, steps: int):
        self.folder, self.processes, self.gpus, self.node_id, self.steps = folder, processes, gpus.strip(), node_id, steps
        self.log_path = os.path.join(folder, LOG_FILE)
        self.last_step = 0

    def launcher(self) -> list[str]:
        if self.processes == 1:
            return [sys.executable]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.processes)]

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "COMFYUI_PATH": COMFYUI_ROOT, "PYTHONUNBUFFERED": "1"}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        return env

    def follow(self, args: list[str]) -> str:
        """Runs the command to its end (or Cancel's stop); returns its summary, or raises its error."""
        comfy.model_management.unload_all_models()  # the GPUs' memory to the training processes
        comfy.model_management.soft_empty_cache()
        os.makedirs(self.folder, exist_ok=True)
        progress = comfy.utils.ProgressBar(self.steps, node_id=self.node_id)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(self.launcher())} -m controlnext_train "
                      f"{' '.join(args)}\n")
            log.flush()
            process = subprocess.Popen([*self.launcher(), "-m", "controlnext_train", *args], cwd=PACK_ROOT,
                                       env=self.environment(), stdout=subprocess.PIPE, stderr=log, text=True,
                                       start_new_session=True)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
            stop_sent = None
            while process.poll() is None or not lines.empty():
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    line = None
                if line and line.startswith("step "):
                    self._stepped(line)
                if stop_sent is None and process.poll() is None and cancelled(progress, self.last_step, self.steps):
                    process.send_signal(signal.SIGINT)  # torchrun passes it on: a step, a checkpoint, the end
                    stop_sent = time.monotonic()
                    _progress_text("Cancel: stopping after this step with a checkpoint...", self.node_id)
                if stop_sent is not None and time.monotonic() - stop_sent > STOP_WAIT_S and process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
        return self._outcome(process.wait(), stop_sent is not None)

    def _stepped(self, line: str) -> None:
        parts = line.split()
        self.last_step = int(parts[1].split("/")[0])
        _progress_text(f"step {parts[1]}  loss {parts[3]}", self.node_id)

    def _outcome(self, code: int, stopped: bool) -> str:
        """The run's summary line; its error where it failed (after a Cancel torchrun itself exits
        non-zero: the processes' own summary says whether they stopped whole)."""
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            lines = file.read().split("\n=== ")[-1].splitlines()
        summaries = [line.split("ControlNeXt training: ", 1)[1] for line in lines
                     if "ControlNeXt training: " in line and ("Trained " in line or "Cancelled " in line)]
        finished = (code == 0 or (stopped and summaries)) and os.path.isfile(
            os.path.join(self.folder, "controlnet.safetensors"))
        if not finished:
            errors = [line.split("error: ", 1)[1] for line in lines if "controlnext-train: error: " in line]
            detail = errors[0] if errors else "\n".join(lines[-15:])
            raise ControlNeXtError(f"The training processes ended with exit code {code}: {detail} (the whole log: "
                                   f"{self.log_path})")
        return (summaries[-1] if summaries else "Trained.") + f" Log: {self.log_path}."

    def losses(self) -> list[float]:
        latest = latest_checkpoint(os.path.join(self.folder, "checkpoints"))
        if latest is None:
            return []
        with open(os.path.join(latest, "state.json"), encoding="utf-8") as file:
            return [float(loss) for loss in json.load(file)["losses"]]


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.strip())


TRAIN_LAUNCH_NODES = [TrainControlNeXtProcesses]
