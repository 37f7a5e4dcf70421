"""Peak memory of one ControlNeXt-SVD sampling run, measured in a fresh process.

Run by test_host_video.py as ``python svd_memory_probe.py FRAMES WINDOW SIZE``; prints the
growth of the process's peak resident memory during sampling, in MiB (Linux VmHWM, reset
just before sampling). A fresh process per run keeps one run's freed memory from hiding
another's peak.
"""
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # the tests' helpers, and the checkout (controlnext_testbed)
from conftest import COMFYUI_PATH  # noqa: E402  (puts ComfyUI on sys.path)

assert COMFYUI_PATH, "needs COMFYUI_PATH"
import tempfile  # noqa: E402

import torch  # noqa: E402

import host  # noqa: E402
from test_host_video import NEGATIVE, POSITIVE, apply_svd, sample_video, video  # noqa: E402


def resident_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def main(frames: int, window: int, size: int) -> None:
    model = host.tiny_model("svd")
    file = host.loaded(tempfile.mkdtemp(), "base")

    def guider_for(count: int):
        patched = apply_svd(model, file, host.control_image(batch=count, size=size * 8))
        return video.ControlNeXtSVDWindowGuider.execute(patched, POSITIVE, NEGATIVE, 1.0, 3.0, window, 4).result[0]

    sample_video(model, 2, steps=1, guider=guider_for(2), size=size)  # warm-up: lazy allocations, kernels
    guider = guider_for(frames)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current resident size
    before = resident_mib("VmRSS")
    sample_video(model, frames, steps=1, guider=guider, size=size)
    print(f"{resident_mib('VmHWM') - before:.1f}")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:4]))
