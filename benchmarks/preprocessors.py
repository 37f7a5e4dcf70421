"""Canny on a video batch: the batched tensor route against a per-frame cv2 loop.

48 frames of 512x512 (a smooth synthetic scene panning across the frames), thresholds 100/200.
Both routes start from the same ComfyUI IMAGE tensor on the CPU and end with one:
- cv2 loop: per frame, 8-bit grey, ``cv2.Canny``, back to a float tensor (``canny_cv2``);
- batched: ``canny_batched`` on the GPU when there is one (else the CPU), measured end to end
  (upload and download included) and with the frames already on the device.
Prints the medians and the ratio, and writes benchmarks/results/preprocessors.json.

    .venv/bin/python benchmarks/preprocessors.py [--runs 5] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import cv2
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from controlnext_core.preprocess.canny import canny_batched, canny_cv2  # noqa: E402

FRAMES, SIZE, LOW, HIGH = 48, 512, 100, 200


def video_frames(frames: int = FRAMES, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """A panning scene: smooth colour fields with some sharp shapes, as IMAGE [F, H, W, 3]."""
    rng = np.random.default_rng(seed)
    scene_size = size + 4 * frames
    scene = cv2.resize(rng.random((24, 24, 3)).astype(np.float32), (scene_size, scene_size),
                       interpolation=cv2.INTER_CUBIC)
    for _ in range(40):
        centre = tuple(int(v) for v in rng.integers(0, scene_size, 2))
        cv2.circle(scene, centre, int(rng.integers(5, 60)), tuple(float(v) for v in rng.random(3)), -1)
    scene = np.clip(scene, 0, 1)
    return torch.from_numpy(np.stack([scene[4 * i:4 * i + size, 2 * i:2 * i + size] for i in range(frames)]))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run, device: torch.device, runs: int) -> float:
    run()  # warm-up (kernels, allocator)
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = video_frames()
    on_device = images.to(device)

    reference = canny_cv2(images, LOW, HIGH)
    batched = canny_batched(images, LOW, HIGH, device=device)
    agreement = (batched == reference).float().mean().item()

    cv2_loop = median_seconds(lambda: canny_cv2(images, LOW, HIGH), torch.device("cpu"), args.runs)
    end_to_end = median_seconds(lambda: canny_batched(images, LOW, HIGH, device=device), device, args.runs)
    resident = median_seconds(lambda: canny_batched(on_device, LOW, HIGH, device=device), device, args.runs)

    result = {
        "frames": FRAMES, "size": SIZE, "thresholds": [LOW, HIGH], "runs": args.runs,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cpu_threads": torch.get_num_threads(), "opencv": cv2.__version__, "torch": torch.__version__,
        "pixel_agreement": agreement,
        "cv2_loop_s": cv2_loop, "batched_end_to_end_s": end_to_end, "batched_on_device_s": resident,
        "speedup_end_to_end": cv2_loop / end_to_end, "speedup_on_device": cv2_loop / resident,
    }
    print(f"canny {FRAMES}x{SIZE}x{SIZE}, thresholds {LOW}/{HIGH}, median of {args.runs} runs")
    print(f"  cv2 per-frame loop (CPU, {torch.get_num_threads()} threads): {cv2_loop * 1000:8.1f} ms")
    print(f"  batched on {device}, end to end:        {end_to_end * 1000:8.1f} ms  "
          f"(x{result['speedup_end_to_end']:.2f} vs cv2)")
    print(f"  batched on {device}, frames on device:  {resident * 1000:8.1f} ms  "
          f"(x{result['speedup_on_device']:.2f} vs cv2)")
    print(f"  pixel agreement with cv2: {agreement:.6%}")
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "preprocessors.json"), "w") as file:
        json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
