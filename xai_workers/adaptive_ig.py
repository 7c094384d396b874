"""``ig_steps="auto"``: Integrated Gradients to an error target, each (image, target) pair
refining its own nested Clenshaw-Curtis levels (docs/conventions.md, "Adaptive Integrated
Gradients"; docs/engine.md, "Integrated Gradients to an accuracy target").

Level k is the Clenshaw-Curtis rule on the 2^k + 1 points (1 - cos(pi i / 2^k)) / 2
(``quadrature.cc_points``); it holds every point of level k - 1, so a pair refining from level k
to k + 1 computes only the 2^k points level k + 1 adds, and a = 0 and a = 1 (the pass at x) are
in every level. On a smooth integrand (SiLU, GELU networks) its error falls geometrically in the
number of points, as Gauss-Legendre's does; a trapezoid ladder with Romberg only algebraically.

The weight of a point changes from level to level, so the sweep keeps, per pair, one running sum
per level, sum_i W[k, i] g_i (``quadrature.cc_weight_table``), each gradient added to every level
that holds its point when it arrives: levels + 1 maps of the input's size per pair, never one per
point. The rows of all pairs wait in one queue and run through the sweep's chunks
(``sweep.path_chunk``: same memory budget, same input-layer shortcut), so a chunk holds the points
of whichever pairs still need them, at whatever level each is. When a pair's level is complete its
error is estimated (``_estimate``); a pair above the tolerance queues its next level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xai_workers.quadrature import cc_level_index, cc_points, cc_weight_table
from xai_workers.smoothgrad import Noisy, smoothgrad_maps
from xai_workers.sweep import Path, chunk_rows, input_transpose, make_path, path_chunk, wide

#: What ig_steps="auto" adds to the result.
AUTO_KEYS = ("ig_steps", "ig_error_est", "ig_converged", "ig_path_alpha", "ig_path_score")


@dataclass(frozen=True)
class Adaptive:
    """Settings of ``ig_steps="auto"``: stop at the first level >= ``min_level`` whose error
    estimate is <= ``tol``, or at ``max_level`` (level k has 2^k + 1 points)."""

    tol: float
    min_level: int
    max_level: int


#: The estimate is this many times the error the observed convergence predicts.
RATE_SAFETY = 2.0
#: A level difference shrinking by this factor or less per level (rho >= 1/2) is taken as it
#: is: convergence like 1/n (ReLU networks' piecewise-constant gradients), no credit.
SLOW_RATE = 0.5


def rate_factor(d: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """The factor (<= 1) applied to the last level difference d_k = ||Q_k - Q_{k-1}|| to
    estimate the error of Q_k, from d_k and d_{k-1} (each (P,)).

    rho = d_k / d_{k-1} is how fast the levels are seen to converge. A rule whose error falls by
    rho per level has error d_k rho / (1 - rho) (Richardson); the factor is ``RATE_SAFETY``
    times that, at most 1. Geometric convergence (Clenshaw-Curtis on an analytic integrand: rho
    squares from one level to the next) would earn more credit, but three levels cannot tell it
    from a pre-asymptotic dip: on a net whose gradient has a kink (error ~ 1/n^2, rho -> 1/4) the
    ratios 0.35, 0.19, 0.23 read as acceleration and that credit understated the error 1.8x
    (docs/engine.md). rho >= ``SLOW_RATE`` (1/n convergence: ReLU networks' piecewise-constant
    gradients) keeps the plain difference, which overstates such errors by a steady factor.
    """
    rho = d / d1.clamp_min(torch.finfo(d.dtype).tiny)
    factor = (RATE_SAFETY * rho / (1 - rho.clamp_max(SLOW_RATE))).clamp_max(1.0)
    return torch.where(rho >= SLOW_RATE, torch.ones_like(factor), factor)


@dataclass
class _State:
    """The mutable state of one ``ig_sweep_auto`` call, per pair P = N * K.

    ``acc[k * P + p]``: level k's Clenshaw-Curtis sum of pair p's gradients so far (the map is
    (x - x') times it), (L + 1) * P maps; ``weight`` (L + 1, 2^L + 1): the weight table and
    ``alpha`` (2^L + 1,) the points, both by index on the finest level L; ``d``: the level
    differences d_{k-1}, d_{k-2} of each pair's last finished level (2, P); ``est``, ``steps``,
    ``converged``: the answer so far; ``grid``: F at each evaluated point (the path trace);
    ``pend``: rows still to run per (pair, level); ``done``/``queued``: the last finished and the
    last queued level; the queue of rows ``q_pair``, ``q_level``, ``q_index`` (point index)."""

    path: Path
    adaptive: Adaptive
    pairs: int
    kk: int
    s_x: torch.Tensor
    acc: torch.Tensor
    weight: torch.Tensor
    alpha: torch.Tensor
    d: torch.Tensor
    est: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    base_score: torch.Tensor
    grid: torch.Tensor
    pend: torch.Tensor
    done: torch.Tensor
    queued: torch.Tensor
    q_pair: torch.Tensor
    q_level: torch.Tensor
    q_index: torch.Tensor


def _new_state(path: Path, targets, g_x, s_x, adaptive: Adaptive) -> _State:
    """The state before any row has run: a = 1 (the pass at x, ``g_x``) added to every level,
    levels 0..min_level of every pair queued."""
    x = path.x
    n, kk = targets.shape
    pairs, lmax = n * kk, adaptive.max_level
    dev, dt, long = x.device, x.dtype, torch.long
    levels = lmax + 1
    acc = torch.empty((levels * pairs, *x.shape[1:]), dtype=dt, device=dev,
                      memory_format=torch.channels_last).zero_()  # fmt: skip
    weight = torch.as_tensor(cc_weight_table(lmax), dtype=dt, device=dev)
    g1 = torch.stack(g_x, dim=1).reshape(pairs, *x.shape[1:])  # a = 1: the pass at x
    for k in range(levels):
        acc[k * pairs : (k + 1) * pairs] += weight[k, -1] * g1
    st = _State(
        path=path, adaptive=adaptive, pairs=pairs, kk=kk, s_x=s_x.detach().reshape(-1), acc=acc,
        weight=weight, alpha=torch.as_tensor(cc_points(lmax), dtype=dt, device=dev),
        d=torch.full((2, pairs), float("inf"), dtype=dt, device=dev),
        est=torch.full((pairs,), float("inf"), dtype=dt, device=dev),
        steps=torch.zeros(pairs, dtype=torch.int32, device=dev),
        converged=torch.zeros(pairs, dtype=torch.bool, device=dev),
        base_score=torch.zeros(pairs, dtype=dt, device=dev),
        grid=torch.full((pairs, 2**lmax + 1), float("nan"), dtype=dt, device=dev),
        pend=torch.zeros((pairs, lmax + 2), dtype=long, device=dev),
        done=torch.full((pairs,), -1, dtype=long, device=dev),
        queued=torch.full((pairs,), adaptive.min_level, dtype=long, device=dev),
        q_pair=torch.zeros(0, dtype=long, device=dev),
        q_level=torch.zeros(0, dtype=long, device=dev),
        q_index=torch.zeros(0, dtype=long, device=dev),
    )  # fmt: skip
    st.grid[:, -1] = st.s_x
    _enqueue(st, torch.arange(pairs, device=dev), range(adaptive.min_level + 1))
    return st


def _enqueue(st: _State, p: torch.Tensor, levels: range) -> None:
    """Queue the rows (pair, level, point index) of ``levels`` for the pairs p; level 0 runs
    a = 0 only (a = 1 is the pass at x)."""
    dev, lmax = st.path.x.device, st.adaptive.max_level
    parts = [(k, cc_level_index(k, lmax)) for k in levels]
    parts = [(k, ix[:1] if k == 0 else ix) for k, ix in parts]
    idx = torch.as_tensor([i for _, ix in parts for i in ix], dtype=torch.long, device=dev)
    lev = torch.as_tensor([k for k, ix in parts for _ in ix], dtype=torch.long, device=dev)
    for k, ix in parts:
        st.pend[p, k] += len(ix)
    st.q_pair = torch.cat([st.q_pair, p.repeat_interleave(len(idx))])
    st.q_level = torch.cat([st.q_level, lev.repeat(len(p))])
    st.q_index = torch.cat([st.q_index, idx.repeat(len(p))])
    st.queued[p] = levels[-1]


def _level_map(st: _State, p: torch.Tensor, k) -> torch.Tensor:
    """Level k's IG maps (P, C, H, W) of the pairs p (k: an int or a (P,) tensor of levels)."""
    return st.path.diff[p // st.kk] * st.acc[k * st.pairs + p]


def _estimate(st: _State, p: torch.Tensor, k: int, q: torch.Tensor) -> torch.Tensor:
    """The error estimate (P,) of level k's maps q (P, C, H, W) of the pairs p: the relative
    level difference ||Q_k - Q_{k-1}|| / ||Q_k|| (times ``rate_factor`` from level 3), maxed
    with the completeness error in the map's own units, |sum(IG) - (F(x) - F(x'))| / sum|IG|."""
    tiny = torch.finfo(q.dtype).tiny
    flat = q.reshape(len(p), -1)
    if k == 0:
        d = torch.full((len(p),), float("inf"), dtype=q.dtype, device=q.device)
    else:
        d = (q - _level_map(st, p, k - 1)).reshape(len(p), -1).norm(dim=1)
    rel = d / flat.norm(dim=1).clamp_min(tiny)
    if k >= 3:
        rel = rel * rate_factor(d, st.d[0, p])
    st.d[1, p], st.d[0, p] = st.d[0, p], d
    gap = st.s_x[p] - st.base_score[p]
    compl = (flat.sum(dim=1) - gap).abs() / flat.abs().sum(dim=1).clamp_min(tiny)
    return torch.maximum(rel, compl)


def _finish(st: _State, p: torch.Tensor, k: int) -> None:
    """Level k of the pairs p is complete: its estimate; stop, or queue level k + 1."""
    ad = st.adaptive
    e = _estimate(st, p, k, _level_map(st, p, k))
    st.est[p], st.steps[p], st.done[p] = e, 2**k + 1, k
    if k < ad.min_level:
        return
    conv = e <= ad.tol
    st.converged[p] = conv
    more = p[~conv] if k < ad.max_level else p[:0]
    if len(more):
        _enqueue(st, more, range(k + 1, k + 2))


def _take(st: _State, first, pair, level, index, s, g, g_z) -> None:
    """Record a chunk's path rows: each gradient added, with its weight, to every level of its
    pair that holds its point (z-gradients at the input layer mapped back with L^T per (level,
    pair) or per row, whichever is fewer), F(x') from a = 0, the path trace, the rows pending."""
    pairs, x, lmax = st.pairs, st.path.x, st.adaptive.max_level
    dtype, dev = x.dtype, x.device
    lev = torch.arange(lmax + 1, device=dev)
    holds = lev[:, None] >= level[None, :]  # (L + 1, R): level j holds row i's point
    key = (lev[:, None] * pairs + pair[None, :])[holds]
    keys, inv = torch.unique(key, return_inverse=True)
    cols = torch.arange(len(pair), device=dev).expand(lmax + 1, -1)[holds]
    mix = torch.zeros(len(keys), len(pair), dtype=dtype, device=dev)
    mix[inv, cols] = st.weight[:, index].expand(lmax + 1, -1)[holds]
    summed = None
    if g_z is not None:
        gz = wide(g_z)
        if len(keys) <= len(pair):  # L^T per (level, pair)
            gz = (mix @ gz.reshape(len(pair), -1)).reshape(len(keys), *g_z.shape[1:])
            summed = input_transpose(first, gz.contiguous(memory_format=torch.channels_last),
                                     x.shape[1:])  # fmt: skip
        else:  # L^T per row
            rows = input_transpose(first, gz, x.shape[1:]).reshape(len(pair), -1)
            summed = (mix @ rows).reshape(len(keys), *x.shape[1:])
    if g is not None:
        gs = (mix @ wide(g).reshape(len(pair), -1)).reshape(len(keys), *x.shape[1:])
        summed = gs if summed is None else summed + gs
    st.acc.index_add_(0, keys, summed.to(dtype))
    sd = s.detach().to(dtype)
    zero = index == 0
    st.base_score[pair[zero]] = sd[zero]
    st.grid[pair, index] = sd
    st.pend.index_put_((pair, level), torch.full_like(pair, -1), accumulate=True)


def _finish_ready_levels(st: _State) -> None:
    """Finish every level now complete, in level order."""
    while True:
        nxt = st.done + 1
        ready = (nxt <= st.queued) & (st.pend.gather(1, nxt[:, None])[:, 0] == 0)
        if not ready.any():
            return
        k = int(nxt[ready].min())
        _finish(st, torch.nonzero(ready & (nxt == k)).reshape(-1), k)


def _trace(st: _State) -> tuple[torch.Tensor, torch.Tensor]:
    """The path trace: each pair's evaluated points in alpha order and F there, (P, 2^L + 1)
    each, the first ``steps`` entries valid, the rest NaN."""
    lmax = st.adaptive.max_level
    idx = torch.arange(2**lmax + 1, device=st.grid.device)
    stride = 2 ** (lmax - st.done)  # (pairs,)
    pos = (idx[None] * stride[:, None]).clamp_max(2**lmax)
    valid = idx[None] < st.steps[:, None]
    alphas = torch.where(valid, st.alpha[pos], math.nan)
    return alphas, torch.where(valid, st.grid.gather(1, pos), math.nan)


def ig_sweep_auto(
    net, x, targets, baseline, score, g_x, s_x, adaptive: Adaptive, budget_mb, per_row_bytes,
    autocast, noisy: Noisy | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """IG for every (image, target) pair to an error target (module docstring).

    SmoothGrad's noisy rows (``noisy``) fill the chunks the queue leaves part empty (while the
    next levels wait for the current ones to finish) and run after it drains; with
    ``noisy.apart`` a chunk holds path points or noisy rows, never both.

    Returns integrated_gradients (N, K, C, H, W), baseline_score (N, K), ig_steps (N, K) int32,
    ig_error_est (N, K), ig_converged (N, K) bool, ig_path_alpha and ig_path_score
    (N, K, 2^max_level + 1), the first ig_steps entries of a row valid, the rest NaN; with
    ``noisy`` also smoothgrad, smoothgrad_sq, vargrad (N, K, H, W).
    """
    path = make_path(net, x, baseline)
    st = _new_state(path, targets, g_x, s_x, adaptive)
    chunk, first = chunk_rows(budget_mb, per_row_bytes, x.device), path.first
    samples = 0 if noisy is None else noisy.noise.shape[1]
    noisy_rows, nhead, head = st.pairs * samples, 0, 0
    while head < len(st.q_pair) or nhead < noisy_rows:
        pair, level = st.q_pair[head : head + chunk], st.q_level[head : head + chunk]
        index = st.q_index[head : head + chunk]
        head += len(pair)
        fill = 0 if (len(pair) and noisy is not None and noisy.apart) else chunk - len(pair)
        q = torch.arange(nhead, min(noisy_rows, nhead + fill), device=x.device)
        nhead += len(q)  # SmoothGrad's rows (pair, sample), in fp32
        alpha = st.alpha[index].view(-1, 1, 1, 1)
        s, g, g_z, first = path_chunk(net, path, first, pair, alpha, targets, score, autocast,
                                      noisy, q)  # fmt: skip
        if len(pair):
            _take(st, first, pair, level, index, s, g, g_z)
            _finish_ready_levels(st)
    alphas, trace = _trace(st)
    all_pairs = torch.arange(st.pairs, device=x.device)
    ig_map = _level_map(st, all_pairs, st.done)
    lead, out = targets.shape, {}
    if samples:
        out = smoothgrad_maps(noisy.sums, samples, (*lead, *x.shape[-2:]))
    return out | {
        "integrated_gradients": ig_map.reshape(*lead, *x.shape[1:]).contiguous(),
        "baseline_score": st.base_score.view(lead),
        "ig_steps": st.steps.view(lead),
        "ig_error_est": st.est.float().view(lead),
        "ig_converged": st.converged.view(lead),
        "ig_path_alpha": alphas.float().view(*lead, -1),
        "ig_path_score": trace.float().view(*lead, -1),
    }
