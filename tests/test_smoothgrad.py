"""SmoothGrad, SmoothGrad-squared and VarGrad (engine.attribute) against Captum's NoiseTunnel over
Saliency, with the same noise tensors handed to both; noise seeded by the row key."""

from __future__ import annotations

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from torch import nn

from xai_workers.engine import attribute, smoothgrad_noise

NAMES = {"smoothgrad": "smoothgrad", "smoothgrad_sq": "smoothgrad_sq", "vargrad": "vargrad"}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).double().eval()  # fmt: skip


def test_equals_captum_noise_tunnel_with_the_same_noise(monkeypatch):
    net = _net()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    keys, m, sigma = [11, 22, 33], 6, 0.15
    ours = attribute(net, x, methods=tuple(NAMES), smoothgrad_samples=m,
                     smoothgrad_sigma=sigma, noise_keys=keys, batch_budget_mb=0.01)  # fmt: skip
    noise = smoothgrad_noise(x, m, sigma, keys)  # (N, M, C, H, W), the definition's draws
    t = ours["target"]
    for i in range(3):
        # Captum draws its noise with torch.normal inside NoiseTunnel: hand it ours instead
        monkeypatch.setattr(torch, "normal", lambda mean, std, _n=noise[i]: _n.clone())
        for ours_name, nt_type in NAMES.items():
            ref = NoiseTunnel(Saliency(net)).attribute(
                x[i : i + 1], nt_type=nt_type, nt_samples=m, stdevs=1.0, target=int(t[i]),
            )  # fmt: skip
            # float64 both ways; only the order of the sums over samples differs (1e-12)
            torch.testing.assert_close(ours[ours_name][i], ref[0].amax(dim=0), rtol=1e-9,
                                       atol=1e-12)  # fmt: skip
        monkeypatch.undo()


def test_noise_follows_the_row_key_not_the_batch():
    net = _net()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    keys = [5, 6, 7, 8]
    whole = attribute(net, x, methods=("smoothgrad",), smoothgrad_samples=4, noise_keys=keys)
    part = attribute(net, x[2:], methods=("smoothgrad",), smoothgrad_samples=4,
                     noise_keys=keys[2:], batch_budget_mb=0.001)  # fmt: skip
    torch.testing.assert_close(part["smoothgrad"], whole["smoothgrad"][2:], rtol=1e-9, atol=1e-12)
    other = attribute(net, x[2:], methods=("smoothgrad",), smoothgrad_samples=4,
                      noise_keys=[1, 2])  # fmt: skip
    assert (other["smoothgrad"] - whole["smoothgrad"][2:]).abs().max() > 1e-6
    spread = (x[0].amax() - x[0].amin()).item()
    z = smoothgrad_noise(x, 4, 0.15, keys)
    assert z[0].std().item() == pytest.approx(0.15 * spread, rel=0.1)  # sigma x the input range
    with pytest.raises(ValueError, match="noise_keys"):
        attribute(net, x, methods=("smoothgrad",), noise_keys=[1])
