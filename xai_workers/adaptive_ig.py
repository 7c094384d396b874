"""``ig_steps="auto"``: Integrated Gradients to an error target, each (image, target) pair
refining its own nested levels (docs/conventions.md, "Adaptive Integrated Gradients";
docs/engine.md, "Integrated Gradients to an accuracy target").

Level k of a pair adds the points ``quadrature.level_points(k)``; the rows of all pairs wait in
one queue and run through the sweep's chunks (``sweep.path_chunk``: same memory budget, same
input-layer shortcut), so a chunk holds the points of whichever pairs still need them, at whatever
level each is. When a pair's level is complete its Romberg row (T, S, B) is updated and every
column gets an error estimate; the column with the smallest estimate is the pair's IG; a pair
whose estimate is above the tolerance queues its next level. Every gradient is computed once:
level k + 1 reuses all the points of level k (a = 1 is the pass at x).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from xai_workers.quadrature import level_points, romberg_row
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


#: Credit for demonstrated fast convergence (``_rate_factor``): at most 1/2 of Richardson's.
RATE_SAFETY = 2.0
#: Per Romberg column (T, S, B), the fastest rate per level Euler-Maclaurin gives a generic smooth
#: integrand: the error falls 4x, 16x, 64x per halving of the spacing.
_ASYMPTOTIC_RATE = (1 / 4, 1 / 16, 1 / 64)


def _rate_factor(d: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """The factor (<= 1) applied to a column's last level difference d_k to estimate its error.

    d, d1, d2 (P, 3): the level differences d_k, d_{k-1}, d_{k-2} of the columns T, S, B.
    rho = max(d / d1, d1 / d2, the column's asymptotic rate): how fast the column is seen to
    converge, never faster than theory allows. A rule whose error falls by rho per level has
    error d_k rho / (1 - rho) (Richardson); the factor is ``RATE_SAFETY`` times that, at most 1.
    So a column converging like 1/n (ReLU networks: rho about 1/2) keeps the plain difference,
    and only a column seen to converge fast (rho < 1/3) gets credit for it.
    """
    tiny = torch.finfo(d.dtype).tiny
    floor = torch.tensor(_ASYMPTOTIC_RATE, dtype=d.dtype, device=d.device)
    rho = torch.maximum(d / d1.clamp_min(tiny), d1 / d2.clamp_min(tiny))
    rho = torch.maximum(rho, floor).clamp_max(0.5)
    return (RATE_SAFETY * rho / (1 - rho)).clamp_max(1.0)


@dataclass
class _State:
    """The mutable state of one ``ig_sweep_auto`` call, per pair P = N * K (maps (P, C, H, W)).

    ``held[k % ring]``: the sum of the gradients at the points level k adds (in flight at once:
    at most levels 0..min_level of a pair); ``prev``: the Romberg row (T, S, B) of each pair's
    last finished level; ``dh``: its level differences d_{k-1}, d_{k-2} (2, P, 3); ``best``,
    ``est``, ``steps``, ``converged``: the answer so far; ``grid``: the score at each evaluated
    point of the finest level (the path trace); ``pend``: rows still to run per (pair, level);
    ``done``/``queued``: the last finished and the last queued level; the queue of rows
    ``q_pair``, ``q_level``, ``q_alpha``."""

    path: Path
    adaptive: Adaptive
    pairs: int
    kk: int
    s_x: torch.Tensor
    held: torch.Tensor
    dh: torch.Tensor
    best: torch.Tensor
    est: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    base_score: torch.Tensor
    grid: torch.Tensor
    pend: torch.Tensor
    done: torch.Tensor
    queued: torch.Tensor
    prev: tuple | None = None
    q_pair: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    q_level: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    q_alpha: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def ring(self) -> int:
        return self.adaptive.min_level + 1

    def zeros(self, lead: int) -> torch.Tensor:
        x = self.path.x
        t = torch.empty((lead, *x.shape[1:]), dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)  # fmt: skip
        return t.zero_()


def _new_state(path: Path, targets, g_x, s_x, adaptive: Adaptive) -> _State:
    x = path.x
    n, kk = targets.shape
    pairs, lmax = n * kk, adaptive.max_level
    device, dtype = x.device, x.dtype
    st = _State(
        path=path, adaptive=adaptive, pairs=pairs, kk=kk, s_x=s_x.detach().reshape(-1),
        held=torch.empty(0), dh=torch.full((2, pairs, 3), float("inf"), dtype=dtype, device=device),
        best=torch.empty(0), est=torch.full((pairs,), float("inf"), dtype=dtype, device=device),
        steps=torch.zeros(pairs, dtype=torch.int32, device=device),
        converged=torch.zeros(pairs, dtype=torch.bool, device=device),
        base_score=torch.zeros(pairs, dtype=dtype, device=device),
        grid=torch.full((pairs, 2**lmax + 1), float("nan"), dtype=dtype, device=device),
        pend=torch.zeros((pairs, lmax + 2), dtype=torch.long, device=device),
        done=torch.full((pairs,), -1, dtype=torch.long, device=device),
        queued=torch.full((pairs,), adaptive.min_level, dtype=torch.long, device=device),
    )  # fmt: skip
    st.held, st.best = st.zeros(st.ring * pairs), st.zeros(pairs)
    st.held[:pairs] = torch.stack(g_x, dim=1).reshape(pairs, *x.shape[1:])  # level 0's a = 1
    st.grid[:, -1] = st.s_x
    st.q_pair = st.q_level = torch.zeros(0, dtype=torch.long, device=device)
    st.q_alpha = torch.zeros(0, dtype=dtype, device=device)
    _enqueue(st, torch.arange(pairs, device=device), range(adaptive.min_level + 1))
    return st


def _enqueue(st: _State, p: torch.Tensor, levels: range) -> None:
    """Queue the rows (pair, level, alpha) of ``levels`` for the pairs p; level 0 runs a = 0
    only (a = 1 is the pass at x)."""
    device, dtype = st.path.x.device, st.path.x.dtype
    parts = [(k, level_points(k)[:1] if k == 0 else level_points(k)) for k in levels]
    pts = torch.as_tensor(np.concatenate([a for _, a in parts]), dtype=dtype, device=device)
    lev = torch.as_tensor(np.concatenate([np.full(len(a), k) for k, a in parts]), device=device)
    for k, a in parts:
        st.pend[p, k] += len(a)
    m = len(pts)
    st.q_pair = torch.cat([st.q_pair, p.repeat_interleave(m)])
    st.q_level = torch.cat([st.q_level, lev.repeat(len(p))])
    st.q_alpha = torch.cat([st.q_alpha, pts.repeat(len(p))])
    st.queued[p] = levels[-1]


def _estimate(st: _State, p, k: int, row, row_prev, maps, d_img) -> torch.Tensor:
    """The error estimate (P, 3) of each Romberg column of level k for the pairs p: the relative
    level difference (times ``_rate_factor`` from level 3), maxed with the completeness error in
    the map's own units, |sum(IG) - (F(x) - F(x'))| / sum|IG|."""
    tiny = torch.finfo(maps.dtype).tiny
    flat = maps.reshape(len(p), 3, -1)
    norm = flat.norm(dim=2).clamp_min(tiny)
    if k == 0:
        d = torch.full_like(norm, float("inf"))
    else:
        d = (maps - torch.stack([d_img * c for c in row_prev], dim=1)).reshape(len(p), 3, -1)
        d = d.norm(dim=2)
    rel = d / norm
    if k >= 3:
        rel = rel * _rate_factor(d, st.dh[0, p], st.dh[1, p])
    st.dh[1, p], st.dh[0, p] = st.dh[0, p], d
    gap = st.s_x[p] - st.base_score[p]
    compl = (flat.sum(dim=2) - gap[:, None]).abs() / flat.abs().sum(dim=2).clamp_min(tiny)
    return torch.maximum(rel, compl)


def _finish(st: _State, p: torch.Tensor, k: int) -> None:
    """Level k of the pairs p is complete: Romberg row, estimates, stop or queue k + 1."""
    pairs, ad = st.pairs, st.adaptive
    slot = (k % st.ring) * pairs + p
    h = st.held[slot]
    st.held[slot] = 0
    row_prev = None if k == 0 else tuple(c[p] for c in st.prev)
    t = h / 2 if k == 0 else row_prev[0] / 2 + h / 2**k
    row = romberg_row(k, t, row_prev)
    d_img = st.path.diff[p // st.kk]
    maps = torch.stack([d_img * c for c in row], dim=1)  # (P, 3, C, H, W)
    e_best, col = _estimate(st, p, k, row, row_prev, maps, d_img).min(dim=1)
    st.best[p] = maps[torch.arange(len(p), device=p.device), col]
    st.est[p], st.steps[p] = e_best, 2**k + 1
    if st.prev is None:
        st.prev = tuple(st.zeros(pairs) for _ in range(3))
    for c, v in zip(st.prev, row, strict=True):
        c[p] = v
    st.done[p] = k
    if k < ad.min_level:
        return
    conv = e_best <= ad.tol
    st.converged[p] = conv
    more = p[~conv] if k < ad.max_level else p[:0]
    if len(more):
        _enqueue(st, more, range(k + 1, k + 2))


def _take(st: _State, first, pair, level, alpha, s, g, g_z) -> None:
    """Record a chunk's path rows: their gradients summed per (pair, level) into ``held`` (the
    z-gradients mapped back with L^T per (pair, level), not per row), F(x') from a = 0, the path
    trace, and the rows still pending."""
    pairs, x = st.pairs, st.path.x
    dtype, device = x.dtype, x.device
    key = level * pairs + pair
    keys, inv = torch.unique(key, return_inverse=True)
    mix = torch.zeros(len(keys), len(pair), dtype=dtype, device=device)
    mix[inv, torch.arange(len(pair), device=device)] = 1
    summed = None
    if g_z is not None:
        gz = (mix @ wide(g_z).reshape(len(pair), -1)).reshape(len(keys), *g_z.shape[1:])
        summed = input_transpose(first, gz.to(memory_format=torch.channels_last), x.shape[1:])
    if g is not None:
        gs = (mix @ wide(g).reshape(len(pair), -1)).reshape(len(keys), *x.shape[1:])
        summed = gs if summed is None else summed + gs
    k_level, k_pair = keys // pairs, keys % pairs
    st.held.index_add_(0, (k_level % st.ring) * pairs + k_pair, summed.to(dtype))
    sd = s.detach().to(dtype)
    a = alpha.view(-1)
    zero = a == 0
    st.base_score[pair[zero]] = sd[zero]
    st.grid[pair, (a * 2**st.adaptive.max_level).round().long()] = sd
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
    lmax, dtype = st.adaptive.max_level, st.path.x.dtype
    idx = torch.arange(2**lmax + 1, device=st.grid.device)
    stride = 2 ** (lmax - st.done)  # (pairs,)
    pos = (idx[None] * stride[:, None]).clamp_max(2**lmax)
    valid = idx[None] < st.steps[:, None]
    alphas = torch.where(valid, pos.to(dtype) / 2**lmax, float("nan"))
    return alphas, torch.where(valid, st.grid.gather(1, pos), float("nan"))


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
        alpha = st.q_alpha[head : head + chunk].view(-1, 1, 1, 1)
        head += len(pair)
        fill = 0 if (len(pair) and noisy is not None and noisy.apart) else chunk - len(pair)
        q = torch.arange(nhead, min(noisy_rows, nhead + fill), device=x.device)
        nhead += len(q)  # SmoothGrad's rows (pair, sample), in fp32
        s, g, g_z, first = path_chunk(net, path, first, pair, alpha, targets, score, autocast,
                                      noisy, q)  # fmt: skip
        if len(pair):
            _take(st, first, pair, level, alpha, s, g, g_z)
            _finish_ready_levels(st)
    alphas, trace = _trace(st)
    lead, out = targets.shape, {}
    if samples:
        out = smoothgrad_maps(noisy.sums, samples, (*lead, *x.shape[-2:]))
    return out | {
        "integrated_gradients": st.best.reshape(*lead, *x.shape[1:]).contiguous(),
        "baseline_score": st.base_score.view(lead),
        "ig_steps": st.steps.view(lead),
        "ig_error_est": st.est.float().view(lead),
        "ig_converged": st.converged.view(lead),
        "ig_path_alpha": alphas.float().view(*lead, -1),
        "ig_path_score": trace.float().view(*lead, -1),
    }
