"""Feature visualization and class prototypes: many objectives optimised in one batch.

``visualize(model, objectives, ...)`` optimises one image per objective, all of them in one batch:
every step is one forward and one backward pass of the whole batch. Images of a batch do not
interact (the model is in eval mode and the loss is a sum of per-image terms, so each image's
gradient is its own objective's gradient, and Adam's update is element-wise), so an objective
reaches the same result alone or among others up to float rounding.

Objectives (strings; :func:`parse_objective`):

- ``class:C``: the logit of class C.
- ``channel:LAYER:K``: the mean over height and width of channel K of LAYER's (N, K, h, w) output.
- ``neuron:LAYER:K[:Y:X]``: the activation of channel K at (Y, X) (default: the centre,
  ``(h // 2, w // 2)``).
- ``layer:LAYER``: the mean of all of LAYER's activations ("deepdream").
- ``prototype:C``: the class prototype: minimise ``CE(f(x), C) + prior_weight * MSE(image,
  prior[C])``, where ``prior[C]`` is the class's mean image (3, S, S) in [0, 1] pixel space
  (:func:`class_mean_images`); it starts from that mean image (its pre-sigmoid value, clamped
  to [0.02, 0.98], plus the objective's initial noise), not from noise alone.

Every source of randomness of an objective (its initial parameters and the transforms drawn at
each step) comes from its own ``torch.Generator`` seeded with :func:`objective_seed` ``(seed,
objective)``, so neither depends on the objective's neighbours in a batch, and the same call gives
the same images bit for bit.

Parameterisations (as in Lucid / lucent): ``pixel`` (one parameter per pixel, N(0, 0.01^2)) or
``fft`` (a spectrum with 1/f scaling, N(0, 0.01^2) per real and imaginary part, inverse real FFT
with ``ortho`` norm, divided by 4); both then go through ImageNet colour decorrelation
(``decorrelate=True``) and a sigmoid to [0, 1] pixel space; the model sees ``(image - mean) /
std``.

Transforms (drawn per image and step): ``lucid`` = pad 12 (constant 0.5), jitter 8, scale from
``1 + (i - 5) / 50`` (i = 0..10), rotate from -10..10 degrees (0 five times more likely), jitter
4; ``none``; or a list (:func:`parse_transforms`). They follow Lucid's chain: a jitter of d crops
``side - d`` at a random offset 0..d, a scale resizes to ``floor(s * side)``, so an image's final
side depends on its scale (125..154 px for ``lucid`` at 128). Each image's chain is one affine
map applied as one bilinear resampling (:func:`_geometry`); images that end at the same side go
through the model together (one forward per distinct side, one backward per step).

Without class or prototype objectives the forward pass stops once every layer the objectives
read has run (:func:`_stop_when_read`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xai_workers.hooks import capture_activation, get_submodule, hooks_removed_after

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("class", "channel", "neuron", "layer", "prototype")
#: A prototype starts at ``logit(clamp(prior, PRIOR_CLAMP, 1 - PRIOR_CLAMP))`` before the sigmoid.
PRIOR_CLAMP = 0.02
PARAMS = ("pixel", "fft")

#: Lucid's colour correlation (square root of the ImageNet colour covariance, by SVD), its
#: columns scaled to a largest norm of 1: decorrelated parameters -> RGB.
_COLOR_SQRT = np.asarray(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float64
)
COLOR_CORRELATION = _COLOR_SQRT / np.max(np.linalg.norm(_COLOR_SQRT, axis=0))

#: Lucid's ``standard_transforms`` (lucent ``transform.standard_transforms``).
LUCID_TRANSFORMS = (
    ("pad", 12),
    ("jitter", 8),
    ("scale", tuple(1 + (i - 5) / 50.0 for i in range(11))),
    ("rotate", tuple(float(a) for a in range(-10, 11)) + (0.0,) * 5),
    ("jitter", 4),
)


@dataclass(frozen=True)
class Objective:
    """One parsed objective; ``text`` is its canonical string (``channel:layer4:7``).

    ``index``: the class (class, prototype) or channel (channel, neuron); None for ``layer``.
    ``layer``: dotted layer name, None for class and prototype. ``y``, ``x``: the neuron's
    position, None for the centre (and for every other kind).
    """

    kind: str
    layer: str | None
    index: int | None
    y: int | None = None
    x: int | None = None

    @property
    def text(self) -> str:
        if self.kind in ("class", "prototype"):
            return f"{self.kind}:{self.index}"
        if self.kind == "layer":
            return f"layer:{self.layer}"
        tail = f":{self.y}:{self.x}" if self.y is not None else ""
        return f"{self.kind}:{self.layer}:{self.index}{tail}"


def parse_objective(text: str | Objective) -> Objective:
    """``class:C`` | ``channel:LAYER:K`` | ``neuron:LAYER:K[:Y:X]`` | ``layer:LAYER`` |
    ``prototype:C`` -> :class:`Objective`; ValueError naming the accepted forms otherwise.

    Layer names may hold dots but no colons; indices are integers >= 0.
    """
    if isinstance(text, Objective):
        return text
    forms = "class:C, channel:LAYER:K, neuron:LAYER:K[:Y:X], layer:LAYER or prototype:C"
    parts = str(text).strip().split(":")
    kind, args = parts[0], parts[1:]

    def num(s: str) -> int:
        if not s.isdigit():
            raise ValueError(f"bad objective {text!r}: {s!r} is not an index >= 0; use {forms}")
        return int(s)

    if kind in ("class", "prototype") and len(args) == 1:
        return Objective(kind, None, num(args[0]))
    if kind == "layer" and len(args) == 1 and args[0]:
        return Objective(kind, args[0], None)
    if kind == "channel" and len(args) == 2 and args[0]:
        return Objective(kind, args[0], num(args[1]))
    if kind == "neuron" and len(args) in (2, 4) and args[0]:
        y, x = (num(args[2]), num(args[3])) if len(args) == 4 else (None, None)
        return Objective(kind, args[0], num(args[1]), y, x)
    raise ValueError(f"bad objective {text!r}; use {forms}")


def _indices(spec: str, total: int | None, what: str) -> list[int]:
    """``all`` | ``3`` | ``0,5,9`` | ``0-63`` | ``0-3,7`` -> sorted-as-given list of indices."""
    if spec == "all":
        if total is None:
            raise ValueError(f"'{what}:all' needs to know how many there are")
        return list(range(total))
    out: list[int] = []
    for piece in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", piece)
        if not m:
            raise ValueError(f"bad index list {spec!r} for {what}: use all, 3, 0,5,9 or 0-63")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"bad range {piece.strip()!r} for {what}: end before start")
        out.extend(range(lo, hi + 1))
    if total is not None and any(i >= total for i in out):
        raise ValueError(
            f"{what} index {max(out)} out of range: there are {total} (0..{total - 1})"
        )
    return out


def expand_objectives(
    specs: str | Sequence[str],
    num_classes: int | None = None,
    channels: Mapping[str, int] | None = None,
) -> list[Objective]:
    """Expand ``class:all``, ``class:0,5,9``, ``channel:layer4:0-63``, ``prototype:all`` ...
    (several separated by ``;`` or given as a list) into objectives, in the order given.

    ``num_classes`` resolves and checks class indices; ``channels`` (layer -> number of channels)
    resolves ``channel:LAYER:all`` and checks channel indices. ValueError on anything else.
    """
    if isinstance(specs, str):
        specs = [s for s in specs.split(";") if s.strip()]
    out: list[Objective] = []
    for spec in specs:
        spec = spec.strip()
        kind = spec.split(":", 1)[0]
        if kind in ("class", "prototype") and spec.count(":") == 1:
            what = "class"
            for i in _indices(spec.split(":", 1)[1], num_classes, what):
                out.append(Objective(kind, None, i))
        elif kind == "channel" and spec.count(":") == 2:
            _, layer, idx = spec.split(":")
            total = channels.get(layer) if channels is not None else None
            if channels is not None and layer not in channels:
                raise ValueError(f"objective {spec!r}: model has no (N, K, h, w) layer {layer!r}")
            out.extend(Objective(kind, layer, i) for i in _indices(idx, total, "channel"))
        else:
            obj = parse_objective(spec)
            if obj.kind in ("class", "prototype") and num_classes is not None:
                _indices(str(obj.index), num_classes, "class")
            out.append(obj)
    if not out:
        raise ValueError("no objectives given")
    return out


def objective_seed(seed: int, objective: str | Objective) -> int:
    """The seed of one objective's generator: 63 bits of sha256(``"{seed}:{objective text}"``)."""
    text = parse_objective(objective).text
    digest = hashlib.sha256(f"{int(seed)}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def parse_transforms(spec: str | Sequence | None) -> tuple:
    """``lucid`` | ``none`` | ``pad:12,jitter:8,scale:0.9:1.1,rotate:-10:10,jitter:4`` (or a
    sequence of ``(name, value)`` pairs as in ``LUCID_TRANSFORMS``) -> tuple of pairs.

    In a string, ``scale:LO:HI`` draws from 11 evenly spaced scales, ``rotate:LO:HI`` from the
    whole degrees LO..HI; ``pad:P`` pads with 0.5 and ``jitter:D`` crops ``side - D`` at
    offsets 0..D.
    """
    if spec is None or spec == "none":
        return ()
    if spec == "lucid":
        return LUCID_TRANSFORMS
    if not isinstance(spec, str):
        return tuple((str(n), v) for n, v in spec)
    out = []
    for piece in spec.split(","):
        name, *vals = piece.strip().split(":")
        try:
            if name in ("pad", "jitter") and len(vals) == 1 and int(vals[0]) >= (name == "jitter"):
                out.append((name, int(vals[0])))
                continue
            if name == "scale" and len(vals) == 2 and 0 < float(vals[0]) <= float(vals[1]):
                lo, hi = float(vals[0]), float(vals[1])
                out.append((name, tuple(lo + (hi - lo) * i / 10 for i in range(11))))
                continue
            if name == "rotate" and len(vals) == 2 and int(vals[0]) <= int(vals[1]):
                out.append((name, tuple(float(a) for a in range(int(vals[0]), int(vals[1]) + 1))))
                continue
        except ValueError:
            pass
        raise ValueError(
            f"bad transform {piece.strip()!r}; use lucid, none or a list like "
            "pad:12,jitter:8,scale:0.9:1.1,rotate:-10:10,jitter:4"
        )
    return tuple(out)


# ---- parameterisation ----------------------------------------------------------------------


def _freqs(h: int, w: int) -> torch.Tensor:
    """|frequency| (h, w // 2 + 1) of an rfft2 of an (h, w) image, as Lucid's rfft2d_freqs."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def _spectrum_scale(h: int, w: int) -> torch.Tensor:
    """Lucid's 1/f scaling of the spectrum (h, w // 2 + 1, 1), float32."""
    scale = 1.0 / torch.clamp(_freqs(h, w), min=1.0 / max(h, w))
    return scale.float()[..., None]


class _Image:
    """The optimised parameters of N images of side ``size`` and their map to [0, 1] pixels.

    ``pre()`` is the RGB image before the sigmoid (N, 3, size, size), float32 (the parameters
    through the inverse FFT for ``fft``, then through the colour matrix when ``decorrelate``);
    ``pixels()`` = sigmoid(pre()), in [0, 1]. ``set_pre`` writes a given pre-sigmoid image back
    into the parameters (octaves, blur, prototype start). The maps are linear and invertible, so
    this is exact up to rounding.
    """

    def __init__(self, init: torch.Tensor, param: str, size: int, decorrelate: bool, device):
        self.param, self.size, self.decorrelate = param, size, decorrelate
        self.color = torch.tensor(COLOR_CORRELATION, dtype=torch.float32, device=device)
        self.scale = _spectrum_scale(size, size).to(device) if param == "fft" else None
        self.p = init.to(device).requires_grad_(True)

    def _mix(self, t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if not self.decorrelate:
            return t
        m = torch.linalg.inv(self.color) if inverse else self.color
        return torch.einsum("nchw,dc->ndhw", t, m)

    def pre(self) -> torch.Tensor:
        if self.param == "pixel":
            t = self.p
        else:
            spec = torch.view_as_complex(self.scale * self.p)
            t = torch.fft.irfftn(spec, s=(self.size, self.size), norm="ortho") / 4.0
        return self._mix(t)

    def pixels(self) -> torch.Tensor:
        return torch.sigmoid(self.pre())

    @torch.no_grad()
    def set_pre(self, pre: torch.Tensor) -> None:
        t = self._mix(pre, inverse=True)
        if self.param == "pixel":
            self.p.copy_(t)
        else:
            spec = torch.fft.rfftn(t * 4.0, s=(self.size, self.size), norm="ortho")
            self.p.copy_(torch.view_as_real(spec) / self.scale)


def _init_params(gens: Sequence[torch.Generator], param: str, size: int) -> torch.Tensor:
    """Initial parameters (N, ...) float32, N(0, 0.01^2), drawn from each objective's generator."""
    shape = (3, size, size) if param == "pixel" else (3, size, size // 2 + 1, 2)
    return torch.stack([torch.randn(shape, generator=g) * 0.01 for g in gens])


# ---- transforms ----------------------------------------------------------------------------


def _draws_per_step(transforms: tuple) -> int:
    """Uniform numbers one step draws per image: two per jitter (x, y), one per scale/rotate."""
    return sum({"pad": 0, "jitter": 2}.get(name, 1) for name, _ in transforms)


def _pick(values: Sequence, u: np.ndarray) -> np.ndarray:
    """``values[floor(u * len(values))]`` elementwise for uniforms ``u`` in [0, 1)."""
    vals = np.asarray(values, dtype=np.float64)
    return vals[np.minimum((u * len(vals)).astype(np.int64), len(vals) - 1)]


def _geometry(
    transforms: tuple, draws: np.ndarray, size: int, out_side: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's transforms as one affine map, Lucid's chain semantics (the image's side
    changes along the chain as in Lucid's ``standard_transforms``):

    - ``pad:P``: side + 2P (constant 0.5);
    - ``jitter:D``: a crop of side - D at offsets (x, y) drawn from 0..D;
    - ``scale``: a resize to ``floor(s * side)`` (bilinear, half-pixel centres);
    - ``rotate``: a turn about the centre, same side (counter-clockwise on screen for deg > 0,
      as torchvision's ``rotate``).

    ``draws`` (..., n_draws) float64 uniforms in [0, 1) (``_draws_per_step`` per image and step).
    ``out_side``: a model that takes only one input side (a ViT's fixed patch grid) gets every
    image resized to it as the chain's last step (one more ``scale``, folded into the same map).

    Returns ``theta`` (..., 2, 3) float64, ``F.affine_grid``'s matrix (align_corners=False) from
    the output (side x side) to the input (size x size), and ``side`` (...) int64, the output side
    of each image (``out_side`` everywhere when given). Works in pixel units centred on the
    image: the source point of output point ``u`` is ``A u + b``.
    """
    shape = draws.shape[:-1]
    a = np.broadcast_to(np.eye(2), (*shape, 2, 2)).copy()
    b = np.zeros((*shape, 2))
    side = np.full(shape, size, dtype=np.int64)
    k = 0
    for name, val in transforms:
        if name == "pad":
            side = side + 2 * int(val)
            continue
        u = draws[..., k]
        k += 1
        if name == "jitter":
            d = int(val)
            v = draws[..., k]
            k += 1
            side = side - d
            # crop offsets 0..d in x and y, relative to the centred crop
            t = np.stack([np.minimum((u * (d + 1)).astype(np.int64), d),
                          np.minimum((v * (d + 1)).astype(np.int64), d)], -1) - d / 2.0  # fmt: skip
            b = np.einsum("...ij,...j->...i", a, t) + b
        elif name == "scale":
            # resize: a side of floor(s * side) (the 1e-9 keeps 1.02 * 150 = 152.99999... at 153)
            new = np.floor(_pick(val, u) * side + 1e-9).astype(np.int64)
            a = a * (side / np.maximum(new, 1))[..., None, None]
            side = new
        elif name == "rotate":
            r = np.radians(_pick(val, u))
            c, s = np.cos(r), np.sin(r)
            rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
            a = a @ rot
        else:
            raise ValueError(f"unknown transform {name!r}")
        if (side < 1).any():
            raise ValueError(f"transforms leave no image (side {int(side.min())})")
    if out_side is not None:  # resize to the side the model requires
        a = a * (side / out_side)[..., None, None]
        side = np.full(shape, int(out_side), dtype=np.int64)
    theta = np.concatenate([a * (side / size)[..., None, None], (b * 2.0 / size)[..., None]], -1)
    return theta, side


def _resample(pixels: torch.Tensor, theta: np.ndarray, side: int) -> torch.Tensor:
    """(n, 3, S, S) in [0, 1] -> (n, 3, side, side): one bilinear resampling per image by its
    ``theta`` (n, 2, 3); outside the image is 0.5 (Lucid's constant padding)."""
    th = torch.as_tensor(theta, dtype=pixels.dtype, device=pixels.device)
    grid = F.affine_grid(th, [len(th), 3, side, side], align_corners=False)
    return F.grid_sample(pixels - 0.5, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + 0.5  # fmt: skip


def _transform(pixels: torch.Tensor, transforms: tuple, draws: torch.Tensor) -> torch.Tensor:
    """Apply each image's drawn transforms (:func:`_geometry`) to (N, 3, S, S) in [0, 1] when
    they all end at the same side (a ValueError otherwise); ``draws`` (N, n_draws) float64."""
    if not transforms:
        return pixels
    theta, side = _geometry(transforms, draws.numpy().astype(np.float64), pixels.shape[-1])
    if len(set(side.tolist())) != 1:
        raise ValueError(f"the images end at different sides {sorted(set(side.tolist()))}")
    return _resample(pixels, theta, int(side[0]))


# ---- objectives ----------------------------------------------------------------------------


def _readout_plan(objs: Sequence[Objective]) -> list[tuple]:
    """Objectives grouped for a vectorised readout: ``(kind, layer, rows, index, y, x)`` with
    ``rows``/``index`` int64 tensors (and ``y``/``x`` lists of None or int for neurons)."""
    groups: dict[tuple, list[int]] = {}
    for i, o in enumerate(objs):
        groups.setdefault((o.kind, o.layer), []).append(i)
    plan = []
    for (kind, layer), rows in groups.items():
        index = [objs[i].index if objs[i].index is not None else 0 for i in rows]
        ys, xs = [objs[i].y for i in rows], [objs[i].x for i in rows]
        plan.append((kind, layer, torch.tensor(rows), torch.tensor(index), ys, xs))
    return plan


def _values(
    plan: list[tuple],
    n: int,
    logits: torch.Tensor | None,
    acts: Mapping[str, torch.Tensor],
    like: torch.Tensor,
) -> torch.Tensor:
    """(N,) the value each image's objective maximises (module docstring); prototypes get
    their class's log-softmax (= -CE). ``logits`` may be None when no objective reads them;
    ``like``: a tensor whose dtype and device the result takes."""
    out = like.new_zeros(n)
    for kind, layer, rows, index, ys, xs in plan:
        rows, index = rows.to(like.device), index.to(like.device)
        if kind == "class":
            v = logits[rows, index]
        elif kind == "prototype":
            v = logits[rows].log_softmax(-1)[torch.arange(len(rows)), index]
        else:
            a = acts[layer][rows]
            if kind == "layer":
                v = a.flatten(1).mean(1)
            else:
                if int(index.max()) >= a.shape[1]:
                    raise ValueError(f"objective on {layer}: the layer has {a.shape[1]} channels")
                ch = a[torch.arange(len(rows)), index]  # (n, h, w) or (n,)
                if kind == "channel" or ch.dim() == 1:
                    v = ch.flatten(1).mean(1) if ch.dim() > 1 else ch
                else:
                    h, w = ch.shape[1:]
                    y = torch.tensor([h // 2 if q is None else q for q in ys])
                    x = torch.tensor([w // 2 if q is None else q for q in xs])
                    if int(y.max()) >= h or int(x.max()) >= w:
                        raise ValueError(f"neuron objective on {layer}: its output is {h}x{w}")
                    v = ch[torch.arange(len(rows)), y.to(ch.device), x.to(ch.device)]
        out = out.index_put((rows,), v)
    return out


class _Stop(Exception):
    """Raised by :func:`_stop_when_read`'s hook to end a forward pass early."""


@contextlib.contextmanager
def _stop_when_read(model: nn.Module, stores: Mapping[str, dict]) -> Iterator[None]:
    """Forward hooks on the layers of ``stores`` (``capture_activation``'s dicts, their hooks
    registered first so they run first) that raise :class:`_Stop` once every one of them has run
    in the current pass: no work past the deepest layer an objective reads. The caller catches
    ``_Stop``; the hooks are removed on exit, error or not."""

    def hook(module, inp, out):
        if all(st["calls"] >= 1 for st in stores.values()):
            raise _Stop

    with hooks_removed_after() as handles:
        for name in stores:
            handles.append(get_submodule(model, name).register_forward_hook(hook))
        yield


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with requires_grad False on every parameter; the caller's flags
    and modes are restored on exit, error or not."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.train(t)


# ---- the optimisation ----------------------------------------------------------------------


def visualize(
    model: nn.Module,
    objectives: Sequence[str | Objective] | str,
    steps: int = 512,
    size: int = 128,
    param: str = "fft",
    transforms: str | Sequence | None = "lucid",
    lr: float = 0.05,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    decorrelate: bool = True,
    blur_every: int = 0,
    blur_sigma: float = 0.5,
    grad_norm: bool = False,
    octaves: int = 1,
    octave_scale: float = 1.4,
    prior: Mapping[int, torch.Tensor] | torch.Tensor | None = None,
    prior_weight: float = 0.1,
    l2_weight: float = 0.0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    input_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Optimise one image per objective with Adam (``lr``), ``steps`` steps, in batches.

    Args:
        model: maps (N, 3, H, W) float32 input-space images to logits (N, classes); it is left as
            found (eval mode and frozen only during the call; no hook outlives it).
        objectives: strings or :class:`Objective` (module docstring); a string is split at ``;``.
        size: image side S. param: ``pixel`` or ``fft``. transforms: ``lucid``, ``none``, a
            string list or pairs (:func:`parse_transforms`). seed: with each objective's text,
            seeds its generator (:func:`objective_seed`).
        mean, std: the model's normalisation of [0, 1] pixels.
        decorrelate: Lucid's colour decorrelation before the sigmoid.
        blur_every, blur_sigma: every ``blur_every`` steps (0: never), blur the pre-sigmoid image
            with a Gaussian of ``blur_sigma`` pixels (torchvision ``gaussian_blur``).
        grad_norm: divide each image's parameter gradient by its standard deviation.
        octaves, octave_scale: optimise at ``size / octave_scale ** (octaves - 1 - o)`` in octave
            o, upsampling the image (bilinear) between octaves; steps are split evenly, the last
            octave takes the remainder.
        prior: class -> mean image (3, S, S) in [0, 1] (or a (classes, 3, S, S) tensor), needed
            by ``prototype:C``; prior_weight: its MSE weight.
        l2_weight: adds ``l2_weight / 2 * ||image - 0.5||^2`` (sum over pixels) to every loss.
        batch_size: objectives per optimisation batch, in the given order (None: all at once).
        device: where to optimise (default: the model's parameters' device, else CPU).
        input_size: the only input side the model takes (vision transformers with a fixed patch
            grid; :func:`required_input_size` finds it), or None (any side). Every image the
            model sees is resampled to it: transformed images as the last step of their chain
            (:func:`_geometry`), untransformed ones bilinearly (antialiased when shrinking).

    Returns a dict:
        ``images`` float32 (N, 3, S, S) in [0, 1] pixel space; ``activation`` float32 (N,): the
        objective's value on the final image, untransformed (class logit, layer readout; for
        ``prototype:C`` the softmax probability of C); ``loss_curve`` float32 (N, steps): the loss
        minimised at each step (``-value`` under that step's transforms, plus the penalties;
        ``CE + prior_weight * MSE`` for prototypes).
    """
    objs = [parse_objective(o) for o in
            ([s for s in objectives.split(";") if s.strip()] if isinstance(objectives, str)
             else objectives)]  # fmt: skip
    if not objs:
        raise ValueError("no objectives given")
    if param not in PARAMS:
        raise ValueError(f"param must be one of {', '.join(PARAMS)}; got {param!r}")
    if input_size is not None and input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    if steps < 1 or size < 1 or octaves < 1 or lr <= 0:
        raise ValueError("steps, size and octaves must be >= 1 and lr > 0")
    if octaves > 1 and not octave_scale > 1:
        raise ValueError(f"octave_scale must be > 1, got {octave_scale}")
    tf = parse_transforms(transforms)
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    priors = _priors(objs, prior, size)
    st = _Settings(
        steps, size, param, tf, float(lr), int(seed), tuple(mean), tuple(std), decorrelate,
        blur_every, blur_sigma, grad_norm, octaves, octave_scale, prior_weight, l2_weight,
        input_size,
    )  # fmt: skip
    bs = batch_size or len(objs)
    results = []
    with _frozen(model):
        for start in range(0, len(objs), bs):
            chunk = objs[start : start + bs]
            results.append(_optimise(model, chunk, st, priors, device))
    return {k: torch.cat([r[k] for r in results]) for k in ("images", "activation", "loss_curve")}


def _priors(objs, prior, size) -> dict[int, torch.Tensor]:
    need = sorted({o.index for o in objs if o.kind == "prototype"})
    out = {}
    for c in need:
        if prior is None or (isinstance(prior, Mapping) and c not in prior):
            raise ValueError(f"prototype:{c} needs a prior image of class {c} (class mean image)")
        if not isinstance(prior, Mapping) and c >= len(prior):
            raise ValueError(f"prototype:{c}: the prior holds {len(prior)} classes")
        p = torch.as_tensor(prior[c], dtype=torch.float32)
        if p.dim() != 3 or p.shape[0] != 3:
            raise ValueError(f"prior image of class {c} must be (3, H, W); got {tuple(p.shape)}")
        if tuple(p.shape[1:]) != (size, size):
            p = F.interpolate(p[None], size=(size, size), mode="area")[0]
        out[c] = p
    return out


def _octave_sizes(size: int, octaves: int, scale: float) -> list[int]:
    return [max(8, round(size / scale ** (octaves - 1 - o))) for o in range(octaves)]


@dataclass(frozen=True)
class _Settings:
    """The settings of one ``visualize`` call that every batch shares (see its docstring)."""

    steps: int
    size: int
    param: str
    transforms: tuple
    lr: float
    seed: int
    mean: tuple
    std: tuple
    decorrelate: bool
    blur_every: int
    blur_sigma: float
    grad_norm: bool
    octaves: int
    octave_scale: float
    prior_weight: float
    l2_weight: float
    input_size: int | None = None


def _optimise(
    model: nn.Module, objs: Sequence[Objective], st: _Settings, priors: dict, device
) -> dict[str, torch.Tensor]:
    """One batch: the ``visualize`` result for ``objs``."""
    from torchvision.transforms.functional import gaussian_blur

    steps, size, param, tf, seed = st.steps, st.size, st.param, st.transforms, st.seed
    decorrelate, blur_every, blur_sigma = st.decorrelate, st.blur_every, st.blur_sigma
    prior_weight, l2_weight = st.prior_weight, st.l2_weight
    n = len(objs)
    gens = [torch.Generator().manual_seed(objective_seed(seed, o)) for o in objs]
    sizes = _octave_sizes(size, st.octaves, st.octave_scale)
    sizes[-1] = size
    per = [steps // st.octaves] * st.octaves
    per[-1] += steps - sum(per)
    # transforms of every step, drawn up front from each objective's generator
    nd = _draws_per_step(tf)
    draws = torch.stack(
        [torch.rand(steps, max(nd, 1), generator=g, dtype=torch.float64) for g in gens], dim=1
    )  # fmt: skip  (steps, N, nd)
    m = torch.tensor(st.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(st.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    layers = sorted({o.layer for o in objs if o.layer is not None})
    proto = [i for i, o in enumerate(objs) if o.kind == "prototype"]
    # without class or prototype objectives the logits are not needed: the forward pass stops
    # once every layer an objective reads has run
    stop = all(o.kind in ("channel", "neuron", "layer") for o in objs)
    curve = torch.zeros(n, steps, device=device)
    image = None
    step = 0
    with contextlib.ExitStack() as stack:
        stores = {name: stack.enter_context(capture_activation(model, name)) for name in layers}
        if stop:
            stack.enter_context(_stop_when_read(model, stores))

        def forward(x, rows):
            """The values of objectives ``rows`` (sorted ints) on their images ``x``."""
            for store in stores.values():
                store["calls"] = 0
            fixed = st.input_size
            if fixed is not None and x.shape[-1] != fixed:  # untransformed: resize to the model's
                x = F.interpolate(x, size=(fixed, fixed), mode="bilinear", align_corners=False,
                                  antialias=x.shape[-1] > fixed)  # fmt: skip
            # channels_last changes no value and is the fastest layout for convolutions
            inp = ((x - m) / s).contiguous(memory_format=torch.channels_last)
            logits = None
            try:
                logits = model(inp)
            except _Stop:
                pass
            acts = {k: store["act"] for k, store in stores.items()}
            plan = _readout_plan([objs[i] for i in rows])
            return _values(plan, len(rows), logits, acts, x), logits

        every = list(range(n))

        def transformed_values(pixels, theta, sides):
            """(N,) values under one step's transforms, one forward per output side."""
            if not tf:
                return forward(pixels, every)[0]
            parts = []
            for side in np.unique(sides):
                rows = np.flatnonzero(sides == side)
                x = _resample(pixels if len(rows) == n else pixels[rows], theta[rows], int(side))
                parts.append((rows, forward(x, rows.tolist())[0]))
            if len(parts) == 1:
                return parts[0][1]
            values = pixels.new_zeros(n)
            for rows, v in parts:
                values = values.index_put((torch.as_tensor(rows, device=device),), v)
            return values

        for o, side in enumerate(sizes):
            if image is None:
                image = _Image(_init_params(gens, param, side), param, side, decorrelate, device)
            else:
                pre = F.interpolate(image.pre().detach(), size=(side, side), mode="bilinear",
                                    align_corners=False)  # fmt: skip
                shape = (n, 3, side, side) if param == "pixel" else (n, 3, side, side // 2 + 1, 2)
                image = _Image(torch.zeros(shape), param, side, decorrelate, device)
                image.set_pre(pre)
            target = None
            if proto:
                target = torch.stack([
                    F.interpolate(priors[objs[i].index][None], size=(side, side), mode="area")[0]
                    for i in proto
                ]).to(device)  # fmt: skip
                if o == 0:  # a prototype starts at its class mean image (plus its own noise)
                    pre = image.pre().detach().clone()
                    pre[proto] += torch.logit(target.clamp(PRIOR_CLAMP, 1 - PRIOR_CLAMP))
                    image.set_pre(pre)
            opt = torch.optim.Adam([image.p], lr=st.lr)
            # every step's geometry of this octave at once: (per[o], N, 2, 3), (per[o], N)
            theta, sides = _geometry(
                tf, draws[step : step + per[o], :, :nd].numpy(), side, st.input_size
            )
            for t in range(per[o]):
                pixels = image.pixels()
                values = transformed_values(pixels, theta[t], sides[t])
                loss = -values
                if proto:
                    mse = ((pixels[proto] - target) ** 2).mean(dim=(1, 2, 3))
                    loss = loss.index_add(0, torch.tensor(proto, device=device),
                                          prior_weight * mse)  # fmt: skip
                if l2_weight:
                    loss = loss + 0.5 * l2_weight * ((pixels - 0.5) ** 2).sum(dim=(1, 2, 3))
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                if st.grad_norm:
                    g = image.p.grad
                    g /= g.flatten(1).std(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
                opt.step()
                curve[:, step] = loss.detach()
                step += 1
                if blur_every and step % blur_every == 0:
                    with torch.no_grad():
                        k = 2 * math.ceil(3 * blur_sigma) + 1
                        image.set_pre(gaussian_blur(image.pre(), [k, k], [blur_sigma] * 2))
        with torch.no_grad():
            pixels = image.pixels()
            values, logits = forward(pixels, every)
            if proto:
                probs = logits.softmax(-1)
                values = values.clone()
                for i in proto:
                    values[i] = probs[i, objs[i].index]
    return {
        "images": pixels.detach().float().cpu(),
        "activation": values.detach().float().cpu(),
        "loss_curve": curve.cpu(),
    }


# ---- the model's input side ----------------------------------------------------------------


def required_input_size(model: nn.Module, size: int, own_size: int | None = None) -> int | None:
    """The one input side ``model`` takes, or None when it takes any.

    Runs the model (no gradients) on (1, 3, s, s) zero images at the visualization's ``size``,
    at ``size + 7`` (a side the transforms produce: ``lucid`` ends between 0.97 and 1.2 times
    ``size``) and at the model's ``own_size`` (its preprocessing's image size). When it runs on
    all: None. Otherwise the model has a fixed input (a ViT's patch grid: "Input height (216)
    doesn't match model (224)"): ``own_size`` when it runs there, else ``size``. ValueError
    when it runs on none, naming the first error."""
    sides = [size, size + 7] + ([own_size] if own_size else [])
    ok, first_error = set(), None
    with _frozen(model), torch.no_grad():
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        for side in dict.fromkeys(sides):
            try:
                model(torch.zeros(1, 3, side, side, device=device))
                ok.add(side)
            except Exception as e:  # noqa: BLE001 - any failure means "not this side"
                first_error = first_error or f"{side} px: {type(e).__name__}: {e}"
    if first_error is None:
        return None
    for side in (own_size, size):
        if side in ok:
            return side
    raise ValueError(f"the model runs on none of the sides {sorted(set(sides))} ({first_error})")


# ---- class mean images ---------------------------------------------------------------------


def class_mean_images(
    images: torch.Tensor, labels: torch.Tensor | np.ndarray, num_classes: int
) -> torch.Tensor:
    """Per-class mean of ``images`` (N, 3, S, S) float in [0, 1] pixel space with integer
    ``labels`` (N,) -> float32 (num_classes, 3, S, S); a class without images gets NaN."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    x = torch.as_tensor(images, dtype=torch.float64)
    sums = torch.zeros((num_classes, *x.shape[1:]), dtype=torch.float64)
    sums.index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    means = sums / counts.view(-1, 1, 1, 1)
    return means.float()
