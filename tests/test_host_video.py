"""Host tests: ControlNeXt-SVD on a shallow random-weight SVD UNet in a real ComfyUI."""
from __future__ import annotations

import pytest
import torch

import host  # skips this module without a ComfyUI host
from host import conditioning, control_image, count_encoder_runs, loaded, tiny_model
from test_host_stacking import encoder_inputs

import comfy.sample
import comfy.samplers
import comfy.utils

video = host.importlib.import_module(f"{host.PACK_NAME}.nodes.video")
patch_module = host.patch_module
POSITIVE, NEGATIVE = conditioning("svd", 1), conditioning("svd", 2)


def sample_video(model, frames: int, cfg: float = 2.0, steps: int = 2, guider=None, size: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(frames, 4, size, size, generator=generator)
    latent = torch.zeros(frames, 4, size, size)
    if guider is None:
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "karras", POSITIVE, NEGATIVE, latent,
                                   seed=1, disable_pbar=True)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", steps)
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=1, disable_pbar=True)


def apply_svd(model, file, poses, strength=1.0, frame_count="error", cond_only=False):
    return video.ApplyControlNeXtSVD.execute(model, file, poses, strength, 0.0, 1.0, frame_count, cond_only).result[0]


@pytest.fixture(scope="module")
def svd_file(tmp_path_factory):
    return loaded(tmp_path_factory.mktemp("svd"), "base")


def test_strength_zero_is_bare_svd_and_control_changes_it(svd_file):
    model = tiny_model("svd")
    poses = control_image(batch=4)
    for cfg in (1.0, 2.5):
        bare = sample_video(model, 4, cfg=cfg, steps=1)
        assert torch.equal(sample_video(apply_svd(model, svd_file, poses, strength=0.0), 4, cfg=cfg, steps=1), bare)
        controlled = sample_video(apply_svd(model, svd_file, poses), 4, cfg=cfg, steps=1)
        assert torch.isfinite(controlled).all() and (controlled - bare).abs().max() > 1e-3


def _options(model, frames: int, chunks: list[int]) -> dict:
    sigma = model.get_model_object("model_sampling").percent_to_sigma(0.3)
    return {"block": ("input", 2), "sigmas": torch.full((frames,), sigma), "cond_or_uncond": chunks,
            "original_shape": [frames * len(chunks), 4, 8, 8]}


def test_v2_controls_the_cond_half_per_frame_and_leaves_uncond_untouched(svd_file, monkeypatch):
    model = tiny_model("svd")
    poses = control_image(batch=4)
    patch = apply_svd(model, svd_file, poses, strength=0.7).model_options["transformer_options"]["patches"][
        "input_block_patch_after_skip"][0]
    assert patch.block == ("input", 2)  # after level 0 of the shallow UNet, as ("input", 3) in SVD-XT
    options = _options(model, 4, [1, 0])
    hidden = torch.randn(8, 320, 4, 4)
    calls = count_encoder_runs(svd_file, monkeypatch)
    out = patch(hidden, options)
    assert calls == [4]  # the cond frames only, one pass
    assert torch.equal(out[:4], hidden[:4])  # uncond rows first, untouched
    timesteps = model.get_model_object("model_sampling").timestep(options["sigmas"]).float()
    control = patch.controlnext.encode(patch_module.control_image_from_comfy(poses), timesteps)
    expected = host.core.inject(hidden[4:], control, "svd", 0.7)  # per frame, eps 1e-5, x0.2
    host.assert_close(out[4:], expected)


def test_frame_count_mismatch_is_an_error_or_resampled(svd_file):
    model = tiny_model("svd")
    with pytest.raises(host.core.ControlNeXtError, match="5 control images for 6 frames: give one per video frame, "
                                                         "or set frame_count to resample"):
        sample_video(apply_svd(model, svd_file, control_image(batch=5)), 6, cfg=1.0, steps=1)
    out = sample_video(apply_svd(model, svd_file, control_image(batch=5), frame_count="resample"), 6, cfg=1.0,
                       steps=1)
    assert torch.isfinite(out).all()


def test_poses_of_another_shape_are_cut_at_the_centre_as_comfyuis_controlnets_cut_them(svd_file, monkeypatch):
    """Tall poses on a square video: each frame's pose is the centre crop ComfyUI's ControlNets (and
    SVD's own conditioning) make, not the pose squeezed."""
    poses = torch.rand(2, 96, 40, 3, generator=torch.Generator().manual_seed(5))
    encoded = encoder_inputs(svd_file, monkeypatch)
    sample_video(apply_svd(tiny_model("svd"), svd_file, poses), 2, cfg=1.0, steps=1)
    (image,) = encoded
    expected = comfy.utils.common_upscale(poses.movedim(-1, 1), 64, 64, "nearest-exact", "center")
    assert torch.equal(image, expected)


def test_bad_models_and_inputs_are_named(svd_file, tmp_path):
    with pytest.raises(host.core.ControlNeXtError, match="needs a Stable Video Diffusion model.*got a SD15 model"):
        apply_svd(tiny_model("sd15"), svd_file, control_image(batch=2))
    with pytest.raises(host.core.ControlNeXtError, match="cannot serve a Stable Video Diffusion model"):
        apply_svd(tiny_model("svd"), loaded(tmp_path, "mid"), control_image(batch=2))
    with pytest.raises(host.core.ControlNeXtError, match="This is a Stable Video Diffusion model: use Load ControlNeXt SVD"):
        host.apply(tiny_model("svd"), svd_file, control_image(batch=2))
    with pytest.raises(host.core.ControlNeXtError, match="N >= 1"):
        apply_svd(tiny_model("svd"), svd_file, torch.zeros(0, 64, 64, 3))


def test_window_guider_fuses_windows_the_official_way(svd_file, monkeypatch):
    model = tiny_model("svd")
    patched = apply_svd(model, svd_file, control_image(batch=10))
    guider = video.ControlNeXtSVDWindowGuider.execute(patched, POSITIVE, NEGATIVE, 1.0, 3.0, 4, 1).result[0]
    seen = []
    original = patch_module.ControlNeXtPatch.inject

    def spy(self, h, transformer_options):
        if transformer_options.get("block") == self.block:
            seen.append((h.shape[0], tuple(transformer_options[patch_module.WINDOW_CONTROL_FRAMES])))
        return original(self, h, transformer_options)

    monkeypatch.setattr(patch_module.ControlNeXtPatch, "inject", spy)
    out = sample_video(model, 10, steps=1, guider=guider)
    assert out.shape == (10, 4, 8, 8) and torch.isfinite(out).all()
    # windows [0-3], [3-6], [6-9]; each later window takes the video's first control for its first frame
    assert seen == [(8, (0, 1, 2, 3)), (8, (0, 4, 5, 6)), (8, (0, 7, 8, 9))]
    short = apply_svd(model, svd_file, control_image(batch=3))  # fewer poses than even one window
    with pytest.raises(host.core.ControlNeXtError, match="3 control images for 10 frames: give one per video frame"):
        sample_video(model, 10, steps=1, guider=video.ControlNeXtSVDWindowGuider.execute(
            short, POSITIVE, NEGATIVE, 1.0, 3.0, 4, 1).result[0])


def test_window_guider_on_one_window_is_linear_cfg_sampling(svd_file):
    """With the video inside one window the guider is plain sampling with per-frame linear CFG."""
    model = apply_svd(tiny_model("svd"), svd_file, control_image(batch=4))
    guider = video.ControlNeXtSVDWindowGuider.execute(model, POSITIVE, NEGATIVE, 2.0, 2.0, 8, 2).result[0]
    host.assert_close(sample_video(model, 4, steps=1, guider=guider), sample_video(model, 4, cfg=2.0, steps=1))


@pytest.mark.slow
def test_memory_follows_the_window_not_the_video_length():
    """40 frames in 14-frame windows peak within 10 % of one 14-frame window (fresh processes;
    large allocations mmapped so freed memory leaves the resident size at once)."""
    import os
    import subprocess
    import sys

    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "svd_memory_probe.py")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "COMFYUI_PATH": host.COMFYUI_PATH}

    def peak_growth(frames: int, window: int) -> float:
        result = subprocess.run([sys.executable, probe, str(frames), str(window), "8"], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return float(result.stdout.split()[-1])

    one_window, long_video = peak_growth(14, 14), peak_growth(40, 14)
    assert long_video <= 1.10 * one_window, f"40 frames: +{long_video} MiB, one 14-frame window: +{one_window} MiB"


def test_align_poses_node_fits_the_video_on_the_reference_canvas_for_draw_pose():
    from test_core_align import person  # the same synthetic skeletons as the core tests
    import numpy as np

    pose = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.preprocess.pose")
    preprocessors = host.importlib.import_module(f"{host.PACK_NAME}.nodes.preprocessors")
    body = np.random.default_rng(4).uniform(0.3, 0.7, (18, 2))
    reference = pose.to_openpose(pose.PoseFrame(person(body)[None], 96, 160))
    frames = [pose.to_openpose(pose.PoseFrame(person(body * 0.5 + 0.1)[None], 128, 72)) for _ in range(3)]
    (keypoints,) = video.AlignPoses.execute(reference, frames).result
    aligned = pose.frames_from_openpose(keypoints)
    assert len(aligned) == 3 and (aligned[0].width, aligned[0].height) == (96, 160)
    assert np.allclose(aligned[0].keypoints[0, :18, 1], body[:, 1], atol=1e-6)  # vertical fit is exact here
    images = preprocessors.ControlNeXtDrawPose.execute(keypoints, 0, 0, True, True, True).result[0]
    assert images.shape == (3, 160, 96, 3) and images.max() > 0.5
    with pytest.raises(host.core.ControlNeXtError, match="No person was found in the reference"):
        video.AlignPoses.execute({"people": [], "canvas_width": 96, "canvas_height": 160}, frames)


def test_cooperates_with_comfyui_context_windows(svd_file, monkeypatch):
    """Under ComfyUI's own context windows the patch slices the pose frames by the window;
    the measured gap to the official fusion (same windows, constant CFG) is recorded."""
    import inspect
    import json
    import os

    import comfy.context_windows
    windows_nodes = host.importlib.import_module("comfy_extras.nodes_context_windows")
    if "causal_window_fix" not in inspect.signature(windows_nodes.ContextWindowsManualNode.execute).parameters:
        pytest.skip("this ComfyUI's context windows crash for SVD at the first step (fixed in later versions)")
    model = tiny_model("svd")
    patched = apply_svd(model, svd_file, control_image(batch=10))
    windowed = windows_nodes.ContextWindowsManualNode.execute(
        patched, 4, 1, comfy.context_windows.ContextSchedules.STATIC_STANDARD, 1, False,
        comfy.context_windows.ContextFuseMethods.FLAT, 0, False, [], False, [], False).result[0]
    seen = []
    original = patch_module.ControlNeXtPatch.inject

    def spy(self, h, transformer_options):
        if transformer_options.get("block") == self.block:
            seen.append(tuple(transformer_options["context_window"].index_list))
        return original(self, h, transformer_options)

    monkeypatch.setattr(patch_module.ControlNeXtPatch, "inject", spy)
    core_windows = sample_video(windowed, 10, cfg=2.0, steps=1)
    assert torch.isfinite(core_windows).all()
    assert seen and all(len(frames) == 4 for frames in seen)
    assert sorted({f for frames in seen for f in frames}) == list(range(10))
    monkeypatch.setattr(patch_module.ControlNeXtPatch, "inject", original)
    guider = video.ControlNeXtSVDWindowGuider.execute(patched, POSITIVE, NEGATIVE, 2.0, 2.0, 4, 1).result[0]
    official = sample_video(model, 10, steps=1, guider=guider)
    gap = ((core_windows - official).abs().max() / official.abs().max()).item()
    assert gap > 0  # different fusions: ComfyUI averages whole windows, the official drops replaced first frames
    artefacts = os.path.join(host.PACK_ROOT, "test-artifacts")
    os.makedirs(artefacts, exist_ok=True)
    with open(os.path.join(artefacts, "svd_window_fusion.json"), "w") as file:
        json.dump({"frames": 10, "window": 4, "overlap": 1, "windows_seen": seen,
                   "max_relative_difference_core_vs_official": gap}, file)
