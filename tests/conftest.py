"""Finds a ComfyUI host for the host tests; without one they skip and the core tests still run. Checks
that every module starting ComfyUI servers carries the markers that a quick run leaves out.

The host is ``COMFYUI_PATH`` (a ComfyUI checkout), or the ComfyUI whose ``custom_nodes/``
holds this pack. Run the suite with that ComfyUI's Python (its venv has torch and its deps).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

# the tiny test models run fastest on one thread (3 s -> 0.1 s for a small sampler call on the
# 2-core CI box); tests that measure threading set their own
torch.set_num_threads(1)

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _find_host() -> tuple[str | None, str]:
    path = os.environ.get("COMFYUI_PATH")
    if path:
        if not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
            raise pytest.UsageError(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/model_management.py)")
        return os.path.abspath(path), ""
    parent = os.path.dirname(PACK_ROOT)
    if os.path.basename(parent) == "custom_nodes" and os.path.isfile(os.path.join(os.path.dirname(parent), "main.py")):
        return os.path.dirname(parent), ""
    return None, "no ComfyUI host: set COMFYUI_PATH to a ComfyUI checkout to run the host tests"


COMFYUI_PATH, HOST_SKIP_REASON = _find_host()

if COMFYUI_PATH:
    sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import nodes  # noqa: F401  binds ComfyUI's nodes.py before our own nodes/ package can shadow it


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A module that starts ComfyUI servers is marked ``server`` and ``slow``, so that the quick run
    (``-m "not slow"``) leaves it out; one that is not fails the collection."""
    unmarked = sorted({item.path.name for item in items if hasattr(getattr(item, "module", None), "ComfyServer")
                       and not (item.get_closest_marker("server") and item.get_closest_marker("slow"))})
    if unmarked:
        raise pytest.UsageError(f"{', '.join(unmarked)}: starts ComfyUI servers (ComfyServer) without the server and "
                                "slow markers; add `pytestmark = [pytest.mark.server, pytest.mark.slow]`")
