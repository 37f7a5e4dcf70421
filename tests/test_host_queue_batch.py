"""Host tests: the batch command (``python -m controlnext_queue batch``) against three real
ComfyUI servers on 127.0.0.1, one module-scoped set: a batch spread over all of them, bad rows
(values out of the servers' ranges and choices, a table as a picture) reported before anything
runs, a node failure reported while the rest complete, a prompt the server forgot, Ctrl-C and a
rerun, the benchmark's smoke run, and last a server killed mid-job (the job runs on another, once).

The workflow (tests/fixtures/tiny_batch_workflow.json) is the smallest that goes through the
pack: the tests' tiny SDXL model (tests/server_nodes/), a control image, Apply ControlNeXt and a
one-step 64x64 sampler. The parts without a server: test_queue_batch.py.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import host  # noqa: F401  (skips this module without a ComfyUI host; before the host's packages below)
import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
from PIL import Image  # noqa: E402
from controlnext_testbed.official_layouts import random_encoder_state_dict  # noqa: E402
from conftest import PACK_ROOT  # noqa: E402
from server import ComfyServer, make_base_directory  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]

SERVERS = 3
ENCODER = "controlnext_sdxl_base.safetensors"
SD15_ENCODER = "controlnext_sd15_mid.safetensors"  # cannot serve the SDXL model: the job that fails on a node
CONTROLS = 4
# API format; the benchmark of the batch command (benchmarks/queue_batch.py) runs it too.
WORKFLOW = os.path.join(PACK_ROOT, "tests", "fixtures", "tiny_batch_workflow.json")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = []
    for index in range(SERVERS):
        base = make_base_directory(str(tmp_path_factory.mktemp(f"batch_base{index}")))
        for name, layout in ((ENCODER, "base"), (SD15_ENCODER, "mid")):
            safetensors.torch.save_file(random_encoder_state_dict(layout), os.path.join(base, "models", "controlnext",
                                                                                        name))
        started.append(ComfyServer(base))
    try:
        with concurrent.futures.ThreadPoolExecutor(SERVERS) as pool:
            list(pool.map(lambda server: server.start(timeout=180), started))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The workflow and a folder of control images, beside the jobs files the tests write."""
    folder = tmp_path_factory.mktemp("batch_files")
    shutil.copy(WORKFLOW, folder / "workflow.json")
    (folder / "controls").mkdir()
    rng = np.random.default_rng(0)
    for index in range(CONTROLS):
        blocks = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(blocks).resize((64, 64), Image.NEAREST).save(folder / "controls" / f"c{index}.png")
    return folder


def write_jobs(folder, name: str, header: str, rows: list[str]) -> str:
    path = folder / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def batch_args(files, jobs: str, servers, out, *extra: str) -> list[str]:
    return [sys.executable, "-S", "-m", "controlnext_queue", "batch", str(files / "workflow.json"), "--jobs", jobs,
            *(arg for server in servers for arg in ("--server", server.url)), "--out", str(out), *extra]


def run_batch(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command as a user runs it; ``-S`` (no site-packages) proves it needs only the stdlib."""
    return subprocess.run(batch_args(*args), cwd=PACK_ROOT, capture_output=True, text=True, timeout=timeout)


def start_batch(*args) -> subprocess.Popen:
    return subprocess.Popen(batch_args(*args), cwd=PACK_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def manifest(out) -> dict:
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as file:
        return json.load(file)["jobs"]


def wait_for_manifest(out, process: subprocess.Popen, ready, timeout: float = 120) -> dict:
    """The manifest once ``ready(jobs)`` holds (it is rewritten whole as jobs start and end)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the batch ended first (exit {process.returncode}):\n{process.stderr.read()}")
        try:
            jobs = manifest(out)
        except (OSError, ValueError):
            jobs = {}
        if jobs and ready(jobs):
            return jobs
        time.sleep(0.05)
    raise AssertionError(f"the manifest did not get there within {timeout} s")


def history_statuses(server: ComfyServer) -> dict[str, str]:
    """Prompt id -> status_str of everything the server has run."""
    return {prompt_id: entry["status"]["status_str"] for prompt_id, entry in server.get("/history").items()}


def new_history(servers, before: list[dict]) -> list[dict]:
    return [{k: v for k, v in history_statuses(server).items() if k not in old} for server, old in zip(servers, before)]


def assert_outputs_intact(out, record: dict) -> None:
    assert record["outputs"], record
    for output in record["outputs"]:
        path = os.path.join(out, output["path"])
        with open(path, "rb") as file:
            data = file.read()
        assert len(data) == output["size"]
        assert hashlib.sha256(data).hexdigest() == output["sha256"]
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        assert pixels.shape == (8, 8, 3) and pixels.std() > 0


@pytest.fixture(scope="module")
def spread(servers, files, tmp_path_factory):
    """20 jobs (5 rows x the 4 control images of a folder) and one that fails on a node, over
    the three servers; with what each server ran."""
    jobs = write_jobs(files, "sweep.csv", "name,Control,KSampler.seed,Apply ControlNeXt.strength,"
                      "Load ControlNeXt.controlnext_name",
                      [f"sweep{row},controls,{row},{0.5 + row / 10}," for row in range(5)]
                      + [f"wrong-family,controls/c0.png,9,1.0,{SD15_ENCODER}"])
    out = tmp_path_factory.mktemp("spread_out")
    before = [history_statuses(server) for server in servers]
    result = run_batch(files, jobs, servers, out)
    return result, out, manifest(out), new_history(servers, before)


def test_a_batch_spreads_over_every_server_and_records_each_job(servers, spread):
    result, out, jobs, ran = spread
    done = {name: record for name, record in jobs.items() if record["status"] == "done"}
    assert sorted(done) == sorted(f"sweep{row}-c{index}" for row in range(5) for index in range(CONTROLS)), \
        result.stderr + "".join(server.log()[-2000:] for server in servers)
    assert {record["server"] for record in done.values()} == {server.url for server in servers}
    for record in done.values():
        assert_outputs_intact(out, record)
        assert record["attempts"] == [] and record["seconds"] > 0 and record["server_seconds"] > 0
    for server, prompts in zip(servers, ran):  # each job ran once, on the server the manifest names
        assert {k for k, v in prompts.items() if v == "success"} == \
            {record["prompt_id"] for record in done.values() if record["server"] == server.url}
    assert "21/21 jobs: 20 done, 1 failed, 0 running" in result.stderr
    assert "jobs/min" in result.stderr and "ETA" in result.stderr
    assert "21 job(s): 20 done (0 by an earlier run), 1 failed, 0 not run" in result.stdout


def test_a_job_failing_on_a_node_is_reported_with_its_message_while_the_rest_complete(servers, spread):
    result, out, jobs, ran = spread
    assert result.returncode == 11, result.stderr
    record = jobs["wrong-family"]
    assert record["status"] == "failed" and record["code"] == 7 and record["attempts"] == []  # not retried
    assert "'Apply ControlNeXt'" in record["error"] and "cannot serve a SDXL model" in record["error"]
    assert [prompts.get(record["prompt_id"]) for prompts in ran].count("error") == 1
    assert f"failed wrong-family ({record['source']}, exit 7): {record['error']}" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_bad_rows_are_reported_alone_before_anything_runs(servers, files, tmp_path):
    rows = [{"name": "good", "Control": "controls/c0.png"}, {"name": "unknown-node", "Nope.seed": 3},
            {"name": "also-good", "Control": "controls", "KSampler.seed": 4},
            {"name": "missing-file", "Control": "controls/c9.png"}]
    jobs = files / "bad.jsonl"
    jobs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = [history_statuses(server) for server in servers]
    result = run_batch(files, str(jobs), servers, tmp_path / "out", timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"2 problem(s) in 2 row(s) of {jobs}; nothing was queued" in result.stderr
    reported = [line.strip().split(": ")[0] for line in result.stderr.splitlines() if line.startswith(f"  {jobs}:")]
    assert reported == [f"{jobs}:2", f"{jobs}:4"]
    assert "no node 'Nope'" in result.stderr and "c9.png" in result.stderr
    assert new_history(servers, before) == [{}] * SERVERS
    assert not (tmp_path / "out").exists()


def test_values_the_server_would_refuse_and_a_table_as_a_picture_are_named_before_anything_runs(servers, files,
                                                                                                tmp_path):
    """Ranges and choices as the servers' /object_info gives them; without the check each job
    would be refused by its server (exit 4) or fail reading the table."""
    (files / "notes.csv").write_text("name,seed\nfox,7\n")
    jobs = write_jobs(files, "ranges.csv",
                      "name,Control,KSampler.seed,Apply ControlNeXt.strength,KSampler.sampler_name",
                      ["fine,controls/c0.png,1,1.0,euler", "bad,notes.csv,-5,99,euler_x"])
    before = [history_statuses(server) for server in servers]
    result = run_batch(files, jobs, servers, tmp_path / "out", timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"4 problem(s) in 1 row(s) of {jobs}; nothing was queued:" in result.stderr
    for problem in ["KSampler.seed: -5 is out of range (allowed: a whole number from 0 to 18446744073709551615).",
                    "Apply ControlNeXt.strength: 99.0 is out of range (allowed: a number from 0.0 to 10.0).",
                    "KSampler.sampler_name: 'euler_x' is not one of the choices (allowed: one of euler, ",
                    f"Control: {files / 'notes.csv'} is not a picture (allowed: PNG, JPEG, WEBP, GIF, BMP or TIFF"]:
        assert f"\n  {jobs}:3: {problem}" in result.stderr, result.stderr

    result = run_batch(files, jobs, servers, tmp_path / "out", "--set", "KSampler.steps=0", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error: --set KSampler.steps: 0 is out of range (allowed: a whole number from 1 to 10000)." in result.stderr
    assert new_history(servers, before) == [{}] * SERVERS
    assert not (tmp_path / "out").exists()


def test_a_prompt_the_server_no_longer_has_runs_on_another_server(servers, files, tmp_path):
    """A restarted server forgets its queue; so does one whose waiting prompt is deleted, which is
    what happens here to one of the two long jobs the first server holds (the one it has not
    started: the two are queued at once, in either order)."""
    jobs = write_jobs(files, "forgotten.csv", "name,Control,KSampler.seed,KSampler.steps",
                      ["long1,controls/c1.png,11,12", "quick,controls/c2.png,12,1", "long2,controls/c3.png,13,12"])
    out = tmp_path / "out"
    first, second = servers[:2]
    process = start_batch(files, jobs, [first, second], out, "--per-server", "2")
    try:
        queued = wait_for_manifest(out, process, lambda jobs: None not in (jobs["long1"].get("prompt_id"),
                                                                           jobs["long2"].get("prompt_id")))
        assert queued["long1"]["server"] == queued["long2"]["server"] == first.url
        prompts = {queued[name]["prompt_id"]: name for name in ("long1", "long2")}
        deadline = time.time() + 60
        while not (pending := [item[1] for item in first.get("/queue")["queue_pending"] if item[1] in prompts]):
            assert time.time() < deadline, "neither long job waits in the first server's queue"
            time.sleep(0.05)
        assert first.post("/queue", {"delete": pending})[0] == 200
        stdout, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    records = manifest(out)
    forgotten = records[prompts[pending[0]]]
    assert forgotten["status"] == "done" and forgotten["server"] == second.url
    (attempt,) = forgotten["attempts"]
    assert attempt["server"] == first.url and attempt["code"] == 9 and "is no longer on" in attempt["error"]
    assert all(record["status"] == "done" for record in records.values())
    assert_outputs_intact(out, forgotten)


def test_ctrl_c_cancels_the_prompts_in_flight_and_a_rerun_runs_only_the_rest(servers, files, tmp_path):
    """Ctrl-C once two jobs are done, with two jobs on each server (one running, one waiting)."""
    job_count = 9
    jobs = write_jobs(files, "interrupted.csv", "name,Control,KSampler.seed,KSampler.steps",
                      [f"job{index},controls/c{index % CONTROLS}.png,{100 + index},4" for index in range(job_count)])
    out = tmp_path / "out"
    args = (files, jobs, servers, out, "--per-server", "2")
    process = start_batch(*args)
    try:
        wait_for_manifest(out, process, lambda jobs: sum(r["status"] == "done" for r in jobs.values()) >= 2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    first = manifest(out)
    statuses = [record["status"] for record in first.values()]
    assert set(statuses) <= {"done", "cancelled", "pending"} and "cancelled" in statuses, first
    for server in servers:  # the running prompts interrupted, the waiting ones out of the queues
        server.wait_until_idle(timeout=30)
    for record in first.values():
        if record["status"] == "cancelled" and record.get("prompt_id"):
            entry = next(server for server in servers if server.url == record["server"]).get(
                f"/history/{record['prompt_id']}").get(record["prompt_id"])
            assert entry is None or entry["status"]["status_str"] == "error", entry  # never ran, or interrupted
    done_first = {name: record for name, record in first.items() if record["status"] == "done"}

    result = run_batch(*args)
    assert result.returncode == 0, result.stderr
    second = manifest(out)
    assert all(record["status"] == "done" for record in second.values())
    assert f"{job_count} job(s): {job_count} done ({len(done_first)} by an earlier run)" in result.stdout
    for name, record in second.items():
        assert_outputs_intact(out, record)
        if name in done_first:
            assert record == done_first[name]  # skipped: the same prompt, files and times


def test_the_benchmark_gives_jobs_per_minute_and_the_clients_cost_per_job(servers, tmp_path):
    """A smoke run of benchmarks/queue_batch.py on these servers (figures: README, Batches)."""
    figures = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, os.path.join(PACK_ROOT, "benchmarks", "queue_batch.py"), "--jobs", "2",
                             *(arg for server in servers for arg in ("--server", server.url)), "--out", str(figures)],
                            cwd=PACK_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = json.loads(figures.read_text())["runs"]
    assert [run["servers"] for run in runs] == list(range(1, SERVERS + 1)) and runs[0]["scaling"] == 1.0
    for run in runs:
        assert run["jobs"] == 2 and run["jobs_per_minute"] > 0 and run["server_s_per_job"] > 0
        assert run["client_cpu_ms_per_job"] > 0 and run["outside_run_ms_per_job"] > 0
    assert result.stdout.splitlines()[0].startswith("| servers | jobs/min | scaling |")


def test_a_server_killed_mid_job_loses_no_job_and_runs_none_twice(servers, files, tmp_path):
    """Its job goes to another server; the server is set aside once its next job is refused.
    The killed server is started again afterwards, for the other tests of this module."""
    jobs = write_jobs(files, "killed.csv", "name,Control,KSampler.seed,KSampler.steps",
                      ["long,controls/c0.png,21,12"] + [f"quick{i},controls/c{i % CONTROLS}.png,{30 + i},1"
                                                        for i in range(8)])
    out = tmp_path / "out"
    before = [history_statuses(server) for server in servers]
    process = start_batch(files, jobs, servers, out, "--verbose")
    killed = None
    try:
        running = wait_for_manifest(out, process, lambda jobs: jobs["long"].get("prompt_id") is not None)["long"]
        killed = next(server for server in servers if server.url == running["server"])
        deadline = time.time() + 60
        while not any(item[1] == running["prompt_id"] for item in killed.get("/queue")["queue_running"]):
            assert time.time() < deadline, "the long job did not start"
            time.sleep(0.05)
        killed.process.kill()
        stdout, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
        if killed is not None:
            killed.process.wait()
            killed.start(timeout=180)
    assert process.returncode == 0, stderr
    records = manifest(out)
    assert all(record["status"] == "done" for record in records.values())
    long = records["long"]
    assert long["server"] != killed.url and long["attempts"][0]["server"] == killed.url
    assert long["attempts"][0]["code"] == 9 and long["attempts"][0]["prompt_id"] == running["prompt_id"]
    assert all(attempt["server"] == killed.url for record in records.values() for attempt in record["attempts"])
    assert f"{killed.url} set aside after 2 faults in a row" in stderr
    survivors = [(server, ran) for server, ran in zip(servers, new_history(servers, before)) if server is not killed]
    for server, ran in survivors:  # every job done once, where the manifest says
        assert {k for k, v in ran.items() if v == "success"} == \
            {record["prompt_id"] for record in records.values() if record["server"] == server.url}
    for record in records.values():
        assert_outputs_intact(out, record)
