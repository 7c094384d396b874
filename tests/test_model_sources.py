"""Model sources (timm, Hugging Face, torchvision weights) and their own preprocessing; Grad-CAM on
token layers; each model through the batch job against Captum and pytorch-grad-cam.

Models are timm's own tiny test architectures (``test_resnet``, ``test_convnext``, ``test_vit``)
and tiny ``transformers`` ViT / ConvNeXT configs, all with seeded random weights saved to disk:
nothing is downloaded. Photos are scikit-learn's bundled sample photos (real JPEGs).
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xai_workers.models import ModelSpecError, load_model
from xai_workers.preprocess import Preprocessing, input_to_pixels, to_input

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _photos() -> list[Image.Image]:
    """Real photos at sizes that exercise both crop anchors: odd and even margins, portrait."""
    from sklearn.datasets import load_sample_image

    china, flower = (Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg"))
    return [
        china,  # 640 x 427
        flower.transpose(Image.Transpose.ROTATE_90),  # 427 x 640, portrait
        china.crop((13, 7, 13 + 517, 7 + 333)),  # odd sizes: odd margins after the resize
        flower.crop((100, 50, 100 + 241, 50 + 239)),  # almost square, smaller than some R
    ]


def _pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalized input (3, S, S) back to pixel units in [0, 1] (float64)."""
    return input_to_pixels(x.double(), Preprocessing(image_size=x.shape[-1], mean=mean, std=std))


def _same_pixels(ours: torch.Tensor, theirs: torch.Tensor, pre: Preprocessing, what: str):
    """Equal within 1/255 in pixel units: both resample with Pillow from the same uint8 image,
    so only float rounding of the normalisation remains (~1e-7). A wrong resize size, filter,
    crop anchor (one pixel shift) or mean/std moves photo pixels by many levels."""
    assert ours.shape == theirs.shape, what
    a, b = _pixels(ours, pre.mean, pre.std), _pixels(theirs, pre.mean, pre.std)
    err = (a - b).abs().max().item()
    assert err <= 1 / 255, f"{what}: max pixel difference {err * 255:.2f}/255"


# --- each library's own transform on real photos ----------------------------------------------


@pytest.mark.parametrize(
    "weights", ["ResNet50_Weights.IMAGENET1K_V2", "ViT_B_16_Weights.IMAGENET1K_V1",
                "EfficientNet_B1_Weights.IMAGENET1K_V1"]
)  # fmt: skip
def test_torchvision_weights_transforms(weights):
    import torchvision.models as tvm

    from xai_workers.models.from_torchvision import weights_preprocessing

    w = tvm.get_weight(weights)
    pre = Preprocessing(**weights_preprocessing(w))
    assert (pre.image_size, pre.resize_size) == (w.transforms().crop_size[0],
                                                  w.transforms().resize_size[0])  # fmt: skip
    for i, img in enumerate(_photos()):
        _same_pixels(to_input(img, pre), w.transforms()(img), pre, f"{weights} photo {i}")


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "resnet50.a1_in1k", "convnext_atto"])
def test_timm_data_config_transform(name):
    from timm.data import create_transform, resolve_model_data_config

    from xai_workers.models.from_timm import data_config_preprocessing

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    cfg = resolve_model_data_config(model)
    pre = Preprocessing(**data_config_preprocessing(cfg, name))
    t = create_transform(**cfg, is_training=False)
    for i, img in enumerate(_photos()):
        _same_pixels(to_input(img, pre), t(img), pre, f"timm {name} photo {i}")


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("vit", {}),  # squash to 224 x 224, bilinear, mean/std 0.5
        ("vit", {"size": {"height": 160, "width": 160}, "resample": 3}),
        ("convnext", {"size": {"shortest_edge": 224}}),  # int(224 / 0.875) = 256, crop 224
        ("convnext", {"size": {"shortest_edge": 384}}),  # squash to 384 x 384
        ("convnext", {"size": {"shortest_edge": 97}, "crop_pct": 0.9}),  # odd margins
    ],
)
def test_hf_image_processor(kind, kwargs):
    """Against the Pillow backend of each processor (the fast, torchvision-tensor backend
    resamples differently); our settings are read from the processor's config."""
    from transformers import ConvNextImageProcessor, ViTImageProcessor
    from transformers.models.convnext.image_processing_pil_convnext import (
        ConvNextImageProcessorPil,
    )
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from xai_workers.models.from_hf import processor_preprocessing

    fast_cls, pil_cls = {
        "vit": (ViTImageProcessor, ViTImageProcessorPil),
        "convnext": (ConvNextImageProcessor, ConvNextImageProcessorPil),
    }[kind]
    pre = Preprocessing(**processor_preprocessing(fast_cls(**kwargs)))
    theirs = pil_cls(**kwargs)
    for i, img in enumerate(_photos()):
        ref = torch.from_numpy(theirs(img, return_tensors="np")["pixel_values"][0])
        _same_pixels(to_input(img, pre), ref, pre, f"HF {kind} {kwargs} photo {i}")


def test_overrides_keep_the_models_ratio_and_are_recorded():
    loaded = load_model("timm:test_resnet", "random", image_size=64)
    p = loaded.preprocessing
    # timm: 160 px at crop_pct 0.95 -> R = floor(160 / 0.95) = 168; at 64 px the same ratio
    assert (p.image_size, p.resize_size, p.interpolation) == (64, 64 * 168 // 160, "bilinear")
    assert loaded.preprocessing_from.startswith("timm pretrained_cfg")
    assert "overridden: image_size" in loaded.preprocessing_from
    p = load_model("timm:test_resnet", "random", image_size=64, crop_pct=0.5).preprocessing
    assert p.resize_size == 128
    p = load_model("timm:test_resnet", "random", image_size=64, interpolation="bicubic")
    assert p.preprocessing.interpolation == "bicubic"
    with pytest.raises(ModelSpecError, match="not both"):
        load_model("timm:test_resnet", "random", resize_size=200, crop_pct=0.9)


def test_timm_without_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ModelSpecError) as info:
        load_model("timm:test_resnet")
    msg = str(info.value)
    assert "not there" in msg and "--weights random" in msg and "nothing is downloaded" in msg
    with pytest.raises(ModelSpecError, match="unknown timm model 'test_resnett'.*test_resnet"):
        load_model("timm:test_resnett", "random")
