"""One prompt on one server, as the one-prompt command (cli.py) and the batch (batch.py) both use
it: queue it (``submit``; a refusal read as one line per problem), follow it to its history entry
(``wait``) and read that entry (``check_outcome``, ``output_files``)."""
from __future__ import annotations

import json
import socket
import sys
import threading
import time

from .client import ComfyClient
from .errors import Exit, QueueError
from .progress import ProgressDisplay
from .websocket import ConnectionClosed, WebSocket
from .workflow import describe, missing_model_message, names_a_model

HISTORY_POLL_SECONDS = 0.5
IDLE_CHECK_SECONDS = 5.0


def submit(client: ComfyClient, prompt: dict, object_info: dict) -> str:
    status, answer = client.submit(prompt)
    if status == 200 and "prompt_id" in answer:
        return answer["prompt_id"]
    raise refusal(status, answer, prompt, object_info)


def refusal(status: int, answer: dict, prompt: dict, object_info: dict) -> QueueError:
    """The server's 400, as one message per problem and the exit code of the worst kind."""
    error = answer.get("error") or {}
    node_errors = answer.get("node_errors") or {}
    if not node_errors:
        message = error.get("message") or f"the server answered {status}"
        details = error.get("details")
        code = Exit.UNKNOWN_NODE if "does not exist" in f"{message} {details}" else Exit.INVALID_PROMPT
        return QueueError(code, f"the server refused the workflow: {message}{f' ({details})' if details else ''}")
    missing, other = [], []
    for node_id, report in node_errors.items():
        node = prompt.get(node_id, {"class_type": report.get("class_type", "?")})
        for problem in report.get("errors", []):
            extra = problem.get("extra_info") or {}
            received, input_name = extra.get("received_value"), extra.get("input_name", "?")
            if problem.get("type") == "value_not_in_list" and names_a_model(input_name, received):
                options = (extra.get("input_config") or [None])[0]
                missing.append(missing_model_message(node_id, node, input_name, received,
                                                     options if isinstance(options, list) else None, object_info))
            else:
                other.append(f"{describe(node_id, node, object_info)}: {problem.get('message')}"
                             f"{': ' + problem['details'] if problem.get('details') else ''}")
    if other:
        return QueueError(Exit.INVALID_PROMPT, "the server refused the workflow:\n  " + "\n  ".join(other + missing))
    return QueueError(Exit.MISSING_MODEL, "model files the workflow needs are not on the server:\n  "
                      + "\n  ".join(missing))


def wait(client: ComfyClient, websocket: WebSocket | None, prompt_id: str, prompt: dict, object_info: dict,
         timeout: float | None, show_progress: bool = True, cancelled: threading.Event | None = None) -> dict:
    """Follows the prompt until the server has its history entry; returns that entry.

    The websocket drives the progress bars and says when to look; the verdict always comes
    from /history, which also covers a websocket that dropped while the server stayed up.
    Without ``show_progress`` nothing is written (the batch command shows its own progress);
    ``cancelled`` stops the wait with Exit.INTERRUPTED, the prompt left on the server.
    """
    display = ProgressDisplay(prompt, object_info) if show_progress else None
    deadline = None if timeout is None else time.monotonic() + timeout
    last_check = time.monotonic()
    try:
        while True:
            if cancelled is not None and cancelled.is_set():
                raise QueueError(Exit.INTERRUPTED, f"stopped waiting for prompt {prompt_id} (cancelled).")
            if deadline is not None and time.monotonic() > deadline:
                raise QueueError(Exit.TIMEOUT, f"prompt {prompt_id} did not finish within {timeout:g} s; it stays "
                                               f"queued on the server (POST /interrupt stops it).")
            idle_check_due = time.monotonic() - last_check > IDLE_CHECK_SECONDS
            if idle_check_due:
                last_check = time.monotonic()
            if websocket is None:
                entry = history_unless_lost(client, prompt_id) if idle_check_due else client.history(prompt_id)
                if finished(entry):
                    return entry
                time.sleep(HISTORY_POLL_SECONDS)
                continue
            try:
                websocket.settimeout(1.0)
                message = websocket.receive()
            except (socket.timeout, TimeoutError):
                message = None
            except (ConnectionClosed, OSError) as error:
                if display is not None:
                    display.close()
                    print(f"the websocket dropped ({error}); polling /history", file=sys.stderr)
                websocket = None
                continue
            if isinstance(message, str) and show(display, json.loads(message), prompt_id):
                entry = settled_history(client, prompt_id)
                if entry is not None:
                    return entry
            elif idle_check_due:  # in case a message was missed, or the server lost the prompt
                entry = history_unless_lost(client, prompt_id)
                if finished(entry):
                    read_to_end(websocket, display, prompt_id)
                    return entry
    finally:
        if display is not None:
            display.close()
        if websocket is not None:
            websocket.close()


def history_unless_lost(client: ComfyClient, prompt_id: str) -> dict | None:
    """The prompt's history entry (None while it waits or runs); QueueError(CONNECTION_LOST) when
    the server no longer has it anywhere: a restarted server forgets its queue, and a prompt
    deleted from the queue never gets an entry, so waiting longer would never end."""
    entry = client.history(prompt_id)
    if finished(entry) or client.has_queued(prompt_id):
        return entry
    entry = client.history(prompt_id)  # it may have finished between the two reads
    if finished(entry):
        return entry
    raise QueueError(Exit.CONNECTION_LOST, f"prompt {prompt_id} is no longer on {client.server}: not queued, not "
                                           f"running, not in its history. The server restarted or its queue was "
                                           f"cleared; queue the workflow again.")


def show(display: ProgressDisplay | None, event: dict, prompt_id: str) -> bool:
    """Updates the display (if any) from one websocket message; True when the prompt has ended."""
    data = event.get("data") or {}
    if data.get("prompt_id") not in (None, prompt_id):
        return False
    kind = event.get("type")
    node = None if data.get("node") is None else str(data["node"])
    if display is not None:
        if kind == "execution_cached":
            display.cached([str(n) for n in data.get("nodes", [])])
        elif kind == "executing":
            display.executing(node)
        elif kind == "progress":
            display.progress(node, data.get("value", 0), data.get("max", 1))
    if kind == "executing":
        return node is None and data.get("prompt_id") == prompt_id
    return kind in ("execution_success", "execution_error", "execution_interrupted")


def read_to_end(websocket: WebSocket, display: ProgressDisplay | None, prompt_id: str) -> None:
    """Shows the prompt's messages that are still to be read once /history has its entry, up to
    the prompt's end: the client may be behind the server, and the server writes the entry before
    it sends the closing ``executing``. Stops early if the socket stays quiet for its timeout."""
    while True:
        try:
            message = websocket.receive()
        except (socket.timeout, TimeoutError, ConnectionClosed, OSError):
            return
        if isinstance(message, str) and show(display, json.loads(message), prompt_id):
            return


def finished(entry: dict | None) -> bool:
    return bool(entry) and entry.get("status", {}).get("completed") is not None


def settled_history(client: ComfyClient, prompt_id: str, grace: float = 5.0) -> dict | None:
    """The history entry once the server has written it (a moment after its last message)."""
    deadline = time.monotonic() + grace
    while True:
        entry = client.history(prompt_id)
        if finished(entry):
            return entry
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def check_outcome(entry: dict, prompt_id: str, prompt: dict, object_info: dict) -> None:
    """Raises the run's failure (interrupted: Exit.INTERRUPTED; a node failed: Exit.EXECUTION_ERROR)."""
    status = entry.get("status", {})
    messages = {kind: data for kind, data in status.get("messages", [])}
    if "execution_interrupted" in messages:
        data = messages["execution_interrupted"]
        where = f" at {describe(str(data['node_id']), prompt.get(str(data['node_id']), {}), object_info)}" \
            if data.get("node_id") is not None else ""
        raise QueueError(Exit.INTERRUPTED, f"prompt {prompt_id} was interrupted{where} (Cancel in the editor or "
                                           f"POST /interrupt).")
    if "execution_error" in messages or status.get("status_str") != "success":
        data = messages.get("execution_error", {})
        node_id = str(data.get("node_id", "?"))
        node = prompt.get(node_id, {"class_type": data.get("node_type", "?")})
        message = (data.get("exception_message") or "").strip() or data.get("exception_type") or "no message"
        raise QueueError(Exit.EXECUTION_ERROR, f"{describe(node_id, node, object_info)} failed: {message}")


def output_files(entry: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """The saved files ({filename, subfolder, type}) of a finished run, and its previews by node id."""
    results, previews = [], {}
    for node_id, output in entry.get("outputs", {}).items():
        for files in output.values():
            for file in files if isinstance(files, list) else []:
                if not isinstance(file, dict) or "filename" not in file:
                    continue
                if file.get("type", "output") == "output":
                    results.append(file)
                else:  # a preview: what the editor shows on the node, in the server's temp folder
                    previews.setdefault(node_id, []).append(file)
    return results, previews
