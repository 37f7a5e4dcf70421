"""Loading dvlab-research/ControlNeXt's training scripts for the opt-in agreement checks
(tests/test_official_training_parity.py, tests/test_official_svd_training_parity.py)."""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types

OFFICIAL_PATH = os.path.expanduser(os.environ.get("CONTROLNEXT_OFFICIAL_PATH", "~/ControlNeXt-official"))
# What the scripts import only for their data loaders: an empty module where it is not installed.
DATA_ONLY_MODULES = ("torchvision", "torchvision.transforms", "decord")


def missing_reference(diffusers_version: str, modules: tuple[str, ...], scripts: list[str]) -> str | None:
    """What this environment lacks to run official scripts (paths under the checkout), or None."""
    try:
        found = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        found = None
    if found != diffusers_version:
        return f"diffusers {diffusers_version} (found {found or 'none'})"
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        return ", ".join(missing)
    if not all(os.path.isfile(os.path.join(OFFICIAL_PATH, script)) for script in scripts):
        return f"official checkout at {OFFICIAL_PATH} (set CONTROLNEXT_OFFICIAL_PATH)"
    return None


def _unavailable(module: str):
    """A stub module's attributes (``from decord import VideoReader``): fail only when used."""
    def attribute(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{module}.{name} is not installed here: only the official data loaders use it")
        return unavailable
    return attribute


@contextlib.contextmanager
def official_import_scope(folder: str):
    """The scripts import ``models``/``pipeline``/``utils`` from their folder (the same package names
    in every folder) and DATA_ONLY_MODULES: give them their folder, and empty modules for those not
    installed, then put everything back."""
    shared_names = ("models", "pipeline", "utils", *{name.split(".")[0] for name in DATA_ONLY_MODULES})
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] in shared_names}
    for name in saved:
        del sys.modules[name]
    for name in [name for name in DATA_ONLY_MODULES if importlib.util.find_spec(name.split(".")[0]) is None]:
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        stub.__getattr__ = _unavailable(name)
        sys.modules[name] = stub
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, stub)
    sys.path.insert(0, os.path.join(OFFICIAL_PATH, folder))
    try:
        yield
    finally:
        sys.path.remove(os.path.join(OFFICIAL_PATH, folder))
        for name in [name for name in sys.modules if name.split(".")[0] in shared_names]:
            del sys.modules[name]
        sys.modules.update(saved)


def load_script(folder: str, filename: str, module_name: str) -> types.ModuleType:
    """An official training script as a module (its ``main()`` not run)."""
    with official_import_scope(folder):
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(OFFICIAL_PATH, folder, filename))
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    return script
