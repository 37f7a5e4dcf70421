"""What each row of one UNet call gets from a ControlNeXt (README, "Schedules and per-frame
strength"): its strength in each CFG chunk, its control image and mask, its unit control, and the
sum that adds them to the hidden state. Pure functions of the call's layout, so the ComfyUI patch
(nodes/patch.py) only reads ComfyUI's options and calls these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn import functional as F

from .cross_norm import add_unit_control, unit_control
from .errors import ControlNeXtError
from .families import InjectionRule
from .model import ControlNeXt
from .schedule import LatentStrengths
from .video import resample_frames


@dataclass(frozen=True)
class CallLayout:
    """How one UNet call's batch is laid out.

    ``chunks``: the CFG chunk kinds in batch order (0 cond, 1 uncond), each ``rows`` rows long;
    ``frames``: the video frame of each row under a context window (None without one); ``total``:
    the latents of the batch, or the frames of the whole video under a window (None when the
    window does not say).
    """

    chunks: tuple[int, ...]
    rows: int
    frames: tuple[int, ...] | None = None
    total: int | None = None

    def __post_init__(self):
        if self.frames is not None and len(self.frames) != self.rows:
            raise ControlNeXtError(f"A context window lists {len(self.frames)} frames for {self.rows} latent rows; "
                                   f"use one video per batch with ControlNeXt.")


@dataclass(frozen=True)
class RowPlan:
    """The strength of each row of each CFG chunk at one call (0: the row gets no control)."""

    gains: tuple[tuple[float, ...], ...]

    @property
    def active(self) -> tuple[int, ...]:
        """The rows some chunk controls: the only ones worth encoding."""
        return tuple(row for row in range(len(self.gains[0])) if any(chunk[row] for chunk in self.gains))


def controls_any_chunk(half_gains: tuple[float, float], chunks: Sequence[int], over_time: float) -> bool:
    """Whether a control whose CFG halves get ``half_gains`` (cond, uncond) acts on any of ``chunks``
    at a step where the schedule gives ``over_time``; when not, the call needs no planning at all."""
    return bool(over_time) and any(half_gains[min(kind, 1)] for kind in chunks)


def row_strengths(latent_strengths: LatentStrengths | None, layout: CallLayout, unit: str) -> tuple[float, ...]:
    """The options' strength of each row: per latent of the batch, or per video frame under a window
    (``unit``: "latents" or "frames")."""
    if latent_strengths is None:
        return (1.0,) * layout.rows
    if layout.total is None:
        raise ControlNeXtError("Per-frame strengths need the video's length, which these context windows do "
                               "not give: use the ControlNeXt SVD Window Guider.")
    values = latent_strengths.for_count(layout.total, unit)
    return values if layout.frames is None else tuple(values[frame] for frame in layout.frames)


def plan_rows(layout: CallLayout, half_gains: tuple[float, float], over_time: float = 1.0,
              latent_strengths: LatentStrengths | None = None, unit: str = "latents",
              call_strengths: Sequence[float] | None = None) -> RowPlan:
    """Each row's strength: its CFG half's gain x the schedule at this step (``over_time``) x the
    options' strength of its latent / frame x the CONTROL_NET's multiplier of this row at this call
    (``call_strengths``: one per row of every chunk, Advanced-ControlNet's keyframes)."""
    per_row = row_strengths(latent_strengths, layout, unit)
    rows = layout.rows
    if call_strengths is not None and len(call_strengths) != rows * len(layout.chunks):
        raise ControlNeXtError(f"The control gave {len(call_strengths)} strengths for {rows * len(layout.chunks)} rows.")
    gains = []
    for index, kind in enumerate(layout.chunks):
        gain = half_gains[min(kind, 1)] * over_time
        scales = call_strengths[index * rows:(index + 1) * rows] if call_strengths is not None else (1.0,) * rows
        gains.append(tuple(gain * per_row[row] * scales[row] for row in range(rows)))
    return RowPlan(tuple(gains))


def row_images(images: torch.Tensor, layout: CallLayout, unit: str, frame_policy: str = "error") -> torch.Tensor:
    """The control image of each row (or one image for all rows). Under a window, the window's
    frames of one image per video frame; ``frame_policy`` "resample" spreads another count of video
    frames evenly over the video instead of refusing it."""
    count = images.shape[0]
    video = unit == "frames"
    total, frames = layout.total, layout.frames
    if count != 1 and total is not None and count != total:
        if frame_policy != "resample":
            raise ControlNeXtError(
                f"{count} control images for {total} {unit}: give "
                f"{'one per video frame' if video else f'one image (used for the whole batch) or exactly {total}'}"
                f"{', or set frame_count to resample' if video else ''}.")
        images = resample_frames(images, total)
    if frames is None or images.shape[0] == 1:
        return images
    if max(frames) >= images.shape[0]:
        raise ControlNeXtError(
            f"The video window reaches frame {max(frames) + 1} but there are only {images.shape[0]} control "
            f"images: give one per video frame.")
    return images[list(frames)]


def row_masks(mask: torch.Tensor | None, layout: CallLayout, unit: str) -> torch.Tensor | None:
    """The mask [1 or rows, H, W] of each row: one for all, one per latent, or the window's frames of
    one per video frame."""
    if mask is None or mask.shape[0] == 1:
        return mask
    count, total, frames = mask.shape[0], layout.total, layout.frames
    if total is not None and count != total:
        raise ControlNeXtError(
            f"{count} masks for a batch of {total} latents: give one mask or exactly {total}." if unit == "latents"
            else f"{count} masks for {total} frames: give one mask or one per video frame.")
    if frames is None:
        return mask
    if max(frames) >= count:
        raise ControlNeXtError(f"The video window reaches frame {max(frames) + 1} but there are only {count} "
                               f"masks: give one mask or one per video frame.")
    return mask[list(frames)]


def combined_mask(mask: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor | None:
    """The product of two [1 or B, H, W] masks (``other`` resized to ``mask``'s size), or whichever is given."""
    if mask is None or other is None:
        return other if mask is None else mask
    other = F.interpolate(other.float()[:, None], size=mask.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return mask.float() * other.to(mask.device)


def encode_rows(controlnext: ControlNeXt, images: torch.Tensor, timesteps: torch.Tensor, size: tuple[int, int],
                compute_dtype: torch.dtype, rows: int, subset: tuple[int, ...] | None) -> torch.Tensor:
    """The unit control of each of ``rows`` rows at the hidden ``size``, fp32.

    ``images``: one image, or one per row; ``timesteps``: one per row, or one when every row is at
    one noise level. One image at one timestep is encoded once for every row (batch 1 out).
    ``subset``: encode only these rows; the others (at strength 0) get zeros.
    """
    shared = images.shape[0] == 1 and timesteps.shape[0] == 1
    if not shared:
        images = images.expand(rows, -1, -1, -1)
        if subset is not None:
            index = torch.tensor(subset, device=images.device)
            images, timesteps = images[index], timesteps[index.to(timesteps.device)]
    if images.device.type == "cpu":
        # oneDNN runs the encoder's full-resolution convs 10-20 % faster on channels-last input
        # (benchmarks/, README); its output goes back to the layout of h below.
        images = images.contiguous(memory_format=torch.channels_last)
    control = controlnext.encode_for(images, timesteps, size, compute_dtype=compute_dtype).contiguous()
    unit = unit_control(control, size, controlnext.rule)
    if subset is None or shared:  # one encoding, or every row encoded
        return unit
    every_row = unit.new_zeros((rows, *unit.shape[1:]))
    every_row[list(subset)] = unit
    return every_row


def add_planned_control(hidden: torch.Tensor, unit: torch.Tensor, rule: InjectionRule, plan: RowPlan,
                        mask: torch.Tensor | None = None, call_mask: torch.Tensor | None = None,
                        statistics_of: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden`` with ``unit`` added to each CFG chunk at its rows' strengths (``plan``).

    ``mask``: one or one per row; ``call_mask``: one per row of every chunk (a CONTROL_NET's, at
    this call); ``statistics_of``: the UNet's own hidden state when another control was already
    added to ``hidden`` at this block (``add_unit_control``). Chunks at strength 0 are left as they are.
    """
    reference = hidden if statistics_of is None else statistics_of
    rows = hidden.shape[0] // len(plan.gains)
    pieces = []
    for index, row_gains in enumerate(plan.gains):
        rows_here = slice(index * rows, (index + 1) * rows)
        piece = hidden[rows_here]
        if not any(row_gains):
            pieces.append(piece)
            continue
        strength = row_gains[0] if len(set(row_gains)) == 1 else torch.tensor(row_gains)
        piece_mask = combined_mask(mask, None if call_mask is None else call_mask[rows_here])
        pieces.append(add_unit_control(piece, unit, rule, strength, piece_mask, statistics_of=reference[rows_here]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
