"""Per-image summary statistics of attribution maps: pure, batched torch functions.

Definitions follow docs/conventions.md ("Output rows"). Every function takes maps with any number of
leading axes (``(N, H, W)``, or ``(N, K, H, W)`` with a top-k axis) and returns one value per map,
shape ``(N,)`` or ``(N, K)``, dtype float32, on the maps' device. Sums are accumulated in float64
and cast to float32 at the end.

Inputs are expected to be ``>= 0`` (saliency, ``sum_c |IG[c]|`` and Grad-CAM after its ReLU all
are). Nothing is asserted or clipped: a negative value enters the formulas as it is.

Undefined values are NaN, never a fake number: a map whose sum is 0 (all zero) has no distribution,
so all five map statistics are NaN for it; a constant map has no ranking, so its rank agreement is
NaN. A NaN anywhere in a map makes that map's statistics NaN.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from xai_workers.cams import FAMILY, SMOOTHGRAD

METHODS = ("saliency", "integrated_gradients", "gradcam", "cam", *FAMILY, *SMOOTHGRAD)
MAP_STATS = ("gini", "entropy", "border_frac", "com_x", "com_y")

#: Fraction of the width (height) that counts as border, on each side.
BORDER_FRACTION = 0.1
#: Maps larger than this (per side) are average-pooled to it before rank agreement is computed.
AGREEMENT_SIZE = 32
#: Floor of ``|score - baseline_score|`` in ``ig_relative_error``.
IG_REL_EPS = 1e-6


def map_2d(method: str, value: Tensor) -> Tensor:
    """The 2-D map of a method, the map the statistics are computed on.

    - ``saliency``: (..., H, W) -> itself.
    - ``integrated_gradients``: (..., C, H, W) -> ``sum_c |IG[c]|``, (..., H, W).
    - ``gradcam`` and the Grad-CAM family (``gradcam_pp``, ``xgradcam``, ``layercam``,
      ``eigencam``): (..., H, W) -> itself (already after their ReLU).
    - ``smoothgrad``, ``smoothgrad_sq``, ``vargrad``: (..., H, W) -> itself (>= 0).
    - ``cam``: (..., H, W) -> ``ReLU(cam)``: the positive evidence for the class, the part
      Grad-CAM keeps (on a GAP + linear model ``gradcam = ReLU(cam) / (h*w)``, so the two have
      the same statistics there). The stored ``cam`` stays signed and raw.

    Leading axes (batch N, and a top-k axis K) are kept. Returns the input's dtype and device
    (detached); values ``>= 0`` for the methods' raw outputs.
    """
    if method == "integrated_gradients":
        if value.dim() < 3:
            raise ValueError(
                f"integrated_gradients must be (..., C, H, W); got {tuple(value.shape)}"
            )
        return value.detach().abs().sum(dim=-3)
    if method in ("saliency", "gradcam", "cam", *FAMILY, *SMOOTHGRAD):
        if value.dim() < 2:
            raise ValueError(f"{method} must be (..., H, W); got {tuple(value.shape)}")
        return value.detach().clamp(min=0) if method == "cam" else value.detach()
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def border_width(size: int) -> int:
    """Border thickness in pixels for a side of ``size`` pixels.

    ``max(1, floor(0.1 * size + 0.5))``: 10% rounded half up, at least one pixel (32 -> 3,
    224 -> 22, 8 -> 1).
    """
    return max(1, math.floor(BORDER_FRACTION * size + 0.5))


def border_mask(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (height, width): True on the top/bottom ``border_width(height)`` rows and on the
    left/right ``border_width(width)`` columns (their union)."""
    bh, bw = border_width(height), border_width(width)
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[:bh] = True
    mask[height - bh :] = True
    mask[:, :bw] = True
    mask[:, width - bw :] = True
    return mask


def gini(m: Tensor) -> Tensor:
    """Gini index of each map's values, (..., H, W) -> (...) float32, in [0, 1 - 1/n].

    With the n = H*W values sorted ascending, ``x_(1) <= ... <= x_(n)``::

        G = sum_i (2 i - n - 1) x_(i) / (n * sum_i x_(i))

    which is Quantus' ``Sparseness.evaluate_instance`` (Chalasani et al., 2020) without the 1e-7
    Quantus adds to every value (we return NaN for an all-zero map instead). Gini is scale
    invariant, so Quantus' default max-normalisation does not change it; with ``abs=True`` Quantus
    takes ``|a|``, which equals ``a`` for our maps ``>= 0``. 0 for a uniform map, ``1 - 1/n`` for a
    single nonzero pixel. It equals the mean-absolute-difference form
    ``sum_i sum_j |x_i - x_j| / (2 n^2 mean(x))``.
    """
    flat, lead = _flatten(m)
    n = flat.shape[1]
    x = flat.sort(dim=1).values
    coef = 2 * torch.arange(1, n + 1, dtype=torch.float64, device=x.device) - n - 1
    total = x.sum(dim=1)
    g = (x * coef).sum(dim=1) / (n * total)
    return _finish(g, total, lead)


def entropy(m: Tensor) -> Tensor:
    """Normalised Shannon entropy, (..., H, W) -> (...) float32, in [0, 1].

    ``p = m / sum(m)``; ``-sum_i p_i log p_i / log(n)`` with ``0 log 0 = 0`` and n = H*W. 1 for a
    uniform map, 0 for a single nonzero pixel. NaN for an all-zero map and for n = 1 (0/0).
    """
    flat, lead = _flatten(m)
    n = flat.shape[1]
    total = flat.sum(dim=1)
    p = flat / total[:, None]
    h = -torch.xlogy(p, p).sum(dim=1)
    h = h / math.log(n) if n > 1 else torch.full_like(h, math.nan)
    return _finish(h, total, lead)


def border_frac(m: Tensor) -> Tensor:
    """Share of each map's sum inside the border, (..., H, W) -> (...) float32, in [0, 1].

    The border is the union of the top and bottom ``border_width(H)`` rows and the left and right
    ``border_width(W)`` columns (see ``border_width``: 10% of the side, rounded half up, at least 1
    pixel). A uniform map gives the border's area share; all mass in a corner pixel gives 1.
    """
    x = _as64(m)
    h, w = x.shape[-2:]
    mask = border_mask(h, w, device=x.device)
    total = x.sum(dim=(-2, -1))
    inside = (x * mask).sum(dim=(-2, -1))
    return _finish_nd(inside / total, total)


def center_of_mass(m: Tensor) -> tuple[Tensor, Tensor]:
    """Centre of mass ``(com_x, com_y)`` as fractions of width and height, each (...) float32.

    Pixel (i, j) sits at its centre, ``x = (j + 0.5) / W``, ``y = (i + 0.5) / H``, so values lie in
    ``[0.5/W, 1 - 0.5/W]``; a uniform map gives (0.5, 0.5); x grows to the right, y downwards.
    """
    x = _as64(m)
    h, w = x.shape[-2:]
    xs = (torch.arange(w, dtype=torch.float64, device=x.device) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float64, device=x.device) + 0.5) / h
    total = x.sum(dim=(-2, -1))
    cx = (x.sum(dim=-2) * xs).sum(dim=-1) / total
    cy = (x.sum(dim=-1) * ys).sum(dim=-1) / total
    return _finish_nd(cx, total), _finish_nd(cy, total)


def map_statistics(m: Tensor) -> dict[str, Tensor]:
    """All five statistics of maps ``m`` (..., H, W) ``>= 0``: dict with keys ``gini``,
    ``entropy``, ``border_frac``, ``com_x``, ``com_y``, each (...) float32 (``(N,)`` for (N, H, W)).
    An all-zero map gives NaN for all five."""
    com_x, com_y = center_of_mass(m)
    return {
        "gini": gini(m),
        "entropy": entropy(m),
        "border_frac": border_frac(m),
        "com_x": com_x,
        "com_y": com_y,
    }


def ig_relative_error(
    ig_delta: Tensor, score: Tensor, baseline_score: Tensor, eps: float = IG_REL_EPS
) -> Tensor:
    """Completeness error of IG relative to the score, float32, same shape as the inputs.

    ``|ig_delta| / max(|score - baseline_score|, |score|, eps)``, ``eps = 1e-6`` by default.
    Relative to the score change alone, an image whose baseline already scores almost as high
    as the image (e.g. 4.90 vs 4.93) would show a tiny absolute error as hundreds of percent:
    the larger of the change and the score itself keeps the figure meaningful there, and equals
    the usual ``|delta| / |F(x) - F(x')|`` whenever the baseline scores 0 or opposite to the
    image. Finite for finite inputs.
    """
    s64, b64 = score.detach().double(), baseline_score.detach().double()
    scale = torch.maximum((s64 - b64).abs(), s64.abs()).clamp(min=eps)
    return (ig_delta.detach().double().abs() / scale).float()


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n along dim 1 of (B, n) float64, ties given their average rank (scipy's default)."""
    b, n = x.shape
    v, idx = x.sort(dim=1)
    new = torch.ones_like(v, dtype=torch.bool)
    new[:, 1:] = v[:, 1:] != v[:, :-1]
    group = new.cumsum(dim=1) - 1 + torch.arange(b, device=x.device)[:, None] * n
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand(b, n)
    sums = torch.zeros(b * n, dtype=torch.float64, device=x.device)
    counts = torch.zeros(b * n, dtype=torch.float64, device=x.device)
    sums.scatter_add_(0, group.reshape(-1), pos.reshape(-1))
    counts.scatter_add_(0, group.reshape(-1), torch.ones_like(pos).reshape(-1))
    avg = sums / counts.clamp(min=1)
    return torch.empty_like(v).scatter_(1, idx, avg[group])


def _pool_for_agreement(m: Tensor) -> Tensor:
    h, w = m.shape[-2:]
    x = _as64(m).reshape(-1, 1, h, w)
    if h > AGREEMENT_SIZE or w > AGREEMENT_SIZE:
        x = F.adaptive_avg_pool2d(x, (min(h, AGREEMENT_SIZE), min(w, AGREEMENT_SIZE)))
    return x.flatten(1)


def rank_agreement(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation between two maps per image, (..., H, W) x2 -> (...) float32.

    Both maps must have the same shape. A side longer than 32 pixels is first average-pooled
    (``adaptive_avg_pool2d``) down to 32, which keeps the cost small and compares methods at a
    common, coarse resolution (a 224x224 map is ranked as 32x32 cells). Then: Pearson correlation
    of the pixels' ranks, ties given their average rank (``scipy.stats.spearmanr``). In [-1, 1];
    NaN when either map is constant (all-zero included) or contains NaN.
    """
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    lead = a.shape[:-2]
    xa, xb = _pool_for_agreement(a), _pool_for_agreement(b)
    ra, rb = _average_ranks(xa), _average_ranks(xb)
    da = ra - ra.mean(dim=1, keepdim=True)
    db = rb - rb.mean(dim=1, keepdim=True)
    denom = ((da * da).sum(dim=1) * (db * db).sum(dim=1)).sqrt()
    r = ((da * db).sum(dim=1) / denom).clamp(-1.0, 1.0)
    r = torch.where(denom > 0, r, torch.full_like(r, math.nan))
    bad = xa.isnan().any(dim=1) | xb.isnan().any(dim=1)
    r = torch.where(bad, torch.full_like(r, math.nan), r)
    return r.float().reshape(lead)


def agreement_stats(maps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rank agreement between every pair of 2-D maps given, keyed ``agree_{a}_{b}``.

    ``maps``: method -> (..., H, W) map (from ``map_2d``). Pairs follow the order saliency,
    integrated_gradients, gradcam (other names after them, in the order given), so the keys are
    ``agree_saliency_integrated_gradients``, ``agree_saliency_gradcam``,
    ``agree_integrated_gradients_gradcam`` for whichever methods are present. Values as
    ``rank_agreement``. Fewer than two maps: an empty dict.
    """
    names = [k for k in METHODS if k in maps] + [k for k in maps if k not in METHODS]
    return {
        f"agree_{p}_{q}": rank_agreement(maps[p], maps[q])
        for p, q in itertools.combinations(names, 2)
    }


def row_statistics(result: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """All statistic columns for the engine's result dict, float32 tensors of shape (N,) (or
    (N, K) with a top-k axis).

    ``result`` holds any subset of ``saliency`` (N, H, W), ``integrated_gradients`` (N, C, H, W),
    ``gradcam`` (N, H, W) (a None value counts as absent), plus ``ig_delta``, ``score`` and
    ``baseline_score`` (N,). Returns ``{method}_{stat}`` for each present method and stat in
    ``MAP_STATS``, ``ig_rel_error`` when IG and the three scalars are present, and the
    ``agree_*`` columns of ``agreement_stats`` when two or more methods are present.
    """
    out: dict[str, Tensor] = {}
    maps: dict[str, Tensor] = {}
    for method in METHODS:
        value = result.get(method)
        if value is None:
            continue
        maps[method] = map_2d(method, value)
        for stat, v in map_statistics(maps[method]).items():
            out[f"{method}_{stat}"] = v
    if "integrated_gradients" in maps and all(
        result.get(k) is not None for k in ("ig_delta", "score", "baseline_score")
    ):
        out["ig_rel_error"] = ig_relative_error(
            result["ig_delta"], result["score"], result["baseline_score"]
        )
    out.update(agreement_stats(maps))
    return out


def _as64(m: Tensor) -> Tensor:
    if m.dim() < 2:
        raise ValueError(f"a map must be (..., H, W); got shape {tuple(m.shape)}")
    return m.detach().to(torch.float64)


def _flatten(m: Tensor) -> tuple[Tensor, torch.Size]:
    x = _as64(m)
    return x.reshape(-1, x.shape[-2] * x.shape[-1]), x.shape[:-2]


def _finish(value: Tensor, total: Tensor, lead: torch.Size) -> Tensor:
    return _finish_nd(value, total).reshape(lead)


def _finish_nd(value: Tensor, total: Tensor) -> Tensor:
    """NaN where the map's sum is 0 (undefined), float32."""
    return torch.where(total != 0, value, torch.full_like(value, math.nan)).float()
