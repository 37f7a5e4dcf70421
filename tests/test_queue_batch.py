"""The batch command's parts without a server: the choice of server, the jobs file (columns,
folders and globs, every problem of every row reported: values against the server's types,
ranges and choices, picture columns by their content), the manifest and what a rerun skips, the
progress line, the dispatcher's handling of lost servers, failed jobs and Ctrl-C (with the job
runs replaced), and the one-prompt wait's lost-prompt and cancel checks it relies on. Against
real servers: test_host_queue_batch.py."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from conftest import PACK_ROOT

sys.path.append(PACK_ROOT)
from controlnext_queue import batch  # noqa: E402
from controlnext_queue.batch import (Batch, Job, Manifest, Options, Server, choose_server, read_jobs,  # noqa: E402
                                     read_rows, server_seconds)
from controlnext_queue.submission import wait  # noqa: E402
from controlnext_queue.errors import Exit, QueueError  # noqa: E402
from controlnext_queue.progress import batch_line  # noqa: E402

OBJECT_INFO = {
    "LoadImage": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}}},
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors"], {}]}}},
    "Sampler": {"input": {"required": {"seed": ["INT", {"min": 0, "max": 2**64 - 1}],
                                       "strength": ["FLOAT", {"min": 0.0, "max": 10.0}], "text": ["STRING", {}],
                                       "sampler_name": [["euler", "heun"], {}], "flip": ["BOOLEAN", {}]}}},
    "Save": {"input": {"required": {"images": ["IMAGE"]}}, "output_node": True},
}
PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Photo"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Pose"}},
    "3": {"class_type": "Loader", "inputs": {"ckpt_name": "a.safetensors"}, "_meta": {"title": "Load"}},
    "4": {"class_type": "Sampler", "inputs": {"seed": 1, "strength": 1.0, "text": "a fox", "sampler_name": "euler",
                                              "flip": False}, "_meta": {"title": "S"}},
    "5": {"class_type": "Save", "inputs": {"images": ["4", 0]}, "_meta": {"title": "Save"}},
}


def servers(*urls: str, capacity: int = 1) -> list[Server]:
    return [Server(url, capacity, order) for order, url in enumerate(urls)]


def test_a_job_goes_to_the_server_free_first_and_waits_when_none_is():
    a, b, c = servers("a", "b", "c")
    a.free_since, b.free_since, c.free_since = 3.0, 1.0, 2.0
    assert choose_server([a, b, c], set()) is b
    b.in_flight = 1
    assert choose_server([a, b, c], set()) is c
    c.in_flight = a.in_flight = 1
    assert choose_server([a, b, c], set()) is None


def test_with_several_slots_the_server_with_fewest_jobs_in_flight_comes_first():
    a, b = servers("a", "b", capacity=2)
    a.in_flight, a.free_since = 1, 0.0
    b.free_since = 5.0
    assert choose_server([a, b], set()) is b
    b.in_flight = 1
    assert choose_server([a, b], set()) is a


def test_a_set_aside_server_gets_no_job():
    a, b = servers("a", "b")
    a.set_aside_until = 10.0
    assert choose_server([a, b], set()) is b
    b.set_aside_until = 10.0
    assert choose_server([a, b], set()) is None


def test_a_job_waits_for_another_server_than_the_one_it_lost_unless_that_is_the_only_one_left():
    a, b = servers("a", "b")
    b.in_flight = 1
    assert choose_server([a, b], {"a"}) is None  # b is busy: wait for b rather than go back to a
    b.set_aside_until = 10.0
    assert choose_server([a, b], {"a"}) is a  # a is the only server left
    assert choose_server([a], {"a"}) is a


def test_a_server_is_set_aside_after_faults_in_a_row():
    server = Server("a", 1, 0)
    assert not server.record_fault(5.0)
    assert server.set_aside_until is None
    assert server.record_fault(6.0)
    assert server.set_aside_until == 6.0 + batch.SET_ASIDE_SECONDS
    assert not server.record_fault(7.0)  # already aside: its time is not pushed back
    assert server.faults == 3


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_csv_rows_leave_blank_cells_out(tmp_path):
    path = write(tmp_path / "jobs.csv", "name, S.seed, Photo\nfox, 7, fox.png\n\nowl,,owl.png\n")
    assert read_rows(path) == [(2, {"name": "fox", "S.seed": "7", "Photo": "fox.png"}),
                               (4, {"name": "owl", "Photo": "owl.png"})]


def test_json_lines_values_become_the_text_set_takes(tmp_path):
    path = write(tmp_path / "jobs.jsonl", '{"S.seed": 7, "S.strength": 0.5, "flag": true, "S.text": "a, b"}\n\n'
                                          '{"S.seed": null}\n')
    assert read_rows(path) == [(1, {"S.seed": "7", "S.strength": "0.5", "flag": "true", "S.text": "a, b"}), (3, {})]


@pytest.mark.parametrize("name, text, message", [
    ("jobs.txt", "S.seed\n1\n", "CSV (.csv) or JSON Lines (.jsonl)"),
    ("jobs.csv", "S.seed\n1,2\n", "jobs.csv:2: 2 cells for 1 columns"),
    ("jobs.jsonl", '{"S.seed": 1}\n[1]\n', "jobs.jsonl:2: a job is a JSON object"),
    ("jobs.jsonl", '{"S.seed": 1\n', "jobs.jsonl:1: not JSON"),
])
def test_unreadable_jobs_files_say_where(tmp_path, name, text, message):
    with pytest.raises(QueueError) as raised:
        read_rows(write(tmp_path / name, text))
    assert raised.value.code == Exit.USAGE and message in raised.value.message


PNG_START = b"\x89PNG\r\n\x1a\n"


def image_files(folder, names: dict[str, bytes]) -> None:
    """Files that start as PNG files do, then ``data``: the content tells them apart."""
    for name, data in names.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG_START + data)


def base_job() -> Job:
    return Job("", "the command line", json.loads(json.dumps(PROMPT)), {})


def test_folders_and_globs_make_one_job_per_file_and_every_pair_of_them(tmp_path):
    image_files(tmp_path, {"refs/anna.png": b"a", "refs/ben.jpg": b"b", "refs/notes.txt": b"-",
                           "refs/.hidden.png": b"h", "poses/wave.webp": b"w", "poses/jump.webp": b"j",
                           "poses/jump.gif": b"g", "one.png": b"o"})
    path = write(tmp_path / "jobs.csv", "name,Photo,Pose,S.seed,S.text\n"
                                        "pair,refs,poses/*.webp,3,\n"
                                        ",one.png,,,a dog\n")
    jobs = read_jobs(path, base_job(), OBJECT_INFO)
    assert [job.name for job in jobs] == ["pair-anna-jump", "pair-anna-wave", "pair-ben-jump", "pair-ben-wave", "row2"]
    uploads = {job.name: sorted(os.path.basename(p) for p in job.uploads.values()) for job in jobs}
    assert uploads["pair-ben-wave"] == ["ben.jpg", "wave.webp"] and uploads["row2"] == ["one.png"]
    first = jobs[0].prompt
    assert first["4"]["inputs"] == {"seed": 3, "strength": 1.0, "text": "a fox", "sampler_name": "euler",
                                    "flip": False}
    assert first["1"]["inputs"]["image"] in jobs[0].uploads and first["1"]["inputs"]["image"].startswith("anna-")
    assert jobs[4].prompt["4"]["inputs"]["text"] == "a dog" and jobs[4].prompt["2"]["inputs"]["image"] == "x.png"
    assert jobs[4].source == f"{path}:3"


def test_upload_names_tell_files_apart_by_content(tmp_path):
    image_files(tmp_path, {"a/ref.png": b"one", "b/ref.png": b"two", "c/ref.png": b"one"})
    rows = [json.dumps({"name": folder, "Photo": f"{folder}/ref.png"}) for folder in "abc"]
    path = write(tmp_path / "jobs.jsonl", "\n".join(rows) + "\n")
    names = [job.prompt["1"]["inputs"]["image"] for job in read_jobs(path, base_job(), OBJECT_INFO)]
    assert names[0] != names[1] and names[0] == names[2]  # same bytes: uploaded once per server
    assert all(name.startswith("ref-") and name.endswith(".png") for name in names)


def test_every_bad_row_is_reported_at_once_and_the_good_ones_are_not(tmp_path):
    image_files(tmp_path, {"fox.png": b"f"})
    path = write(tmp_path / "jobs.jsonl", "\n".join(json.dumps(row) for row in [
        {"name": "good", "Photo": "fox.png", "S.seed": 1},
        {"name": "unknown-node", "Nope.seed": 2},
        {"name": "missing-file", "Photo": "gone.png"},
        {"name": "empty-glob", "Pose": "poses/*.png"},
        {"name": "bad-value", "S.seed": "seven"},
        {"name": "no-such-model", "Load.ckpt_name": "b.safetensors"},
        {"name": "not-a-column", "Photo2": "fox.png"},
        {"name": "good", "S.seed": 3},
    ]) + "\n")
    with pytest.raises(QueueError) as raised:
        read_jobs(path, base_job(), OBJECT_INFO)
    lines = raised.value.message.splitlines()
    assert lines[0] == f"7 problem(s) in 7 row(s) of {path}; nothing was queued:"
    assert [line.split(": ")[0].strip() for line in lines[1:] if line.startswith(f"  {path}")] == [
        f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8)]
    text = raised.value.message
    assert "no node 'Nope'" in text and "cannot read the image" in text and "gone.png" in text
    assert "matches no file" in text and "'seven' is not a valid INT" in text
    assert "'b.safetensors' is not installed" in text and "Photo2: the column names no node" in text
    assert f"the job name 'good' is {path}:1's too" in text
    assert raised.value.code == Exit.USAGE


def test_every_problem_of_a_row_is_listed_with_its_column_and_what_the_server_allows(tmp_path):
    """Values checked as the server checks them (type, min/max, choices), picture columns by their
    content: each bad cell, and each bad file of a folder, is a line of the one error."""
    image_files(tmp_path, {"fox.png": b"f", "refs/anna.png": b"a"})
    (tmp_path / "table.csv").write_text("name,seed\nfox,7\n")
    (tmp_path / "refs" / "ben.png").write_text("a table named .png\n")
    rows = [{"name": "ranges", "S.seed": -5, "S.strength": 99, "S.sampler_name": "euler_x", "Photo": "table.csv"},
            {"name": "good", "Photo": "fox.png", "S.seed": 2**64 - 1, "S.strength": 10, "S.flip": "yes"},
            {"name": "types", "S.seed": 1.5, "S.strength": "strong", "S.flip": "maybe", "Pose": "refs"}]
    path = write(tmp_path / "jobs.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(QueueError) as raised:
        read_jobs(path, base_job(), OBJECT_INFO)
    assert raised.value.code == Exit.USAGE
    assert raised.value.message.splitlines() == [
        f"8 problem(s) in 2 row(s) of {path}; nothing was queued:",
        f"  {path}:1: S.seed: -5 is out of range (allowed: a whole number from 0 to 18446744073709551615).",
        f"  {path}:1: S.strength: 99.0 is out of range (allowed: a number from 0.0 to 10.0).",
        f"  {path}:1: S.sampler_name: 'euler_x' is not one of the choices (allowed: one of euler, heun).",
        f"  {path}:1: Photo: {tmp_path / 'table.csv'} is not a picture (allowed: PNG, JPEG, WEBP, GIF, BMP or TIFF "
        f"files, as Load Image reads).",
        f"  {path}:3: S.seed: '1.5' is not a valid INT (allowed: a whole number from 0 to 18446744073709551615).",
        f"  {path}:3: S.strength: 'strong' is not a valid FLOAT (allowed: a number from 0.0 to 10.0).",
        f"  {path}:3: S.flip: 'maybe' is not a valid BOOLEAN (allowed: true / false / 1 / 0 / yes / no).",
        f"  {path}:3: Pose: {tmp_path / 'refs' / 'ben.png'} is not a picture (allowed: PNG, JPEG, WEBP, GIF, BMP or "
        f"TIFF files, as Load Image reads).",
    ]


def test_the_command_line_values_apply_to_every_job_and_rows_override_them(tmp_path):
    image_files(tmp_path, {"fox.png": b"f", "owl.png": b"o"})
    base = base_job()
    batch.apply_image(base.prompt, base.uploads, "Photo", str(tmp_path / "fox.png"), OBJECT_INFO, {})
    base.prompt["4"]["inputs"]["seed"] = 9
    path = write(tmp_path / "jobs.csv", "name,Photo,S.seed\nkeep,,\nother,owl.png,2\n")
    keep, other = read_jobs(path, base, OBJECT_INFO)
    assert keep.prompt["1"]["inputs"]["image"].startswith("fox-") and keep.prompt["4"]["inputs"]["seed"] == 9
    assert other.prompt["1"]["inputs"]["image"].startswith("owl-") and other.prompt["4"]["inputs"]["seed"] == 2
    assert keep.fingerprint != other.fingerprint


def manifest_with_a_done_job(tmp_path) -> tuple[Manifest, Job]:
    job = Job("fox", "jobs.csv:2", {"1": {"class_type": "Save", "inputs": {}}}, {})
    (tmp_path / "fox").mkdir()
    (tmp_path / "fox" / "out.png").write_bytes(b"picture")
    manifest = Manifest(str(tmp_path), "workflow.json", "jobs.csv")
    manifest.records["fox"] = {"status": "done", "fingerprint": job.fingerprint, "outputs": [
        {"path": "fox/out.png", "size": 7, "sha256": batch.file_digest(str(tmp_path / "fox" / "out.png"))}]}
    manifest.save()
    return manifest, job


def test_the_manifest_is_written_whole_and_read_back(tmp_path):
    manifest, job = manifest_with_a_done_job(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["fox", "manifest.json"]  # nothing left aside
    again = Manifest(str(tmp_path), "workflow.json", "jobs.csv")
    assert again.records == manifest.records and again.done_before(job)
    assert json.loads((tmp_path / "manifest.json").read_text())["workflow"] == os.path.abspath("workflow.json")


def test_a_rerun_runs_a_job_again_when_its_files_changed_or_its_prompt_did(tmp_path):
    manifest, job = manifest_with_a_done_job(tmp_path)
    assert manifest.done_before(job)
    assert not manifest.done_before(Job("fox", "jobs.csv:2", {"1": {"class_type": "Save", "inputs": {"x": 1}}}, {}))
    (tmp_path / "fox" / "out.png").write_bytes(b"pictur!")  # same size, other bytes
    assert not manifest.done_before(job)
    (tmp_path / "fox" / "out.png").unlink()
    assert not manifest.done_before(job)
    manifest.records["fox"]["status"] = "failed"
    assert not manifest.done_before(job)


def test_a_folder_that_is_not_a_batchs_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(QueueError) as raised:
        Manifest(str(tmp_path), "workflow.json", "jobs.csv")
    assert raised.value.code == Exit.USAGE and "is not a batch manifest" in raised.value.message


def test_server_seconds_come_from_the_history_messages():
    entry = {"status": {"messages": [["execution_start", {"timestamp": 1000}],
                                     ["execution_cached", {"timestamp": 1100}],
                                     ["execution_success", {"timestamp": 3500}]]}}
    assert server_seconds(entry) == 2.5
    assert server_seconds({"status": {"messages": []}}) is None


def test_the_progress_line_counts_jobs_and_gives_throughput_and_eta():
    assert batch_line(40, 0, 0, 3, 0, 5.0) == "[------------------------] 0/40 jobs: 0 done, 0 failed, 3 running"
    line = batch_line(40, 12, 2, 3, 10, 60.0)  # 2 were done by an earlier run: not in the rate
    assert line.startswith("[########----------------] 14/40 jobs: 12 done, 2 failed, 3 running")
    assert line.endswith("| 10.0 jobs/min | ETA 2m36s")


class FakeServers:
    """Stands in for attempt_job: what each server does with each job, by name."""

    def __init__(self, behaviour):
        self.behaviour = behaviour  # (server url, job name, the batch) -> None (done) or a QueueError
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, run: Batch, attempt) -> None:
        with self.lock:
            self.calls.append((attempt.server.url, attempt.job.name))
        attempt.prompt_id = f"{attempt.server.url}-{attempt.job.name}"
        run.events.put(("queued", attempt))
        outcome = self.behaviour(attempt.server.url, attempt.job.name, run)
        if outcome is not None:
            raise outcome


def run_batch(tmp_path, names, urls, behaviour, retries=2, monkeypatch=None):
    jobs = [Job(name, f"jobs.csv:{index + 2}", {"1": {"class_type": "Save", "inputs": {"n": index}}}, {})
            for index, name in enumerate(names)]
    fake = FakeServers(behaviour)
    monkeypatch.setattr(Batch, "attempt_job", lambda self, attempt: fake(self, attempt))
    run = Batch(jobs, servers(*urls), {}, Manifest(str(tmp_path), "w.json", "j.csv"),
                Options(str(tmp_path), retries, None, False))
    return run, run.run(), fake.calls, json.loads((tmp_path / "manifest.json").read_text())["jobs"]


def test_a_job_lost_with_its_server_runs_on_another_and_the_server_is_set_aside(tmp_path, monkeypatch, capsys):
    lost = QueueError(Exit.CONNECTION_LOST, "lost the connection")
    run, code, calls, records = run_batch(tmp_path, [f"j{i}" for i in range(6)], ["a", "b"],
                                          lambda url, name, run: lost if url == "a" else None,
                                          monkeypatch=monkeypatch)
    assert code == Exit.OK
    assert all(record["status"] == "done" and record["server"] == "b" for record in records.values())
    assert [url for url, _ in calls].count("a") == batch.FAULTS_BEFORE_SET_ASIDE  # then a gets no more jobs
    assert sum(len(record["attempts"]) for record in records.values()) == batch.FAULTS_BEFORE_SET_ASIDE
    assert all(attempt == {"server": "a", "prompt_id": f"a-{name}", "code": 9, "error": "lost the connection"}
               for name, record in records.items() for attempt in record["attempts"])
    assert run.servers[0].set_aside_until is not None
    assert f"a set aside after {batch.FAULTS_BEFORE_SET_ASIDE} faults in a row" in capsys.readouterr().err


def test_a_job_lost_more_often_than_its_retries_fails_with_the_last_fault(tmp_path, monkeypatch, capsys):
    timeout = QueueError(Exit.TIMEOUT, "did not finish within 5 s")
    run, code, calls, records = run_batch(tmp_path, ["slow", "quick"], ["a", "b", "c"],
                                          lambda url, name, run: timeout if name == "slow" else None, retries=1,
                                          monkeypatch=monkeypatch)
    assert code == Exit.BATCH_INCOMPLETE
    assert records["slow"]["status"] == "failed" and records["slow"]["code"] == Exit.TIMEOUT
    tried = [attempt["server"] for attempt in records["slow"]["attempts"]]
    assert len(tried) == 2 and len(set(tried)) == 2  # never twice on one server while another one is there
    assert records["quick"]["status"] == "done"
    out = capsys.readouterr().out
    assert "failed slow (jobs.csv:2, exit 10): did not finish within 5 s" in out


def test_a_job_failing_on_a_node_is_not_retried(tmp_path, monkeypatch, capsys):
    failure = QueueError(Exit.EXECUTION_ERROR, "node 4 'Apply ControlNeXt' failed: cannot serve a SDXL model")
    run, code, calls, records = run_batch(tmp_path, ["bad", "good1", "good2"], ["a", "b"],
                                          lambda url, name, run: failure if name == "bad" else None,
                                          monkeypatch=monkeypatch)
    assert code == Exit.BATCH_INCOMPLETE
    assert [name for _, name in calls].count("bad") == 1
    assert (records["bad"]["status"], records["bad"]["code"], records["bad"]["error"]) == ("failed", 7, failure.message)
    assert records["bad"]["attempts"] == []
    assert records["good1"]["status"] == records["good2"]["status"] == "done"
    assert run.servers[0].faults == run.servers[1].faults == 0


def test_ctrl_c_cancels_the_jobs_in_flight_and_leaves_the_rest_pending(tmp_path, monkeypatch, capsys):
    """Jobs on a server wait until the batch is cancelled, as a prompt waits on a server; the
    second job presses Ctrl-C once it is queued."""
    def behaviour(url, name, run):
        if name == "first":
            return None
        if name == "second":
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        deadline = time.monotonic() + 10
        while not run.cancelled.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return QueueError(Exit.INTERRUPTED, "stopped waiting (cancelled)")

    previous = signal.getsignal(signal.SIGINT)
    run, code, calls, records = run_batch(tmp_path, ["first", "second", "third", "fourth"], ["a", "b"], behaviour,
                                          monkeypatch=monkeypatch)
    assert code == Exit.CTRL_C
    assert {name: record["status"] for name, record in records.items()} == {
        "first": "done", "second": "cancelled", "third": "cancelled", "fourth": "pending"}
    assert signal.getsignal(signal.SIGINT) is previous
    assert "Ctrl-C: cancelling the jobs in flight on their servers" in capsys.readouterr().err


class LostPromptClient:
    """A server that restarted: no history entry, and the prompt is in no queue."""

    def __init__(self, queued: bool = False):
        self.server = "http://127.0.0.1:1"
        self.queued = queued
        self.history_reads = 0

    def history(self, prompt_id):
        self.history_reads += 1
        return None

    def has_queued(self, prompt_id):
        return self.queued


def test_waiting_ends_when_the_server_no_longer_has_the_prompt(monkeypatch):
    monkeypatch.setattr("controlnext_queue.submission.IDLE_CHECK_SECONDS", -1.0)
    monkeypatch.setattr("controlnext_queue.submission.HISTORY_POLL_SECONDS", 0.0)
    with pytest.raises(QueueError) as raised:
        wait(LostPromptClient(), None, "p1", {}, {}, timeout=5.0, show_progress=False)
    assert raised.value.code == Exit.CONNECTION_LOST and "no longer on http://127.0.0.1:1" in raised.value.message


def test_a_queued_prompt_is_waited_for_and_a_cancel_stops_the_wait(monkeypatch):
    monkeypatch.setattr("controlnext_queue.submission.IDLE_CHECK_SECONDS", -1.0)
    monkeypatch.setattr("controlnext_queue.submission.HISTORY_POLL_SECONDS", 0.01)
    cancelled = threading.Event()
    threading.Timer(0.3, cancelled.set).start()
    client = LostPromptClient(queued=True)
    with pytest.raises(QueueError) as raised:
        wait(client, None, "p1", {}, {}, timeout=5.0, show_progress=False, cancelled=cancelled)
    assert raised.value.code == Exit.INTERRUPTED and client.history_reads > 3


class CancellingClient:
    """A server that takes ``polls`` queue reads to drop a cancelled prompt, then has ``entry``."""

    def __init__(self, polls: int, entry: dict | None):
        self.polls, self.entry, self.cancelled = polls, entry, []

    def cancel(self, prompt_id):
        self.cancelled.append(prompt_id)

    def has_queued(self, prompt_id):
        self.polls -= 1
        return self.polls >= 0

    def history(self, prompt_id):
        return self.entry


@pytest.mark.parametrize("entry, kept", [
    ({"status": {"completed": True, "status_str": "success"}, "outputs": {}}, True),  # finished before the cancel
    ({"status": {"completed": True, "status_str": "error"}}, False),  # interrupted
    (None, False),  # taken out of the queue before it ran
])
def test_a_withdrawn_prompt_counts_as_done_only_if_it_finished_first(monkeypatch, entry, kept):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    client = CancellingClient(polls=3, entry=entry)
    withdrawn = batch.withdraw(client, "p1")
    assert client.cancelled == ["p1"] and client.polls == -1  # asked until the prompt left the queue
    assert withdrawn is entry and batch.succeeded(withdrawn) is kept
