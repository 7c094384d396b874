"""``torchvision:<arch>``: a ``torchvision.models`` image classifier.

``weights``: a state_dict file (``.pt``/``.pth``/``.safetensors``, local or ``s3://``; the number of
classes follows the checkpoint's head), a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``,
``ResNet18_Weights.IMAGENET1K_V1``: needs the internet or torch.hub's cache; brings the weights'
own ``transforms()`` and class names), or ``random`` (seeded random initialisation). None is a
configuration error: a random network explains nothing, so it is only given when asked for.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from urllib.parse import urlparse

import torch
from torch import nn

from xai_workers.models.base import (
    RANDOM,
    ModelSpecError,
    Source,
    load_into,
    load_state_dict_file,
    seeded,
    strip_module_prefix,
)

_WEIGHTS_NAME = re.compile(r"([A-Za-z_]\w*\.)?[A-Z][A-Z0-9_]*")
# torchvision models with auxiliary heads: present in a checkpoint only if trained with them.
_AUX_HEADS = {"googlenet": "aux1.", "inception_v3": "AuxLogits."}
_INTERPOLATION = {"BILINEAR": "bilinear", "BICUBIC": "bicubic", "NEAREST": "nearest"}


def load(arch: str, weights: str | None, *, seed: int, s3_endpoint: str | None) -> Source:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if arch not in names:
        if arch in tvm.list_models():
            raise ModelSpecError(
                f"torchvision model {arch!r} is not an image classifier; only the classification "
                "models of torchvision.models are supported (e.g. resnet50, vit_b_16)"
            )
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelSpecError(
            f"unknown torchvision architecture {arch!r}; {hint}valid names include "
            f"{', '.join(names[:: max(1, len(names) // 8)][:8])} "
            f"({len(names)} in all: torchvision.models.list_models(module=torchvision.models))"
        )
    if weights is None:
        enum = tvm.get_model_weights(arch)
        raise ModelSpecError(
            f"torchvision:{arch} needs weights (--weights): a state_dict file "
            "(.pt/.pth/.safetensors, local or s3://), a torchvision weights name "
            f"({', '.join(['DEFAULT', *(w.name for w in enum)])}; downloads once), or 'random' "
            "for a randomly initialised network seeded by --seed (it explains nothing; for tests)"
        )
    if weights == RANDOM:
        kwargs = {"init_weights": True} if arch in _AUX_HEADS else {}
        return Source(seeded(lambda: tvm.get_model(arch, weights=None, **kwargs), seed))
    if _WEIGHTS_NAME.fullmatch(weights) and not os.path.exists(weights):
        return _pretrained(arch, weights)

    state_dict, checksum = load_state_dict_file(weights, s3_endpoint)
    skeleton = _skeleton(tvm, arch)
    state_dict = strip_module_prefix(state_dict, skeleton.state_dict().keys())
    head = head_name(skeleton)
    key = f"{head}.weight"
    if key not in state_dict or state_dict[key].dim() < 2:
        some = ", ".join(list(state_dict)[-5:])
        raise ModelSpecError(
            f"weights {weights!r} have no classifier head {key!r} of torchvision {arch!r} "
            f"(last keys: {some}); are they for another architecture?"
        )
    kwargs = {"num_classes": int(state_dict[key].shape[0])}
    if arch in _AUX_HEADS:
        kwargs["aux_logits"] = any(k.startswith(_AUX_HEADS[arch]) for k in state_dict)
        kwargs["init_weights"] = False
    # initialised (and then overwritten) without touching the caller's RNG state
    model = seeded(lambda: tvm.get_model(arch, weights=None, **kwargs), 0)
    load_into(model, state_dict, weights)
    return Source(model, checksum)


def weights_preprocessing(w) -> dict | None:
    """A torchvision weights enum member's ``transforms()`` as ``Preprocessing`` keyword arguments.

    ``ImageClassification(crop_size, resize_size, mean, std, interpolation)``: resize the shorter
    side to ``resize_size``, centre crop ``crop_size``; None if the transform is another kind.
    """
    t = w.transforms()
    crop, resize = getattr(t, "crop_size", None), getattr(t, "resize_size", None)
    if not crop or not resize or len(crop) != 1 or len(resize) != 1:
        return None
    interp = _INTERPOLATION.get(getattr(t.interpolation, "name", ""), None)
    if interp is None:
        return None
    return {
        "image_size": int(crop[0]),
        "resize_size": int(resize[0]),
        "resize_mode": "shorter_side",
        "interpolation": interp,
        "crop_anchor": "round",
        "mean": tuple(float(v) for v in t.mean),
        "std": tuple(float(v) for v in t.std),
    }


def _skeleton(tvm, arch: str) -> nn.Module:
    """The architecture with default settings, built on the meta device (no memory, no init)."""
    kwargs = {"init_weights": False} if arch in _AUX_HEADS else {}
    try:
        with torch.device("meta"):
            return tvm.get_model(arch, weights=None, **kwargs)
    except Exception:
        return tvm.get_model(arch, weights=None, **kwargs)


def head_name(model: nn.Module) -> str:
    """Dotted name of the classifier head: the last ``nn.Linear``, else the last ``nn.Conv2d``."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    conv = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if conv:
        return conv[-1]
    raise ModelSpecError(f"cannot find a classifier head in {type(model).__name__}")


def _pretrained(arch: str, name: str) -> Source:
    import torchvision.models as tvm

    enum = tvm.get_model_weights(arch)
    valid = ", ".join(["DEFAULT", *(w.name for w in enum)])
    try:
        w = enum[name.rsplit(".", 1)[-1]]
        if "." in name and name.split(".", 1)[0] != enum.__name__:
            raise KeyError(name)
    except KeyError:
        raise ModelSpecError(
            f"{name!r} is neither a file nor a weights name of torchvision {arch!r}; "
            f"weights names: {valid}, or 'random' (or give a state_dict file, local or s3://)"
        ) from None
    try:
        model = tvm.get_model(arch, weights=w)
    except Exception as e:
        raise ModelSpecError(
            f"could not download torchvision weights {enum.__name__}.{w.name} from {w.url} "
            f"(offline?): {type(e).__name__}: {e}. Download the file where there is internet "
            "and pass it as the weights instead (a local path or s3:// URI of the state_dict)."
        ) from None
    cached = os.path.join(
        torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(w.url).path)
    )
    checksum = None
    if os.path.isfile(cached):
        h = hashlib.sha256()
        with open(cached, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        checksum = h.hexdigest()
    categories = w.meta.get("categories")
    return Source(
        model,
        checksum,
        preprocessing=weights_preprocessing(w),
        preprocessing_from=f"torchvision {enum.__name__}.{w.name}.transforms()",
        class_names=tuple(categories) if categories else None,
    )
