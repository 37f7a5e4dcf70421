"""The unit controls a ControlNeXt patch keeps between UNet calls (README, "Apply ControlNeXt"):
what lets cond and uncond share one encoder run, and the opt-in refresh mode reuse one per block
of steps. None of it changes a result.
"""
from __future__ import annotations

import weakref

import torch

from .schedule import step_of


class EncodingCache:
    """``last``: (sigmas, inputs, unit control) of the last encoding, so the next call at the same
    noise levels and inputs (the other CFG half, called apart) reuses it. ``held``: refresh mode's
    unit controls of the current block of steps, keyed by (block, inputs), whatever the sigmas.
    ``inputs`` is everything else the unit control depends on (sizes, rows, frames, device, dtype).
    """

    def __init__(self):
        self.last: tuple[tuple[float, ...], tuple, torch.Tensor] | None = None
        self.held: dict[tuple, torch.Tensor] = {}
        self._run: tuple | None = None  # (weakref to the run's sigmas tensor, its values)

    def find(self, sigmas: tuple[float, ...], inputs: tuple, block: tuple | None) -> torch.Tensor | None:
        """The cached unit control for these ``sigmas`` and ``inputs`` (or this refresh ``block``), or None."""
        if block is not None:
            held = self.held.get((block, inputs))
            if held is not None:
                return held
            self.held = {key: unit for key, unit in self.held.items() if key[0] == block}  # a new block
        if self.last is not None and self.last[:2] == (sigmas, inputs):
            return self.last[2]
        return None

    def store(self, sigmas: tuple[float, ...], inputs: tuple, block: tuple | None, unit: torch.Tensor) -> None:
        self.last = (sigmas, inputs, unit)
        if block is not None:
            self.held[(block, inputs)] = unit

    def clear(self) -> None:
        """Lets go of every cached tensor (the model moved: none may stay on a device it left)."""
        self.last = None
        self.held = {}

    def run_sigmas(self, sample_sigmas: torch.Tensor) -> tuple[float, ...]:
        """A sampling run's sigmas as floats: one device read per run."""
        if self._run is None or self._run[0]() is not sample_sigmas:
            self._run = (weakref.ref(sample_sigmas), tuple(sample_sigmas.detach().float().cpu().tolist()))
        return self._run[1]


def refresh_block(run_sigmas: tuple[float, ...], sigma: float, refresh_every: int) -> tuple:
    """Refresh mode's block of ``refresh_every`` steps that a call at ``sigma`` falls in: (the run's
    sigmas, the block's index). A step is the interval between two sigmas of the run, so evaluations
    inside a step (heun, dpm_2) count with it; steps 0, k, 2k... start a block."""
    return run_sigmas, step_of(sigma, run_sigmas)[0] // refresh_every
