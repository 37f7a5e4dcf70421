"""The ComfyUI layer: node classes over controlnext_core, and the pack's extension object."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import ApplyControlNeXt
from .demo import DEMO_NODES
from .loaders import LoadControlNeXt, LoadControlNeXtUNetWeights
from .preprocessors import PREPROCESSOR_NODES
from .schedule import SCHEDULE_NODES
from .train import TRAIN_NODES
from .train_launch import TRAIN_LAUNCH_NODES
from .video import AlignPoses, ApplyControlNeXtSVD, ControlNeXtSVDWindowGuider, LoadControlNeXtSVD
from .video_train import VIDEO_TRAIN_NODES


class ControlNeXtExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadControlNeXt, ApplyControlNeXt, LoadControlNeXtUNetWeights,
                LoadControlNeXtSVD, ApplyControlNeXtSVD, ControlNeXtSVDWindowGuider, AlignPoses,
                *SCHEDULE_NODES, *PREPROCESSOR_NODES, *TRAIN_NODES, *VIDEO_TRAIN_NODES, *TRAIN_LAUNCH_NODES,
                *DEMO_NODES]


def comfy_entrypoint() -> ControlNeXtExtension:
    return ControlNeXtExtension()
