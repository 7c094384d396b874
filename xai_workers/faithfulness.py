"""Deletion and insertion (Petsiuk et al. 2018, RISE): is a map telling the truth about the model?

Rank the pixels by a method's 2-D map; delete the most important ones first (replace them by the
baseline) and watch the target's probability fall, or insert them first into a blurred image and
watch it rise. A faithful map makes deletion fall fast (low AUC) and insertion rise fast (high
AUC). The same curves for a random pixel order are the floor a map must beat. Definitions, exactly:
docs/conventions.md ("Faithfulness").

Forward passes only (under ``torch.inference_mode``, on the prepared model), batched: the perturbed
images of all (image, target) pairs, orders, metrics and steps are rows cut into chunks under a
memory budget, as the engine's IG sweep is. Where rows would be the same image they run once: the
two ends of every curve (k = 0 and k = K) are the same images for every order, the image itself,
the baseline and the blurred image, so they are run once per image; the random order is one per
image, so its perturbed images are run once per image for all of its targets (``topk``).
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


def _softmax(net: nn.Module, inp: Tensor) -> Tensor:
    """Softmax probabilities at ``inp`` (R, C, H, W): float64 (R, classes)."""
    logits = net(inp.contiguous(memory_format=torch.channels_last))  # no copy if it already is
    if logits.dim() != 2:
        raise ValueError(f"model output must be (N, classes), got {tuple(logits.shape)}")
    return torch.softmax(logits.double(), dim=1)


def _probs(net: nn.Module, inp: Tensor, targets: Tensor) -> Tensor:
    """Softmax probabilities of ``targets`` (R, T) at ``inp`` (R, C, H, W): float64 (R, T)."""
    return _softmax(net, inp).gather(1, targets)


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
) -> dict[tuple[str, str], Tensor]:
    """Deletion/insertion curves of every map, and of the random order when ``keys`` are given.

    Args:
        model: classifier (N, C, H, W) -> logits (N, classes); run as ``prepare_model(model)``
            (a frozen eval copy; a prepared model is used as it is), forward passes only.
        x: (N, C, H, W) images in input space (float32; float64 with a float64 model is kept).
        targets: (N,) or (N, T) int64 classes explained (T targets per image with topk).
        maps: method -> its 2-D map (N, H, W) (or (N, T, H, W)), values ranked as they are.
        baseline: (N or 1, C, H, W): what deleted pixels become.
        blurred: (N, C, H, W): the image insertion starts from (``make_baseline(x, "blur")``).
        steps: K >= 1; metrics: any of ``METRICS``; keys: one int per image (``row_key``).
        chunk_rows: perturbed images per forward; None: as many as ``budget_mb`` holds (default
            the engine's: 256/512 MB on a CPU, 35% of free memory on a GPU).

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
    n, _, h, w = x.shape
    device = x.device
    targets = torch.as_tensor(targets, dtype=torch.long, device=device)
    lead = targets.shape  # (N,) or (N, T)
    tt = targets.reshape(n, -1)
    per = tt.shape[1]
    pairs = n * per
    x = x.detach()
    base = torch.as_tensor(baseline, dtype=x.dtype, device=device).detach().expand_as(x)
    blur = torch.as_tensor(blurred, dtype=x.dtype, device=device).detach().expand_as(x)
    sources = torch.stack([x, base, blur])  # (3, N, C, H, W): image, baseline, blurred
    net = prepare_model(model, device=device)

    names = list(maps)
    n_maps = len(names)
    rank_list, valid_list = [], []
    for name in names:
        m = maps[name].detach().reshape(pairs, h, w)
        flat = m.reshape(pairs, -1)
        ok = torch.isfinite(flat).all(dim=1) & (flat.amax(dim=1) > flat.amin(dim=1))
        rank_list.append(pixel_ranks(m))
        valid_list.append(ok)
    if keys is not None:
        if len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} images")
        names.append(RANDOM)
        rand_ranks = random_ranks(keys, h * w, device)  # (N, HW): one order per image
        valid_list.append(torch.ones(pairs, dtype=torch.bool, device=device))
    ranks = torch.stack(rank_list).to(device) if rank_list else None  # (O maps, P, HW)
    counts = torch.tensor(step_counts(steps, h * w), device=device)
    # (metric) -> index of (pixels replaced, pixels kept) sources: deletion puts the baseline in
    # the image, insertion puts the image in the blurred image
    src_of = {"deletion": (1, 0), "insertion": (0, 2)}
    on_src = torch.tensor([src_of[m][0] for m in metrics], device=device)
    off_src = torch.tensor([src_of[m][1] for m in metrics], device=device)

    if chunk_rows is None:
        budget = (budget_mb or _default_budget_mb(device)) * 2**20
        chunk_rows = int(max(1, budget // _row_bytes(net, x[:1])))
    # forwards only: inference mode (no autograd bookkeeping at all)
    with torch.inference_mode():
        # the ends of every curve: p at the image, the baseline and the blurred image, per pair
        ends_rows = 3 * n
        ends = torch.empty(3, pairs, dtype=torch.float64, device=device)
        src_flat = sources.reshape(3 * n, *x.shape[1:])
        every = torch.arange(per, device=device)
        for start in range(0, ends_rows, chunk_rows):
            r = torch.arange(start, min(ends_rows, start + chunk_rows), device=device)
            which, img = r // n, r % n  # every target of an image from the same logits
            ends[which[:, None], img[:, None] * per + every] = _probs(net, src_flat[r], tt[img])
        out = torch.full(
            (len(names), len(metrics), pairs, steps + 1), math.nan, dtype=torch.float64,
            device=device,
        )  # fmt: skip
        for mi, metric in enumerate(metrics):
            first, last = (0, 1) if metric == "deletion" else (2, 0)
            out[:, mi, :, 0], out[:, mi, :, steps] = ends[first], ends[last]
        # the inside of every curve: rows (map order, metric, pair, k = 1..K-1), k fastest, then
        # the random order's rows (metric, image, k): its perturbed images are the same for every
        # target of an image (topk), so one forward serves them all
        inner = steps - 1
        map_rows = n_maps * len(metrics) * pairs * inner
        rows = map_rows + (len(metrics) * n * inner if keys is not None else 0)
        flat_t = tt.reshape(-1)
        for start in range(0, rows, chunk_rows):
            r = torch.arange(start, min(rows, start + chunk_rows), device=device)
            ra, rb = r[r < map_rows], r[r >= map_rows] - map_rows
            k, rest = ra % inner + 1, ra // inner
            pair, rest = rest % pairs, rest // pairs
            mi, oi = rest % len(metrics), rest // len(metrics)
            kb, rest = rb % inner + 1, rb // inner
            img_b, mi_b = rest % n, rest // n
            img = torch.cat([pair // per, img_b])
            parts = [ranks[oi, pair] < counts[k][:, None]] if len(ra) else []
            if len(rb):
                parts.append(rand_ranks[img_b] < counts[kb][:, None])
            replaced = torch.cat(parts).view(-1, 1, h, w)  # (R, 1, H, W)
            m_all = torch.cat([mi, mi_b])
            # straight into a channels_last batch: the layout the prepared model runs in
            inp = torch.empty(
                (len(r), *x.shape[1:]), dtype=x.dtype, device=device,
                memory_format=torch.channels_last,
            )  # fmt: skip
            torch.where(
                replaced, sources[on_src[m_all], img], sources[off_src[m_all], img], out=inp
            )
            p = _softmax(net, inp)  # (R, classes)
            cut = len(ra)
            if cut:
                out[oi, mi, pair, k] = p[:cut].gather(1, flat_t[pair][:, None])[:, 0]
            if len(rb):
                cols = img_b[:, None] * per + every  # every target of the image
                out[-1, mi_b[:, None], cols, kb[:, None]] = p[cut:].gather(1, tt[img_b])
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
