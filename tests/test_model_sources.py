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
import timm
import torch
from PIL import Image

from xai_workers.models import ModelSpecError, load_model
from xai_workers.preprocess import Preprocessing, input_to_pixels, to_input


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


# --- Grad-CAM on token layers: the engine against pytorch-grad-cam ------------------------------


def _vit_tokens(t: torch.Tensor, side: int) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT ``reshape_transform``: drop the class token, tokens to
    an h x w grid, channels first."""
    r = t[:, 1:, :].reshape(t.size(0), side, side, t.size(2))
    return r.transpose(2, 3).transpose(1, 2)


def _minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling, independent of the map's scale (pytorch-grad-cam scales twice,
    with an epsilon of 1e-7 each time, which leaves its output scale-free too)."""
    lo = m.amin(dim=(-2, -1), keepdim=True)
    return (m - lo) / (m - lo).amax(dim=(-2, -1), keepdim=True)


def _pgc(model, x, layer, targets, reshape=None) -> torch.Tensor:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(
        model=model, target_layers=[model.get_submodule(layer)], reshape_transform=reshape
    ) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in targets])
    return torch.from_numpy(out)


def test_torchvision_vit_block_layer_and_default():
    """Issue 10: naming ``encoder.layers.encoder_layer_K.ln_1`` failed with an IndexError, and the
    default layer was the patch embedding; now the last block's ln_1, read as a 4x4 token grid."""
    from torchvision.models.vision_transformer import VisionTransformer

    from xai_workers import attribute
    from xai_workers.hooks import default_gradcam_layer

    model = load_model(
        "xai_workers.models.testing:tiny_torchvision_vit", "random", image_size=32
    ).module
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert isinstance(model, VisionTransformer)
    layer = default_gradcam_layer(model, x[:1])
    assert layer == "encoder.layers.encoder_layer_1.ln_1"
    ours = attribute(model, x, methods=("gradcam",), gradcam_layer=layer)
    spread = ours["gradcam"].amax(dim=(1, 2)) - ours["gradcam"].amin(dim=(1, 2))
    assert (spread > 0).all()  # not a constant map: the comparison below compares something
    ref = _pgc(
        copy.deepcopy(model).double(), x.double(), layer, ours["target"],
        reshape=lambda t: _vit_tokens(t, 4),
    )  # fmt: skip
    # pytorch-grad-cam resizes with OpenCV (float32); the 2e-3 of test_engine's Grad-CAM check;
    # a wrong token order, a class token kept or the wrong layer moves whole cells of the map
    assert (_minmax(ours["gradcam"]).double() - ref).abs().max() <= 2e-3
    with pytest.raises(ValueError, match=r"outputs \(2, 5\), which does not read as a grid"):
        attribute(model, x, methods=("gradcam",), gradcam_layer="heads")


def test_channels_last_layer_equals_pytorch_grad_cam():
    """ConvNeXt's inner LayerNorm outputs (N, h, w, C): read permuted, as pytorch-grad-cam's
    reshape_transform ``t.permute(0, 3, 1, 2)`` does (the Swin/ConvNeXt recipe)."""
    from xai_workers import attribute

    # float64 (the engine's exact mode): timm's layer scale starts at 1e-6, so these maps are
    # ~1e-9 and float32 rounding would be all one compares
    model = load_model("timm:test_convnext", "random", image_size=64).module.double()
    layer = "stages.2.blocks.1.norm"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        y = model.get_submodule(layer)(torch.zeros(1, 4, 4, 48, dtype=torch.float64))
        assert tuple(y.shape) == (1, 4, 4, 48)
    ours = attribute(model, x, methods=("gradcam",), gradcam_layer=layer)
    spread = ours["gradcam"].amax(dim=(1, 2)) - ours["gradcam"].amin(dim=(1, 2))
    assert (spread > 0).all()  # not a constant map: the comparison below compares something
    ref = _pgc(
        copy.deepcopy(model), x, layer, ours["target"], reshape=lambda t: t.permute(0, 3, 1, 2)
    )
    # OpenCV's float32 resize inside pytorch-grad-cam (as above); reading (N, h, w, C) as
    # (N, C, h, w) would average over the wrong axes and fail by O(1)
    assert (_minmax(ours["gradcam"]).double() - ref).abs().max() <= 2e-3


# --- each model source through the batch job, against Captum and pytorch-grad-cam ---------------

STEPS = 4


@pytest.fixture(scope="module")
def photos_parquet(tmp_path_factory):
    """Three real photos as PNG rows, small (decoding is not what the test waits for), with
    seeded noise of up to 3 levels: flat photo regions make exact ties in max-pooling, where the
    gradient is a choice between equal subgradients that float32 rounding can flip (the float64
    engine then agrees with Captum to 1e-12 while the float32 one picks another neighbour)."""
    rng = np.random.default_rng(0)
    rows = []
    for i, img in enumerate(_photos()[:3]):
        img = img.copy()
        img.thumbnail((200, 200))
        a = np.asarray(img).astype(np.int16) + rng.integers(-3, 4, size=(*img.size[::-1], 3))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append({"id": f"photo{i}", "image": buf.getvalue()})
    path = tmp_path_factory.mktemp("photos") / "photos.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path), {r["id"]: r["image"] for r in rows}


def _timm_model(name: str, folder, n: int = 4):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=n)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"timm:{name}", str(path)


def _hf_model(kind: str, folder):
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ConvNextImageProcessor,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    labels = {0: "cat", 1: "dog", 2: "tree"}
    common = dict(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    if kind == "vit":
        config = ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, **common,
        )  # fmt: skip
        model, proc = (
            ViTForImageClassification(config),
            ViTImageProcessor(size={"height": 32, "width": 32}),
        )
    else:
        config = ConvNextConfig(
            hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], image_size=64, **common
        )
        model, proc = (
            ConvNextForImageClassification(config),
            ConvNextImageProcessor(size={"shortest_edge": 64}),
        )
    path = folder / f"hf-{kind}"
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return f"hf:{path}", None


# (source, image size flag, expected default layer, reshape_transform for pytorch-grad-cam)
CASES = {
    "timm-resnet": ("test_resnet", 64, "layer4", None),
    "timm-convnext": ("test_convnext", 64, "norm_pre", None),
    "timm-vit": ("test_vit", None, "blocks.5.norm1", lambda t: _vit_tokens(t, 10)),
    "hf-vit": ("vit", None, "model.vit.layers.1.layernorm_before",
               lambda t: _vit_tokens(t, 4)),
    "hf-convnext": ("convnext", None, "model.convnext.encoder.stages.3", None),
}  # fmt: skip


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_model_source_through_the_job(case, ray_session, photos_parquet, tmp_path):
    from captum.attr import IntegratedGradients, Saliency

    from xai_audit.attribute import run_job
    from xai_audit.config import JobConfig
    from xai_workers import schema as S
    from xai_workers.preprocess import pixels_to_input, preprocess_bytes

    name, size, layer, reshape = CASES[case]
    if case.startswith("timm"):
        spec, weights = _timm_model(name, tmp_path)
    else:
        spec, weights = _hf_model(name, tmp_path)
    dataset, images = photos_parquet
    out = tmp_path / "out"
    res = run_job(
        JobConfig(input=dataset, output=str(out), model=spec, weights=weights, image_size=size,
                  ig_steps=STEPS, batch_size=4, progress_interval_s=0.0,
                  store="full")  # float32 maps at full size: compared with the oracles below
    )  # fmt: skip
    assert res.exit_code == 0 and res.counts["rows_ok"] == 3, res.summary
    manifest = json.loads((out / "manifest.json").read_text())["model"]
    assert manifest["gradcam_layer"] == layer
    if case.startswith("hf"):
        assert manifest["class_names"] == {"source": "model", "names": ["cat", "dog", "tree"]}
        assert manifest["preprocessing_from"] == "Hugging Face image processor config"
    else:
        assert manifest["class_names"] is None  # random timm weights: names unknown
        assert manifest["preprocessing_from"].startswith("timm pretrained_cfg")
    got = pq.read_table(out / "attributions").sort_by("id")
    if case.startswith("hf"):  # names from config.id2label in the rows
        names = ["cat", "dog", "tree"]
        assert got["pred_name"].to_pylist() == [names[c] for c in got["pred_class"].to_pylist()]

    # the oracles, on the model and preprocessing load_model gives (float64 and float32)
    loaded = load_model(spec, weights, image_size=size)
    pre = loaded.preprocessing
    assert manifest["preprocessing"]["resize_size"] == (pre.resize_size or pre.image_size)
    x = torch.stack([preprocess_bytes(images[i], pre) for i in got["id"].to_pylist()])
    t = torch.from_numpy(got["target"].to_numpy())
    ref64, x64 = copy.deepcopy(loaded.module).double(), x.double()
    with torch.no_grad():
        assert torch.equal(ref64(x64).argmax(dim=1), t)
    base = pixels_to_input(torch.zeros_like(x64), pre)  # the black baseline
    sal64 = Saliency(ref64).attribute(x64, target=t, abs=True).amax(dim=1)
    ig64 = IntegratedGradients(ref64).attribute(
        x64, baselines=base, target=t, n_steps=STEPS, method="gausslegendre"
    )
    ref32 = copy.deepcopy(loaded.module)
    sal32 = Saliency(ref32).attribute(x, target=t, abs=True).amax(dim=1)
    ig32 = IntegratedGradients(ref32).attribute(
        x, baselines=base.float(), target=t, n_steps=STEPS, method="gausslegendre"
    )
    # the job computes in float32: its error against the float64 oracle is bounded by a multiple
    # of Captum's own float32 error on the same model (1e-4 floor), which holds on any CPU and
    # thread count; a wrong target, input, baseline or quadrature is off by O(1)
    for key, r64, r32 in (("saliency", sal64, sal32), ("integrated_gradients", ig64, ig32)):
        ours = torch.from_numpy(S.tensor_to_numpy(got[key]))
        bound = max(20 * _rel_err(r32, r64), 1e-4)
        assert _rel_err(ours, r64) <= bound, f"{case} {key}"
    ours = torch.from_numpy(S.tensor_to_numpy(got["gradcam"]))
    pgc = _pgc(ref64, x64, layer, t, reshape)
    # after min-max scaling, within OpenCV's float32 resize in pytorch-grad-cam (test_engine)
    assert (_minmax(ours).double() - pgc).abs().max() <= 2e-3, case


def test_timm_without_weights_uses_the_cached_pretrained_file(monkeypatch, tmp_path):
    """The cache lookup is faked (no network here); timm itself loads the file it is given."""
    import hashlib

    import huggingface_hub
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ref = timm.create_model("test_resnet", pretrained=False).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    asked = []

    def cached(repo_id, filename, *args, **kwargs):
        asked.append((repo_id, filename))
        return str(path) if filename == "model.safetensors" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
    loaded = load_model("timm:test_resnet", image_size=64)
    assert asked[0][0].startswith("timm/test_resnet")
    assert loaded.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.module(x), ref(x))
    assert loaded.class_names is not None and len(loaded.class_names) == 1000
    assert loaded.class_names[0] == timm.data.ImageNetInfo().index_to_description(0)
