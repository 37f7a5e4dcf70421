"""Exit codes of the queue command and the one error type that carries them."""
from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    """Each failure a script may want to tell apart has its own code."""

    OK = 0
    USAGE = 2  # bad arguments, unreadable workflow file, --set/--image naming nothing
    UNREACHABLE = 3  # no ComfyUI answers at --server
    INVALID_PROMPT = 4  # the server refused the workflow (400, node_errors)
    UNKNOWN_NODE = 5  # a node type the server does not have (missing custom node pack)
    MISSING_MODEL = 6  # a model file the workflow names is not installed on the server
    EXECUTION_ERROR = 7  # a node failed while running
    INTERRUPTED = 8  # the prompt was interrupted (Cancel in the editor, POST /interrupt)
    CONNECTION_LOST = 9  # the server went away while the prompt ran
    TIMEOUT = 10  # --timeout passed before the prompt finished
    BATCH_INCOMPLETE = 11  # batch: some jobs failed (the summary and the manifest say which and why)
    CTRL_C = 130  # stopped by Ctrl-C (SIGINT): 128 + 2, the code a shell gives a command that signal ends


class QueueError(Exception):
    def __init__(self, code: Exit, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
