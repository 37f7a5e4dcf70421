"""Progress on the terminal: one bar per node, from ComfyUI's websocket messages."""
from __future__ import annotations

import sys

from .workflow import nodes_to_run

BAR_WIDTH = 24


class ProgressDisplay:
    """Redraws the current node's bar in place on a terminal; on a pipe or file, writes a line
    when a node starts, at its first step and at each quarter of its bar, so logs stay short.

    The counter ``[done/total]`` counts the nodes of this run (``workflow.nodes_to_run``); those
    the server serves from its cache count as done when ``execution_cached`` lists them, since
    they never get an ``executing`` message, so the last node to run shows ``[total/total]``."""

    def __init__(self, prompt: dict, object_info: dict, stream=None):
        self.prompt = prompt
        self.object_info = object_info
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.current: str | None = None
        self.to_run = nodes_to_run(prompt, object_info)
        self.done: set[str] = set()
        self._open_line = False
        self._last_quarter = -1

    def name(self, node_id: str) -> str:
        node = self.prompt.get(node_id, {})
        return f"{node.get('_meta', {}).get('title') or node.get('class_type', '?')} ({node_id})"

    def counter(self) -> str:
        return f"[{len(self.done)}/{len(self.to_run)}]"

    def cached(self, node_ids: list[str]) -> None:
        """The server's cache serves these; the run then needs none of their own inputs."""
        self.to_run = nodes_to_run(self.prompt, self.object_info, frozenset(node_ids))
        served = [node_id for node_id in node_ids if node_id in self.to_run]
        self.done.update(served)
        if served:
            self._line(f"{self.counter()} cached: {', '.join(self.name(n) for n in served)}")

    def executing(self, node_id: str | None) -> None:
        if node_id == self.current:
            return
        self._finish_line()
        self.current = node_id
        self._last_quarter = -1
        if node_id is not None:
            self.to_run.add(node_id)  # a node behind a lazy input, asked for while running
            self.done.add(node_id)
            self._line(f"{self.counter()} {self.name(node_id)}")

    def progress(self, node_id: str | None, value: int, maximum: int) -> None:
        if node_id is not None and node_id != self.current:
            self.executing(node_id)
        maximum = max(int(maximum), 1)
        value = min(int(value), maximum)
        filled = round(BAR_WIDTH * value / maximum)
        text = f"    [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {value}/{maximum}"
        if self.interactive:
            self.stream.write("\r" + text)
            self.stream.flush()
            self._open_line = True
        elif value * 4 // maximum != self._last_quarter:  # quarters only, to keep logs short
            self._last_quarter = value * 4 // maximum
            self._line(text)

    def _line(self, text: str) -> None:
        self._finish_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _finish_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False

    def close(self) -> None:
        self._finish_line()


def duration(seconds: float) -> str:
    """``42s``, ``5m20s``, ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def batch_line(total: int, done: int, failed: int, running: int, ended_here: int, elapsed: float) -> str:
    """The batch's progress line. ``done`` counts the jobs skipped as done by an earlier run;
    throughput and ETA come from the ``ended_here`` jobs that ended in this run."""
    ended = done + failed
    filled = round(BAR_WIDTH * ended / max(total, 1))
    line = (f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {ended}/{total} jobs: {done} done, {failed} failed, "
            f"{running} running")
    if ended_here and elapsed > 0:
        per_minute = ended_here / elapsed * 60
        line += f" | {per_minute:.1f} jobs/min | ETA {duration((total - ended) / per_minute * 60)}"
    return line


class BatchProgress:
    """One line for a whole batch (``batch_line``). On a terminal it is redrawn in place and notes
    print above it; on a pipe or file it is written when jobs have ended since the last one, at
    most every ``LOG_SECONDS``, and at the end, so logs stay short."""

    LOG_SECONDS = 10.0

    def __init__(self, total: int, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.line = ""
        self._written_ended = -1
        self._written_at = float("-inf")

    def update(self, done: int, failed: int, running: int, ended_here: int, elapsed: float, final: bool = False):
        self.line = batch_line(self.total, done, failed, running, ended_here, elapsed)
        if self.interactive:
            self.stream.write("\r\x1b[K" + self.line + ("\n" if final else ""))
        elif final or (done + failed != self._written_ended and elapsed - self._written_at >= self.LOG_SECONDS):
            self._written_ended, self._written_at = done + failed, elapsed
            self.stream.write(self.line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own (per-job lines, servers set aside), above the progress line."""
        if self.interactive:
            self.stream.write("\r\x1b[K" + text + "\n" + self.line)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
