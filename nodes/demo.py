"""The demo's toy world in the editor (README, "Try it without downloading anything"): its base UNet
and autoencoder, one file that ``python -m controlnext_demo`` trains and puts into models/checkpoints.
ComfyUI's Load Checkpoint recognises only full-size checkpoints, and the toy's pictures go through
its own small autoencoder instead of a VAE."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError
from ..controlnext_testbed import toy_shapes
from .loaders import CATEGORY

DEMO_CATEGORY = f"{CATEGORY}/demo"
ToyAutoencoderType = io.Custom("TOY_SHAPES_AUTOENCODER")


class LoadToyShapesBase(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtDemoLoadToyBase",
            display_name="Load Toy Shapes Base (demo)",
            category=DEMO_CATEGORY,
            description="Loads the demo's toy base: a small SD1.5-layout UNet trained on 64x64 pictures of shapes, "
                        "and the autoencoder of its latents. python -m controlnext_demo trains it and puts it into "
                        "models/checkpoints.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="The toy base file (controlnext_demo/toy_shapes_base.safetensors)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The toy base UNet (SD1.5 layout, 64x64 pictures)."),
                io.Conditioning.Output(display_name="CONDITIONING",
                                       tooltip="The one conditioning the base was trained with (it has no text "
                                               "encoder): for both positive and negative."),
                ToyAutoencoderType.Output(display_name="AUTOENCODER",
                                          tooltip="Decodes the toy's latents (Decode Toy Shapes)."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        if not toy_shapes.is_checkpoint(path):
            raise ControlNeXtError(f"'{ckpt_name}' is not the demo's toy base; load real checkpoints with Load "
                                   f"Checkpoint. python -m controlnext_demo writes the toy base as "
                                   f"controlnext_demo/toy_shapes_base.safetensors.")
        model, autoencoder = toy_shapes.load_checkpoint(path)
        return io.NodeOutput(model, toy_shapes.conditioning(), autoencoder)


class DecodeToyShapes(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtDemoDecodeToyShapes",
            display_name="Decode Toy Shapes (demo)",
            category=DEMO_CATEGORY,
            description="Turns the toy base's latents into pictures, as VAE Decode does for a real model.",
            inputs=[
                io.Latent.Input("samples", tooltip="Latents sampled with the toy base."),
                ToyAutoencoderType.Input("autoencoder", tooltip="From Load Toy Shapes Base."),
            ],
            outputs=[io.Image.Output(tooltip="The pictures (64x64 for the toy's 8x8 latents).")],
        )

    @classmethod
    def execute(cls, samples, autoencoder) -> io.NodeOutput:
        return io.NodeOutput(autoencoder.decode(samples["samples"].float().cpu()))


DEMO_NODES = [LoadToyShapesBase, DecodeToyShapes]
