"""Cross normalisation: the one place the ControlNeXt injection formula lives (README, "Where the
control goes").

The formula ``c' = (c - mu_c) * sd_h / (sd_c + eps) + mu_h`` splits into a part that depends
only on the control, ``u = (c - mu_c) / (sd_c + eps)``, and a per-sample affine map from the
hidden state, ``c' = u * sd_h + mu_h``. Pooling is linear and maps constants to themselves, so
``pool(c') = pool(u) * sd_h + mu_h`` whichever order the family uses. ``unit_control`` is
therefore computed once per step and shared by every CFG chunk, and only the cheap affine map
touches the hidden state.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .families import InjectionRule

# A control is flat when its spread is at the level of rounding: at most this many units of
# rounding (the machine epsilon of the dtype it was computed in) of its largest magnitude. Its
# "variation" is then rounding noise, which the official formula would blow up by 1/eps (values
# around 1e4). Any larger spread is signal, however faint, and is scaled up as the official
# formula does.
FLAT_ROUNDING_UNITS = 4


def pool_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, tuple(size))


def _statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and unbiased std, each by its own reduction as the official code takes them
    (``torch.std_mean``'s mean can be one rounding away, which a faint control amplifies)."""
    return x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)


def _unit(control: torch.Tensor, eps: float) -> torch.Tensor:
    rounding = torch.finfo(control.dtype).eps if control.is_floating_point() else torch.finfo(torch.float32).eps
    c = control.float()
    mean, std = _statistics(c)
    magnitude = c.abs().amax(dim=(1, 2, 3), keepdim=True)
    flat = std <= FLAT_ROUNDING_UNITS * rounding * magnitude
    return torch.where(flat, torch.zeros_like(c), c - mean) / (std + eps)


def unit_control(control: torch.Tensor, size: torch.Size | tuple[int, int], rule: InjectionRule) -> torch.Tensor:
    """``pool(u)``: the control normalised to zero mean and unit std, at the hidden size; fp32."""
    if rule.pool_first:
        return _unit(pool_to(control, size), rule.eps)
    return pool_to(_unit(control, rule.eps), size)


def add_unit_control(
    hidden: torch.Tensor,
    unit: torch.Tensor,
    rule: InjectionRule,
    strength: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    statistics_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h + (unit * sd_h + mu_h) * strength * k`` with fp32 statistics; never writes its inputs.

    ``unit`` has batch 1 or ``hidden``'s; ``strength`` is a float or a per-row tensor;
    ``mask`` [1 or B, H', W'] in [0,1] limits where control acts (resized to ``hidden``);
    ``statistics_of``: take sd_h and mu_h from this tensor instead of ``hidden`` (the UNet's own
    hidden state, when another control was already added to ``hidden`` at the same block).
    """
    if not torch.is_tensor(strength) and strength == 0:
        return hidden
    if unit.shape[0] not in (1, hidden.shape[0]):
        raise ValueError(f"control batch {unit.shape[0]} does not match hidden batch {hidden.shape[0]}")
    mean_h, std_h = _statistics((hidden if statistics_of is None else statistics_of).float())
    if torch.is_tensor(strength):
        gain = strength.to(device=std_h.device, dtype=torch.float32).reshape(-1, 1, 1, 1) * rule.factor
    else:
        gain = strength * rule.factor
    term = (unit.to(std_h.device) * std_h + mean_h) * gain
    if mask is not None:
        term = term * F.interpolate(mask.float().to(term.device)[:, None], size=hidden.shape[-2:],
                                    mode="bilinear", align_corners=False)
    return hidden + term.to(hidden.dtype)  # no fp32 copy of the hidden state


def add_control(
    hidden: torch.Tensor,
    control: torch.Tensor,
    rule: InjectionRule,
    strength: float | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h + pool(c') * strength * k`` for a raw encoder output ``control``."""
    if not torch.is_tensor(strength) and strength == 0:
        return hidden
    return add_unit_control(hidden, unit_control(control, hidden.shape[-2:], rule), rule, strength, mask)
