"""What a user's ComfyUI, the Comfy Registry and CI get from the repository: requirements that leave
a ComfyUI venv's torch and OpenCV alone, CI scripts that pin each host's torch and build the
supported hosts once, the registry and test workflows, and a README that names the same versions."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import tarfile

import pytest
import yaml

from conftest import PACK_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

FREEZE = """numpy==2.1.3
torch==2.14.1+cu130
torchaudio==2.11.0
torchsde==0.2.6
torchvision==0.29.1
torch-geometric==2.6.1
"""


def read(path: str) -> str:
    with open(os.path.join(PACK_ROOT, path), encoding="utf-8") as file:
        return file.read()


def requirements(path: str) -> dict[str, str]:
    """name -> version specifier of each requirement line (``-r`` includes left out)."""
    listed = {}
    for line in read(path).splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, specifier = re.match(r"([A-Za-z0-9_.\-]+)(.*)", line).groups()
            listed[name.lower()] = specifier.strip()
    return listed


def ci_bash(script: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    """``script`` run with .ci/run's functions defined (sourced, it runs nothing itself)."""
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source .ci/run; {script}'], cwd=PACK_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CONTROLNEXT_HOSTS": str(tmp_path / "hosts"), **env})


def executable(path, text: str) -> str:
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(0o755)
    return str(path)


def fake_host_python(tmp_path) -> str:
    """A host python whose pip lists FREEZE and records each install's arguments and constraints."""
    (tmp_path / "freeze.txt").write_text(FREEZE)
    return executable(tmp_path / "python", f"""
if [ "$*" = "-m pip list --format=freeze" ]; then cat {tmp_path}/freeze.txt; exit 0; fi
echo "$*" >> {tmp_path}/pip-calls
while [ $# -gt 0 ]; do [ "$1" = -c ] && cp "$2" {tmp_path}/constraints-seen; shift; done
""")


def test_runtime_requirements_never_bring_torch_or_a_second_opencv():
    """ComfyUI venvs hold opencv-python-headless (the GUI opencv-python beside it means two packages
    own cv2); torch is the host's."""
    with open(os.path.join(PACK_ROOT, "pyproject.toml"), "rb") as file:
        declared = [re.split(r"[<>=!~\[; ]", d)[0].lower() for d in tomllib.load(file)["project"]["dependencies"]]
    listed = requirements("requirements.txt")
    assert sorted(declared) == sorted(listed)  # pyproject says what requirements.txt installs
    assert "opencv-python-headless" in listed and "opencv-python" not in listed
    assert not {"torch", "torchvision", "torchaudio"} & set(listed)


def test_test_requirements_install_into_a_comfyui_venv_without_touching_torch():
    test_requirements = requirements("requirements-test.txt")
    assert not {"torch", "torchvision", "torchaudio"} & set(test_requirements)
    assert {"pytest", "hypothesis", "pyyaml"} <= set(test_requirements)
    assert "-r benchmarks/requirements.txt" in read("requirements-test.txt").splitlines()  # the charts' matplotlib


@pytest.mark.parametrize("script", [".ci/run", ".ci/make-host"])
def test_ci_scripts_parse_and_are_executable(script):
    result = subprocess.run(["bash", "-n", script], cwd=PACK_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.stat(os.path.join(PACK_ROOT, script)).st_mode & stat.S_IXUSR


def test_ci_pins_the_hosts_own_torch_when_it_installs_the_test_requirements(tmp_path):
    python = fake_host_python(tmp_path)
    pins = ci_bash(f"host_torch_pins {python}", tmp_path)
    assert pins.stdout.splitlines() == ["torch==2.14.1+cu130", "torchaudio==2.11.0", "torchvision==0.29.1"]

    result = ci_bash(f"install_test_requirements {python}", tmp_path)
    assert result.returncode == 0, result.stderr
    (call,) = (tmp_path / "pip-calls").read_text().splitlines()
    assert call.endswith(f"-r {PACK_ROOT}/requirements.txt -r {PACK_ROOT}/requirements-test.txt")
    assert (tmp_path / "constraints-seen").read_text().splitlines() == pins.stdout.splitlines()


def test_ci_takes_the_archives_from_the_named_folder_first(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    (archives / "ComfyUI-v9.9.9.tar.gz").write_bytes(b"")
    found = ci_bash("host_archive 9.9.9", tmp_path, CONTROLNEXT_HOST_ARCHIVES=str(archives))
    assert found.stdout.strip() == str(archives / "ComfyUI-v9.9.9.tar.gz")
    assert ci_bash("host_archive 9.9.8", tmp_path, CONTROLNEXT_HOST_ARCHIVES=str(archives)).returncode == 1


def fake_pack_and_archive(tmp_path) -> str:
    """A pack whose make-host records its arguments, and a ComfyUI archive as GitHub's tags give them."""
    (tmp_path / "pack" / ".ci").mkdir(parents=True)
    executable(tmp_path / "pack" / ".ci" / "make-host", f'echo "$@" >> {tmp_path}/make-host-calls\n')
    source = tmp_path / "ComfyUI-9.9.9"
    source.mkdir()
    (source / "main.py").write_text("")
    (source / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')
    archive = tmp_path / "ComfyUI-v9.9.9.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    return str(archive)


def test_ci_unpacks_a_missing_or_half_built_host_and_keeps_a_finished_one(tmp_path):
    archive = fake_pack_and_archive(tmp_path)
    checkout, venv = tmp_path / "hosts" / "ComfyUI-v9.9.9", tmp_path / "hosts" / "venv-9.9.9"
    build = f"pack={tmp_path}/pack; build_host 9.9.9 {archive}; comfyui_version {checkout}"

    result = ci_bash(build, tmp_path)  # nothing there yet
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "9.9.9"  # unpacked under the versioned name
    venv.mkdir()
    (venv / "half-installed").write_text("")  # make-host stopped before its stamp
    (checkout / "local-change").write_text("")
    assert ci_bash(build, tmp_path).returncode == 0
    assert not (venv / "half-installed").exists() and not (checkout / "local-change").exists()

    venv.mkdir()
    (venv / ".controlnext-host").write_text("ComfyUI 9.9.9; ...\n")  # make-host finished
    (checkout / "local-change").write_text("")
    assert ci_bash(build, tmp_path).returncode == 0
    assert (checkout / "local-change").exists()  # kept, only make-host's quick pass ran
    assert (tmp_path / "make-host-calls").read_text().splitlines() == [f"{checkout} {venv}"] * 3


def fake_host_venv(tmp_path, pip_fails: bool = False):
    """A ComfyUI checkout and a venv whose pip records its calls (and fails when asked)."""
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "requirements.txt").write_text("torch\ntorchsde\ntorchvision\nnumpy>=1.25.0\n")
    (comfy / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    executable(tmp_path / "venv" / "bin" / "pip", f'echo "$*" >> {tmp_path}/pip-calls\nexit {int(pip_fails)}\n')
    executable(tmp_path / "venv" / "bin" / "python", 'echo "host ready"\n')
    return comfy, tmp_path / "venv"


def pip_calls(tmp_path) -> list[str]:
    """The fake pip's calls, each run's temporary folder (make-host's mktemp -d) named alike."""
    return [re.sub(r"\S*/tmp\.\w+/", "TMP/", call) for call in (tmp_path / "pip-calls").read_text().splitlines()]


def make_host(comfy, venv) -> subprocess.CompletedProcess:
    return subprocess.run([".ci/make-host", str(comfy), str(venv)], cwd=PACK_ROOT, capture_output=True, text=True,
                          timeout=60)


def test_make_host_stamps_a_finished_host_and_then_only_installs_the_packs_requirements(tmp_path):
    comfy, venv = fake_host_venv(tmp_path)
    assert make_host(comfy, venv).returncode == 0
    stamp = (venv / ".controlnext-host").read_text()
    assert stamp.startswith("ComfyUI 9.9.9; torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0; requirements ")
    first = pip_calls(tmp_path)
    assert len(first) == 2 and first[0].endswith("torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0")

    assert make_host(comfy, venv).returncode == 0
    second = pip_calls(tmp_path)[2:]
    assert second == first[1:]  # the requirements again (the pack's may have changed), not torch
    assert f"-r {PACK_ROOT}/requirements.txt -r {PACK_ROOT}/requirements-test.txt" in second[0]

    (comfy / "requirements.txt").write_text("torch\ntorchsde\nnumpy>=2\n")  # another ComfyUI in that checkout
    assert make_host(comfy, venv).returncode == 0
    assert len(pip_calls(tmp_path)) == 5  # built again from torch on


def test_make_host_leaves_no_stamp_when_an_install_fails(tmp_path):
    comfy, venv = fake_host_venv(tmp_path, pip_fails=True)
    (venv / ".controlnext-host").write_text("ComfyUI 9.9.8; from an earlier checkout\n")
    assert make_host(comfy, venv).returncode != 0
    assert not (venv / ".controlnext-host").exists()


def workflow(name: str) -> dict:
    loaded = yaml.safe_load(read(f".github/workflows/{name}"))
    loaded["on"] = loaded.pop(True, loaded.get("on"))  # YAML 1.1 reads the key `on` as true
    return loaded


def test_registry_workflow_publishes_when_the_version_file_changes_on_main():
    publish = workflow("publish.yml")
    assert publish["on"]["push"] == {"branches": ["main"], "paths": ["pyproject.toml"]}
    (step,) = [step for step in publish["jobs"]["publish-node"]["steps"] if "Comfy-Org/publish-node-action" in
               step.get("uses", "")]
    assert step["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"


def test_test_workflow_runs_ci_on_every_push_with_the_archives_of_every_supported_version(tmp_path):
    tests = workflow("tests.yml")
    assert set(tests["on"]) == {"push", "pull_request"}
    (job,) = tests["jobs"].values()
    runs = [step.get("run", "") for step in job["steps"]]
    assert runs[-1] == "bash .ci/run"
    (download,) = [run for run in runs if "curl" in run]
    script = download.replace("$CONTROLNEXT_HOST_ARCHIVES", str(tmp_path)).replace("curl ", "echo ")
    printed = subprocess.run(["bash", "-c", script], cwd=PACK_ROOT, capture_output=True, text=True, check=True).stdout
    versions = ci_bash('echo "${SUPPORTED_COMFYUI_VERSIONS[@]}"', tmp_path).stdout.split()
    assert re.findall(r"ComfyUI-v(\S+)\.tar\.gz", printed) == versions
    assert "CONTROLNEXT_HOST_ARCHIVES" in job["env"]


def test_readme_names_the_torch_and_comfyui_versions_the_scripts_install(tmp_path):
    readme = " ".join(read("README.md").split())
    core_torch = requirements("requirements-dev.txt")["torch"].lstrip("=")
    host_torch = re.search(r'TORCH_VERSION:-([\d.]+)', read(".ci/make-host")).group(1)
    assert f"torch {core_torch}" in readme and f"torch {host_torch}" in readme
    versions = ci_bash('echo "${SUPPORTED_COMFYUI_VERSIONS[@]}"', tmp_path).stdout.split()
    assert f"Tested on ComfyUI v{versions[0]} and v{versions[1]}" in readme
