"""When and where control acts: strength over sampling progress and per latent (or video frame).

A ``StrengthSchedule`` is data: keyframes (percent of sampling -> strength) with a named
interpolation towards the next keyframe, and optionally one strength per sampling step. It is
built by chaining, each link a copy (as Advanced-ControlNet's keyframe groups), and resolved once
against a model's noise levels (``resolve``): the patch then compares sigmas, as start/end percent
do. ``LatentStrengths`` gives each latent of a batch, or each frame of a video, a multiplier.
The rules are in the README ("Schedules and per-frame strength").
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import ControlNeXtError

# How the strength goes from a keyframe to the next one: t in [0, 1] (the progress between the
# two) -> the fraction of the way to the next keyframe's strength.
INTERPOLATIONS: dict[str, Callable[[float], float]] = {
    "hold": lambda t: 0.0,
    "linear": lambda t: t,
    "ease-in": lambda t: t * t,
    "ease-out": lambda t: 1.0 - (1.0 - t) ** 2,
    "ease-in-out": lambda t: (1.0 - math.cos(math.pi * t)) / 2.0,
}
# Samples of percent -> sigma that ``ProgressScale`` interpolates between: one per timestep of
# ComfyUI's discrete sampling (percent = 1 - t / 999), between which its log sigma is linear.
PROGRESS_POINTS = 999
# A step's sigma is matched to the sampling schedule up to this relative rounding.
SIGMA_MATCH = 1e-6


def check_strength(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ControlNeXtError(f"{what} is {value}: strengths are numbers of 0 or more (0 = no control).")
    return value


def check_interpolation(name: str) -> str:
    if name not in INTERPOLATIONS:
        raise ControlNeXtError(f"Unknown interpolation '{name}': use one of {', '.join(INTERPOLATIONS)}.")
    return name


def parse_strengths(text: str, what: str) -> tuple[float, ...]:
    """``"1, 0.8, 0.5"`` -> (1.0, 0.8, 0.5); commas, spaces or new lines between the values."""
    parts = [part for part in text.replace(",", " ").split()]
    if not parts:
        raise ControlNeXtError(f"The {what} list is empty: give numbers separated by commas, e.g. '1, 0.5, 0'.")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ControlNeXtError(f"'{part}' in the {what} list is not a number: give numbers separated by "
                                   f"commas, e.g. '1, 0.5, 0'.") from None
        values.append(check_strength(value, f"A value of the {what} list"))
    return tuple(values)


@dataclass(frozen=True)
class Keyframe:
    """From ``percent`` of sampling on, ``strength``; ``interpolation`` says how it moves to the next keyframe."""

    percent: float
    strength: float
    interpolation: str = "hold"

    def __post_init__(self):
        percent = float(self.percent)
        if not 0.0 <= percent <= 1.0:
            raise ControlNeXtError(f"A keyframe's percent is {percent}: sampling progress goes from 0 (first step) "
                                   f"to 1 (the end). Give a percent between 0 and 1.")
        object.__setattr__(self, "percent", percent)
        object.__setattr__(self, "strength", check_strength(self.strength, f"The strength of the keyframe at {percent}"))
        check_interpolation(self.interpolation)


@dataclass(frozen=True)
class StrengthSchedule:
    """Keyframes sorted by percent (a later one at the same percent replaces an earlier one), and
    optionally one strength per sampling step; the two multiply."""

    keyframes: tuple[Keyframe, ...] = ()
    step_strengths: tuple[float, ...] | None = None

    def with_keyframe(self, keyframe: Keyframe) -> "StrengthSchedule":
        kept = [k for k in self.keyframes if k.percent != keyframe.percent]
        return StrengthSchedule(tuple(sorted(kept + [keyframe], key=lambda k: k.percent)), self.step_strengths)

    def with_step_strengths(self, values: Sequence[float]) -> "StrengthSchedule":
        if self.step_strengths is not None:
            raise ControlNeXtError("This schedule already has a strength per step: chain one list per schedule "
                                   "(keyframes can be chained with it).")
        values = tuple(check_strength(v, "A per-step strength") for v in values)
        if not values:
            raise ControlNeXtError("The per-step strength list is empty: give one strength per sampling step.")
        return StrengthSchedule(self.keyframes, values)

    def at_percent(self, percent: float) -> float:
        """The keyframe curve: 1 before the first keyframe, each keyframe's strength from its percent on,
        moving towards the next one by its interpolation; the last one holds to the end."""
        return self.curve(percent, sum(1 for k in self.keyframes if percent >= k.percent))

    def curve(self, percent: float, reached: int) -> float:
        """``at_percent`` when the first ``reached`` keyframes have started (``percent`` only serves to ease)."""
        index = reached - 1
        if index < 0:
            return 1.0
        keyframe = self.keyframes[index]
        if index + 1 == len(self.keyframes) or keyframe.interpolation == "hold":
            return keyframe.strength
        following = self.keyframes[index + 1]
        t = min(max((percent - keyframe.percent) / (following.percent - keyframe.percent), 0.0), 1.0)
        return keyframe.strength + (following.strength - keyframe.strength) * INTERPOLATIONS[keyframe.interpolation](t)

    def at_step(self, step: int, steps: int) -> float:
        """The per-step strength of step ``step`` of a sampling run of ``steps`` (1 without a list)."""
        if self.step_strengths is None:
            return 1.0
        if len(self.step_strengths) > steps:
            raise ControlNeXtError(
                f"The strength list has {len(self.step_strengths)} values for a sampling run of {steps} steps: give "
                f"at most {steps} (a shorter list is fine: its last value holds for the remaining steps).")
        return self.step_strengths[min(step, len(self.step_strengths) - 1)]

    @property
    def is_constant(self) -> bool:
        return not self.keyframes and self.step_strengths is None


class ProgressScale:
    """Sigma -> sampling percent for one model, from samples of its ``percent_to_sigma`` (the inverse
    ComfyUI does not give), interpolated in log sigma; used only between eased keyframes. Exact
    where log sigma is piecewise linear between the samples (ComfyUI's discrete and EDM samplings);
    0 above the first sample's sigma, 1 below the last one's."""

    def __init__(self, percent_to_sigma: Callable[[float], float], points: int = PROGRESS_POINTS):
        edge = 1e-9  # ComfyUI answers sentinels at exactly 0 and 1
        percents = [i / points for i in range(points + 1)]
        sigmas = [float(percent_to_sigma(min(max(p, edge), 1.0 - edge))) for p in percents]
        # ascending log sigma (descending percent), for bisect
        self.log_sigmas = [math.log(max(sigma, 1e-30)) for sigma in reversed(sigmas)]
        self.percents = list(reversed(percents))

    def percent(self, sigma: float) -> float:
        log_sigma = math.log(max(sigma, 1e-30))
        i = bisect.bisect_left(self.log_sigmas, log_sigma)
        if i == 0:
            return self.percents[0]
        if i == len(self.log_sigmas):
            return self.percents[-1]
        low, high = self.log_sigmas[i - 1], self.log_sigmas[i]
        t = 0.0 if high == low else (log_sigma - low) / (high - low)
        return self.percents[i - 1] + (self.percents[i] - self.percents[i - 1]) * t


@dataclass(frozen=True)
class ResolvedSchedule:
    """A schedule against one model's noise levels: keyframes are reached by sigma (as start_percent)."""

    schedule: StrengthSchedule
    keyframe_sigmas: tuple[float, ...]
    progress: ProgressScale | None

    def strength(self, sigma: float, sampling_sigmas: Sequence[float] | None) -> float:
        """The schedule's multiplier for a model call at ``sigma`` of a run sampling ``sampling_sigmas``."""
        reached = sum(1 for keyframe_sigma in self.keyframe_sigmas if sigma <= keyframe_sigma)
        percent = self.progress.percent(sigma) if self.progress is not None else 0.0
        value = self.schedule.curve(percent, reached)
        if self.schedule.step_strengths is not None and value != 0.0:
            if sampling_sigmas is None:
                raise ControlNeXtError("A strength per step needs the sampling run's schedule of noise levels, "
                                       "which this sampler does not give: use keyframes instead.")
            step, steps = step_of(sigma, sampling_sigmas)
            value *= self.schedule.at_step(step, steps)
        return value


def resolve(schedule: StrengthSchedule, percent_to_sigma: Callable[[float], float]) -> ResolvedSchedule:
    """Percent -> sigma once per model: the keyframes' sigmas, and the progress scale when a keyframe eases."""
    sigmas = tuple(float(percent_to_sigma(k.percent)) for k in schedule.keyframes)
    eased = any(k.interpolation != "hold" for k in schedule.keyframes[:-1])
    return ResolvedSchedule(schedule, sigmas, ProgressScale(percent_to_sigma) if eased else None)


def step_of(sigma: float, sampling_sigmas: Sequence[float]) -> tuple[int, int]:
    """(index of the step ``sigma`` falls in, number of steps) in a run's descending sigmas; evaluations
    between two sigmas of the schedule (heun, dpm_2) count with the step they start from."""
    steps = max(len(sampling_sigmas) - 1, 1)
    step = sum(1 for value in sampling_sigmas[:-1] if value >= sigma * (1.0 - SIGMA_MATCH)) - 1
    return min(max(step, 0), steps - 1), steps


@dataclass(frozen=True)
class LatentStrengths:
    """A multiplier per latent of a batch (or frame of a video): either ``values`` (one for all, or one
    each), or ``keyframes`` (index -> strength, negative indices counting from the end) with
    ``interpolation`` between given indices; before the first and after the last given index their
    strengths hold."""

    values: tuple[float, ...] | None = None
    keyframes: tuple[tuple[int, float], ...] = ()
    interpolation: str = "linear"

    def __post_init__(self):
        check_interpolation(self.interpolation)
        if (self.values is None) == (not self.keyframes):
            raise ControlNeXtError("Give latent strengths either as a list or as index=strength keyframes.")

    def for_count(self, count: int, unit: str) -> tuple[float, ...]:
        """One multiplier for each of ``count`` latents (``unit``: "latents" or "frames")."""
        if self.values is not None:
            if len(self.values) == 1:
                return self.values * count
            if len(self.values) != count:
                raise ControlNeXtError(f"{len(self.values)} strengths for {count} {unit}: give one strength (for all) "
                                       f"or exactly {count}, one per {unit[:-1]}.")
            return self.values
        points: dict[int, float] = {}
        for index, strength in self.keyframes:
            position = index + count if index < 0 else index
            if not 0 <= position < count:
                raise ControlNeXtError(f"The strength for {unit[:-1]} {index} is outside the {count} {unit}: give "
                                       f"indices from 0 to {count - 1} (or -1 for the last).")
            points[position] = strength
        given = sorted(points)
        out = []
        for position in range(count):
            after = bisect.bisect_right(given, position)
            if after == 0:
                out.append(points[given[0]])
            elif after == len(given):
                out.append(points[given[-1]])
            else:
                low, high = given[after - 1], given[after]
                t = (position - low) / (high - low)
                out.append(points[low] + (points[high] - points[low]) * INTERPOLATIONS[self.interpolation](t))
        return tuple(out)


def parse_latent_strengths(text: str, interpolation: str = "linear") -> LatentStrengths:
    """``"1, 1, 0.5"`` (a list) or ``"0=1, -4=1, -1=0"`` (index=strength keyframes)."""
    if "=" not in text:
        return LatentStrengths(values=parse_strengths(text, "latent strength"), interpolation=interpolation)
    keyframes = []
    for part in text.replace("\n", ",").split(","):
        if not part.strip():
            continue
        index_text, _, strength_text = part.partition("=")
        try:
            index = int(index_text.strip())
        except ValueError:
            raise ControlNeXtError(f"'{part.strip()}': the part before '=' must be a whole latent or frame index "
                                   f"(negative counts from the end), e.g. '0=1, -1=0'.") from None
        if any(index == given for given, _ in keyframes):
            raise ControlNeXtError(f"Index {index} is given twice in the latent strengths: give each index once.")
        try:
            strength = float(strength_text)
        except ValueError:
            raise ControlNeXtError(f"'{part.strip()}': the part after '=' must be a strength, e.g. '0=1, -1=0'.") from None
        keyframes.append((index, check_strength(strength, f"The strength of index {index}")))
    if not keyframes:
        raise ControlNeXtError("No index=strength pairs in the latent strengths: e.g. '0=1, -1=0'.")
    return LatentStrengths(keyframes=tuple(keyframes), interpolation=interpolation)
