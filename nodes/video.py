"""ControlNeXt-SVD: pose-driven video, sampled by ComfyUI, with the official window fusion."""
from __future__ import annotations

import torch

import comfy.conds
import comfy.samplers
from comfy_api.latest import io

from ..controlnext_core import ControlNeXtError, load_encoder_file
from ..controlnext_core.model import ENCODER, UNET
from ..controlnext_core.preprocess.align import align_poses
from ..controlnext_core.preprocess.pose import frames_from_openpose, to_openpose
from ..controlnext_core.video import control_frames, fusion_weights, linear_guidance, plan_windows
from .apply import check_percent_range
from .loaders import CATEGORY, ControlNeXtType, files_holding, patch_unet_weights, resolve
from .preprocessors import PoseKeypointType
from .patch import (FRAME_POLICIES, VIDEO_FRAMES, WINDOW_CONTROL_FRAMES, ControlNeXtFile, ControlOptions, attach,
                    control_image_from_comfy, make_patch, model_family, model_type_name)
from .schedule import latent_strengths_input, schedule_input

VIDEO_CATEGORY = f"{CATEGORY}/video"
NO_UNET = "none"


def require_svd(model) -> None:
    if model_family(model.model) != "svd":
        raise ControlNeXtError(
            f"This node needs a Stable Video Diffusion model (SVD-XT 1.1 for ControlNeXt-SVD-v2); got a "
            f"{model_type_name(model.model)} model. For images use Apply ControlNeXt.")


class LoadControlNeXtSVD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtSVDLoader",
            display_name="Load ControlNeXt SVD",
            category=VIDEO_CATEGORY,
            description="Loads a ControlNeXt-SVD release for an SVD model: the pose encoder and, optionally, its "
                        "fine-tuned UNet (applied as patches on a copy of the model).",
            inputs=[
                io.Model.Input("model", tooltip="The SVD model (SVD-XT 1.1 for ControlNeXt-SVD-v2)."),
                io.Combo.Input("controlnext_name", options=files_holding(ENCODER),
                               tooltip="The encoder: controlnet.bin of the release, or a safetensors copy."),
                io.Combo.Input("unet_name", options=[NO_UNET] + files_holding(UNET), default=NO_UNET,
                               tooltip="The release's fine-tuned unet.bin (diffusers names). 'none' when the model "
                                       "already is the fine-tuned UNet (e.g. a converted file loaded with Load "
                                       "Diffusion Model)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the release's UNet (or unchanged with 'none')."),
                     ControlNeXtType.Output(display_name="CONTROLNEXT", tooltip="For Apply ControlNeXt SVD.")],
        )

    @classmethod
    def execute(cls, model, controlnext_name: str, unet_name: str) -> io.NodeOutput:
        require_svd(model)
        file = ControlNeXtFile(controlnext_name, *load_encoder_file(resolve(controlnext_name)))
        file.bind(model.model)  # refuses an SD encoder here, before any sampling
        patched = model.clone() if unet_name == NO_UNET else patch_unet_weights(model, unet_name, 1.0, "replace")
        return io.NodeOutput(patched, file)


class ApplyControlNeXtSVD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtSVDApply",
            display_name="Apply ControlNeXt SVD",
            category=VIDEO_CATEGORY,
            description="Drives an SVD model with a pose video: one pose image per video frame, encoded per frame "
                        "and added (cond half only for SVD-v2) at the block the release was trained for.",
            inputs=[
                io.Model.Input("model", tooltip="The SVD model from Load ControlNeXt SVD."),
                ControlNeXtType.Input("controlnext", tooltip="From Load ControlNeXt SVD."),
                io.Image.Input("pose_images", tooltip="One pose image per video frame (DWPose skeletons on black)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Multiplies the official control level. 0 leaves the model unchanged."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which control starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which control stops."),
                io.Combo.Input("frame_count", options=list(FRAME_POLICIES), default="error",
                               tooltip="When the number of pose images differs from the video's frames: stop with "
                                       "an error, or resample the poses evenly to the frame count."),
                io.Boolean.Input("cond_only", default=False,
                                 tooltip="SVD v1 files: give the negative (uncond) half no control. Off matches the "
                                         "official v1 pipeline (uncond gets 0.65x); SVD-v2 always controls the "
                                         "cond half only."),
                schedule_input(),
                latent_strengths_input("frame_strengths", "video frame"),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: control acts only where the mask is white. One mask for the whole "
                                      "video, or one per video frame (windows take their frames' masks)."),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, controlnext, pose_images, strength: float, start_percent: float, end_percent: float,
                frame_count: str, cond_only: bool, schedule=None, frame_strengths=None, mask=None) -> io.NodeOutput:
        require_svd(model)
        check_percent_range(start_percent, end_percent)
        if strength == 0:
            return io.NodeOutput(model.clone())
        patch = make_patch(controlnext, model.model, model.get_model_object("model_sampling"),
                           control_image_from_comfy(pose_images), strength, (start_percent, end_percent),
                           ControlOptions(schedule, frame_strengths, mask), cond_only=cond_only,
                           frame_policy=frame_count)
        return io.NodeOutput(attach(model, patch))


def _window_conds(conds: list[dict] | None, frames: list[int], total: int) -> list[dict] | None:
    """The conditioning of one window: per-frame conds sliced, the frame count set to the window's."""
    if conds is None:
        return None
    out = []
    for cond in conds:
        model_conds = {}
        for name, value in cond["model_conds"].items():
            if name == "num_video_frames":
                value = comfy.conds.CONDConstant(len(frames))
            elif isinstance(value, comfy.conds.CONDNoiseShape) and value.cond.shape[0] == total:
                value = type(value)(value.cond[frames])
            model_conds[name] = value
        out.append({**cond, "model_conds": model_conds})
    return out


class OfficialWindowGuider(comfy.samplers.CFGGuider):
    """Samples a long video in overlapping windows and fuses them as the official pipeline does.

    Per window: frame 0's control is the video's first; CFG rises linearly across the window's
    frames; the window's result counts for its frames except a replaced first frame. Only one
    window is in the UNet at a time, so memory follows the window, not the video length.
    """

    def __init__(self, model_patcher, window: int, overlap: int, min_cfg: float, max_cfg: float):
        super().__init__(model_patcher)
        self.window, self.overlap = window, overlap
        self.min_cfg, self.max_cfg = min_cfg, max_cfg
        self.set_cfg(max_cfg)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        total = x.shape[0]
        fused = torch.zeros_like(x)
        weight_sum = torch.zeros(total, 1, 1, 1, device=x.device, dtype=x.dtype)
        for frames in plan_windows(total, self.window, self.overlap):
            index = torch.tensor(frames, device=x.device)
            transformer_options = {**model_options.get("transformer_options", {}),
                                   WINDOW_CONTROL_FRAMES: control_frames(frames), VIDEO_FRAMES: total}
            options = {**model_options, "transformer_options": transformer_options}
            conds = [_window_conds(self.conds.get("positive"), frames, total),
                     _window_conds(self.conds.get("negative"), frames, total)]
            cond, uncond = comfy.samplers.calc_cond_batch(self.inner_model, conds, x[index], timestep[index], options)
            scale = linear_guidance(len(frames), self.min_cfg, self.max_cfg).to(x).view(-1, 1, 1, 1)
            denoised = cond if uncond is None else uncond + (cond - uncond) * scale
            weights = fusion_weights(frames).to(x).view(-1, 1, 1, 1)
            fused.index_add_(0, index, denoised * weights)
            weight_sum.index_add_(0, index, weights)
        return fused / weight_sum


class ControlNeXtSVDWindowGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtSVDWindowGuider",
            display_name="ControlNeXt SVD Window Guider",
            category=VIDEO_CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced that samples videos longer than the model's window in "
                        "overlapping windows, fused as the official ControlNeXt-SVD-v2 pipeline does, with "
                        "linear CFG across each window.",
            inputs=[
                io.Model.Input("model", tooltip="The SVD model from Apply ControlNeXt SVD."),
                io.Conditioning.Input("positive", tooltip="From SVD_img2vid_Conditioning."),
                io.Conditioning.Input("negative", tooltip="From SVD_img2vid_Conditioning."),
                io.Float.Input("min_cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of each window's first frame (official: 1.0)."),
                io.Float.Input("max_cfg", default=3.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of each window's last frame (official: 3.0)."),
                io.Int.Input("window", default=24, min=2, max=128,
                             tooltip="Frames per window (official: 24). Memory follows this, not the video."),
                io.Int.Input("overlap", default=6, min=0, max=127,
                             tooltip="Frames shared by neighbouring windows (official: 6); smaller than window."),
            ],
            outputs=[io.Guider.Output(tooltip="For SamplerCustomAdvanced's guider input: it samples the whole "
                                              "video window by window.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, min_cfg: float, max_cfg: float, window: int,
                overlap: int) -> io.NodeOutput:
        require_svd(model)
        if overlap >= window:
            raise ControlNeXtError(f"overlap ({overlap}) must be smaller than window ({window}).")
        guider = OfficialWindowGuider(model, window, overlap, min_cfg, max_cfg)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)


class AlignPoses(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtAlignPoses",
            display_name="Align Poses to Reference (ControlNeXt)",
            category=VIDEO_CATEGORY,
            description="Rescales and shifts a driving pose video onto the reference image's pose, as the official "
                        "ControlNeXt-SVD-v2 preprocessing does, on the reference image's canvas. Draw the result with "
                        "Draw Pose (ControlNeXt).",
            inputs=[
                PoseKeypointType.Input("reference_pose",
                                       tooltip="Keypoints of the reference image (DWPose node, or another pack's "
                                               "POSE_KEYPOINT): its first person is the target."),
                PoseKeypointType.Input("video_poses", tooltip="Keypoints of every frame of the driving video."),
            ],
            outputs=[PoseKeypointType.Output(display_name="POSE_KEYPOINT",
                                             tooltip="The aligned keypoints, one frame per driving frame, on the "
                                                     "reference image's canvas.")],
        )

    @classmethod
    def execute(cls, reference_pose, video_poses) -> io.NodeOutput:
        reference = frames_from_openpose(reference_pose)[0]
        aligned = align_poses(reference, frames_from_openpose(video_poses))
        return io.NodeOutput([to_openpose(frame) for frame in aligned])
