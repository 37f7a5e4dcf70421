"""Schedule nodes: strength over sampling steps and per latent / frame (controlnext_core/schedule.py),
for Apply ControlNeXt, Apply ControlNeXt SVD and, through ControlNeXt ControlNet Options, the
CONTROL_NET route."""
from __future__ import annotations

from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError
from ..controlnext_core.schedule import (INTERPOLATIONS, Keyframe, StrengthSchedule, parse_latent_strengths,
                                         parse_strengths)
from .loaders import CATEGORY
from .patch import ControlNeXtControlNet, ControlOptions

SCHEDULE_CATEGORY = f"{CATEGORY}/schedule"
ScheduleType = io.Custom("CONTROLNEXT_SCHEDULE")
LatentStrengthsType = io.Custom("CONTROLNEXT_LATENT_STRENGTHS")


def schedule_input(name: str = "schedule"):
    return ScheduleType.Input(name, optional=True,
                              tooltip="Optional: strength over the sampling steps (ControlNeXt Strength Keyframe / "
                                      "Strength per Step); it multiplies strength.")


def latent_strengths_input(name: str, unit: str):
    return LatentStrengthsType.Input(name, optional=True,
                                     tooltip=f"Optional: a strength for each {unit} (ControlNeXt Latent Strengths); "
                                             f"it multiplies strength. A {unit} at 0 is not encoded.")


class StrengthKeyframeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtStrengthKeyframe",
            display_name="ControlNeXt Strength Keyframe",
            category=SCHEDULE_CATEGORY,
            description="Adds a keyframe to a strength schedule: from this point of sampling on, control has this "
                        "strength (times the Apply node's). Chain several; before the first one the strength is 1.",
            inputs=[
                io.Float.Input("percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress where the keyframe starts (0 = first step, 1 = the end), "
                                       "as start_percent counts it."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="The multiplier from here on. 0: control off and the encoder not run."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="hold",
                               tooltip="How the strength goes from this keyframe to the next: hold it, or move "
                                       "to the next keyframe's strength (linear or eased) by sampling progress."),
                ScheduleType.Input("previous", optional=True,
                                   tooltip="Optional: the schedule to add this keyframe to (left unchanged). A "
                                           "keyframe at the same percent is replaced."),
            ],
            outputs=[ScheduleType.Output(display_name="SCHEDULE",
                                         tooltip="For Apply ControlNeXt, Apply ControlNeXt SVD or ControlNeXt "
                                                 "ControlNet Options.")],
        )

    @classmethod
    def execute(cls, percent: float, strength: float, interpolation: str, previous=None) -> io.NodeOutput:
        return io.NodeOutput((previous or StrengthSchedule()).with_keyframe(Keyframe(percent, strength, interpolation)))


class StrengthPerStepNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtStrengthPerStep",
            display_name="ControlNeXt Strength per Step",
            category=SCHEDULE_CATEGORY,
            description="A strength for each sampling step, as a list: '1, 1, 0.5, 0' gives steps 0 and 1 full "
                        "control, step 2 half, and none from step 3 on (the last value holds).",
            inputs=[
                io.String.Input("strengths", default="1, 1, 0.5, 0",
                                tooltip="One number per sampling step, separated by commas. A shorter list than "
                                        "the steps: its last value holds; a longer one is an error."),
                ScheduleType.Input("previous", optional=True,
                                   tooltip="Optional: keyframes to combine with (they multiply)."),
            ],
            outputs=[ScheduleType.Output(display_name="SCHEDULE",
                                         tooltip="For Apply ControlNeXt, Apply ControlNeXt SVD or ControlNeXt "
                                                 "ControlNet Options (or a keyframe's previous input).")],
        )

    @classmethod
    def execute(cls, strengths: str, previous=None) -> io.NodeOutput:
        values = parse_strengths(strengths, "per-step strength")
        return io.NodeOutput((previous or StrengthSchedule()).with_step_strengths(values))


class LatentStrengthsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtLatentStrengths",
            display_name="ControlNeXt Latent Strengths",
            category=SCHEDULE_CATEGORY,
            description="A strength for each latent of a batch, or each frame of a video: a list ('1, 0.5') or "
                        "index=strength keyframes ('0=1, -8=1, -1=0' fades out over the last 8 frames).",
            inputs=[
                io.String.Input("strengths", default="0=1, -1=1", multiline=True,
                                tooltip="A list (one value for all, or exactly one per latent / frame), or "
                                        "index=strength pairs; negative indices count from the end."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="linear",
                               tooltip="Between the indices given as index=strength; before the first and after "
                                       "the last their strengths hold."),
            ],
            outputs=[LatentStrengthsType.Output(display_name="LATENT_STRENGTHS",
                                                tooltip="For Apply ControlNeXt (latent_strengths), Apply ControlNeXt "
                                                        "SVD (frame_strengths) or ControlNeXt ControlNet Options.")],
        )

    @classmethod
    def execute(cls, strengths: str, interpolation: str) -> io.NodeOutput:
        return io.NodeOutput(parse_latent_strengths(strengths, interpolation))


def uncond_multiplier_input():
    return io.Float.Input("uncond_multiplier", default=1.0, min=0.0, max=10.0, step=0.01, optional=True,
                          tooltip="What the negative (uncond) half of CFG gets, times the positive half's control: "
                                  "1 (default) as the releases were trained, 0 controls the positive half only.")


class ControlNetOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtControlNetOptions",
            display_name="ControlNeXt ControlNet Options",
            category=SCHEDULE_CATEGORY,
            description="A copy of Load ControlNeXt's CONTROL_NET with a schedule, per-latent strengths, a mask and "
                        "an uncond multiplier, for ComfyUI's Apply ControlNet nodes.",
            inputs=[
                io.ControlNet.Input("control_net", tooltip="The CONTROL_NET output of Load ControlNeXt."),
                schedule_input(),
                latent_strengths_input("latent_strengths", "latent (video: frame)"),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: control acts only where the mask is white. One mask, or one per "
                                      "latent / video frame."),
                uncond_multiplier_input(),
            ],
            outputs=[io.ControlNet.Output(tooltip="For Apply ControlNet; the input CONTROL_NET is unchanged.")],
        )

    @classmethod
    def execute(cls, control_net, schedule=None, latent_strengths=None, mask=None,
                uncond_multiplier: float = 1.0) -> io.NodeOutput:
        if not isinstance(control_net, ControlNeXtControlNet):
            raise ControlNeXtError(f"ControlNeXt ControlNet Options takes the CONTROL_NET output of Load ControlNeXt; "
                                   f"got a {type(control_net).__name__}.")
        options = ControlOptions(schedule, latent_strengths, mask, uncond_multiplier)
        return io.NodeOutput(control_net.with_options(options))


SCHEDULE_NODES = [StrengthKeyframeNode, StrengthPerStepNode, LatentStrengthsNode, ControlNetOptionsNode]
