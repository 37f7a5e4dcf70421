"""Host tests of the opt-in "refresh every k steps" mode that the benchmark measures
(Apply ControlNeXt's optional ``refresh_every`` input; nodes/patch.py)."""
from __future__ import annotations

import pytest
import torch

import host  # skips this module without a ComfyUI host
from host import count_encoder_runs, control_image, loaded, sample, tiny_model

ApplyControlNeXt = host.apply_module.ApplyControlNeXt


def apply(model, file, image, refresh_every=None, **kwargs):
    extra = {} if refresh_every is None else {"refresh_every": refresh_every}
    return ApplyControlNeXt.execute(model, file, image, 1.0, 0.0, 1.0, **kwargs, **extra).result[0]


def test_refresh_every_one_is_the_exact_default(tmp_path):
    model = tiny_model("sdxl")
    file = loaded(tmp_path, "base")
    exact = sample(apply(model, file, control_image()), "sdxl", steps=4)
    assert torch.equal(sample(apply(model, file, control_image(), refresh_every=1), "sdxl", steps=4), exact)


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", [("sd15", "mid"), ("sdxl", "base")])
def test_refresh_every_k_encodes_at_steps_0_k_2k_and_repeats_exactly(tmp_path, monkeypatch, family, layout):
    model = tiny_model(family)
    file = loaded(tmp_path, layout)
    calls = count_encoder_runs(file, monkeypatch)
    patched = apply(model, file, control_image(), refresh_every=3)
    first = sample(patched, family, steps=7)
    assert calls == [1, 1, 1]  # steps 0, 3 and 6 of 7 (cond and uncond share each)
    exact = sample(apply(model, file, control_image()), family, steps=7)
    bare = sample(model, family, steps=7)
    moved, effect = (first - exact).norm(), (exact - bare).norm()
    assert 0 < moved < effect, "an approximation of the exact control, not another result"
    calls.clear()
    assert torch.equal(sample(patched, family, steps=7), first), "a second run does not reuse the first run's control"
    assert calls == [1, 1, 1]


def test_refresh_mode_with_two_evaluations_per_step_still_refreshes_per_block_of_steps(tmp_path, monkeypatch):
    model = tiny_model("sd15")
    file = loaded(tmp_path, "mid")
    calls = count_encoder_runs(file, monkeypatch)
    sample(apply(model, file, control_image(), refresh_every=2), "sd15", steps=4, sampler="heun")
    # heun evaluates at sigma_i and sigma_i+1: steps 0-1 share one control, steps 2-3 the next
    assert len(calls) == 2


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_refresh_every_must_be_a_whole_number_of_steps(tmp_path, bad):
    with pytest.raises(host.core.ControlNeXtError, match="refresh_every"):
        apply(tiny_model("sd15"), loaded(tmp_path, "mid"), control_image(), refresh_every=bad)


def test_the_node_lists_refresh_every_as_an_optional_input_with_a_tooltip():
    schema = ApplyControlNeXt.define_schema()
    item = next(i for i in schema.inputs if i.id == "refresh_every")
    assert item.optional and item.default == 1 and item.min == 1 and item.tooltip
