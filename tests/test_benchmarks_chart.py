"""The benchmark chart (benchmarks/report.py) drawn from a summary of benchmarks/run.py's shape.

A core test: report.py needs matplotlib (benchmarks/requirements.txt, in requirements-test.txt)
but no ComfyUI. The SVD
overhead here is negative, as a noisy side-by-side median can come out on a shared machine.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from conftest import PACK_ROOT

_spec = importlib.util.spec_from_file_location("benchmark_report", os.path.join(PACK_ROOT, "benchmarks", "report.py"))
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def family(key: str, pixels: int, overhead: dict, in_call: dict, floor: float, controlnet_flops: float | None,
           memory: dict) -> dict:
    flops = {"floor": floor} | ({"controlnet_ratio": controlnet_flops} if controlnet_flops else {})
    return {"family": key, "layout": "base", "pixels": [pixels, pixels], "frames": 4 if key == "svd" else 1,
            "device_name": "AMD EPYC", "dtype": "bfloat16", "overhead": overhead, "overhead_in_call": in_call,
            "flops": {"benchmark": flops}, "memory": {"extra_fraction": memory}}


SUMMARY = {"date": "2026-11-26T10:00:00+00:00", "quick": False, "refresh_k": 3, "families": {
    "sd15": family("sd15", 256, {"controlnext": 0.130, "controlnet": 0.295, "controlnext_refresh3": 0.060},
                   {"controlnext": 0.160, "controlnet": 0.362}, 0.202, 0.348, {"controlnext": 0.021, "controlnet": 0.31}),
    "sdxl": family("sdxl", 128, {"controlnext": 0.032, "controlnet": 0.518, "controlnext_refresh3": 0.034},
                   {"controlnext": 0.018, "controlnet": 0.453}, 0.022, 0.463, {"controlnext": 0.004, "controlnet": 0.27}),
    "svd": family("svd", 128, {"controlnext": -0.012}, {"controlnext": 0.026}, 0.039, None, {"controlnext": 0.003}),
}}


def test_chart_draws_a_negative_overhead_below_a_zero_line_with_titled_panels_in_percent():
    time_axis, memory_axis = report.figure(SUMMARY).axes
    for axis, title in ((time_axis, "Time per denoising step"), (memory_axis, "Extra peak memory")):
        assert axis.get_title().startswith(title)
        assert "%" in axis.get_ylabel() and "px" in axis.get_xlabel()
        assert any(line.get_ydata()[0] == 0 == line.get_ydata()[1] for line in axis.get_lines()), "a zero line"
    ours = next(container for container in time_axis.containers if container.get_label() == "ControlNeXt (this pack)")
    heights = [bar.get_height() for bar in ours]
    assert heights == pytest.approx([13.0, 3.2, -1.2]), "one bar per model, in percent"
    assert ours[2].get_y() == 0 and time_axis.get_ylim()[0] < -1.2, "the SVD bar hangs below zero, inside the axes"
    controlnet = next(container for container in time_axis.containers if container.get_label() == "ComfyUI ControlNet")
    assert len(controlnet) == 2, "no ControlNet bar for SVD (none measured), not a zero-height one"


def test_chart_legend_and_panels_fit_the_figure_without_overlapping():
    chart_figure = report.figure(SUMMARY)
    canvas = FigureCanvasAgg(chart_figure)
    canvas.draw()  # lays out the figure (constrained layout) as savefig does
    renderer = canvas.get_renderer()
    (legend,) = chart_figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "ControlNeXt (this pack)", "ControlNeXt, in-call", "ControlNeXt, refresh every 3 steps",
        "ControlNeXt FLOP floor", "ComfyUI ControlNet", "ComfyUI ControlNet FLOPs"]
    legend_box, figure_box = legend.get_window_extent(renderer), chart_figure.bbox
    panel_boxes = [axis.get_tightbbox(renderer) for axis in chart_figure.axes]  # with title, ticks and labels
    assert not legend_box.overlaps(panel_boxes[0]) and not legend_box.overlaps(panel_boxes[1])
    assert not panel_boxes[0].overlaps(panel_boxes[1])
    for box in (legend_box, *panel_boxes):
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and figure_box.y0 <= box.y0, "cut off at an edge"


def test_chart_writes_a_png_with_every_glyph_in_the_font(tmp_path):
    path = str(tmp_path / "benchmark.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font" where it would draw a box
        assert report.chart(SUMMARY, path) == path
    with open(path, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
