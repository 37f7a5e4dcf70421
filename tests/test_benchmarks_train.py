"""Smoke test of the training-step benchmark (benchmarks/train_step.py --quick).

It runs the benchmark on the tests' shallow UNets in a real ComfyUI and checks that every variant
produced its figures and that each side trained what it should. No figure is asserted against a
target (the quick models are not the real architectures, and this machine's load varies); the real
run is ``benchmarks/train_step.py`` without ``--quick`` (README, Benchmarks).
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

VARIANTS = {"bare", "controlnext", "controlnext_encoder", "controlnet", "controlnext_checkpointing",
            "controlnet_checkpointing"}
BYTES = {"float32": 4, "bfloat16": 2}


@pytest.mark.slow
def test_quick_training_benchmark_runs_end_to_end_and_writes_table_and_json(tmp_path):
    command = [sys.executable, os.path.join(PACK_ROOT, "benchmarks", "train_step.py"), "--quick", "--checkpointing",
               "--results", str(tmp_path)]
    process = subprocess.run(command, env=dict(os.environ, COMFYUI_PATH=COMFYUI_PATH), capture_output=True, text=True,
                             timeout=1200)
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]

    summary = json.loads((tmp_path / "train_step.json").read_text())
    assert summary["quick"] and set(summary["families"]) == {"sd15", "sdxl"}
    for family in summary["families"].values():
        assert set(family["median_s"]) == VARIANTS and all(value > 0 for value in family["median_s"].values())
        params, memory = family["params"], family["memory"]
        assert 0 < params["controlnext_encoder"] < params["controlnext"] < params["controlnet"] < params["unet"]
        start = family["controlnet_start"]
        assert start["copied_from_unet"] > 0 and sum(start.values()) == params["controlnet"]
        # the warm-up step created the optimiser states: ControlNet's AdamW keeps two moments per weight
        assert memory["persistent_bytes"]["controlnet"] >= 3 * BYTES[family["controlnet_dtype"]] * params["controlnet"]
        assert memory["persistent_bytes"]["controlnext"] > 4 * params["controlnext"]
        assert memory["persistent_bytes"]["bare"] == 0
        assert all(memory["extra_bytes"][name] > 0 for name in VARIANTS)
        assert set(family["ratios"]) == {"time", "memory", "time_checkpointing", "memory_checkpointing",
                                         "time_encoder", "memory_encoder"}
    assert len(summary["targets"]) == 8

    table = (tmp_path / "train_step.md").read_text()
    assert "| SD1.5 | 64² |" in table and "| SDXL | 64² |" in table
    assert table in process.stdout, "the command prints the table it writes"
