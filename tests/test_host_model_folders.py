"""The pack creates the model folders it registers when ComfyUI loads it (issue 18, item 11), under
the models folder of --base-directory, and a folder it cannot create is logged, never an import
failure."""
from __future__ import annotations

import os
import subprocess

import host  # skips this module without a ComfyUI host
from conftest import COMFYUI_PATH, PACK_ROOT
from server import PACK_LINK_NAME, comfy_command, read_log

preprocessors = host.importlib.import_module(f"{host.PACK_NAME}.nodes.preprocessors")


def test_model_folders_are_made_under_the_base_directory_and_a_blocked_one_is_only_logged(tmp_path):
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(PACK_ROOT, base / "custom_nodes" / PACK_LINK_NAME)
    (base / "models").mkdir()
    (base / "models" / host.loaders.FOLDER).write_text("a file where the folder should be")
    log_path = tmp_path / "quick.log"
    with open(log_path, "w") as log:
        subprocess.run(comfy_command(str(base), "--quick-test-for-ci"), cwd=COMFYUI_PATH, stdout=log,
                       stderr=subprocess.STDOUT, timeout=300)
    log = read_log(str(log_path))
    failures = [line for line in log.splitlines() if PACK_LINK_NAME in line and ("IMPORT FAILED" in line or
                                                                                "Cannot import" in line)]
    assert f"custom_nodes/{PACK_LINK_NAME}" in log and not failures, log[-3000:]
    for name in (preprocessors.DWPOSE_FOLDER, preprocessors.DEPTH_FOLDER):
        assert (base / "models" / name).is_dir(), name
    assert f"could not create the model folder {base / 'models' / host.loaders.FOLDER}" in log

