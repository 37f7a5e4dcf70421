"""Tables, targets and the chart of benchmarks/run.py (from its summary dict)."""
from __future__ import annotations

try:
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter
except ImportError as error:
    raise ImportError("the benchmark chart needs matplotlib: pip install -r benchmarks/requirements.txt") from error

NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "svd": "SVD-XT"}


def _pct(value: float | None, sign: bool = True) -> str:
    if value is None:
        return "–"
    return f"{'+' if sign and value >= 0 else ''}{100 * value:.1f} %"


def _size(family: dict) -> str:
    height, width = family["pixels"]
    size = f"{height}²" if height == width else f"{height}×{width}"
    return f"{family['frames']} × {size}" if family["family"] == "svd" else size


def _millions(count: int | None) -> str:
    return "–" if count is None else f"{count / 1e6:,.1f} M"


def _refresh_name(family: dict) -> str | None:
    return next((name for name in family["overhead"] if name.startswith("controlnext_refresh")), None)


def targets(summary: dict) -> list[dict]:
    """Issue 4's targets, each with the measured value and its limit (fractions)."""
    rows = []

    def add(name: str, value: float | None, limit: float | None, in_call: float | None = None,
            in_call_limit: float | None = None) -> None:
        if value is not None and limit is not None:
            row = {"target": name, "value": value, "limit": limit, "met": value <= limit}
            if in_call is not None:
                row.update(in_call=in_call, in_call_limit=in_call_limit if in_call_limit is not None else limit)
                row["met_in_call"] = in_call <= row["in_call_limit"]
            rows.append(row)

    families = summary["families"]
    for key, family in families.items():
        overhead = family["overhead"]["controlnext"]
        controlnet = family["overhead"].get("controlnet")
        in_call = family.get("overhead_in_call", {})
        ours, theirs = in_call.get("controlnext"), in_call.get("controlnet")
        name = NAMES[key]
        if key == "sd15":
            floor = 1.15 * family["flops"]["benchmark"]["floor"]
            add(f"{name}: time overhead <= 1.15 x FLOP floor", overhead, floor, ours)
            add(f"{name}: time overhead <= 0.6 x ControlNet's", overhead, controlnet and 0.6 * controlnet, ours,
                theirs and 0.6 * theirs)
        elif key == "sdxl":
            add(f"{name}: time overhead <= 4 %", overhead, 0.04, ours)
            add(f"{name}: time overhead <= 1/10 of ControlNet's", overhead, controlnet and controlnet / 10, ours,
                theirs and theirs / 10)
        elif key == "svd":
            add(f"{name}: time overhead <= 4 %", overhead, 0.04, ours)
        add(f"{name}: extra peak memory <= 5 %", family["memory"]["extra_fraction"]["controlnext"], 0.05)
        schedule = family.get("schedule", {})
        add(f"{name}: strength 0 on half the steps <= 0.6 x exact's added time", schedule.get("half_zero_vs_exact"),
            0.6, schedule.get("half_zero_vs_exact_in_call"))
        add(f"{name}: two ControlNeXts <= 2.2 x one's added time", schedule.get("two_vs_one"), 2.2,
            schedule.get("two_vs_one_in_call"))
    return rows


def markdown(summary: dict) -> str:
    machine = summary["machine"]
    families = summary["families"]
    first = next(iter(families.values()), {})
    device = first.get("device_name", machine.get("cpu", "?"))
    cpu_clock = first.get("clock") == "cpu"
    lines = [
        f"Measured {summary['date'][:10]} on {device} ({machine.get('ram_gib', '?')} GiB RAM), "
        f"torch {machine['torch']}, ComfyUI {summary['comfyui'].get('version') or '?'}"
        f"{' (quick smoke run: shallow test models)' if summary['quick'] else ''}. "
        f"UNets in {first.get('dtype', '?')} with random weights; one step = ComfyUI's denoiser with CFG "
        f"(cond + uncond in one batch); median of {summary['runs']} side-by-side rounds after a warm-up"
        + (f"; time = the step's CPU time on one thread (other jobs shared the machine: load average "
           f"{summary.get('load_average_start')} → {summary.get('load_average_end')}; wall-clock figures are in "
           f"the JSON)" if cpu_clock else "") + ". Overheads: side by side (the variant's median step against the "
        "bare UNet's)" + ("; in brackets, in-call (the time spent inside our patch or ComfyUI's ControlNet "
                          "`get_control`, against the rest of the same calls)" if cpu_clock else "") + ".",
        "",
        "| model | size | bare UNet | + ControlNeXt | + ControlNet | ControlNeXt overhead | its FLOP floor "
        "| ControlNet overhead | its FLOPs | ours ÷ ControlNet | refresh every "
        f"{summary['refresh_k']} steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def overhead_cell(family: dict, name: str) -> str:
        value = family["overhead"].get(name)
        in_call = family.get("overhead_in_call", {}).get(name)
        if value is None:
            return "–"
        return _pct(value) + (f" ({_pct(in_call, False)})" if in_call is not None else "")

    for key, family in families.items():
        medians, flops = family["median_s"], family["flops"]["benchmark"]
        refresh = _refresh_name(family)
        has_cn = "controlnet" in medians
        ratio = "–"
        if has_cn:
            ratio = f"{family['overhead_vs_controlnet']:.2f}"
            if "overhead_in_call_vs_controlnet" in family:
                ratio += f" ({family['overhead_in_call_vs_controlnet']:.2f})"
        cells = [f"{NAMES[key]} ({family['layout']})", _size(family), f"{medians['bare']:.3f} s",
                 f"{medians['controlnext']:.3f} s", f"{medians['controlnet']:.3f} s" if has_cn else "–",
                 overhead_cell(family, "controlnext"), _pct(flops["floor"], False),
                 overhead_cell(family, "controlnet"), _pct(flops.get("controlnet_ratio"), False), ratio,
                 overhead_cell(family, refresh) if refresh else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if any("schedule" in family for family in families.values()):
        lines += ["", "Schedules and several controls: the added time of ControlNeXt at strength 0 on every other "
                  "step (a per-step list), and of two ControlNeXts (two files, two images) on one model; "
                  "÷ exact: as a share of one exact ControlNeXt's" + (" (in-call in brackets)" if cpu_clock else "")
                  + ".", "", "| model | ControlNeXt | strength 0 on every other step | ÷ exact | two ControlNeXts "
                  "| ÷ one |", "|---|---|---|---|---|---|"]
        for key, family in families.items():
            schedule = family.get("schedule")
            if not schedule:
                continue

            def ratio(name: str) -> str:
                in_call = schedule.get(f"{name}_in_call")
                return f"{schedule[name]:.2f}" + (f" ({in_call:.2f})" if in_call is not None else "")

            lines.append(f"| {NAMES[key]} | {overhead_cell(family, 'controlnext')} | "
                         f"{overhead_cell(family, 'controlnext_half_schedule')} | {ratio('half_zero_vs_exact')} | "
                         f"{overhead_cell(family, 'controlnext_two')} | {ratio('two_vs_one')} |")
    lines += ["", "| model | UNet params | ControlNeXt params | ControlNet params | extra peak memory, ControlNeXt "
              "| extra peak memory, ControlNet |", "|---|---|---|---|---|---|"]
    for key, family in families.items():
        params, memory = family["params"], family["memory"]
        extra, fraction = memory["extra_bytes"], memory["extra_fraction"]
        cn = params.get("controlnet")
        lines.append(
            f"| {NAMES[key]} | {_millions(params['unet'])} | {_millions(params['controlnext'])} "
            f"({100 * params['controlnext'] / params['unet']:.2f} %) | "
            + (f"{_millions(cn)} ({100 * cn / params['unet']:.1f} %)" if cn else "–")
            + f" | {_pct(fraction['controlnext'])} ({extra['controlnext'] / 2 ** 20:.0f} MiB) | "
            + (f"{_pct(fraction['controlnet'])} ({extra['controlnet'] / 2 ** 20:.0f} MiB)" if "controlnet" in extra
               else "–") + " |")
    if any("paper" in f["flops"] for f in families.values()):
        lines += ["", "FLOP floors at the paper's sizes (torch's FLOP counter, matmuls and convolutions, one CFG "
                  "step of batch 2 per latent):", "",
                  "| model | size | UNet | ControlNeXt, encoded once per step (this pack) | encoded for every CFG "
                  "row (official) | ControlNet |", "|---|---|---|---|---|---|"]
        for key, family in families.items():
            paper = family["flops"].get("paper")
            if not paper:
                continue
            height, width = paper["pixels"]
            size = f"{paper['frames']} × {height}×{width}" if key == "svd" else f"{height}²"
            lines.append(
                f"| {NAMES[key]} | {size} | {paper['unet'] / 1e9:,.0f} GFLOPs | {paper['controlnext'] / 1e9:,.0f} "
                f"({_pct(paper['floor'], False)}) | {paper['controlnext_official'] / 1e9:,.0f} "
                f"({_pct(paper['official'], False)}) | "
                + (f"{paper['controlnet'] / 1e9:,.0f} ({_pct(paper['controlnet_ratio'], False)})" if "controlnet" in paper
                   else "–") + " |")
    accuracy = summary.get("refresh_accuracy")
    if accuracy:
        ks = sorted({k for f in accuracy["families"].values() for k in f["k"]}, key=int)
        any_family = next(iter(accuracy["families"].values()))
        lines += ["", f"Refresh every k steps vs exact ({any_family['steps']} {any_family['sampler']} steps, "
                  f"{accuracy['models']}): how far the final latent moves, as a share of the control's own effect "
                  f"(|refresh − exact| / |exact − bare|)", "",
                  "| model | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for key, family in accuracy["families"].items():
            lines.append(f"| {NAMES[key]} | " + " | ".join(_pct(family["k"][k]["vs_control_effect"], False)
                                                          for k in ks) + " |")
    pre = summary.get("preprocessors")
    if pre:
        canny, pose, depth = pre["canny"], pre["pose"], pre["depth"]
        lines += ["", "| preprocessor (CPU) | frames | per frame | frames/s | note |", "|---|---|---|---|---|",
                  f"| canny, cv2 loop | {canny['frames']} × {canny['size']}² | "
                  f"{1000 * canny['cv2_loop_s'] / canny['frames']:.2f} ms | {canny['cv2_loop_fps']:.0f} | "
                  f"what the node runs on a CPU |",
                  f"| canny, batched tensors | {canny['frames']} × {canny['size']}² | "
                  f"{1000 * canny['batched_s'] / canny['frames']:.2f} ms | {canny['batched_fps']:.0f} | "
                  f"{canny['batched_vs_cv2']:.3g}× the cv2 loop's speed; pixel agreement {100 * canny['pixel_agreement']:.3f} % |",
                  f"| DWPose (pipeline) + drawing | {pose['frames']} × {pose['size']}² | "
                  f"{pose['detect_ms_per_frame']:.1f} + {pose['draw_ms_per_frame']:.1f} ms | {pose['fps']:.1f} | "
                  f"stand-in networks: the network time of YOLOX-L + RTMPose-L comes on top |",
                  f"| depth (pipeline) | {depth['frames']} × {depth['size']}² | {depth['ms_per_frame']:.1f} ms | "
                  f"{depth['fps']:.1f} | tiny Depth Anything: Depth-Anything-V2-Small's network time comes on top |"]
    if summary.get("targets"):
        lines += ["", "| target | side by side | limit | met | in-call | limit | met |",
                  "|---|---|---|---|---|---|---|"]
        for row in summary["targets"]:
            in_call = "| – | – | – |"
            if "in_call" in row:
                in_call = (f"| {_pct(row['in_call'], False)} | {_pct(row['in_call_limit'], False)} "
                           f"| {'yes' if row['met_in_call'] else 'no'} |")
            lines.append(f"| {row['target']} | {_pct(row['value'], False)} | {_pct(row['limit'], False)} "
                         f"| {'yes' if row['met'] else 'no'} {in_call}")
    return "\n".join(lines) + "\n"


def figure(summary: dict) -> Figure:
    """The chart as a matplotlib Figure: per-step time overhead (measured and FLOP floors) and extra peak
    memory, each over the bare UNet, one legend below both panels. A bare Figure renders with Agg and never
    touches pyplot, so it draws headless and leaves the caller's backend alone."""
    families = summary["families"]
    first = next(iter(families.values()))
    labels = [f"{NAMES[k]}\n{_size(f)}" for k, f in families.items()]

    def column(value) -> list[float | None]:
        return [value(family) for family in families.values()]

    blue, red = "tab:blue", "tab:red"
    time_series = {
        "ControlNeXt (this pack)": (blue, column(lambda f: f["overhead"]["controlnext"])),
        "ControlNeXt, in-call": ("lightskyblue", column(lambda f: f.get("overhead_in_call", {}).get("controlnext"))),
        f"ControlNeXt, refresh every {summary['refresh_k']} steps": (
            "tab:green", column(lambda f: f["overhead"][_refresh_name(f)] if _refresh_name(f) else None)),
        "ControlNeXt FLOP floor": (blue, column(lambda f: f["flops"]["benchmark"]["floor"])),
        "ComfyUI ControlNet": (red, column(lambda f: f["overhead"].get("controlnet"))),
        "ComfyUI ControlNet FLOPs": (red, column(lambda f: f["flops"]["benchmark"].get("controlnet_ratio"))),
    }
    memory_series = {
        "ControlNeXt (this pack)": (blue, column(lambda f: f["memory"]["extra_fraction"]["controlnext"])),
        "ComfyUI ControlNet": (red, column(lambda f: f["memory"]["extra_fraction"].get("controlnet"))),
    }
    chart_figure = Figure(figsize=(13, 5.6), layout="constrained")
    time_axis, memory_axis = chart_figure.subplots(1, 2, width_ratios=[3, 2])
    _bars(time_axis, labels, time_series)
    time_axis.set_title("Time per denoising step (CFG), over the bare UNet", fontsize=10)
    time_axis.set_ylabel("overhead (% of the bare UNet's time; hatched: of its FLOPs)", fontsize=8)
    _bars(memory_axis, labels, memory_series)
    memory_axis.set_title("Extra peak memory at inference, over the bare UNet", fontsize=10)
    memory_axis.set_ylabel("extra peak memory (% of the bare UNet's; weights + activations)", fontsize=8)
    for axis in (time_axis, memory_axis):
        axis.set_xlabel("model, image size (px)", fontsize=8)
    quick = ", quick smoke run on shallow test models" if summary["quick"] else ""
    chart_figure.suptitle(f"ControlNeXt vs ComfyUI ControlNet: {summary['date'][:10]}, {first['device_name']}, "
                          f"{first.get('dtype', '?')}{quick}", fontsize=11)
    handles = {label: handle for axis in (time_axis, memory_axis)
               for handle, label in zip(*axis.get_legend_handles_labels())}
    chart_figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return chart_figure


def chart(summary: dict, path: str) -> str:
    """Writes figure(summary) as a PNG at ``path`` and returns the path."""
    figure(summary).savefig(path, dpi=110)
    return path


def _bars(axis, labels: list[str], series: dict[str, tuple[str, list[float | None]]]) -> None:
    """Grouped bars in percent, one group per model, from name -> (colour, values); "FLOP" series are hatched.
    A missing value draws no bar (a series with none, no legend entry); negative values go below the zero
    line; each bar is labelled at its end."""
    series = {name: entry for name, entry in series.items() if any(v is not None for v in entry[1])}
    width = 0.8 / len(series)
    for index, (name, (colour, values)) in enumerate(series.items()):
        present = [(group, value) for group, value in enumerate(values) if value is not None]
        offset = (index - (len(series) - 1) / 2) * width
        flops = "FLOP" in name
        bars = axis.bar([group + offset for group, _ in present], [100 * value for _, value in present], width,
                        label=name, color="white" if flops else colour, edgecolor=colour, hatch="////" if flops else None)
        axis.bar_label(bars, labels=[f"{100 * value:.1f}" for _, value in present], padding=1, fontsize=6)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_xlim(-0.5, len(labels) - 0.5)
    axis.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    axis.margins(y=0.12)
    axis.grid(axis="y", alpha=0.3)
