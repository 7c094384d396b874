"""ig_steps="auto": closed-form path integrals, honest estimates, reuse of every gradient, rows
that need different steps, the path trace, Captum as an oracle, fewer evaluations than the
trapezoid-Romberg rule it replaced on a smooth net, the worker's columns and the job's flags."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from captum.attr import IntegratedGradients
from rowcheck import assert_maps_close
from torch import nn

from xai_workers import schema as S
from xai_workers.demo import DEMO_MEAN, DEMO_STD, DemoNet
from xai_workers.engine import attribute, make_baseline, prepare_model
from xai_workers.quadrature import adaptive_max_level, cc_level_index, cc_points, cc_weights
from xai_workers.worker import AttributionWorker

SHAPE = (3, 8, 8)
IG = ("integrated_gradients",)


class Separable(nn.Module):
    """F_0(x) = sum_i v_i f(x_i - c_i), F_1 = -F_0: the IG of class 0 is exactly
    v_i (f(x_i - c_i) - f(x'_i - c_i)) (each term depends on one input only)."""

    def __init__(self, f, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = int(np.prod(SHAPE))
        self.f = f
        self.register_buffer("v", torch.randn(n, generator=g, dtype=torch.float64))
        self.register_buffer("c", torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1)

    def forward(self, x):
        s = (self.f(x.flatten(1) - self.c.to(x.dtype)) * self.v.to(x.dtype)).sum(dim=1)
        return torch.stack([s, -s], dim=1)

    def exact_ig(self, x, base):
        d = self.f(x.flatten(1).double() - self.c) - self.f(base.flatten(1).double() - self.c)
        return (d * self.v).reshape(x.shape)


FUNCTIONS = {
    "linear": lambda t: t,
    "quadratic": lambda t: t * t,
    "relu": torch.relu,  # piecewise-constant gradient: the integrand of ReLU networks
    "steep_tanh": lambda t: torch.tanh(6 * t),  # smooth, but needs many points
}


def _images(n, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *SHAPE, generator=g) * 2 - 1) * scale


def _rel(a, b) -> np.ndarray:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).numpy()


def test_quadrature_levels():
    # Clenshaw-Curtis levels nest: levels 0..k together are the 2^k + 1 points of level k, each
    # point in one level (so every gradient is computed once)
    for k in range(5):
        idx = np.sort(np.concatenate([cc_level_index(j, k) for j in range(k + 1)]))
        np.testing.assert_array_equal(idx, np.arange(2**k + 1))
        np.testing.assert_allclose(cc_points(4)[:: 2 ** (4 - k)], cc_points(k), rtol=0, atol=1e-15)
    # ig_max_steps bounds the points besides a = 1 (the pass at x): level k adds up to 2^k
    assert [adaptive_max_level(m) for m in (4, 7, 8, 255, 256)] == [2, 2, 3, 7, 8]
    with pytest.raises(ValueError, match="ig_max_steps"):
        adaptive_max_level(3)
    # level k integrates a^d exactly on [0, 1] for d <= 2^k + 1 (the interpolating polynomial's
    # degree, + 1 by symmetry), with positive weights summing to 1; a wrong weight is O(1e-2)
    for k in range(1, 6):
        a, w = cc_points(k), cc_weights(k)
        assert (w > 0).all() and w.sum() == pytest.approx(1, rel=1e-14)
        for d in range(2**k + 2):
            assert (w * a**d).sum() == pytest.approx(1 / (d + 1), rel=1e-12)  # float64 rounding


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_closed_form_models_converge_to_the_exact_integral(name):
    model = Separable(FUNCTIONS[name]).eval()
    x, base = _images(4), torch.full((1, *SHAPE), -0.2)
    tol = 0.01
    out = attribute(model, x, target=0, methods=IG, baseline=base, ig_steps="auto", ig_tol=tol)
    true = _rel(out["integrated_gradients"], model.exact_ig(x, base.expand_as(x)))
    est = out["ig_error_est"].numpy()
    assert out["ig_converged"].all()
    assert (est <= tol).all()
    if name in ("linear", "quadratic"):
        # Clenshaw-Curtis is exact for gradients linear in alpha: only float32 rounding of a few
        # hundred terms is left (a wrong weight or level sum would be O(1))
        assert (true < 1e-5).all() and (out["ig_steps"] == 5).all()
    else:
        assert (true <= tol).all()
        # the estimate does not understate the true error (on this ReLU integrand the ratio is
        # about 0.6: theory 1/sqrt(3) for many jumps; a Richardson-scaled estimate would fail)
        assert (true <= est).all(), (true, est)
        assert (out["ig_steps"] > 9).all()  # these integrands need refinement


def test_cap_reached_is_reported_not_converged():
    model = Separable(FUNCTIONS["relu"]).eval()
    x, base = _images(2), torch.full((1, *SHAPE), -0.2)
    out = attribute(
        model, x, target=0, methods=IG, baseline=base, ig_steps="auto", ig_tol=1e-4, ig_max_steps=15
    )
    # the finest level ig_max_steps=15 allows: Clenshaw-Curtis level 3, 9 points (this integrand,
    # one jump per pixel, stays on Clenshaw-Curtis: d_2 / d_1 < 1/2)
    assert (out["ig_steps"] == 9).all() and not out["ig_converged"].any()
    true = _rel(out["integrated_gradients"], model.exact_ig(x, base.expand_as(x)))
    assert (out["ig_error_est"].numpy() > 1e-4).all() and (
        true <= out["ig_error_est"].numpy()
    ).all()


def _count_rows(net: nn.Module, layer: nn.Module):
    seen = {"rows": 0}

    def hook(m, inputs, output):
        seen["rows"] += inputs[0].shape[0]

    return seen, layer.register_forward_hook(hook)


@pytest.mark.parametrize("kind", ["demo_net", "separable"])
def test_every_gradient_is_computed_once(kind):
    # rows through the model's last layer = the pass at x (one per image) + one per path point
    # other than a = 1 (the pass at x): no point is evaluated twice across levels
    torch.manual_seed(0)
    if kind == "demo_net":
        net = prepare_model(DemoNet().eval())  # its first conv takes the input-layer shortcut
        last = net.fc
        base = torch.full((1, *SHAPE), -1.0)
        x = torch.cat([_images(2, scale=3.0), base + _images(2, seed=2, scale=1e-3)])
    else:
        net = prepare_model(Separable(FUNCTIONS["steep_tanh"]).eval())
        last = net  # the whole model
        base = torch.zeros((1, *SHAPE))
        x = torch.cat([_images(2), _images(2, seed=2, scale=0.01)])
    seen, handle = _count_rows(net, last)
    try:
        out = attribute(
            net, x, target=0, methods=IG, baseline=base, ig_steps="auto", batch_budget_mb=0.5
        )
    finally:
        handle.remove()
    steps = out["ig_steps"].numpy()
    assert len(set(steps.tolist())) > 1  # rows at different levels shared the sweep
    assert seen["rows"] == len(x) + int((steps - 1).sum())


def test_rows_needing_different_steps_match_each_row_alone():
    model = Separable(FUNCTIONS["relu"]).double().eval()
    base = torch.full((1, *SHAPE), -0.2, dtype=torch.float64)
    near = base + _images(1, scale=1e-3)  # crosses (almost) no ReLU threshold: 5 points do
    x = torch.cat([near, _images(2, seed=3), _images(1, seed=4, scale=0.3)]).double()
    kw = dict(
        target=0, methods=IG, baseline=base, ig_steps="auto", ig_tol=3e-3, batch_budget_mb=0.02
    )
    batch = attribute(model, x, **kw)
    assert batch["ig_steps"].max() >= 4 * batch["ig_steps"].min(), batch["ig_steps"]
    for i in range(len(x)):
        alone = attribute(model, x[i : i + 1], **kw)
        for key in ("ig_steps", "ig_converged"):
            assert torch.equal(alone[key][0], batch[key][i])
        # float64: only the order of the sums differs with the chunks (1e-12 is ~1e4 ulps)
        torch.testing.assert_close(
            alone["integrated_gradients"][0], batch["integrated_gradients"][i], rtol=1e-12, atol=0
        )
        torch.testing.assert_close(alone["ig_error_est"][0], batch["ig_error_est"][i])


def test_path_trace_and_topk():
    torch.manual_seed(0)
    net = DemoNet().eval()
    x = _images(2) * 2
    out = attribute(net, x, target="topk:2", ig_steps="auto", ig_max_steps=40)
    assert out["ig_steps"].shape == (2, 2) and out["integrated_gradients"].shape == (2, 2, *SHAPE)
    p = out["ig_path_alpha"].shape[-1]
    # 2^5 + 1: the most points ig_max_steps=40 allows (32 besides a = 1), + 2 on the trapezoid
    # ladder (the points of Clenshaw-Curtis level 2 it ran before moving)
    assert p == 35
    for i in range(2):
        for j in range(2):
            m = int(out["ig_steps"][i, j])
            a, f = out["ig_path_alpha"][i, j], out["ig_path_score"][i, j]
            assert torch.isnan(a[m:]).all() and torch.isnan(f[m:]).all()
            k = int(np.log2(m - 1))
            if m == 2**k + 1:  # a Clenshaw-Curtis level
                expect = cc_points(k)
            else:  # the trapezoid ladder: j / 2^k' and Clenshaw-Curtis level 2's two points
                expect = np.arange(m - 2) / (m - 3)
                expect = np.sort(np.concatenate([expect, cc_points(2)[[1, 3]]]))
            np.testing.assert_allclose(a[:m].numpy(), expect, rtol=0, atol=1e-7)  # float32
            # F at the trace's points, recomputed by a plain forward (float32 sums differ)
            path = a[:m, None, None, None] * x[i]
            direct = net(path)[:, int(out["target"][i, j])].detach()
            torch.testing.assert_close(f[:m], direct, rtol=1e-4, atol=1e-5)
            assert f[m - 1] == pytest.approx(float(out["score"][i, j]), rel=1e-5, abs=1e-6)
            assert f[0] == pytest.approx(float(out["baseline_score"][i, j]), rel=1e-5, abs=1e-6)


def test_agrees_with_captum_on_a_smooth_net():
    torch.manual_seed(0)
    net = DemoNet().eval()
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.ReLU):
            net.set_submodule(name, nn.SiLU())
    net = net.double()
    x = _images(3).double() * 2
    tol = 1e-3
    ours = attribute(net, x, methods=IG, ig_steps="auto", ig_tol=tol)
    ref = IntegratedGradients(net).attribute(
        x, baselines=torch.zeros_like(x), target=ours["target"], n_steps=128
    )  # Gauss-Legendre 128 on a smooth net: exact to far below tol
    true = _rel(ours["integrated_gradients"], ref)
    assert ours["ig_converged"].all() and (true <= tol).all()
    assert (true <= ours["ig_error_est"].numpy()).all()
    assert (ours["ig_steps"] <= 17).all()  # smooth integrand: few points


def test_trapezoid_ladder(monkeypatch):
    """A pair converging like 1/n at Clenshaw-Curtis level 2 (ReLU networks) moves to the
    trapezoid ladder: here every pair is sent there (the switch's threshold set to 0), and the
    trapezoid on a ReLU integrand still meets the tolerance against the exact integral, with an
    estimate that does not understate it, each gradient computed once."""
    from xai_workers import adaptive_ig

    monkeypatch.setattr(adaptive_ig, "SWITCH_RATE", 0.0)
    model = prepare_model(Separable(FUNCTIONS["relu"]).eval())
    x, base = _images(4), torch.full((1, *SHAPE), -0.2)
    seen, handle = _count_rows(model, model)
    try:
        out = attribute(model, x, target=0, methods=IG, baseline=base, ig_steps="auto",
                        ig_tol=0.01, batch_budget_mb=0.05)  # fmt: skip
    finally:
        handle.remove()
    true = _rel(out["integrated_gradients"], model.exact_ig(x, base.expand_as(x)))
    est, steps = out["ig_error_est"].numpy(), out["ig_steps"].numpy()
    assert out["ig_converged"].all() and (true <= est).all() and (est <= 0.01).all()
    # 2^j + 1 equally spaced points and the 2 of Clenshaw-Curtis level 2
    assert all(int(np.log2(m - 3)) == np.log2(m - 3) for m in steps), steps
    assert seen["rows"] == len(x) + int((steps - 1).sum())
    for i, m in enumerate(steps):
        expect = np.sort(np.concatenate([np.arange(m - 2) / (m - 3), cc_points(2)[[1, 3]]]))
        np.testing.assert_allclose(out["ig_path_alpha"][i, :m], expect, rtol=0, atol=1e-7)


def _old_rule_steps(net, x, target, tol, levels=6) -> np.ndarray:
    """The evaluations the rule this one replaced (nested trapezoid levels with Romberg columns
    T, S, B; issue 11) spends per row, from float64 gradients at the 2^levels + 1 points j / 2^L:
    per level the smallest over the columns of the relative level difference (from level 3 times
    min(1, 2 rho / (1 - rho)), rho = min(1/2, max(the last two ratios, 1/4, 1/16, 1/64)), maxed
    with the completeness error; stop at the first level >= 2 at or under tol."""
    a = torch.linspace(0, 1, 2**levels + 1, dtype=torch.float64)
    out = []
    for i in range(len(x)):
        inp = (a.view(-1, 1, 1, 1) * x[i]).requires_grad_(True)
        s = net(inp)[:, int(target[i])]
        (g,) = torch.autograd.grad(s.sum(), inp)
        gap = float((s[-1] - s[0]).detach())
        prev, d = None, []
        for k in range(levels + 1):
            gk = g[:: 2 ** (levels - k)]
            t = x[i] * (gk.sum(0) - (gk[0] + gk[-1]) / 2) / 2**k
            row = (t, t, t) if k == 0 else (t, (4 * t - prev[0]) / 3, None)
            if k:
                row = (row[0], row[1], row[1] if k == 1 else (16 * row[1] - prev[1]) / 15)
            pairs = zip(row, prev or row, strict=True)
            dk = [float((q - p).norm()) if k else np.inf for q, p in pairs]
            d.append(dk)
            est = []
            for c, (q, floor) in enumerate(zip(row, (1 / 4, 1 / 16, 1 / 64), strict=True)):
                e = dk[c] / float(q.norm())
                if k >= 3:
                    rho = min(0.5, max(dk[c] / d[k - 1][c], d[k - 1][c] / d[k - 2][c], floor))
                    e *= min(1.0, 2 * rho / (1 - rho))
                est.append(max(e, abs(float(q.sum()) - gap) / float(q.abs().sum())))
            prev = row
            if k >= 2 and (min(est) <= tol or k == levels):
                out.append(2**k + 1)
                break
    return np.array(out)


def test_fewer_evaluations_than_the_trapezoid_rule_on_a_smooth_net():
    """On a smooth integrand that needs refinement (steep tanh) the Clenshaw-Curtis levels meet
    the tolerance against the exact integral (float64), with an estimate that does not
    understate the error, and spend fewer gradient evaluations than the trapezoid-Romberg rule
    they replaced (the trained SiLU CNN: docs/engine.md)."""
    model = Separable(FUNCTIONS["steep_tanh"]).double().eval()
    x = _images(6, seed=5).double()
    tol = 1e-3
    ours = attribute(model, x, target=0, methods=IG, ig_steps="auto", ig_tol=tol)
    true = _rel(ours["integrated_gradients"], model.exact_ig(x, torch.zeros_like(x)))
    assert ours["ig_converged"].all() and (true <= tol).all()
    assert (true <= ours["ig_error_est"].numpy()).all()
    old = _old_rule_steps(model, x, [0] * len(x), tol)
    new = ours["ig_steps"].numpy()
    assert new.mean() < old.mean(), (new, old)  # 22.3 against 33 (this rule: 17 and 33 points)


def test_bad_settings():
    model, x = Separable(FUNCTIONS["linear"]), _images(1)
    for kw, msg in (
        (dict(ig_steps="many"), "ig_steps"),
        (dict(ig_steps="auto", ig_tol=0), "ig_tol"),
        (dict(ig_steps="auto", ig_max_steps=3), "ig_max_steps"),
    ):
        with pytest.raises(ValueError, match=msg):
            attribute(model, x, methods=IG, **kw)


def test_worker_columns():
    torch.manual_seed(0)
    w = AttributionWorker(
        DemoNet().eval(), image_size=32, mean=DEMO_MEAN, std=DEMO_STD, ig_steps="auto",
        ig_max_steps=33, batch_size=2, methods=("saliency", "integrated_gradients"),
        store="full",  # float32 maps at full size: compared with the engine's below
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 3, 32, 32, generator=g) * 2 - 1).numpy()
    batch = pa.table(
        {
            "id": pa.array(["a", "b", "c"]),
            "x": S.tensor_array(x),
            "error": pa.array([None, "bad image", None], type=pa.string()),
            "source": pa.array(["s"] * 3),
            "source_row": pa.array([0, 1, 2], type=pa.int64()),
        }
    )
    out = w(batch)
    assert out.schema.equals(w.schema)
    assert out.schema.field("ig_steps").type == pa.int32()
    assert out.schema.field("ig_error_est").type == pa.float32()
    assert out.schema.field("ig_converged").type == pa.bool_()
    assert out.schema.field("ig_path").type == S.IG_PATH_TYPE
    steps, paths = out["ig_steps"].to_pylist(), out["ig_path"].to_pylist()
    assert steps[1] is None and paths[1] is None and out["ig_converged"][1].as_py() is None
    for i in (0, 2):
        assert len(paths[i]["alpha"]) == len(paths[i]["score"]) == steps[i]
        assert paths[i]["alpha"][0] == 0 and paths[i]["alpha"][-1] == 1
        assert paths[i]["score"][-1] == pytest.approx(out["score"][i].as_py(), rel=1e-6)
    # the summary: distribution of the steps, share converged, the estimate (error rows left out)
    from xai_audit.report import _adaptive_ig_items
    from xai_workers.summary import Summary

    summary = Summary().update(out).to_table().to_pylist()[0]  # group "all"
    ok_steps = np.array([steps[0], steps[2]], dtype=float)
    assert summary["ig_steps_mean"] == pytest.approx(ok_steps.mean())
    conv = [out["ig_converged"][i].as_py() for i in (0, 2)]
    assert summary["ig_converged_mean"] == pytest.approx(np.mean(conv))
    est = [out["ig_error_est"][i].as_py() for i in (0, 2)]
    assert summary["ig_error_est_mean"] == pytest.approx(np.mean(est), rel=1e-6)
    text = "".join(_adaptive_ig_items(summary))
    assert "IG error estimate" in text and "IG steps per image" in text
    # the same numbers as the engine on the same rows (the worker adds no arithmetic)
    ref = attribute(
        w.net, torch.from_numpy(x[[0, 2]]), methods=w.methods, ig_steps="auto", ig_max_steps=33,
        baseline=make_baseline(torch.from_numpy(x[[0, 2]]), "black", w.preprocessing),
    )  # fmt: skip
    assert out["ig_steps"].to_pylist()[::2] == ref["ig_steps"].tolist()
    # batches of 2 vs 1 row + 1 row: float32 summation order only (tests/rowcheck.py)
    assert_maps_close(
        S.tensor_to_numpy(out["integrated_gradients"])[[0, 2]],
        ref["integrated_gradients"].numpy(),
        "integrated_gradients",
    )


def test_job_flags():
    from xai_audit.cli import build_parser, config_from_args
    from xai_audit.config import ConfigError, JobConfig

    ns = build_parser().parse_args(
        ["run", "--input", "i", "--output", "o", "--model", "m", "--ig-steps", "auto",
         "--ig-tol", "0.02", "--ig-max-steps", "64"]
    )  # fmt: skip
    cfg = config_from_args(ns)
    assert (cfg.ig_steps, cfg.ig_tol, cfg.ig_max_steps) == ("auto", 0.02, 64)
    cfg.validate()
    assert cfg.result_settings()["ig_tol"] == 0.02
    assert "ig_tol" not in JobConfig(input="i", output="o", model="m").result_settings()
    for data, msg in (
        ({"ig_steps": "auto", "ig_tol": 1.5}, "--ig-tol"),
        ({"ig_steps": "auto", "ig_max_steps": 3}, "--ig-max-steps"),
        ({"ig_steps": 0}, "--ig-steps"),
    ):
        with pytest.raises(ConfigError, match=msg):
            JobConfig.from_mapping({"input": "i", "output": "o", "model": "m", **data}).validate()


def test_bf16_rows_above_the_tolerance_are_redone_in_fp32():
    # precision="auto" does this on CUDA only; the same two steps run here on a CPU
    from xai_workers.engine import _Adaptive, _redo_inexact_rows_in_fp32, _run

    torch.manual_seed(0)
    net = prepare_model(DemoNet().eval())
    x = torch.cat([_images(2, scale=2.0), torch.full((1, *SHAPE), -1.0) + _images(1, scale=1e-3)])
    base = torch.full((1, *SHAPE), -1.0)
    kwargs = dict(
        target=None, methods=IG, alphas=np.array([0.0, 1.0]), weights=np.array([0.5, 0.5]),
        baseline=base, layer=None, score="logit", saliency_mode="abs", saliency_channels=False,
        budget_mb=None, adaptive=_Adaptive(0.02, 2, 5),
    )  # fmt: skip
    with torch.enable_grad():
        out = _run(net, x, bf16=True, **kwargs)
        fp32 = _run(net, x, bf16=False, **kwargs)
        redo = out["ig_error_est"] > 0.02
        assert redo.any()
        kept = {k: v[~redo].clone() for k, v in out.items()}
        _redo_inexact_rows_in_fp32(net, x, out, kwargs)
    for key in ("integrated_gradients", "ig_steps", "ig_error_est"):
        # the redone rows are the fp32 computation of those rows alone (float32 sum order only)
        torch.testing.assert_close(out[key][redo], fp32[key][redo], rtol=1e-5, atol=1e-6)
        assert torch.equal(out[key][~redo], kept[key])
