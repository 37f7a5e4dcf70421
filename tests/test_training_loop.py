"""Core tests of the training loop (controlnext_core.training_loop, plain torch): the steps it makes,
its hooks (Cancel, checkpoints, validation), and the same run over two processes started by
torchrun (gloo, CPU) against one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import controlnext_core as cn
from controlnext_core import checkpoints, train
from controlnext_core.processes import Processes
from controlnext_core.training_loop import LoopHooks, run_training
from distributed_toy_run import CheckpointHooks, ToySource, toy_run, trained_state
from test_train import ToyDenoiser, shapes_dataset

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_toy_run.py")


def test_the_loop_makes_the_trainers_steps():
    latents, controls = shapes_dataset(count=10)
    toy = ToyDenoiser()
    by_hand = train.Trainer(train.new_encoder(0), toy.unet_weights(), toy_settings(5, 3))
    toy.trainer = by_hand
    for _ in range(5):
        indices = by_hand.batch_indices(len(latents))
        by_hand.empty_prompt_mask(len(indices))
        by_hand.step(toy, train.TrainingBatch(latents[indices], controls[indices], torch.zeros(1)))
    looped, message = toy_run(5, 3, Processes())
    assert message == "Trained 5 steps." and looped.losses == by_hand.losses
    expected = trained_state(by_hand)
    assert all(torch.equal(value, expected[name]) for name, value in trained_state(looped).items())


def toy_settings(steps: int, batch_size: int) -> train.TrainingSettings:
    return train.TrainingSettings(family="sdxl", steps=steps, batch_size=batch_size, optimizer="adamw",
                                  encoder_lr=1e-3, unet_lr=1e-3, warmup_steps=2, proportion_empty_prompts=0.0)


class Recorder(CheckpointHooks):
    """Checkpoints and validation rounds as they happen; KeyboardInterrupt stands for the host's Cancel."""

    cancel_errors = (KeyboardInterrupt,)

    def __init__(self, root: str, every: int, validation_every: int, stop_at: int | None = None):
        super().__init__(root, every, stop_at)
        self.validation_every, self.rounds, self.written = validation_every, [], []

    def checkpoint(self, trainer):
        self.written.append(trainer.steps_done)
        return super().checkpoint(trainer)

    def validate(self, trainer):
        self.rounds.append(trainer.steps_done)


def test_checkpoints_and_validation_rounds_come_when_due_and_at_the_end(tmp_path):
    hooks = Recorder(str(tmp_path), every=4, validation_every=3)
    trainer, message = toy_run(10, 2, Processes(), hooks)
    assert hooks.written == [4, 8, 10] and hooks.rounds == [0, 3, 6, 9, 10]
    assert message == f"Trained 10 steps. Checkpoint: {tmp_path / 'step-10'}."


def test_a_stop_between_steps_keeps_the_steps_done_and_writes_a_checkpoint_there(tmp_path):
    hooks = Recorder(str(tmp_path), every=4, validation_every=0, stop_at=6)
    trainer, message = toy_run(10, 2, Processes(), hooks)
    assert trainer.steps_done == 6 and hooks.written == [4, 6]
    assert message.startswith("Cancelled after 6 of 10 steps")


def test_a_cancel_raised_inside_a_step_rewinds_its_draws_and_the_checkpoint_resumes_exactly(tmp_path):
    latents, controls = shapes_dataset(count=10)
    straight, _ = toy_run(8, 3, Processes())

    class CancelInStep(ToyDenoiser):
        def __call__(self, *args):
            if self.trainer.steps_done == 5:
                raise KeyboardInterrupt("Cancel")
            return super().__call__(*args)

    toy = CancelInStep()
    trainer = train.Trainer(train.new_encoder(0), toy.unet_weights(), toy_settings(8, 3))
    toy.trainer = trainer
    hooks = Recorder(str(tmp_path), every=100, validation_every=0)
    message = run_training(trainer, toy, ToySource(latents, controls), hooks)
    assert trainer.steps_done == 5 and message.startswith("Cancelled after 5 of 8 steps")
    assert all(param.grad is None for param in trainer.trainable_parameters())
    resumed, _ = toy_run(8, 3, Processes(), resume_from=str(tmp_path / "step-5"))
    assert resumed.losses == straight.losses
    expected = trained_state(straight)
    assert all(torch.equal(value, expected[name]) for name, value in trained_state(resumed).items())


def test_a_run_that_diverges_after_its_first_step_ends_with_the_last_good_one():
    latents, controls = shapes_dataset(count=10)

    class Diverging(ToyDenoiser):
        def __call__(self, *args):
            result = super().__call__(*args)
            return result * float("nan") if self.trainer.steps_done == 3 else result

    toy = Diverging()
    trainer = train.Trainer(train.new_encoder(0), toy.unet_weights(), toy_settings(8, 2))
    toy.trainer = trainer
    message = run_training(trainer, toy, ToySource(latents, controls), LoopHooks())
    assert trainer.steps_done == 3 and "became nan at step 4" in message


def torchrun(out, *args: str) -> dict:
    """The worker over two processes, as a user launches a distributed run."""
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             WORKER, "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "run.json")) as file:
        run = json.load(file)
    return {**run, "weights": safetensors.torch.load_file(os.path.join(out, "weights.safetensors"))}


def close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], relative: float) -> bool:
    return all((actual[name] - value).norm() <= relative * value.norm() for name, value in expected.items())


@pytest.mark.slow
def test_two_processes_make_the_steps_of_one_process_with_their_whole_batch(tmp_path):
    """2 processes x batch 2 against 1 process x batch 4 (and 2 processes x 2 micro-batches of 1):
    the same draws, the gradients summed over the processes. fp32 sums in another order: losses to
    1e-6, weights after 6 steps to 1e-5 of their size (as gradient accumulation)."""
    single, _ = toy_run(6, 4, Processes())
    expected = trained_state(single)
    for name, args in (("batch", ["--batch-size", "2"]), ("accumulated", ["--batch-size", "1", "--accumulation", "2"])):
        run = torchrun(tmp_path / name, "--steps", "6", "--shared-file", str(tmp_path / f"{name}.cache"), *args)
        assert (tmp_path / f"{name}.cache").read_text() == "made by rank 0"  # the others waited for the writer
        assert run["processes"] == 2 and run["steps_done"] == 6
        assert run["losses"] == pytest.approx(single.losses, rel=1e-6)
        assert close(run["weights"], expected, 1e-5), name
    assert not torch.equal(expected["unet." + ToyDenoiser.WEIGHT], ToyDenoiser().to_out.weight)  # it trained


@pytest.mark.slow
def test_a_stop_in_one_process_stops_both_and_the_checkpoint_resumes_the_two_process_run_exactly(tmp_path):
    straight = torchrun(tmp_path / "straight", "--steps", "8", "--batch-size", "2")
    root = tmp_path / "checkpoints"
    stopped = torchrun(tmp_path / "stopped", "--steps", "8", "--batch-size", "2", "--checkpoints", str(root),
                       "--every", "2", "--stop-at", "5", "--stopping-rank", "1")
    assert stopped["steps_done"] == 5 and stopped["message"].startswith("Cancelled after 5 of 8 steps")
    assert sorted(os.listdir(root)) == ["step-2", "step-4", "step-5"]  # one writer: no clash, no temporary left
    resumed = torchrun(tmp_path / "resumed", "--steps", "8", "--batch-size", "2", "--resume", str(root / "step-5"))
    assert resumed["losses"] == straight["losses"]
    assert all(torch.equal(value, straight["weights"][name]) for name, value in resumed["weights"].items())
    with pytest.raises(cn.ControlNeXtError, match=r"global batch .*: 4 \(2 x 1 x 2\) in the checkpoint, 2 \(2 x 1 x 1\)"):
        toy_run(8, 2, Processes(), resume_from=str(root / "step-5"))
    # one process with the whole global batch continues the same run (fp32 sums in another order)
    alone, message = toy_run(8, 4, Processes(), resume_from=str(root / "step-5"))
    assert "global batch split anew: 4 (4 x 1 x 1)" in message
    assert alone.losses == pytest.approx(straight["losses"], rel=1e-6)
    assert close(trained_state(alone), straight["weights"], 1e-5)
