"""Deletion and insertion against a plain per-image loop written here from the definition
(docs/conventions.md, "Faithfulness"), and on a model whose best pixel order is known."""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from xai_workers.faithfulness import curves, deletion_insertion, row_key

SIDE = 10  # 100 pixels: with K = 8 the counts 12.5 k hit halves, so the rounding rule is tested
STEPS = 8


class TinyNet(nn.Module):
    """Conv -> ReLU -> conv -> global average pool -> linear, 5 classes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(y.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TinyNet().double().eval()
    x = torch.randn(3, 3, SIDE, SIDE, dtype=torch.float64)
    baseline = torch.full((1, 3, SIDE, SIDE), -0.5, dtype=torch.float64)
    blurred = x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone() + 0.1
    maps = {
        "smooth": torch.rand(3, SIDE, SIDE, dtype=torch.float64),
        # four levels only: most pixels are tied, so the tie rule decides the order
        "tied": torch.randint(0, 4, (3, SIDE, SIDE)).double(),
    }
    maps["tied"][1] = 2.0  # a constant map ranks nothing: NaN curves for that image
    keys = [row_key("part-0.parquet", i) for i in range(3)]
    return model, x, baseline, blurred, maps, keys


def _loop_curve(model, img, target, order, baseline, start, metric):
    """One curve, one image at a time: step k replaces the first round(k/K * n) pixels of
    ``order`` (halves up) by the baseline (deletion) or puts them into ``start`` (insertion)."""
    n = SIDE * SIDE
    out = []
    for k in range(STEPS + 1):
        count = math.floor(Fraction(k * n, STEPS) + Fraction(1, 2))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[:count]] = True
        mask = mask.view(1, SIDE, SIDE)
        if metric == "deletion":
            pert = torch.where(mask, baseline, img)
        else:
            pert = torch.where(mask, img, start)
        with torch.no_grad():
            out.append(torch.softmax(model(pert[None]), dim=1)[0, target].item())
    return out


def _order(m):
    """Pixels by value, largest first; ties by index ascending (plain Python sort)."""
    flat = m.reshape(-1).tolist()
    return sorted(range(len(flat)), key=lambda i: (-flat[i], i))


def _random_order(key):
    perm = torch.randperm(SIDE * SIDE, generator=torch.Generator().manual_seed(key))
    return perm.tolist()


@pytest.mark.parametrize("topk", [False, True])
def test_curves_equal_a_per_image_loop(setup, topk):
    model, x, baseline, blurred, maps, keys = setup
    if topk:  # two targets per image, each with its own map
        targets = torch.tensor([[0, 3], [4, 1], [2, 2]])
        maps = {k: torch.stack([v, v.flip(-1)], dim=1) for k, v in maps.items()}
    else:
        targets = torch.tensor([0, 4, 2])
    got = curves(model, x, targets, maps, baseline, blurred, steps=STEPS, keys=keys, chunk_rows=5)
    assert set(got) == {(o, m) for o in ("smooth", "tied", "random") for m in METRICS_}
    tt = targets.reshape(3, -1)
    for i in range(3):
        for j in range(tt.shape[1]):
            t = int(tt[i, j])
            for metric in METRICS_:
                for name in ("smooth", "tied", "random"):
                    curve = got[(name, metric)][i, j] if topk else got[(name, metric)][i]
                    if name == "tied" and i == 1:
                        assert torch.isnan(curve).all(), "a constant map must give NaN"
                        continue
                    if name == "random":
                        order = _random_order(keys[i])
                    else:
                        m = maps[name][i, j] if topk else maps[name][i]
                        order = _order(m)
                    ref = _loop_curve(model, x[i], t, order, baseline[0], blurred[i], metric)
                    # 1e-12: float64 throughout; batching and channels_last only reorder sums
                    # (~1e-16); a wrong pixel, step count or tie moves p by > 1e-4 here
                    np.testing.assert_allclose(curve.numpy(), ref, rtol=0, atol=1e-12)
    aucs = deletion_insertion(model, x, targets, maps, baseline, blurred, steps=STEPS, keys=keys)
    for (name, metric), curve in got.items():
        ref = np.trapezoid(curve.numpy(), dx=1 / STEPS, axis=-1)
        col = aucs[f"{name}_{metric}_auc"]
        assert col.dtype == torch.float32 and col.shape == targets.shape
        # 1e-6: the column is float32 (relative rounding 6e-8 of values <= 1)
        np.testing.assert_allclose(col.numpy(), ref, rtol=0, atol=1e-6)


METRICS_ = ("deletion", "insertion")


def test_ties_and_rounding_are_what_the_loop_says(setup):
    """The tie rule and the halves-up count are visible: a map with one distinct pixel."""
    model, x, baseline, blurred, _, _ = setup
    m = torch.zeros(1, SIDE, SIDE, dtype=torch.float64)
    m[0, 9, 9] = 1.0  # pixel 99 first, then 0, 1, 2, ... (ties by index)
    got = curves(model, x[:1], torch.tensor([0]), {"m": m}, baseline, blurred[:1], steps=STEPS)
    order = [99, *range(99)]
    ref = _loop_curve(model, x[0], 0, order, baseline[0], blurred[0], "deletion")
    np.testing.assert_allclose(got[("m", "deletion")][0].numpy(), ref, rtol=0, atol=1e-12)
    # and the ends are the image, the baseline and the blurred image for every order
    with torch.no_grad():
        p = [torch.softmax(model(v), dim=1)[0, 0].item() for v in (x[:1], baseline, blurred[:1])]
    d, ins = got[("m", "deletion")][0], got[("m", "insertion")][0]
    assert d[0].item() == pytest.approx(p[0], abs=1e-12)
    assert d[-1].item() == pytest.approx(p[1], abs=1e-12)
    assert ins[0].item() == pytest.approx(p[2], abs=1e-12)
    assert ins[-1].item() == pytest.approx(p[0], abs=1e-12)


def test_chunk_size_changes_nothing(setup):
    model, x, baseline, blurred, maps, keys = setup
    targets = torch.tensor([1, 2, 3])
    runs = [
        curves(model, x, targets, maps, baseline, blurred, steps=STEPS, keys=keys, chunk_rows=c)
        for c in (1, 13, None)
    ]
    for key in runs[0]:
        for other in runs[1:]:
            # 1e-12: float64; a chunk only changes which rows share a forward pass
            torch.testing.assert_close(other[key], runs[0][key], rtol=0, atol=1e-12, equal_nan=True)


def test_forward_rows_are_shared_where_images_coincide(setup):
    """The ends (image, baseline, blurred image) run once per image (a (1, C, H, W) baseline
    once for all, the blur baseline passed as ``blurred`` once for both), the random order's
    perturbed images once per image for all its topk targets, and ends already ``known`` not at
    all: the rows forwarded are 2 N + 1 + (maps x metrics x N T + metrics x N) x (K - 1), not one
    per (order, target, step), in chunks of equal size. Sharing changes no value."""
    from xai_workers.engine import prepare_model

    model, x, baseline, blurred, maps, keys = setup
    net = prepare_model(model)
    rows = []
    handle = net.register_forward_hook(lambda m, inputs, out: rows.append(len(inputs[0])))
    targets = torch.tensor([[0, 3], [4, 1], [2, 2]])
    topk_maps = {k: v[:, None].expand(3, 2, SIDE, SIDE) for k, v in maps.items()}
    n, t, metrics = 3, 2, 2
    inside = (len(maps) * metrics * n * t + metrics * n) * (STEPS - 1)

    def run(base, blur, known=None):
        rows.clear()
        got = curves(net, x, targets, topk_maps, base, blur, steps=STEPS, keys=keys,
                     chunk_rows=7, known=known)  # fmt: skip
        return got, list(rows)

    try:
        ref, r = run(baseline, blurred)
        assert sum(r) == 2 * n + 1 + inside
        assert max(r) - min(r) <= 1 and max(r) <= 7  # equal chunks: no small rest
        # a baseline per image: one row each
        _, r = run(baseline.expand(n, -1, -1, -1).clone(), blurred)
        assert sum(r) == 3 * n + inside
        # the blur baseline passed as both: its images run once
        same, r = run(blurred, blurred)
        assert sum(r) == 2 * n + inside
        for (o, m), c in same.items():
            if m == "insertion":  # the same start image as in ref
                torch.testing.assert_close(c, ref[(o, m)], rtol=0, atol=1e-12, equal_nan=True)
        # the probabilities at x already known (the trio's pass): x is not run again
        with torch.no_grad():
            p_x = torch.softmax(model(x), dim=1).gather(1, targets)
        shared, r = run(baseline, blurred, known={"image": p_x})
        assert sum(r) == n + 1 + inside
    finally:
        handle.remove()
    for key, c in ref.items():
        # 1e-12: float64; the same probabilities from another batch
        torch.testing.assert_close(shared[key], c, rtol=0, atol=1e-12, equal_nan=True)


def test_row_bytes_are_measured_once_and_not_in_inference_mode(setup):
    """The bytes per row that size the chunks are autograd's saved activations (more than the
    row's input copies), the same when the caller is in inference mode (where autograd would
    record nothing), and measured once per prepared model and row shape."""
    from xai_workers.engine import prepare_model
    from xai_workers.faithfulness import _ROW_BYTES, _row_bytes

    model, x, *_ = setup
    net = prepare_model(model)
    _ROW_BYTES.pop(net, None)
    with torch.inference_mode():
        inside = _row_bytes(net, x[:1])
    assert inside > 3 * x[:1].numel() * x.element_size()  # activations were counted
    calls = []
    handle = net.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert _row_bytes(net, x[:1]) == inside
    finally:
        handle.remove()
    assert not calls  # remembered, not measured again
    _ROW_BYTES.pop(net, None)
    assert _row_bytes(net, x[:1]) == inside


def test_linear_model_ranked_by_w_times_x_beats_random():
    """logit_1 = w . x, logit_0 = 0: p = sigmoid(w . x). With every w * x >= 0 and the baseline
    (and the insertion start) 0, replacing the pixels of largest sum_c w * x first is the best
    order at every step, so its curve lies below (deletion) / above (insertion) any other."""
    torch.manual_seed(1)
    c, side = 3, 8
    w = torch.randn(c, side, side, dtype=torch.float64)
    x = (w.sign() * torch.rand(c, side, side, dtype=torch.float64))[None]
    w = w * (4.0 / (w * x[0]).sum())  # w . x = 4: p = 0.98, far from both 0.5 and 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1] = w.reshape(-1)
    zero = torch.zeros_like(x)
    m = (w * x[0]).abs().sum(dim=0)[None]
    got = curves(
        model, x, torch.tensor([1]), {"wx": m}, zero, zero, steps=16, keys=[row_key("a", 0)]
    )
    d, r = got[("wx", "deletion")][0], got[("random", "deletion")][0]
    # 1e-12: float64 rounding; the orders' curves differ by > 0.01 in the middle steps
    assert (d <= r + 1e-12).all()
    assert (r - d).max() > 0.05
    di, ri = got[("wx", "insertion")][0], got[("random", "insertion")][0]
    assert (di >= ri - 1e-12).all()
    aucs = deletion_insertion(
        model, x, torch.tensor([1]), {"wx": m}, zero, zero, steps=16, keys=[row_key("a", 0)]
    )
    assert aucs["wx_deletion_auc"] < aucs["random_deletion_auc"] - 0.02
    assert aucs["wx_insertion_auc"] > aucs["random_insertion_auc"] + 0.02


def test_row_key_is_blake2b_of_source_and_row():
    digest = hashlib.blake2b(b"data/part-3.parquet\n17", digest_size=8).digest()
    assert row_key("data/part-3.parquet", 17) == int.from_bytes(digest, "big") >> 1
    assert row_key("a", 1) != row_key("a", 2) != row_key("b", 1)
    assert 0 <= row_key("x", 0) < 2**63


def test_bad_settings_are_refused(setup):
    model, x, baseline, blurred, maps, _ = setup
    t = torch.tensor([0, 0, 0])
    with pytest.raises(ValueError, match="unknown faithfulness metrics"):
        curves(model, x, t, maps, baseline, blurred, metrics=("pixelflip",))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        curves(model, x, t, maps, baseline, blurred, steps=0)
    with pytest.raises(ValueError, match="keys for 3 images"):
        curves(model, x, t, maps, baseline, blurred, keys=[1])
    with pytest.raises(ValueError, match="known: keys"):
        curves(model, x, t, maps, baseline, blurred, known={"x": t.double()})
