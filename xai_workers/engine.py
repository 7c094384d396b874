"""The fused attribution sweep: saliency, Integrated Gradients, Grad-CAM and CAM in one pass.

Integrated Gradients runs the model forward and backward at n points on the straight path from the
baseline x' to the image x. Saliency is the input gradient at x itself, Grad-CAM needs the target
layer's activations and gradients at x itself, and the prediction is the forward pass at x. So one
forward + backward at x (with the Grad-CAM layer observed) followed by one batched sweep over the
path points of all images serves every method; the point a = 1 of a rule that contains it is the
pass at x, and the point a = 0 gives F(x') for free. Definitions: docs/conventions.md.

The rooms (docs/engine.md):

- ``prepare``: the model's fastest exact form (``prepare_model``): every rewrite made to the
  caller's copy, each with its exactness argument;
- this module: ``attribute`` (one call: check, prepare, the pass at x, the sweep), the pass at x
  and its readouts (prediction, target, saliency, Grad-CAM and its family, CAM), baselines;
- ``sweep``: path points in chunks of a memory budget, the input-layer shortcut, fixed rules;
- ``adaptive_ig``: ``ig_steps="auto"`` on the same chunks;
- ``smoothgrad``: SmoothGrad's noisy rows, which run in the sweep's chunks.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xai_workers import cams
from xai_workers.adaptive_ig import AUTO_KEYS as _AUTO_KEYS
from xai_workers.adaptive_ig import Adaptive as _Adaptive
from xai_workers.adaptive_ig import ig_sweep_auto
from xai_workers.hooks import (
    as_grid,
    capture_activation,
    default_gradcam_layer,
    grid_layout,
    hooks_removed_after,
)

# The model's preparation and the sweep's memory are public here too: other modules, tests and
# benchmarks import them from xai_workers.engine.
from xai_workers.prepare import (  # noqa: F401
    _PREPARED,
    SequenceFirstAttention,
    SpaceToDepthConv,
    fold_batchnorm,
    form,
    input_layer,
    pool_before_relu,
    prepare_model,
    sequence_first_attention,
    space_to_depth_stems,
)
from xai_workers.quadrature import ADAPTIVE_MIN_LEVEL, adaptive_max_level, path_points
from xai_workers.smoothgrad import make_noisy, smoothgrad_noise  # noqa: F401
from xai_workers.sweep import default_budget_mb as _default_budget_mb  # noqa: F401
from xai_workers.sweep import (
    ig_sweep,
    keep_freed_memory,  # noqa: F401
    saved_bytes_counter,
    scores,
    wide,
)
from xai_workers.sweep import saved_bytes_counter as _saved_bytes_counter  # noqa: F401

#: The Grad-CAM family besides Grad-CAM itself: weighting functions (``xai_workers.cams``) over
#: the same layer's activations and gradients at x, read out of the pass at x (no extra pass).
CAM_FAMILY = cams.FAMILY
#: SmoothGrad (Smilkov et al. 2017) and its variants: input gradients at noisy copies of x.
SMOOTHGRAD = cams.SMOOTHGRAD
METHODS = ("saliency", "integrated_gradients", "gradcam", "cam", *CAM_FAMILY, *SMOOTHGRAD)
#: Methods that read the Grad-CAM layer (``gradcam_layer``).
LAYER_METHODS = ("gradcam", "cam", *CAM_FAMILY)
DEFAULT_METHODS = ("saliency", "integrated_gradients", "gradcam")
BASELINES = ("black", "gray", "zeros", "blur", "uniform")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOPK_REPORTED = 5
# Relative IG completeness error above which a row computed in bf16 is recomputed in fp32.
BF16_MAX_REL_DELTA = 0.05

# prepared model -> {(input shape, dtype, device): its default Grad-CAM layer}
_DEFAULT_LAYER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def make_baseline(
    x: torch.Tensor,
    kind: str = "black",
    preprocessing=None,
    *,
    seed: int = 0,
    blur_sigma: float | None = None,
) -> torch.Tensor:
    """The IG baseline x' for a batch ``x`` (N, C, H, W) in input space.

    Baselines are built in pixel space and normalized like the image with ``preprocessing.mean``
    and ``.std`` (ImageNet's when ``preprocessing`` is None): ``black`` (pixels 0), ``gray``
    (0.5), ``uniform`` (pixels uniform in [0, 1] from ``seed``, the same noise for every image so a
    row's baseline does not depend on its batch), ``blur`` (Gaussian blur of each image, sigma
    ``blur_sigma`` pixels, default H / 16; blurring commutes with the per-channel normalization),
    and ``zeros`` (0 in input space, Captum's default). Returns (1, C, H, W) for the image-free
    kinds and (N, C, H, W) for ``blur``, float32, on x's device.
    """
    mean = torch.tensor(getattr(preprocessing, "mean", IMAGENET_MEAN), dtype=x.dtype)
    std = torch.tensor(getattr(preprocessing, "std", IMAGENET_STD), dtype=x.dtype)
    mean, std = mean.view(1, -1, 1, 1).to(x.device), std.view(1, -1, 1, 1).to(x.device)
    shape = (1, *x.shape[1:])
    if kind == "zeros":
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    if kind in ("black", "gray"):
        pixels = torch.full(shape, 0.0 if kind == "black" else 0.5, dtype=x.dtype, device=x.device)
        return (pixels - mean) / std
    if kind == "uniform":
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.rand(shape, generator=gen, dtype=x.dtype).to(x.device)
        return (pixels - mean) / std
    if kind == "blur":
        from torchvision.transforms.v2.functional import gaussian_blur

        sigma = blur_sigma if blur_sigma is not None else x.shape[-2] / 16
        size = 2 * math.ceil(3 * sigma) + 1
        size = min(size, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
        return gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])
    raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


# --------------------------------------------------------------------------------------------
# attribute: the story of one call
# --------------------------------------------------------------------------------------------


def attribute(
    model: nn.Module,
    x: torch.Tensor,
    target=None,
    methods: Sequence[str] = DEFAULT_METHODS,
    ig_steps: int | str = 32,
    ig_method: str = "gausslegendre",
    baseline: torch.Tensor | None = None,
    gradcam_layer: str | None = None,
    *,
    ig_tol: float = 0.01,
    ig_max_steps: int = 256,
    score: str = "logit",
    saliency_mode: str = "abs",
    saliency_channels: bool = False,
    batch_budget_mb: float | None = None,
    precision: str = "fp32",
    smoothgrad_samples: int = 16,
    smoothgrad_sigma: float = 0.15,
    noise_keys: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Saliency, Integrated Gradients, Grad-CAM and CAM for a batch, in one fused sweep.

    Args:
        model: a classifier mapping (N, C, H, W) to logits (N, classes). It is left as it was
            found (no hooks, same requires_grad flags, same mode): the work runs on
            ``prepare_model(model)``, a frozen copy; pass a prepared model to skip the copy.
        x: (N, C, H, W) float32 in input space (preprocessed and normalized), on the device the
            work should run on. float64 (with a float64 model) is kept as it is: an exact mode
            for checks against other implementations.
        target: None (the predicted class, argmax of the logits at x), an int for every image,
            a sequence/LongTensor (N,) with one class per image, or ``"topk:K"`` (the K best
            classes of each image: every per-target output gains an axis of size K after N).
        methods: any of "saliency", "integrated_gradients", "gradcam", "cam", and the rest of the
            Grad-CAM family, "gradcam_pp", "xgradcam", "layercam", "eigencam" (``cams``: weighting
            functions of the same layer's activations and gradients at x, upsampled as Grad-CAM).
        ig_steps, ig_method: the IG quadrature (``quadrature.path_points``). ``ig_steps="auto"``
            chooses the steps per image (and target): nested Clenshaw-Curtis levels of 2^k + 1
            points (a pair converging like 1/n moves to nested trapezoid levels), refined until
            the estimated relative L2 error of the IG map is <= ``ig_tol`` or the finest level
            2^k <= ``ig_max_steps`` is reached (``adaptive_ig``; docs/conventions.md, "Adaptive
            Integrated Gradients"); ``ig_method`` is not used then.
        baseline: x' broadcastable to x ((1, C, H, W) or (N, C, H, W)); None means zeros in
            input space. ``make_baseline`` builds the named ones.
        gradcam_layer: dotted name of a layer whose output reads as a grid with h, w > 1
            (``hooks.grid_layout``: (N, K, h, w), (N, h, w, D), or tokens (N, T, D) with T = h*w
            or 1 + h*w, a class token dropped); None picks the last (N, K, h, w) layer before the
            head, or a transformer's last block (``hooks.default_gradcam_layer``). Also CAM's.
        score: "logit" (default) or "prob" (softmax probability of the target).
        saliency_mode: "abs" (|dF/dx|) or "square" (the squared-gradient sensitivity map).
        saliency_channels: keep the channel axis of the saliency map instead of max over it.
        batch_budget_mb: memory for the activations autograd saves per chunk of path points;
            None = 512 MB on a CPU after ``keep_freed_memory()``, else 256 MB; 35% of free
            memory on a GPU.
        precision: "fp32"; "bf16" (autocast on the device); or "auto": bf16 on CUDA with every
            row whose relative completeness error |ig_delta| / |F(x) - F(x')| exceeds
            ``BF16_MAX_REL_DELTA`` (with ``ig_steps="auto"``: or whose ``ig_error_est`` exceeds
            ``ig_tol``) recomputed in fp32, fp32 elsewhere.

    Returns:
        dict of float32/int64 tensors on x's device, with K = the topk axis when asked for:
        ``pred_class`` (N,) int64, ``pred_prob`` (N,), ``topk_classes`` (N, 5) int64 and
        ``topk_probs`` (N, 5) (fewer columns for fewer classes); ``target`` (N[, K]) int64,
        ``score`` = F(x) (N[, K]); with IG ``baseline_score`` = F(x') and ``ig_delta`` =
        sum(IG) - (F(x) - F(x')) (N[, K]), ``integrated_gradients`` (N[, K], C, H, W);
        ``saliency`` (N[, K], H, W) (or (N[, K], C, H, W) with ``saliency_channels``);
        ``gradcam`` and ``cam`` (N[, K], H, W), raw (Grad-CAM after its ReLU, CAM signed).
        With ``ig_steps="auto"`` also ``ig_steps`` (N[, K]) int32 (gradient evaluations used,
        a = 1 included), ``ig_error_est`` (N[, K]) float32, ``ig_converged`` (N[, K]) bool,
        and the path trace ``ig_path_alpha``, ``ig_path_score`` (N[, K], P) float32, P =
        the most points ``ig_max_steps`` allows (``adaptive_ig.trace_length``): the first
        ``ig_steps`` entries are the alphas in ascending order and F at them, the rest NaN.
    """
    _check(x, methods, score, saliency_mode, precision)
    methods = tuple(methods)
    if any(m in SMOOTHGRAD for m in methods):
        _check_smoothgrad(x, smoothgrad_samples, smoothgrad_sigma, noise_keys)
    adaptive, alphas, weights = _ig_rule(ig_steps, ig_method, ig_tol, ig_max_steps)
    x = x.detach()
    x = x if x.dtype == torch.float64 else x.float()  # float64 stays: an exact oracle mode
    baseline = _as_baseline(baseline, x)
    net = prepare_model(model, device=x.device, gradcam_layer=gradcam_layer)
    if any(m in LAYER_METHODS for m in methods):
        gradcam_layer = _gradcam_layer(net, x, gradcam_layer)
    kwargs = dict(
        target=target,
        methods=methods,
        alphas=alphas,
        weights=weights,
        baseline=baseline,
        layer=gradcam_layer,
        score=score,
        saliency_mode=saliency_mode,
        saliency_channels=saliency_channels,
        budget_mb=batch_budget_mb,
        adaptive=adaptive,
        smoothgrad=(int(smoothgrad_samples), float(smoothgrad_sigma), noise_keys),
    )
    use_bf16 = precision == "bf16" or (precision == "auto" and x.device.type == "cuda")
    with torch.enable_grad():
        out = _run(net, x, bf16=use_bf16, **kwargs)
        if precision == "auto" and use_bf16 and "integrated_gradients" in methods:
            _redo_inexact_rows_in_fp32(net, x, out, kwargs)
    return out


def _check(x, methods, score, saliency_mode, precision) -> None:
    """ValueError for an unknown method, score, saliency mode or precision, or x not 4-D."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if score not in ("logit", "prob"):
        raise ValueError(f"score must be 'logit' or 'prob', got {score!r}")
    if saliency_mode not in ("abs", "square"):
        raise ValueError(f"saliency_mode must be 'abs' or 'square', got {saliency_mode!r}")
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")


def _check_smoothgrad(x, samples, sigma, noise_keys) -> None:
    if int(samples) < 1 or not sigma > 0:
        raise ValueError("smoothgrad_samples must be >= 1 and smoothgrad_sigma > 0")
    if noise_keys is not None and len(noise_keys) != x.shape[0]:
        raise ValueError(f"noise_keys: one per image ({x.shape[0]}), got {len(noise_keys)}")


def _ig_rule(ig_steps, ig_method, ig_tol, ig_max_steps):
    """(adaptive settings or None, points, weights) of the IG quadrature asked for."""
    if not isinstance(ig_steps, str):
        return (None, *path_points(ig_steps, ig_method))
    if ig_steps != "auto":
        raise ValueError(f"ig_steps must be a positive integer or 'auto', got {ig_steps!r}")
    if not 0 < ig_tol < 1:
        raise ValueError(f"ig_tol must be in (0, 1), got {ig_tol!r}")
    adaptive = _Adaptive(float(ig_tol), ADAPTIVE_MIN_LEVEL, adaptive_max_level(ig_max_steps))
    return adaptive, np.array([0.0, 1.0]), np.array([0.5, 0.5])  # not used by the sweep


def _as_baseline(baseline, x: torch.Tensor) -> torch.Tensor | None:
    """``baseline`` as a 4-D tensor of x's dtype and device (None stays None)."""
    if baseline is None:
        return None
    baseline = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).detach()
    try:
        torch.broadcast_shapes(baseline.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"baseline of shape {tuple(baseline.shape)} does not broadcast to {tuple(x.shape)}"
        ) from None
    if baseline.dim() < 4:
        baseline = baseline.expand(x.shape) if baseline.dim() == 0 else baseline[None]
    return baseline


def _gradcam_layer(net: nn.Module, x: torch.Tensor, gradcam_layer: str | None) -> str:
    """The Grad-CAM layer's name (the default one when None), refused when ``prepare_model``
    changed its output."""
    if gradcam_layer is None:
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        layers = _DEFAULT_LAYER.setdefault(net, {})
        if key not in layers:  # a forward pass: once per prepared model and input shape
            layers[key] = default_gradcam_layer(net, x[:1])
        gradcam_layer = layers[key]
    if gradcam_layer in form(net).altered:
        raise ValueError(
            f"prepare_model folded a BatchNorm into layer {gradcam_layer!r} or moved it after "
            f"a pool, so its output is no longer its own: prepare the model with "
            f"prepare_model(model, gradcam_layer={gradcam_layer!r})"
        )
    return gradcam_layer


def _redo_inexact_rows_in_fp32(net, x, out, kwargs) -> None:
    """Recompute in fp32 the rows whose bf16 IG completeness error is too large (in place)."""
    gap = (out["score"] - out["baseline_score"]).abs().clamp_min(1e-6)
    rel = out["ig_delta"].abs() / gap
    bad = rel.reshape(rel.shape[0], -1).amax(dim=1) > BF16_MAX_REL_DELTA
    if kwargs["adaptive"] is not None:  # ig_steps="auto": also rows above the error target
        err = out["ig_error_est"].reshape(rel.shape[0], -1).amax(dim=1)
        bad |= err > kwargs["adaptive"].tol
    if not bad.any():
        return
    idx = bad.nonzero().reshape(-1)
    sub = dict(kwargs)
    if isinstance(sub["target"], (torch.Tensor, list, tuple)):
        sub["target"] = torch.as_tensor(sub["target"], device=x.device).reshape(-1)[idx]
    if sub["baseline"] is not None and sub["baseline"].shape[0] == x.shape[0]:
        sub["baseline"] = sub["baseline"][idx]
    redo = _run(net, x[idx], bf16=False, **sub)
    for key, value in redo.items():
        out[key][idx] = value


# --------------------------------------------------------------------------------------------
# One call: the pass at x and its readouts, then the sweep
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wants:
    """What a call needs, from its methods and IG rule."""

    methods: tuple
    ig: bool
    saliency: bool
    gradcam: bool
    cam: bool
    family: tuple  # the Grad-CAM family members asked for
    smoothgrad: tuple  # the SmoothGrad variants asked for
    layer_grad: bool  # the layer's gradient at x: Grad-CAM and every family member but EigenCAM
    has_one: bool  # the rule evaluates a = 1: the pass at x (ig_steps="auto" always does)
    has_zero: bool  # ... and a = 0: F(x') comes from the sweep
    grad_at_x: bool  # a backward at x
    measure: bool  # keep the graph at x to measure the bytes a row saves (sizes the chunks)

    @staticmethod
    def of(methods, alphas, adaptive) -> _Wants:
        ig = "integrated_gradients" in methods
        family = tuple(m for m in CAM_FAMILY if m in methods)
        sg = tuple(m for m in SMOOTHGRAD if m in methods)
        gc, sal = "gradcam" in methods, "saliency" in methods
        layer_grad = gc or any(m not in cams.GRADIENT_FREE for m in family)
        has_one = bool(ig and (adaptive is not None or abs(alphas[-1] - 1.0) < 1e-12))
        has_zero = bool(ig and (adaptive is not None or abs(alphas[0]) < 1e-12))
        return _Wants(
            methods, ig, sal, gc, "cam" in methods, family, sg, layer_grad, has_one, has_zero,
            grad_at_x=sal or layer_grad or has_one, measure=ig or bool(sg),
        )  # fmt: skip


@dataclass(frozen=True)
class _AtX:
    """The pass at x: ``xin`` the input (requires grad when needed), ``logits`` (N, classes),
    ``act`` the Grad-CAM layer's output (None without layer methods), ``head_in`` the input of the
    last Linear (CAM only), ``per_row_bytes`` what autograd saved per row."""

    xin: torch.Tensor
    logits: torch.Tensor
    act: torch.Tensor | None
    head_in: torch.Tensor | None
    per_row_bytes: float


def _pass_at_x(net, x, layer, want: _Wants, autocast) -> _AtX:
    """One forward at x with the Grad-CAM layer (and for CAM the head's input) observed; the
    graph is kept when a backward or the per-row memory measurement needs it."""
    counter, saving = saved_bytes_counter(net)
    fc_in: dict = {}
    with hooks_removed_after() as handles:
        if want.cam:

            def keep_head_input(m, inputs, output):  # returns None: the output is left alone
                fc_in["x"] = inputs[0]

            handles.append(_last_linear(net).register_forward_hook(keep_head_input))
        observe = want.gradcam or want.cam or want.family
        layer_ctx = capture_activation(net, layer) if observe else None
        with layer_ctx or contextlib.nullcontext() as store, saving, autocast:
            # with IG the graph is kept even without a backward here: it measures the memory
            # autograd saves per row, which sizes the sweep's chunks
            xin = x.clone().requires_grad_(want.grad_at_x or want.measure)
            with torch.set_grad_enabled(want.grad_at_x or want.measure):
                logits = net(xin)
            if logits.dim() != 2:
                raise ValueError(f"model output must be (N, classes), got {tuple(logits.shape)}")
    act = store["act"] if store is not None else None
    if act is not None and grid_layout(act.shape) is None:
        raise ValueError(
            f"layer {layer!r} outputs {tuple(act.shape)}, which does not read as a grid with "
            "h, w > 1: (N, K, h, w), (N, h, w, D) or tokens (N, T, D) with T = h*w or 1 + h*w"
        )
    per_row = max(counter["bytes"] / x.shape[0], 1.0)
    return _AtX(xin, logits, act, fc_in.get("x"), per_row)


def _predictions(logits, target, score: str, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The prediction, top-5 and targets from the logits at x (N, classes): (result with
    pred_class, pred_prob, topk_classes, topk_probs, target (N, K), score (N, K); the targets
    (N, K) int64; the target scores s_x (N, K), in the graph when there is one)."""
    n = logits.shape[0]
    mode, given = _parse_target(target, n, device)
    probs = torch.softmax(wide(logits.detach()), dim=1)
    k5 = min(TOPK_REPORTED, probs.shape[1])
    topk_probs, topk_classes = probs.topk(k5, dim=1)
    result = {"pred_class": topk_classes[:, 0].clone(), "pred_prob": topk_probs[:, 0]}
    result["topk_classes"], result["topk_probs"] = topk_classes, topk_probs
    if mode == "predicted":
        targets = topk_classes[:, :1].clone()
    elif mode == "topk":
        if given > probs.shape[1]:
            raise ValueError(
                f"topk:{given} asks for more classes than the {probs.shape[1]} there are"
            )
        targets = wide(logits.detach()).topk(given, dim=1).indices
    else:
        targets = given
        if targets.min() < 0 or targets.max() >= probs.shape[1]:
            raise ValueError(f"target classes must lie in [0, {probs.shape[1]})")
    s_x = scores(logits, score).gather(1, targets)  # (N, K)
    result["target"], result["score"] = targets, wide(s_x.detach())
    return result, targets, s_x


def _cam(net, at: _AtX, layout, layer, target: torch.Tensor, size) -> torch.Tensor:
    """CAM (N, H, W) for the classes ``target`` (N,): the head's weights over the layer's
    activations, upsampled; ValueError when the head is not GAP + one Linear of that layer."""
    a = wide(as_grid(at.act.detach(), layout))
    pooled, head_in = a.mean(dim=(2, 3)), wide(at.head_in.detach())
    if head_in.shape != pooled.shape or not torch.allclose(pooled, head_in, rtol=1e-3, atol=1e-4):
        raise ValueError(
            f"CAM needs the head to be global average pooling of {layer!r} followed by "
            "one Linear layer; use gradcam for this model"
        )
    w = wide(_last_linear(net).weight)[target]  # (N, K_channels)
    m = (w[:, :, None, None] * a).sum(dim=1, keepdim=True)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0]


def _readouts_at_x(net, at: _AtX, s_x, targets, layer, want: _Wants, saliency_mode,
                   saliency_channels) -> tuple[dict, list]:  # fmt: skip
    """Saliency, Grad-CAM, its family and CAM from the pass at x, one backward per target:
    ({method: list of K maps}, the K input gradients at x (N, C, H, W) when IG reuses a = 1)."""
    size = tuple(at.xin.shape[-2:])
    maps: dict[str, list[torch.Tensor]] = {m: [] for m in ("saliency", "gradcam", "cam")}
    maps.update({m: [] for m in want.family})
    g_x = []
    act = at.act
    layout = grid_layout(act.shape) if act is not None else None
    kk = targets.shape[1]
    for j in range(kk):
        if want.grad_at_x:
            inputs = [at.xin] + ([act] if want.layer_grad else [])
            grads = torch.autograd.grad(s_x[:, j].sum(), inputs, retain_graph=j < kk - 1)
            gx = wide(grads[0])
            if want.has_one:
                g_x.append(gx)
            if want.saliency:
                s = gx.abs() if saliency_mode == "abs" else gx * gx
                maps["saliency"].append(s if saliency_channels else s.amax(dim=1))
            if want.gradcam:
                a, g = as_grid(act.detach(), layout), as_grid(grads[1], layout)
                maps["gradcam"].append(_gradcam_map(a, g, size))
        for m in want.family:
            g_layer = None if m in cams.GRADIENT_FREE else as_grid(grads[1], layout)
            maps[m].append(cams.cam_map(m, as_grid(act.detach(), layout), g_layer, size))
        if want.cam:
            maps["cam"].append(_cam(net, at, layout, layer, targets[:, j], size))
    return {m: v for m, v in maps.items() if v}, g_x


def _run(
    net: nn.Module,
    x: torch.Tensor,
    *,
    target,
    methods,
    alphas,
    weights,
    baseline,
    layer,
    score,
    saliency_mode,
    saliency_channels,
    budget_mb,
    bf16: bool,
    adaptive: _Adaptive | None = None,
    smoothgrad: tuple = (16, 0.15, None),
) -> dict[str, torch.Tensor]:
    """One call on the prepared ``net``: 1. the pass at x (prediction, target, saliency, Grad-CAM
    and its family, CAM); 2. one chunked sweep for IG's path points of all (image, target) pairs
    and SmoothGrad's noisy copies of x, one forward + backward per chunk for both kinds of rows;
    3. the result shaped as ``attribute`` documents."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)
    x = x.contiguous(memory_format=torch.channels_last)
    want = _Wants.of(methods, alphas, adaptive)
    at = _pass_at_x(net, x, layer, want, autocast)
    result, targets, s_x = _predictions(at.logits, target, score, x.device)
    topk = isinstance(target, str) and target.startswith("topk:")
    maps, g_x = _readouts_at_x(net, at, s_x, targets, layer, want, saliency_mode,
                               saliency_channels)  # fmt: skip
    per_row_bytes = at.per_row_bytes
    del at, s_x  # the graph at x: freed before the sweep
    for m, ts in maps.items():
        result[m] = torch.stack(ts, dim=1) if topk else ts[0]
    noisy = None
    if want.smoothgrad:
        samples, sigma, keys = smoothgrad
        noisy = make_noisy(x, targets.numel(), samples, sigma, keys, apart=bf16)
    common = (budget_mb, per_row_bytes, autocast, noisy)
    if want.ig and adaptive is not None:
        result.update(ig_sweep_auto(net, x, targets, baseline, score, g_x, result["score"],
                                    adaptive, *common))  # fmt: skip
    elif want.ig or noisy is not None:
        result.update(ig_sweep(net, x, targets, alphas, weights, baseline, score, g_x,
                               want.has_one, want.has_zero, *common, ig=want.ig))  # fmt: skip
    return _shaped(result, want, topk)


def _shaped(result: dict, want: _Wants, topk: bool) -> dict:
    """ig_delta added, the target axis K dropped unless the target was topk:K."""
    if want.ig:
        result["ig_delta"] = result["integrated_gradients"].sum(dim=(-3, -2, -1)) - (
            result["score"] - result["baseline_score"]
        )
        if not topk:
            for key in ("integrated_gradients", "baseline_score", "ig_delta", *_AUTO_KEYS):
                if key in result:
                    result[key] = result[key].squeeze(1)
    for m in SMOOTHGRAD:  # the sweep gives all three variants: keep those asked for
        if m in result and m not in want.smoothgrad:
            del result[m]
        elif m in result and not topk:
            result[m] = result[m][:, 0]
    if not topk:
        result["target"], result["score"] = result["target"][:, 0], result["score"][:, 0]
    return result


def _parse_target(target, n: int, device) -> tuple[str, object]:
    """Normalize ``target`` to ("predicted", None) | ("given", LongTensor (N, 1)) | ("topk", K)."""
    if target is None or (isinstance(target, str) and target == "predicted"):
        return "predicted", None
    if isinstance(target, str):
        if target.startswith("topk:"):
            k = int(target.split(":", 1)[1])
            if k < 1:
                raise ValueError(f"topk target needs K >= 1, got {target!r}")
            return "topk", k
        raise ValueError(f"unknown target {target!r}; use None, an int, a tensor or 'topk:K'")
    if isinstance(target, int):
        return "given", torch.full((n, 1), target, dtype=torch.long, device=device)
    t = torch.as_tensor(target, dtype=torch.long, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries for a batch of {n} images")
    return "given", t.reshape(n, 1).clone()


def _gradcam_map(act: torch.Tensor, grad: torch.Tensor, size) -> torch.Tensor:
    """Grad-CAM: ReLU(sum_k mean_hw(G_k) A_k), upsampled bilinearly to ``size``. (R, H, W)."""
    weights = wide(grad).mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * wide(act)).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("CAM needs a model that ends in global average pooling and a Linear")
    return linears[-1]
