"""Apply ControlNeXt to a MODEL (the direct route; the CONTROL_NET route is in loaders/patch)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..controlnext_core import ControlNeXtError
from ..controlnext_core.families import FAMILY_NAMES, LAYOUT_DESCRIPTIONS, POINT_WORDS
from .loaders import CATEGORY, ControlNeXtType
from .patch import ControlOptions, attach, check_percent_range, control_image_from_comfy, make_patch, model_family
from .schedule import latent_strengths_input, schedule_input, uncond_multiplier_input


class ApplyControlNeXt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtApply",
            display_name="Apply ControlNeXt",
            category=CATEGORY,
            description="Adds ControlNeXt control to a copy of the model: the control image is encoded once per "
                        "step, cross-normalised and added at the one UNet block the release was trained for.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 or SDXL model (SVD: use the video nodes)."),
                ControlNeXtType.Input("controlnext", tooltip="From Load ControlNeXt."),
                io.Image.Input("image", tooltip="The control image (canny, depth, pose, mask...). One image serves "
                                                "the whole batch; or one per latent in the batch. Another shape "
                                                "than the picture's is fitted as ComfyUI's ControlNets fit theirs: "
                                                "the centre cut to the picture's aspect ratio, then scaled."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Multiplies the file's own scale. 0 leaves the model unchanged."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which control starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which control stops (1 = last step)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: control acts only where the mask is white (resized to the "
                                      "injection block). One mask, or one per latent."),
                io.Int.Input("refresh_every", default=1, min=1, max=100, optional=True,
                             tooltip="1 (default) is exact: the control is encoded at every step. k > 1 encodes it "
                                     "every k steps and reuses it in between: faster (the encoder costs about "
                                     "1/k), an approximation of the exact result."),
                schedule_input(),
                latent_strengths_input("latent_strengths", "latent of the batch"),
                uncond_multiplier_input(),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, controlnext, image, strength: float, start_percent: float, end_percent: float,
                mask=None, refresh_every: int = 1, schedule=None, latent_strengths=None,
                uncond_multiplier: float = 1.0) -> io.NodeOutput:
        check_percent_range(start_percent, end_percent)
        if model_family(model.model) == "svd":
            raise ControlNeXtError(f"This is a Stable Video Diffusion model: use Load ControlNeXt SVD and Apply "
                                   f"ControlNeXt SVD, which take one pose image per video frame ('{controlnext.name}' "
                                   f"has the {LAYOUT_DESCRIPTIONS[controlnext.layout]}).")
        if strength == 0:
            return io.NodeOutput(model.clone())
        options = ControlOptions(schedule, latent_strengths, mask, uncond_multiplier)
        patch = make_patch(controlnext, model.model, model.get_model_object("model_sampling"),
                           control_image_from_comfy(image), strength, (start_percent, end_percent), options,
                           refresh_every=refresh_every)
        warning = controlnext.pairing_warning(patch.controlnext.family)
        return io.NodeOutput(attach(model, patch), ui=applied_ui(cls, patch, image, strength, warning))


def applied_ui(cls, patch, image, strength: float, warning: str | None) -> dict:
    """What the editor shows on the node after a run: where the control acted, in words (the exact
    injection point and block, and how the control image is fitted to the picture, as the text's
    tooltip), a warning when the file is probably not made for this model, and a preview of the
    control image it received."""
    controlnext = patch.controlnext
    summary = (f"{FAMILY_NAMES[controlnext.family]} model, strength {strength:g}: acts where the release was "
               f"trained to, {POINT_WORDS[controlnext.rule.point]}")
    detail = (f"{controlnext.rule.point} = ComfyUI {patch.block[0]} block {patch.block[1]}; "
              f"{LAYOUT_DESCRIPTIONS[controlnext.layout]}")
    fitting = (f"control image {image.shape[2]}x{image.shape[1]}: fitted to the generated size as ComfyUI's "
               f"ControlNets fit theirs (the centre cut to its aspect ratio, then scaled)")
    lines = [summary] + ([f"Warning: {warning}"] if warning else [])
    return {"controlnext_info": lines, "controlnext_detail": [detail, fitting],
            **ui.PreviewImage(image, cls=cls).as_dict()}
