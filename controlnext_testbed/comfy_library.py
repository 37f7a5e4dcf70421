"""ComfyUI used as a library: a checkout put on sys.path, and this pack imported from it as ComfyUI
imports a custom node folder (a package from its __init__.py). Plain Python until ``use_comfyui``."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui_controlnext"  # the package name the commands (benchmarks, demo) import the pack under


def find_comfyui(path: str | None) -> str:
    """``path``, else COMFYUI_PATH, else the ComfyUI whose custom_nodes folder holds this pack; a
    message saying what to set when none is a ComfyUI checkout."""
    parent = os.path.dirname(PACK_ROOT)
    if not path:
        path = os.environ.get("COMFYUI_PATH") or (
            os.path.dirname(parent) if os.path.basename(parent) == "custom_nodes" else None)
    if not path:
        raise SystemExit("No ComfyUI found: give its folder (--comfyui PATH or COMFYUI_PATH=PATH), or run this from "
                         "the pack's folder inside ComfyUI/custom_nodes. Run it with that ComfyUI's python.")
    if not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
        raise SystemExit(f"{path} is not a ComfyUI checkout (it has no comfy/model_management.py): give the folder "
                         f"of ComfyUI's main.py.")
    return os.path.abspath(path)


def use_comfyui(path: str | None, cpu: bool = True) -> str:
    """Puts the ComfyUI checkout first on sys.path and imports its ``nodes`` (before anything can
    shadow it: this pack has a ``nodes`` package too); ``cpu`` sets ComfyUI's ``--cpu``, otherwise
    ComfyUI picks its device. Returns the checkout's folder."""
    path = find_comfyui(path)
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import nodes  # noqa: F401  ComfyUI's nodes.py

    return path


def import_pack(name: str = PACK_NAME, root: str = PACK_ROOT) -> ModuleType:
    """The checkout at ``root`` as the package ``name`` (imported once per process)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def pack(module: str) -> ModuleType:
    """A module of this pack (``controlnext_core.train``, ``nodes.apply``...) as ComfyUI imports it."""
    import_pack()
    return importlib.import_module(f"{PACK_NAME}.{module}")
