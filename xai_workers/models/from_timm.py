"""``timm:<name>``: ``timm.create_model(name, pretrained=False, num_classes=<from weights>)``.

``weights``: a state_dict file with timm's own key names (``.safetensors``/``.pt``/``.pth``, local
or ``s3://``; the number of classes follows the head named by the model's ``pretrained_cfg``),
``random`` (seeded random initialisation), or None: timm's pretrained weights when they are in the
local Hugging Face cache (nothing is downloaded; otherwise a configuration error says so). The
preprocessing is timm's own: ``timm.data.resolve_model_data_config`` (input size, ``crop_pct``,
interpolation, mean/std). Needs ``pip install 'xai-workers[timm]'``.
"""

from __future__ import annotations

import difflib
import hashlib
import math

from xai_workers.models.base import (
    RANDOM,
    ModelSpecError,
    Source,
    load_into,
    load_state_dict_file,
    seeded,
    strip_module_prefix,
)

_CROP_MODES = {"center": "shorter_side", "squash": "squash"}


def load(name: str, weights: str | None, *, seed: int, s3_endpoint: str | None) -> Source:
    try:
        import timm
        import torch
    except ImportError:
        raise ModelSpecError("timm: models need timm: pip install 'xai-workers[timm]'") from None
    if not name or not timm.is_model(name):
        names = timm.list_models()
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelSpecError(f"unknown timm model {name!r}{hint} (timm.list_models())")
    checksum, class_names = None, None
    if weights is None:
        model, checksum, class_names = _cached_pretrained(timm, name)
    elif weights == RANDOM:
        model = seeded(lambda: timm.create_model(name, pretrained=False), seed)
    else:
        state_dict, checksum = load_state_dict_file(weights, s3_endpoint)
        with torch.device("meta"):
            skeleton = timm.create_model(name, pretrained=False)
        state_dict = strip_module_prefix(state_dict, skeleton.state_dict().keys())
        head = skeleton.pretrained_cfg.get("classifier") or "head"
        key = f"{head}.weight"
        if key not in state_dict or state_dict[key].dim() < 2:
            some = ", ".join(list(state_dict)[-5:])
            raise ModelSpecError(
                f"weights {weights!r} have no classifier head {key!r} of timm {name!r} "
                f"(last keys: {some}); are they for another architecture or not in timm's "
                "key names?"
            )
        n = int(state_dict[key].shape[0])
        # initialised (then overwritten) without touching the caller's RNG state
        model = seeded(lambda: timm.create_model(name, pretrained=False, num_classes=n), 0)
        load_into(model, state_dict, weights)
    return Source(
        model,
        checksum,
        preprocessing=data_config_preprocessing(timm.data.resolve_model_data_config(model), name),
        preprocessing_from="timm pretrained_cfg (timm.data.resolve_model_data_config)",
        class_names=class_names,
    )


def data_config_preprocessing(cfg: dict, name: str) -> dict:
    """timm's data config (``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``,
    ``mean``, ``std``) as ``Preprocessing`` keyword arguments: R = floor(S / crop_pct), as
    ``timm.data.transforms_imagenet_eval`` computes it."""
    _, h, w = cfg["input_size"]
    if h != w:
        raise ModelSpecError(
            f"timm {name!r} expects {h}x{w} inputs; only square inputs are supported "
            "(pass --image-size S for a model that accepts any size)"
        )
    mode = _CROP_MODES.get(cfg.get("crop_mode") or "center")
    if mode is None:
        raise ModelSpecError(
            f"timm {name!r} uses crop_mode {cfg.get('crop_mode')!r}; supported: "
            f"{', '.join(_CROP_MODES)} (set --crop-pct/--resize-size to override)"
        )
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interp = cfg.get("interpolation") or "bilinear"
    if interp not in ("bilinear", "bicubic", "nearest"):
        interp = "bilinear"
    return {
        "image_size": int(h),
        "resize_size": max(int(h), math.floor(h / crop_pct)),
        "resize_mode": mode,
        "interpolation": interp,
        "crop_anchor": "round",
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
    }


def _cached_pretrained(timm, name: str):
    """timm's pretrained weights from the local Hugging Face cache, never downloaded."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    path = None
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                path = found
                break
    if path is None:
        where = f"Hugging Face repo {hub_id!r}" if hub_id else "no Hugging Face repo"
        raise ModelSpecError(
            f"timm:{name} without --weights uses timm's pretrained weights from the local Hugging "
            f"Face cache, and they are not there ({where}; nothing is downloaded here). Give "
            "--weights FILE (a state_dict with timm's key names, .safetensors/.pt/.pth, local or "
            "s3://), fill the cache where there is internet (timm.create_model(name, "
            "pretrained=True)), or --weights random for a seeded random network (for tests)"
        )
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path})
    except Exception as e:
        raise ModelSpecError(
            f"timm:{name}: cannot load its cached pretrained weights {path}: "
            f"{type(e).__name__}: {e}"
        ) from None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    class_names = None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            class_names = tuple(ImageNetInfo(subset).label_descriptions())
    except Exception:  # noqa: BLE001 - names are a convenience; unknown stays None
        class_names = None
    if class_names is not None and len(class_names) != model.num_classes:
        class_names = None
    return model, h.hexdigest(), class_names
