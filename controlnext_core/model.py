"""Loading official ControlNeXt files into a ``ControlNeXt`` object (plain torch)."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pickle
import re
from typing import Iterable, Mapping

import torch
from torch.nn import functional as F

from . import encoders, families
from .cross_norm import add_control
from .encoders import ConditionEncoder
from .errors import ControlNeXtError
from .families import InjectionRule

log = logging.getLogger("ControlNeXt")

V1_UNCOND_SCALE = 0.5 * 1.3  # sigmoid(0) * 1.3
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers
# What a weights file holds (``weights_kind``): the loaders list the files of their kind.
ENCODER, UNET, OTHER = "encoder", "unet", "other"
# The top-level names UNet weights have in the files ``nodes/unet_keys.py`` maps: diffusers, then ComfyUI/LDM
# (also under a full checkpoint's FULL_CHECKPOINT_UNET).
UNET_ROOTS = ("conv_in.", "conv_out.", "conv_norm_out.", "time_embedding.", "add_embedding.", "down_blocks.",
              "mid_block.", "up_blocks.", "input_blocks.", "middle_block.", "output_blocks.", "time_embed.",
              "label_emb.", "out.")
FULL_CHECKPOINT_UNET = "model.diffusion_model."


def _looks_like_safetensors(path: str, size: int) -> bool:
    """An 8-byte little-endian header length, then a JSON header that fits in the file."""
    with open(path, "rb") as file:
        head = file.read(9)
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + header_length <= size


def _looks_like_pytorch(path: str) -> bool:
    """torch.save writes a zip archive (``PK``), or a pickle starting with the PROTO opcode."""
    with open(path, "rb") as file:
        head = file.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a weights file on the CPU without ever running code from it.

    safetensors are read as data (whatever the file is named); pickles only with
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ControlNeXtError(f"ControlNeXt file not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise ControlNeXtError(f"'{name}' is an empty file (0 bytes): the download failed; download it again.")
    lower = name.lower()
    if not lower.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise ControlNeXtError(
            f"'{name}' has an unknown extension: ControlNeXt files are .safetensors (or .bin/.pt pickles)."
        )
    if lower.endswith(SAFETENSORS_SUFFIXES) or _looks_like_safetensors(path, size):
        import safetensors.torch

        try:
            state_dict = safetensors.torch.load_file(path, device="cpu")
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise ControlNeXtError(
                f"'{name}' is not a readable safetensors file ({error}); it is probably truncated or corrupt: "
                f"download it again."
            ) from None
    elif not _looks_like_pytorch(path):
        raise ControlNeXtError(
            f"'{name}' is neither a PyTorch weights file nor a safetensors file (it starts with "
            f"{_first_bytes(path)!r}); it may be a failed download (an error page) or another kind of file: "
            f"download it again."
        )
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ControlNeXtError(
                f"Refused to load '{name}' (in {os.path.dirname(os.path.abspath(path))}): it is a pickle holding "
                f"more than plain tensors, and unpickling it could run code{_what_the_pickle_calls(error)}. Do not "
                f"load it by other means: delete it and use a .safetensors copy of the model from its release."
            ) from None
        except Exception as error:
            raise ControlNeXtError(
                f"'{name}' is not a readable PyTorch weights file ({type(error).__name__}: {error}); it is "
                f"probably truncated or corrupt: download it again."
            ) from None
    if (not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict)
            or not all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise ControlNeXtError(f"'{name}' does not hold a flat dictionary of named tensors, so it is not a model file.")
    return dict(state_dict)


def _what_the_pickle_calls(error: pickle.UnpicklingError) -> str:
    """The function a refused pickle names (torch's own message also advises the unsafe loader,
    which the pack never repeats)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f" (it imports {found.group(1)})" if found else ""


def read_file_metadata(path: str) -> dict[str, str]:
    """The metadata in a safetensors file's header (``families.METADATA_FAMILY`` among them); {} for
    pickles, which carry none, and for a damaged file (``load_state_dict_file`` says what is wrong)."""
    if not _looks_like_safetensors(path, os.path.getsize(path)):
        return {}
    import safetensors

    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as file:
            return dict(file.metadata() or {})
    except Exception:  # safetensors raises its own error types for damaged headers
        return {}


def weights_kind(names: Iterable[str]) -> str:
    """What tensors of these names are: a ControlNeXt encoder (ENCODER), a release's UNet weights
    (UNET: every name a UNet's), or anything else (OTHER: ControlNets, LoRAs, checkpoints...)."""
    names = set(names)
    if names.issuperset(families.ENCODER_KEYS):
        return ENCODER
    if names and all(name.removeprefix(FULL_CHECKPOINT_UNET).startswith(UNET_ROOTS) for name in names):
        return UNET
    return OTHER


def weights_file_kind(path: str) -> str | None:
    """``weights_kind`` of a file, read without its tensors; None when that cannot be told cheaply
    (old-style or refused pickles, empty or damaged files: loading them says what is wrong).

    Cached by path, size and modification time, so listing a models folder again reads nothing.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _weights_file_kind(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _weights_file_kind(path: str, size: int, modified_ns: int) -> str | None:
    if not path.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        return OTHER  # load_state_dict_file refuses the file
    names = _weight_names(path, size)
    return None if names is None else weights_kind(names)


def _weight_names(path: str, size: int) -> list[str] | None:
    """The tensor names of a safetensors header, or of a torch zip file's pickle (its storages mapped,
    never read; ``weights_only`` as when loading, so nothing in it runs). As ``load_state_dict_file``
    reads it: a safetensors file by its content, whatever its name. None for anything else."""
    if size == 0:
        return None
    if path.lower().endswith(SAFETENSORS_SUFFIXES) or _looks_like_safetensors(path, size):
        with open(path, "rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if header_length > SAFETENSORS_MAX_HEADER or 8 + header_length > size:
                return None
            try:
                header = json.loads(file.read(header_length))
            except ValueError:
                return None
        return [name for name in header if name != "__metadata__"] if isinstance(header, dict) else None
    with open(path, "rb") as file:
        if not file.read(4).startswith(b"PK\x03\x04"):
            return None  # an old-style pickle is read whole to list its names
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # refused, damaged or foreign: the loader says which
        return None
    return [str(name) for name in state_dict] if isinstance(state_dict, Mapping) else None


def _first_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read(16)


class ControlNeXt:
    """A loaded condition encoder, bound to the model family it serves.

    Several ControlNeXt objects may share one encoder module (one per family it is applied to).
    """

    def __init__(self, encoder: ConditionEncoder, rule: InjectionRule):
        if encoder.config is not encoders.CONFIGS[rule.layout]:
            raise AssertionError("encoder and rule disagree on the layout")
        self.encoder = encoder
        self.rule = rule

    @property
    def family(self) -> str:
        return self.rule.family

    @property
    def layout(self) -> str:
        return self.rule.layout

    @property
    def scale(self) -> float:
        """The file's own multiplier: its learned ``scale``, else the control scale it was trained with
        (its metadata; official files carry none and load at 1.0)."""
        if not self.encoder.config.scale_parameter:
            return float(self.encoder.control_scale)
        raw = float(self.encoder.scale.detach().float())
        if self.rule.uncond == "v1":  # SVD v1 uses sigmoid(scale) * 1.3
            return float(torch.sigmoid(torch.tensor(raw))) * 1.3
        return raw

    def gains(self, strength: float, cond_only: bool = False) -> tuple[float, float]:
        """(cond, uncond) multipliers for ``add_unit_control``: file scale x ``strength`` per CFG half."""
        cond = strength * self.scale
        if cond_only or self.rule.uncond == "none":
            return cond, 0.0
        if self.rule.uncond == "v1":  # the SVD v1 pipeline zeroes the scale *before* its sigmoid
            return cond, strength * V1_UNCOND_SCALE
        return cond, cond

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.encoder.parameters())

    def encode(self, image: torch.Tensor, timestep: torch.Tensor,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Raw encoder output, before normalisation and scale.

        ``image`` [B,3,H,W] in [0,1] (video: frames flattened into B); ``timestep`` [B] in the
        UNet's own units (or one value for all rows). ``compute_dtype`` (fp16/bf16) runs the
        convs in that precision without touching the stored weights.
        """
        image, timestep = self._check_inputs(image, timestep)
        with self._precision(image, compute_dtype):
            return self.encoder(image, timestep, self.rule.embedding_padding)

    def encode_for(self, image: torch.Tensor, timestep: torch.Tensor, size: tuple[int, int],
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The control as ``inject`` will use it at a hidden state of spatial ``size``.

        Equal to ``encode`` followed by the injection's own pooling. For the pool-first rules the
        final 1x1 conv runs after pooling (exact: pooling is linear, the conv acts per pixel),
        which saves its cost at full resolution.
        """
        if not self.rule.pool_first:
            return self.encode(image, timestep, compute_dtype)
        image, timestep = self._check_inputs(image, timestep)
        with self._precision(image, compute_dtype):
            features = self.encoder.features(image, timestep, self.rule.embedding_padding)
            if tuple(features.shape[-2:]) != tuple(size):
                features = F.adaptive_avg_pool2d(features, size)
            return self.encoder.project(features)

    @staticmethod
    def _precision(image: torch.Tensor, compute_dtype: torch.dtype | None):
        if compute_dtype in (torch.float16, torch.bfloat16) and compute_dtype != image.dtype:
            return torch.autocast(image.device.type, dtype=compute_dtype)
        return contextlib.nullcontext()

    def _check_inputs(self, image: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ControlNeXtError(f"The control image must be [B,3,H,W] RGB; got shape {list(image.shape)}.")
        min_side = 16 if self.rule.embedding_padding == 0 else 8
        if min(image.shape[-2:]) < min_side:
            raise ControlNeXtError(
                f"The control image is {image.shape[-1]}x{image.shape[-2]} pixels; ControlNeXt needs at least "
                f"{min_side} pixels per side (use the size of the image you generate)."
            )
        timestep = torch.as_tensor(timestep, device=image.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(image.shape[0])
        if timestep.numel() != image.shape[0]:
            raise ControlNeXtError(f"{timestep.numel()} timesteps for {image.shape[0]} control images.")
        param = next(self.encoder.parameters())
        return image.to(device=param.device, dtype=param.dtype), timestep.to(param.device)

    def to(self, *args, **kwargs) -> "ControlNeXt":
        self.encoder.to(*args, **kwargs)
        return self


def _control_scale(metadata: Mapping[str, str]) -> float:
    text = metadata.get("control_scale")
    if text is None:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ControlNeXtError(f"The file's metadata gives control_scale {text!r}, which is not a number: "
                               f"the file is corrupt or was edited by hand.")
    return value


def load_encoder(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> ConditionEncoder:
    """The encoder module of an official state dict (strict: every key and shape), on the CPU in fp32.

    ``metadata`` (``read_file_metadata``) may give the control scale a file was trained with.
    """
    not_tensors = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors or not all(isinstance(k, str) for k in state_dict):
        raise ControlNeXtError(
            f"A ControlNeXt state dict maps names to tensors; this one has "
            f"{'entries that are not tensors (' + ', '.join(not_tensors[:3]) + ')' if not_tensors else 'keys that are not names'}. "
            f"Load the file with load_state_dict_file.")
    layout = families.detect_layout(state_dict)
    encoder = ConditionEncoder(encoders.CONFIGS[layout])
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {list(state_dict[k].shape)} (expected {list(v.shape)})"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
        raise ControlNeXtError(
            f"This file looks like a ControlNeXt {families.LAYOUT_DESCRIPTIONS[layout]} encoder but does not match "
            f"it ({'; '.join(parts)}). It may be truncated, converted with other names, or from another project."
        )
    not_float = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in state_dict.items() if not v.is_floating_point()]
    if not_float:
        raise ControlNeXtError(
            f"The ControlNeXt file holds non-float tensors where weights must be floating point "
            f"({', '.join(not_float[:3])}); it is corrupt or not a ControlNeXt encoder."
        )
    # .float(): isfinite has no kernel for the float8 types
    bad = [k for k, v in state_dict.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise ControlNeXtError(
            f"The ControlNeXt file holds NaN or infinite weights ({', '.join(bad[:3])}); it is corrupt: download it again."
        )
    encoder.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    encoder.control_scale = _control_scale(metadata or {})
    encoder.eval().requires_grad_(False)
    return encoder


def load_encoder_file(path: str) -> tuple[ConditionEncoder, dict[str, str]]:
    """An encoder file's module (with the control scale its metadata gives) and its metadata."""
    metadata = read_file_metadata(path) if os.path.isfile(path) else {}
    return load_encoder(load_state_dict_file(path), metadata), metadata


def bind(encoder: ConditionEncoder, family: str | None = None) -> ControlNeXt:
    """Bind a loaded encoder to the model family it will serve (shares the weights)."""
    layout = encoder.layout
    if family is None:
        family = families.DEFAULT_FAMILY[layout]
        log.info("ControlNeXt: %s file, assuming it serves %s (pass family= to choose).",
                 families.LAYOUT_DESCRIPTIONS[layout], families.FAMILY_NAMES[family])
    return ControlNeXt(encoder, families.rule_for(family, layout))


def load_controlnext(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> ControlNeXt:
    """Build a ControlNeXt from an official encoder state dict (strict: every key and shape).

    ``family`` ("sd15", "sdxl", "svd") is the model family the file will serve; without it the
    most likely family for the layout is assumed (and logged).
    """
    return bind(load_encoder(state_dict), family)


def resize_control(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Stretch control images [N,3,H,W] to the generated size, as the official scripts do (training)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image.float(), size=(height, width), mode="bicubic", antialias=True,
                         align_corners=False).clamp_(0.0, 1.0)


def fit_control(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fit control images [N,3,H,W] to the generated size as ComfyUI's ControlNets fit theirs
    (``common_upscale(hint, width, height, "nearest-exact", "center")``): the centre of the image
    at the target's aspect ratio (the same rounding), scaled by nearest-exact sampling. So a
    ControlNeXt and an ordinary ControlNet given one photo of another shape cover the same region.
    The cut keeps at least one pixel (where ComfyUI's would leave none: a 2-pixel image on a 3:1
    picture).
    """
    old_height, old_width = image.shape[-2:]
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = min(round((old_width - old_width * (new_aspect / old_aspect)) / 2), (old_width - 1) // 2)
    elif old_aspect < new_aspect:
        y = min(round((old_height - old_height * (old_aspect / new_aspect)) / 2), (old_height - 1) // 2)
    if x or y:
        image = image[..., y:old_height - y, x:old_width - x]
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image.float(), size=(height, width), mode="nearest-exact")


def inject(
    hidden: torch.Tensor,
    control: torch.Tensor,
    family: str,
    strength: float,
    *,
    layout: str | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-normalise ``control`` against ``hidden``, pool, and add it as ``family`` does.

    ``strength`` is the whole user multiplier (file scale x node strength); the family constant
    (SVD's 0.2) is applied here. Returns ``hidden`` itself when strength is 0.
    """
    if layout is None:
        layout = families.DEFAULT_LAYOUT.get(family, "base")
    return add_control(hidden, control, families.rule_for(family, layout), strength, mask)
