"""Smoke test of the convergence study (benchmarks/convergence.py --quick).

The quick run builds the whole toy world at a few steps each (shapes, autoencoder, base), trains
every method a few steps, samples through ComfyUI at each checkpoint and writes the JSON, the table
and both figures. No figure is asserted against a target: the quick models are barely trained (the
real run is ``benchmarks/convergence.py`` without ``--quick``, README, Benchmarks).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import COMFYUI_PATH, HOST_SKIP_REASON, PACK_ROOT

if not COMFYUI_PATH:
    pytest.skip(HOST_SKIP_REASON, allow_module_level=True)

METHODS = {"controlnext", "controlnext_encoder", "controlnet"}


@pytest.mark.slow
def test_quick_convergence_study_runs_end_to_end(tmp_path):
    command = [sys.executable, os.path.join(PACK_ROOT, "benchmarks", "convergence.py"), "--quick",
               "--results", str(tmp_path), "--figures", str(tmp_path)]
    process = subprocess.run(command, env=dict(os.environ, COMFYUI_PATH=COMFYUI_PATH), capture_output=True, text=True,
                             timeout=900)
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]

    report = json.loads((tmp_path / "convergence.json").read_text())
    settings = report["settings"]
    assert report["preset"] == "quick"
    assert {(run["method"], run["seed"]) for run in report["runs"]} == {(m, s) for m in METHODS for s in settings["seeds"]}
    for run in report["runs"]:
        assert run["steps"] == settings["checkpoints"]
        assert [len(scores) for scores in run["iou"]] == [settings["heldout_pictures"]] * len(settings["checkpoints"])
        assert all(0.0 <= value <= 1.0 for scores in run["iou"] for value in scores)
        assert len(run["step_cpu_s"]) == settings["checkpoints"][-1]
    methods = report["summary"]["methods"]
    assert set(methods) == METHODS
    # ControlNeXt trains the encoder (and the recipe's UNet subset); ControlNet a copy of the UNet's encoder half
    parameters = {name: data["trained_parameters"] for name, data in methods.items()}
    assert parameters["controlnext_encoder"] < parameters["controlnext"] < parameters["controlnet"]
    assert all(data["peak_step_bytes"] > 0 and data["persistent_bytes"] > 0 for data in methods.values())
    # ControlNet starts with its zero convolutions at zero: its step 0 is the uncontrolled base, sample for sample
    controlnet_step0 = next(run for run in report["runs"] if run["method"] == "controlnet")["iou"][0]
    assert controlnet_step0 == report["world"]["uncontrolled_iou"]

    table = (tmp_path / "convergence.md").read_text()
    assert table in process.stdout, "the command prints the table it writes"
    assert all(methods[m]["label"] in table for m in METHODS)
    with Image.open(tmp_path / "convergence.png") as plot, Image.open(tmp_path / "convergence_samples.png") as grid:
        assert plot.width > 400 and grid.width > 64 * (3 + 3 * len(settings["grid_steps"]))


def test_steps_to_ninety_percent_count_from_where_the_curve_stays_up():
    sys.path.insert(0, os.path.join(PACK_ROOT, "benchmarks"))
    import convergence

    steps = [0, 25, 50, 100]
    assert convergence.steps_to_fraction(steps, [0.10, 0.05, 0.20, 0.19], 0.19, 0.0) == 50
    assert convergence.steps_to_fraction(steps, [0.10, 0.20, 0.10, 0.20], 0.20, 0.0) == 100  # a dip after a peak
    assert convergence.steps_to_fraction(steps, [0.10, 0.12, 0.14, 0.20], 0.20, 0.10) == 100  # 90 % of the gain: 0.19
    assert convergence.steps_to_fraction(steps, [0.10, 0.11, 0.09, 0.10], 0.10, 0.10) is None  # no gain
