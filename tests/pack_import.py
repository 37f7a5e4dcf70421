"""The pack imported as ComfyUI imports a custom node folder (a package from its __init__.py),
for the host tests and the benchmarks. Plain Python: no pytest, no ComfyUI import of its own."""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


def import_pack(name: str, root: str) -> ModuleType:
    """The checkout at ``root`` as the package ``name`` (imported once per process)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
