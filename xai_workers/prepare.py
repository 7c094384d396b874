"""The fastest exact form of a model: every rewrite ``prepare_model`` makes to its copy.

``prepare_model(model)`` deep-copies the caller's model and rewrites the copy only; the caller's
model, its flags and its mode are never touched. Each rewrite changes no value beyond the order of
float32 sums (the tests compare every oracle in float64 against Captum and pytorch-grad-cam to
1e-6 relative, and the float32 fast form within the float32 error Captum itself shows):

1. **Frozen, eval mode**: every parameter ``requires_grad=False``, so backward computes input
   gradients only. Exact: eval mode is what an attribution explains; no parameter gradient is
   ever read.
2. **BatchNorm folded** (``fold_batchnorm``): an eval-mode ``BatchNorm2d`` directly after a
   ``Conv2d`` is an affine map per channel, so it folds into the conv's weights and bias
   (``torch.nn.utils.fusion.fuse_conv_bn_weights``). torch.fx must show the conv's output feeding
   nothing but the BatchNorm, both running once; the BatchNorm becomes ``nn.Identity`` under its
   own name, so dotted layer names stay valid. A conv named as the Grad-CAM layer keeps its
   BatchNorm apart: its activations must stay the conv's own.
3. **Max-pool before ReLU** (``pool_before_relu``): max-pooling commutes with ReLU in values and
   gradients, ties included (a window whose maximum is <= 0 gets 0 and passes no gradient either
   way); pooling first lets the ReLU and its backward touch a quarter of the elements (ResNet's
   stem). The ReLU becomes ``nn.Identity`` and the pool ``nn.Sequential(pool, relu)`` under their
   own names; a ReLU named as the Grad-CAM layer stays.
4. **Space-to-depth stems** (``SpaceToDepthConv``): a stride-2 convolution with at most 4 input
   channels runs as a stride-1 convolution on the input's 2x2 ``pixel_unshuffle``: the same sums
   plus products with zero weights. oneDNN computes its input gradient, needed at every path
   point, much faster in this form (docs/benchmarks.md).
5. **Sequence-first attention** (``SequenceFirstAttention``): a batch-first
   ``nn.MultiheadAttention`` gets its (N, L, E) inputs laid out sequence-first in memory while
   autograd records: same values, parameters and names (its class is switched); torch's own
   attention code runs. With frozen weights ``at::matmul`` otherwise runs the q/k/v projection as
   L small batched products (about 3x slower for vit_b_16's projection).
6. **channels_last** weights (and inputs, in the sweep): a memory layout, no value changes.

And one fact the sweep reads, not a rewrite: **the input layer** (``input_layer``), the one
``Conv2d`` that alone reads the input. It is affine in the input, so the IG sweep runs it once per
image instead of once per path point (``sweep``; docs/engine.md, 2b).

``form(net)`` says what was done to a prepared model: the layers whose output is no longer their
own (a folded conv, a moved ReLU: refused as Grad-CAM layers) and the input layer.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class _Form:
    """What ``prepare_model`` did to a model: the layers whose output is no longer their own
    (convolutions with a BatchNorm folded in, ReLUs now run after their max-pool), and the layer
    that alone reads the input (``input_layer``; None if there is none)."""

    altered: frozenset[str]
    input_layer: str | None


# prepared model -> its _Form
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    (``sweep``). Models that torch.fx cannot trace give None.
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


def form(net: nn.Module) -> _Form | None:
    """What ``prepare_model`` did to ``net``; None if ``net`` is not a prepared model."""
    return _PREPARED.get(net)
