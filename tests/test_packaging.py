"""What a user's ComfyUI and the Comfy Registry get from the repository: requirements that leave a
ComfyUI venv's torch and OpenCV alone, the registry workflows, and test requirements without torch."""
from __future__ import annotations

import os
import re

import pytest

from conftest import PACK_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def requirement_names(path: str) -> list[str]:
    names = []
    with open(os.path.join(PACK_ROOT, path), encoding="utf-8") as file:
        for line in file:
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.append(re.split(r"[<>=!~\[; ]", line)[0].lower())
    return names


def test_runtime_requirements_never_bring_torch_or_a_second_opencv():
    """ComfyUI venvs hold opencv-python-headless (the GUI opencv-python beside it means two packages
    own cv2); torch is the host's."""
    with open(os.path.join(PACK_ROOT, "pyproject.toml"), "rb") as file:
        declared = [re.split(r"[<>=!~\[; ]", d)[0].lower() for d in tomllib.load(file)["project"]["dependencies"]]
    listed = requirement_names("requirements.txt")
    assert sorted(declared) == sorted(listed)  # pyproject says what requirements.txt installs
    assert "opencv-python-headless" in listed and "opencv-python" not in listed
    assert not {"torch", "torchvision", "torchaudio"} & set(listed)


def test_test_requirements_install_into_a_comfyui_venv_without_touching_torch():
    assert not {"torch", "torchvision", "torchaudio"} & set(requirement_names("requirements-test.txt"))
    assert {"pytest", "hypothesis"} <= set(requirement_names("requirements-test.txt"))
    with open(os.path.join(PACK_ROOT, "requirements-test.txt"), encoding="utf-8") as file:
        assert "-r benchmarks/requirements.txt" in file.read()  # matplotlib for the benchmark chart
    with open(os.path.join(PACK_ROOT, ".ci", "run"), encoding="utf-8") as file:
        ci = file.read()
    assert "requirements-test.txt" in ci and "-c" in ci  # each host gets them, its torch pinned


def test_registry_workflows_publish_on_a_version_change_and_test_every_push():
    with open(os.path.join(PACK_ROOT, ".github", "workflows", "publish.yml"), encoding="utf-8") as file:
        publish = file.read()
    assert "Comfy-Org/publish-node-action" in publish and "pyproject.toml" in publish
    assert "secrets.REGISTRY_ACCESS_TOKEN" in publish
    with open(os.path.join(PACK_ROOT, ".github", "workflows", "tests.yml"), encoding="utf-8") as file:
        tests = file.read()
    assert "push" in tests and ".ci/run" in tests
