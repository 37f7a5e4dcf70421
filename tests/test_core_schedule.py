"""Core tests: strength schedules over sampling progress and per latent / frame (no ComfyUI)."""
from __future__ import annotations

import math

import pytest

import controlnext_core as cn
from controlnext_core.schedule import (INTERPOLATIONS, Keyframe, LatentStrengths, ProgressScale, StrengthSchedule,
                                       parse_latent_strengths, parse_strengths, resolve, step_of)


def karras_like(percent: float) -> float:
    """A percent -> sigma map shaped like ComfyUI's (sentinels at 0 and 1, log-spaced between)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return math.exp(math.log(14.6) + (math.log(0.03) - math.log(14.6)) * percent ** 0.8)


def schedule(*keyframes: tuple) -> StrengthSchedule:
    out = StrengthSchedule()
    for keyframe in keyframes:
        out = out.with_keyframe(Keyframe(*keyframe))
    return out


def test_keyframes_hold_or_ease_towards_the_next_and_the_last_holds():
    held = schedule((0.2, 0.5), (0.6, 0.0))
    assert [held.at_percent(p) for p in (0.0, 0.19, 0.2, 0.59, 0.6, 1.0)] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    linear = schedule((0.0, 1.0, "linear"), (0.5, 0.0))
    assert linear.at_percent(0.25) == pytest.approx(0.5) and linear.at_percent(0.9) == 0.0
    eased = schedule((0.0, 0.0, "ease-in"), (1.0, 1.0))
    assert eased.at_percent(0.5) == pytest.approx(0.25)
    assert schedule((0.0, 0.0, "ease-in-out"), (1.0, 1.0)).at_percent(0.5) == pytest.approx(0.5)
    assert schedule((0.0, 0.0, "ease-out"), (1.0, 1.0)).at_percent(0.5) == pytest.approx(0.75)
    assert set(INTERPOLATIONS) == {"hold", "linear", "ease-in", "ease-out", "ease-in-out"}


def test_chaining_copies_sorts_by_percent_and_a_later_keyframe_at_the_same_percent_replaces():
    first = schedule((0.7, 0.1))
    chained = first.with_keyframe(Keyframe(0.3, 0.4)).with_keyframe(Keyframe(0.7, 0.9))
    assert first.keyframes == (Keyframe(0.7, 0.1),)  # the input schedule is untouched
    assert [(k.percent, k.strength) for k in chained.keyframes] == [(0.3, 0.4), (0.7, 0.9)]


def test_per_step_strengths_multiply_the_keyframes_and_the_last_value_holds():
    steps = schedule((0.5, 0.5)).with_step_strengths([1.0, 0.0, 2.0])
    assert [steps.at_step(i, 5) for i in range(5)] == [1.0, 0.0, 2.0, 2.0, 2.0]
    with pytest.raises(cn.ControlNeXtError, match="The strength list has 3 values for a sampling run of 2 steps: "
                                                  "give at most 2"):
        steps.at_step(0, 2)
    with pytest.raises(cn.ControlNeXtError, match="already has a strength per step"):
        steps.with_step_strengths([1.0])
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.5, 0.0]
    resolved = resolve(steps, karras_like)
    late = karras_like(0.5) * 0.9  # past the keyframe at 0.5
    assert resolved.strength(sigmas[0], sigmas) == 1.0 and resolved.strength(sigmas[1], sigmas) == 0.0
    assert resolved.strength(sigmas[2], sigmas) == 2.0
    assert resolved.strength(late, [10.0, 5.0, 2.0, late, 0.0]) == pytest.approx(0.5 * 2.0)
    with pytest.raises(cn.ControlNeXtError, match="needs the sampling run's schedule"):
        resolved.strength(sigmas[0], None)


def test_a_step_is_found_by_its_sigma_and_in_between_evaluations_count_with_their_step():
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]
    assert [step_of(s, sigmas) for s in sigmas[:-1]] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert step_of(5.0, sigmas) == (1, 4)  # heun's second evaluation of step 1
    assert step_of(7.0 * (1 - 1e-9), sigmas) == (1, 4)  # rounding of the sigma on its way to the model


def test_resolved_schedule_reaches_keyframes_by_sigma_and_eases_by_progress():
    resolved = resolve(schedule((0.0, 1.0, "linear"), (0.5, 0.0), (0.8, 0.7)), karras_like)
    assert resolved.keyframe_sigmas[0] > 1e8 and resolved.progress is not None
    for percent in (0.05, 0.2, 0.33, 0.45):
        sigma = karras_like(percent)
        assert resolved.strength(sigma, None) == pytest.approx(1.0 - percent / 0.5, abs=1e-4)
    at_keyframe = karras_like(0.8)  # a keyframe acts from its own sigma on, as start_percent does
    assert resolved.strength(at_keyframe, None) == 0.7 and resolved.strength(at_keyframe * 1.0001, None) == 0.0
    assert resolve(schedule((0.3, 0.2)), karras_like).progress is None  # hold only: nothing to ease


def test_progress_scale_inverts_percent_to_sigma():
    scale = ProgressScale(karras_like)
    for percent in (0.001, 0.1, 0.37, 0.5, 0.93, 0.999):
        assert scale.percent(karras_like(percent)) == pytest.approx(percent, abs=2e-4)
    assert scale.percent(1e9) == pytest.approx(0.0, abs=1e-4) and scale.percent(1e-9) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("make, message", [
    (lambda: Keyframe(1.2, 1.0), r"percent is 1.2: sampling progress goes from 0 \(first step\) to 1"),
    (lambda: Keyframe(-0.1, 1.0), "percent is -0.1"),
    (lambda: Keyframe(0.5, -1.0), "The strength of the keyframe at 0.5 is -1.0: strengths are numbers of 0 or more"),
    (lambda: Keyframe(0.5, math.nan), "is nan"),
    (lambda: Keyframe(0.5, 1.0, "cubic"), "Unknown interpolation 'cubic': use one of hold, linear"),
    (lambda: StrengthSchedule().with_step_strengths([]), "The per-step strength list is empty"),
    (lambda: parse_strengths("1, x", "per-step strength"), "'x' in the per-step strength list is not a number"),
    (lambda: parse_strengths("1, -0.5", "per-step strength"), "A value of the per-step strength list is -0.5"),
    (lambda: parse_strengths(" , ", "per-step strength"), "The per-step strength list is empty"),
])
def test_bad_schedules_are_refused_with_what_to_do(make, message):
    with pytest.raises(cn.ControlNeXtError, match=message):
        make()


def test_latent_strengths_as_a_list_one_for_all_or_one_each():
    assert parse_latent_strengths("0.5").for_count(3, "latents") == (0.5, 0.5, 0.5)
    assert parse_latent_strengths("1, 0.5\n0").for_count(3, "latents") == (1.0, 0.5, 0.0)
    with pytest.raises(cn.ControlNeXtError, match="3 strengths for 4 frames: give one strength \\(for all\\) or "
                                                  "exactly 4, one per frame"):
        parse_latent_strengths("1, 0.5, 0").for_count(4, "frames")


def test_latent_keyframes_interpolate_between_given_indices_and_count_negative_ones_from_the_end():
    fade_out = parse_latent_strengths("0=1, -4=1, -1=0")  # the last 4 frames fade out
    assert fade_out.for_count(8, "frames") == pytest.approx((1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0))
    held = parse_latent_strengths("2=0.5, 4=1", "hold")
    assert held.for_count(6, "latents") == (0.5, 0.5, 0.5, 0.5, 1.0, 1.0)
    with pytest.raises(cn.ControlNeXtError, match="The strength for frame 9 is outside the 8 frames: give indices "
                                                  r"from 0 to 7 \(or -1 for the last\)"):
        parse_latent_strengths("9=1").for_count(8, "frames")
    with pytest.raises(cn.ControlNeXtError, match="frame -9 is outside the 8 frames"):
        parse_latent_strengths("-9=1").for_count(8, "frames")


@pytest.mark.parametrize("text, message", [
    ("a=1", "'a=1': the part before '=' must be a whole latent or frame index"),
    ("0=x", "'0=x': the part after '=' must be a strength"),
    ("0=1, 0=0.5", "Index 0 is given twice"),
    ("1=-2", "The strength of index 1 is -2.0"),
    (",", "The latent strength list is empty"),
    ("1, -1", "A value of the latent strength list is -1.0"),
])
def test_bad_latent_strengths_are_refused_with_what_to_do(text, message):
    with pytest.raises(cn.ControlNeXtError, match=message):
        parse_latent_strengths(text)


def test_latent_strengths_need_exactly_one_form():
    with pytest.raises(cn.ControlNeXtError, match="either as a list or as index=strength keyframes"):
        LatentStrengths()
    with pytest.raises(cn.ControlNeXtError, match="either as a list or as index=strength keyframes"):
        LatentStrengths(values=(1.0,), keyframes=((0, 1.0),))
