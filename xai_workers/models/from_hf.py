"""``hf:<folder or repo id>``: a Hugging Face ``transformers`` image classifier.

``AutoModelForImageClassification.from_pretrained(ref, local_files_only=True)``: a folder written
by ``save_pretrained`` or a repo id in the local Hugging Face cache (nothing is downloaded). The
model is wrapped so it maps ``pixel_values`` (N, 3, S, S) to logits (N, classes); its layers keep
their names under ``model.`` (``model.vit.encoder.layer.1.layernorm_before``). Class names come
from ``config.id2label``; the preprocessing from the image processor config next to it (size,
crop size or ``crop_pct``, resample, rescale factor, mean/std). ``random`` builds the model from
its config with seeded random weights. Needs ``pip install 'xai-workers[hf]'``.
"""

from __future__ import annotations

from torch import nn

from xai_workers.models.base import RANDOM, ModelSpecError, Source, seeded

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class HFLogits(nn.Module):
    """A ``transformers`` image classifier seen as ``pixel_values -> logits`` (N, classes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def load(ref: str, weights: str | None, *, seed: int, s3_endpoint: str | None) -> Source:
    try:
        from transformers import AutoConfig, AutoModelForImageClassification
    except ImportError:
        raise ModelSpecError(
            "hf: models need transformers: pip install 'xai-workers[hf]'"
        ) from None
    if not ref:
        raise ModelSpecError("hf: needs a folder (save_pretrained) or a cached repo id")
    if weights is not None and weights != RANDOM:
        raise ModelSpecError(
            "weights cannot be given with hf:<folder or repo id>: the folder holds its own "
            "weights (or pass --weights random for its architecture with random weights)"
        )
    try:
        if weights == RANDOM:
            config = AutoConfig.from_pretrained(ref, local_files_only=True)
            model = seeded(lambda: AutoModelForImageClassification.from_config(config), seed)
        else:
            model = AutoModelForImageClassification.from_pretrained(ref, local_files_only=True)
    except Exception as e:
        raise ModelSpecError(
            f"hf:{ref}: cannot load an image classifier from a local folder or the local Hugging "
            f"Face cache (nothing is downloaded here): {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from None
    id2label = getattr(model.config, "id2label", None) or {}
    n = int(model.config.num_labels)
    names = None
    if all(i in id2label or str(i) in id2label for i in range(n)):
        names = tuple(str(id2label.get(i, id2label.get(str(i)))) for i in range(n))
    pre = _processor_preprocessing(ref)
    return Source(
        HFLogits(model),
        None,
        preprocessing=pre,
        preprocessing_from="Hugging Face image processor config" if pre else None,
        class_names=names,
    )


def _processor_preprocessing(ref: str) -> dict | None:
    """The image processor's eval transform as ``Preprocessing`` keyword arguments, or None."""
    from transformers import AutoImageProcessor

    try:
        p = AutoImageProcessor.from_pretrained(ref, local_files_only=True)
    except Exception:  # noqa: BLE001 - no processor config: the model says nothing
        return None
    return processor_preprocessing(p, ref)


def processor_preprocessing(p, ref: str = "") -> dict:
    """Read a ``transformers`` image processor (ViT-, ConvNeXT- and CLIP-like: resize by
    ``size`` ``height``/``width`` (squash) or ``shortest_edge``, optional centre crop or
    ConvNeXT's ``crop_pct`` below 384 px, ``rescale_factor`` 1/255, mean/std) into
    ``Preprocessing`` keyword arguments; ModelSpecError for anything else."""

    def get(obj, key):
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    def bad(what):
        return ModelSpecError(
            f"hf:{ref}: its image processor {type(p).__name__} {what}, which is not supported; "
            "set --image-size/--resize-size/--interpolation/--mean/--std to describe it"
        )

    size, crop = p.size, getattr(p, "crop_size", None)
    do_crop = bool(getattr(p, "do_center_crop", False)) and crop is not None
    interp = _RESAMPLE.get(int(getattr(p, "resample", 2) or 2))
    if interp is None:
        raise bad(f"resamples with PIL filter {p.resample}")
    if getattr(p, "do_rescale", True) and abs(float(p.rescale_factor) - 1 / 255) > 1e-12:
        raise bad(f"rescales by {p.rescale_factor} (not 1/255)")
    if not getattr(p, "do_rescale", True):
        raise bad("does not rescale to [0, 1]")
    if getattr(p, "do_normalize", True):
        mean, std = tuple(p.image_mean), tuple(p.image_std)
        if len(mean) == 1:
            mean, std = mean * 3, std * 3
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    out = {
        "interpolation": interp,
        "crop_anchor": "floor",
        "mean": tuple(float(v) for v in mean),
        "std": tuple(float(v) for v in std),
    }
    h, w, short = get(size, "height"), get(size, "width"), get(size, "shortest_edge")
    crop_pct = getattr(p, "crop_pct", None)
    if not getattr(p, "do_resize", True):
        raise bad("does not resize")
    if h and w:
        if h != w:
            raise bad(f"resizes to {h}x{w} (not square)")
        out.update(resize_mode="squash", resize_size=int(h), image_size=int(h))
    elif short and crop_pct is not None and "ConvNext" in type(p).__name__:
        if short < 384:  # ConvNeXT: resize to int(S / crop_pct), crop S; else squash to S
            out.update(resize_mode="shorter_side", resize_size=int(short / crop_pct))
        else:
            out.update(resize_mode="squash", resize_size=int(short))
        out["image_size"] = int(short)
    elif short:
        if not do_crop:
            raise bad("resizes the shorter side without a centre crop (non-square inputs)")
        out.update(resize_mode="shorter_side", resize_size=int(short), image_size=int(short))
    else:
        raise bad(f"resizes by {size}")
    if do_crop:
        ch, cw = get(crop, "height"), get(crop, "width")
        if not ch or ch != cw or ch > out["resize_size"]:
            raise bad(f"crops to {crop}")
        out["image_size"] = int(ch)
    return out
