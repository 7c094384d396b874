"""xai_workers.preprocess: decoding every mode to RGB, guards, resize/crop, normalization."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile

from xai_workers.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    Preprocessing,
    decode_rgb,
    input_to_pixels,
    pixels_to_input,
    preprocess_bytes,
    to_input,
)

LIMIT = Preprocessing().max_pixels


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_array(data: bytes, max_pixels: int = LIMIT) -> np.ndarray:
    img = decode_rgb(data, max_pixels)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def gray3(values) -> np.ndarray:
    v = np.asarray(values, dtype=int)
    return np.repeat(v[..., None], 3, axis=-1)


def reference(img: Image.Image, s: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """torchvision's ImageNet eval pipeline on a PIL image: Resize(S) + CenterCrop(S)."""
    img = T.CenterCrop(s)(T.Resize(s)(img))
    return TF.normalize(TF.pil_to_tensor(img).float().div(255), list(mean), list(std))


# --- modes ----------------------------------------------------------------------------------------


def test_mode_1():
    a = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    img = Image.fromarray(a).convert("1")
    assert img.mode == "1"
    np.testing.assert_array_equal(rgb_array(encode(img)), gray3(a * 255))


def test_mode_L():
    a = np.array([[0, 17, 128], [200, 254, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(rgb_array(encode(Image.fromarray(a, "L"))), gray3(a))


def test_mode_LA_composited_on_black():
    la = np.array([[[200, 255], [200, 128], [200, 0], [10, 51]]], dtype=np.uint8)
    img = Image.fromarray(la, "LA")
    out = rgb_array(encode(img))
    expected = np.rint(la[..., 0].astype(int) * la[..., 1] / 255.0).astype(int)  # 200, 100, 0, 2
    np.testing.assert_array_equal(out, gray3(expected))
    assert out[0, 1, 0] == 100 and out[0, 2, 0] == 0


def test_mode_RGBA_composited_on_black():
    rgba = np.array([[[200, 100, 50, 128], [255, 255, 255, 0], [1, 2, 3, 255]]], dtype=np.uint8)
    out = rgb_array(encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(out[0, 0], [100, 50, 25])  # round(c * 128 / 255)
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])  # fully transparent white -> black
    np.testing.assert_array_equal(out[0, 2], [1, 2, 3])  # opaque: unchanged


def _palette_image() -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    return img


def test_mode_P():
    out = rgb_array(encode(_palette_image()))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 255, 0], [10, 20, 30]])


def test_mode_P_with_transparent_index():
    data = encode(_palette_image(), transparency=1)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 1
    out = rgb_array(data)
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 0, 0], [10, 20, 30]])


def test_mode_P_with_alpha_per_index():
    data = encode(_palette_image(), transparency=bytes([255, 0, 128]))
    out = rgb_array(data)
    # index 2: (10, 20, 30) at alpha 128 -> round(c * 128 / 255)
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 0, 0], [5, 10, 15]])


def test_mode_CMYK():
    cmyk = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [255, 0, 0, 0], [0, 128, 0, 64]]], np.uint8)
    img = Image.fromarray(cmyk, "CMYK")
    out = rgb_array(encode(img, "TIFF"))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 2], [0, 255, 255])
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")).astype(int))
    # CMYK JPEG too
    assert decode_rgb(encode(img, "JPEG"), LIMIT).size == (4, 1)


def test_mode_I16_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32896, 65534, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    data = encode(img)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = rgb_array(data)
    np.testing.assert_array_equal(out, gray3([[0, 1, 4, 128, 255, 255]]))  # round(v / 257)


def test_mode_I16_big_endian():
    values = np.array([[0, 257, 1000, 65535]], dtype=">u2")
    img = Image.frombytes("I;16B", (4, 1), values.tobytes())
    out = np.asarray(decode_rgb(encode(img, "TIFF"), LIMIT)).astype(int)
    np.testing.assert_array_equal(out, gray3([[0, 1, 4, 255]]))


def test_mode_I_as_16_bit_clipped():
    values = np.array([[-5, 0, 1000, 65535, 70000]], dtype=np.int32)
    img = Image.fromarray(values, "I")
    data = encode(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(rgb_array(data), gray3([[0, 0, 4, 255, 255]]))


def test_mode_F_as_unit_range():
    values = np.array([[0.0, 0.25, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32)
    img = Image.fromarray(values, "F")
    data = encode(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    # rint(v * 255) with v clipped to [0, 1]: 0.25 -> 63.75 -> 64, 0.5 -> 127.5 -> 128 (even)
    np.testing.assert_array_equal(rgb_array(data), gray3([[0, 64, 128, 255, 255, 0, 0]]))


def test_rgb_jpeg_and_webp():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for fmt in ("JPEG", "WEBP", "BMP", "GIF"):
        out = decode_rgb(encode(img, fmt), LIMIT)
        assert out.mode == "RGB" and out.size == (30, 20)


def test_exif_orientation_applied():
    a = np.zeros((2, 4, 3), np.uint8)  # stored: 4 wide, 2 high, red at top-left
    a[0, 0] = [255, 0, 0]
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_rgb(encode(img, exif=exif.tobytes()), LIMIT)
    assert out.size == (2, 4)
    assert out.getpixel((1, 0)) == (255, 0, 0)  # top-left went to top-right
    assert sum(out.getpixel((x, y))[0] for x in range(2) for y in range(4)) == 255


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(fmt):
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_rgb(data[: len(data) // 2], LIMIT)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, "None"),
        (b"", "empty"),
        (b"this is not an image at all", "not an image"),
        (bytes(range(256)) * 4, "not an image"),
        (12345, "must be bytes"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),
    ],
)
def test_bad_bytes(data, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_rgb(data, LIMIT)


def test_decode_error_is_value_error():
    assert issubclass(ImageDecodeError, ValueError)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def crafted_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB (its pixel data is far too short)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("width", "height"), [(10_000, 10_000), (100_000, 100_000), (1, 200_000_000)]
)
def test_decompression_bomb_refused_before_decoding(width, height, monkeypatch):
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or original(self))
    limit_before = Image.MAX_IMAGE_PIXELS
    data = crafted_png(width, height)
    assert len(data) < 200
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="too large") as info:
        decode_rgb(data, LIMIT)
    assert time.perf_counter() - t0 < 0.5
    assert loads == []  # no pixel was decoded
    assert Image.MAX_IMAGE_PIXELS == limit_before
    if width * height <= 2 * limit_before:  # our own check (Pillow only warns up to 2x)
        assert f"{width}x{height}" in str(info.value)


def test_real_large_solid_png_refused_by_max_pixels():
    data = encode(Image.new("RGB", (3000, 3000), (7, 7, 7)), optimize=True)
    assert len(data) < 100_000
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="3000x3000 = 9000000 pixels, limit is 1000000"):
        decode_rgb(data, max_pixels=1_000_000)
    assert time.perf_counter() - t0 < 0.5
    assert decode_rgb(encode(Image.new("RGB", (100, 100))), max_pixels=10_000).size == (100, 100)


def test_zero_size_refused():
    with pytest.raises(ImageDecodeError):
        decode_rgb(crafted_png(0, 10), LIMIT)


# --- resize / crop --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(300, 250), (250, 300), (640, 480), (224, 500), (225, 224), (999, 1000), (300, 301)]
)
def test_resize_crop_matches_torchvision(size):
    rng = np.random.default_rng(2)
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    cfg = Preprocessing(image_size=224)
    x = to_input(img, cfg)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, reference(img, 224), rtol=0, atol=1e-6)


def test_resize_crop_other_size_and_stats():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    cfg = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    x = to_input(img, cfg)
    torch.testing.assert_close(x, reference(img, 32, cfg.mean, cfg.std), rtol=0, atol=1e-6)


def test_square_image_of_size_s_left_as_is():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = to_input(Image.fromarray(a), Preprocessing())
    p = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    expected = (p - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    assert torch.equal(x, expected)
    assert torch.equal(
        input_to_pixels(x, Preprocessing()).mul(255).round().byte(), p.mul(255).byte()
    )


def test_one_pixel_image():
    x = to_input(Image.new("RGB", (1, 1), (10, 200, 30)), Preprocessing(image_size=16))
    expected = pixels_to_input(torch.tensor([10, 200, 30]).view(3, 1, 1) / 255, Preprocessing())
    torch.testing.assert_close(x, expected.expand(3, 16, 16), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(4000, 3), (3, 4000), (400, 3), (3, 400)])
def test_very_wide_and_tall_images(size):
    rng = np.random.default_rng(5)
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    x = to_input(img, Preprocessing(image_size=16))
    assert x.shape == (3, 16, 16) and torch.isfinite(x).all()
    # within one 8-bit level of the full resize + crop
    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-6
    assert (x - reference(img, 16)).abs().max() <= one_level
    # 224 works without building the 298666 x 224 intermediate
    t0 = time.perf_counter()
    assert to_input(img, Preprocessing()).shape == (3, 224, 224)
    assert time.perf_counter() - t0 < 2


def test_preprocess_bytes_end_to_end():
    rng = np.random.default_rng(6)
    img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    cfg = Preprocessing(image_size=32)
    x = preprocess_bytes(encode(img), cfg)
    torch.testing.assert_close(x, reference(img, 32), rtol=0, atol=1e-6)
    with pytest.raises(ImageDecodeError, match="too large"):
        preprocess_bytes(encode(img), Preprocessing(image_size=32, max_pixels=100))


def test_to_input_needs_rgb():
    with pytest.raises(ValueError, match="RGB"):
        to_input(Image.new("L", (4, 4)), Preprocessing())


# --- normalization --------------------------------------------------------------------------------


def test_pixels_input_round_trip():
    cfg = Preprocessing(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    p = torch.rand(2, 5, 3, 8, 9, generator=torch.Generator().manual_seed(0))
    x = pixels_to_input(p, cfg)
    assert x.shape == p.shape and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0, 1], (p[0, 0, 1] - 0.2) / 0.25)
    torch.testing.assert_close(input_to_pixels(x, cfg), p, rtol=0, atol=1e-6)
    black = pixels_to_input(torch.zeros(3, 2, 2), Preprocessing())
    torch.testing.assert_close(
        black[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    )
    assert pixels_to_input(p.double(), cfg).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        pixels_to_input(torch.zeros(4, 8, 8), cfg)


def test_preprocessing_validation():
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing(image_size=0)
    with pytest.raises(ValueError, match="3 values"):
        Preprocessing(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        Preprocessing(std=(0.5, 0.0, 0.5))
    cfg = Preprocessing(mean=[0, 0, 0], std=[1, 1, 1])
    assert cfg.mean == (0.0, 0.0, 0.0) and hash(cfg) == hash(
        Preprocessing(mean=(0, 0, 0), std=(1, 1, 1))
    )
