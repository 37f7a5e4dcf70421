"""Smoke test of the training-throughput benchmark (benchmarks/train_throughput.py --quick): the
headless command on the tiny SD1.5 checkpoint, one and two processes on the CPU, in a real ComfyUI.
No figure is asserted against a target (a loaded 2-core machine); the real run is on GPUs
(README, Several GPUs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import COMFYUI_PATH, HOST_SKIP_REASON, PACK_ROOT

if not COMFYUI_PATH:
    pytest.skip(HOST_SKIP_REASON, allow_module_level=True)


@pytest.mark.slow
def test_quick_throughput_benchmark_runs_one_and_two_processes_and_writes_table_and_json(tmp_path):
    command = [sys.executable, os.path.join(PACK_ROOT, "benchmarks", "train_throughput.py"), "--quick", "--work",
               str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    process = subprocess.run(command, env=dict(os.environ, COMFYUI_PATH=COMFYUI_PATH), capture_output=True, text=True,
                             timeout=900)
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    summary = json.loads((tmp_path / "results" / "train_throughput.json").read_text())
    runs = summary["families"]["sd15"]
    assert summary["quick"] and [entry["processes"] for entry in runs] == [1, 2]
    for entry in runs:
        assert len(entry["step_s"]) == summary["steps"] - summary["warmup"] - 1
        assert entry["median_step_s"] > 0 and entry["global_batch"] == entry["processes"]
        assert entry["device"] == "cpu" and entry["peak_gpu_bytes_per_process"] is None
    table = (tmp_path / "results" / "train_throughput.md").read_text()
    assert "| SD1.5 | 64² | 2 | 2 |" in table and "scaling efficiency" in table
