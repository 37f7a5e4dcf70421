"""Training pictures for Train ControlNeXt: in memory (IMAGE / LATENT / CONDITIONING inputs), or a
folder on disk (Load Training Data) encoded once into a cache (controlnext_core.training_cache)
that training streams from, so memory does not grow with the number of pictures."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError, resize_control
from ..controlnext_core.dataset import LAYOUTS, TrainingItem, content_digest, load_training_pair, read_items
from ..controlnext_core.preprocess.canny import canny
from ..controlnext_core.train import TrainingBatch
from ..controlnext_core.training_cache import TrainingCache
from .loaders import CATEGORY
from .patch import LATENT_SCALE

log = logging.getLogger("ControlNeXt")
TrainingDataType = io.Custom("CONTROLNEXT_TRAINING_DATA")
CONTROL_MAKERS = ("none", "canny")  # how a folder of pictures only gets its controls
CACHE_FOLDER = ".controlnext_cache"  # inside the data folder: found, sized and removed with it
CACHE_FORMAT = "1"  # what the cached tensors mean; a change rebuilds every cache


def input_subfolders() -> list[str]:
    """The input folder's subfolders: a graph reads pictures from inside ComfyUI's input folder only."""
    return sorted(folder for folder in folder_paths.get_input_subfolders() if CACHE_FOLDER not in folder.split("/"))


def input_subfolder(folder: str) -> str:
    """The path of a subfolder of ComfyUI's input folder, refusing anything outside it."""
    root = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(root, folder))
    if os.path.isabs(folder) or os.path.commonpath([root, path]) != root or path == root:
        raise ControlNeXtError(f"'{folder}' is not a folder inside ComfyUI's input folder: put the pictures in a "
                               f"subfolder of {root} and pick it from the list.")
    if not os.path.isdir(path):
        raise ControlNeXtError(f"The input folder has no subfolder '{folder}': put the pictures in "
                               f"{os.path.join(root, folder)} (refresh the list after adding one).")
    return path


@dataclass(frozen=True)
class TrainingData:
    """What Load Training Data outputs: the folder's pairs, read and checked, not yet encoded."""

    root: str
    items: tuple[TrainingItem, ...]
    resolution: int
    make_controls: str
    reading: tuple[tuple[str, str], ...] = ()
    """How the folder was read (layout, columns...), by the headless command's flag names: a
    multi-process run reads it again the same way."""


class LoadTrainingData(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtLoadTrainingData",
            display_name="Load Training Data (ControlNeXt)",
            category=f"{CATEGORY}/training",
            description="A folder of training pairs for Train ControlNeXt, read from disk as it trains (for "
                        "thousands of pictures): encoded once into a cache inside the folder "
                        f"({CACHE_FOLDER}/), which later runs reuse.",
            inputs=[
                io.Combo.Input("folder", options=input_subfolders(),
                               tooltip="A subfolder of ComfyUI's input folder."),
                io.Combo.Input("layout", options=list(LAYOUTS), default="auto",
                               tooltip="folders: the pictures, their controls of the same names in control_folder, "
                                       "captions in .txt files beside the pictures. metadata: a metadata.jsonl / "
                                       ".csv (/ .parquet with pyarrow) naming picture, control and caption per row "
                                       "(the official / diffusers layout). pictures: pictures only, their controls "
                                       "made by make_controls. auto: metadata if there is a metadata file, folders "
                                       "if control_folder exists, else pictures."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training size (SD1.5: 512, SDXL: 1024): shorter side scaled, centre crop, "
                                     "the same for each control."),
                io.String.Input("control_folder", default="conditioning_images",
                                tooltip="folders layout: the folder (inside this one) of the control pictures."),
                io.String.Input("caption_extension", default=".txt",
                                tooltip="The caption files' extension, beside the pictures."),
                io.String.Input("default_caption", default="", multiline=True,
                                tooltip="The caption of pictures without one."),
                io.Combo.Input("make_controls", options=list(CONTROL_MAKERS), default="none",
                               tooltip="pictures layout: make each picture's control once, cached (canny: the "
                                       "pack's Canny with automatic thresholds)."),
                io.String.Input("image_column", default="image", tooltip="metadata layout: the picture column."),
                io.String.Input("conditioning_image_column", default="conditioning_image",
                                tooltip="metadata layout: the control picture column."),
                io.String.Input("caption_column", default="text", tooltip="metadata layout: the caption column."),
            ],
            outputs=[TrainingDataType.Output(display_name="data", tooltip="For Train ControlNeXt's data input."),
                     io.Int.Output(display_name="count", tooltip="How many pairs the folder holds.")],
        )

    @classmethod
    def execute(cls, folder: str, layout: str, resolution: int, control_folder: str, caption_extension: str,
                default_caption: str, make_controls: str, image_column: str, conditioning_image_column: str,
                caption_column: str) -> io.NodeOutput:
        data, text = training_data(input_subfolder(folder), folder, layout, resolution, control_folder,
                                   caption_extension, default_caption, make_controls, image_column,
                                   conditioning_image_column, caption_column)
        return io.NodeOutput(data, len(data.items), ui={"controlnext_info": [text]})


def training_data(root: str, label: str, layout: str, resolution: int, control_folder: str, caption_extension: str,
                  default_caption: str, make_controls: str, image_column: str, conditioning_image_column: str,
                  caption_column: str) -> tuple[TrainingData, str]:
    """A folder's pairs read and checked (Load Training Data, and the headless command's flags), and
    what was found, in words."""
    if resolution % LATENT_SCALE:
        raise ControlNeXtError(f"resolution {resolution} is not a multiple of 8.")
    if make_controls not in CONTROL_MAKERS:
        raise ControlNeXtError(f"make_controls '{make_controls}' is not one of {', '.join(CONTROL_MAKERS)}.")
    items = read_items(root, layout, control_folder=control_folder, caption_extension=caption_extension,
                       default_caption=default_caption, image_column=image_column,
                       conditioning_image_column=conditioning_image_column, caption_column=caption_column)
    without = sum(item.control is None for item in items)
    if without and make_controls == "none":
        raise ControlNeXtError(f"'{label}' holds pictures without controls ({without} of {len(items)}): set "
                               f"make_controls to make them, or add a '{control_folder}' folder of controls.")
    text = f"{len(items)} pairs in {label}" + (f", controls made by {make_controls}" if without else "")
    reading = (("layout", layout), ("control_folder", control_folder), ("caption_extension", caption_extension),
               ("default_caption", default_caption), ("make_controls", make_controls), ("image_column", image_column),
               ("conditioning_image_column", conditioning_image_column), ("caption_column", caption_column))
    return TrainingData(root, tuple(items), resolution, make_controls if without else "none", reading), text


class InMemoryPictures:
    """Train ControlNeXt's IMAGE / LATENT / CONDITIONING inputs as batches."""

    def __init__(self, model, family: str, samples: torch.Tensor, images: torch.Tensor, positive: list, device):
        self.model, self.family, self.positive, self.latent_shape = model, family, positive, samples.shape
        self.count = samples.shape[0]
        self.latents = model.model.process_latent_in(samples.to(device, torch.float32))
        height, width = samples.shape[-2] * LATENT_SCALE, samples.shape[-1] * LATENT_SCALE
        if tuple(images.shape[-2:]) != (height, width):
            log.info("ControlNeXt training: control images %sx%s resized to the pictures' %sx%s.",
                     images.shape[-1], images.shape[-2], width, height)
        self.controls = resize_control(images, height, width).to(device)
        self.digest = data_digest(samples, images, positive)

    def batch(self, indices: list[int], empty: list | None, empties: list[bool]) -> TrainingBatch:
        entries = [empty[0] if is_empty else self.positive[i if len(self.positive) > 1 else 0]
                   for i, is_empty in zip(indices, empties)]
        return TrainingBatch(self.latents[indices], self.controls[indices],
                             batch_conditioning(self.model, self.family, entries, self.latent_shape))


class CachedPictures:
    """A cached folder as batches: each batch's rows read from the cache's shards when it is trained."""

    def __init__(self, model, family: str, cache: TrainingCache, keys: list[str], device):
        self.model, self.family, self.cache, self.keys, self.device = model, family, cache, keys, device
        self.count = len(keys)
        self.digest = hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()[:16]

    def batch(self, indices: list[int], empty: list | None, empties: list[bool]) -> TrainingBatch:
        rows = self.cache.read_rows([self.keys[i] for i in indices])  # captions may differ in token length
        latents = torch.stack([row["latent"] for row in rows]).to(self.device, torch.float32)
        controls = torch.stack([row["control"] for row in rows]).to(self.device, torch.float32) / 255.0
        entries = [empty[0] if is_empty else [row["context"][None], {"pooled_output": _first_axis(row.get("pooled"))}]
                   for row, is_empty in zip(rows, empties)]
        return TrainingBatch(self.model.model.process_latent_in(latents), controls,
                             batch_conditioning(self.model, self.family, entries, latents.shape))


def _first_axis(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor[None]


def batch_conditioning(model, family: str, entries: list, latent_shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack CONDITIONING entries of one batch into (context, SDXL's y with the official time ids:
    original and target size = the training size, crop 0)."""
    tokens = math.lcm(*[entry[0].shape[1] for entry in entries])
    context = torch.cat([entry[0].repeat(1, tokens // entry[0].shape[1], 1) for entry in entries])
    if family != "sdxl":
        return context, None
    height, width = latent_shape[-2] * LATENT_SCALE, latent_shape[-1] * LATENT_SCALE
    y = torch.cat([model.model.encode_adm(pooled_output=entry[1]["pooled_output"], width=width, height=height,
                                          crop_w=0, crop_h=0, target_width=width, target_height=height)
                   for entry in entries])
    return context, y


def data_digest(samples: torch.Tensor, images: torch.Tensor, positive: list) -> str:
    """What the run trains on, in a few characters: a checkpoint of other data is not continued."""
    digest = hashlib.sha256()
    for tensor in [samples, images] + [t for cond, extra in positive
                                       for t in (cond, extra.get("pooled_output")) if t is not None]:
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(module: torch.nn.Module) -> str:
    """Which weights a module holds, cheaply: names, shapes and a few values of each tensor."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().flatten()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def text_encoder_fingerprint(clip) -> str:
    """What the captions' embeddings depend on besides the caption: the text encoder's weights as
    loaded (before any LoRA), the patches on them (a LoRA, a merge) with their strengths, the layer
    it reads (CLIP Set Last Layer) and its tokenizer options. Taken from the CLIP's patcher, so it is
    the same whether ComfyUI has applied the patches to the weights at the moment or not."""
    patcher = getattr(clip, "patcher", None)
    if not hasattr(patcher, "get_key_patches"):  # not ComfyUI's CLIP: its weights as they are
        return fingerprint(clip.cond_stage_model)
    digest = hashlib.sha256()
    for name, entries in sorted(patcher.get_key_patches().items()):
        digest.update(name.encode())
        base, patches = entries[0], entries[1:]
        _digest_value(digest, base[0] if isinstance(base, tuple) else base)  # (weight, convert function)
        _digest_value(digest, patches)
    _digest_value(digest, {"layer": getattr(clip, "layer_idx", None),
                           "tokenizer": dict(getattr(clip, "tokenizer_options", None) or {})})
    return digest.hexdigest()[:16]


def _digest_value(digest, value, depth: int = 0) -> None:
    """Adds a value to ``digest``: tensors by shape, dtype and a few values; containers, numbers and
    text by content; other objects (a patch's adapter) by their type and attributes."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().flatten()
        digest.update(f"T{tuple(value.shape)}{value.dtype}".encode())
        digest.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif depth > 8:
        digest.update(type(value).__qualname__.encode())
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}".encode())
        for entry in value:
            _digest_value(digest, entry, depth + 1)
    elif isinstance(value, (set, frozenset)):
        digest.update(repr(sorted(map(repr, value))).encode())
    elif isinstance(value, dict):
        digest.update(f"{{{len(value)}".encode())
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _digest_value(digest, value[key], depth + 1)
    else:
        digest.update(type(value).__qualname__.encode())
        attributes = getattr(value, "__dict__", None)
        if attributes:
            _digest_value(digest, {key: entry for key, entry in attributes.items() if not key.startswith("_")},
                          depth + 1)


def encode_text(clip, text: str) -> list:
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def cached_pictures(data: TrainingData, model, vae, clip, family: str, node_id, device) -> tuple[CachedPictures, str]:
    """The folder encoded into its cache (only the pairs not cached yet, or changed), and what was
    done in words. Cancel stops the encoding, as does a picture that cannot be read: the pairs
    encoded before it stay cached, and the next run goes on after them."""
    identity = {"format": CACHE_FORMAT, "family": family, "resolution": str(data.resolution),
                "controls": data.make_controls, "vae": fingerprint(vae.first_stage_model),
                "text_encoder": text_encoder_fingerprint(clip)}
    folder = os.path.join(data.root, CACHE_FOLDER, hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
                          .hexdigest()[:16])
    cache = TrainingCache(folder, identity)
    digests = {item.key(): hashlib.sha256("\0".join(
        [content_digest(item.picture), content_digest(item.control) if item.control else data.make_controls,
         item.caption]).encode()).hexdigest() for item in data.items}
    missing = cache.missing(digests)
    by_key = {item.key(): item for item in data.items}
    progress = comfy.utils.ProgressBar(len(missing), node_id=node_id)
    with cache.writer() as writer, torch.no_grad():
        for done, key in enumerate(missing):
            try:
                if done:
                    progress.update_absolute(done, len(missing))  # in a server, raises on a Cancel
                comfy.model_management.throw_exception_if_processing_interrupted()
                tensors = encode_pair(by_key[key], data, vae, clip, family, device)
            except (comfy.model_management.InterruptProcessingException, ControlNeXtError):
                writer.flush()  # the pairs encoded before are whole: kept, so the next run goes on after them
                raise
            writer.add(key, digests[key], tensors)
    if missing:
        progress.update_absolute(len(missing), len(missing))
    text = (f"Encoded {len(missing)} of {len(digests)} pairs into the cache {folder}" if missing
            else f"All {len(digests)} pairs were in the cache {folder}")
    log.info("ControlNeXt training: %s (%.1f MB).", text, cache.size_bytes() / 2 ** 20)
    return CachedPictures(model, family, cache, list(digests), device), text + "."


def encode_pair(item: TrainingItem, data: TrainingData, vae, clip, family: str, device) -> dict[str, torch.Tensor]:
    """One pair as the cache holds it: the picture's latent, the caption's embedding (SDXL: and pooled
    output), the control as bytes at the training resolution."""
    picture, control = load_training_pair(item, data.resolution)
    if control is None:
        control = canny(picture[None], device=device)[0]
    [[context, extra]] = encode_text(clip, item.caption)
    tensors = {"latent": vae.encode(picture[None])[0].cpu(), "context": context[0].cpu(),
               "control": (control.movedim(-1, 0) * 255).round().to(torch.uint8).cpu()}
    if extra.get("pooled_output") is not None and family == "sdxl":
        tensors["pooled"] = extra["pooled_output"][0].cpu()
    return tensors
