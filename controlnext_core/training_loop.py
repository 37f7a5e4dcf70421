"""The training loop, once: Train ControlNeXt in ComfyUI, a headless run and several processes all
drive it, each adding what it has through ``LoopHooks`` (a progress bar and Cancel, checkpoints,
validation samples). Cancel and divergence end a run with the last whole step kept: the draws of a
step stopped half-way are rewound, so the checkpoint written then resumes exactly.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .train import Trainer, TrainingDiverged, TrainingSource

log = logging.getLogger("ControlNeXt")
LOG_LINES, LOG_SECONDS = 20, 60.0  # a loss line in the log 20 times a run, and at least once a minute


class LoopHooks:
    """What a host adds to the loop; each default does nothing. Checkpoints and validation samples
    are only asked of the process that writes files."""

    cancel_errors: tuple[type[BaseException], ...] = ()  # raised inside a step or a sample: a Cancel
    checkpoint_every = 0  # steps; 0: no checkpoints
    validation_every = 0  # steps; 0: no validation samples

    def cancel_requested(self, steps_done: int, steps: int) -> bool:
        """Called before each step (and once at the end) with the progress; True stops the run."""
        return False

    def stepped(self, trainer: Trainer, loss: float) -> None:
        """After each step."""

    def checkpoint(self, trainer: Trainer) -> str:
        """Writes a checkpoint of ``trainer``; returns its folder."""
        raise NotImplementedError

    def validate(self, trainer: Trainer) -> None:
        """Samples with the weights of the moment."""
        raise NotImplementedError


def run_training(trainer: Trainer, denoiser, source: TrainingSource, hooks: LoopHooks | None = None,
                 empty: Any = None, autocast_dtype: torch.dtype | None = None,
                 scaler: "torch.amp.GradScaler | None" = None) -> str:
    """Trains up to ``trainer.settings.steps``; returns how the run ended, in words (with the
    checkpoint written last)."""
    hooks = hooks or LoopHooks()
    steps, processes = trainer.settings.steps, trainer.processes
    writes = processes.writes
    cancel_text = "Cancelled after {} of {} steps; kept what was trained."
    log_every, next_log = max(1, steps // LOG_LINES), time.monotonic() + LOG_SECONDS
    written, validated, stop = "", None, None

    def validate() -> str | None:
        """A validation round; a Cancel during its sampling ends the run as one between steps does."""
        nonlocal validated
        validated = trainer.steps_done
        if not writes:
            return None
        try:
            hooks.validate(trainer)
        except hooks.cancel_errors:
            return cancel_text.format(trainer.steps_done, steps)
        return None

    def stop_everywhere(reason: str | None) -> str | None:
        """A stop of one process stops all of them (the others would wait for it at the next sum)."""
        if processes.any(reason is not None, trainer.device) and reason is None:
            return cancel_text.format(trainer.steps_done, steps)
        return reason

    if hooks.validation_every and trainer.steps_done == 0:
        stop = stop_everywhere(validate())  # the untrained start, for comparison
    while trainer.steps_done < steps and not stop:
        if processes.any(hooks.cancel_requested(trainer.steps_done, steps), trainer.device):
            stop = cancel_text.format(trainer.steps_done, steps)
            break
        draws = trainer.draw_state()
        try:
            loss = trainer.step(denoiser, trainer.next_batches(source, empty), autocast_dtype, scaler)
        except hooks.cancel_errors:
            # a host may also check for a Cancel inside every layer (ComfyUI v0.33+): the step in progress
            # is dropped before the optimiser moved; the steps done are kept
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.rewind(draws)
            stop = cancel_text.format(trainer.steps_done, steps)
            break
        except TrainingDiverged as error:
            if trainer.steps_done == 0:
                raise
            trainer.rewind(draws)
            stop = str(error)
            break
        hooks.stepped(trainer, loss)
        if trainer.steps_done % log_every == 0 or trainer.steps_done == steps or time.monotonic() > next_log:
            log.info("ControlNeXt training: step %d/%d  loss %.4f", trainer.steps_done, steps, loss)
            next_log = time.monotonic() + LOG_SECONDS
        if writes and hooks.checkpoint_every and trainer.steps_done % hooks.checkpoint_every == 0:
            written = hooks.checkpoint(trainer)
        if hooks.validation_every and trainer.steps_done % hooks.validation_every == 0:
            stop = stop_everywhere(validate())
    if not stop:
        hooks.cancel_requested(steps, steps)  # the full progress; a Cancel now has nothing to stop
        if hooks.validation_every and validated != trainer.steps_done:
            stop = validate()  # the samples end with the weights trained
    message = stop or f"Trained {steps} steps."
    if stop:
        log.warning("ControlNeXt training: %s", message)
    if writes and hooks.checkpoint_every and trainer.steps_done and not written.endswith(f"step-{trainer.steps_done}"):
        written = hooks.checkpoint(trainer)  # Cancel, divergence or the last step
    if written:
        message += f" Checkpoint: {written}."
    return message

