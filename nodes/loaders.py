"""Load ControlNeXt encoders and the partial UNet weights some releases ship."""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError, load_encoder_file, load_state_dict_file
from ..controlnext_core.families import DEFAULT_FAMILY, FAMILY_NAMES, LAYOUT_DESCRIPTIONS, trained_family
from ..controlnext_core.model import ENCODER, UNET, weights_file_kind
from ..controlnext_core.unet_weights import MODES, OFFICIAL_MODE, unet_weight_patches
from .advanced_controlnet import control_net_for
from .patch import ControlNeXtFile, model_family, model_type_name
from .unet_keys import unet_key_map

CATEGORY = "ControlNeXt"
FOLDER = "controlnext"
SEARCHED_FOLDERS = (FOLDER, "controlnet")  # our folder first, then the usual ControlNet folder
ControlNeXtType = io.Custom("CONTROLNEXT")
log = logging.getLogger("ControlNeXt")


def register_model_folder(name: str) -> None:
    """models/<name> (respecting --base-directory) as a ComfyUI model folder, with any ``<name>:`` paths
    from extra_model_paths.yaml; created when missing so that files can be copied in. A models folder
    that cannot be written is logged, never fatal to the pack."""
    path = os.path.join(folder_paths.models_dir, name)
    folder_paths.add_model_folder_path(name, path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        log.warning("ControlNeXt: could not create the model folder %s (%s); create it to install models there.",
                    path, error)


register_model_folder(FOLDER)


def model_files() -> list[str]:
    """Every file in models/controlnext and models/controlnet."""
    names: list[str] = []
    for folder in SEARCHED_FOLDERS:
        names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
    return names


def files_holding(kind: str) -> list[str]:
    """The files a loader of ``kind`` (ENCODER or UNET) can take: a file read as another kind is left out,
    one that cannot be read cheaply stays (loading it says what is wrong)."""
    return [name for name in model_files() if _kind_of(name) in (kind, None)]


def _kind_of(name: str) -> str | None:
    path = full_path(name)
    return None if path is None else weights_file_kind(path)


def full_path(name: str) -> str | None:
    for folder in SEARCHED_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    return None


def resolve(name: str) -> str:
    path = full_path(name)
    if path is None:
        raise ControlNeXtError(
            f"'{name}' is not in the models/{FOLDER} or models/controlnet folders (or their extra_model_paths.yaml "
            f"entries). Put the file there and refresh the page.")
    return path


class LoadControlNeXt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtLoader",
            display_name="Load ControlNeXt",
            category=CATEGORY,
            description="Loads a ControlNeXt condition encoder (the 'controlnet' file of a release). Its model "
                        "family is decided by the model you apply it to.",
            inputs=[
                io.Combo.Input("controlnext_name", options=files_holding(ENCODER),
                               tooltip="The encoder file, from models/controlnext or models/controlnet "
                                       "(e.g. controlnet.safetensors of a ControlNeXt release)."),
            ],
            outputs=[
                ControlNeXtType.Output(display_name="CONTROLNEXT",
                                       tooltip="For Apply ControlNeXt (patches the MODEL)."),
                io.ControlNet.Output(display_name="CONTROL_NET",
                                     tooltip="The same encoder for ComfyUI's Apply ControlNet nodes: stacks with "
                                             "other ControlNets and per-conditioning control. Also for "
                                             "Advanced-ControlNet's Apply Advanced ControlNet (its keyframes and "
                                             "masks) where that pack is installed."),
            ],
        )

    @classmethod
    def execute(cls, controlnext_name: str) -> io.NodeOutput:
        path = resolve(controlnext_name)
        encoder, metadata = load_encoder_file(path)
        file = ControlNeXtFile(controlnext_name, encoder, metadata)
        params = sum(p.numel() for p in encoder.parameters())
        family = trained_family(file.layout, metadata)
        served = (f"{FAMILY_NAMES[family]} models (trained for them, its metadata says)" if family else
                  f"{FAMILY_NAMES[DEFAULT_FAMILY[file.layout]]} models (the published releases of its kind)")
        summary = f"Encoder for {served}, {params / 1e6:.2f} M parameters"
        return io.NodeOutput(file, control_net_for(file),
                             ui={"controlnext_info": [summary], "controlnext_detail": [LAYOUT_DESCRIPTIONS[file.layout]]})


def patch_unet_weights(model, unet_name: str, strength: float, mode: str):
    """A clone of ``model`` with a release's UNet file as patches; the input is untouched."""
    if model_family(model.model) is None:
        raise ControlNeXtError(
            f"'{unet_name}': ControlNeXt UNet weights apply to SD1.5, SDXL and SVD models; this is a "
            f"{model_type_name(model.model)} model.")
    path = resolve(unet_name)
    if strength == 0:
        return model.clone()
    return patch_unet_weights_from(model, load_state_dict_file(path), unet_name, strength, mode)


def patch_unet_weights_from(model, file_weights: dict, label: str, strength: float, mode: str):
    """``patch_unet_weights`` for weights in memory (a file's, or Train ControlNeXt's in the same names)."""
    family = model_family(model.model)
    if mode == "auto":
        mode = OFFICIAL_MODE[family]
    originals = {key: entries[0][0] for key, entries in model.get_key_patches("diffusion_model.").items()}
    try:
        patches = unet_weight_patches(file_weights, unet_key_map(model), originals, mode, strength)
    except ControlNeXtError as error:
        raise ControlNeXtError(f"'{label}' on this {FAMILY_NAMES[family]} model: {error}") from None
    patched = model.clone()
    comfy_patches = {key: (value,) if kind == "add" else ("set", (value,)) for key, (kind, value) in patches.items()}
    matched = patched.add_patches(comfy_patches, strength)
    missed = sorted(set(comfy_patches) - set(matched))
    if missed:
        raise ControlNeXtError(f"ComfyUI did not accept {len(missed)} UNet weights ({', '.join(missed[:3])}).")
    return patched


class LoadControlNeXtUNetWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtUNetWeights",
            display_name="Load ControlNeXt UNet Weights",
            category=CATEGORY,
            description="Applies the UNet weights of a ControlNeXt release (SDXL "
                        "unet.safetensors deltas, SD1.5 unet.safetensors, SVD-v2 unet.bin) as reversible "
                        "patches on a copy of the model.",
            inputs=[
                io.Model.Input("model", tooltip="The model the release was trained on (SD1.5, SDXL or a fine-tune, SVD-XT 1.1)."),
                io.Combo.Input("unet_name", options=files_holding(UNET),
                               tooltip="The release's UNet file, from models/controlnext or models/controlnet."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="1.0 applies the file as released; 0 leaves the model unchanged."),
                io.Combo.Input("mode", options=list(MODES), default="auto",
                               tooltip="auto: SDXL files are deltas added to the weights, SD1.5 and SVD files "
                                       "replace them (the official releases). add / replace force one meaning."),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, unet_name: str, strength: float, mode: str) -> io.NodeOutput:
        return io.NodeOutput(patch_unet_weights(model, unet_name, strength, mode))
