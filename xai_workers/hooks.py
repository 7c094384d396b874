"""Context managers that observe a model's layers and always remove their hooks.

Every hook registered here is removed in a ``finally`` block, so no hook outlives the ``with``
statement, also when the model raises inside it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerInfo:
    """One module of a model as seen in a forward pass.

    ``output_shape`` is the shape of the module's (first) output tensor for the traced input, batch
    axis included; ``calls`` is how often the module ran in that pass (a module that runs more than
    once, such as a shared ReLU, has no single activation to explain).
    """

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    calls: int


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name``; a readable KeyError listing near names if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = [n for n in names if n.split(".")[0] == name.split(".")[0]][:10] or names[-10:]
        raise KeyError(
            f"model has no layer named {name!r}; some layers it has: {', '.join(close)}"
        ) from None


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def grid_layout(shape) -> tuple[str, int, int, int] | None:
    """How a layer output of ``shape`` (batch axis first) reads as an h x w grid, or None.

    Returns ``(kind, h, w, cls)``, always with h > 1 and w > 1 (a 1 x 1 map is constant):

    - ``("nchw", h, w, 0)``: (N, K, h, w), a convolutional map: the last two axes are equal;
    - ``("nhwc", h, w, 0)``: (N, h, w, D), channels-last blocks (Swin, ConvNeXt's inner
      LayerNorm): the middle axes are equal and the last two are not;
    - ``("tokens", h, w, cls)``: (N, T, D) with T = h*w (``cls`` 0) or 1 + h*w (``cls`` 1: a class
      token first, dropped), h = w = sqrt(T - cls): a vision transformer's tokens.

    This is pytorch-grad-cam's ``reshape_transform`` convention. Inputs are square (S x S), so
    every spatial grid is square; a 4-D output without two equal axes in one of these places
    (attention's (N, heads, T, head_dim)) is no grid.
    """
    if shape is None:
        return None
    shape = tuple(shape)
    if len(shape) == 4:
        _, a, b, c = shape
        if b == c:
            return ("nchw", b, c, 0) if b > 1 else None
        if a == b:
            return ("nhwc", a, b, 0) if a > 1 else None
        return None  # e.g. attention's (N, heads, T, head_dim): no square grid
    if len(shape) == 3:
        t = shape[1]
        for cls in (0, 1):
            side = math.isqrt(max(t - cls, 0))
            if side > 1 and side * side == t - cls:
                return ("tokens", side, side, cls)
    return None


def as_grid(t: torch.Tensor, layout: tuple[str, int, int, int]) -> torch.Tensor:
    """A layer output (or its gradient) as (N, D, h, w) following ``grid_layout``'s ``layout``."""
    kind, h, w, cls = layout
    if kind == "nchw":
        return t
    if kind == "nhwc":
        return t.permute(0, 3, 1, 2)
    return t[:, cls:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


@contextlib.contextmanager
def hooks_removed_after() -> Iterator[list]:
    """Yield a list for hook handles; every handle in it is removed on exit, error or not."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def trace_layers(model: nn.Module, x: torch.Tensor) -> list[LayerInfo]:
    """Run ``model(x)`` once without gradients and list its modules in the order they finished.

    Modules that never ran are left out. The root module (name ``""``) is left out too.
    """
    order: dict[str, list] = {}
    with hooks_removed_after() as handles:
        for name, mod in model.named_modules():
            if not name:
                continue

            def hook(m, inp, out, name=name):
                t = _first_tensor(out)
                entry = order.setdefault(name, [type(m).__name__, None, 0, 0])
                entry[1] = tuple(t.shape) if t is not None else None
                entry[2] += 1
                entry[3] = len(order) if entry[2] == 1 else entry[3]

            handles.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            model(x)
    return [LayerInfo(n, e[0], e[1], e[2]) for n, e in order.items()]


def default_gradcam_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The default Grad-CAM layer: the last convolutional map, or a transformer's last block.

    - Convolutional: the last layer whose output is (N, K, h, w) with h, w > 1, before the
      classifier head. Of several modules that end with the very same tensor (``layer4.1.relu``,
      ``layer4.1`` and ``layer4`` in a ResNet) the outermost one is returned.
    - Transformer: the output of the first LayerNorm of the last block (a module with two or more
      ``nn.LayerNorm`` children whose outputs read as grids, ``grid_layout``): the input of that
      block's attention, as pytorch-grad-cam recommends (``blocks[-1].norm1``), not the patch
      embedding. Chosen when that block finishes after the last convolutional map.

    A module that runs more than once is never chosen.
    """
    last: dict = {"t": None, "name": None, "at": -1, "order": -1}
    norms: list[tuple[int, str]] = []  # (finish order, name) of LayerNorms with a grid output
    with hooks_removed_after() as handles:
        calls: dict[str, int] = {}
        for name, mod in model.named_modules():
            if not name:
                continue

            def hook(m, inp, out, name=name):
                calls[name] = calls.get(name, 0) + 1
                order = last["order"] = last["order"] + 1
                t = _first_tensor(out)
                if t is None:
                    return
                grid = grid_layout(t.shape)
                if isinstance(m, nn.LayerNorm) and grid is not None and grid[0] != "nchw":
                    norms.append((order, name))
                if grid is None or grid[0] != "nchw":
                    return
                if t is last["t"] and last["name"] is not None:
                    # same tensor as the module that just finished inside this one: outermost wins
                    last["name"], last["at"] = name, order
                    return
                last["t"], last["name"], last["at"] = t, name, order

            handles.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            model(x)
    blocks: dict[str, list[tuple[int, str]]] = {}
    for order, name in norms:
        if calls.get(name, 0) == 1:
            blocks.setdefault(name.rpartition(".")[0], []).append((order, name))
    blocks = {b: v for b, v in blocks.items() if len(v) >= 2}
    if blocks:
        block = max(blocks, key=lambda b: max(o for o, _ in blocks[b]))
        order, first = min(blocks[block])
        if order > last["at"]:
            return first
    name = last["name"]
    if name is None:
        raise ValueError(
            "model has no layer with a (N, K, h, w) output of more than one pixel and no "
            "transformer block; name a layer (`xai-audit layers`)"
        )
    while calls.get(name, 0) > 1 and "." in name:
        name = name.rsplit(".", 1)[0]
    if calls.get(name, 0) > 1:
        raise ValueError(f"default Grad-CAM layer {name!r} runs more than once; name a layer")
    return name


@contextlib.contextmanager
def capture_activation(model: nn.Module, layer: str) -> Iterator[dict]:
    """Capture the output of ``layer`` during forward passes inside the ``with`` block.

    Yields a dict whose ``"act"`` holds the latest output (any shape), still in the autograd
    graph, so ``torch.autograd.grad(score, store["act"])`` gives dScore/dA. The module's output is
    handed on as a clone, so an in-place op after the layer (``ReLU(inplace=True)``) cannot
    overwrite the captured activation. Raises if the layer runs more than once per forward.
    """
    module = get_submodule(model, layer)
    store: dict = {"act": None, "calls": 0}

    def hook(m, inp, out):
        t = _first_tensor(out)
        if t is None:
            raise TypeError(f"layer {layer!r} does not output a tensor")
        store["calls"] += 1
        if store["calls"] > 1:
            raise ValueError(f"layer {layer!r} runs more than once per forward pass; name another")
        store["act"] = t
        clone = t.clone()
        if isinstance(out, torch.Tensor):
            return clone
        return (clone, *out[1:])

    with hooks_removed_after() as handles:
        handles.append(module.register_forward_hook(hook))
        yield store
