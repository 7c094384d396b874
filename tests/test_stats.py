"""Statistics of xai_workers.stats against independent computations (numpy, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from xai_workers import stats

RNG = np.random.default_rng(1234)


def _maps(n=5, h=12, w=10) -> np.ndarray:
    """Nonnegative test maps with varied structure: exponential noise, a sparse one, ties."""
    m = RNG.exponential(size=(n, h, w))
    m[1] = 0.0
    m[1, 3, 4] = 2.0
    m[1, 7, 1] = 1.0
    m[2] = np.round(m[2])  # many ties, some zeros
    return m


# ---- independent references ----------------------------------------------------------------


def quantus_sparseness(a: np.ndarray) -> float:
    """Quantus Sparseness.evaluate_instance, sorted form, minus its +1e-7 offset."""
    a = np.sort(a.reshape(-1).astype(np.float64))
    n = a.size
    return float(np.sum((2 * np.arange(1, n + 1) - n - 1) * a) / (n * np.sum(a)))


def gini_mean_abs_diff(a: np.ndarray) -> float:
    """Gini as the mean absolute difference: sum_i sum_j |x_i - x_j| / (2 n^2 mean)."""
    x = a.reshape(-1).astype(np.float64)
    n = x.size
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean()))


def border_frac_loop(a: np.ndarray, bh: int, bw: int) -> float:
    h, w = a.shape
    inside = 0.0
    for i in range(h):
        for j in range(w):
            if i < bh or i >= h - bh or j < bw or j >= w - bw:
                inside += a[i, j]
    return inside / a.sum()


# ---- gini ----------------------------------------------------------------------------------


def test_gini_forms_agree_and_match_quantus_formula():
    maps = _maps()
    got = stats.gini(torch.from_numpy(maps)).numpy()
    for k, m in enumerate(maps):
        ref = gini_mean_abs_diff(m)
        assert quantus_sparseness(m) == pytest.approx(ref, rel=1e-12)
        assert got[k] == pytest.approx(ref, rel=1e-6, abs=1e-7)


def test_gini_with_quantus_offset_is_close():
    # Quantus adds 1e-7 to every (max-normalised) value; the difference is that small.
    m = _maps()[0]
    m = m / m.max()
    a = np.sort(m.reshape(-1)) + 1e-7
    n = a.size
    quantus = np.sum((2 * np.arange(1, n + 1) - n - 1) * a) / (n * np.sum(a))
    assert stats.gini(torch.from_numpy(m)[None]).item() == pytest.approx(quantus, abs=1e-6)


def test_gini_extremes_and_scale_invariance():
    uniform = torch.ones(1, 8, 8)
    spike = torch.zeros(1, 8, 8)
    spike[0, 2, 5] = 3.0
    assert stats.gini(uniform).item() == pytest.approx(0.0, abs=1e-7)
    assert stats.gini(spike).item() == pytest.approx(1 - 1 / 64, rel=1e-6)
    m = torch.from_numpy(_maps()).float()
    assert torch.allclose(stats.gini(m), stats.gini(7.5 * m), atol=1e-6)


# ---- entropy -------------------------------------------------------------------------------


def test_entropy_matches_scipy():
    maps = _maps()
    got = stats.entropy(torch.from_numpy(maps)).numpy()
    for k, m in enumerate(maps):
        p = m.reshape(-1)
        ref = scipy.stats.entropy(p / p.sum()) / math.log(p.size)
        assert got[k] == pytest.approx(ref, rel=1e-6)


def test_entropy_extremes():
    spike = torch.zeros(2, 6, 6)
    spike[:, 0, 0] = 1.0
    assert stats.entropy(torch.ones(1, 6, 6)).item() == pytest.approx(1.0, rel=1e-6)
    assert stats.entropy(spike).tolist() == [0.0, 0.0]


# ---- border_frac ---------------------------------------------------------------------------


@pytest.mark.parametrize("size,expected", [(8, 1), (10, 1), (15, 2), (32, 3), (224, 22), (1, 1)])
def test_border_width(size, expected):
    assert stats.border_width(size) == expected


@pytest.mark.parametrize("corner", [(0, 0), (0, -1), (-1, 0), (-1, -1)])
def test_border_frac_corner_pixel_is_one(corner):
    m = torch.zeros(1, 32, 32)
    m[0, corner[0], corner[1]] = 5.0
    assert stats.border_frac(m).item() == 1.0


def test_border_frac_centre_pixel_is_zero():
    m = torch.zeros(1, 32, 32)
    m[0, 16, 16] = 1.0
    assert stats.border_frac(m).item() == 0.0


@pytest.mark.parametrize("h,w", [(32, 32), (224, 224), (20, 50), (7, 9)])
def test_border_frac_uniform_is_area_share(h, w):
    bh, bw = stats.border_width(h), stats.border_width(w)
    area = (h * w - (h - 2 * bh) * (w - 2 * bw)) / (h * w)
    got = stats.border_frac(torch.ones(1, h, w)).item()
    assert got == pytest.approx(area, rel=1e-6)
    if (h, w) == (32, 32):  # 3-pixel border: 1 - 26^2 / 32^2
        assert got == pytest.approx(1 - 26**2 / 32**2, rel=1e-6)


def test_border_frac_matches_loop():
    maps = _maps(h=20, w=30)
    got = stats.border_frac(torch.from_numpy(maps)).numpy()
    for k, m in enumerate(maps):
        assert got[k] == pytest.approx(border_frac_loop(m, 2, 3), rel=1e-6)


# ---- centre of mass ------------------------------------------------------------------------


def test_com_uniform_is_half():
    cx, cy = stats.center_of_mass(torch.ones(3, 9, 14))
    assert torch.allclose(cx, torch.full((3,), 0.5))
    assert torch.allclose(cy, torch.full((3,), 0.5))


def test_com_delta_is_pixel_centre():
    m = torch.zeros(1, 10, 20)
    m[0, 2, 15] = 4.0  # row 2, column 15
    cx, cy = stats.center_of_mass(m)
    assert cx.item() == pytest.approx(15.5 / 20)
    assert cy.item() == pytest.approx(2.5 / 10)


def test_com_matches_scipy_center_of_mass():
    import scipy.ndimage

    maps = _maps()
    res = stats.map_statistics(torch.from_numpy(maps))
    h, w = maps.shape[1:]
    for k, m in enumerate(maps):
        i, j = scipy.ndimage.center_of_mass(m)
        assert res["com_x"][k].item() == pytest.approx((j + 0.5) / w, rel=1e-6)
        assert res["com_y"][k].item() == pytest.approx((i + 0.5) / h, rel=1e-6)


# ---- shapes, dtype, zero maps, batching ----------------------------------------------------


def test_zero_map_gives_nan_for_all_stats_and_leaves_others_alone():
    m = torch.from_numpy(_maps()).float()
    m[3] = 0.0
    res = stats.map_statistics(m)
    assert set(res) == {"gini", "entropy", "border_frac", "com_x", "com_y"}
    for v in res.values():
        assert v.dtype == torch.float32 and v.shape == (5,)
        assert torch.isnan(v[3])
        assert torch.isfinite(v[[0, 1, 2, 4]]).all()


def test_batched_equals_per_image_and_topk_axis():
    m = torch.from_numpy(_maps(n=6)).float()
    batched = stats.map_statistics(m)
    for k in range(6):
        single = stats.map_statistics(m[k : k + 1])
        for key in batched:
            torch.testing.assert_close(batched[key][k : k + 1], single[key])
    topk = stats.map_statistics(m.reshape(3, 2, *m.shape[1:]))
    for key in batched:
        assert topk[key].shape == (3, 2)
        torch.testing.assert_close(topk[key].reshape(-1), batched[key])


# ---- map_2d --------------------------------------------------------------------------------


def test_map_2d():
    ig = torch.randn(4, 3, 5, 6)
    torch.testing.assert_close(stats.map_2d("integrated_gradients", ig), ig.abs().sum(1))
    ig_topk = torch.randn(4, 2, 3, 5, 6)
    assert stats.map_2d("integrated_gradients", ig_topk).shape == (4, 2, 5, 6)
    sal = torch.rand(4, 5, 6)
    torch.testing.assert_close(stats.map_2d("saliency", sal), sal)
    torch.testing.assert_close(stats.map_2d("gradcam", sal), sal)
    signed = torch.randn(4, 5, 6)  # CAM is signed: its map is the positive evidence
    torch.testing.assert_close(stats.map_2d("cam", signed), signed.clamp(min=0))
    with pytest.raises(ValueError, match="unknown method"):
        stats.map_2d("lime", sal)


# ---- IG relative error ---------------------------------------------------------------------


def test_ig_relative_error():
    delta = torch.tensor([0.1, -0.2, 0.0, 0.5, 0.21, 0.5])
    score = torch.tensor([3.0, 1.0, 2.0, 1.0, 4.93, 0.0])
    base = torch.tensor([1.0, 3.0, 2.0, 1.0, 4.90, 0.0])
    got = stats.ig_relative_error(delta, score, base)
    assert got.dtype == torch.float32
    # |delta| / max(|F(x) - F(x')|, |F(x)|, 1e-6). The 5th row is the issue's case: a baseline
    # scoring 4.90 against 4.93 gave 700% relative to the change alone; 4.3% relative to 4.93.
    expected = [0.1 / 3, 0.1, 0.0, 0.5, 0.21 / 4.93, 0.5 / stats.IG_REL_EPS]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(got).all()


# ---- rank agreement ------------------------------------------------------------------------


def test_rank_agreement_matches_spearmanr_with_ties():
    a = _maps(n=6, h=16, w=16)
    b = a + RNG.normal(scale=0.8, size=a.shape)
    b[2] = np.round(b[2])  # ties on both sides
    got = stats.rank_agreement(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    for k in range(6):
        ref = scipy.stats.spearmanr(a[k].reshape(-1), b[k].reshape(-1)).statistic
        assert got[k] == pytest.approx(ref, abs=1e-6)


def test_rank_agreement_pools_large_maps_to_32():
    a = RNG.exponential(size=(3, 64, 96))
    b = a + RNG.normal(size=a.shape)
    got = stats.rank_agreement(torch.from_numpy(a).float(), torch.from_numpy(b).float()).numpy()

    def pool(x):  # 64x96 -> 32x32 by 2x3 block means
        return x.reshape(32, 2, 32, 3).mean(axis=(1, 3)).reshape(-1)

    for k in range(3):
        ref = scipy.stats.spearmanr(pool(a[k]), pool(b[k])).statistic
        assert got[k] == pytest.approx(ref, abs=1e-5)


def test_rank_agreement_extremes_and_nan():
    a = torch.rand(2, 8, 8)
    assert torch.allclose(stats.rank_agreement(a, 3 * a**2), torch.ones(2))
    assert torch.allclose(stats.rank_agreement(a, -a), -torch.ones(2))
    const = torch.zeros(2, 8, 8)
    assert torch.isnan(stats.rank_agreement(a, const)).all()
    with pytest.raises(ValueError):
        stats.rank_agreement(a, torch.rand(2, 8, 9))


# ---- row_statistics ------------------------------------------------------------------------


def test_row_statistics_columns_and_values():
    n = 4
    sal = torch.rand(n, 16, 16)
    ig = torch.randn(n, 3, 16, 16)
    cam = torch.rand(n, 16, 16)
    cam[1] = 0.0
    result = {
        "target": torch.arange(n),
        "saliency": sal,
        "integrated_gradients": ig,
        "gradcam": cam,
        "ig_delta": torch.tensor([0.1, 0.2, 0.3, 0.4]),
        "score": torch.tensor([2.0, 2.0, 2.0, 2.0]),
        "baseline_score": torch.zeros(n),
    }
    out = stats.row_statistics(result)
    expected = {f"{m}_{s}" for m in result if m in stats.METHODS for s in stats.MAP_STATS}
    expected |= {
        "ig_rel_error",
        "agree_saliency_integrated_gradients",
        "agree_saliency_gradcam",
        "agree_integrated_gradients_gradcam",
    }
    assert set(out) == expected
    for v in out.values():
        assert v.shape == (n,) and v.dtype == torch.float32
    torch.testing.assert_close(out["integrated_gradients_gini"], stats.gini(ig.abs().sum(1)))
    torch.testing.assert_close(out["ig_rel_error"], torch.tensor([0.05, 0.1, 0.15, 0.2]))
    assert torch.isnan(out["gradcam_entropy"][1]) and torch.isnan(out["agree_saliency_gradcam"][1])


def test_row_statistics_subset():
    out = stats.row_statistics({"gradcam": torch.rand(2, 8, 8), "saliency": None})
    assert set(out) == {f"gradcam_{s}" for s in stats.MAP_STATS}
