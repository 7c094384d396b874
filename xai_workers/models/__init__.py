"""Load a model from a spec string: module (eval mode, CPU) + its preprocessing + class names +
named layers.

Model sources are adapters, one module each, all returning a :class:`.base.Source`
(module, checksum, its own preprocessing, class names):

- ``torchvision:<arch>`` (:mod:`.from_torchvision`): a ``torchvision.models`` image classifier;
  weights: a state_dict file, a torchvision weights name (with its ``transforms()`` and class
  names) or ``random``.
- ``timm:<name>`` (:mod:`.from_timm`): ``timm.create_model``; weights: a state_dict file with
  timm's key names, ``random``, or none (pretrained weights from the local Hugging Face cache);
  preprocessing from its ``pretrained_cfg``.
- ``hf:<folder or repo id>`` (:mod:`.from_hf`): ``transformers.AutoModelForImageClassification``
  from a ``save_pretrained`` folder or the local cache, wrapped to return logits; class names from
  ``config.id2label``; preprocessing from its image processor config.
- ``torchscript:<uri>`` (:mod:`.from_torchscript`): a ``torch.jit.save`` archive, local or
  ``s3://`` (holds its own weights; cannot be hooked, so no Grad-CAM/CAM).
- ``<module>:<callable>`` (:mod:`.from_callable`): ``callable()`` returns an ``nn.Module``;
  ``weights``, when given, is a state_dict loaded into it (``random``: the callable runs seeded).

A ``torchvision:`` model without weights, or a ``timm:`` one without weights and without its
pretrained weights in the local cache, is a :class:`ModelSpecError`: ``weights="random"`` (seeded
by ``seed``) is the explicit way to ask for a random network.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from xai_workers.hooks import LayerInfo, default_gradcam_layer, grid_layout, trace_layers
from xai_workers.models.base import (
    RANDOM,
    ModelSpecError,
    Source,
    load_state_dict_file,
    state_dict_sha256,
)
from xai_workers.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

__all__ = [
    "RANDOM",
    "LoadedModel",
    "ModelSpecError",
    "Source",
    "describe_layers",
    "is_gradcam_layer",
    "load_model",
    "load_state_dict_file",
    "state_dict_sha256",
]

_IMPORT_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_SPEC_FORMS = (
    "'torchvision:<arch>', 'timm:<name>', 'hf:<folder or repo id>', 'torchscript:<uri>' "
    "or '<module>:<callable>'"
)
DEFAULT_PREPROCESSING = "defaults (shorter side to S, centre crop S, bilinear, ImageNet mean/std)"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for attribution.

    - ``module``: the ``nn.Module`` in eval mode, on CPU; maps float32 (N, 3, S, S) inputs (input
      space, see ``preprocessing``) to logits (N, ``num_classes``).
    - ``preprocessing``: how images become its inputs (S = ``preprocessing.image_size``): the
      model's own evaluation transform when it carries one, with the caller's overrides.
    - ``layers``: ``hooks.trace_layers`` on a (1, 3, S, S) zero input, in the order the modules
      finished (empty for TorchScript modules, which cannot be hooked).
    - ``num_classes``: width of the logits, from that same forward pass.
    - ``checksum``: sha256 hex of the weights file's bytes (state_dict, TorchScript archive,
      torch.hub's or the Hugging Face cache's file), else of the module's state_dict tensors
      (see :func:`state_dict_sha256`).
    - ``spec``: the spec string it was loaded from.
    - ``class_names``: one name per class (torchvision weights' categories, timm's ImageNet
      names for its pretrained weights, HF ``config.id2label``), or None when unknown.
    - ``preprocessing_from``: where ``preprocessing`` came from, for the manifest.
    """

    module: nn.Module
    preprocessing: Preprocessing
    layers: tuple[LayerInfo, ...]
    num_classes: int
    checksum: str
    spec: str
    class_names: tuple[str, ...] | None = None
    preprocessing_from: str = DEFAULT_PREPROCESSING


def load_model(
    spec: str,
    weights: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    seed: int = 0,
    s3_endpoint: str | None = None,
) -> LoadedModel:
    """Load the model described by ``spec`` (forms in the module docstring) and describe it.

    ``weights``: local path or ``s3://`` URI of a state_dict, a torchvision weights name (for
    ``torchvision:`` only), ``"random"`` (a random initialisation made with torch's generator
    seeded by ``seed``: the same checksum on every call; the caller's RNG state is untouched), or
    None (``torchvision:``: an error naming these choices; ``timm:``: its pretrained weights from
    the local Hugging Face cache; ``hf:``/``torchscript:``: the weights they hold;
    ``<module>:<callable>``: whatever the callable returns).

    Preprocessing: the model's own (``LoadedModel.preprocessing_from``), else "shorter side to
    S = 224, centre crop S, bilinear, ImageNet mean/std"; each argument given overrides it:
    ``image_size`` S, ``resize_size`` R (the shorter side before the crop) or ``crop_pct``
    (R = floor(S / crop_pct), timm's rule; not both), ``interpolation`` (bilinear, bicubic,
    nearest), ``mean``/``std``. A new S without R keeps the model's own ratio R / S.
    ``s3_endpoint`` overrides ``$AWS_ENDPOINT_URL`` for S3 reads.

    The module is returned in eval mode on CPU; its parameters are otherwise as loaded
    (requires_grad untouched). Runs one forward pass on a (1, 3, S, S) zero input (logits width
    and layer trace). Raises :class:`ModelSpecError` with a readable message.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec; expected {_SPEC_FORMS}")
    spec = spec.strip()
    if weights is not None:
        weights = os.fspath(weights)
    kind, _, rest = spec.partition(":")
    if kind == "torchvision":
        from xai_workers.models import from_torchvision as adapter
    elif kind == "timm":
        from xai_workers.models import from_timm as adapter
    elif kind == "hf":
        from xai_workers.models import from_hf as adapter
    elif kind == "torchscript":
        from xai_workers.models import from_torchscript as adapter
    elif _IMPORT_SPEC.fullmatch(spec):
        from xai_workers.models import from_callable as adapter

        rest = spec
    else:
        raise ModelSpecError(f"cannot parse model spec {spec!r}; expected {_SPEC_FORMS}")
    if weights == RANDOM and kind == "torchscript":
        raise ModelSpecError("--weights random does not apply to torchscript: (it holds weights)")
    # preprocessing settings are checked before the (possibly slow) load
    _preprocessing(None, image_size, mean, std, resize_size, crop_pct, interpolation)
    src: Source = adapter.load(rest.strip(), weights, seed=seed, s3_endpoint=s3_endpoint)
    preprocessing, origin = _preprocessing(
        src, image_size, mean, std, resize_size, crop_pct, interpolation
    )

    module = src.module.cpu().eval()
    s = preprocessing.image_size
    x = torch.zeros(1, 3, s, s)
    num_classes, layers = _probe(module, x)
    names = src.class_names
    if names is not None and len(names) != num_classes:
        raise ModelSpecError(
            f"model {spec} names {len(names)} classes but returns {num_classes} logits"
        )
    return LoadedModel(
        module=module,
        preprocessing=preprocessing,
        layers=layers,
        num_classes=num_classes,
        checksum=src.checksum or state_dict_sha256(module),
        spec=spec,
        class_names=names,
        preprocessing_from=origin,
    )


def _preprocessing(
    src: Source | None, image_size, mean, std, resize_size, crop_pct, interpolation
) -> tuple[Preprocessing, str]:
    """The model's own preprocessing (``src.preprocessing``) with the given overrides applied."""
    own = dict(src.preprocessing) if src is not None and src.preprocessing else {}
    given = {
        "image_size": image_size,
        "resize_size": resize_size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "mean": mean,
        "std": std,
    }
    try:
        if resize_size is not None and crop_pct is not None:
            raise ValueError("give --resize-size or --crop-pct, not both")
        if crop_pct is not None and not 0 < float(crop_pct) <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct!r}")
        s = int(image_size) if image_size is not None else int(own.get("image_size", 224))
        if resize_size is not None:
            r = int(resize_size)
        elif crop_pct is not None:
            r = math.floor(s / float(crop_pct) + 1e-9)
        elif own.get("resize_size") and image_size is not None and s != own["image_size"]:
            r = s * int(own["resize_size"]) // int(own["image_size"])  # the model's own ratio
        else:
            r = own.get("resize_size")
        pre = Preprocessing(
            image_size=s,
            mean=tuple(mean) if mean is not None else tuple(own.get("mean", IMAGENET_MEAN)),
            std=tuple(std) if std is not None else tuple(own.get("std", IMAGENET_STD)),
            resize_size=None if r is None else int(r),
            resize_mode=own.get("resize_mode", "shorter_side"),
            interpolation=interpolation or own.get("interpolation", "bilinear"),
            crop_anchor=own.get("crop_anchor", "round"),
        )
    except (TypeError, ValueError) as e:
        raise ModelSpecError(f"bad preprocessing settings: {e}") from None
    origin = (src.preprocessing_from if own and src is not None else None) or (
        DEFAULT_PREPROCESSING
    )
    overridden = [k for k, v in given.items() if v is not None]
    if overridden:
        origin += "; overridden: " + ", ".join(overridden)
    return pre, origin


def is_gradcam_layer(layer: LayerInfo) -> bool:
    """Whether Grad-CAM can explain at ``layer``: it runs once per forward and its output reads as
    a grid with h, w > 1 (``hooks.grid_layout``: (N, K, h, w), (N, h, w, D) or (N, T, D) tokens
    with T = h*w or 1 + h*w)."""
    return layer.calls == 1 and grid_layout(layer.output_shape) is not None


def describe_grid(shape) -> str:
    """How ``hooks.grid_layout`` reads an output shape, for a person (``14x14 tokens + cls``)."""
    g = grid_layout(shape)
    if g is None:
        return ""
    kind, h, w, cls = g
    if kind == "tokens":
        return f"{h}x{w} tokens" + (" + class token" if cls else "")
    return f"{h}x{w}" + (" channels-last" if kind == "nhwc" else "")


def describe_layers(loaded: LoadedModel) -> str:
    """A plain-text table of the model's layers (for ``xai-audit layers``).

    One line per traced module: dotted name, type, output shape for a (1, 3, S, S) input, and
    whether it is a valid Grad-CAM layer (a grid with h, w > 1 as :func:`is_gradcam_layer` says,
    with that grid; runs once; the default one is marked).
    """
    p = loaded.preprocessing
    s = p.image_size
    head = (
        f"model {loaded.spec}: input (1, 3, {s}, {s}), {loaded.num_classes} classes"
        f"{' (named)' if loaded.class_names else ''}, sha256 {loaded.checksum[:16]}\n"
        f"preprocessing: resize {'to' if p.resize_mode == 'squash' else 'shorter side to'} "
        f"{p.resize_size or s}, crop {s}, {p.interpolation}, mean {p.mean}, std {p.std}; "
        f"from {loaded.preprocessing_from}"
    )
    if not loaded.layers:
        return (
            f"{head}\nno layers traced (TorchScript modules cannot be hooked), so Grad-CAM and "
            "CAM are not available for this model (--methods saliency,integrated_gradients)"
        )
    default = None
    try:
        default = default_gradcam_layer(loaded.module, torch.zeros(1, 3, s, s))
    except (ValueError, RuntimeError):
        pass

    rows = [("name", "type", "output shape", "grad-cam")]
    for layer in loaded.layers:
        shape = "-" if layer.output_shape is None else str(tuple(layer.output_shape))
        grid = grid_layout(layer.output_shape)
        if is_gradcam_layer(layer):
            ok = f"yes, {describe_grid(layer.output_shape)}"
            ok += " (default)" if layer.name == default else ""
        elif grid is not None:
            ok = f"no (runs {layer.calls}x)"
        else:
            ok = "no"
        rows.append((layer.name, layer.type, shape, ok))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head, ""]
    for r in rows:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        )
    n_ok = sum(is_gradcam_layer(layer) for layer in loaded.layers)
    lines.append("")
    lines.append(
        f"{len(loaded.layers)} layers, {n_ok} usable for Grad-CAM (--gradcam-layer NAME): "
        "outputs (N, K, h, w), (N, h, w, D) or tokens (N, T, D) with T = h*w or 1 + h*w, h, w > 1"
    )
    return "\n".join(lines)


def _probe(module: nn.Module, x: torch.Tensor) -> tuple[int, tuple[LayerInfo, ...]]:
    """One forward pass on ``x``: the logits width and the traced layers.

    Modules that cannot be hooked (TorchScript, or holding TorchScript parts) give no layers.
    """
    out: dict = {}
    layers: tuple[LayerInfo, ...] = ()
    try:
        handle = module.register_forward_hook(lambda m, i, o: out.__setitem__("logits", o))
    except RuntimeError:  # "register_forward_hook is not supported on ScriptModules"
        handle = None
    try:
        if handle is not None:
            try:
                layers = tuple(trace_layers(module, x))
            except RuntimeError as e:
                if "ScriptModule" not in str(e):
                    raise
        if "logits" not in out:
            with torch.no_grad():
                out["logits"] = module(x)
    except Exception as e:
        raise ModelSpecError(
            f"model fails on a zero input of shape {tuple(x.shape)}: {type(e).__name__}: {e} "
            "(does it need another image size?)"
        ) from None
    finally:
        if handle is not None:
            handle.remove()
    logits = out["logits"]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelSpecError(
            f"model must return logits of shape (N, num_classes); for input {tuple(x.shape)} "
            f"it returned {got}"
        )
    return int(logits.shape[1]), layers
