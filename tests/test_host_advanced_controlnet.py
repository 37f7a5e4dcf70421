"""Host tests: Load ControlNeXt's CONTROL_NET in Advanced-ControlNet's Apply Advanced ControlNet, with
its timestep keyframes, latent keyframes, effect masks and weights' uncond multiplier, against the
same control made with this pack's own nodes (README, "Advanced-ControlNet").

Advanced-ControlNet is imported from ADVANCED_CONTROLNET_PATH (default
~/ComfyUI-Advanced-ControlNet, a checkout of github.com/Kosinkadink/ComfyUI-Advanced-ControlNet)
the way ComfyUI imports a custom node folder; without it this module skips.
"""
from __future__ import annotations

import importlib
import logging
import os
import re

import pytest
import safetensors.torch
import torch

import host  # skips this module without a ComfyUI host
from host import assert_close, conditioning, control_image, count_encoder_runs, sample
from controlnext_testbed.comfy_library import import_pack
from test_host_reliability_nodes import cheap_model

import folder_paths
import nodes as comfy_nodes

ACN_PATH = os.path.abspath(os.path.expanduser(
    os.environ.get("ADVANCED_CONTROLNET_PATH", "~/ComfyUI-Advanced-ControlNet")))
if not os.path.isfile(os.path.join(ACN_PATH, "adv_control", "utils.py")):
    pytest.skip(f"no Advanced-ControlNet at {ACN_PATH}: set ADVANCED_CONTROLNET_PATH to a checkout of "
                f"Kosinkadink/ComfyUI-Advanced-ControlNet", allow_module_level=True)

ACN_NAME = ACN_PATH.replace(".", "_x_")  # as ComfyUI names a custom node package
import_pack(ACN_NAME, ACN_PATH)
acn_nodes = importlib.import_module(f"{ACN_NAME}.adv_control.nodes_main")
acn_keyframes = importlib.import_module(f"{ACN_NAME}.adv_control.nodes_keyframes")
acn_weights = importlib.import_module(f"{ACN_NAME}.adv_control.nodes_weight")
acn_control = importlib.import_module(f"{ACN_NAME}.adv_control.control")
interop = host.importlib.import_module(f"{host.PACK_NAME}.nodes.advanced_controlnet")
schedule_nodes = host.importlib.import_module(f"{host.PACK_NAME}.nodes.schedule")
FAMILY = "sdxl"


@pytest.fixture
def loaded_control(tmp_path, monkeypatch):
    """(CONTROLNEXT, CONTROL_NET) as Load ControlNeXt outputs them from the models folder."""
    folder = tmp_path / "controlnext"
    folder.mkdir()
    safetensors.torch.save_file(host.random_encoder_state_dict("base", 2), str(folder / "canny.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnext", ([str(folder)], set()))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return host.loaders.LoadControlNeXt.execute("canny.safetensors").result


def apply(model, file, image, strength=1.0, **options):
    """Apply ControlNeXt (the MODEL route) with this pack's own schedule inputs."""
    return host.apply_module.ApplyControlNeXt.execute(model, file, image, strength, 0.0, 1.0, **options).result[0]


def advanced_apply(control_net, image, strength=1.0, mask=None, timestep_kf=None, latent_kf=None, weights=None):
    return acn_nodes.AdvancedControlNetApply.execute(
        conditioning(FAMILY, 1), conditioning(FAMILY, 2), control_net, image, strength, 0.0, 1.0,
        mask_optional=mask, timestep_kf=timestep_kf, latent_kf_override=latent_kf, weights_override=weights).args


def timestep_keyframes(*points):
    group = None
    for percent, strength in points:
        group = acn_keyframes.TimestepKeyframeNode.execute(percent, strength, prev_timestep_kf=group).args[0]
    return group


def our_keyframes(*points):
    schedule = None
    for percent, strength in points:
        schedule = schedule_nodes.StrengthKeyframeNode.execute(percent, strength, "hold", schedule).result[0]
    return schedule


def run(model, conds, batch=1, steps=2):
    return sample(model, FAMILY, batch=batch, steps=steps, positive=conds[0], negative=conds[1])


def test_the_control_net_is_an_advanced_control_and_still_serves_comfyuis_own_apply(loaded_control):
    file, control_net = loaded_control
    assert acn_control.is_advanced_controlnet(control_net)
    model, image = cheap_model(FAMILY), control_image()
    on_model = sample(apply(model, file, image, strength=0.8), FAMILY)
    conds = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        conditioning(FAMILY, 1), conditioning(FAMILY, 2), control_net, image, 0.8, 0.0, 1.0)
    assert_close(run(model, conds, steps=2), on_model)
    assert_close(run(model, advanced_apply(control_net, image, 0.8)), on_model)


def test_without_the_pack_it_is_the_plain_control_net(loaded_control, monkeypatch):
    file, _ = loaded_control
    monkeypatch.setattr(interop, "advanced_controlnet_module", lambda: None)
    assert type(interop.control_net_for(file)) is host.patch_module.ControlNeXtControlNet


def test_timestep_keyframes_act_as_this_packs_schedule_and_skip_the_encoder_at_zero(loaded_control, monkeypatch):
    file, control_net = loaded_control
    model, image = cheap_model(FAMILY), control_image()
    points = ((0.0, 1.0), (0.3, 0.5), (0.6, 0.0))
    runs = count_encoder_runs(file, monkeypatch)
    ours = sample(apply(model, file, image, schedule=our_keyframes(*points)), FAMILY, steps=4)
    our_runs = len(runs)
    runs.clear()
    conds = advanced_apply(control_net, image, timestep_kf=timestep_keyframes(*points))
    theirs = run(model, conds, steps=4)
    assert_close(theirs, ours)
    assert len(runs) == our_runs < 4
    assert_close(run(model, conds, steps=4), theirs)  # queued again: Advanced-ControlNet's state starts afresh


def test_latent_keyframes_and_effect_masks_act_per_latent(loaded_control):
    file, control_net = loaded_control
    model, image = cheap_model(FAMILY), control_image()
    # Advanced-ControlNet gives latents without a keyframe the null strength (0): latent 1 is off
    latent_kf = acn_keyframes.LatentKeyframeGroupNode.execute("0=0.5").args[0]
    strengths = schedule_nodes.LatentStrengthsNode.execute("0.5, 0", "linear").result[0]
    ours = sample(apply(model, file, image, latent_strengths=strengths), FAMILY, batch=2)
    assert_close(run(model, advanced_apply(control_net, image, latent_kf=latent_kf), batch=2), ours)
    masks = torch.stack([torch.ones(64, 64), torch.zeros(64, 64)])
    masks[0, :, 32:] = 0.0
    ours = sample(apply(model, file, image, mask=masks), FAMILY, batch=2)
    assert_close(run(model, advanced_apply(control_net, image, mask=masks), batch=2), ours)


def test_the_weights_uncond_multiplier_applies_and_per_layer_weights_are_refused(loaded_control):
    file, control_net = loaded_control
    model, image = cheap_model(FAMILY), control_image()
    weights = acn_weights.ScaledSoftUniversalWeights.execute(1.0, uncond_multiplier=0.25).args[0]
    ours = sample(apply(model, file, image, uncond_multiplier=0.25), FAMILY)
    assert_close(run(model, advanced_apply(control_net, image, weights=weights)), ours)
    soft = acn_weights.ScaledSoftUniversalWeights.execute(0.825).args[0]
    with pytest.raises(host.core.ControlNeXtError, match="ControlNeXt adds its control at one UNet block, so per-layer"):
        advanced_apply(control_net, image, weights=soft)


def test_controls_chained_before_it_through_advanced_controlnet_still_act(loaded_control, tmp_path):
    file, control_net = loaded_control
    depth_file = host.loaded(tmp_path, "base", seed=5)
    model, canny, depth = cheap_model(FAMILY), control_image(), control_image(seed=4)
    ours = sample(apply(apply(model, depth_file, depth, 0.6), file, canny, 0.8), FAMILY)
    conds = conditioning(FAMILY, 1), conditioning(FAMILY, 2)
    for control, image, strength in ((interop.control_net_for(depth_file), depth, 0.6), (control_net, canny, 0.8)):
        conds = acn_nodes.AdvancedControlNetApply.execute(*conds, control, image, strength, 0.0, 1.0).args
    assert_close(run(model, conds), ours)


@pytest.fixture
def fresh_adoption():
    """The Advanced-ControlNet class built again (and once more after the test), as at a new start."""
    interop.advanced_control_class.cache_clear()
    yield
    interop.advanced_control_class.cache_clear()


def test_a_release_this_pack_does_not_know_is_said_once_in_the_log(loaded_control, monkeypatch, caplog,
                                                                 fresh_adoption):
    file, _ = loaded_control
    installed = interop.pack_version(interop.advanced_controlnet_module())
    assert re.fullmatch(r"\d+\.\d+\.\d+", installed), installed  # read from the checkout's pyproject.toml
    assert interop.unknown_version_note("1.5.8") is None and interop.unknown_version_note("1.4.0") is None
    assert "(its pyproject.toml gives none)" in interop.unknown_version_note(None)
    monkeypatch.setattr(interop, "pack_version", lambda module: "1.6.0")
    with caplog.at_level(logging.WARNING, logger="ControlNeXt"):
        controls = [interop.control_net_for(file) for _ in range(2)]
    assert [r.getMessage() for r in caplog.records] == [
        f"ControlNeXt: {interop.unknown_version_note('1.6.0')}"]
    assert caplog.records[0].getMessage().startswith(
        "ControlNeXt: Advanced-ControlNet 1.6.0 is not a release this pack knows (it is written for the 1.4 and 1.5 "
        "releases).")
    assert all(acn_control.is_advanced_controlnet(control) for control in controls)  # adopted all the same
