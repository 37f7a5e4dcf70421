"""Test nodes for the trained toy world of the convergence study (tests/toy_shapes.py): load its
base (UNet and autoencoder, one file in models/checkpoints) and decode its latents. ComfyUI's
own checkpoint loader only recognises full-size checkpoints."""
from __future__ import annotations

import functools
import os

import folder_paths

import toy_shapes


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float):
    return toy_shapes.load_checkpoint(path)


class ToyShapesCheckpoint:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "TOY_AUTOENCODER")
    RETURN_NAMES = ("model", "conditioning", "autoencoder")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name):
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model, autoencoder = _load(path, os.path.getmtime(path))
        return model, toy_shapes.conditioning(), autoencoder


class ToyShapesDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "autoencoder": ("TOY_AUTOENCODER",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "testing"

    def decode(self, samples, autoencoder):
        return (autoencoder.decode(samples["samples"].float()),)
