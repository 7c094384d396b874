"""Storage profiles: what of a result's maps is stored (plain torch; no I/O).

Three profiles (CONVENTIONS.md, "Storage profiles"):

- ``full``: every map as computed, float32 at the input resolution; IG per channel (C, H, W).
- ``compact`` (the job's default): every map at ``map_size x map_size`` (M x M), float32 values
  rounded to bfloat16 (:func:`round_bf16`),
  area-averaged from the full map: output pixel (i, j) is the mean of the full map over the
  rectangle ``[i*H/M, (i+1)*H/M) x [j*W/M, (j+1)*W/M)``, input pixels weighted by the share of
  them inside it (:func:`area_matrix`). When M divides H and W this is exactly
  ``adaptive_avg_pool2d`` (plain blocks); otherwise (224 -> 64) ``adaptive_avg_pool2d``'s bins
  overlap by a pixel and would not keep the sum, while this average does:
  ``sum(map) * (H*W)/(M*M) == sum(full map)`` up to float32 rounding before the bfloat16
  rounding.
  It equals the block mean of the map repeated k times along each axis, with k*H a multiple of
  M (224 -> 64: repeat twice, 7 x 7 blocks). Saliency, Grad-CAM and
  CAM are averaged as they are; Integrated Gradients is first summed over channels, signed
  (``sum_c IG[c]``), so completeness stays checkable from the stored map. Values are raw (no
  ReLU, no scaling).
- ``stats``: no map is stored.

Statistics, the summary's maps and the report's inputs are computed from the full maps before
:func:`reduce_maps` runs, so they are the same numbers under every profile.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from xai_workers.cams import FAMILY, SMOOTHGRAD

PROFILES = ("compact", "full", "stats")
DEFAULT_PROFILE = "compact"
DEFAULT_MAP_SIZE = 64
#: The result keys that are maps (the others are per-target scalars or classes).
MAP_KEYS = ("saliency", "integrated_gradients", "gradcam", "cam", *FAMILY, *SMOOTHGRAD)


def check_profile(store: str, map_size: int | None = None) -> None:
    """ValueError for an unknown profile or a map size below 1."""
    if store not in PROFILES:
        raise ValueError(f"unknown storage profile {store!r}; choose from {', '.join(PROFILES)}")
    if map_size is not None and int(map_size) < 1:
        raise ValueError(f"map size must be >= 1, got {map_size}")


def effective_map_size(map_size: int, image_size: int) -> int:
    """The side of compact maps: ``map_size``, never above the input's side ``image_size``."""
    return max(1, min(int(map_size), int(image_size)))


def stored_shape(
    method: str, image_shape: tuple[int, int, int], store: str, map_size: int
) -> tuple[int, ...] | None:
    """Shape of one target's stored ``method`` map, None under ``stats``.

    ``full``: (H, W), or (C, H, W) for IG. ``compact``: (M, M) for every method, with
    M = ``effective_map_size(map_size, H)``.
    """
    c, h, w = image_shape
    if store == "stats":
        return None
    if store == "full":
        return (c, h, w) if method == "integrated_gradients" else (h, w)
    m = effective_map_size(map_size, min(h, w))
    return (m, m)


def area_matrix(n: int, m: int, dtype=torch.float64, device=None) -> Tensor:
    """(m, n) weights of the area average of n pixels into m bins (m <= n).

    ``A[i, j]`` = length of the overlap of pixel j ``[j, j+1)`` with bin i
    ``[i*n/m, (i+1)*n/m)``, divided by the bin's length n/m. Every row sums to 1 (a mean) and
    every column to m/n (each pixel is counted once in all), so ``sum(A @ x) == sum(x) * m/n``.
    """
    edges = torch.arange(m + 1, dtype=torch.float64) * (n / m)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(hi, j + 1) - torch.maximum(lo, j)).clamp(min=0)
    return (overlap * (m / n)).to(dtype=dtype, device=device)


def reduce_map(method: str, value: Tensor, map_size: int) -> Tensor:
    """One method's full maps -> its compact maps, float32 (..., M, M) holding bfloat16 values
    (module docstring).

    ``value``: (..., H, W) for saliency / gradcam / cam, (..., C, H, W) for IG (leading axes, N
    and a top-k K, are kept). The average runs in float32 on the maps' device; the result is
    rounded to bfloat16 at the end (:func:`round_bf16`; bfloat16 has float32's range).
    """
    v = value.detach().float()
    if method == "integrated_gradients":
        v = v.sum(dim=-3)
    h, w = v.shape[-2:]
    m = effective_map_size(map_size, min(h, w))
    rows = area_matrix(h, m, dtype=v.dtype, device=v.device)
    cols = area_matrix(w, m, dtype=v.dtype, device=v.device)
    return round_bf16(rows @ v @ cols.T)


def round_bf16(v: Tensor) -> Tensor:
    """float32 ``v`` rounded to bfloat16 precision and stored as float32 again: 8 significant
    bits (relative error at most 2^-8 per value, half an ulp), float32's exponent range; round
    to nearest, ties to even (torch's conversion), so the low 16 bits of every value are zero.
    NaN and inf stay. Stored this way every engine reads the maps as plain floats, and
    Parquet's BYTE_STREAM_SPLIT puts the zero bytes in two streams that compress to nothing."""
    return v.float().to(torch.bfloat16).to(torch.float32)


def reduce_maps(result: Mapping[str, Tensor], store: str, map_size: int) -> dict[str, Tensor]:
    """``result`` (``engine.attribute``'s dict) with its maps as the profile stores them.

    ``full``: unchanged; ``compact``: every map through :func:`reduce_map`; ``stats``: the maps
    left out. Non-map entries are passed through as they are.
    """
    check_profile(store, map_size)
    out = {}
    for k, v in result.items():
        if k not in MAP_KEYS or store == "full":
            out[k] = v
        elif store == "compact":
            out[k] = reduce_map(k, v, map_size)
    return out
