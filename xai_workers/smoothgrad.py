"""SmoothGrad (Smilkov et al. 2017), SmoothGrad-squared and VarGrad: input gradients at noisy
copies of x, as rows of the IG sweep (``sweep``; docs/engine.md, 2c).

Image i's M noisy copies are x_i + noise[i, m] (``smoothgrad_noise``: seeded from the row's key,
so a row gets the same noise on any actor, in any batch). Each (image, target) pair's M rows run
in the sweep's chunks; their input gradients g are summed per pair as |g| and g^2
(``add_noisy``), and the maps are per-channel means over the M copies, maxed over channels like
saliency (``smoothgrad_maps``). Definitions: docs/conventions.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def smoothgrad_noise(x: torch.Tensor, samples: int, sigma: float, keys=None) -> torch.Tensor:
    """The noise SmoothGrad adds: (N, M, C, H, W), x's dtype and device.

    Image i's M draws come from a CPU ``torch.Generator`` seeded with ``keys[i]`` (the row's key,
    ``faithfulness.row_key``; default i), standard normal in that order, times
    ``sigma * (max(x_i) - min(x_i))``: a row gets the same noise on any actor, in any batch."""
    n = x.shape[0]
    keys = range(n) if keys is None else keys
    out = torch.empty((n, samples, *x.shape[1:]), dtype=x.dtype)
    for i, key in enumerate(keys):
        g = torch.Generator().manual_seed(int(key))
        z = torch.randn((samples, *x.shape[1:]), generator=g, dtype=torch.float64)
        spread = float((x[i].amax() - x[i].amin()).item())
        out[i] = (z * (sigma * spread)).to(x.dtype)
    return out.to(x.device)


@dataclass(frozen=True)
class Noisy:
    """SmoothGrad's rows in the sweep: ``noise`` (N, M, C, H, W) from ``smoothgrad_noise``; row
    (pair p, sample m) is x[p's image] + noise[p's image, m], scored for p's target. ``apart``:
    these rows run in chunks of their own in fp32 (when the path points run under bf16
    autocast), so SmoothGrad is computed in fp32 whatever the precision, as it always was.
    ``sums``: per pair, the running sums over its noisy rows of |g| and g^2 (P, C, H, W) each,
    filled in place by the sweep."""

    noise: torch.Tensor
    apart: bool
    sums: tuple[torch.Tensor, torch.Tensor]


def make_noisy(x: torch.Tensor, pairs: int, samples: int, sigma: float, keys, apart: bool):
    """The ``Noisy`` rows of ``pairs`` (image, target) pairs of the batch x (N, C, H, W)."""
    s1 = torch.zeros((pairs, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return Noisy(smoothgrad_noise(x, samples, sigma, keys), apart, (s1, torch.zeros_like(s1)))


def noisy_rows(x, noisy: Noisy, q: torch.Tensor, kk: int):
    """The rows q (int64 (R,), row = pair * M + m) of SmoothGrad: their pairs (R,) and inputs
    x[img] + noise[img, m] (R, C, H, W); ``kk`` targets per image."""
    samples = noisy.noise.shape[1]
    pair, m = q // samples, q % samples
    img = pair // kk
    return pair, x[img] + noisy.noise[img, m]


def add_noisy(sums, pair: torch.Tensor, g: torch.Tensor) -> None:
    """Add the input gradients g (R, C, H, W) of noisy rows of pairs ``pair`` (R,) to ``sums``."""
    s1, s2 = sums
    s1.index_add_(0, pair, g.abs())
    s2.index_add_(0, pair, g * g)


def smoothgrad_maps(sums, samples: int, lead) -> dict[str, torch.Tensor]:
    """smoothgrad, smoothgrad_sq, vargrad, each shaped ``lead`` (N, K, H, W), from the per-pair
    sums over the M noisy copies of |g| and g^2 (``sums``: (P, C, H, W) each).

    Per channel, over the M noisy copies: mean |g|, mean g^2, and mean g^2 - (mean |g|)^2 (the
    variance of |g|, as Captum's NoiseTunnel over Saliency); then the largest over channels, as
    saliency is."""
    m1, m2 = sums[0] / samples, sums[1] / samples
    maps = {
        "smoothgrad": m1.amax(dim=1),
        "smoothgrad_sq": m2.amax(dim=1),
        "vargrad": (m2 - m1 * m1).amax(dim=1),
    }
    return {k: v.reshape(lead) for k, v in maps.items()}
