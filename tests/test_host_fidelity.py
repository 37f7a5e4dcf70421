"""Host tests: faint controls through the real patch, on both routes and every family, against the
official code's cross normalisation in fp32 (torch.mean and torch.std taken separately)."""
from __future__ import annotations

import pytest
import torch

import host  # skips this module without a ComfyUI host
from host import apply, conditioning, control_image, loaded, sample, tiny_model
from test_core import SPEC_ROWS as ROWS, official_code_fp32
from test_host_apply import controlnet_route

video = host.importlib.import_module(f"{host.PACK_NAME}.nodes.video")
patch_module = host.patch_module

SPREADS = [1e-2, 1e-4, 1e-6]
ROUNDING_SPREAD = 1e-8  # under one rounding of fp32 at the control's magnitude


def make_faint(file, spread: float, image: torch.Tensor) -> None:
    """The encoder's last conv scaled so that its output is 2.5 with a relative spread ``spread``."""
    final = file.encoder.mid_convs[1]
    with torch.no_grad():
        final.bias.zero_()
        variation = file.encoder(image.movedim(-1, 1)[:1], torch.tensor([500.0]))
        final.weight.mul_(spread * 2.5 / variation.float().std())
        final.bias.fill_(2.5)


def record_injections(monkeypatch) -> list:
    """(patch, hidden in, hidden out, chunks, encoder output) of every injection."""
    records, controls = [], []
    encode_for = host.core.ControlNeXt.encode_for
    inject = patch_module.ControlNeXtPatch.inject

    def encoding(self, *args, **kwargs):
        control = encode_for(self, *args, **kwargs)
        # in the memory layout the patch normalises (and the official code's convs give): with a
        # faint control a reduction in another order moves the mean by a rounding, amplified by 1/spread
        controls.append(control.contiguous())
        return control

    def injecting(self, h, transformer_options):
        out = inject(self, h, transformer_options)
        if transformer_options.get("block") == self.block:
            records.append((self, h.clone(), out.clone(), list(transformer_options.get("cond_or_uncond") or [0]),
                            controls[-1]))
        return out

    monkeypatch.setattr(host.core.ControlNeXt, "encode_for", encoding)
    monkeypatch.setattr(patch_module.ControlNeXtPatch, "inject", injecting)
    return records


def check_against_official(records, family, layout, flat: bool = False) -> None:
    """Each CFG half as the official code computes it; ``flat``: only the normalised mean added."""
    pool_first, eps, k = ROWS[(family, layout)]
    assert records
    for patch, hidden, out, chunks, control in records:
        rows = hidden.shape[0] // len(chunks)
        for index, kind in enumerate(chunks):
            h = hidden[index * rows:(index + 1) * rows]
            gain = patch.gains[0 if kind == 0 else 1]
            if not gain:
                expected = h
            elif flat:
                expected = h + torch.mean(h, dim=(1, 2, 3), keepdim=True) * gain * k
            else:
                expected = official_code_fp32(h, control.float(), pool_first, eps, k, gain)
            scale = h.std() * k * max(abs(gain), 1e-3)
            difference = (out[index * rows:(index + 1) * rows] - expected).abs().max()
            assert difference <= 2e-5 * scale + 1e-6 * h.abs().max(), (kind, float(difference), float(scale))


def sample_each_spread(tmp_path, monkeypatch, layout, image, run) -> None:
    """``run(file)`` samples once per spread, 1e-2 down to the level of rounding (1e-8: flat)."""
    file = loaded(tmp_path, layout)
    records = record_injections(monkeypatch)
    for spread in SPREADS + [ROUNDING_SPREAD]:
        make_faint(file, spread, image)
        records.clear()
        run(file)
        yield spread, list(records)


@pytest.mark.parametrize("route", ["model", "controlnet"])
@pytest.mark.parametrize("family,layout", [("sd15", "mid"), ("sd15", "base"), ("sdxl", "base")])
def test_faint_controls_match_the_official_code(tmp_path, monkeypatch, family, layout, route):
    image = control_image()
    model = tiny_model(family)

    def run(file):
        if route == "model":
            sample(apply(model, file, image, strength=0.8), family, steps=1)
        else:
            positive, negative = controlnet_route(family, file, image, strength=0.8)
            sample(model, family, positive=positive, negative=negative, steps=1)

    for spread, records in sample_each_spread(tmp_path, monkeypatch, layout, image, run):
        check_against_official(records, family, layout, flat=spread == ROUNDING_SPREAD)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["base", "svd_v1"])
def test_faint_video_controls_match_the_official_code(tmp_path, monkeypatch, layout):
    poses = control_image(batch=4)
    unet = tiny_model("svd" if layout == "base" else "svd_1280")  # v1 injects where SVD-XT has 1280 channels
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(file):
        model = video.ApplyControlNeXtSVD.execute(unet, file, poses, 0.8, 0.0, 1.0, "error", False).result[0]
        host.comfy.sample.sample(model, noise, 1, 2.0, "euler", "karras", conditioning("svd", 1),
                                 conditioning("svd", 2), torch.zeros(4, 4, 8, 8), seed=1, disable_pbar=True)

    for spread, records in sample_each_spread(tmp_path, monkeypatch, layout, poses, run):
        check_against_official(records, "svd", layout, flat=spread == ROUNDING_SPREAD)
