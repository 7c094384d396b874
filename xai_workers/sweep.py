"""The sweep: path points (and SmoothGrad's noisy rows) through the model in chunks of a memory
budget, one forward + backward per chunk.

Rows are (image, target) pairs times their path points x' + a (x - x'), then SmoothGrad's noisy
copies of x (``smoothgrad``); they are cut into chunks sized by the bytes autograd saves per row
(counted in the pass at x: ``saved_bytes_counter``) and the memory budget (``default_budget_mb``,
``keep_freed_memory``). The weighted gradients of a chunk are added to their pairs with one
matrix product (``add_weighted_rows``). When the model has an input layer (``prepare.input_layer``)
the sweep hands that layer its output at each point as ``first(x') + a L(x - x')`` and maps the
summed gradient at its output back with L^T once per pair (docs/engine.md, 2b).

``ig_sweep`` runs fixed quadrature rules; ``adaptive_ig`` runs ``ig_steps="auto"`` on the same
chunks (``path_chunk``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from xai_workers.prepare import form
from xai_workers.smoothgrad import Noisy, add_noisy, noisy_rows, smoothgrad_maps


def wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for low-precision (autocast) tensors; float64 stays float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def scores(out: torch.Tensor, score: str) -> torch.Tensor:
    """(R, classes) logits -> the score per class: logits or softmax probabilities."""
    out = wide(out)
    return out if score == "logit" else torch.softmax(out, dim=1)


# --------------------------------------------------------------------------------------------
# Memory: the bytes a row costs and the budget of a chunk
# --------------------------------------------------------------------------------------------


def saved_bytes_counter(net: nn.Module):
    """saved_tensors_hooks that add up the bytes autograd saves (``net``'s parameters and
    buffers excluded: they are shared by all rows)."""
    skip = {t.data_ptr() for t in (*net.parameters(), *net.buffers())}
    total = {"bytes": 0}

    def pack(t):
        if t.data_ptr() not in skip:
            total["bytes"] += t.numel() * t.element_size()
        return t

    return total, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


_MALLOC = {"kept": False}  # whether keep_freed_memory() took effect in this process


def keep_freed_memory(top_pad_mb: int = 256) -> bool:
    """Make glibc's malloc keep freed memory in the process instead of returning it to the OS.

    Eager autograd allocates and frees tens of MB per layer and path point. glibc serves blocks
    above its mmap threshold (at most 32 MB) with fresh ``mmap`` pages and trims freed heap tops,
    so every chunk of path points page-faults its activations in again, each page zeroed by the
    kernel. With mmap off and trimming off, freed blocks are reused: measured on ResNet-18 (a
    batch of 4, IG 32 steps, 2 cores) 370k page faults per call fall to none and the call is about
    9% faster (docs/benchmarks.md). The cost: the process keeps its peak heap (which the chunk
    budget bounds) until it exits. This is process-wide; the batch job's workers call it once on
    a CPU. Returns False where it does not apply (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # glibc <malloc.h>
    kept = bool(
        mallopt(m_mmap_max, 0)
        and mallopt(m_trim_threshold, 2**31 - 1)
        and mallopt(m_top_pad, int(top_pad_mb) * 2**20)
    )
    _MALLOC["kept"] = _MALLOC["kept"] or kept
    return kept


def default_budget_mb(device: torch.device) -> float:
    """The memory budget (MB) for the activations a chunk saves when the caller gives none."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.35 * free / 2**20
    # On a CPU, chunks beyond a few hundred MB of saved activations stop paying off. Unless
    # freed memory is kept (keep_freed_memory), glibc maps fresh zeroed pages for every block
    # above 32 MB in every chunk: smaller chunks keep more blocks under that (docs/benchmarks.md).
    return 512.0 if _MALLOC["kept"] else 256.0


def chunk_rows(budget_mb: float | None, per_row_bytes: float, device, rows: int | None = None):
    """Rows per chunk: the budget over the bytes a row saves, at least 1 (at most ``rows``)."""
    budget = (budget_mb or default_budget_mb(device)) * 2**20
    chunk = max(1, budget // per_row_bytes)
    return int(chunk if rows is None else max(1, min(rows, chunk)))


def chunks(rows: int, chunk: int, cut: int | None) -> list[tuple[int, int]]:
    """[start, stop) of the chunks of ``rows`` rows, ``chunk`` at most each, evenly sized;
    with ``cut`` no chunk holds rows on both sides of it."""
    parts = [(0, rows)] if cut is None else [(0, cut), (cut, rows)]
    out = []
    for lo, hi in parts:
        if hi <= lo:
            continue
        size = math.ceil((hi - lo) / math.ceil((hi - lo) / chunk))  # even chunks
        out += [(s, min(hi, s + size)) for s in range(lo, hi, size)]
    return out


def add_weighted_rows(acc: torch.Tensor, pair: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    """acc[pair[i]] += w[i] * g[i] for the rows i of a chunk, in place.

    acc (P, C, H, W) and g (R, C, H, W) channels_last (or contiguous), ``pair`` (R,) ascending
    (a chunk's rows are consecutive points of consecutive pairs), ``w`` (R,). One matrix product
    (pairs in the chunk x R) @ (R, C*H*W) reads ``g`` once instead of scaling it and
    scattering it row by row.
    """
    lo, hi = int(pair[0]), int(pair[-1]) + 1
    mix = torch.zeros(hi - lo, len(pair), dtype=acc.dtype, device=acc.device)
    mix[pair - lo, torch.arange(len(pair), device=acc.device)] = w.to(acc.dtype)
    rows = acc[lo:hi]
    if rows.dim() == 4 and rows.is_contiguous(memory_format=torch.channels_last):
        rows, g = rows.permute(0, 2, 3, 1), g.permute(0, 2, 3, 1)
    flat = rows.reshape(hi - lo, -1)  # a view: each row is contiguous in either layout
    flat.addmm_(mix, wide(g).reshape(len(pair), -1))


# --------------------------------------------------------------------------------------------
# The input layer runs once per image (docs/engine.md, 2b)
# --------------------------------------------------------------------------------------------


class _PathRows(torch.autograd.Function):
    """z[i] = z_base[b[i]] + alpha[i] * z_diff[img[i]] for the rows of a chunk: the input layer's
    output along the path (all (R, K, h, w), channels_last like the layer's own output), followed
    by the rows of ``tail`` (R2, K, h, w) as they are (SmoothGrad's noisy rows), or none.

    One ``addcmul`` per run of rows of the same image, straight into the output, with no
    gathered copies. The output has a grad_fn (``alpha`` (R, 1, 1, 1) requires grad), so the
    sweep can take the gradient at it and in-place ops may follow it; the sweep never
    propagates further back, so ``backward`` passes nothing on.
    """

    @staticmethod
    def forward(ctx, alpha, z_base, z_diff, b_img, img, tail=None):
        extra = 0 if tail is None else len(tail)
        shape, fmt = (len(img) + extra, *z_diff.shape[1:]), torch.channels_last
        out = torch.empty(shape, dtype=z_diff.dtype, device=z_diff.device, memory_format=fmt)
        if extra:
            out[len(img) :] = tail
        keys = (img * z_base.shape[0] + b_img).tolist()
        start = 0
        for i in range(1, len(keys) + 1):
            if i == len(keys) or keys[i] != keys[start]:
                j, b = int(img[start]), int(b_img[start])
                torch.addcmul(
                    z_base[b : b + 1], alpha[start:i], z_diff[j : j + 1], out=out[start:i]
                )
                start = i
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, None, None, None


@contextlib.contextmanager
def _output_given(module: nn.Module, inp: torch.Tensor, z: torch.Tensor):
    """Inside the block, the first call of ``module`` with ``inp`` itself returns ``z`` without
    computing anything; every other call computes as usual. Yields a dict that counts the calls
    (``calls``) and the times ``z`` was given (``given``)."""
    seen = {"calls": 0, "given": 0}
    real = module.forward
    own = module.__dict__.get("forward")  # an instance-level forward to put back, if any

    def forward(*args, **kwargs):
        seen["calls"] += 1
        if len(args) == 1 and args[0] is inp and not kwargs and not seen["given"]:
            seen["given"] += 1
            return z
        return real(*args, **kwargs)

    module.forward = forward
    try:
        yield seen
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def input_transpose(layer: nn.Module, g_z: torch.Tensor, shape) -> torch.Tensor:
    """L^T g_z: the input gradient (R, C, H, W) of the input layer ``layer`` (linear in its
    input, its bias apart) given the gradient ``g_z`` (R, K, h, w) at its output; ``shape`` =
    (C, H, W). Any input gives it (a zero probe)."""
    probe = torch.zeros((len(g_z), *shape), dtype=g_z.dtype, device=g_z.device)
    probe = probe.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(layer(probe), probe, g_z)
    return g


def _noisy_gradients(g, g_z, first, cut: int, shape) -> torch.Tensor:
    """The input gradients (R, C, H, W) of a chunk's SmoothGrad rows (rows ``cut:``): each
    row's gradient at the input layer's output mapped back through it (its transposed
    convolution: ``first`` is linear in its input) plus what reached the input around it."""
    gn = None
    if g_z is not None:
        gn = input_transpose(first, wide(g_z[cut:]), shape)
    if g is not None:
        gn = wide(g[cut:]) if gn is None else gn + wide(g[cut:])
    return gn


# --------------------------------------------------------------------------------------------
# One chunk of rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Path:
    """The straight path of a batch: ``x`` (N, C, H, W), ``base`` x' (1 or N, C, H, W)
    channels_last, ``diff`` = x - x' (N, C, H, W); with an input layer ``first`` (None without),
    its output at x' ``z_base`` (1 or N, K, h, w) and ``z_diff`` = L(x - x') (N, K, h, w)."""

    x: torch.Tensor
    base: torch.Tensor
    diff: torch.Tensor
    first: nn.Module | None = None
    z_base: torch.Tensor | None = None
    z_diff: torch.Tensor | None = None


def make_path(net: nn.Module, x: torch.Tensor, baseline, shortcut: bool = True) -> Path:
    """The ``Path`` of ``x`` from ``baseline`` (None = zeros in input space); the input-layer
    shortcut when ``shortcut`` and the prepared model has an input layer."""
    base = baseline if baseline is not None else torch.zeros_like(x[:1])
    base = base.contiguous(memory_format=torch.channels_last)
    diff = x - base  # (N, C, H, W)
    f = form(net)
    name = f.input_layer if f is not None else None
    if name is None or not shortcut:
        return Path(x, base, diff)
    first = net.get_submodule(name)
    with torch.no_grad():
        z_base = first(base)  # (1 or N, K, h, w)
        z_diff = first(diff) - first(torch.zeros_like(base[:1]))  # L(diff), without bias
    return Path(x, base, diff, first, z_base, z_diff)


def _path_gradients(
    net, base, diff, alpha, img, b_img, tgt, score, autocast, first, z_base, z_diff, noisy=None
):
    """One chunk of path points: rows i at base[b_img[i]] + alpha[i] * diff[img[i]], then the
    rows of ``noisy`` (R2, C, H, W) (SmoothGrad's inputs, or None), scored for class tgt[i].
    Returns (s, g, g_z, first) over all R + R2 rows: the scores (R + R2,); the input gradient
    (R + R2, C, H, W), or None when it all went through ``first``; the gradient at the output of
    the input layer ``first`` (R + R2, K, h, w), None on the plain path; and ``first`` itself, or
    None when the model turned out not to feed the input to that layer exactly once (plain path
    from then on)."""
    fmt = torch.channels_last
    inp = torch.addcmul(base[b_img], alpha, diff[img])
    if noisy is not None:
        inp = torch.cat([inp.contiguous(memory_format=fmt), noisy.contiguous(memory_format=fmt)])
    inp = inp.contiguous(memory_format=fmt).requires_grad_(True)
    z = None
    if first is not None:
        tail = None
        if noisy is not None:  # the layer's own output at the noisy rows
            with torch.no_grad():
                tail = first(inp[len(img) :].detach())
        z = _PathRows.apply(alpha.detach().requires_grad_(True), z_base, z_diff, b_img, img, tail)
        z_edge = torch.autograd.graph.get_gradient_edge(z)  # before in-place ops change z
        with _output_given(first, inp, z) as seen, autocast:
            s = scores(net(inp), score).gather(1, tgt[:, None])[:, 0]
        if seen != {"calls": 1, "given": 1}:
            first = z = None  # this model does not qualify: plain path from here on
    if z is None:
        with autocast:
            s = scores(net(inp), score).gather(1, tgt[:, None])[:, 0]
        (g,) = torch.autograd.grad(s.sum(), inp)
        return s, g, None, first
    g_z, g = torch.autograd.grad(s.sum(), (z_edge, inp), allow_unused=True)
    return s, g, g_z, first


def path_chunk(net, path: Path, first, pair, alpha, targets, score, autocast, noisy=None, q=None):
    """One forward + backward over a chunk: path rows (pair p, point ``alpha``) scored for
    targets[p // K, p % K], then SmoothGrad's rows ``q`` (int64, row = pair * M + m; None or
    empty: none) whose gradients go into ``noisy.sums`` (in fp32: no autocast in such a chunk).

    pair (R,) int64, alpha (R, 1, 1, 1). Returns (s, g, g_z, first) for the R path rows: the
    scores (R,), the input gradient (R, C, H, W) or None, the gradient at the input layer's output
    (R, K, h, w) or None, and the input layer to use from now on (None: the plain path)."""
    kk = targets.shape[1]
    tflat = targets.reshape(-1)  # pair p = image p // K, target tflat[p]
    img = pair // kk
    b_img = img if path.base.shape[0] > 1 else torch.zeros_like(img)
    tgt, inp_noisy = tflat[pair], None
    if q is not None and len(q):
        npair, inp_noisy = noisy_rows(path.x, noisy, q, kk)
        tgt = torch.cat([tgt, tflat[npair]])
    ctx = autocast if inp_noisy is None else contextlib.nullcontext()
    s, g, g_z, first = _path_gradients(
        net, path.base, path.diff, alpha, img, b_img, tgt, score, ctx, first, path.z_base,
        path.z_diff, inp_noisy,
    )  # fmt: skip
    cut = len(pair)
    if inp_noisy is not None:
        add_noisy(noisy.sums, npair, _noisy_gradients(g, g_z, first, cut, path.x.shape[1:]))
    g = None if g is None else g[:cut]
    g_z = None if g_z is None else g_z[:cut]
    return s[:cut], g, g_z, first


def baseline_scores(net, base, targets, score, autocast) -> torch.Tensor:
    """F(x') for every pair (N * K,), one gradient-free forward (once for all images when the
    baseline is the same for every image)."""
    tflat = targets.reshape(-1)
    with torch.no_grad(), autocast:
        if base.shape[0] == 1:
            return scores(net(base), score)[0][tflat]  # one baseline for all images
        return scores(net(base), score).gather(1, targets).reshape(-1)


# --------------------------------------------------------------------------------------------
# Fixed quadrature rules
# --------------------------------------------------------------------------------------------


def ig_sweep(
    net, x, targets, alphas, weights, baseline, score, g_x, has_one, has_zero, budget_mb,
    per_row_bytes, autocast, noisy: Noisy | None = None, *, ig: bool = True,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """IG for every (image, target) pair (unless ``ig`` is False), and SmoothGrad's noisy rows
    when ``noisy`` is given, in one queue of rows cut into chunks of the memory budget: the path
    points of every pair, then (pair, sample) noisy rows; one forward + backward per chunk.
    ``g_x``: the K input gradients (N, C, H, W) of the pass at x, the point a = 1 when the rule
    has it (``has_one``). Returns integrated_gradients (N, K, C, H, W) and baseline_score (N, K);
    with ``noisy`` also smoothgrad, smoothgrad_sq, vargrad (N, K, H, W)."""
    n, kk = targets.shape
    device, fmt = x.device, torch.channels_last
    a = torch.as_tensor(alphas, dtype=x.dtype, device=device)
    w = torch.as_tensor(weights, dtype=x.dtype, device=device)
    sweep = torch.arange(len(alphas) - (1 if has_one else 0) if ig else 0, device=device)
    pairs = n * kk
    acc = torch.empty((pairs, *x.shape[1:]), dtype=x.dtype, device=device, memory_format=fmt)
    acc.zero_()
    if has_one:  # a = 1 is the pass at x: reuse its gradient
        acc += w[-1] * torch.stack(g_x, dim=1).reshape(acc.shape)
    samples = 0 if noisy is None else noisy.noise.shape[1]
    path_rows = pairs * len(sweep)
    rows = path_rows + pairs * samples
    chunk = chunk_rows(budget_mb, per_row_bytes, device, rows) if rows else 1
    path = make_path(net, x, baseline, shortcut=rows > 0)
    if ig and not has_zero:  # F(x') needs its own forward pass, without gradients
        base_score = baseline_scores(net, path.base, targets, score, autocast)
    else:
        base_score = torch.empty(pairs, dtype=x.dtype, device=device)
    first, acc_z, step_of = path.first, None, max(len(sweep), 1)
    apart = noisy is not None and noisy.apart
    for lo, hi in chunks(rows, chunk, path_rows if apart else None):
        r = torch.arange(lo, max(lo, min(hi, path_rows)), device=device)  # its path rows
        pair, step = r // step_of, sweep[r % step_of] if len(sweep) else r
        q = torch.arange(max(lo, path_rows), max(hi, path_rows), device=device) - path_rows
        alpha = a[step].view(-1, 1, 1, 1)
        s, g, g_z, first = path_chunk(net, path, first, pair, alpha, targets, score, autocast,
                                      noisy, q)  # fmt: skip
        if not len(r):
            continue
        if g_z is not None:
            if acc_z is None:
                acc_z = torch.zeros((pairs, *g_z.shape[1:]), dtype=x.dtype, device=device)
                acc_z = acc_z.contiguous(memory_format=fmt)
            add_weighted_rows(acc_z, pair, w[step], g_z)
        if g is not None:
            add_weighted_rows(acc, pair, w[step], g)
        if has_zero:
            zero = step == 0
            base_score[pair[zero]] = s.detach()[zero]
    out = {}
    if samples:
        out = smoothgrad_maps(noisy.sums, samples, (n, kk, *x.shape[-2:]))
    if not ig:
        return out
    if acc_z is not None:  # L^T of the summed gradients at the input layer, once per pair
        for start in range(0, pairs, chunk):
            stop = min(pairs, start + chunk)
            acc[start:stop] += input_transpose(path.first, acc_z[start:stop], x.shape[1:])
    ig_map = (acc.reshape(n, kk, *x.shape[1:]) * path.diff[:, None]).contiguous()
    return out | {"integrated_gradients": ig_map, "baseline_score": base_score.view(n, kk)}
