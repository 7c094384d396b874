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

import numpy as np
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
#: The trapezoid ladder's fastest rate per level (Euler-Maclaurin: the error falls 4x per
#: halving of the spacing on a smooth integrand): no more credit than that.
TRAPEZOID_RATE = 0.25
#: The Clenshaw-Curtis level at which a slowly converging pair moves to the trapezoid ladder,
#: and the rate d_2 / d_1 from which it does (measured: 0.54-0.72 on a trained ReLU CNN, at
#: most 0.24 on the SiLU one and 0.38 on the GELU one; docs/engine.md).
SWITCH_LEVEL = 2
SWITCH_RATE = 0.5


def rate_factor(d: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """The factor (<= 1) applied to the last Clenshaw-Curtis level difference
    d_k = ||Q_k - Q_{k-1}|| to estimate the error of Q_k, from d_k and d_{k-1} (each (P,)).

    rho = min(1/2, d_k / d_{k-1}) is how fast the levels are seen to converge. A rule whose
    error falls by rho per level has error d_k rho / (1 - rho) (Richardson); the factor is
    ``RATE_SAFETY`` times that, at most 1, so only levels seen converging faster than 1/3 per
    level get credit. Geometric convergence (Clenshaw-Curtis on an analytic integrand: rho
    squares from one level to the next) would earn more, but three levels cannot tell it from a
    pre-asymptotic dip: on a net whose gradient has a kink (error ~ 1/n^2) the ratios 0.35, 0.19
    read as acceleration, and that credit understated the error 2.5x (docs/engine.md).
    """
    rho = (d / d1.clamp_min(torch.finfo(d.dtype).tiny)).clamp_max(SLOW_RATE)
    return (RATE_SAFETY * rho / (1 - rho)).clamp_max(1.0)


def trapezoid_rate_factor(d: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """The same for the trapezoid ladder, from d_k, d_{k-1}, d_{k-2} (each (P,)): rho =
    max(d_k / d_{k-1}, d_{k-1} / d_{k-2}, ``TRAPEZOID_RATE``), at most 1/2; factor
    min(1, ``RATE_SAFETY`` rho / (1 - rho)). A ladder converging like 1/n (rho about 1/2) keeps
    the plain difference, which overstates its error by a steady factor: true / estimate =
    0.5-0.8 on ReLU nets, theory 1/sqrt(3) for many jumps (docs/engine.md)."""
    tiny = torch.finfo(d.dtype).tiny
    rho = torch.maximum(d / d1.clamp_min(tiny), d1 / d2.clamp_min(tiny))
    rho = rho.clamp(TRAPEZOID_RATE, SLOW_RATE)
    return (RATE_SAFETY * rho / (1 - rho)).clamp_max(1.0)


@dataclass
class _State:
    """The mutable state of one ``ig_sweep_auto`` call, per pair P = N * K.

    ``acc[k * P + p]``: level k's Clenshaw-Curtis sum of pair p's gradients so far (the map is
    (x - x') times it), (L + 1) * P maps. A pair on the trapezoid ladder (``trap``) uses two of
    its slots: level 2's for its last trapezoid value T, level 3's for the sum of the gradients
    at the points its current level adds. ``weight`` (L + 1, 2^L + 1): the weight table by
    point index on the finest level L, ``alpha`` (2^L + 1,) those points. ``d``: the level
    differences d_{k-1}, d_{k-2} of each pair's last finished level (2, P); ``est``, ``steps``,
    ``converged``: the answer so far; ``trace_a``, ``trace_s``, ``ntrace``: the evaluated points
    and F there, in the order they ran; ``pend``: rows still to run per (pair, level);
    ``done``/``queued``: the last finished and the last queued level (on the trapezoid ladder
    level k >= 3 is its dyadic level k - 1); the queue of rows ``q_pair``, ``q_level``,
    ``q_index`` (a point index; on the trapezoid ladder, of the 2^L + 1 equally spaced points)
    and ``q_trap``."""

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
    trap: torch.Tensor
    base_score: torch.Tensor
    trace_a: torch.Tensor
    trace_s: torch.Tensor
    ntrace: torch.Tensor
    pend: torch.Tensor
    done: torch.Tensor
    queued: torch.Tensor
    q_pair: torch.Tensor
    q_level: torch.Tensor
    q_index: torch.Tensor
    q_trap: torch.Tensor


def trace_length(max_level: int) -> int:
    """The most points a pair can evaluate: 2^L + 1, or on the trapezoid ladder those and the
    2 points Clenshaw-Curtis level 2 added before the switch."""
    return 2**max_level + 3 if max_level > SWITCH_LEVEL else 2**max_level + 1


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
    npts = trace_length(lmax)
    st = _State(
        path=path, adaptive=adaptive, pairs=pairs, kk=kk, s_x=s_x.detach().reshape(-1), acc=acc,
        weight=weight, alpha=torch.as_tensor(cc_points(lmax), dtype=dt, device=dev),
        d=torch.full((2, pairs), float("inf"), dtype=dt, device=dev),
        est=torch.full((pairs,), float("inf"), dtype=dt, device=dev),
        steps=torch.zeros(pairs, dtype=torch.int32, device=dev),
        converged=torch.zeros(pairs, dtype=torch.bool, device=dev),
        trap=torch.zeros(pairs, dtype=torch.bool, device=dev),
        base_score=torch.zeros(pairs, dtype=dt, device=dev),
        trace_a=torch.full((pairs, npts), math.inf, dtype=dt, device=dev),
        trace_s=torch.full((pairs, npts), math.nan, dtype=dt, device=dev),
        ntrace=torch.ones(pairs, dtype=long, device=dev),
        pend=torch.zeros((pairs, lmax + 3), dtype=long, device=dev),
        done=torch.full((pairs,), -1, dtype=long, device=dev),
        queued=torch.full((pairs,), adaptive.min_level, dtype=long, device=dev),
        q_pair=torch.zeros(0, dtype=long, device=dev),
        q_level=torch.zeros(0, dtype=long, device=dev),
        q_index=torch.zeros(0, dtype=long, device=dev),
        q_trap=torch.zeros(0, dtype=torch.bool, device=dev),
    )  # fmt: skip
    st.trace_a[:, 0], st.trace_s[:, 0] = 1.0, st.s_x  # a = 1: the pass at x
    _enqueue(st, torch.arange(pairs, device=dev), range(adaptive.min_level + 1))
    return st


def _enqueue(st: _State, p: torch.Tensor, levels: range, trap: bool = False) -> None:
    """Queue the rows (pair, level, point index) of ``levels`` for the pairs p; level 0 runs
    a = 0 only (a = 1 is the pass at x). ``trap``: levels k >= 3 of the trapezoid ladder, whose
    rows are the points dyadic level k - 1 adds, (2j + 1) / 2^(k-1)."""
    dev, lmax = st.path.x.device, st.adaptive.max_level
    if trap:
        parts = [(k, (2 * np.arange(2 ** (k - 2)) + 1) * 2 ** (lmax + 1 - k)) for k in levels]
    else:
        parts = [(k, cc_level_index(k, lmax)) for k in levels]
        parts = [(k, ix[:1] if k == 0 else ix) for k, ix in parts]
    idx = torch.as_tensor(np.concatenate([ix for _, ix in parts]), dtype=torch.long, device=dev)
    lev = torch.as_tensor([k for k, ix in parts for _ in ix], dtype=torch.long, device=dev)
    for k, ix in parts:
        st.pend[p, k] += len(ix)
    st.q_pair = torch.cat([st.q_pair, p.repeat_interleave(len(idx))])
    st.q_level = torch.cat([st.q_level, lev.repeat(len(p))])
    st.q_index = torch.cat([st.q_index, idx.repeat(len(p))])
    st.q_trap = torch.cat([st.q_trap, torch.full((len(p) * len(idx),), trap, device=dev)])
    st.queued[p] = levels[-1]


def _level_map(st: _State, p: torch.Tensor, k) -> torch.Tensor:
    """Level k's IG maps (P, C, H, W) of the pairs p (k: an int or a (P,) tensor of levels)."""
    return st.path.diff[p // st.kk] * st.acc[k * st.pairs + p]


def _relative(st: _State, p, q: torch.Tensor, q_prev: torch.Tensor | None):
    """(d, rel, compl) of maps q (P, C, H, W): the level difference ||q - q_prev|| (inf without
    q_prev), it relative to ||q||, and the completeness error in the map's own units,
    |sum(IG) - (F(x) - F(x'))| / sum|IG|."""
    tiny = torch.finfo(q.dtype).tiny
    flat = q.reshape(len(p), -1)
    if q_prev is None:
        d = torch.full((len(p),), math.inf, dtype=q.dtype, device=q.device)
    else:
        d = (q - q_prev).reshape(len(p), -1).norm(dim=1)
    gap = st.s_x[p] - st.base_score[p]
    compl = (flat.sum(dim=1) - gap).abs() / flat.abs().sum(dim=1).clamp_min(tiny)
    return d, d / flat.norm(dim=1).clamp_min(tiny), compl


def _finish(st: _State, p: torch.Tensor, k: int) -> None:
    """Level k of the pairs p is complete: its estimate (the relative level difference, times
    ``rate_factor`` from level 3, maxed with the completeness error); stop, switch to the
    trapezoid ladder, or queue level k + 1."""
    ad = st.adaptive
    prev = _level_map(st, p, k - 1) if k else None
    d, rel, compl = _relative(st, p, _level_map(st, p, k), prev)
    if k >= 3:
        rel = rel * rate_factor(d, st.d[0, p])
    slow = d >= SWITCH_RATE * st.d[0, p]
    st.d[1, p], st.d[0, p] = st.d[0, p], d
    e = torch.maximum(rel, compl)
    st.est[p], st.steps[p], st.done[p] = e, 2**k + 1, k
    if k < ad.min_level:
        return
    conv = e <= ad.tol
    st.converged[p] = conv
    if k >= ad.max_level:
        return
    if k == SWITCH_LEVEL and (slow & ~conv).any():
        _switch_to_trapezoid(st, p[slow & ~conv])
        conv = conv | slow
    if (~conv).any():
        _enqueue(st, p[~conv], range(k + 1, k + 2))


def _switch_to_trapezoid(st: _State, p: torch.Tensor) -> None:
    """Move the pairs p (Clenshaw-Curtis level 2 done, converging like 1/n) to the trapezoid
    ladder, on which such integrands converge fastest (docs/engine.md). Its level 1, T_1 =
    (g(0) + 2 g(1/2) + g(1)) / 4, is CC_0 / 4 + 3 CC_1 / 4 (CC_0 = (g(0) + g(1)) / 2, CC_1 =
    Simpson): the points a = 0, 1/2, 1 are reused; the two of level 2 are not."""
    pairs = st.pairs
    t0, t1 = st.acc[p], st.acc[pairs + p] * 0.75 + st.acc[p] * 0.25
    diff = st.path.diff[p // st.kk]
    d1 = (diff * (t1 - t0)).reshape(len(p), -1).norm(dim=1)
    st.d[0, p], st.d[1, p] = d1, math.inf
    st.acc[2 * pairs + p] = t1  # the last trapezoid value
    st.acc[3 * pairs + p] = 0  # the sum of the gradients at the points of the level in flight
    st.trap[p] = True
    _enqueue(st, p, range(3, 4), trap=True)


def _finish_trapezoid(st: _State, p: torch.Tensor, k: int) -> None:
    """Level k >= 3 of the trapezoid ladder (dyadic level j = k - 1) is complete for the pairs
    p: T_j = T_{j-1} / 2 + 2^-j (sum of g at the points it adds), its estimate (from dyadic level
    3 with ``trapezoid_rate_factor``), stop or queue the next level."""
    ad, pairs, j = st.adaptive, st.pairs, k - 1
    t_prev, held = st.acc[2 * pairs + p], st.acc[3 * pairs + p]
    t = t_prev / 2 + held / 2**j
    diff = st.path.diff[p // st.kk]
    d, rel, compl = _relative(st, p, diff * t, diff * t_prev)
    if j >= 3:
        rel = rel * trapezoid_rate_factor(d, st.d[0, p], st.d[1, p])
    st.d[1, p], st.d[0, p] = st.d[0, p], d
    st.acc[2 * pairs + p], st.acc[3 * pairs + p] = t, 0
    e = torch.maximum(rel, compl)
    st.est[p], st.steps[p], st.done[p] = e, 2**j + 3, k
    conv = e <= ad.tol
    st.converged[p] = conv
    if k <= ad.max_level and (~conv).any():
        _enqueue(st, p[~conv], range(k + 1, k + 2), trap=True)


def _take(st: _State, first, pair, level, index, trap, s, g, g_z) -> None:
    """Record a chunk's path rows: each gradient added, with its weight, to every level of its
    pair that holds its point (a trapezoid row: to its pair's level sum), the z-gradients at the
    input layer mapped back with L^T per (level, pair) or per row, whichever is fewer; F(x')
    from a = 0, the trace, the rows pending."""
    pairs, x, lmax = st.pairs, st.path.x, st.adaptive.max_level
    dtype, dev = x.dtype, x.device
    lev = torch.arange(lmax + 1, device=dev)
    holds = (lev[:, None] >= level[None, :]) & ~trap[None, :]  # (L + 1, R)
    cols = torch.arange(len(pair), device=dev)
    key = torch.cat([(lev[:, None] * pairs + pair[None, :])[holds], 3 * pairs + pair[trap]])
    col = torch.cat([cols.expand(lmax + 1, -1)[holds], cols[trap]])
    w = torch.cat([st.weight[:, index.clamp_max(2**lmax)].expand(lmax + 1, -1)[holds],
                   torch.ones(int(trap.sum()), dtype=dtype, device=dev)])  # fmt: skip
    keys, inv = torch.unique(key, return_inverse=True)
    mix = torch.zeros(len(keys), len(pair), dtype=dtype, device=dev)
    mix[inv, col] = w
    summed = None
    if g_z is not None:
        gz = wide(g_z)
        if len(keys) <= len(pair):  # L^T per (level, pair)
            gz = (mix @ gz.reshape(len(pair), -1)).reshape(len(keys), *g_z.shape[1:])
            gz = gz.contiguous(memory_format=torch.channels_last)
            summed = input_transpose(first, gz, x.shape[1:])
        else:  # L^T per row
            rows = input_transpose(first, gz, x.shape[1:]).reshape(len(pair), -1)
            summed = (mix @ rows).reshape(len(keys), *x.shape[1:])
    if g is not None:
        gs = (mix @ wide(g).reshape(len(pair), -1)).reshape(len(keys), *x.shape[1:])
        summed = gs if summed is None else summed + gs
    st.acc.index_add_(0, keys, summed.to(dtype))
    sd = s.detach().to(dtype)
    zero = (index == 0) & ~trap
    st.base_score[pair[zero]] = sd[zero]
    _add_to_trace(st, pair, _alphas(st, index, trap), sd)
    st.pend.index_put_((pair, level), torch.full_like(pair, -1), accumulate=True)


def _alphas(st: _State, index: torch.Tensor, trap: torch.Tensor) -> torch.Tensor:
    """The points (R,) of rows with these indices: Clenshaw-Curtis, or equally spaced (trap)."""
    lmax = st.adaptive.max_level
    even = index.to(st.alpha.dtype) / 2**lmax
    return torch.where(trap, even, st.alpha[index.clamp_max(2**lmax)])


def _add_to_trace(st: _State, pair, alpha, s) -> None:
    """Append the rows' (alpha, F) to their pairs' traces."""
    order = torch.argsort(pair, stable=True)
    ps = pair[order]
    counts = torch.bincount(ps, minlength=st.pairs)
    start = torch.cumsum(counts, 0) - counts
    pos = st.ntrace[ps] + torch.arange(len(ps), device=ps.device) - start[ps]
    st.trace_a[ps, pos], st.trace_s[ps, pos] = alpha[order], s[order]
    st.ntrace += counts


def _finish_ready_levels(st: _State) -> None:
    """Finish every level now complete, in level order."""
    while True:
        nxt = st.done + 1
        ready = (nxt <= st.queued) & (st.pend.gather(1, nxt[:, None])[:, 0] == 0)
        if not ready.any():
            return
        k = int(nxt[ready].min())
        now = ready & (nxt == k)
        if (now & st.trap).any():
            _finish_trapezoid(st, torch.nonzero(now & st.trap).reshape(-1), k)
        if (now & ~st.trap).any():
            _finish(st, torch.nonzero(now & ~st.trap).reshape(-1), k)


def _trace(st: _State) -> tuple[torch.Tensor, torch.Tensor]:
    """The path trace: each pair's evaluated points in alpha order and F there, (P, points)
    each, the first ``steps`` entries valid, the rest NaN."""
    alphas, order = st.trace_a.sort(dim=1)
    scores = st.trace_s.gather(1, order)
    valid = torch.arange(alphas.shape[1], device=alphas.device)[None] < st.steps[:, None]
    return torch.where(valid, alphas, math.nan), torch.where(valid, scores, math.nan)


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
    (N, K, ``trace_length(max_level)``), the first ig_steps entries of a row valid, the rest
    NaN; with ``noisy`` also smoothgrad, smoothgrad_sq, vargrad (N, K, H, W).
    """
    path = make_path(net, x, baseline)
    st = _new_state(path, targets, g_x, s_x, adaptive)
    chunk, first = chunk_rows(budget_mb, per_row_bytes, x.device), path.first
    samples = 0 if noisy is None else noisy.noise.shape[1]
    noisy_rows, nhead, head = st.pairs * samples, 0, 0
    while head < len(st.q_pair) or nhead < noisy_rows:
        pair, level = st.q_pair[head : head + chunk], st.q_level[head : head + chunk]
        index, trap = st.q_index[head : head + chunk], st.q_trap[head : head + chunk]
        head += len(pair)
        fill = 0 if (len(pair) and noisy is not None and noisy.apart) else chunk - len(pair)
        q = torch.arange(nhead, min(noisy_rows, nhead + fill), device=x.device)
        nhead += len(q)  # SmoothGrad's rows (pair, sample), in fp32
        alpha = _alphas(st, index, trap).view(-1, 1, 1, 1)
        s, g, g_z, first = path_chunk(net, path, first, pair, alpha, targets, score, autocast,
                                      noisy, q)  # fmt: skip
        if len(pair):
            _take(st, first, pair, level, index, trap, s, g, g_z)
            _finish_ready_levels(st)
    alphas, trace = _trace(st)
    all_pairs = torch.arange(st.pairs, device=x.device)
    ig_map = _level_map(st, all_pairs, torch.where(st.trap, 2, st.done))
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
