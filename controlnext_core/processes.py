"""The processes one training run is spread over: one by default, or those a launcher started
(torchrun, ``accelerate launch``) and ``torch.distributed`` joined. Every process draws the same
global batch (same seed, same generators) and computes its own share; gradients and losses are
summed over the processes, so N processes make the step one process makes with the whole batch.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from .errors import ControlNeXtError

log = logging.getLogger("ControlNeXt")


class ProcessesStopped(ControlNeXtError):
    """A collective call failed: another process of the run ended (a crash, a kill) or did not answer
    within the timeout."""


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
    def writer_first(self, wait_s: float | None = None, what: str = "its work") -> Iterator[None]:
        """The writing process runs the body first (say, building a cache all of them read), the
        others after it has finished. They wait up to ``wait_s`` (default: the group's collective
        timeout) on a CPU group of their own, so a long build trips no GPU collective's timeout; a
        writer that fails or dies ends their wait at once."""
        if self.count == 1:
            yield
            return
        timeout = None if wait_s is None else datetime.timedelta(seconds=wait_s)
        group = torch.distributed.new_group(backend="gloo", timeout=timeout) if timeout else None
        if not self.writes:
            log.info("Process %d of %d: waiting for process 0 to build %s%s.", self.rank, self.count, what,
                     f" (at most {wait_s / 60:.0f} minutes)" if wait_s else "")
            self._barrier(group, wait_s, what)
        yield  # a writer that raises skips its barrier: its exit ends the others' wait with an error
        if self.writes:
            self._barrier(group, wait_s, what)

    def leave(self) -> None:
        """Leaves the group when every process is done: one that tears its connections down while
        another still uses them (the writer saving the last checkpoint) can abort gloo."""
        self._collective("the end of the run", torch.distributed.barrier)
        torch.distributed.destroy_process_group()

    def _barrier(self, group, wait_s: float | None, what: str) -> None:
        limit = "the collective timeout" if wait_s is None else f"{wait_s:.0f} s"
        self._collective(f"the wait for {what} (at most {limit})", torch.distributed.barrier, group=group)

    def _collective(self, what: str, call, *args, **kwargs) -> None:
        """``call`` (a torch.distributed collective), its failure said plainly: gloo and NCCL raise a
        RuntimeError from deep inside when another process is gone."""
        try:
            call(*args, **kwargs)
        except RuntimeError as error:
            detail = next((line.strip() for line in str(error).splitlines() if line.strip()), "no detail")
            raise ProcessesStopped(
                f"Process {self.rank} of {self.count}: {what} failed because another process of this run ended or "
                f"stopped answering ({type(error).__name__}: {detail[:300]}). See that process's own error.") from None

    def share(self, values: Sequence) -> list:
        """This process's contiguous part of a global batch whose size is a multiple of ``count``."""
        size = len(values) // self.count
        return list(values[self.rank * size:(self.rank + 1) * size])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place."""
        if self.count > 1:
            self._collective("a sum over the processes", torch.distributed.all_reduce, tensor,
                             op=torch.distributed.ReduceOp.SUM)
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
        self._collective("the check for a stop", torch.distributed.all_reduce, value,
                         op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())
