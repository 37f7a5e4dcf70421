"""One process of a toy SVD-v2 training run (test_core_video_train.py's toy video denoiser, clip
folders and stand-in encoders) through the core loop, as torchrun starts it:
``python -m torch.distributed.run --standalone --nproc_per_node 2 this.py ...``. Joins the gloo group
where torchrun set one up; the writing process saves the trained weights and losses to --out. Used by
test_core_video_train.py against the same run in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import safetensors.torch
import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from controlnext_core import train, video_dataset  # noqa: E402
from controlnext_core import video_train as vt  # noqa: E402
from controlnext_core.processes import Processes  # noqa: E402
from controlnext_core.training_loop import run_training  # noqa: E402
from test_core_video_train import ToyVideoDenoiser, toy_image_embedding, toy_reference_latents  # noqa: E402


def video_run(clips_root: str, steps: int, batch_size: int, accumulation: int, processes: Processes) -> vt.VideoTrainer:
    source = vt.ClipSource(video_dataset.read_clip_folders(clips_root),
                           vt.ClipSampling(frames=3, interval=2, width=64, height=64), toy_reference_latents,
                           toy_image_embedding)
    toy = ToyVideoDenoiser()
    settings = train.TrainingSettings(family="svd", steps=steps, batch_size=batch_size, encoder_lr=1e-3, unet_lr=1e-3,
                                      gradient_accumulation_steps=accumulation)
    trainer = vt.VideoTrainer(train.new_encoder(0), toy.unet_weights(), settings, toy_reference_latents,
                              processes=processes)
    toy.trainer = trainer
    run_training(trainer, toy, source)
    return trainer


def trained_state(trainer: train.Trainer) -> dict[str, torch.Tensor]:
    return {**{f"encoder.{n}": p.detach().clone() for n, p in trainer.encoder.named_parameters()},
            **{f"unet.{n}": p.detach().clone() for n, p in trainer.unet_parameters.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
    processes = Processes.joined()
    trainer = video_run(args.clips, args.steps, args.batch_size, 1, processes)
    if processes.writes:
        safetensors.torch.save_file(trained_state(trainer), os.path.join(args.out, "weights.safetensors"))
        with open(os.path.join(args.out, "run.json"), "w") as file:
            json.dump({"losses": trainer.losses, "steps_done": trainer.steps_done, "processes": processes.count}, file)
    if processes.count > 1:
        processes.leave()


if __name__ == "__main__":
    main()
