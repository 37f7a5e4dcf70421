"""One process of a toy training run (test_train.py's ToyDenoiser and shapes) through the core loop,
as torchrun starts it: ``python -m torch.distributed.run --standalone --nproc_per_node 2 this.py ...``.
Joins the gloo group where torchrun set one up; the writing process saves the trained weights and
losses to --out. Used by test_training_loop.py against the same run in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import safetensors.torch
import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from controlnext_core import checkpoints, train  # noqa: E402
from controlnext_core.processes import Processes  # noqa: E402
from controlnext_core.training_loop import LoopHooks, run_training  # noqa: E402
from test_train import ToyDenoiser, shapes_dataset  # noqa: E402


class ToySource:
    def __init__(self, latents: torch.Tensor, controls: torch.Tensor):
        self.latents, self.controls, self.count = latents, controls, len(latents)

    def batch(self, indices, empty, empty_flags):
        return train.TrainingBatch(self.latents[indices], self.controls[indices], torch.zeros(1))


class CheckpointHooks(LoopHooks):
    """Checkpoints every ``every`` steps into ``root``; a stop asked by one process at ``stop_at``."""

    def __init__(self, root: str, every: int, stop_at: int | None = None, stopping_rank: int = 0, rank: int = 0):
        self.root, self.checkpoint_every = root, every
        self.stop_at, self.stops_here = stop_at, rank == stopping_rank

    def cancel_requested(self, steps_done: int, steps: int) -> bool:
        return self.stops_here and steps_done == self.stop_at

    def checkpoint(self, trainer: train.Trainer) -> str:
        return checkpoints.save_checkpoint(self.root, trainer, {"data": "shapes"})


def settings(steps: int, batch_size: int, accumulation: int = 1) -> train.TrainingSettings:
    return train.TrainingSettings(family="sdxl", steps=steps, batch_size=batch_size,
                                  gradient_accumulation_steps=accumulation, optimizer="adamw", encoder_lr=1e-3,
                                  unet_lr=1e-3, warmup_steps=2, proportion_empty_prompts=0.0)


def toy_run(steps: int, batch_size: int, processes: Processes, hooks: LoopHooks | None = None,
            accumulation: int = 1, resume_from: str = "") -> tuple[train.Trainer, str]:
    latents, controls = shapes_dataset(count=10)
    toy = ToyDenoiser()
    trainer = train.Trainer(train.new_encoder(0), toy.unet_weights(), settings(steps, batch_size, accumulation),
                            processes=processes)
    toy.trainer = trainer
    started = checkpoints.resume(resume_from, trainer, {"data": "shapes"}) if resume_from else ""
    message = run_training(trainer, toy, ToySource(latents, controls), hooks)
    return trainer, " ".join(part for part in (started, message) if part)


def trained_state(trainer: train.Trainer) -> dict[str, torch.Tensor]:
    return {**{f"encoder.{n}": p.detach().clone() for n, p in trainer.encoder.named_parameters()},
            **{f"unet.{n}": p.detach().clone() for n, p in trainer.unet_parameters.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--checkpoints", default="")
    parser.add_argument("--every", type=int, default=0)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--stopping-rank", type=int, default=0)
    parser.add_argument("--resume", default="")
    parser.add_argument("--shared-file", default="", help="made by the first process to reach it (writer_first)")
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
    processes = Processes.joined()
    if args.shared_file:
        with processes.writer_first(60.0, "the shared file"):
            if not os.path.exists(args.shared_file):
                with open(args.shared_file, "w") as file:
                    file.write(f"made by rank {processes.rank}")
    hooks = CheckpointHooks(args.checkpoints, args.every, args.stop_at, args.stopping_rank, processes.rank)
    trainer, message = toy_run(args.steps, args.batch_size, processes, hooks, args.accumulation, args.resume)
    if processes.writes:
        safetensors.torch.save_file(trained_state(trainer), os.path.join(args.out, "weights.safetensors"))
        with open(os.path.join(args.out, "run.json"), "w") as file:
            json.dump({"losses": trainer.losses, "steps_done": trainer.steps_done, "message": message,
                       "processes": processes.count}, file)
    if processes.count > 1:
        processes.leave()


if __name__ == "__main__":
    main()
