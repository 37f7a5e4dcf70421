"""The headless training command with an SVD checkpoint (issue 21): ControlNeXt-SVD-v2 training from a
folder of clip folders and from the official meta-info file, on one process and on two started by
torchrun (gloo on the CPU), with ComfyUI used as a library to load a tiny SVD checkpoint file written
by ComfyUI's own saver (its CLIP vision is a real-size ViT-H: ComfyUI detects no smaller one).

One thread per process, as in test_host_train_command: one process with two micro-batches of one clip
sums its gradients in the order two processes with one clip each do, so the releases are compared bit
for bit.
"""
from __future__ import annotations

import json
import os

import pytest

import host  # skips this module without a ComfyUI host; before the host's packages below
import comfy.sd  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from host import models_folder  # noqa: F401,E402 (a fixture)
from test_host_train_command import identical, run, trained  # noqa: E402
from train_command_fixtures import write_clips, write_sd15_checkpoint, write_svd_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow
STEPS, FRAMES, SIZE = 3, 3, 64
SETTINGS = ["--sample_n_frames", str(FRAMES), "--interval_frame", "2", "--width", str(SIZE), "--height", str(SIZE),
            "--max_train_steps", str(STEPS), "--checkpointing_steps", "2", "--train_unet", "attention",
            "--learning_rate", "1e-4", "--controlnext_scale", "0.5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video_train_command")
    write_svd_checkpoint(str(folder / "svd.safetensors"))
    write_clips(str(folder / "clips"), 2, frames=6, size=SIZE)
    return folder


def command(world, output: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(world / "svd.safetensors"), "--train_data_dir",
            str(world / "clips"), "--output_dir", str(world / output), *SETTINGS, *extra]


def release(output) -> dict:
    return trained(output, STEPS)


@pytest.fixture(scope="module")
def one_process(world):
    """One process, two micro-batches of one clip (the global batch of two processes with one each)."""
    result = run(command(world, "one", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                         "--progress_lines"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_one_process_trains_an_svd_v2_encoder_from_clip_folders_and_load_controlnext_svd_reads_it(
        world, one_process, models_folder):
    output = world / "one"
    assert [line for line in one_process.stdout.splitlines() if line.startswith("step ")][-1].startswith(
        f"step {STEPS}/{STEPS} loss ")
    assert f"Saved {output / 'controlnet.safetensors'}, {output / 'unet.safetensors'}" in one_process.stdout
    assert "2 clips in" in one_process.stderr and "trained: attention outputs and values" in one_process.stderr
    assert sorted(os.listdir(output / "checkpoints")) == ["step-2", "step-3"]
    trained = release(output)
    assert trained["weights"]["unet"] and all(".to_out." in name or ".to_v." in name
                                              for name in trained["weights"]["unet"])
    folder = models_folder / "svd_trained"
    folder.mkdir()
    for name in ("controlnet.safetensors", "unet.safetensors"):
        (folder / name).write_bytes((output / name).read_bytes())
    video = host.importlib.import_module(f"{host.PACK_NAME}.nodes.video")
    model = comfy.sd.load_checkpoint_guess_config(str(world / "svd.safetensors"), output_clip=False)[0]
    patched, file = video.LoadControlNeXtSVD.execute(model, "svd_trained/controlnet.safetensors",
                                                     "svd_trained/unet.safetensors").result
    assert len(patched.patches) - len(model.patches) == len(trained["weights"]["unet"])  # every trained weight
    assert file.encoder.control_scale == 0.5 and file.metadata["base_model"] == "svd.safetensors"
    assert file.metadata["family"] == "svd"
    saved = trained["weights"]["controlnet"]
    assert all(torch.equal(tensor, saved[name]) for name, tensor in file.encoder.state_dict().items() if name in saved)


def test_two_processes_under_torchrun_make_the_one_process_run_bit_for_bit(world, one_process):
    result = run(command(world, "torchrun", "--train_batch_size", "1"), "torchrun")
    assert result.returncode == 0, result.stderr[-3000:]
    assert identical(release(world / "torchrun"), release(world / "one"))


def write_video(path, frames: list[np.ndarray]) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 8, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()


def write_official_data(root, clips: int = 2, frames: int = 8) -> str:
    """The official layout: videos, pose videos (BGR) and per-frame hands detections, listed in a
    meta-info JSON by paths relative to it."""
    entries = []
    for clip in range(clips):
        for part in ("videos", "poses", "meta"):
            (root / part).mkdir(parents=True, exist_ok=True)
        pictures, poses = [], []
        for frame in range(frames):
            picture = np.zeros((SIZE, SIZE, 3), np.uint8)
            top = 4 * frame + 8 * clip
            picture[top:top + 24, 16:40] = 150
            pictures.append(picture)
            poses.append(np.where(picture > 0, 255, 0).astype(np.uint8))
        write_video(root / "videos" / f"{clip}.avi", pictures)
        write_video(root / "poses" / f"{clip}.avi", poses)
        hands = [{"hands_boxes": [[[0.25, 0.1], [0.6, 0.5]]], "hands_score": [[0.9, 0.8]]}] * frames
        (root / "meta" / f"{clip}.json").write_text(json.dumps(hands))
        entries.append({"video_path": f"videos/{clip}.avi", "guide_path": f"poses/{clip}.avi",
                        "meta_info": f"meta/{clip}.json"})
    meta = root / "meta_info.json"
    meta.write_text(json.dumps(entries))
    return str(meta)


def test_the_official_meta_info_data_trains(world, tmp_path):
    meta = write_official_data(tmp_path / "ubc")
    args = [argument for argument in command(world, "official", "--meta_info_path", meta)]
    args.remove("--train_data_dir")
    args.remove(str(world / "clips"))
    result = run([*args, "--max_train_steps", "2", "--train_unet", "none"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 clips in" in result.stderr and "trained: encoder only" in result.stderr
    assert (world / "official" / "controlnet.safetensors").is_file()
    assert not (world / "official" / "unet.safetensors").exists()


def test_bad_video_input_gets_a_clear_error(world, tmp_path):
    def error(args: list[str]) -> str:
        result = run(args)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        return result.stderr.strip().splitlines()[-1]

    assert "not for SVD training" in error(command(world, "bad", "--validation_image", str(tmp_path / "x.png")))
    meta = tmp_path / "meta_info.json"
    meta.write_text(json.dumps([{"video_path": "a.mp4"}]))
    with_meta = [*command(world, "bad"), "--meta_info_path", str(meta)]
    assert "not both" in error(with_meta)
    with_meta.remove("--train_data_dir")
    with_meta.remove(str(world / "clips"))
    assert "clip 0: needs 'video_path' and 'guide_path'" in run(with_meta).stderr
    short = tmp_path / "short"
    write_clips(str(short), 1, frames=2, size=SIZE)
    result = run([*command(world, "bad"), "--train_data_dir", str(short)])
    assert result.returncode == 2 and "clip0" in result.stderr and "fewer than" in result.stderr
    sd15 = tmp_path / "sd15.safetensors"
    write_sd15_checkpoint(str(sd15))
    assert "is not an SVD checkpoint" in error([*with_meta, "--pretrained_model_name_or_path", str(sd15)])
    assert not (world / "bad").exists()  # nothing written half
