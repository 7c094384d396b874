"""Deletion and insertion (Petsiuk et al. 2018, RISE): is a map telling the truth about the model?

Rank the pixels by a method's 2-D map; delete the most important ones first (replace them by the
baseline) and watch the target's probability fall, or insert them first into a blurred image and
watch it rise. A faithful map makes deletion fall fast (low AUC) and insertion rise fast (high
AUC). The same curves for a random pixel order are the floor a map must beat. Definitions, exactly:
docs/conventions.md ("Faithfulness").

Forward passes only (under ``torch.inference_mode``, on the prepared model), batched: the perturbed
images of all (image, target) pairs, orders, metrics and steps are rows cut into chunks of equal
size under a memory budget, as the engine's IG sweep is, and written straight into the
channels_last batch the model runs on (one image broadcast over its steps; nothing gathered), so
the curves run at the model's own inference rate (docs/benchmarks.md, "At the forward limit").
Where rows would be the same image they run once: the two ends of every curve (k = 0 and k = K)
are the same images for every order, the image itself, the baseline and the blurred image, so
they are run once per image (a baseline shared by the batch once, and ends the caller already has,
``known``, not at all); the random order is one per image, so its perturbed images are run once
per image for all of its targets (``topk``).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

METRICS = ("deletion", "insertion")
DEFAULT_STEPS = 16
#: the name of the random pixel order, the floor every method is compared with.
RANDOM = "random"
# prepared model -> {(row shape, dtype, device): _row_bytes}: measured once, not per batch
_ROW_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def column_names(methods: Sequence[str], metrics: Sequence[str]) -> tuple[str, ...]:
    """The output columns: ``{method}_{metric}_auc`` for each method and ``random``."""
    return tuple(f"{o}_{m}_auc" for o in (*methods, RANDOM) for m in metrics)


def row_key(source: str, source_row: int) -> int:
    """A row's seed for its random pixel order: the first 8 bytes of BLAKE2b of
    ``f"{source}\\n{source_row}"`` (UTF-8), big-endian, shifted right by one bit (0 <= key < 2^63).
    The same on any actor, in any batch, on resume."""
    digest = hashlib.blake2b(f"{source}\n{int(source_row)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def step_counts(steps: int, pixels: int) -> list[int]:
    """Pixels replaced at step k = 0..K: ``round(k/K * pixels)``, halves rounded up
    (``floor(k * pixels / K + 1/2)`` in integers). Starts at 0, ends at ``pixels``."""
    return [(2 * k * pixels + steps) // (2 * steps) for k in range(steps + 1)]


def pixel_ranks(m: Tensor) -> Tensor:
    """(..., H, W) maps -> int64 (..., H*W): each pixel's place in the order (0 = first replaced).

    Pixels are ordered by value, largest first; equal values by pixel index (row-major, ``h * W
    + w``) ascending; NaN counts as -inf (last).
    """
    flat = m.detach().reshape(*m.shape[:-2], -1)
    flat = torch.nan_to_num(flat.double(), nan=-math.inf)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    src = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return ranks.scatter_(-1, order, src)


def random_ranks(keys: Sequence[int], pixels: int, device=None) -> Tensor:
    """int64 (N, pixels): the random order of each row, ``torch.randperm(pixels)`` from a CPU
    ``torch.Generator`` seeded with the row's key (``row_key``): pixel ``perm[i]`` is replaced
    i-th."""
    out = torch.empty(len(keys), pixels, dtype=torch.long)
    for i, key in enumerate(keys):
        perm = torch.randperm(pixels, generator=torch.Generator().manual_seed(int(key)))
        out[i, perm] = torch.arange(pixels)
    return out.to(device)


def auc(curve: Tensor) -> Tensor:
    """Trapezoid rule over K+1 equally spaced points on [0, 1]: (..., K+1) -> (...), float64."""
    c = curve.double()
    return (c[..., 1:] + c[..., :-1]).sum(dim=-1) / (2 * (c.shape[-1] - 1))


def _row_bytes(net: nn.Module, x1: Tensor) -> float:
    """Bytes one perturbed row needs: the activations autograd would save for it (an upper bound
    of what a forward-only pass holds at once) plus its three input copies. Measured with one
    forward the first time a prepared model sees a row shape, then remembered."""
    from xai_workers.engine import _saved_bytes_counter

    key = (tuple(x1.shape[1:]), x1.dtype, x1.device)
    known = _ROW_BYTES.setdefault(net, {})
    if key not in known:
        counter, saving = _saved_bytes_counter(net)
        # autograd must record (inference mode would record nothing and count 0 bytes)
        with torch.inference_mode(False), torch.enable_grad(), saving:
            net(x1.clone().requires_grad_(True))
        known[key] = float(counter["bytes"] + 3 * x1.numel() * x1.element_size()) or 1.0
    return known[key]


def _log_probs(net: nn.Module, inp: Tensor) -> Tensor:
    """Log softmax probabilities at ``inp`` (R, C, H, W), a channels_last batch: float64
    (R, classes), from the model's logits widened to float64."""
    logits = net(inp)
    if logits.dim() != 2:
        raise ValueError(f"model output must be (N, classes), got {tuple(logits.shape)}")
    wide = logits.double()
    return wide - torch.logsumexp(wide, dim=1, keepdim=True)


def _fill(seg: tuple, lo: int, hi: int, out: Tensor) -> None:
    """Write rows ``lo:hi`` of a segment into ``out`` (hi - lo, C, H, W) (a channels_last view).

    A segment is ``("copy", images (L, C, H, W))`` or ``("mask", on (C, H, W), off (C, H, W),
    ranks (H*W,), counts (L,))``: row r holds ``on`` at the pixels whose rank is below
    ``counts[r]`` and ``off`` elsewhere (one image broadcast over the rows: nothing gathered).
    """
    if seg[0] == "copy":
        out.copy_(seg[1][lo:hi])
        return
    _, on, off, ranks, counts = seg
    h, w = on.shape[-2:]
    replaced = (ranks[None, :] < counts[lo:hi, None]).view(hi - lo, 1, h, w)
    torch.where(replaced, on, off, out=out)


def curves(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    maps: Mapping[str, Tensor],
    baseline: Tensor,
    blurred: Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    metrics: Sequence[str] = METRICS,
    keys: Sequence[int] | None = None,
    chunk_rows: int | None = None,
    budget_mb: float | None = None,
    known: Mapping[str, Tensor] | None = None,
) -> dict[tuple[str, str], Tensor]:
    """Deletion/insertion curves of every map, and of the random order when ``keys`` are given.

    Args:
        model: classifier (N, C, H, W) -> logits (N, classes); run as ``prepare_model(model)``
            (a frozen eval copy; a prepared model is used as it is), forward passes only.
        x: (N, C, H, W) images in input space (float32; float64 with a float64 model is kept).
        targets: (N,) or (N, T) int64 classes explained (T targets per image with topk).
        maps: method -> its 2-D map (N, H, W) (or (N, T, H, W)), values ranked as they are.
        baseline: (N or 1, C, H, W): what deleted pixels become. One (1, C, H, W) baseline is
            one forward for all images.
        blurred: (N, C, H, W): the image insertion starts from (``make_baseline(x, "blur")``).
            Passing the baseline tensor itself (the blur baseline) runs those images once.
        steps: K >= 1; metrics: any of ``METRICS``; keys: one int per image (``row_key``).
        chunk_rows: perturbed images per forward; None: as many as ``budget_mb`` holds (default
            the engine's: 256/512 MB on a CPU, 35% of free memory on a GPU). The rows are cut
            into chunks of equal size (at most one row apart), so no forward runs a small rest.
        known: the targets' softmax probabilities (N,) or (N, T), float, already computed in an
            fp32 forward pass of the same prepared model, at any of ``"image"`` (x),
            ``"baseline"``, ``"blurred"`` (e.g. the trio's pass at x): those images are not run
            again.

    Returns:
        (order, metric) -> float64 (N, K+1) (or (N, T, K+1)): the target's softmax probability at
        steps k = 0..K, orders being the methods of ``maps`` then ``"random"``. A map that is
        constant or holds NaN ranks nothing: its curves are NaN.
    """
    from xai_workers.engine import _default_budget_mb, prepare_model

    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"unknown faithfulness metrics {bad}; choose from {', '.join(METRICS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got {tuple(x.shape)}")
    known = dict(known or {})
    if set(known) - {"image", "baseline", "blurred"}:
        raise ValueError(f"known: keys 'image', 'baseline', 'blurred', got {sorted(known)}")
    n, _, h, w = x.shape
    device = x.device
    targets = torch.as_tensor(targets, dtype=torch.long, device=device)
    lead = targets.shape  # (N,) or (N, T)
    tt = targets.reshape(n, -1)
    per = tt.shape[1]
    pairs = n * per
    same = blurred is baseline  # the blur baseline: one set of images for both
    x = x.detach()
    base = torch.as_tensor(baseline, dtype=x.dtype, device=device).detach()
    base = base if base.dim() == 4 else base.expand_as(x)
    if base.shape[0] != 1:
        base = base.expand_as(x)
    blur = torch.as_tensor(blurred, dtype=x.dtype, device=device).detach().expand_as(x)
    net = prepare_model(model, device=device)

    names = list(maps)
    n_maps = len(names)
    rank_list, valid_list = [], []
    for name in names:
        m = maps[name].detach().reshape(pairs, h, w)
        flat = m.reshape(pairs, -1)
        ok = torch.isfinite(flat).all(dim=1) & (flat.amax(dim=1) > flat.amin(dim=1))
        rank_list.append(pixel_ranks(m).to(device=device, dtype=torch.int32))
        valid_list.append(ok.to(device))
    if keys is not None:
        if len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} images")
        names.append(RANDOM)
        rand_ranks = random_ranks(keys, h * w, device).int()  # (N, HW): one order per image
        valid_list.append(torch.ones(pairs, dtype=torch.bool, device=device))
    inner = steps - 1  # the inside of every curve: k = 1..K-1
    counts = torch.tensor(step_counts(steps, h * w)[1:steps], dtype=torch.int32, device=device)

    # The rows, in segments of rows built the same way: first the ends of the curves (the image,
    # the baseline, the blurred image: the same for every order, run once per image, or once
    # for a shared baseline), then (map order, metric, pair) with k = 1..K-1, then the random
    # order's (metric, image) with k = 1..K-1: its perturbed images are the same for every
    # target of an image (topk), so one forward serves them all.
    segs: list[tuple] = []
    ends: dict[str, tuple[int, int]] = {}  # source -> (first row, rows)
    row = 0
    for name, images in (("image", x), ("baseline", base), ("blurred", blur)):
        if name in known or (name == "blurred" and same):
            continue
        ends[name] = (row, len(images))
        segs.append(("copy", images, len(images)))
        row += len(images)
    end_rows = row
    # (pixels replaced, pixels kept) per metric: deletion puts the baseline in the image,
    # insertion puts the image in the blurred image
    src = {
        "deletion": lambda i: (base[min(i, len(base) - 1)], x[i]),
        "insertion": lambda i: (x[i], blur[i]),
    }
    if inner:
        for oi in range(n_maps):
            for metric in metrics:
                for pair in range(pairs):
                    on, off = src[metric](pair // per)
                    segs.append(("mask", on, off, rank_list[oi][pair], counts, inner))
        if keys is not None:
            for metric in metrics:
                for i in range(n):
                    on, off = src[metric](i)
                    segs.append(("mask", on, off, rand_ranks[i], counts, inner))
    map_rows = n_maps * len(metrics) * pairs * inner
    rows = end_rows + map_rows + (len(metrics) * n * inner if keys is not None else 0)
    # the image whose targets each inside row reads (map rows: their pair's; random: all)
    img_of = torch.cat(
        [
            torch.arange(pairs, device=device).div(per, rounding_mode="floor")
            .repeat_interleave(inner).repeat(n_maps * len(metrics)),
            torch.arange(n, device=device).repeat_interleave(inner).repeat(
                len(metrics) if keys is not None else 0
            ),
        ]
    )  # fmt: skip
    inside = torch.empty(rows - end_rows, per, dtype=torch.float64, device=device)
    end_lp = None

    if rows:
        if chunk_rows is None:
            budget = (budget_mb or _default_budget_mb(device)) * 2**20
            chunk_rows = int(max(1, budget // _row_bytes(net, x[:1])))
        # equal chunks: ceil(rows / chunk_rows) forwards of at most chunk_rows rows each
        size = -(-rows // -(-rows // chunk_rows))
        si, used = 0, 0  # the segment being written and its rows already written
        # forwards only: inference mode (no autograd bookkeeping at all)
        with torch.inference_mode():
            for c0 in range(0, rows, size):
                c1 = min(rows, c0 + size)
                # straight into a channels_last batch: the layout the prepared model runs in
                inp = torch.empty(
                    (c1 - c0, *x.shape[1:]), dtype=x.dtype, device=device,
                    memory_format=torch.channels_last,
                )  # fmt: skip
                a = 0
                while a < c1 - c0:
                    seg = segs[si]
                    take = min(c1 - c0 - a, seg[-1] - used)
                    _fill(seg[:-1], used, used + take, inp[a : a + take])
                    a, used = a + take, used + take
                    if used == seg[-1]:
                        si, used = si + 1, 0
                lp = _log_probs(net, inp)  # (R, classes)
                e = max(0, min(c1, end_rows) - c0)  # the chunk's end rows: kept whole
                if e:
                    if end_lp is None:
                        end_lp = torch.empty(end_rows, lp.shape[1], dtype=lp.dtype, device=device)
                    end_lp[c0 : c0 + e] = lp[:e]
                if e < c1 - c0:
                    lo, hi = c0 + e - end_rows, c1 - end_rows
                    inside[lo:hi] = lp[e:].gather(1, tt[img_of[lo:hi]]).exp_()

    def at(name: str) -> Tensor:
        """The targets' probabilities (N, T) at one of the curves' ends."""
        if name in known:
            return torch.as_tensor(known[name], device=device).double().reshape(n, per)
        if name == "blurred" and same:
            name = "baseline"
        first, count = ends[name]
        lp = end_lp[first : first + count].expand(n, -1)
        return lp.gather(1, tt).exp()

    out = torch.empty(
        (len(names), len(metrics), pairs, steps + 1), dtype=torch.float64, device=device
    )
    for mi, metric in enumerate(metrics):
        first, last = ("image", "baseline") if metric == "deletion" else ("blurred", "image")
        out[:, mi, :, 0], out[:, mi, :, steps] = at(first).reshape(-1), at(last).reshape(-1)
    if inner:
        pm = inside[:map_rows].view(n_maps, len(metrics), pairs, inner, per)
        col = (torch.arange(pairs, device=device) % per).view(1, 1, pairs, 1, 1)
        out[:n_maps, :, :, 1:steps] = pm.gather(4, col.expand(*pm.shape[:4], 1))[..., 0]
        if keys is not None:
            pr = inside[map_rows:].view(len(metrics), n, inner, per).transpose(2, 3)
            out[-1, :, :, 1:steps] = pr.reshape(len(metrics), pairs, inner)
    valid = torch.stack(valid_list)  # (O, P)
    out = torch.where(valid[:, None, :, None], out, torch.full_like(out, math.nan))
    return {
        (name, metric): out[oi, mi].reshape(*lead, steps + 1)
        for oi, name in enumerate(names)
        for mi, metric in enumerate(metrics)
    }


def deletion_insertion(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    maps: Mapping[str, Tensor],
    baseline: Tensor,
    blurred: Tensor,
    **kwargs,
) -> dict[str, Tensor]:
    """The output columns: ``{order}_{metric}_auc`` -> float32 (N,) (or (N, T)), the trapezoid
    AUC (``auc``) of each curve of ``curves`` (same arguments); NaN for a map that ranks nothing.
    """
    got = curves(model, x, targets, maps, baseline, blurred, **kwargs)
    return {f"{order}_{metric}_auc": auc(c).float() for (order, metric), c in got.items()}
