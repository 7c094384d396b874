"""Compare output rows with the engine's result on the same inputs, with tolerances that hold on
any CPU (x86 AVX2/AVX-512, ARM) and any thread count, and still catch a real error.

The job and the worker compute the same maps as an in-process ``attribute`` call, but in other
batches, chunks and processes, with another number of threads: float32 sums run in another order,
which moves each value by a few ulp of the largest value summed (measured here: below 1e-6 of a
map's largest value). A real error (other preprocessing, target, baseline, layer, model or row
order) moves a map by 10% or more of its largest value. So:

- maps: ``max |got - want| <= 1e-4 * max |want|`` per image (per target with top-k);
- scores (logits, probabilities, ``ig_delta``): within ``1e-4 * max(|score|, |baseline|, 1)``;
- statistics: recomputed from the rows' own stored maps and scalars with ``row_statistics``
  (float64 inside, so only the last float32 ulp may differ: ``rtol=1e-6``), which catches a
  statistic taken from another map or not by its definition. They are NOT compared with the
  engine's statistics: the rank agreements (Spearman over near-tied pixels) are discontinuous,
  so a 1e-7 change of a map can move them by 1e-4 on another CPU (seen: 0.15097 vs 0.15100).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import torch

from xai_workers import schema as S
from xai_workers.stats import row_statistics

MAPS = ("saliency", "integrated_gradients", "gradcam", "cam")
MAP_RTOL = 1e-4
SCORE_RTOL = 1e-4
STAT_RTOL = 1e-6


def _np(col) -> np.ndarray:
    if S.is_tensor_type(col.type):
        return S.tensor_to_numpy(col)
    return np.asarray(col.to_pylist(), dtype=np.float64)


def stored_maps(col) -> np.ndarray:
    """A map column as numpy in its stored precision (float16 for ``compact`` maps of schema
    version 1; float32 holding bfloat16 values for version 2's)."""
    t = col.type
    half = isinstance(t, pa.FixedShapeTensorType) and t.value_type == pa.float16()
    return S.tensor_to_numpy(col, dtype=np.float16 if half else np.float32)


def _is_bf16(a: np.ndarray) -> bool:
    """True when every value of float32 ``a`` is a bfloat16 value (low 16 bits zero): a
    compact map (an all-zero map counts too, harmlessly: its error is 0 either way)."""
    a = np.ascontiguousarray(a)
    return a.dtype == np.float32 and not (a.view(np.uint32) & 0xFFFF).any()


def assert_maps_close(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """``got``, ``want``: (N, [K,] ...) maps; per image (and target) within 1e-4 of its max.

    Maps stored ``compact`` are rounded: two float32 values a few ulp apart can round to
    neighbouring values one ulp apart (float16, schema version 1: 2^-11 relative, so 2^-10 of
    the largest value; bfloat16, version 2: at most 2^-7 of the value, so 2^-7 plus the float32
    tolerance). IG's maps are (C, H, W) when stored full (float32), (H, W) (the channel sum)
    when compact."""
    half = np.asarray(got).dtype == np.float16 or np.asarray(want).dtype == np.float16
    bf16 = not half and (_is_bf16(np.asarray(got)) or _is_bf16(np.asarray(want)))
    rtol = 2.0**-10 if half else 2.0**-7 + MAP_RTOL if bf16 else MAP_RTOL
    compact = half or bf16
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    per_map = 3 if what == "integrated_gradients" and not compact else 2
    lead = want.shape[: want.ndim - per_map]
    g = got.reshape(*lead, -1)
    w = want.reshape(*lead, -1)
    scale = np.abs(w).max(axis=-1)
    floor = 1e-6 * max(float(scale.max(initial=0.0)), 1e-30)  # an all-zero map (ReLU'd CAM)
    err = np.abs(g - w).max(axis=-1)
    bad = err > rtol * np.maximum(scale, floor)
    assert not bad.any(), f"{what}: rows {np.flatnonzero(bad.reshape(-1))[:5]} off by {err.max()}"


def assert_rows_match_engine(got: pa.Table, ref: Mapping[str, torch.Tensor]) -> None:
    """Rows ``got`` (in the order of ``ref``'s images) against ``ref = attribute(...)``."""
    for name in MAPS:
        if name in got.column_names and ref.get(name) is not None:
            assert_maps_close(_np(got[name]), ref[name].numpy(), name)
    for name in ("target", "pred_class"):
        if name in got.column_names and name in ref:
            np.testing.assert_array_equal(np.asarray(got[name].to_pylist()), ref[name].numpy())
    score = np.abs(ref["score"].double().numpy())
    base = np.abs(ref["baseline_score"].double().numpy()) if "baseline_score" in ref else 0
    scale = np.maximum(np.maximum(score, base), 1.0)
    for name in ("score", "baseline_score", "ig_delta", "pred_prob"):
        if name in got.column_names and ref.get(name) is not None:
            err = np.abs(_np(got[name]) - ref[name].double().numpy())
            assert (err <= SCORE_RTOL * scale).all(), (name, err.max())
    assert_statistics_from_own_maps(got)


def assert_statistics_from_own_maps(got: pa.Table) -> None:
    """Every statistic column equals ``row_statistics`` of the rows' own full-resolution maps
    (rows written with ``store="full"``)."""
    ig = (
        got.schema.field("integrated_gradients").type
        if "integrated_gradients" in got.column_names
        else None
    )
    assert ig is None or len(S.map_shape_of(ig)) == 3, (
        "statistics are checkable from full maps only"
    )
    ok = np.asarray(got["status"].to_pylist()) == "ok"
    rows = got.filter(pa.array(ok))
    result = {}
    for name in (*MAPS, "ig_delta", "score", "baseline_score"):
        if name in rows.column_names:
            result[name] = torch.from_numpy(_np(rows[name]).astype(np.float32))
    want = row_statistics(result)
    assert want, "no statistics to check"
    for name, value in want.items():
        assert name in rows.column_names, name
        np.testing.assert_allclose(
            _np(rows[name]),
            value.double().numpy(),
            rtol=STAT_RTOL,
            atol=1e-7,
            equal_nan=True,
            err_msg=name,
        )
