"""Smoke test of the benchmark command (benchmarks/run.py --quick, as CI runs it).

It runs the whole benchmark on the tests' shallow models in a real ComfyUI and checks that every
part produced its figures and files. Benchmarks are not timed tests: no figure is asserted
against a target here (the quick models are not the real architectures, and this machine's load
varies); the real run is ``benchmarks/run.py`` without ``--quick`` (README, Benchmarks).
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
def test_quick_benchmark_runs_end_to_end_and_writes_table_json_and_chart(tmp_path):
    command = [sys.executable, os.path.join(PACK_ROOT, "benchmarks", "run.py"), "--quick", "--results", str(tmp_path)]
    process = subprocess.run(command, env=dict(os.environ, COMFYUI_PATH=COMFYUI_PATH), capture_output=True, text=True,
                             timeout=1200)
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]

    summary = json.loads((tmp_path / "benchmark.json").read_text())
    assert summary["quick"] and set(summary["families"]) == {"sd15", "sdxl", "svd"}
    for name, family in summary["families"].items():
        expected = {"bare", "controlnext", "controlnext_half_schedule", "controlnext_two"} | \
            ({"controlnet"} if name != "svd" else set())
        if name != "svd":
            expected.add(f"controlnext_refresh{summary['refresh_k']}")
        assert set(family["median_s"]) == expected
        assert all(value > 0 for value in family["median_s"].values())
        flops = family["flops"]["benchmark"]
        assert 0 < flops["controlnext"] < flops["controlnext_official"] and flops["unet"] > 0
        assert family["params"]["controlnext"] < family["params"]["unet"]
        assert set(family["memory"]["extra_bytes"]) == expected - {"bare"}
        assert {"half_zero_vs_exact", "two_vs_one"} <= set(family["schedule"])
    if "controlnet" in summary["families"]["sd15"]["params"]:
        assert summary["families"]["sd15"]["params"]["controlnet"] > summary["families"]["sd15"]["params"]["controlnext"]
    assert {row["target"].split(":")[0] for row in summary["targets"]} == {"SD1.5", "SDXL", "SVD-XT"}
    accuracy = summary["refresh_accuracy"]["families"]
    assert set(accuracy) == {"sd15", "sdxl"} and all(f["k"] for f in accuracy.values())
    pre = summary["preprocessors"]
    assert pre["canny"]["pixel_agreement"] == 1.0 and pre["pose"]["people_per_frame"] == 1
    assert pre["depth"]["fps"] > 0

    table = (tmp_path / "benchmark.md").read_text()
    assert "| SD1.5 (mid) |" in table and "| SDXL (base) |" in table and "| SVD-XT (base) |" in table
    assert table in process.stdout, "the command prints the table it writes"
    assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
