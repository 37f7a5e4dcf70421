"""Host tests: Train / Save ControlNeXt and Load Training Pictures on tiny SD1.5 and SDXL UNets in a
real ComfyUI (the official step itself is checked in tests/test_train.py and, against the official
code, in tests/test_official_training_parity.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import host  # skips this module without a ComfyUI host
from host import apply, conditioning, models_folder, sample, tiny_model  # noqa: F401 (models_folder: a fixture)

import comfy.model_management
import comfy.sample

train_nodes = host.importlib.import_module(f"{host.PACK_NAME}.nodes.train")
train_data = host.importlib.import_module(f"{host.PACK_NAME}.nodes.train_data")
loaders = host.loaders
Train, Save = train_nodes.TrainControlNeXt, train_nodes.SaveControlNeXt


def squares(count: int = 4, size: int = 64, seed: int = 0):
    """Latents and control images that agree: a square where the control is white."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, size, size, 3)
    for i in range(count):
        y, x = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        images[i, y:y + size // 2, x:x + size // 2] = 1.0
    latents = torch.nn.functional.avg_pool2d(images[..., :1].movedim(-1, 1), 8).repeat(1, 4, 1, 1) * 2 - 1
    return {"samples": latents}, images


def run_train(family, steps=4, model=None, **overrides):
    latents, images = squares()
    arguments = dict(model=model or tiny_model(family), latents=latents, positive=conditioning(family, 1),
                     control_images=images, steps=steps, batch_size=2, encoder_lr=1e-4, unet_lr=1e-5,
                     train_unet="official subset", optimizer="official", warmup_steps=0, control_scale=0.5,
                     proportion_empty_prompts=0.0, seed=3, gradient_checkpointing=True, precision="auto")
    arguments.update(overrides)
    return Train.execute(**arguments)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request):
    family = request.param
    model = tiny_model(family)
    before = sample(model, family)
    result = run_train(family, steps=2, model=model)
    return family, model, before, result


def test_training_leaves_the_input_model_as_it_was(trained):
    family, model, before, _ = trained
    assert torch.equal(sample(model, family), before)


def test_outputs_apply_and_carry_the_trained_unet_as_patches(trained):
    family, model, before, result = trained
    file, patched, loss = result.result
    assert len(loss["loss"]) == 2 and all(np.isfinite(loss["loss"]))
    assert file.layout == "base" and file.encoder.control_scale == 0.5
    expected = {"sd15": "to_out", "sdxl": "attn2"}[family]
    assert file.unet_file_weights and all(expected in name for name in file.unet_file_weights)
    patches = patched.get_key_patches("diffusion_model.")
    assert sum(len(entries) > 1 for entries in patches.values()) == len(file.unet_file_weights)
    controlled = sample(apply(patched, file, squares()[1][:1]), family)
    assert torch.isfinite(controlled).all() and not torch.equal(controlled, before)


def test_saved_files_load_back_bit_identical(trained, models_folder):
    family, model, _, result = trained
    file, patched, _ = result.result
    folder = Save.execute(file, "mine/run1", False).result[0]
    assert sorted(os.listdir(folder)) == ["controlnet.safetensors", "unet.safetensors"]
    loaded_file = loaders.LoadControlNeXt.execute("mine/run1/controlnet.safetensors").result[0]
    loaded_model = loaders.LoadControlNeXtUNetWeights.execute(model, "mine/run1/unet.safetensors", 1.0, "auto").result[0]
    image = squares()[1][:1]
    assert torch.equal(sample(apply(loaded_model, loaded_file, image), family),
                       sample(apply(patched, file, image), family))
    with pytest.raises(host.core.ControlNeXtError, match="already exists"):
        Save.execute(file, "mine/run1", False)
    with pytest.raises(host.core.ControlNeXtError, match="not a folder name"):
        Save.execute(file, "../outside", False)


def test_loss_falls_over_a_run():
    """Against an untrained run on the same draws (noise, timesteps, batches: one seed), the loss of a
    shallow SDXL UNet learning the squares falls step after step."""
    def losses(lr):
        return np.array(run_train("sdxl", steps=12, encoder_lr=lr, unet_lr=lr, optimizer="adafactor",
                                  gradient_checkpointing=False, seed=1).result[2]["loss"])

    ratio = losses(2e-3) / losses(0.0)
    assert ratio[0] == 1.0  # the first step's loss comes before any update
    assert ratio[-4:].mean() < 0.98 and ratio[-4:].mean() < ratio[1:5].mean(), ratio


def test_divergence_stops_and_keeps_the_last_good_step():
    result = run_train("sd15", steps=6, encoder_lr=1e30, unet_lr=1e30, optimizer="adamw")
    file, _, loss = result.result
    message = result.ui["controlnext_info"][0]
    assert "at step" in message and "kept the weights of step" in message
    assert all(torch.isfinite(p).all() for p in file.encoder.parameters())
    assert len(loss["loss"]) < 6


def test_continue_from_a_trained_encoder_leaves_it_unchanged(trained):
    family, _, _, result = trained
    file = result.result[0]
    weights = {k: v.clone() for k, v in file.encoder.state_dict().items()}
    continued = run_train(family, steps=2, controlnext=file).result[0]
    assert all(torch.equal(weights[k], v) for k, v in file.encoder.state_dict().items())
    assert not torch.equal(continued.encoder.state_dict()["mid_convs.1.weight"], weights["mid_convs.1.weight"])


@pytest.mark.parametrize("case,overrides,message", [
    ("counts", {"control_images": squares(3)[1]}, "3 control images for 4 training latents"),
    ("conditionings", {"positive": conditioning("sd15", 1) * 3}, "3 conditionings for 4 latents"),
    ("empty prompts", {"proportion_empty_prompts": 0.2}, "connect the checkpoint's CLIP"),
    ("mid layout", {"controlnext": "mid"}, "does not train"),
])
def test_bad_inputs_are_named(tmp_path, case, overrides, message):
    if overrides.get("controlnext") == "mid":
        overrides = {"controlnext": host.loaded(tmp_path, "mid")}
    with pytest.raises(host.core.ControlNeXtError, match=message):
        run_train("sd15", steps=1, **overrides)


def test_svd_models_are_refused():
    with pytest.raises(host.core.ControlNeXtError, match="trains on SD1.5 and SDXL"):
        run_train("sd15", steps=1, model=tiny_model("svd"))


def test_control_images_of_another_size_are_resized():
    latents, images = squares()
    small = torch.nn.functional.interpolate(images.movedim(-1, 1), size=(48, 48)).movedim(1, -1)
    assert len(run_train("sd15", steps=1, control_images=small).result[2]["loss"]) == 1


class FakeClip:
    """Records the captions it is given (a CLIP's text model is not what these tests check)."""

    def __init__(self):
        self.texts = []

    def tokenize(self, text):
        self.texts.append(text)
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        return torch.full((1, 77, 8), float(len(tokens))), torch.zeros(1, 8)


@pytest.fixture
def input_folder(tmp_path, monkeypatch):
    folder = tmp_path / "input"
    folder.mkdir()
    monkeypatch.setattr(host.folder_paths, "input_directory", str(folder))
    return folder


def test_load_training_pictures_reads_captions_and_crops(input_folder):
    folder = input_folder / "pictures"
    folder.mkdir()
    Image.fromarray(np.full((40, 80, 3), 200, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((64, 64, 3), 10, np.uint8)).save(folder / "b.jpg")
    (folder / "a.txt").write_text("a red square\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a picture")
    (input_folder / "empty").mkdir()
    clip = FakeClip()
    assert {"pictures", "empty"} <= set(train_nodes.input_subfolders())
    images, positive, count = train_nodes.LoadTrainingPictures.execute("pictures", clip, 64, "default").result
    assert images.shape == (2, 64, 64, 3) and count == 2 and len(positive) == 2
    assert clip.texts == ["a red square", "default"]
    assert abs(float(images[0].mean()) - 200 / 255) < 1e-3
    with pytest.raises(host.core.ControlNeXtError, match="holds no pictures"):
        train_nodes.LoadTrainingPictures.execute("empty", clip, 64, "")


@pytest.mark.parametrize("folder", ["/etc", "..", "pictures/../..", "missing"])
def test_load_training_pictures_stays_inside_the_input_folder(input_folder, folder):
    (input_folder / "pictures").mkdir()
    with pytest.raises(host.core.ControlNeXtError, match="inside ComfyUI's input folder|has no subfolder"):
        train_nodes.LoadTrainingPictures.execute(folder, FakeClip(), 64, "")


def test_a_file_that_is_not_a_picture_is_named(input_folder):
    folder = input_folder / "pictures"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "good.png")
    (folder / "junk.jpg").write_bytes(b"this is not a JPEG")
    with pytest.raises(host.core.ControlNeXtError, match=r"junk\.jpg' is not a readable picture"):
        train_nodes.LoadTrainingPictures.execute("pictures", FakeClip(), 64, "")


@pytest.mark.parametrize("family,positive,message", [
    ("sdxl", conditioning("sd15", 1), "needs the pooled text embedding"),
    ("sd15", [[torch.zeros(1, 77, 32), {}]], "is 32 wide but this SD15 model takes 64"),
])
def test_captions_from_another_model_are_refused_before_training(family, positive, message):
    with pytest.raises(host.core.ControlNeXtError, match=message):
        run_train(family, steps=1, positive=positive)


def with_sampling(model, sampling: str, zsnr: bool = False):
    """The MODEL as ComfyUI's ModelSamplingDiscrete node patches it."""
    nodes_model_advanced = host.importlib.import_module("comfy_extras.nodes_model_advanced")
    return nodes_model_advanced.ModelSamplingDiscrete().patch(model, sampling, zsnr)[0]


def first_losses(model, family="sd15", steps=2, **overrides):
    return run_train(family, steps=steps, model=model, gradient_checkpointing=False, precision="fp32",
                     **overrides).result[2]["loss"]


def test_v_prediction_models_train_on_the_velocity_with_their_own_schedule():
    """The node's loss equals the core trainer's with prediction v_prediction on the same draws, and a
    zero-terminal-SNR schedule (ModelSamplingDiscrete zsnr) is the one trained on."""
    model = tiny_model("sd15")
    train = host.importlib.import_module(f"{host.PACK_NAME}.controlnext_core.train")
    v_model, zsnr_model = with_sampling(model, "v_prediction"), with_sampling(model, "v_prediction", zsnr=True)
    assert train_nodes.training_objective(model)[0] == "epsilon"
    prediction, schedule = train_nodes.training_objective(v_model)
    assert prediction == "v_prediction" and torch.equal(schedule, train.ddpm_alphas_cumprod())
    zsnr_schedule = train_nodes.training_objective(zsnr_model)[1]
    assert zsnr_schedule[-1] < 1e-6 < float(train.ddpm_alphas_cumprod()[-1])

    def core_losses(prediction, schedule):
        latents, images = squares()
        settings = train.TrainingSettings(family="sd15", steps=2, batch_size=2, encoder_lr=1e-4, unet_lr=1e-5,
                                          optimizer="adamw", warmup_steps=0, control_scale=0.5,
                                          prediction=prediction, seed=3)
        with torch.inference_mode(False):
            names = train.trainable_unet_names([n for n, _ in model.model.diffusion_model.named_parameters()], "sd15")
            denoiser = train_nodes.ComfyDenoiser(model, "sd15", names)
            with denoiser.loaded(False):
                trainer = train.Trainer(train.new_encoder(3), denoiser.unet_weights(names), settings, "cpu", schedule)
                denoiser.train_through(trainer.unet_parameters)
                controls = host.core.resize_control(host.patch_module.control_image_from_comfy(images), 64, 64)
                samples = model.model.process_latent_in(latents["samples"])
                context = train_data.batch_conditioning(model, "sd15", conditioning("sd15", 1) * 2, samples.shape)
                for _ in range(2):
                    indices = trainer.batch_indices(4)
                    trainer.step(denoiser, train.TrainingBatch(samples[indices], controls[indices], context))
        return trainer.losses

    node_v = first_losses(v_model, optimizer="adamw")
    assert node_v == pytest.approx(core_losses("v_prediction", train.ddpm_alphas_cumprod()), rel=1e-6)
    assert node_v[0] != pytest.approx(first_losses(model, optimizer="adamw")[0], rel=1e-3)
    node_zsnr = first_losses(zsnr_model, optimizer="adamw")
    assert node_zsnr == pytest.approx(core_losses("v_prediction", zsnr_schedule), rel=1e-6)


def test_other_sampling_types_are_refused():
    with pytest.raises(host.core.ControlNeXtError, match="predict the noise"):
        run_train("sd15", steps=1, model=with_sampling(tiny_model("sd15"), "x0"))


def test_continuing_keeps_the_files_control_scale_unless_one_is_set(tmp_path):
    first = run_train("sd15", steps=1, control_scale=0.35).result[0]
    assert first.encoder.control_scale == 0.35
    kept = run_train("sd15", steps=1, control_scale=0.0, controlnext=first)
    assert kept.result[0].encoder.control_scale == 0.35 and kept.result[0].metadata["control_scale"] == "0.35"
    assert "Continued at the file's control scale 0.35" in kept.ui["controlnext_info"][0]
    changed = run_train("sd15", steps=1, control_scale=1.0, controlnext=first)
    assert changed.result[0].encoder.control_scale == 1.0
    assert "changed from the file's 0.35 to 1, as set" in changed.ui["controlnext_info"][0]
    assert run_train("sd15", steps=1, control_scale=0.0).result[0].encoder.control_scale == 1.0  # a new encoder


def test_official_means_the_whole_official_recipe():
    """optimizer = official takes the family's learning rates and warm-up, whatever the node's inputs
    say; adamw takes the inputs."""
    def weights(**overrides):
        result = run_train("sd15", steps=2, train_unet="none", **overrides)
        return result.result[0].encoder.state_dict()["mid_convs.1.weight"], result.ui["controlnext_info"][0]

    official_a, text = weights(optimizer="official", encoder_lr=1e-2, warmup_steps=50)
    official_b, _ = weights(optimizer="official", encoder_lr=1e-6, warmup_steps=0)
    assert torch.equal(official_a, official_b)
    assert "adamw, lr encoder 5e-05 / UNet 5e-06, 0 warm-up steps" in text
    chosen, text = weights(optimizer="adamw", encoder_lr=5e-5, unet_lr=5e-6, warmup_steps=0)
    assert torch.equal(chosen, official_a) and "adamw, lr encoder 5e-05" in text
    assert not torch.equal(weights(optimizer="adamw", encoder_lr=1e-2)[0], official_a)


def test_training_changes_nothing_of_the_model_given():
    """Training works on a clone: the MODEL's UNet keeps the very same weight tensors, no weight
    function is left on its layers and its patches and options are as they were."""
    model = tiny_model.__wrapped__("sdxl", seed=4)
    unet = model.model.diffusion_model
    tensors = {name: param for name, param in unet.named_parameters()}
    values = {name: param.detach().clone() for name, param in tensors.items()}
    options, patches = repr(model.model_options), dict(model.patches)
    run_train("sdxl", steps=2, model=model)
    assert not [name for name, layer in unet.named_modules() if getattr(layer, "weight_function", None)]
    comfy.model_management.load_models_gpu([model])  # the MODEL used again
    assert all(param is tensors[name] for name, param in unet.named_parameters())
    assert all(torch.equal(param, values[name]) for name, param in unet.named_parameters())
    assert not [name for name, layer in unet.named_modules() if getattr(layer, "weight_function", None)]
    assert repr(model.model_options) == options and dict(model.patches) == patches


def test_saved_files_are_readable_by_all_like_comfyuis_outputs(trained, models_folder):
    family, _, _, result = trained
    previous = os.umask(0o022)
    try:
        folder = Save.execute(result.result[0], "shared/run", False).result[0]
    finally:
        os.umask(previous)
    assert {oct(os.stat(os.path.join(folder, name)).st_mode & 0o777) for name in os.listdir(folder)} == {"0o644"}


def test_a_taken_save_name_is_refused_when_queued(models_folder):
    (models_folder / "taken").mkdir()
    assert Save.validate_inputs("taken", False) is True  # an empty folder is free
    (models_folder / "taken" / "controlnet.safetensors").write_bytes(b"")
    assert "already holds controlnet.safetensors" in Save.validate_inputs("taken", False)
    assert Save.validate_inputs("taken", True) is True
    assert "not a folder name" in Save.validate_inputs("../outside", True)


def test_save_may_write_the_release_its_own_runs_checkpoints_refreshed(models_folder):
    """Save named as Train's checkpoint_name: the checkpoints wrote the release files during the run
    (and a resumed run finds them there); Save writes the final ones over them, without overwrite.
    Another run's checkpointed release stays refused."""
    graph = {"1": {"class_type": "ControlNeXtTrain", "inputs": {"checkpoint_name": "mine"}},
             "2": {"class_type": "ControlNeXtSave", "inputs": {"controlnext": ["1", 0], "name": "mine",
                                                                "overwrite": False}}}
    result = run_train("sd15", steps=2, checkpoint_name="mine", checkpoint_every=1)
    assert os.path.isfile(models_folder / "mine" / "controlnet.safetensors")  # refreshed by the checkpoints
    assert Save.validate_inputs("mine", False) is True  # checkpoints there: left to Train's check
    train_nodes.check_saves_fed_by(graph, "1")
    Save.execute(result.result[0], "mine", False)
    assert release_files(models_folder / "mine")["controlnet.safetensors"].keys()
    graph["1"]["inputs"]["checkpoint_name"] = "another"
    with pytest.raises(host.core.ControlNeXtError, match=r"Save ControlNeXt \(node 2\).*already holds"):
        train_nodes.check_saves_fed_by(graph, "1")
    other = run_train("sd15", steps=1, checkpoint_name="another")
    with pytest.raises(host.core.ControlNeXtError, match="already exists"):
        Save.execute(other.result[0], "mine", False)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_gradient_checkpointing_gives_the_same_steps_on_weights_loaded_in_inference_mode(family):
    """ComfyUI loads checkpoints under torch.inference_mode. The backward pass recomputes each layer
    with the trained UNet weights the forward pass used, so checkpointing changes no step."""
    with torch.inference_mode():
        model = tiny_model.__wrapped__(family)  # not the cached one: training replaces its inference tensors
    (plain, _, plain_loss), (checkpointed, _, checkpointed_loss) = (
        run_train(family, steps=2, model=model, gradient_checkpointing=enabled, precision="fp32").result
        for enabled in (False, True))
    assert checkpointed_loss["loss"] == pytest.approx(plain_loss["loss"], rel=1e-5)
    assert plain.unet_file_weights.keys() == checkpointed.unet_file_weights.keys()
    assert all(torch.allclose(checkpointed.unet_file_weights[name], weight, atol=1e-6)
               for name, weight in plain.unet_file_weights.items())
    if family == "sdxl":  # the release holds deltas: the trained UNet weights moved
        assert any(weight.abs().max() > 0 for weight in plain.unet_file_weights.values())


def test_only_the_trained_weights_get_gradients_and_the_flags_come_back():
    """A UNet whose weights ask for gradients (built outside ComfyUI's executor) trains the same
    subset: its own weights get no gradient, and their flags are as they were afterwards."""
    model = tiny_model.__wrapped__("sdxl", seed=5)
    model.model.diffusion_model.requires_grad_(True)
    run_train("sdxl", steps=1, model=model)
    parameters = list(model.model.diffusion_model.parameters())
    assert all(p.grad is None for p in parameters)
    assert all(p.requires_grad for p in parameters)


def release_files(folder) -> dict[str, dict]:
    import safetensors.torch

    return {name: safetensors.torch.load_file(os.path.join(folder, name))
            for name in ("controlnet.safetensors", "unet.safetensors")}


@pytest.mark.slow
def test_checkpoints_resume_to_the_files_of_an_uninterrupted_run(models_folder):
    """7 steps with checkpoints, then the same node resumed to 12 (step 7 is mid-epoch: 4 pictures, 3
    a step): the release files equal those of 12 steps in one run, bit for bit, and the loss history
    continues."""
    settings = dict(steps=12, batch_size=3, checkpoint_every=5, optimizer="adamw", encoder_lr=1e-3, unet_lr=1e-3)
    straight = run_train("sd15", checkpoint_name="straight", **settings)
    first = run_train("sd15", checkpoint_name="resumed", **{**settings, "steps": 7})
    assert sorted(os.listdir(models_folder / "resumed" / "checkpoints")) == ["step-5", "step-7"]
    assert "Checkpoint:" in first.ui["controlnext_info"][0]
    with pytest.raises(host.core.ControlNeXtError, match=r"global batch .*: 3 \(3 x 1 x 1\) in the checkpoint, 2 \(2 x 1 x 1\) now"):
        run_train("sd15", checkpoint_name="resumed", resume="latest", **{**settings, "batch_size": 2})
    assert "already has checkpoints" in Train.validate_inputs("resumed", "no")
    resumed = run_train("sd15", checkpoint_name="resumed", resume="latest", **settings)
    assert "Resumed" in resumed.ui["controlnext_info"][0] and "at step 7" in resumed.ui["controlnext_info"][0]
    assert resumed.result[2]["loss"] == straight.result[2]["loss"]
    expected, actual = release_files(models_folder / "straight"), release_files(models_folder / "resumed")
    assert expected.keys() == actual.keys()
    for file in expected:
        assert all(torch.equal(actual[file][name], tensor) for name, tensor in expected[file].items()), file
    assert sorted(os.listdir(models_folder / "resumed" / "checkpoints")) == ["step-10", "step-12", "step-7"]


def test_gradient_accumulation_through_the_node_trains_the_batch_it_adds_up_to():
    whole = run_train("sd15", steps=2, batch_size=4, optimizer="adamw", precision="fp32")
    parts = run_train("sd15", steps=2, batch_size=2, gradient_accumulation_steps=2, optimizer="adamw",
                      precision="fp32")
    assert parts.result[2]["loss"] == pytest.approx(whole.result[2]["loss"], rel=1e-6)


def training_folder(root, count: int = 5) -> None:
    """Pictures of a block, their controls (the block's outline) in conditioning_images/, captions."""
    (root / "conditioning_images").mkdir(parents=True)
    for index in range(count):
        picture = np.full((72, 96, 3), 20, np.uint8)
        picture[8 + 6 * index:40 + 6 * index, 20:60] = (220, 160, 40)
        control = np.zeros((72, 96, 3), np.uint8)
        control[8 + 6 * index:40 + 6 * index, 20:60] = 255
        Image.fromarray(picture).save(root / f"block_{index}.png")
        Image.fromarray(control).save(root / "conditioning_images" / f"block_{index}.png")
        (root / f"block_{index}.txt").write_text(f"block {index}", encoding="utf-8")


def test_training_from_a_folder_streams_from_its_cache_and_equals_the_same_pictures_in_memory(input_folder):
    """Load Training Data -> Train ControlNeXt encodes the folder once into its cache (a second run
    encodes nothing, a changed picture alone is encoded again) and trains the same steps as the same
    pictures given as LATENT / IMAGE / CONDITIONING."""
    from server_nodes.tiny_checkpoint import tiny_clip, tiny_vae

    training_folder(input_folder / "blocks")
    clip, vae = tiny_clip("sd15"), tiny_vae()
    data, count = train_data.LoadTrainingData.execute("blocks", "auto", 64, "conditioning_images", ".txt", "", "none",
                                                      "image", "conditioning_image", "text").result
    assert count == 5 and all(item.control for item in data.items)
    settings = dict(steps=3, batch_size=2, optimizer="adamw", encoder_lr=1e-3, unet_lr=1e-3, precision="fp32",
                    gradient_checkpointing=False)
    model = tiny_model("sd15")
    from_data = run_train("sd15", model=model, latents=None, positive=None, control_images=None, data=data,
                          vae=vae, clip=clip, **settings)
    assert "Encoded 5 of 5 pairs into the cache" in from_data.ui["controlnext_info"][0]
    pairs = [train_data.load_training_pair(item, 64) for item in data.items]
    pictures, controls = torch.stack([p for p, _ in pairs]), torch.stack([c for _, c in pairs])
    with torch.no_grad():  # as ComfyUI runs the nodes that would make them
        latents = {"samples": torch.cat([vae.encode(picture[None]) for picture in pictures])}  # one by one, as cached
        positive = [entry for item in data.items for entry in train_data.encode_text(clip, item.caption)]
    in_memory = run_train("sd15", model=model, latents=latents, control_images=controls, positive=positive,
                          **settings)
    assert from_data.result[2]["loss"] == in_memory.result[2]["loss"]
    again = run_train("sd15", model=model, latents=None, positive=None, control_images=None, data=data, vae=vae,
                      clip=clip, **settings)
    assert "All 5 pairs were in the cache" in again.ui["controlnext_info"][0]
    assert again.result[2]["loss"] == from_data.result[2]["loss"]
    Image.fromarray(np.full((72, 96, 3), 90, np.uint8)).save(input_folder / "blocks" / "block_2.png")
    changed = run_train("sd15", model=model, latents=None, positive=None, control_images=None, data=data, vae=vae,
                        clip=clip, **settings)
    assert "Encoded 1 of 5 pairs" in changed.ui["controlnext_info"][0]
    assert "blocks" in train_data.input_subfolders()
    assert not [name for name in train_data.input_subfolders() if ".controlnext_cache" in name]  # not offered


def test_training_data_without_controls_needs_a_maker_and_makes_canny_once(input_folder):
    from server_nodes.tiny_checkpoint import tiny_clip, tiny_vae

    training_folder(input_folder / "photos")
    import shutil
    shutil.rmtree(input_folder / "photos" / "conditioning_images")
    arguments = ["photos", "auto", 64, "conditioning_images", ".txt", "", "none", "image", "conditioning_image", "text"]
    with pytest.raises(host.core.ControlNeXtError, match="pictures without controls.*make_controls"):
        train_data.LoadTrainingData.execute(*arguments)
    arguments[6] = "canny"
    data = train_data.LoadTrainingData.execute(*arguments).result[0]
    result = run_train("sd15", steps=1, latents=None, positive=None, control_images=None, data=data,
                       vae=tiny_vae(), clip=tiny_clip("sd15"))
    assert "Encoded 5 of 5 pairs" in result.ui["controlnext_info"][0]
    with pytest.raises(host.core.ControlNeXtError, match="connect the checkpoint's VAE"):
        run_train("sd15", steps=1, latents=None, positive=None, control_images=None, data=data)


def test_validation_samples_show_each_rounds_weights_as_apply_controlnext_samples_them(tmp_path, monkeypatch):
    """Every 2 steps (and before the first) the validation controls are sampled with the weights of
    that moment; the last round is the picture Apply ControlNeXt + the sampler give with the node's
    outputs, and the strip holds every round."""
    from server_nodes.tiny_checkpoint import tiny_vae

    monkeypatch.setattr(host.folder_paths, "output_directory", str(tmp_path))
    vae, controls, positive = tiny_vae(), squares()[1][:2], conditioning("sd15", 1)
    result = run_train("sd15", steps=4, validation_images=controls, validation_positive=positive, vae=vae,
                       validation_every=2, checkpoint_name="")
    folder = tmp_path / "controlnext_validation" / "run-local"
    assert sorted(os.listdir(folder)) == sorted([f"step-{step:06d}_{i}.png" for step in (0, 2, 4) for i in (0, 1)]
                                                + ["strip.png"])
    assert result.ui["images"] == [{"filename": "strip.png", "subfolder": os.path.join("controlnext_validation",
                                                                                       "run-local"), "type": "output"}]
    assert "Validation samples at steps 0, 2, 4" in result.ui["controlnext_info"][0]
    trained, patched, _ = result.result
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latents = comfy.sample.sample(apply(patched, trained, controls), noise, 20, 1.0, "euler", "normal", positive,
                                      positive, torch.zeros_like(noise), seed=3, disable_pbar=True)
        expected = (vae.decode(latents).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(Image.open(folder / "step-000004_1.png")), expected[1])
    first = np.asarray(Image.open(folder / "step-000000_1.png"))
    assert not np.array_equal(first, expected[1])  # training changed the samples
    strip = np.asarray(Image.open(folder / "strip.png"))
    assert strip.shape == (2 * 64, 3 * 64, 3)
