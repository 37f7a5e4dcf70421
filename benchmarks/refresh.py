"""How far the opt-in refresh-every-k-steps mode moves a sampling result from the exact mode.

On the tests' shallow random-weight SD1.5 and SDXL UNets (controlnext_testbed/tiny_unet.py) with a random
official-layout encoder: the same seed sampled bare, with exact ControlNeXt, and with
``refresh_every`` = k. The deviation is reported against the control's own effect,
|refresh - exact| / |exact - bare| (L2 over the final latent), and against the result,
|refresh - exact| / |exact|. Random weights say how the mechanism behaves, not what a trained
encoder does: with a release's files, run ``measure`` on your own model.

    COMFYUI_PATH=... python benchmarks/refresh.py --out /tmp/refresh.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402

LAYOUTS = {"sd15": "mid", "sdxl": "base"}


def sample(model, family: str, steps: int, sampler: str, size: int) -> torch.Tensor:
    import comfy.sample
    from controlnext_testbed.tiny_unet import conditioning

    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 4, size, size, generator=generator)
    return comfy.sample.sample(model, noise, steps, 3.0, sampler, "normal", conditioning(family, 1),
                               conditioning(family, 2), torch.zeros_like(noise), seed=11, disable_pbar=True)


def measure(model, file, image, family: str, ks: list[int], steps: int, sampler: str, size: int) -> dict:
    """Deviation of each k from the exact mode for one model (any ComfyUI MODEL of the family)."""
    apply = comfy_host.pack("nodes.apply")

    def controlled(k: int) -> torch.Tensor:
        return sample(apply.ApplyControlNeXt.execute(model, file, image, 1.0, 0.0, 1.0, refresh_every=k).result[0],
                      family, steps, sampler, size)

    bare = sample(model, family, steps, sampler, size)
    exact = controlled(1)
    effect = (exact - bare).norm().item()
    out = {"steps": steps, "sampler": sampler, "latent": [size, size], "control_effect_rel": effect / exact.norm().item(),
           "k": {}}
    for k in ks:
        moved = (controlled(k) - exact).norm().item()
        out["k"][str(k)] = {"vs_control_effect": moved / effect, "vs_result": moved / exact.norm().item()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comfy_host.setup("cpu")
    torch.set_num_threads(1)  # as the timed benchmarks: steady on a shared machine (nothing here is timed)
    from controlnext_testbed.tiny_unet import tiny_model

    ks = [2] if args.quick else [2, 3, 4]
    steps, size = (3, 8) if args.quick else (16, 8)
    result = {"models": "controlnext_testbed/tiny_unet.py shallow random-weight UNets (fp32), random encoders", "families": {}}
    for family, layout in LAYOUTS.items():
        file = comfy_host.controlnext_file(layout)
        image = comfy_host.control_image(1, size * 8, size * 8)
        result["families"][family] = measure(tiny_model(family), file, image, family, ks, steps, "euler", size)
    with open(args.out, "w") as out:
        json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
