"""ig_steps="auto": closed-form path integrals, honest estimates, reuse of every gradient, rows
that need different steps, the path trace, Captum as an oracle, the worker's columns and the
job's flags."""

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
from xai_workers.quadrature import adaptive_max_level, level_points, romberg_row
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
    # levels 0..k together are the 2^k + 1 equally spaced points, each point in one level
    pts = np.sort(np.concatenate([level_points(k) for k in range(5)]))
    np.testing.assert_array_equal(pts, np.arange(17) / 16)
    # ig_max_steps bounds the points besides a = 1 (the pass at x): level k adds up to 2^k
    assert [adaptive_max_level(m) for m in (4, 7, 8, 255, 256)] == [2, 2, 3, 7, 8]
    with pytest.raises(ValueError, match="ig_max_steps"):
        adaptive_max_level(3)
    # the Romberg row integrates x^3 (Simpson's degree) and x^5 (Boole's) exactly on [0, 1]
    for f, exact, col in ((lambda a: a**3, 0.25, 1), (lambda a: a**5, 1 / 6, 2)):
        row = None
        for k in range(3):
            a = np.arange(2**k + 1) / 2**k
            t = (f(a).sum() - (f(a[0]) + f(a[-1])) / 2) / 2**k
            row = romberg_row(k, t, row)
        assert row[col] == pytest.approx(exact, rel=1e-12)  # float64 rounding only


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
        # the trapezoid is exact for gradients linear in alpha: only float32 rounding of a few
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
    assert p == 33  # 2^5 + 1: the most points ig_max_steps=40 allows (32 besides a = 1)
    for i in range(2):
        for j in range(2):
            m = int(out["ig_steps"][i, j])
            a, f = out["ig_path_alpha"][i, j], out["ig_path_score"][i, j]
            assert torch.isnan(a[m:]).all() and torch.isnan(f[m:]).all()
            np.testing.assert_array_equal(a[:m].numpy(), np.arange(m) / (m - 1))
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
