"""Encoded image bytes -> the model input ``x`` (see "Input space" in docs/conventions.md).

The pipeline, in order:

1. :func:`decode_rgb`: bytes -> ``PIL.Image.Image`` in mode ``RGB`` (uint8). Decompression bombs are
   refused from the declared size before any pixel is decoded; every mode Pillow reads is converted
   to RGB (alpha composited on black, 16-bit scaled, EXIF orientation applied); the image is decoded
   in full here, so a truncated file fails here and nowhere later.
2. :func:`to_input`: RGB image -> float32 tensor (3, S, S): shorter side resized to R (default S;
   Pillow's bilinear, bicubic or nearest filter, antialiased when shrinking), center crop S x S,
   scaled to [0, 1], normalized with mean/std. Or, for models evaluated that way (Hugging Face's
   ViT processor), the whole image squashed to R x R before the crop.

Every failure of step 1 is an :class:`ImageDecodeError` (a ``ValueError``) with a message for a
person, so a bad image becomes an error row rather than a crash.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``Preprocessing.interpolation`` -> Pillow's filter (the same names torchvision and timm use).
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
RESIZE_MODES = ("shorter_side", "squash")
CROP_ANCHORS = ("round", "floor")

# Formats whose decoders run an external program (EPS runs Ghostscript) are never opened.
_REFUSED_FORMATS = frozenset({"EPS"})
_EXIF_ORIENTATION = 0x0112
# Above this many times S x S pixels, resize only the kept box instead of the whole image.
_FULL_RESIZE_LIMIT = 16


@dataclass(frozen=True)
class Preprocessing:
    """How encoded images become model inputs.

    - ``image_size``: S, the side of the square input (pixels, >= 1).
    - ``mean`` / ``std``: per-channel (R, G, B) normalization applied to pixels in [0, 1]:
      ``x = (p - mean) / std``; every ``std`` > 0.
    - ``max_pixels``: the largest ``width * height`` an encoded image may DECLARE in its header;
      larger images are refused before decoding (decompression-bomb guard). The default equals
      Pillow's own default limit.
    - ``resize_size``: R, pixels, >= S; None means S. ``resize_mode`` ``shorter_side``: the shorter
      side is resized to R (aspect ratio kept, torchvision's ``Resize(R)``); ``squash``: the whole
      image is resized to R x R (aspect ratio not kept, Hugging Face's ``size={"height": R,
      "width": R}``). Then the centre S x S is kept. ``crop_pct`` S / R is timm's name for it.
    - ``interpolation``: ``bilinear``, ``bicubic`` or ``nearest`` (Pillow's filters).
    - ``crop_anchor``: where an odd margin puts the extra pixel: ``round`` (torchvision, timm:
      ``int(round((L - S) / 2))``) or ``floor`` (Hugging Face: ``(L - S) // 2``).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int = 89_478_485
    resize_size: int | None = None
    resize_mode: str = "shorter_side"
    interpolation: str = "bilinear"
    crop_anchor: str = "round"

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {v!r}")
            object.__setattr__(self, name, tuple(float(c) for c in v))
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int, got {self.max_pixels!r}")
        if self.resize_size is not None and (
            not isinstance(self.resize_size, int) or self.resize_size < self.image_size
        ):
            raise ValueError(
                f"resize_size must be an int >= image_size ({self.image_size}), "
                f"got {self.resize_size!r}"
            )
        for name, allowed in (
            ("resize_mode", RESIZE_MODES),
            ("interpolation", tuple(INTERPOLATIONS)),
            ("crop_anchor", CROP_ANCHORS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )


class ImageDecodeError(ValueError):
    """Encoded bytes that cannot become an RGB image; the message says why, for a person."""


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}


def _describe_bytes(data: bytes) -> str:
    head = bytes(data[:12])
    for magic, fmt in _SIGNATURES.items():
        if data.startswith(magic):
            return f"starts like {fmt} but its header is corrupt or truncated ({len(data)} bytes)"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return f"starts like WEBP but its header is corrupt or truncated ({len(data)} bytes)"
    return (
        f"not an image or an unknown/unsupported format ({len(data)} bytes starting with {head!r})"
    )


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"image too large: declares {w}x{h} = {w * h} pixels, limit is {max_pixels} "
            "(refused before decoding as a possible decompression bomb)"
        )


def _gray16_to_rgb(img: Image.Image) -> Image.Image:
    """I;16*, I and F (single channel, more than 8 bits) -> RGB with a fixed, documented scale."""
    arr = np.asarray(img)
    if img.mode == "F":
        # float images are taken as [0, 1]; NaN -> 0, outside clipped
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        gray = np.rint(np.clip(a, 0.0, 1.0) * 255.0)
    else:
        # 16-bit data (I;16, and I: how Pillow reads 16/32-bit integer images): 0..65535 ->
        # 0..255 as round(v / 257), so 65535 -> 255 exactly; I is clipped to 0..65535 first
        a = np.clip(arr.astype(np.float64), 0.0, 65535.0)
        gray = np.rint(a / 257.0)
    gray8 = np.ascontiguousarray(gray.astype(np.uint8))
    return Image.fromarray(np.repeat(gray8[:, :, None], 3, axis=2), mode="RGB")


def _composite_on_black(img: Image.Image) -> Image.Image:
    """Any image with alpha (or a transparency key) -> RGB with ``round(c * a / 255)``."""
    if img.mode == "La":
        img = img.convert("LA")
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
    rgb = (rgba[:, :, :3] * rgba[:, :, 3:4] + 127) // 255  # exact round(c * a / 255)
    return Image.fromarray(np.ascontiguousarray(rgb.astype(np.uint8)), mode="RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _gray16_to_rgb(img)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
        return _composite_on_black(img)
    if mode == "RGB":
        return img
    return img.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int = Preprocessing.max_pixels) -> Image.Image:
    """Decode encoded image bytes to a fully loaded ``PIL.Image.Image`` in mode ``RGB`` (uint8).

    - Size guard: the image is opened lazily and its declared ``width * height`` is checked against
      ``max_pixels`` before any pixel is decoded (Pillow's global ``MAX_IMAGE_PIXELS`` is neither
      relied on nor changed; if Pillow's own guard fires first that is reported the same way).
    - Modes: 1, L, P, CMYK, YCbCr, LAB, HSV, ... via ``convert("RGB")``; LA, La, PA, RGBA, RGBa,
      and any image with a transparency key (P with transparency, tRNS) are composited on black:
      ``round(c * a / 255)``; I;16 (and I) are 16-bit data mapped as ``round(v / 257)``
      (0..65535 -> 0..255, I clipped to 0..65535); F is taken as [0, 1] (clipped, NaN -> 0).
      Grayscale is repeated on the three channels.
    - EXIF orientation is applied (``ImageOps.exif_transpose``); an unreadable EXIF block is
      ignored (the pixels are still good).
    - The first frame of a multi-frame file is used. EPS is refused (its decoder runs Ghostscript).

    Raises :class:`ImageDecodeError` for None/empty/non-bytes input, unknown formats, images that
    are too large or zero-size, and truncated or corrupt data.
    """
    if data is None:
        raise ImageDecodeError("image bytes are None (missing image)")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"image must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise ImageDecodeError("image bytes are empty (0 bytes)")

    Image.init()
    formats = [f for f in Image.OPEN if f not in _REFUSED_FORMATS]
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below is the guard; Pillow's warning is noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(
            f"image too large (refused by Pillow before decoding, limit "
            f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): {e}"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(_describe_bytes(data)) from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types on malformed headers
        raise ImageDecodeError(f"cannot read image header: {type(e).__name__}: {e}") from None

    fmt = img.format or "image"
    _check_size(img.size, max_pixels)
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as e:
        raise ImageDecodeError(
            f"{fmt} {img.size[0]}x{img.size[1]} is truncated or corrupt: {type(e).__name__}: {e}"
        ) from None

    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except MemoryError:
        raise
    except Exception:
        orientation = None
    try:
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageDecodeError(
            f"cannot convert {fmt} in mode {img.mode} to RGB: {type(e).__name__}: {e}"
        ) from None


def resized_crop_box(
    width: int, height: int, size: int, crop: int | None = None, anchor: str = "round"
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Where "resize the shorter side to ``size``, then center crop ``crop`` x ``crop``" lands.

    Returns ``(left, top, right, bottom)`` of the crop (``crop`` defaults to ``size``) in the
    RESIZED image and the resized ``(width, height)``, with torchvision's rounding: long side
    ``int(size * long / short)``, crop anchor ``int(round((L - crop) / 2))`` (``anchor="round"``)
    or Hugging Face's ``(L - crop) // 2`` (``anchor="floor"``).
    """
    crop = size if crop is None else crop
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if anchor == "floor":
        top, left = (new_h - crop) // 2, (new_w - crop) // 2
    else:
        top = int(round((new_h - crop) / 2.0))
        left = int(round((new_w - crop) / 2.0))
    return (left, top, left + crop, top + crop), (new_w, new_h)


def to_input(img: Image.Image, cfg: Preprocessing) -> torch.Tensor:
    """RGB image -> model input ``x``, float32 (3, S, S), normalized with ``cfg.mean``/``cfg.std``.

    With ``cfg.resize_mode == "shorter_side"`` the shorter side is resized to R =
    ``cfg.resize_size`` (default S = ``cfg.image_size``) and the center S x S is kept, with the
    numbers of torchvision's ``Resize(R) + CenterCrop(S)`` on the PIL image (the classic ImageNet
    eval pipeline; timm's eval transform is the same with R = floor(S / crop_pct)): Pillow's
    ``cfg.interpolation`` filter, antialiased when shrinking. An image whose shorter side already
    is R is only cropped; an S x S image with R = S is left exactly as it is. For extreme aspect
    ratios (the resized image over ``_FULL_RESIZE_LIMIT`` times R x R, e.g. 4000 x 3, which would
    become 298666 x 224) only the kept box is resampled (``Image.resize(box=...)``), which stays
    within one 8-bit level of the full resize. With ``"squash"`` the image is resized to R x R
    and then center-cropped to S. Then ``x = (p / 255 - mean) / std``, so values lie in
    [-mean/std, (1 - mean)/std].
    """
    if img.mode != "RGB":
        raise ValueError(f"to_input expects an RGB image (use decode_rgb), got mode {img.mode}")
    s, r = cfg.image_size, cfg.resize_size or cfg.image_size
    resample = INTERPOLATIONS[cfg.interpolation]
    if cfg.resize_mode == "squash":
        if img.size != (r, r):
            img = img.resize((r, r), resample=resample)
        if r != s:
            a = (r - s) // 2 if cfg.crop_anchor == "floor" else int(round((r - s) / 2.0))
            img = img.crop((a, a, a + s, a + s))
    else:
        box, (new_w, new_h) = resized_crop_box(img.width, img.height, r, s, cfg.crop_anchor)
        if (new_w, new_h) == img.size:
            if img.size != (s, s):
                img = img.crop(box)
        elif new_w * new_h <= _FULL_RESIZE_LIMIT * r * r:
            img = img.resize((new_w, new_h), resample=resample)
            img = img.crop(box)
        else:
            sx, sy = img.width / new_w, img.height / new_h
            src_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            img = img.resize((s, s), resample=resample, box=src_box)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    return pixels_to_input(pixels.float().div(255), cfg)


def preprocess_bytes(data: bytes, cfg: Preprocessing) -> torch.Tensor:
    """Encoded bytes -> float32 (3, S, S) model input; :class:`ImageDecodeError` on a bad image."""
    return to_input(decode_rgb(data, cfg.max_pixels), cfg)


def _stats(ref: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    """``values`` as a (3, 1, 1) tensor on ``ref``'s device, in its float dtype (else float32)."""
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    return torch.tensor(values, dtype=dtype, device=ref.device).view(3, 1, 1)


def pixels_to_input(p: torch.Tensor, cfg: Preprocessing) -> torch.Tensor:
    """Pixels (..., 3, H, W) in [0, 1] -> input space ``(p - mean) / std``, same shape.

    Float dtype and device follow ``p`` (integer input gives float32; it is not rescaled).
    Used for the image itself and for pixel-space baselines (black = 0, gray = 0.5, ...).
    """
    if p.dim() < 3 or p.shape[-3] != 3:
        raise ValueError(f"expected pixels of shape (..., 3, H, W), got {tuple(p.shape)}")
    mean, std = _stats(p, cfg.mean), _stats(p, cfg.std)
    return (p.to(mean.dtype) - mean) / std


def input_to_pixels(x: torch.Tensor, cfg: Preprocessing) -> torch.Tensor:
    """Inverse of :func:`pixels_to_input`: ``x * std + mean``, shape (..., 3, H, W) kept.

    Values are not clipped (an input made from an image gives [0, 1] up to rounding).
    """
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected input of shape (..., 3, H, W), got {tuple(x.shape)}")
    mean, std = _stats(x, cfg.mean), _stats(x, cfg.std)
    return x.to(mean.dtype) * std + mean
