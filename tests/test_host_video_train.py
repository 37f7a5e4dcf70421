"""Host tests: the SVD-v2 training step (controlnext_core.video_train) on a shallow random-weight SVD
UNet in a real ComfyUI, through the MODEL's clone (nodes/video_train.py)."""
from __future__ import annotations

import json
import re

import pytest
import torch

import host  # skips this module without a ComfyUI host
from host import models_folder, tiny_model  # noqa: F401 (models_folder: a fixture)

from controlnext_testbed.checkpoint_files import random_vae
from test_host_preprocess import install_tiny_dwpose, model_folders  # noqa: F401 (model_folders: a fixture)
from train_command_fixtures import write_clips

video_train_nodes = host.importlib.import_module(f"{host.PACK_NAME}.nodes.video_train")
core_train = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.train")
core_video = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.video_train")
Denoiser = video_train_nodes.ComfyVideoDenoiser
FRAMES, SIZE = 2, 64  # 8 x 8 latents


def clip_batch(seed: int = 0) -> "core_video.VideoBatch":
    generator = torch.Generator().manual_seed(seed)
    return core_video.VideoBatch(
        latents=torch.randn(1, FRAMES, 4, SIZE // 8, SIZE // 8, generator=generator),
        controls=torch.rand(1, FRAMES, 3, SIZE, SIZE, generator=generator),
        image_embeddings=torch.randn(1, 1, host.UNET_CONFIGS["svd"]["context_dim"], generator=generator),
        reference_pixels=torch.rand(1, 3, SIZE, SIZE, generator=generator) * 2 - 1)


@pytest.fixture(scope="module")
def vae():
    return random_vae(real=True)


def train_svd(model, vae, names: list[str], steps: int, checkpointing: bool = False, seed: int = 0):
    """``steps`` official SVD-v2 steps on one clip; (trainer, losses)."""
    settings = core_train.TrainingSettings(family="svd", steps=steps, batch_size=1, train_unet=bool(names),
                                           unet_pattern="|".join(f"^{re.escape(name)}$" for name in names) or None,
                                           seed=seed).resolved()
    batch = clip_batch()
    with torch.inference_mode(False):
        denoiser = Denoiser(model, names)
        with denoiser.loaded(checkpointing):
            trainer = core_video.VideoTrainer(core_train.new_encoder(seed), denoiser.unet_weights(names), settings,
                                              video_train_nodes.reference_encoder(vae), "cpu")
            denoiser.train_through(trainer.unet_parameters)
            losses = [trainer.step(denoiser, batch) for _ in range(steps)]
    return trainer, losses


def test_the_unet_gets_comfyuis_own_svd_inputs_and_the_control_after_level_0():
    """Without control the prediction is the UNet on what ComfyUI's SVD conditioning makes (its fps
    input 7 gives the official training's fps id 6); the control lands on the hidden state after level 0,
    one per frame."""
    model = tiny_model("svd")
    generator = torch.Generator().manual_seed(1)
    unet_input = torch.randn(2, FRAMES, 8, 8, 8, generator=generator)
    timesteps, embeddings = torch.tensor([0.3, -1.2]), torch.randn(2, 1, 64, generator=generator)
    seen = []

    def inject(hidden):
        seen.append(tuple(hidden.shape))
        return hidden

    with torch.inference_mode(False), torch.no_grad():
        denoiser = Denoiser(model, [])
        with denoiser.loaded(False):
            prediction = denoiser(unet_input, timesteps, embeddings, core_video.added_time_ids(2), inject)
            y = model.model.encode_adm(fps=7, motion_bucket_id=127, augmentation_level=0.02)
            expected = model.model.diffusion_model(
                unet_input.flatten(0, 1), timesteps.repeat_interleave(FRAMES), context=embeddings.repeat_interleave(
                    FRAMES, dim=0), y=y.repeat(2 * FRAMES, 1), num_video_frames=FRAMES, transformer_options={})
    assert prediction.shape == (2, FRAMES, 4, 8, 8)
    assert torch.equal(prediction.flatten(0, 1), expected)
    assert seen == [(2 * FRAMES, 320, 4, 4)]


def test_the_trained_sets_are_the_scripts_own():
    model = tiny_model("svd")
    names = [name for name, _ in model.model.diffusion_model.named_parameters()]
    assert video_train_nodes.video_trained_names(model, "all") == names
    selective = video_train_nodes.video_trained_names(model, "attention outputs and values")
    assert selective and all(".to_out." in name or ".to_v." in name for name in selective)
    assert video_train_nodes.video_trained_names(model, "encoder only") == []
    with pytest.raises(host.core.ControlNeXtError, match="Unknown trained set"):
        video_train_nodes.video_trained_names(model, "everything")


def test_the_encoder_alone_learns_and_the_model_given_stays_as_it_was(vae):
    model = tiny_model("svd")
    unet = model.model.diffusion_model
    tensors = dict(unet.named_parameters())
    values = {name: tensor.detach().clone() for name, tensor in tensors.items()}
    modules = dict(unet.named_modules())
    start = core_train.new_encoder(0).state_dict()
    trainer, losses = train_svd(model, vae, [], steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(value, start[name]) for name, value in trainer.encoder.state_dict().items())
    assert dict(unet.named_modules()) == modules  # no object patch left behind
    assert all(tensor is tensors[name] and torch.equal(tensor, values[name]) for name, tensor in unet.named_parameters())


def test_weights_outside_comfyuis_layers_train_as_masters_and_checkpointing_changes_no_step(vae):
    """SVD's AlphaBlender mix factors are not on ComfyUI's layers: they train through object patches on
    the clone. Loaded under inference mode, as ComfyUI loads checkpoints, the run with gradient
    checkpointing makes the steps of the run without."""
    with torch.inference_mode():
        model = tiny_model.__wrapped__("svd")
    unet = model.model.diffusion_model
    mixers = [name for name, _ in unet.named_parameters() if name.endswith("time_mixer.mix_factor")]
    values = [unet.get_parameter(name).detach().clone() for name in mixers]
    names = mixers[:2] + [name for name, _ in unet.named_parameters() if name.endswith("attn1.to_v.weight")][:1]
    (plain, plain_losses), (checkpointed, checkpointed_losses) = (
        train_svd(model, vae, names, steps=2, checkpointing=enabled) for enabled in (False, True))
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)
    for name in names:
        assert not torch.equal(plain.unet_parameters[name], unet.get_parameter(name).float()), name  # it trained
        assert torch.allclose(checkpointed.unet_parameters[name], plain.unet_parameters[name], atol=1e-6), name
    assert all(torch.equal(unet.get_parameter(name), value) for name, value in zip(mixers, values))


def test_an_image_model_is_refused():
    with pytest.raises(host.core.ControlNeXtError, match="trains Stable Video Diffusion models.*SD1.5|SD15"):
        Denoiser(tiny_model("sd15"), [])


@pytest.fixture(scope="module")
def clip_vision():
    from server_nodes.tiny_checkpoint import tiny_clip_vision

    return tiny_clip_vision()


@pytest.fixture
def clips_folder(tmp_path, monkeypatch):
    """ComfyUI's input folder with one folder of two clip folders (a square moving down on frames and poses)."""
    root = tmp_path / "input"
    monkeypatch.setattr(host.folder_paths, "input_directory", str(root))
    write_clips(str(root / "clips"), 2, frames=6, size=SIZE)
    return root / "clips"


def run_node(model, clip_vision, vae, **overrides):
    arguments = dict(model=model, clip_vision=clip_vision, vae=vae, folder="clips", steps=2,
                     trained="attention outputs and values", learning_rate=1e-4, frames=FRAMES, interval_frame=2,
                     width=SIZE, height=SIZE, batch_size=1, conditioning_dropout=0.1, control_scale=0.0, seed=3,
                     gradient_checkpointing=True, precision="auto")
    arguments.update(overrides)
    return video_train_nodes.TrainControlNeXtSVD.execute(**arguments)


@pytest.mark.parametrize("trained", ["attention outputs and values", "all"])
def test_the_node_trains_from_clip_folders_and_its_saved_files_generate_as_it_does(clips_folder, clip_vision, vae,
                                                                                   models_folder, trained):
    """Two steps from a folder of clips; Save ControlNeXt writes the encoder and the trained UNet weights
    (diffusers names; every weight of the UNet for "all"), which Load ControlNeXt SVD reads back: Apply
    ControlNeXt SVD then samples bit for bit what the node's own outputs sample."""
    from test_host_video import apply_svd, sample_video

    model = tiny_model("svd")
    file, patched, losses = run_node(model, clip_vision, vae, trained=trained).result
    assert len(losses["loss"]) == 2 and all(torch.isfinite(torch.tensor(losses["loss"])))
    if trained == "all":
        assert len(file.unet_file_weights) == len(list(model.model.diffusion_model.parameters()))
    else:
        assert file.unet_file_weights and all(".to_out." in name or ".to_v." in name
                                              for name in file.unet_file_weights)
    assert any(name.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for name in file.unet_file_weights)
    assert file.metadata["family"] == "svd"
    folder = host.importlib.import_module(f"{host.PACK_NAME}.nodes.train").SaveControlNeXt.execute(
        file, "svd_run", False).result[0]
    video = host.importlib.import_module(f"{host.PACK_NAME}.nodes.video")
    loaded_model, loaded_file = video.LoadControlNeXtSVD.execute(
        model, "svd_run/controlnet.safetensors", "svd_run/unet.safetensors").result
    poses = torch.rand(FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(sample_video(apply_svd(loaded_model, loaded_file, poses), FRAMES, steps=1),
                       sample_video(apply_svd(patched, file, poses), FRAMES, steps=1))
    assert sorted(p.name for p in (models_folder / "svd_run").iterdir()) == ["controlnet.safetensors",
                                                                               "unet.safetensors"]
    assert str(folder).endswith("svd_run")


def test_the_node_names_bad_inputs(clips_folder, clip_vision, vae):
    model = tiny_model("svd")
    node = video_train_nodes.TrainControlNeXtSVD
    assert node.validate_inputs("", "sometimes") == "resume 'sometimes' is not one of no, latest, latest, new settings."
    assert node.validate_inputs("", "no") is True
    with pytest.raises(host.core.ControlNeXtError, match="trains Stable Video Diffusion models"):
        run_node(tiny_model("sd15"), clip_vision, vae)
    with pytest.raises(host.core.ControlNeXtError, match="multiples of 64"):
        run_node(model, clip_vision, vae, width=100)
    with pytest.raises(host.core.ControlNeXtError, match="Unknown trained set"):
        run_node(model, clip_vision, vae, trained="everything")
    with pytest.raises(host.core.ControlNeXtError, match="found before training(.|\n)*6 frames, fewer than the 9"):
        run_node(model, clip_vision, vae, frames=9)
    for extra in (clips_folder / "clip1" / "poses").iterdir():
        extra.unlink()
        break
    with pytest.raises(host.core.ControlNeXtError, match=r"clip1/frames: 6 frames but 5 poses in .*clip1/poses"):
        run_node(model, clip_vision, vae, seed=4)
    (clips_folder / "clip2").mkdir()
    with pytest.raises(host.core.ControlNeXtError, match="- clip2: no frames/ folder"):
        run_node(model, clip_vision, vae)


def test_dwpose_makes_the_poses_and_hands_the_clips_lack_once(clips_folder, clip_vision, vae, model_folders):
    """clip1 without poses: DWPose (TorchScript stand-ins) draws them and finds both clips' hands before
    training, kept in the folder's cache for the next run; without the models the message says the
    loss is not weighted on hands."""
    import shutil

    detector, pose = install_tiny_dwpose(model_folders[0])
    model = tiny_model("svd")
    message = run_node(model, clip_vision, vae, steps=1).ui["controlnext_info"][0]
    assert "2 of 2 clips have no hands.json: their loss is not weighted on the hands" in message
    shutil.rmtree(clips_folder / "clip1" / "poses")
    with pytest.raises(host.core.ControlNeXtError, match="clip1: no poses/ folder"):
        run_node(model, clip_vision, vae, steps=1)
    with pytest.raises(host.core.ControlNeXtError, match="Choose both DWPose models"):
        run_node(model, clip_vision, vae, steps=1, detector_model=detector)
    message = run_node(model, clip_vision, vae, steps=1, detector_model=detector,
                       pose_model=pose).ui["controlnext_info"][0]
    assert "DWPose made the poses or hands of 2 clips" in message and "no hands.json" not in message
    cache = clips_folder / ".controlnext_poses"
    assert sorted(p.name for p in (cache / "clip1" / "poses").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    assert not (cache / "clip0" / "poses").exists()  # clip0 keeps its own poses
    hands = json.loads((cache / "clip0" / "hands.json").read_text())
    assert len(hands) == 6 and hands[0]["hands_boxes"] and min(min(s) for s in hands[0]["hands_score"]) > 0.5
    written = {path: path.stat().st_mtime_ns for path in cache.rglob("*")}
    message = run_node(model, clip_vision, vae, steps=1, detector_model=detector,
                       pose_model=pose).ui["controlnext_info"][0]
    assert "DWPose" not in message and {path: path.stat().st_mtime_ns for path in cache.rglob("*")} == written
    assert sorted(p.name for p in (clips_folder / "clip1").iterdir()) == ["frames"]  # the user's folder unchanged
