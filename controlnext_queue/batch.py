"""batch WORKFLOW --jobs JOBS --server URL [--server URL ...] --out DIR

Runs one workflow many times over several ComfyUI servers: one job per row of a jobs file (CSV
or JSON Lines; a folder or glob in a row makes one job per file). Every row is checked before
anything is queued. Each server holds at most --per-server jobs at once and a job goes to the
server free first (``choose_server``). A job that loses its server (refused connection, dropped
connection, a restarted server that forgot it, --timeout) goes back for another server, up to
--retries; a server that keeps failing is set aside and asked again later; a job that fails on a
node is reported, not retried. OUT/manifest.json records every job as it starts and ends, so the
same command run again skips the jobs already done (README: Workflows and headless queueing).
"""
from __future__ import annotations

import argparse
import collections
import copy
import csv
import dataclasses
import datetime
import glob
import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time

from .client import ComfyClient
from .errors import Exit, QueueError
from .progress import BatchProgress
from .submission import check_outcome, output_files, submit, wait
from .websocket import WebSocket
from .workflow import (IMAGE_EXTENSIONS, api_prompt, check_picture, check_value, image_node, load_workflow,
                       missing_models, parse_assignment, parse_image, set_input)

MANIFEST_NAME = "manifest.json"
PARTIAL_FOLDER = ".partial"  # under --out: a job's downloads until all of them arrived
NAME_COLUMN = "name"
GLOB_CHARACTERS = "*?["
# A lost server, not a problem of the job: the job goes back for another server.
SERVER_FAULTS = frozenset({Exit.UNREACHABLE, Exit.CONNECTION_LOST, Exit.TIMEOUT})
FAULTS_BEFORE_SET_ASIDE = 2  # in a row, on one server
SET_ASIDE_SECONDS = 20.0  # then the server is asked (GET /queue) whether it answers again
PROBE_TIMEOUT_SECONDS = 5.0
SERVERS_DOWN_LIMIT_SECONDS = 300.0  # every server set aside this long: the batch stops (run it again to go on)
WITHDRAW_SECONDS = 10.0  # how long a cancelled prompt gets to leave its server's queue (interrupts act between steps)
CANCEL_WAIT_SECONDS = WITHDRAW_SECONDS + 5.0  # Ctrl-C: how long the jobs in flight get to cancel their prompts
TICK_SECONDS = 1.0  # the dispatcher wakes at least this often (progress line, set-aside servers)

Problem = tuple[Exit, str]  # a bad cell of the jobs file: its exit code and what is wrong


@dataclasses.dataclass
class Job:
    """One run of the workflow: its name (also its folder under --out), the row it comes from,
    the prompt it queues, and the local files to upload under the names that prompt uses."""

    name: str
    source: str
    prompt: dict
    uploads: dict[str, str]  # upload name -> local path

    @property
    def fingerprint(self) -> str:
        """What the job queues (upload names carry their files' hashes): equal means the same result."""
        return hashlib.sha256(json.dumps(self.prompt, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class Server:
    url: str
    capacity: int
    order: int
    in_flight: int = 0
    free_since: float = 0.0
    faults_in_a_row: int = 0
    set_aside_until: float | None = None  # time.monotonic(); None while the server is in use
    done: int = 0
    failed: int = 0
    faults: int = 0
    busy_seconds: float = 0.0

    def record_fault(self, now: float) -> bool:
        """Counts a fault; True when it sets the server aside."""
        self.faults += 1
        self.faults_in_a_row += 1
        if self.faults_in_a_row >= FAULTS_BEFORE_SET_ASIDE and self.set_aside_until is None:
            self.set_aside_until = now + SET_ASIDE_SECONDS
            return True
        return False


def choose_server(servers: list[Server], avoid: set[str]) -> Server | None:
    """The server a job goes to now, or None (it waits): one that is not set aside and has a free
    slot, the one with the fewest jobs in flight and then free for longest. Never one the job
    already lost while another usable server remains: then the job waits for that one."""
    usable = [server for server in servers if server.set_aside_until is None]
    if any(server.url not in avoid for server in usable):
        usable = [server for server in usable if server.url not in avoid]
    free = [server for server in usable if server.in_flight < server.capacity]
    return min(free, key=lambda server: (server.in_flight, server.free_since, server.order), default=None)


# --- the jobs file ---------------------------------------------------------------------------

def read_rows(path: str) -> list[tuple[int, dict[str, str]]]:
    """(line, {column: text}) per job row of a CSV file (a header row, then one row per job) or a
    JSON Lines file (one object per line). Blank cells and null values are left out: the row
    keeps the workflow's value there."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            if path.lower().endswith(".csv"):
                return csv_rows(file, path)
            if path.lower().endswith((".jsonl", ".ndjson")):
                return json_lines_rows(file, path)
    except OSError as error:
        raise QueueError(Exit.USAGE, f"cannot read the jobs file {path}: {error.strerror}") from None
    raise QueueError(Exit.USAGE, f"--jobs {path}: a jobs file is CSV (.csv) or JSON Lines (.jsonl).")


def csv_rows(file, path: str) -> list[tuple[int, dict[str, str]]]:
    reader = csv.reader(file, skipinitialspace=True)
    header = [column.strip() for column in next(reader, [])]
    rows = []
    for cells in reader:
        if len(cells) > len(header):
            raise QueueError(Exit.USAGE, f"{path}:{reader.line_num}: {len(cells)} cells for {len(header)} columns.")
        row = {column: text for column, text in zip(header, cells) if text.strip()}
        if row:
            rows.append((reader.line_num, row))
    return rows


def json_lines_rows(file, path: str) -> list[tuple[int, dict[str, str]]]:
    rows = []
    for line_number, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise QueueError(Exit.USAGE, f"{path}:{line_number}: not JSON ({error.msg}).") from None
        if not isinstance(data, dict):
            raise QueueError(Exit.USAGE, f"{path}:{line_number}: a job is a JSON object, e.g. "
                                         f'{{"name": "fox", "KSampler.seed": 7, "Photo": "fox.png"}}.')
        rows.append((line_number, {column.strip(): value if isinstance(value, str) else json.dumps(value)
                                   for column, value in data.items() if value is not None}))
    return rows


def is_image_column(column: str, prompt: dict) -> bool:
    """A column named after a node (id, title or type) holds the files for that Load Image node;
    any other column is NODE.input and holds values: the forms --image and --set take."""
    return column in prompt or any(column in (node.get("_meta", {}).get("title"), node.get("class_type"))
                                   for node in prompt.values())


def expand_files(text: str, folder: str) -> tuple[list[str], bool]:
    """The files a cell names, relative to ``folder`` (the jobs file's), and whether it named
    several: a glob (what it matches), a folder (the images in it) or one file."""
    path = os.path.join(folder, os.path.expanduser(text))
    if any(character in text for character in GLOB_CHARACTERS):
        files = sorted(match for match in glob.glob(path) if os.path.isfile(match))
        if not files:
            raise QueueError(Exit.USAGE, f"'{text}' matches no file (in {folder}).")
        return files, True
    if os.path.isdir(path):
        files = sorted(entry.path for entry in os.scandir(path)
                       if entry.is_file() and not entry.name.startswith(".")
                       and entry.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise QueueError(Exit.USAGE, f"the folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
        return files, True
    return [path], False


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise QueueError(Exit.USAGE, f"cannot read the image {path}: {error.strerror}") from None
    return digest.hexdigest()


def upload_name(path: str, digests: dict[str, str]) -> str:
    """The name a file is uploaded under: its own with its content's hash, so jobs whose files
    share a name never overwrite each other's input on a server, and a file is sent once. The
    file is checked to be a picture the first time."""
    if path not in digests:
        check_picture(path)
        digests[path] = file_digest(path)
    stem, extension = os.path.splitext(os.path.basename(path))
    return f"{stem}-{digests[path][:16]}{extension}"


def safe_name(text: str) -> str:
    """A job name usable as a folder name: letters, digits, '.', '-' and '_'."""
    return re.sub(r"[^\w.-]+", "_", text).strip("._-")


def apply_image(prompt: dict, uploads: dict[str, str], reference: str, path: str, object_info: dict,
                digests: dict[str, str]) -> None:
    node_id = image_node(prompt, reference, object_info)
    name = upload_name(path, digests)
    prompt[node_id]["inputs"]["image"] = name
    uploads[name] = path


def set_value(prompt: dict, reference: str, name: str, text: str, object_info: dict) -> None:
    """``set_input``, the value then checked against the server's range or choices: refused once
    here rather than by the server in every job."""
    node_id = set_input(prompt, reference, name, text, object_info)
    check_value(prompt[node_id], name, object_info)


def picture_problems(files: list[str], digests: dict[str, str]) -> list[Problem]:
    """A problem per file that is not a picture (``upload_name`` checks it, once per file)."""
    problems = []
    for path in files:
        try:
            upload_name(path, digests)
        except QueueError as error:
            problems.append((error.code, error.message))
    return problems


def row_jobs(index: int, source: str, cells: dict[str, str], folder: str, base: Job, object_info: dict,
             digests: dict[str, str]) -> tuple[list[Job], list[Problem]]:
    """The jobs of one row: its values set on the base job, one job per combination of the files
    its image cells name (a folder of references and a folder of poses: every pair). Or, when a
    cell is bad, no job and every problem of the row, each with its column."""
    cells = dict(cells)
    name = safe_name(cells.pop(NAME_COLUMN, "")) or f"row{index}"
    prompt, image_cells, problems = copy.deepcopy(base.prompt), [], []
    for column, text in cells.items():
        reference, dot, input_name = column.rpartition(".")
        try:
            if is_image_column(column, prompt):
                image_node(prompt, column, object_info)
                files, several = expand_files(text, folder)
                image_cells.append((column, files, several))
                problems += [(code, f"{column}: {message}") for code, message in picture_problems(files, digests)]
            elif dot and reference:
                set_value(prompt, reference, input_name, text, object_info)
            else:
                raise QueueError(Exit.USAGE, f"the column names no node of the workflow: a column is a Load Image "
                                             f"node (its cells: files to upload) or NODE.input (its cells: "
                                             f"values), as --image and --set take them.")
        except QueueError as error:
            problems.append((error.code, f"{column}: {error.message}"))
    problems += [(Exit.MISSING_MODEL, message) for message in missing_models(prompt, object_info)]
    if problems:
        return [], problems
    jobs = []
    for files in itertools.product(*(paths for _, paths, _ in image_cells)):
        job = Job(name, source, copy.deepcopy(prompt), dict(base.uploads))
        for (column, _, several), path in zip(image_cells, files):
            apply_image(job.prompt, job.uploads, column, path, object_info, digests)
            if several:
                job.name += "-" + (safe_name(os.path.splitext(os.path.basename(path))[0]) or "file")
        jobs.append(job)
    return jobs, []


def read_jobs(path: str, base: Job, object_info: dict) -> list[Job]:
    """Every job of the jobs file, each checked against the workflow and the server's
    /object_info; every problem of every row is reported at once, before anything is queued."""
    folder = os.path.dirname(os.path.abspath(path))
    digests: dict[str, str] = {}
    jobs, problems = [], []  # problems: (exit code, source, message)
    rows = read_rows(path)
    if not rows:
        raise QueueError(Exit.USAGE, f"{path} has no jobs: one row per job (CSV: after the header row).")
    for index, (line, cells) in enumerate(rows, 1):
        source = f"{path}:{line}"
        row, row_problems = row_jobs(index, source, cells, folder, base, object_info, digests)
        jobs += row
        problems += [(code, source, message) for code, message in row_problems]
    sources: dict[str, str] = {MANIFEST_NAME: "the manifest"}
    for job in jobs:
        if job.name in sources:
            problems.append((Exit.USAGE, job.source, f"the job name '{job.name}' is {sources[job.name]}'s too: give "
                                                     f"each row its own name (column '{NAME_COLUMN}')."))
        sources.setdefault(job.name, job.source)
    if problems:
        rows_with_problems = len({source for _, source, _ in problems})
        raise QueueError(problems[0][0], f"{len(problems)} problem(s) in {rows_with_problems} row(s) of {path}; "
                                         f"nothing was queued:\n  "
                         + "\n  ".join(f"{source}: {message}" for _, source, message in problems))
    return jobs


# --- the manifest ----------------------------------------------------------------------------

class Manifest:
    """OUT/manifest.json: one record per job (status, server, prompt id, attempts, outputs with
    sizes and hashes, times, error), rewritten whole (written aside, then renamed over) whenever
    a job starts or ends, so the file is complete whatever stops the command."""

    def __init__(self, folder: str, workflow: str, jobs_file: str):
        self.folder = folder
        self.path = os.path.join(folder, MANIFEST_NAME)
        self.records: dict[str, dict] = {}
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as file:
                    self.records = json.load(file)["jobs"]
            except (OSError, ValueError, KeyError, TypeError):
                raise QueueError(Exit.USAGE, f"{self.path} is not a batch manifest: give --out an empty folder or "
                                             f"the folder of an earlier run of this batch.") from None
        self.header = {"workflow": os.path.abspath(workflow), "jobs_file": os.path.abspath(jobs_file)}

    def save(self) -> None:
        temporary = os.path.join(self.folder, f".{MANIFEST_NAME}.tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump({**self.header, "jobs": self.records}, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)

    def done_before(self, job: Job) -> bool:
        """The job ran to the end in an earlier run, with the same prompt, and its files are intact."""
        record = self.records.get(job.name, {})
        return record.get("status") == "done" and record.get("fingerprint") == job.fingerprint and all(
            output_intact(os.path.join(self.folder, output["path"]), output) for output in record.get("outputs", []))


def output_intact(path: str, output: dict) -> bool:
    try:
        return os.path.getsize(path) == output["size"] and file_digest(path) == output["sha256"]
    except (OSError, QueueError):
        return False


def timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def server_seconds(entry: dict) -> float | None:
    """How long the server ran the prompt: its execution_start to its last message."""
    times = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])
             if isinstance(data, dict)}
    end = times.get("execution_success") or times.get("execution_error")
    return (end - times["execution_start"]) / 1000 if end and times.get("execution_start") else None


# --- running -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Attempt:
    """One try of a job on one server, filled in by the thread that runs it."""

    job: Job
    server: Server
    started: float = dataclasses.field(default_factory=time.time)
    prompt_id: str | None = None
    code: Exit | None = None  # None: done
    error: str | None = None
    outputs: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    server_seconds: float | None = None


def withdraw(client: ComfyClient, prompt_id: str) -> dict | None:
    """Cancels the prompt on its server (out of the queue, or interrupted) and returns its history
    entry once it has left the queue: it may have finished before the cancel reached it. None
    when the server is gone, or kept no entry (the prompt never ran)."""
    try:
        client.cancel(prompt_id)
        deadline = time.monotonic() + WITHDRAW_SECONDS
        while client.has_queued(prompt_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        return client.history(prompt_id)
    except QueueError:
        return None


def succeeded(entry: dict | None) -> bool:
    return bool(entry) and entry.get("status", {}).get("status_str") == "success"


class Uploads:
    """The files each server already has (by upload name): a reference shared by many jobs is
    sent once per server."""

    def __init__(self):
        self._lock = threading.Lock()
        self._names: dict[str, set[str]] = collections.defaultdict(set)

    def has(self, server: str, name: str) -> bool:
        with self._lock:
            return name in self._names[server]

    def add(self, server: str, name: str) -> None:
        with self._lock:
            self._names[server].add(name)

    def forget(self, server: str) -> None:
        """After a fault: the server may have restarted as another machine or folder."""
        with self._lock:
            self._names[server].clear()


@dataclasses.dataclass
class Options:
    out: str
    retries: int
    timeout: float | None
    verbose: bool


class Batch:
    """Hands jobs to servers (``choose_server``), one thread per job in flight; this thread alone
    keeps the state, the manifest and the display, from the events those threads send."""

    def __init__(self, jobs: list[Job], servers: list[Server], object_info: dict, manifest: Manifest,
                 options: Options):
        self.jobs = {job.name: job for job in jobs}
        self.servers = servers
        self.object_info = object_info
        self.manifest = manifest
        self.options = options
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.uploads = Uploads()
        self.skipped = {job.name for job in jobs if manifest.done_before(job)}
        self.pending = collections.deque(job for job in jobs if job.name not in self.skipped)
        self.running: dict[str, Attempt] = {}
        self.lost: dict[str, set[str]] = {job.name: set() for job in jobs}  # servers each job lost
        self.counts = {"done": len(self.skipped), "failed": 0}
        self.stopped_because: str | None = None
        self.progress = BatchProgress(len(jobs))
        self.started = time.monotonic()

    def note(self, text: str, verbose_only: bool = False) -> None:
        if self.options.verbose or not verbose_only:
            self.progress.note(text)

    def show_progress(self, final: bool = False) -> None:
        ended_here = self.counts["done"] + self.counts["failed"] - len(self.skipped)
        self.progress.update(self.counts["done"], self.counts["failed"], len(self.running), ended_here,
                             time.monotonic() - self.started, final)

    def run(self) -> int:
        for name in self.skipped:
            self.note(f"{name}: skipped, done by an earlier run", verbose_only=True)
        for job in self.pending:
            self.manifest.records[job.name] = {"status": "pending", "source": job.source,
                                               "fingerprint": job.fingerprint, "attempts": []}
        self.manifest.save()
        previous_handler = signal.signal(signal.SIGINT, self.on_ctrl_c)
        try:
            self.loop()
            if self.cancelled.is_set():
                self.cancel()
        finally:
            signal.signal(signal.SIGINT, previous_handler)
        self.show_progress(final=True)
        try:
            os.rmdir(os.path.join(self.options.out, PARTIAL_FOLDER))
        except OSError:
            pass  # absent, or holds a cancelled job's downloads
        print(self.summary())
        if self.cancelled.is_set():
            return Exit.CTRL_C
        if self.stopped_because:
            return Exit.UNREACHABLE
        return Exit.OK if self.counts["done"] == len(self.jobs) else Exit.BATCH_INCOMPLETE

    def on_ctrl_c(self, signum, frame) -> None:
        """The first Ctrl-C cancels the batch in good order (the job threads see the flag at
        once); a second one stops the command where it is."""
        self.cancelled.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def loop(self) -> None:
        down_since = None
        while (self.pending or self.running) and not self.cancelled.is_set():
            now = time.monotonic()
            self.bring_back(now)
            self.dispatch()
            if not self.running and all(server.set_aside_until is not None for server in self.servers):
                down_since = now if down_since is None else down_since
                if now - down_since > SERVERS_DOWN_LIMIT_SECONDS:
                    self.stopped_because = (f"no server answered for {SERVERS_DOWN_LIMIT_SECONDS:g} s; "
                                            f"{len(self.pending)} job(s) not run: run the command again to go on")
                    return
            else:
                down_since = None
            self.show_progress()
            try:
                self.handle(*self.events.get(timeout=TICK_SECONDS))
            except queue.Empty:
                continue

    def dispatch(self) -> None:
        for job in list(self.pending):
            if not any(server.in_flight < server.capacity for server in self.servers
                       if server.set_aside_until is None):
                return  # every slot is taken: the rest wait (a long batch has thousands pending)
            server = choose_server(self.servers, self.lost[job.name])
            if server is None:
                continue
            self.pending.remove(job)
            server.in_flight += 1
            attempt = Attempt(job, server)
            self.running[job.name] = attempt
            self.manifest.records[job.name].update(status="running", server=server.url, prompt_id=None,
                                                   started=timestamp(attempt.started))
            threading.Thread(target=self.run_attempt, args=(attempt,), daemon=True).start()

    def bring_back(self, now: float) -> None:
        """Asks each server whose time aside is over whether it answers again."""
        for server in self.servers:
            if server.set_aside_until is None or now < server.set_aside_until:
                continue
            try:
                ComfyClient(server.url, timeout=PROBE_TIMEOUT_SECONDS).get_json("/queue")
            except QueueError:
                server.set_aside_until = time.monotonic() + SET_ASIDE_SECONDS
                continue
            server.set_aside_until, server.faults_in_a_row = None, 0
            self.note(f"{server.url} answers again: back in the batch")

    def run_attempt(self, attempt: Attempt) -> None:
        """In the job's own thread: one ("queued") event once the server has the prompt, one
        ("ended") event always."""
        started = time.monotonic()
        try:
            self.attempt_job(attempt)
        except QueueError as error:
            attempt.code, attempt.error = error.code, error.message
        except Exception as error:  # an answer the client cannot read: the exchange with the server broke
            attempt.code, attempt.error = Exit.CONNECTION_LOST, f"unexpected answer ({type(error).__name__}: {error})"
        attempt.seconds = time.monotonic() - started
        self.events.put(("ended", attempt))

    def attempt_job(self, attempt: Attempt) -> None:
        job, url = attempt.job, attempt.server.url
        client = ComfyClient(url)
        for name, path in job.uploads.items():
            if not self.uploads.has(url, name):
                client.upload_image(path, name)
                self.uploads.add(url, name)
        try:  # before queueing, so no message is missed; without it /history is polled
            websocket = WebSocket.connect(client.websocket_url)
        except (OSError, ValueError):
            websocket = None
        if self.cancelled.is_set():
            if websocket is not None:
                websocket.close()
            raise QueueError(Exit.INTERRUPTED, "cancelled before it was queued")
        attempt.prompt_id = submit(client, job.prompt, self.object_info)
        self.events.put(("queued", attempt))
        try:
            entry = wait(client, websocket, attempt.prompt_id, job.prompt, self.object_info, self.options.timeout,
                         show_progress=False, cancelled=self.cancelled)
        except QueueError:  # cancelled, timed out or cut off: never left to run beside its retry
            entry = withdraw(client, attempt.prompt_id)
            if not succeeded(entry):
                raise
        check_outcome(entry, attempt.prompt_id, job.prompt, self.object_info)
        attempt.server_seconds = server_seconds(entry)
        partial = os.path.join(self.options.out, PARTIAL_FOLDER, job.name)
        shutil.rmtree(partial, ignore_errors=True)
        saved = [client.download(file, partial) for file in output_files(entry)[0]]
        final = os.path.join(self.options.out, job.name)
        shutil.rmtree(final, ignore_errors=True)  # an earlier run's files of this job
        if saved:
            os.replace(partial, final)
        for path in saved:
            relative = os.path.relpath(path, partial)
            attempt.outputs.append({"path": f"{job.name}/{relative}".replace(os.sep, "/"),
                                    "size": os.path.getsize(os.path.join(final, relative)),
                                    "sha256": file_digest(os.path.join(final, relative))})

    def handle(self, kind: str, attempt: Attempt) -> None:
        job, server = attempt.job, attempt.server
        record = self.manifest.records[job.name]
        if kind == "queued":
            record["prompt_id"] = attempt.prompt_id
            self.note(f"{job.name}: queued on {server.url} as {attempt.prompt_id}", verbose_only=True)
            self.manifest.save()
            return
        del self.running[job.name]
        server.in_flight -= 1
        server.free_since = time.monotonic()
        record.update(ended=timestamp(time.time()), seconds=round(attempt.seconds, 3))
        if attempt.code is None:
            server.faults_in_a_row = 0
            server.done += 1
            server.busy_seconds += attempt.seconds
            self.counts["done"] += 1
            record.update(status="done", outputs=attempt.outputs, server_seconds=attempt.server_seconds, error=None,
                          code=0)
            self.note(f"{job.name}: done on {server.url} in {attempt.seconds:.1f} s, "
                      f"{len(attempt.outputs)} file(s)", verbose_only=True)
        elif self.cancelled.is_set():
            record.update(status="cancelled", error=attempt.error, code=int(attempt.code))
        elif attempt.code in SERVER_FAULTS:
            self.retry_elsewhere(attempt, record)
        else:
            server.failed += 1
            server.busy_seconds += attempt.seconds
            self.counts["failed"] += 1
            record.update(status="failed", error=attempt.error, code=int(attempt.code))
            self.note(f"{job.name}: failed on {server.url} (exit {int(attempt.code)}): {attempt.error}",
                      verbose_only=True)
        self.manifest.save()

    def retry_elsewhere(self, attempt: Attempt, record: dict) -> None:
        job, server = attempt.job, attempt.server
        record["attempts"].append({"server": server.url, "prompt_id": attempt.prompt_id, "code": int(attempt.code),
                                   "error": attempt.error})
        self.uploads.forget(server.url)
        if server.record_fault(time.monotonic()):
            self.note(f"{server.url} set aside after {server.faults_in_a_row} faults in a row ({attempt.error}); "
                      f"asked again in {SET_ASIDE_SECONDS:g} s")
        self.lost[job.name].add(server.url)
        if len(record["attempts"]) > self.options.retries:
            self.counts["failed"] += 1
            record.update(status="failed", error=attempt.error, code=int(attempt.code))
            self.note(f"{job.name}: failed, lost {len(record['attempts'])} time(s): {attempt.error}",
                      verbose_only=True)
            return
        record.update(status="pending", server=None, prompt_id=None)
        self.pending.appendleft(job)
        self.note(f"{job.name}: lost on {server.url} (exit {int(attempt.code)}); back for another server",
                  verbose_only=True)

    def cancel(self) -> None:
        """Ctrl-C: every job in flight cancels its prompt on its server (out of the queue, or
        interrupted), then the manifest says which jobs are done and which are not."""
        self.note("Ctrl-C: cancelling the jobs in flight on their servers (Ctrl-C again stops at once)")
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while self.running and time.monotonic() < deadline:
            try:
                self.handle(*self.events.get(timeout=TICK_SECONDS))
            except queue.Empty:
                continue
        for name, attempt in self.running.items():
            self.manifest.records[name].update(status="cancelled", error=f"may still run on {attempt.server.url} "
                                                                         f"as {attempt.prompt_id}")
        self.manifest.save()

    def summary(self) -> str:
        statuses = collections.Counter(self.manifest.records[name]["status"] for name in self.jobs)
        lines = [f"{'server':<32} {'done':>5} {'failed':>6} {'faults':>6} {'s/job':>7}"]
        for server in self.servers:
            finished = server.done + server.failed
            per_job = f"{server.busy_seconds / finished:.2f}" if finished else "-"
            lines.append(f"{server.url:<32} {server.done:>5} {server.failed:>6} {server.faults:>6} {per_job:>7}")
        not_run = len(self.jobs) - statuses["done"] - statuses["failed"]
        lines.append(f"{len(self.jobs)} job(s): {statuses['done']} done ({len(self.skipped)} by an earlier run), "
                     f"{statuses['failed']} failed, {not_run} not run; manifest: {self.manifest.path}")
        for name in self.jobs:
            record = self.manifest.records[name]
            if record["status"] == "failed":
                lines.append(f"  failed {name} ({record['source']}, exit {record['code']}): {record['error']}")
        if self.stopped_because:
            lines.append(f"stopped: {self.stopped_because}")
        return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m controlnext_queue batch",
        description="Run a workflow once per row of a jobs file, spread over one or more ComfyUI servers; "
                    "OUT/manifest.json records each job, and the same command run again skips the jobs done.",
        epilog="Exit codes: 0 every job done, 2 bad arguments or bad rows (nothing queued), 3 no server answers, "
               "5 unknown node type, 6 model file missing on the server, 11 some jobs failed (the summary and "
               "OUT/manifest.json say why), 130 Ctrl-C (in-flight prompts cancelled on their servers).")
    parser.add_argument("workflow", help="workflow JSON, API or UI format (converted with the first server's "
                                         "/object_info)")
    parser.add_argument("--jobs", required=True, metavar="FILE",
                        help="CSV (header row) or JSON Lines file, one job per row; columns: NODE.input (a value, as "
                             "--set), NODE (a Load Image node: a file, a folder or a glob, relative to the jobs "
                             "file; a folder or glob makes one job per file) and an optional 'name'")
    parser.add_argument("--server", dest="servers", action="append", required=True, metavar="URL",
                        help="a ComfyUI address; repeat for each server (the first one's /object_info checks the jobs)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the manifest and one folder of outputs per job")
    parser.add_argument("--per-server", type=int, default=1, metavar="N",
                        help="jobs each server holds at once, running or queued (default %(default)s)")
    parser.add_argument("--retries", type=int, default=2, metavar="R",
                        help="times a job lost with its server goes back for another one (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="a job not done this long after it was queued on its server is cancelled there and "
                             "goes back for another server")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="NODE.input=value",
                        help="set an input in every job (a jobs file column overrides it). Repeatable")
    parser.add_argument("--image", dest="images", action="append", default=[], metavar="NODE=path",
                        help="use this local image in every job (a jobs file column overrides it). Repeatable")
    parser.add_argument("--verbose", action="store_true", help="a line per job as it is queued and ends")
    args = parser.parse_args(argv)
    if args.per_server < 1 or args.retries < 0:
        parser.error("--per-server is at least 1 and --retries at least 0")
    if len(set(args.servers)) != len(args.servers):
        parser.error("a --server is listed twice: use --per-server for more jobs at once on one server")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except QueueError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return int(error.code)
    except KeyboardInterrupt:
        print("stopped (Ctrl-C)", file=sys.stderr)
        return Exit.CTRL_C


def first_object_info(urls: list[str]) -> tuple[dict, set[str]]:
    """The /object_info of the first server that answers, and the servers that did not answer."""
    silent = set()
    for url in urls:
        try:
            return ComfyClient(url).object_info(), silent
        except QueueError as error:
            if error.code != Exit.UNREACHABLE:
                raise
            print(f"{url} does not answer: set aside, asked again in {SET_ASIDE_SECONDS:g} s", file=sys.stderr)
            silent.add(url)
    raise QueueError(Exit.UNREACHABLE, f"no ComfyUI answers at {', '.join(urls)}. Are the servers running, and are "
                                       f"the --server addresses theirs?")


def run(args) -> int:
    assignments = [parse_assignment(text) for text in args.assignments]
    images = [parse_image(text) for text in args.images]
    workflow = load_workflow(args.workflow)
    object_info, silent = first_object_info(args.servers)
    base = Job("", "the command line", api_prompt(workflow, args.workflow, object_info), {})
    digests: dict[str, str] = {}
    for reference, path in images:
        apply_image(base.prompt, base.uploads, reference, path, object_info, digests)
    for reference, name, text in assignments:
        try:
            set_value(base.prompt, reference, name, text, object_info)
        except QueueError as error:
            raise QueueError(error.code, f"--set {reference}.{name}: {error.message}") from None
    jobs = read_jobs(args.jobs, base, object_info)
    os.makedirs(args.out, exist_ok=True)
    manifest = Manifest(args.out, args.workflow, args.jobs)
    now = time.monotonic()
    servers = [Server(url, args.per_server, order, set_aside_until=now + SET_ASIDE_SECONDS if url in silent else None)
               for order, url in enumerate(args.servers)]
    options = Options(args.out, args.retries, args.timeout, args.verbose)
    return Batch(jobs, servers, object_info, manifest, options).run()
