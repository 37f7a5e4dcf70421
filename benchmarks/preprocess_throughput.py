"""Preprocessor throughput: canny batched vs a cv2 loop (benchmarks/preprocessors.py's measurement),
DWPose and Depth Anything per frame.

No DWPose or Depth Anything weights are on this machine (nothing is downloaded), so pose and
depth run the pack's whole per-frame pipeline around the tests' stand-in networks: for DWPose the
planted detector/pose TorchScript models of controlnext_testbed/tiny_preprocessors.py (one person per frame:
letterbox, crop, SimCC decode, keypoint order) and the official drawing on its 2160 px canvas;
for depth its tiny random Depth Anything (resize, normalise,
upsample, colourise). The figures are the pack's own cost per frame; a real YOLOX-L + RTMPose-L
or Depth-Anything-V2-Small adds its network time on top.

    COMFYUI_PATH=... python benchmarks/preprocess_throughput.py --out /tmp/pre.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import comfy_host  # noqa: E402
import preprocessors  # noqa: E402  the canny benchmark (frames, thresholds, timing)


def canny(frames: int, size: int, runs: int) -> dict:
    from controlnext_core.preprocess.canny import canny_batched, canny_cv2

    images = preprocessors.video_frames(frames, size)
    low, high = preprocessors.LOW, preprocessors.HIGH
    cpu = torch.device("cpu")
    agreement = (canny_batched(images, low, high, device=cpu) == canny_cv2(images, low, high)).float().mean().item()
    loop = preprocessors.median_seconds(lambda: canny_cv2(images, low, high), cpu, runs)
    batched = preprocessors.median_seconds(lambda: canny_batched(images, low, high, device=cpu), cpu, runs)
    return {"frames": frames, "size": size, "thresholds": [low, high], "device": "cpu", "runs": runs,
            "cv2_loop_s": loop, "batched_s": batched, "cv2_loop_fps": frames / loop, "batched_fps": frames / batched,
            "batched_vs_cv2": loop / batched, "pixel_agreement": agreement}


def pose(frames: int, size: int, runs: int) -> dict:
    from controlnext_core.preprocess.dwpose import DWPoseDetector
    from controlnext_core.preprocess.pose import draw_poses
    from controlnext_testbed.tiny_preprocessors import PlantedDetector, PlantedPose, save_torchscript

    folder = tempfile.mkdtemp(prefix="controlnext_bench_dwpose_")
    detector = save_torchscript(PlantedDetector(320.0, 320.0, 200.0, 400.0), torch.rand(1, 3, 640, 640) * 255,
                                os.path.join(folder, "yolox_l.torchscript.pt"))
    generator = torch.Generator().manual_seed(2)
    pose_model = save_torchscript(PlantedPose(torch.randint(150, 420, (133,), generator=generator),
                                              torch.randint(150, 600, (133,), generator=generator)),
                                  torch.zeros(5, 3, 384, 288), os.path.join(folder, "dw-ll_ucoco_384_bs5.torchscript.pt"))
    estimator = DWPoseDetector.from_files(detector, pose_model, "cpu")
    images = preprocessors.video_frames(frames, size)
    detected = estimator.detect(images)
    detect_s = preprocessors.median_seconds(lambda: estimator.detect(images), torch.device("cpu"), runs)
    draw_s = preprocessors.median_seconds(lambda: draw_poses(detected, size, size), torch.device("cpu"), runs)
    return {"frames": frames, "size": size, "runs": runs, "people_per_frame": detected[0].people,
            "networks": "planted stand-ins (controlnext_testbed/tiny_preprocessors.py)",
            "detect_ms_per_frame": 1000 * detect_s / frames, "draw_ms_per_frame": 1000 * draw_s / frames,
            "fps": frames / (detect_s + draw_s)}


def depth(frames: int, size: int, runs: int) -> dict:
    from controlnext_core.preprocess.depth import DepthEstimator, depth_control
    from controlnext_testbed.tiny_preprocessors import tiny_depth_anything

    folder = tempfile.mkdtemp(prefix="controlnext_bench_depth_")
    tiny_depth_anything(folder)
    estimator = DepthEstimator.from_folder(folder)
    images = preprocessors.video_frames(frames, size)
    seconds = preprocessors.median_seconds(lambda: depth_control(estimator.estimate(images), "viridis", "batch"),
                                           torch.device("cpu"), runs)
    return {"frames": frames, "size": size, "runs": runs, "model_input": estimator.size,
            "networks": "tiny random Depth Anything (controlnext_testbed/tiny_preprocessors.py)",
            "ms_per_frame": 1000 * seconds / frames, "fps": frames / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comfy_host.setup("cpu")  # test_host_preprocess needs the host; the rest is plain torch/cv2
    sys.path.insert(0, comfy_host.ROOT)
    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    frames, size, runs = (4, 128, 1) if args.quick else (preprocessors.FRAMES, preprocessors.SIZE, 3)
    result = {"threads": args.threads, "canny": canny(frames, size, runs),
              "pose": pose(min(frames, 16), size, runs),
              "depth": depth(min(frames, 16), size, runs)}
    with open(args.out, "w") as out:
        json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
