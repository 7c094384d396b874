"""The fused attribution sweep: saliency, Integrated Gradients, Grad-CAM and CAM in one pass.

Integrated Gradients runs the model forward and backward at n points on the straight path from the
baseline x' to the image x. Saliency is the input gradient at x itself, Grad-CAM needs the target
layer's activations and gradients at x itself, and the prediction is the forward pass at x. So one
forward + backward at x (with the Grad-CAM layer observed) followed by one batched sweep over the
path points of all images serves every method; the point a = 1 of a rule that contains it is the
pass at x, and the point a = 0 gives F(x') for free. Definitions: docs/conventions.md.

Speed comes from the form of the model (``prepare_model``: a frozen copy, eval-mode BatchNorm
folded into the preceding convolution, channels_last), from gradients taken with respect to the
input only (parameters never get gradients), and from batching path points of several images up
to a memory budget.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xai_workers import cams
from xai_workers.hooks import (
    as_grid,
    capture_activation,
    default_gradcam_layer,
    grid_layout,
    hooks_removed_after,
)
from xai_workers.quadrature import ADAPTIVE_MIN_LEVEL, adaptive_max_level, path_points

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
#: What ig_steps="auto" adds to the result (``_ig_sweep_auto``).
_AUTO_KEYS = (
    "ig_steps",
    "ig_error_est",
    "ig_converged",
    "ig_path_alpha",
    "ig_path_score",
)
# Relative IG completeness error above which a row computed in bf16 is recomputed in fp32.
BF16_MAX_REL_DELTA = 0.05


@dataclass(frozen=True)
class _Form:
    """What ``prepare_model`` did to a model: the layers whose output is no longer their own
    (convolutions with a BatchNorm folded in, ReLUs now run after their max-pool), and the layer
    that alone reads the input (``input_layer``; None if there is none)."""

    altered: frozenset[str]
    input_layer: str | None


# prepared model -> its _Form
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# prepared model -> {(input shape, dtype, device): its default Grad-CAM layer}
_DEFAULT_LAYER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# The fastest exact form of a model
# --------------------------------------------------------------------------------------------


def _traced(model: nn.Module) -> tuple[torch.fx.Graph, dict[str, int]] | None:
    """``model``'s torch.fx graph and how often each module is called in it; None if torch.fx
    cannot trace it (such models are simply left as they are)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means "leave the model alone"
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return graph, calls


def _chained_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(a, b) for every module b that torch.fx shows called on the output of module a, where
    that output feeds nothing but b and both modules run exactly once."""
    traced = _traced(model)
    if traced is None:
        return []
    graph, calls = traced
    pairs = []
    for node in graph.nodes:
        prev = node.args[0] if node.op == "call_module" and node.args else None
        if (
            isinstance(prev, torch.fx.Node)
            and prev.op == "call_module"
            and len(prev.users) == 1
            and calls[prev.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((prev.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module, keep: Sequence[str] = ()) -> list[str]:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into that conv.

    Works in place on ``model`` (pass a copy); the BatchNorm module is replaced by ``nn.Identity``
    under the same name, so dotted layer names stay valid, and the BatchNorm's output is what the
    conv now outputs. A pair is folded only when torch.fx shows the convolution's output feeds
    nothing but the BatchNorm and both modules run exactly once; convolutions named in ``keep``
    (a Grad-CAM layer must output the conv's own activations) and models that torch.fx cannot
    trace are left as they are. Returns the names of the folded convolutions.
    """
    folded = []
    for conv_name, bn_name in _chained_modules(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if (
            not isinstance(conv, nn.Conv2d)
            or not isinstance(bn, nn.BatchNorm2d)
            or conv_name in keep
            or bn.running_mean is None
            or bn.training
            or conv.training
        ):
            continue
        w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = w, b
        model.set_submodule(bn_name, nn.Identity())
        folded.append(conv_name)
    return folded


def pool_before_relu(model: nn.Module, keep: Sequence[str] = ()) -> list[str]:
    """Run a ``MaxPool2d`` that directly follows a ``ReLU`` before it instead (in place).

    max-pooling commutes with ReLU (both values and gradients, ties included: a window whose
    maximum is <= 0 gets 0 and passes no gradient either way), and pooling first lets the ReLU
    and its backward work on a quarter of the elements (ResNet's stem: 64 x 112 x 112 ->
    64 x 56 x 56 per image). The ReLU becomes ``nn.Identity`` and the pool
    ``nn.Sequential(pool, ReLU)`` under their own names, so the pool's output is what it was; a
    ReLU named in ``keep`` (a Grad-CAM layer) stays. Only pairs torch.fx shows as ReLU -> pool
    with nothing else reading the ReLU's output, each module running once, are changed.
    Returns the names of the ReLUs moved.
    """
    moved = []
    for relu_name, pool_name in _chained_modules(model):
        relu, pool = model.get_submodule(relu_name), model.get_submodule(pool_name)
        if (
            type(relu) is not nn.ReLU
            or type(pool) is not nn.MaxPool2d
            or pool.return_indices
            or relu_name in keep
        ):
            continue
        model.set_submodule(relu_name, nn.Identity())
        model.set_submodule(pool_name, nn.Sequential(pool, relu))
        moved.append(relu_name)
    return moved


class SpaceToDepthConv(nn.Module):
    """A stride-2 convolution with few input channels, run as a stride-1 convolution on the
    input's 2x2 space-to-depth rearrangement (``pixel_unshuffle``).

    The sums are those of the original convolution plus products with zero weights, so the output
    is the same up to float32 summation order; the input gradient, which the engine needs at
    every path point, is a stride-1 transposed convolution with 4x the channels, which oneDNN runs
    much faster than the strided 3-channel one (ResNet's 7x7 stem: see docs/benchmarks.md).
    Input (N, C, H, W) -> output (N, O, Ho, Wo) exactly as ``conv`` gives.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        kh, kw = conv.kernel_size
        self.kernel = (kh, kw)
        self.padding = conv.padding
        khe, kwe = kh + kh % 2, kw + kw % 2
        w = F.pad(conv.weight.detach(), (0, kwe - kw, 0, khe - kh))
        self.weight = nn.Parameter(F.pixel_unshuffle(w, 2), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), False)

    @staticmethod
    def applies_to(m: nn.Module) -> bool:
        return (
            type(m) is nn.Conv2d
            and m.stride == (2, 2)
            and m.dilation == (1, 1)
            and m.groups == 1
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
            and m.in_channels <= 4
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (ph, pw) = self.kernel, self.padding
        h, w = x.shape[-2:]
        ho, wo = (h + 2 * ph - kh) // 2 + 1, (w + 2 * pw - kw) // 2 + 1
        khe, kwe = self.weight.shape[-2] * 2, self.weight.shape[-1] * 2
        # rows 2i .. 2i + khe - 1 feed output row i: pad (or crop) the bottom/right to fit
        bottom, right = 2 * (ho - 1) + khe - (h + ph), 2 * (wo - 1) + kwe - (w + pw)
        xs = F.pixel_unshuffle(F.pad(x, (pw, right, ph, bottom)), 2)
        return F.conv2d(xs, self.weight, self.bias)


def space_to_depth_stems(model: nn.Module) -> int:
    """Replace (in place) every stride-2 ``Conv2d`` with at most 4 input channels by a
    ``SpaceToDepthConv`` under the same name. Returns the number replaced."""
    targets = [n for n, m in model.named_modules() if SpaceToDepthConv.applies_to(m)]
    for name in targets:
        model.set_submodule(name, SpaceToDepthConv(model.get_submodule(name)))
    return len(targets)


def _shape_query(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads only its argument's shape (``x.shape``, ``x.size()``, ``x.dim()``),
    which is the same at every point of an IG path."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:] == ("shape",)
    return node.op == "call_method" and node.target in ("size", "dim")


def input_layer(model: nn.Module) -> str | None:
    """The name of the convolution that alone reads the model's input, or None.

    torch.fx must show the input (the first argument of ``forward``; any others have defaults,
    such as timm's ``attn_mask=None``) feeding nothing but one ``Conv2d`` that runs once, apart from
    reads of its shape (a vision transformer's patch embedding checks the image size first:
    torchvision's ``conv_proj``, timm's ``patch_embed.proj``). Such a layer is linear in the
    input (affine with its bias), so its input gradient is its transposed convolution of the
    gradient at its output, whatever the input: the IG sweep sums the weighted gradients at that
    layer's output and maps the sum back once per image instead of at every path point
    (``_ig_sweep``). Models that torch.fx cannot trace give None.
    """
    traced = _traced(model)
    if traced is None:
        return None
    graph, calls = traced
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    if not inputs or any(not node.args for node in inputs[1:]):
        return None  # the sweep calls the model with the input alone: the rest need defaults
    users = [u for u in inputs[0].users if not _shape_query(u)]
    if len(users) != 1:
        return None
    (user,) = users
    if user.op != "call_module" or type(model.get_submodule(user.target)) is not nn.Conv2d:
        return None
    return user.target if calls[user.target] == 1 else None


def _sequence_first(t: torch.Tensor) -> torch.Tensor:
    """The (N, L, E) tensor ``t``, same values, laid out as a contiguous (L, N, E) tensor."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


class SequenceFirstAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with ``batch_first=True`` that, while autograd records, is fed
    its (N, L, E) inputs laid out sequence-first in memory: same values, same parameters, same
    names; torch's own attention code runs on them.

    With ``batch_first`` torch transposes the (N, L, E) inputs to (L, N, E) and projects them
    with ``F.linear``. ``at::matmul`` folds a transposed 3-D input into one matrix product only
    when the weight requires grad (Captum's case); with the frozen weights of a prepared model
    it runs L small batched products (N x E) @ (E x 3E) against an expanded weight instead:
    for vit_b_16 197 products of a chunk's few rows, which made the q/k/v projection about 3x
    slower and a path point about a third slower (docs/benchmarks.md). Given a (N, L, E) view of
    (L, N, E)-contiguous memory, torch's transpose is contiguous and the projection is one
    (L N x E) @ (E x 3E) product. Without autograd the inputs pass as they are (torch's fused
    inference path wants batch-first memory).
    """

    def forward(self, query, key, value, *args, **kwargs):
        if self.batch_first and query.dim() == 3 and torch.is_grad_enabled():
            q = _sequence_first(query)
            k = q if key is query else _sequence_first(key)
            v = k if value is key else q if value is query else _sequence_first(value)
            query, key, value = q, k, v
        return super().forward(query, key, value, *args, **kwargs)


def sequence_first_attention(model: nn.Module) -> int:
    """Make (in place) every ``nn.MultiheadAttention`` with ``batch_first=True`` a
    ``SequenceFirstAttention`` (the same module object, its class switched: parameters, buffers
    and dotted names stay). Returns the number switched."""
    switched = 0
    for m in model.modules():
        if type(m) is nn.MultiheadAttention and m.batch_first:
            m.__class__ = SequenceFirstAttention
            switched += 1
    return switched


def prepare_model(
    model: nn.Module,
    device: torch.device | str | None = None,
    *,
    fold_bn: bool = True,
    channels_last: bool = True,
    space_to_depth: bool = True,
    sequence_first: bool = True,
    gradcam_layer: str | None = None,
) -> nn.Module:
    """A frozen copy of ``model`` in its fastest exact form, for ``attribute``.

    The copy is in eval mode, its parameters have ``requires_grad=False``, eval-mode BatchNorm is
    folded into the preceding convolutions (``fold_batchnorm``), a max-pool that follows a ReLU
    runs before it (``pool_before_relu``), strided stem convolutions run as space-to-depth
    convolutions (``SpaceToDepthConv``), batch-first ``nn.MultiheadAttention`` gets its inputs
    sequence-first in memory (``SequenceFirstAttention``) and its 4-D weights are channels_last;
    it lives on ``device`` (default: where ``model`` is). A layer named as ``gradcam_layer``
    keeps its own output (its BatchNorm apart, its ReLU before the pool). The caller's model is
    not touched. A model that is already prepared is returned as it is (moved
    to ``device``).
    """
    if model in _PREPARED:
        return model if device is None else model.to(device)
    net = copy.deepcopy(model)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    keep = (gradcam_layer,) if gradcam_layer else ()
    altered = fold_batchnorm(net, keep=keep) if fold_bn else []
    first = input_layer(net)
    altered += pool_before_relu(net, keep=keep)
    if space_to_depth:
        space_to_depth_stems(net)
    if sequence_first:  # after the torch.fx traces above: fx would trace into the new class
        sequence_first_attention(net)
    if device is not None:
        net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    _PREPARED[net] = _Form(altered=frozenset(altered), input_layer=first)
    return net


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
# The sweep
# --------------------------------------------------------------------------------------------


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


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for low-precision (autocast) tensors; float64 stays float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _scores(out: torch.Tensor, score: str) -> torch.Tensor:
    """(R, classes) logits -> the score per class: logits or softmax probabilities."""
    out = _wide(out)
    return out if score == "logit" else torch.softmax(out, dim=1)


def _saved_bytes_counter(net: nn.Module):
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


def _default_budget_mb(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.35 * free / 2**20
    # On a CPU, chunks beyond a few hundred MB of saved activations stop paying off. Unless
    # freed memory is kept (keep_freed_memory), glibc maps fresh zeroed pages for every block
    # above 32 MB in every chunk: smaller chunks keep more blocks under that (docs/benchmarks.md).
    return 512.0 if _MALLOC["kept"] else 256.0


def _gradcam_map(act: torch.Tensor, grad: torch.Tensor, size) -> torch.Tensor:
    """Grad-CAM: ReLU(sum_k mean_hw(G_k) A_k), upsampled bilinearly to ``size``. (R, H, W)."""
    weights = _wide(grad).mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * _wide(act)).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("CAM needs a model that ends in global average pooling and a Linear")
    return linears[-1]


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
            chooses the steps per image (and target): nested trapezoid levels of 2^k + 1 points
            with Romberg extrapolation, refined until the estimated relative L2 error of the IG
            map is <= ``ig_tol`` or the next level would add more than ``ig_max_steps`` points
            to the pass at x (which a = 1 reuses; so at most ``ig_max_steps`` + 1 points;
            docs/conventions.md, "Adaptive Integrated Gradients"); ``ig_method`` is not used
            then.
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
        the most points ``ig_max_steps`` allows: the first ``ig_steps`` entries are the alphas
        in ascending order and F at them, the rest NaN.
    """
    methods = tuple(methods)
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
    if any(m in SMOOTHGRAD for m in methods):
        if int(smoothgrad_samples) < 1 or not smoothgrad_sigma > 0:
            raise ValueError("smoothgrad_samples must be >= 1 and smoothgrad_sigma > 0")
        if noise_keys is not None and len(noise_keys) != x.shape[0]:
            raise ValueError(f"noise_keys: one per image ({x.shape[0]}), got {len(noise_keys)}")
    adaptive = None
    if isinstance(ig_steps, str):
        if ig_steps != "auto":
            raise ValueError(f"ig_steps must be a positive integer or 'auto', got {ig_steps!r}")
        if not 0 < ig_tol < 1:
            raise ValueError(f"ig_tol must be in (0, 1), got {ig_tol!r}")
        adaptive = _Adaptive(float(ig_tol), ADAPTIVE_MIN_LEVEL, adaptive_max_level(ig_max_steps))
        alphas, weights = np.array([0.0, 1.0]), np.array([0.5, 0.5])  # not used by the sweep
    else:
        alphas, weights = path_points(ig_steps, ig_method)
    x = x.detach()
    x = x if x.dtype == torch.float64 else x.float()  # float64 stays: an exact oracle mode
    if baseline is not None:
        baseline = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).detach()
        try:
            torch.broadcast_shapes(baseline.shape, x.shape)
        except RuntimeError:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to {tuple(x.shape)}"
            ) from None
        if baseline.dim() < 4:
            baseline = baseline.expand(x.shape) if baseline.dim() == 0 else baseline[None]
    net = prepare_model(model, device=x.device, gradcam_layer=gradcam_layer)
    if any(m in LAYER_METHODS for m in methods):
        if gradcam_layer is None:
            key = (tuple(x.shape[1:]), x.dtype, x.device)
            layers = _DEFAULT_LAYER.setdefault(net, {})
            if key not in layers:  # a forward pass: once per prepared model and input shape
                layers[key] = default_gradcam_layer(net, x[:1])
            gradcam_layer = layers[key]
        if gradcam_layer in _PREPARED[net].altered:
            raise ValueError(
                f"prepare_model folded a BatchNorm into layer {gradcam_layer!r} or moved it after "
                f"a pool, so its output is no longer its own: prepare the model with "
                f"prepare_model(model, gradcam_layer={gradcam_layer!r})"
            )
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
    n, size = x.shape[0], tuple(x.shape[-2:])
    device = x.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    x = x.contiguous(memory_format=torch.channels_last)
    mode, given = _parse_target(target, n, device)
    want_ig = "integrated_gradients" in methods
    # a graph at x also measures the bytes autograd saves per row, which sizes IG's and
    # SmoothGrad's chunks
    measure = want_ig or any(m in SMOOTHGRAD for m in methods)
    want_sal, want_gc, want_cam = "saliency" in methods, "gradcam" in methods, "cam" in methods
    family = [m for m in CAM_FAMILY if m in methods]
    # the layer's gradient at x: Grad-CAM and every family member but EigenCAM
    want_layer_grad = want_gc or any(m not in cams.GRADIENT_FREE for m in family)
    # ig_steps="auto" (``adaptive``) evaluates a = 0 and a = 1 on every level
    has_one = bool(want_ig and (adaptive is not None or abs(alphas[-1] - 1.0) < 1e-12))
    has_zero = bool(want_ig and (adaptive is not None or abs(alphas[0]) < 1e-12))
    grad_at_x = want_sal or want_layer_grad or has_one

    # ---- 1. forward (and backward) at x itself: prediction, target, saliency, Grad-CAM, CAM
    result: dict[str, torch.Tensor] = {}
    counter, saving = _saved_bytes_counter(net)
    fc_in: dict = {}
    fc = _last_linear(net) if want_cam else None
    with hooks_removed_after() as handles:
        if want_cam:

            def keep_head_input(m, inputs, output):  # returns None: the output is left alone
                fc_in["x"] = inputs[0]

            handles.append(fc.register_forward_hook(keep_head_input))
        layer_ctx = capture_activation(net, layer) if (want_gc or want_cam or family) else None
        with layer_ctx or contextlib.nullcontext() as store, saving, autocast:
            # with IG the graph is kept even without a backward here: it measures the memory
            # autograd saves per row, which sizes the sweep's chunks
            xin = x.clone().requires_grad_(grad_at_x or measure)
            with torch.set_grad_enabled(grad_at_x or measure):
                logits = net(xin)
            if logits.dim() != 2:
                raise ValueError(f"model output must be (N, classes), got {tuple(logits.shape)}")
    per_row_bytes = max(counter["bytes"] / n, 1.0)
    probs = torch.softmax(_wide(logits.detach()), dim=1)
    k5 = min(TOPK_REPORTED, probs.shape[1])
    topk_probs, topk_classes = probs.topk(k5, dim=1)
    result["pred_class"], result["pred_prob"] = topk_classes[:, 0].clone(), topk_probs[:, 0]
    result["topk_classes"], result["topk_probs"] = topk_classes, topk_probs
    if mode == "predicted":
        targets = topk_classes[:, :1].clone()
    elif mode == "topk":
        if given > probs.shape[1]:
            raise ValueError(
                f"topk:{given} asks for more classes than the {probs.shape[1]} there are"
            )
        targets = _wide(logits.detach()).topk(given, dim=1).indices
    else:
        targets = given
        if targets.min() < 0 or targets.max() >= probs.shape[1]:
            raise ValueError(f"target classes must lie in [0, {probs.shape[1]})")
    kk = targets.shape[1]
    result["target"] = targets
    s_all = _scores(logits, score)
    s_x = s_all.gather(1, targets)  # (N, K)
    result["score"] = _wide(s_x.detach())

    sal, gc, g_x, cam = [], [], [], []
    fam: dict[str, list[torch.Tensor]] = {m: [] for m in family}
    act = store["act"] if store is not None else None
    layout = None
    if act is not None:
        layout = grid_layout(act.shape)
        if layout is None:
            raise ValueError(
                f"layer {layer!r} outputs {tuple(act.shape)}, which does not read as a grid with "
                "h, w > 1: (N, K, h, w), (N, h, w, D) or tokens (N, T, D) with T = h*w or 1 + h*w"
            )
    for j in range(kk):
        if grad_at_x:
            inputs = [xin] + ([act] if want_layer_grad else [])
            grads = torch.autograd.grad(s_x[:, j].sum(), inputs, retain_graph=j < kk - 1)
            gx = _wide(grads[0])
            if has_one:
                g_x.append(gx)
            if want_sal:
                s = gx.abs() if saliency_mode == "abs" else gx * gx
                sal.append(s if saliency_channels else s.amax(dim=1))
            if want_gc:
                gc.append(
                    _gradcam_map(as_grid(act.detach(), layout), as_grid(grads[1], layout), size)
                )
        for m in family:
            g_layer = None if m in cams.GRADIENT_FREE else as_grid(grads[1], layout)
            fam[m].append(cams.cam_map(m, as_grid(act.detach(), layout), g_layer, size))
        if want_cam:
            a = _wide(as_grid(act.detach(), layout))
            pooled, head_in = a.mean(dim=(2, 3)), _wide(fc_in["x"].detach())
            if head_in.shape != pooled.shape or not torch.allclose(
                pooled, head_in, rtol=1e-3, atol=1e-4
            ):
                raise ValueError(
                    f"CAM needs the head to be global average pooling of {layer!r} followed by "
                    "one Linear layer; use gradcam for this model"
                )
            w = _wide(fc.weight)[targets[:, j]]  # (N, K_channels)
            m = (w[:, :, None, None] * a).sum(dim=1, keepdim=True)
            cam.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0])
    del logits, s_all, act, store
    stack = (lambda ts: torch.stack(ts, dim=1)) if mode == "topk" else (lambda ts: ts[0])
    if want_sal:
        result["saliency"] = stack(sal)
    if want_gc:
        result["gradcam"] = stack(gc)
    if want_cam:
        result["cam"] = stack(cam)
    for m in family:
        result[m] = stack(fam[m])

    # ---- 2. one chunked sweep: IG's path points of all (image, target) pairs and SmoothGrad's
    # noisy copies of x, one forward + backward per chunk for both kinds of rows
    want_sg = [m for m in SMOOTHGRAD if m in methods]
    noisy = None
    if want_sg:
        samples, sigma, keys = smoothgrad
        noisy = _Noisy(smoothgrad_noise(x, samples, sigma, keys), apart=bf16)
    if want_ig and adaptive is not None:
        result.update(
            _ig_sweep_auto(
                net,
                x,
                targets,
                baseline,
                score,
                g_x,
                result["score"],
                adaptive,
                budget_mb,
                per_row_bytes,
                autocast,
                noisy,
            )
        )
    elif want_ig or noisy is not None:
        result.update(
            _ig_sweep(
                net,
                x,
                targets,
                alphas,
                weights,
                baseline,
                score,
                g_x,
                has_one,
                has_zero,
                budget_mb,
                per_row_bytes,
                autocast,
                noisy,
                ig=want_ig,
            )
        )
    if want_ig:
        result["ig_delta"] = result["integrated_gradients"].sum(dim=(-3, -2, -1)) - (
            result["score"] - result["baseline_score"]
        )
        if mode != "topk":
            for key in ("integrated_gradients", "baseline_score", "ig_delta", *_AUTO_KEYS):
                if key in result:
                    result[key] = result[key].squeeze(1)
    for m in SMOOTHGRAD:
        if m in result:
            if m in want_sg:
                result[m] = result[m] if mode == "topk" else result[m][:, 0]
            else:
                del result[m]
    if mode != "topk":
        result["target"], result["score"] = targets[:, 0], result["score"][:, 0]
    return result


def smoothgrad_noise(x: torch.Tensor, samples: int, sigma: float, keys=None) -> torch.Tensor:
    """The noise SmoothGrad adds: (N, M, C, H, W), x's dtype and device.

    Image i's M draws come from a CPU ``torch.Generator`` seeded with ``keys[i]`` (the row's key,
    ``faithfulness.row_key``; default i), standard normal in that order, times
    ``sigma * (max(x_i) - min(x_i))``: a row gets the same noise on any actor, in any batch."""
    n = x.shape[0]
    keys = range(n) if keys is None else keys
    out = torch.empty((n, samples, *x.shape[1:]), dtype=x.dtype)
    for i, key in enumerate(keys):
        g = torch.Generator().manual_seed(int(key))
        z = torch.randn((samples, *x.shape[1:]), generator=g, dtype=torch.float64)
        spread = float((x[i].amax() - x[i].amin()).item())
        out[i] = (z * (sigma * spread)).to(x.dtype)
    return out.to(x.device)


@dataclass(frozen=True)
class _Noisy:
    """SmoothGrad's rows in the sweep: ``noise`` (N, M, C, H, W) from ``smoothgrad_noise``; row
    (pair p, sample m) is x[p's image] + noise[p's image, m], scored for p's target. ``apart``:
    these rows run in chunks of their own in fp32 (when the path points run under bf16
    autocast), so SmoothGrad is computed in fp32 whatever the precision, as it always was."""

    noise: torch.Tensor
    apart: bool = False


def _noisy_rows(x, noisy: _Noisy, q: torch.Tensor, kk: int):
    """The rows q (int64 (R,), row = pair * M + m) of SmoothGrad: their pairs (R,) and inputs
    x[img] + noise[img, m] (R, C, H, W)."""
    samples = noisy.noise.shape[1]
    pair, m = q // samples, q % samples
    img = pair // kk
    return pair, x[img] + noisy.noise[img, m]


def _noisy_gradients(g, g_z, first, cut: int, shape) -> torch.Tensor:
    """The input gradients (R, C, H, W) of a chunk's SmoothGrad rows (rows ``cut:``): each
    row's gradient at the input layer's output mapped back through it (its transposed
    convolution: ``first`` is linear in its input) plus what reached the input around it."""
    gn = None
    if g_z is not None:
        gz = _wide(g_z[cut:])
        probe = torch.zeros((len(gz), *shape), dtype=gz.dtype, device=gz.device)
        probe = probe.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        (gn,) = torch.autograd.grad(first(probe), probe, gz)
    if g is not None:
        gn = _wide(g[cut:]) if gn is None else gn + _wide(g[cut:])
    return gn


def _smoothgrad_maps(s1: torch.Tensor, s2: torch.Tensor, samples: int) -> dict:
    """smoothgrad, smoothgrad_sq, vargrad (P, H, W) from the per-pair sums over the M noisy
    copies of |g| (``s1``) and g^2 (``s2``), (P, C, H, W).

    Per channel, over the M noisy copies: mean |g|, mean g^2, and mean g^2 - (mean |g|)^2 (the
    variance of |g|, as Captum's NoiseTunnel over Saliency); then the largest over channels, as
    saliency is."""
    m1, m2 = s1 / samples, s2 / samples
    return {
        "smoothgrad": m1.amax(dim=1),
        "smoothgrad_sq": m2.amax(dim=1),
        "vargrad": (m2 - m1 * m1).amax(dim=1),
    }


def _chunks(rows: int, chunk: int, cut: int | None) -> list[tuple[int, int]]:
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


def _add_weighted_rows(acc: torch.Tensor, pair: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
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
    flat.addmm_(mix, _wide(g).reshape(len(pair), -1))


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
            s = _scores(net(inp), score).gather(1, tgt[:, None])[:, 0]
        if seen != {"calls": 1, "given": 1}:
            first = z = None  # this model does not qualify: plain path from here on
    if z is None:
        with autocast:
            s = _scores(net(inp), score).gather(1, tgt[:, None])[:, 0]
        (g,) = torch.autograd.grad(s.sum(), inp)
        return s, g, None, first
    g_z, g = torch.autograd.grad(s.sum(), (z_edge, inp), allow_unused=True)
    return s, g, g_z, first


def _ig_sweep(
    net,
    x,
    targets,
    alphas,
    weights,
    baseline,
    score,
    g_x,
    has_one,
    has_zero,
    budget_mb,
    per_row_bytes,
    autocast,
    noisy: _Noisy | None = None,
    *,
    ig: bool = True,
) -> dict[str, torch.Tensor]:
    """IG for every (image, target) pair (unless ``ig`` is False), and SmoothGrad's noisy rows
    when ``noisy`` is given, in one queue of rows cut into chunks of the memory budget: the path
    points of every pair, then (pair, sample) noisy rows; one forward + backward per chunk.
    Returns integrated_gradients (N, K, C, H, W) and baseline_score (N, K); with ``noisy``
    also smoothgrad, smoothgrad_sq, vargrad (N, K, H, W)."""
    n, kk = targets.shape
    device = x.device
    base = baseline if baseline is not None else torch.zeros_like(x[:1])
    base = base.contiguous(memory_format=torch.channels_last)
    diff = x - base  # (N, C, H, W)
    a = torch.as_tensor(alphas, dtype=x.dtype, device=device)
    w = torch.as_tensor(weights, dtype=x.dtype, device=device)
    sweep = torch.arange(len(alphas) - (1 if has_one else 0) if ig else 0, device=device)
    pairs = n * kk
    fmt = torch.channels_last
    acc = torch.empty((pairs, *x.shape[1:]), dtype=x.dtype, device=device, memory_format=fmt)
    acc.zero_()
    if has_one:  # a = 1 is the pass at x: reuse its gradient
        acc += w[-1] * torch.stack(g_x, dim=1).reshape(acc.shape)
    base_score = torch.empty(pairs, dtype=x.dtype, device=device)
    tflat = targets.reshape(-1)  # pair p = image p // K, target tflat[p]
    if ig and not has_zero:  # F(x') needs its own forward pass, without gradients
        with torch.no_grad(), autocast:
            if base.shape[0] == 1:
                s = _scores(net(base), score)[0]  # one baseline for all images
                base_score = s[tflat]
            else:
                s = _scores(net(base), score)
                base_score = s.gather(1, targets).reshape(-1)
    samples = 0 if noisy is None else noisy.noise.shape[1]
    s1 = s2 = None
    if samples:  # per pair, the sums over its noisy rows of |g| and g^2
        s1 = torch.zeros((pairs, *x.shape[1:]), dtype=_wide(x).dtype, device=device)
        s2 = torch.zeros_like(s1)
    path_rows = pairs * len(sweep)
    rows = path_rows + pairs * samples
    chunk = 1
    if rows:
        budget = (budget_mb or _default_budget_mb(device)) * 2**20
        chunk = int(max(1, min(rows, budget // per_row_bytes)))
    # The layer that alone reads the input (``input_layer``) is affine in it: at the point
    # base + a * diff its output is first(base) + a * L(diff), and its input gradient is L^T of
    # the gradient at its output. So it runs once per image, not once per point: the sweep hands
    # it that sum as its output, takes the gradient there, sums it per pair (acc_z) and applies
    # L^T once per pair at the end. A model that does not feed the input to it exactly once takes
    # the plain path; gradients that reach the input around it are added as they come.
    # SmoothGrad's rows need each row's own input gradient: the layer runs on them as usual and
    # their gradients at its output are mapped back through L^T row by row.
    name = _PREPARED[net].input_layer if net in _PREPARED else None
    first = net.get_submodule(name) if name is not None and rows else None
    acc_z = z_base = z_diff = None
    if first is not None:
        with torch.no_grad():
            z_base = first(base)  # (1 or N, K, h, w)
            z_diff = first(diff) - first(torch.zeros_like(base[:1]))  # L(diff), without bias
    step_of = max(len(sweep), 1)
    apart = noisy is not None and noisy.apart
    for lo, hi in _chunks(rows, chunk, path_rows if apart else None):
        r = torch.arange(lo, max(lo, min(hi, path_rows)), device=device)  # its path rows
        pair, step = r // step_of, sweep[r % step_of] if len(sweep) else r
        img = pair // kk
        b_img = img if base.shape[0] > 1 else torch.zeros_like(img)
        alpha = a[step].view(-1, 1, 1, 1)
        tgt, inp_noisy = tflat[pair], None
        if hi > path_rows:  # SmoothGrad's rows (pair, sample), in fp32
            q = torch.arange(max(lo, path_rows), hi, device=device) - path_rows
            npair, inp_noisy = _noisy_rows(x, noisy, q, kk)
            tgt = torch.cat([tgt, tflat[npair]])
        ctx = autocast if inp_noisy is None else contextlib.nullcontext()
        s, g, g_z, first = _path_gradients(
            net, base, diff, alpha, img, b_img, tgt, score, ctx, first, z_base, z_diff, inp_noisy
        )
        cut = len(r)
        if cut:
            if g_z is not None:
                if acc_z is None:
                    acc_z = torch.empty(
                        (pairs, *g_z.shape[1:]), dtype=x.dtype, device=device, memory_format=fmt
                    ).zero_()
                _add_weighted_rows(acc_z, pair, w[step], g_z[:cut])
            if g is not None:
                _add_weighted_rows(acc, pair, w[step], g[:cut])
            if has_zero:
                zero = step == 0
                base_score[pair[zero]] = s[:cut].detach()[zero]
        if inp_noisy is not None:
            gn = _noisy_gradients(g, g_z, first, cut, x.shape[1:])
            s1.index_add_(0, npair, gn.abs())
            s2.index_add_(0, npair, gn * gn)
    out = {}
    if samples:
        lead = (n, kk, *x.shape[-2:])
        out = {k: v.reshape(lead) for k, v in _smoothgrad_maps(s1, s2, samples).items()}
    if not ig:
        return out
    if acc_z is not None:
        layer = net.get_submodule(name)
        for start in range(0, pairs, chunk):
            stop = min(pairs, start + chunk)
            probe = torch.zeros_like(acc[start:stop]).requires_grad_(True)  # any input: linear
            (g,) = torch.autograd.grad(layer(probe), probe, acc_z[start:stop])
            acc[start:stop] += g
    ig_map = (acc.reshape(n, kk, *x.shape[1:]) * diff[:, None]).contiguous()
    out.update({"integrated_gradients": ig_map, "baseline_score": base_score.view(n, kk)})
    return out


# --------------------------------------------------------------------------------------------
# ig_steps="auto": each (image, target) pair refines its own nested trapezoid levels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Adaptive:
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


def _ig_sweep_auto(
    net,
    x,
    targets,
    baseline,
    score,
    g_x,
    s_x,
    adaptive: _Adaptive,
    budget_mb,
    per_row_bytes,
    autocast,
    noisy: _Noisy | None = None,
) -> dict[str, torch.Tensor]:
    """IG for every (image, target) pair to an error target (docs/conventions.md, "Adaptive
    Integrated Gradients"). Level k of a pair adds the points ``quadrature.level_points(k)``; the
    rows of all pairs wait in one queue and run in chunks of the memory budget, so a chunk holds
    the points of whichever pairs still need them, at whatever level each is. When a pair's level
    is complete its Romberg row (T, S, B) is updated and every column gets an error estimate; the
    column with the smallest estimate is the pair's IG; a pair whose estimate is above the
    tolerance queues its next level. Every gradient is computed once: level k + 1 reuses all
    the points of level k (a = 1 is the pass at x: ``g_x``).

    SmoothGrad's noisy rows (``noisy``) fill the chunks the queue leaves part empty (while the
    next levels wait for the current ones to finish) and run after it drains; with
    ``noisy.apart`` a chunk holds path points or noisy rows, never both.

    Returns integrated_gradients (N, K, C, H, W), baseline_score (N, K), ig_steps (N, K) int32,
    ig_error_est (N, K), ig_converged (N, K) bool, ig_path_alpha and ig_path_score
    (N, K, 2^max_level + 1), the first ig_steps entries of a row valid, the rest NaN; with
    ``noisy`` also smoothgrad, smoothgrad_sq, vargrad (N, K, H, W).
    """
    from xai_workers.quadrature import level_points, romberg_row

    n, kk = targets.shape
    device, dtype = x.device, x.dtype
    base = baseline if baseline is not None else torch.zeros_like(x[:1])
    base = base.contiguous(memory_format=torch.channels_last)
    diff = x - base  # (N, C, H, W)
    pairs, lmin, lmax = n * kk, adaptive.min_level, adaptive.max_level
    tflat = targets.reshape(-1)
    pimg = torch.arange(pairs, device=device) // kk  # image of each pair
    shape, fmt = (pairs, *x.shape[1:]), torch.channels_last

    def zeros(*lead, dt=dtype):
        t = torch.empty((*lead, *x.shape[1:]), dtype=dt, device=device, memory_format=fmt)
        return t.zero_()

    # H[k % ring]: the sum of the gradients at the points level k adds (in flight at once: at
    # most levels 0..lmin of a pair); level 0's a = 1 is the gradient of the pass at x
    ring = lmin + 1
    held = zeros(ring * pairs)
    held[:pairs] = torch.stack(g_x, dim=1).reshape(shape)
    prev = None  # the Romberg row (T, S, B) of each pair's last finished level: 3 x (pairs, ...)
    dh = torch.full((2, pairs, 3), float("inf"), dtype=dtype, device=device)  # d_{k-1}, d_{k-2}
    best = zeros(pairs)
    est = torch.full((pairs,), float("inf"), dtype=dtype, device=device)
    steps = torch.zeros(pairs, dtype=torch.int32, device=device)
    converged = torch.zeros(pairs, dtype=torch.bool, device=device)
    base_score = torch.zeros(pairs, dtype=dtype, device=device)
    grid = torch.full((pairs, 2**lmax + 1), float("nan"), dtype=dtype, device=device)
    grid[:, -1] = s_x.detach().reshape(-1)
    pend = torch.zeros((pairs, lmax + 2), dtype=torch.long, device=device)
    done = torch.full((pairs,), -1, dtype=torch.long, device=device)  # last finished level
    queued = torch.full((pairs,), lmin, dtype=torch.long, device=device)

    # the queue of rows (pair, level, alpha); level 0 runs a = 0 only (a = 1 is the pass at x)
    def rows_of(p: torch.Tensor, levels: range):
        parts = [(k, level_points(k)[:1] if k == 0 else level_points(k)) for k in levels]
        pts = torch.as_tensor(np.concatenate([a for _, a in parts]), dtype=dtype, device=device)
        lev = torch.as_tensor(np.concatenate([np.full(len(a), k) for k, a in parts]), device=device)
        for k, a in parts:
            pend[p, k] += len(a)
        m = len(pts)
        return p.repeat_interleave(m), lev.repeat(len(p)), pts.repeat(len(p))

    q_pair, q_level, q_alpha = rows_of(torch.arange(pairs, device=device), range(lmin + 1))
    budget = (budget_mb or _default_budget_mb(device)) * 2**20
    chunk = int(max(1, budget // per_row_bytes))
    name = _PREPARED[net].input_layer if net in _PREPARED else None
    first = net.get_submodule(name) if name is not None else None
    z_base = z_diff = None
    if first is not None:
        with torch.no_grad():
            z_base = first(base)
            z_diff = first(diff) - first(torch.zeros_like(base[:1]))

    def finish(p: torch.Tensor, k: int):
        """Level k of the pairs p is complete: Romberg row, estimates, stop or queue k + 1."""
        nonlocal prev, q_pair, q_level, q_alpha
        slot = (k % ring) * pairs + p
        h = held[slot]
        held[slot] = 0
        if k == 0:
            t = h / 2
            row = romberg_row(0, t)
        else:
            row_prev = tuple(c[p] for c in prev)
            t = row_prev[0] / 2 + h / 2**k
            row = romberg_row(k, t, row_prev)
        d_img = diff[pimg[p]]
        maps = torch.stack([d_img * c for c in row], dim=1)  # (P, 3, C, H, W)
        flat = maps.reshape(len(p), 3, -1)
        norm = flat.norm(dim=2).clamp_min(torch.finfo(dtype).tiny)
        if k == 0:
            d = torch.full_like(norm, float("inf"))
        else:
            d = (maps - torch.stack([d_img * c for c in row_prev], dim=1)).reshape(len(p), 3, -1)
            d = d.norm(dim=2)
        rel = d / norm
        if k >= 3:
            rel = rel * _rate_factor(d, dh[0, p], dh[1, p])
        gap = s_x.detach().reshape(-1)[p] - base_score[p]
        compl = (flat.sum(dim=2) - gap[:, None]).abs() / flat.abs().sum(dim=2).clamp_min(
            torch.finfo(dtype).tiny
        )
        e = torch.maximum(rel, compl)  # (P, 3)
        e_best, col = e.min(dim=1)
        best[p] = maps[torch.arange(len(p), device=device), col]
        est[p], steps[p] = e_best, 2**k + 1
        if prev is None:
            prev = tuple(zeros(pairs) for _ in range(3))
        for c, v in zip(prev, row, strict=True):
            c[p] = v
        dh[1, p], dh[0, p] = dh[0, p], d
        done[p] = k
        if k < lmin:
            return
        conv = e_best <= adaptive.tol
        converged[p] = conv
        more = p[~conv] if k < lmax else p[:0]
        if len(more):
            rp, rl, ra = rows_of(more, range(k + 1, k + 2))
            queued[more] = k + 1
            q_pair, q_level, q_alpha = (
                torch.cat([q_pair, rp]),
                torch.cat([q_level, rl]),
                torch.cat([q_alpha, ra]),
            )

    samples = 0 if noisy is None else noisy.noise.shape[1]
    noisy_rows, nhead = pairs * samples, 0
    if samples:  # per pair, the sums over its noisy rows of |g| and g^2
        s1 = torch.zeros((pairs, *x.shape[1:]), dtype=_wide(x).dtype, device=device)
        s2 = torch.zeros_like(s1)
    head = 0
    while head < len(q_pair) or nhead < noisy_rows:
        pair, level = q_pair[head : head + chunk], q_level[head : head + chunk]
        alpha = q_alpha[head : head + chunk].view(-1, 1, 1, 1)
        head += len(pair)
        cut = len(pair)
        img = pimg[pair]
        b_img = img if base.shape[0] > 1 else torch.zeros_like(img)
        tgt, inp_noisy = tflat[pair], None
        fill = 0 if (cut and noisy is not None and noisy.apart) else chunk - cut
        if fill and nhead < noisy_rows:  # SmoothGrad's rows (pair, sample), in fp32
            q = torch.arange(nhead, min(noisy_rows, nhead + fill), device=device)
            nhead += len(q)
            npair, inp_noisy = _noisy_rows(x, noisy, q, kk)
            tgt = torch.cat([tgt, tflat[npair]])
        ctx = autocast if inp_noisy is None else contextlib.nullcontext()
        s, g, g_z, first = _path_gradients(
            net, base, diff, alpha, img, b_img, tgt, score, ctx, first, z_base, z_diff, inp_noisy
        )
        if inp_noisy is not None:
            gn = _noisy_gradients(g, g_z, first, cut, x.shape[1:])
            s1.index_add_(0, npair, gn.abs())
            s2.index_add_(0, npair, gn * gn)
        if not cut:
            continue
        s = s[:cut]
        g = None if g is None else g[:cut]
        g_z = None if g_z is None else g_z[:cut]
        # sum the rows of each (pair, level) of the chunk; map z-gradients back with L^T
        key = level * pairs + pair
        keys, inv = torch.unique(key, return_inverse=True)
        mix = torch.zeros(len(keys), len(pair), dtype=dtype, device=device)
        mix[inv, torch.arange(len(pair), device=device)] = 1
        summed = None
        if g_z is not None:
            gz = (mix @ _wide(g_z).reshape(len(pair), -1)).reshape(len(keys), *g_z.shape[1:])
            probe = zeros(len(keys)).requires_grad_(True)
            with torch.enable_grad():
                (summed,) = torch.autograd.grad(first(probe), probe, gz.to(memory_format=fmt))
        if g is not None:
            gs = (mix @ _wide(g).reshape(len(pair), -1)).reshape(len(keys), *x.shape[1:])
            summed = gs if summed is None else summed + gs
        k_level, k_pair = keys // pairs, keys % pairs
        held.index_add_(0, (k_level % ring) * pairs + k_pair, summed.to(dtype))
        sd = s.detach().to(dtype)
        zero = alpha.view(-1) == 0
        base_score[pair[zero]] = sd[zero]
        grid[pair, (alpha.view(-1) * 2**lmax).round().long()] = sd
        pend.index_put_((pair, level), torch.full_like(pair, -1), accumulate=True)
        while True:  # finish every level now complete, in level order
            nxt = done + 1
            ready = (nxt <= queued) & (pend.gather(1, nxt[:, None])[:, 0] == 0)
            if not ready.any():
                break
            k = int(nxt[ready].min())
            finish(torch.nonzero(ready & (nxt == k)).reshape(-1), k)

    # the path trace: the evaluated points of each pair in alpha order
    idx = torch.arange(2**lmax + 1, device=device)
    stride = 2 ** (lmax - done)  # (pairs,)
    pos = (idx[None] * stride[:, None]).clamp_max(2**lmax)
    valid = idx[None] < steps[:, None]
    alphas = torch.where(valid, pos.to(dtype) / 2**lmax, float("nan"))
    trace = torch.where(valid, grid.gather(1, pos), float("nan"))
    lead = (n, kk)
    out = {}
    if samples:
        out = {
            k: v.reshape(*lead, *x.shape[-2:]) for k, v in _smoothgrad_maps(s1, s2, samples).items()
        }
    return out | {
        "integrated_gradients": best.reshape(*lead, *x.shape[1:]).contiguous(),
        "baseline_score": base_score.view(lead),
        "ig_steps": steps.view(lead),
        "ig_error_est": est.float().view(lead),
        "ig_converged": converged.view(lead),
        "ig_path_alpha": alphas.float().view(*lead, -1),
        "ig_path_score": trace.float().view(*lead, -1),
    }
