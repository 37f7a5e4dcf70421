"""Smoke test of the training-data benchmark (benchmarks/train_data.py --quick).

It runs the benchmark on 20 / 200 pictures in a real ComfyUI and checks that every part produced its
figures: the memory runs trained from their caches (built before, nothing encoded again), the step-time
run read the same batches from the cache as from memory, and the cache sizes add up. No figure is
asserted against a target (the quick run is small and this machine's load varies); the real run is
``benchmarks/train_data.py`` without ``--quick`` (README, Benchmarks).
"""
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
def test_quick_training_data_benchmark_runs_end_to_end_and_writes_table_and_json(tmp_path):
    command = [sys.executable, os.path.join(PACK_ROOT, "benchmarks", "train_data.py"), "--quick", "--results",
               str(tmp_path)]
    process = subprocess.run(command, env=dict(os.environ, COMFYUI_PATH=COMFYUI_PATH), capture_output=True, text=True,
                             timeout=1200)
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]

    summary = json.loads((tmp_path / "train_data.json").read_text())
    assert summary["quick"]
    memory = summary["memory"]
    for size, count in (("small", 20), ("large", 200)):
        assert memory["builds"][size]["pictures"] == count
        [run] = memory[size]
        assert run["pictures"] == count and run["note"].startswith(f"All {count} pairs were in the cache")
        assert set(run["phases"]) == {"setup", "load", "cache check", "train"}
        assert run["peak"] >= run["phases"]["setup"]["after"] > 0
    assert memory["in_memory"]["input_bytes"] > 0 and "inputs" in memory["in_memory"]["phases"]
    assert memory["ratio"] > 0
    for family, build in summary["throughput"].items():
        assert build["encoder"] == "taesd" and build["pictures_per_s"] > 0
        assert set(build["tensors"]) == ({"latent", "context", "control", "pooled"} if family == "sdxl"
                                         else {"latent", "context", "control"})
        assert build["tensors"]["control"]["dtype"] == "uint8"
        assert build["cache_bytes"] > build["pictures"] * build["tensor_bytes_per_picture"]
    computed = summary["computed"]["families"]
    assert computed["sd15"]["parts"]["control"] == 3 * 512 * 512 and computed["sdxl"]["parts"]["pooled"] == 4 * 1280
    for family, steps in summary["steps"].items():
        assert steps["batches_identical"] and steps["order"] == ["memory", "cache"]
        assert all(len(records) == 2 for records in steps["records"].values())
        assert steps["ratio"]["cpu"] > 0 and steps["ratio"]["in_call"] > 0
        assert steps["reads"]["row_by_row_ms"] > 0 and steps["reads"]["one_call_ms"] > 0
    assert len(summary["targets"]) == 3

    table = (tmp_path / "train_data.md").read_text()
    assert "| cache | 20 |" in table and "| cache | 200 |" in table and "| in memory | 200 |" in table
    assert table in process.stdout, "the command prints the table it writes"
