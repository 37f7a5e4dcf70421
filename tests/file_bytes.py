"""Bytes of files for the tests that feed the loaders what users put in their folders."""
from __future__ import annotations

import io
import os

import torch


def write(folder, name: str, data: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as file:
        file.write(data)
    return path


def torch_bytes(obj, legacy: bool = False) -> bytes:
    """What torch.save writes (the zip format, or the legacy one older releases have)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()
