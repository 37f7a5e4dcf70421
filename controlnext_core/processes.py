"""The processes one training run is spread over: one by default, or those a launcher started
(torchrun, ``accelerate launch``) and ``torch.distributed`` joined. Every process draws the same
global batch (same seed, same generators) and computes its own share; gradients and losses are
summed over the processes, so N processes make the step one process makes with the whole batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    count: int = 1

    @classmethod
    def joined(cls) -> "Processes":
        """The processes of the torch.distributed group this process is in; one where there is none."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()

    @property
    def writes(self) -> bool:
        """Whether this process writes files (checkpoints, releases, samples): the first one only."""
        return self.rank == 0

    @contextlib.contextmanager
    def writer_first(self) -> Iterator[None]:
        """The writing process runs the body first (say, building a cache all of them read), the
        others after it has finished."""
        if self.count > 1 and not self.writes:
            torch.distributed.barrier()
        yield
        if self.count > 1 and self.writes:
            torch.distributed.barrier()

    def share(self, values: Sequence) -> list:
        """This process's contiguous part of a global batch whose size is a multiple of ``count``."""
        size = len(values) // self.count
        return list(values[self.rank * size:(self.rank + 1) * size])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place."""
        if self.count > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Each gradient summed over the processes (a parameter that got none counts as zeros, so
        every process makes the same collective calls)."""
        if self.count == 1:
            return
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            self.sum(parameter.grad)

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether ``flag`` is true in any process: a stop every process agrees on."""
        if self.count == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())
