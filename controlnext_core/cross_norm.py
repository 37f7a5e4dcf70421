"""Cross normalisation: the one place the ControlNeXt injection formula lives (spec §2)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .families import InjectionRule

# A control whose spread is below this fraction of its magnitude is flat: its "variation" is
# rounding noise, which the official formula would blow up by 1/eps (values around 1e4).
FLAT_RELATIVE_STD = 1e-4


def _per_sample_std_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    std, mean = torch.std_mean(x, dim=(1, 2, 3), keepdim=True)  # unbiased, as torch.std
    return std, mean


def cross_normalize(control: torch.Tensor, hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """Give ``control`` the per-sample mean and std of ``hidden``; fp32 statistics and result."""
    c = control.float()
    std_h, mean_h = _per_sample_std_mean(hidden.float())
    std_c, mean_c = _per_sample_std_mean(c)
    flat = std_c <= FLAT_RELATIVE_STD * c.abs().mean(dim=(1, 2, 3), keepdim=True)
    centred = torch.where(flat, torch.zeros_like(c), c - mean_c)
    return centred * (std_h / (std_c + eps)) + mean_h


def pool_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def control_term(hidden: torch.Tensor, control: torch.Tensor, rule: InjectionRule) -> torch.Tensor:
    """The normalised, pooled control in fp32, before strength: ``pool(c')`` of spec §2."""
    size = hidden.shape[-2:]
    if rule.pool_first:
        return cross_normalize(pool_to(control, size), hidden, rule.eps)
    return pool_to(cross_normalize(control, hidden, rule.eps), size)


def add_control(
    hidden: torch.Tensor,
    control: torch.Tensor,
    rule: InjectionRule,
    strength: float | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h + pool(c') * strength * k``; ``strength`` is a float or a per-row tensor [B].

    Never writes into its inputs. ``mask`` ([B or 1, H', W'] in [0,1]) limits where control acts.
    """
    if not torch.is_tensor(strength) and strength == 0:
        return hidden
    if control.shape[0] != hidden.shape[0]:
        raise ValueError(f"control batch {control.shape[0]} does not match hidden batch {hidden.shape[0]}")
    term = control_term(hidden, control, rule)
    if torch.is_tensor(strength):
        term = term * (strength.to(term).reshape(-1, 1, 1, 1) * rule.factor)
    else:
        term = term * (strength * rule.factor)
    if mask is not None:
        mask = F.interpolate(mask.float().to(term.device)[:, None], size=hidden.shape[-2:], mode="bilinear",
                             align_corners=False)
        term = term * mask
    return hidden + term.to(hidden.dtype)
