"""The fused engine against independent oracles: Captum and pytorch-grad-cam, in numbers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import IntegratedGradients, LayerGradCam, Saliency
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import nn

from xai_workers import attribute, make_baseline, prepare_model
from xai_workers.engine import SpaceToDepthConv, fold_batchnorm, input_layer
from xai_workers.hooks import default_gradcam_layer
from xai_workers.quadrature import QUADRATURES, path_points

SIZE = 48


class Residual(nn.Module):
    """A custom model with inplace ReLUs, a residual add and a conv directly followed by an
    inplace ReLU (the Grad-CAM capture must not see the ReLU's in-place write)."""

    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        y = self.relu(self.bn(self.stem(x)))
        z = self.relu1(self.c1(y))
        y = self.relu2(self.c2(z) + y)
        return self.head(y.mean(dim=(2, 3)))


def _randomize_bn(model):
    """Give BatchNorm layers non-trivial statistics so folding them changes the weights."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
            m.running_var.copy_(0.4 * torch.rand(c, generator=g) + 0.8)
            m.weight.data.copy_(0.4 * torch.rand(c, generator=g) + 0.8)
            m.bias.data.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
    return model


def _model(name):
    torch.manual_seed(0)
    if name == "custom":
        m = Residual()
        layer = "c2"
    elif name == "vgg11":
        m = torchvision.models.vgg11_bn(num_classes=10)
        layer = "features.27"  # last ReLU before the last pool: 3x3 at 48 px
    else:
        m = getattr(torchvision.models, name)(num_classes=10)
        layer = {
            "resnet18": "layer4",
            "mobilenet_v2": "features",
            "densenet121": "features.denseblock3",  # "features" is 1x1 at 48 px
        }[name]
    return _randomize_bn(m).eval().double(), layer


def _close(ours, ref, tol=1e-6, what=""):
    """Equal within ``tol`` relative to the largest value of the reference.

    The oracle comparisons run in float64 (model and input). Captum builds its Riemann points
    with float32 ``linspace`` and its step sizes as float32 tensors, which leaves relative errors
    of ~1e-7 on its side: 1e-6 sits above that and far below any real discrepancy (float32
    noise on these random models is ~1e-3). The float32 fast path is checked against float64
    separately (``test_float32_fast_form_...``)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0, "a reference of zeros compares nothing"
    err = (ours - ref).abs().max().item()
    assert err <= tol * scale, f"{what}: max |ours - ref| = {err:.3g} > {tol} x {scale:.3g}"


def _close_delta(ours, delta):
    """ig_delta is a small difference of large sums: compare it on the scale of F(x) - F(x')."""
    scale = (ours["score"] - ours["baseline_score"]).abs().max().item()
    err = (ours["ig_delta"] - delta.double()).abs().max().item()
    assert err <= 1e-6 * scale, f"ig_delta: {err:.3g} > 1e-6 x {scale:.3g}"


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)


ARCHS = ["resnet18", "vgg11", "mobilenet_v2", "densenet121", "custom"]


@pytest.mark.parametrize("arch", ARCHS)
def test_all_methods_equal_captum_and_grad_cam(arch, x):
    model, layer = _model(arch)
    reference = copy.deepcopy(model)
    ours = attribute(model, x, ig_steps=8, gradcam_layer=layer)
    t = ours["target"]
    with torch.no_grad():
        assert torch.equal(t, reference(x).argmax(dim=1))
    sal = Saliency(reference).attribute(x, target=t, abs=True).amax(dim=1)
    _close(ours["saliency"], sal, what="saliency")
    ig, delta = IntegratedGradients(reference).attribute(
        x,
        baselines=torch.zeros_like(x),
        target=t,
        n_steps=8,
        method="gausslegendre",
        return_convergence_delta=True,
    )
    _close(ours["integrated_gradients"], ig, what="IG")
    _close_delta(ours, delta)
    gc = LayerGradCam(reference, reference.get_submodule(layer)).attribute(
        x, target=t, relu_attributions=True
    )
    gc = F.interpolate(gc, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    _close(ours["gradcam"], gc, what="Grad-CAM vs Captum")

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=reference, target_layers=[reference.get_submodule(layer)]) as cam:
        pgc = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
    m = ours["gradcam"]
    lo = m.amin(dim=(1, 2), keepdim=True)
    scaled = (m - lo) / (1e-7 + (m - lo).amax(dim=(1, 2), keepdim=True))
    # pytorch-grad-cam resizes with OpenCV (bilinear, half-pixel centres, float32)
    _close(scaled, torch.from_numpy(pgc), tol=2e-3, what="Grad-CAM vs pytorch-grad-cam")


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle"])
def test_ig_riemann_equals_captum(method, x):
    model, _ = _model("resnet18")
    ours = attribute(model, x, ig_steps=5, ig_method=method, methods=("integrated_gradients",))
    ig, delta = IntegratedGradients(model).attribute(
        x, target=ours["target"], n_steps=5, method=method, return_convergence_delta=True
    )
    _close(ours["integrated_gradients"], ig)
    _close_delta(ours, delta)


def test_ig_trapezoid_is_captum_rescaled_to_unit_weights(x):
    model, _ = _model("custom")
    n = 6
    ours = attribute(
        model, x, ig_steps=n, ig_method="riemann_trapezoid", methods=("integrated_gradients",)
    )
    ig = IntegratedGradients(model).attribute(
        x, target=ours["target"], n_steps=n, method="riemann_trapezoid"
    )
    _close(ours["integrated_gradients"], ig * n / (n - 1))


def test_quadrature_rules():
    for method in QUADRATURES:
        for n in (2, 5, 32):
            a, w = path_points(n, method)
            assert len(a) == len(w) == n
            assert abs(w.sum() - 1) < 1e-12, method
            assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() <= 1
            if method != "riemann_trapezoid":
                step_fn, alpha_fn = approximation_parameters(method)
                np.testing.assert_allclose(a, alpha_fn(n), atol=1e-7)
                np.testing.assert_allclose(w, step_fn(n), atol=1e-7)
    a, w = path_points(5, "riemann_trapezoid")
    np.testing.assert_allclose(a, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(w, [0.125, 0.25, 0.25, 0.25, 0.125])
    with pytest.raises(ValueError, match="unknown ig_method"):
        path_points(4, "simpson")
    with pytest.raises(ValueError, match="positive"):
        path_points(0)


class Smooth(nn.Module):
    """A smooth (softplus) model: IG's quadrature error must fall as steps grow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(F.softplus(self.conv(x) * 3).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle", "riemann_trapezoid"])
def test_completeness_delta_shrinks_with_steps(method, x):
    torch.manual_seed(3)
    model = Smooth().double()
    base = make_baseline(x, "black")
    deltas = [
        attribute(
            model, x, ig_steps=n, ig_method=method, baseline=base, methods=("integrated_gradients",)
        )["ig_delta"]
        .abs()
        .max()
        .item()
        for n in (2, 4, 16)
    ]
    assert deltas[0] > deltas[1] > deltas[2], deltas
    gap = attribute(model, x, ig_steps=2, methods=("integrated_gradients",), baseline=base)
    assert (gap["score"] - gap["baseline_score"]).abs().min() > 10 * deltas[2]


def test_baselines(x):
    class P:
        mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)

    mean = torch.tensor(P.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(P.std, dtype=x.dtype).view(1, 3, 1, 1)
    torch.testing.assert_close(
        make_baseline(x, "black", P), ((0 - mean) / std).expand(1, 3, SIZE, SIZE)
    )
    torch.testing.assert_close(
        make_baseline(x, "gray", P), ((0.5 - mean) / std).expand(1, 3, SIZE, SIZE)
    )
    assert torch.equal(make_baseline(x, "zeros"), torch.zeros(1, 3, SIZE, SIZE))
    u1, u2 = make_baseline(x, "uniform", P, seed=4), make_baseline(x, "uniform", P, seed=4)
    assert torch.equal(u1, u2) and not torch.equal(u1, make_baseline(x, "uniform", P, seed=5))
    pixels = u1 * std + mean
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0.2
    blur = make_baseline(x, "blur", P, blur_sigma=2.0)
    assert blur.shape == x.shape
    # blurring commutes with normalization; and a constant image stays constant
    assert blur.std() < 0.5 * x.std()
    flat = torch.full((1, 3, SIZE, SIZE), 0.7, dtype=torch.float64)
    torch.testing.assert_close(make_baseline(flat, "blur", P), flat)
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline(x, "pink")


def test_named_and_per_image_baselines_equal_captum(x):
    model, _ = _model("custom")
    for kind in ("gray", "blur", "uniform"):
        base = make_baseline(x, kind)
        ours = attribute(model, x, ig_steps=6, baseline=base, methods=("integrated_gradients",))
        ig, delta = IntegratedGradients(model).attribute(
            x,
            baselines=base.expand_as(x),
            target=ours["target"],
            n_steps=6,
            method="gausslegendre",
            return_convergence_delta=True,
        )
        _close(ours["integrated_gradients"], ig)
        _close_delta(ours, delta)
        with torch.no_grad():
            fb = model(base.expand_as(x)).gather(1, ours["target"][:, None])[:, 0]
        torch.testing.assert_close(ours["baseline_score"], fb, rtol=1e-7, atol=1e-10)


def test_saliency_options_equal_captum(x):
    model, _ = _model("resnet18")
    t = torch.tensor([1, 4, 9])
    ours = attribute(model, x, target=t, methods=("saliency",), saliency_channels=True)
    _close(ours["saliency"], Saliency(model).attribute(x, target=t, abs=True))
    sq = attribute(model, x, target=t, methods=("saliency",), saliency_mode="square")
    g = Saliency(model).attribute(x, target=t, abs=False)
    _close(sq["saliency"], (g * g).amax(dim=1))


def test_targets_given_fixed_and_topk(x):
    model, layer = _model("resnet18")
    given = attribute(model, x, target=[2, 5, 7], ig_steps=4)
    assert given["target"].tolist() == [2, 5, 7]
    fixed = attribute(model, x, target=5, ig_steps=4)
    assert fixed["target"].tolist() == [5, 5, 5]
    _close(fixed["integrated_gradients"][1], given["integrated_gradients"][1])
    top = attribute(model, x, target="topk:3", ig_steps=4)
    with torch.no_grad():
        assert torch.equal(top["target"], model(x).topk(3, dim=1).indices)
    assert top["saliency"].shape == (3, 3, SIZE, SIZE)
    assert top["integrated_gradients"].shape == (3, 3, 3, SIZE, SIZE)
    assert top["ig_delta"].shape == top["score"].shape == (3, 3)
    second = attribute(model, x, target=top["target"][:, 1], ig_steps=4)
    for key in ("saliency", "integrated_gradients", "gradcam"):
        _close(top[key][:, 1], second[key])
    _close(top["ig_delta"][:, 1], second["ig_delta"], tol=1e-6)
    assert top["topk_classes"].shape == (3, 5)
    with pytest.raises(ValueError, match="target classes"):
        attribute(model, x, target=10)
    with pytest.raises(ValueError, match="3 images"):
        attribute(model, x, target=[1, 2])


def test_probability_score_equals_captum_on_softmax(x):
    model, _ = _model("custom")
    soft = nn.Sequential(model, nn.Softmax(dim=1))
    ours = attribute(
        model, x, score="prob", ig_steps=6, methods=("saliency", "integrated_gradients")
    )
    t = ours["target"]
    _close(ours["saliency"], Saliency(soft).attribute(x, target=t).amax(dim=1))
    ig = IntegratedGradients(soft).attribute(x, target=t, n_steps=6, method="gausslegendre")
    _close(ours["integrated_gradients"], ig)
    assert torch.all((ours["score"] > 0) & (ours["score"] <= 1))
    torch.testing.assert_close(ours["score"], ours["pred_prob"])


def test_chunking_and_batch_independence(x):
    model, _ = _model("resnet18")
    net = prepare_model(model)
    whole = attribute(net, x, ig_steps=5)
    tiny = attribute(net, x, ig_steps=5, batch_budget_mb=1e-3)  # one path point per chunk
    alone = attribute(net, x[1:2], ig_steps=5)
    for key in ("saliency", "integrated_gradients", "gradcam", "ig_delta", "score"):
        torch.testing.assert_close(tiny[key], whole[key], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(alone[key][0], whole[key][1], rtol=1e-7, atol=1e-10)


def test_cam_is_gradcam_without_backward_on_gap_linear_models(x):
    model, _ = _model("resnet18")
    with torch.no_grad():
        model.fc.weight[0] = -model.fc.weight[0].abs()  # class 0's CAM is negative everywhere
        t = model(x).argmax(dim=1)
    t[0] = 0
    out = attribute(model, x, target=t, methods=("cam", "gradcam"), gradcam_layer="layer4")
    hw = 2 * 2  # layer4 is 2x2 at 48 px
    # with GAP + linear, dF/dA_k = W[t, k] / hw everywhere, so Grad-CAM = ReLU(CAM) / hw
    _close(out["gradcam"], torch.relu(out["cam"]) / hw)
    assert (out["cam"][0] < 0).all() and (out["cam"][1:] > 0).any()  # stored raw, no ReLU
    vgg, layer = _model("vgg11")
    with pytest.raises(ValueError, match="global average pooling"):
        attribute(vgg, x, methods=("cam",), gradcam_layer=layer)


def test_intermediate_gradcam_layers_equal_captum(x):
    model, _ = _model("resnet18")
    t = torch.tensor([0, 3, 6])
    for layer in ("layer2.0.conv2", "layer3.1.bn1", "layer1", "conv1", "relu", "maxpool"):
        ours = attribute(model, x, target=t, methods=("gradcam",), gradcam_layer=layer)
        ref = LayerGradCam(model, model.get_submodule(layer)).attribute(
            x, target=t, relu_attributions=True
        )
        ref = F.interpolate(ref, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
        _close(ours["gradcam"], ref)
    net = prepare_model(model)
    for layer in ("layer2.0.conv2", "relu"):  # a folded conv, a ReLU run after its pool
        with pytest.raises(ValueError, match="no longer its own"):
            attribute(net, x, methods=("gradcam",), gradcam_layer=layer)
    with pytest.raises(KeyError, match="no layer named"):
        attribute(model, x, methods=("gradcam",), gradcam_layer="layer9")


def test_default_layer_is_last_spatial_layer():
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # 2x2 after the last stage
    for arch, layer in (
        ("resnet18", "layer4"),
        ("mobilenet_v2", "features"),
        ("densenet121", "features"),
    ):
        model, _ = _model(arch)
        assert default_gradcam_layer(prepare_model(model), x) == layer
        ours = attribute(model, x, methods=("gradcam",))
        named = attribute(model, x, methods=("gradcam",), gradcam_layer=layer)
        torch.testing.assert_close(ours["gradcam"], named["gradcam"])


def test_caller_model_untouched_and_no_hooks_survive(x):
    model, _ = _model("custom")
    model.train()
    model.c1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    attribute(model, x, ig_steps=3)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Residual()
        self.fail = False

    def forward(self, x):
        out = self.body(x)
        if self.fail and x.shape[0] > 3:  # fails in the IG sweep, after the pass at x
            raise RuntimeError("boom")
        return out


def test_hooks_removed_when_the_model_raises(x):
    model = Exploding().eval().double()
    net = prepare_model(model)
    net.fail = True
    flags = [p.requires_grad for p in net.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        attribute(
            net, x, ig_steps=4, gradcam_layer="body.c2", methods=("gradcam", "integrated_gradients")
        )
    assert not any(m._forward_hooks for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == flags
    net.fail = False
    attribute(net, x, ig_steps=4, gradcam_layer="body.c2")  # still usable
    assert not any(m._forward_hooks for m in net.modules())


def test_fast_form_is_exact():
    model, _ = _model("resnet18")
    net = prepare_model(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 0
    assert isinstance(net.conv1, SpaceToDepthConv)
    assert isinstance(net.relu, nn.Identity) and isinstance(net.maxpool[1], nn.ReLU)
    kept = prepare_model(model, gradcam_layer="relu")  # a Grad-CAM layer keeps its own output
    assert isinstance(kept.relu, nn.ReLU) and isinstance(kept.maxpool, nn.MaxPool2d)
    assert all(not p.requires_grad for p in net.parameters())
    x = torch.randn(2, 3, 61, 53, dtype=torch.float64)  # odd sizes exercise the stem's padding
    with torch.no_grad():
        _close(net(x), model(x))
    assert len(fold_batchnorm(copy.deepcopy(model))) == 20
    torch.manual_seed(0)
    for c, o, k, p, h, w in [
        (3, 8, 3, 1, 33, 31),
        (1, 4, 4, 1, 17, 20),
        (3, 5, 5, 0, 9, 12),
        (4, 6, 1, 0, 7, 8),
    ]:
        conv = nn.Conv2d(c, o, k, stride=2, padding=p).double()
        xx = torch.randn(2, c, h, w, dtype=torch.float64)
        with torch.no_grad():
            _close(SpaceToDepthConv(conv)(xx), conv(xx))


class InputTwice(nn.Module):
    """The input feeds the first conv and, when ``skip`` is set, the output too; with ``pre``
    set the conv sees a scaled copy of the input instead."""

    def __init__(self, skip=False, pre=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.skip, self.pre = skip, pre

    def forward(self, x):
        y = self.fc(torch.tanh(self.conv(x * 1.5 if self.pre else x)).mean(dim=(2, 3)))
        if self.skip:
            y = y + (x * x).mean(dim=(1, 2, 3))[:, None]
        return y


def test_first_layer_shortcut_and_its_fallbacks_equal_captum(x):
    """The sweep sums the gradients at the output of the layer that alone reads the input and
    maps the sum back once. A model that reads the input elsewhere too, seen by torch.fx or
    only at run time, takes the input gradient at every path point. All equal Captum."""
    torch.manual_seed(0)
    plain = InputTwice(skip=False).double().eval()
    skip = copy.deepcopy(plain)
    skip.skip = True
    assert input_layer(_model("resnet18")[0]) == "conv1"
    assert input_layer(plain) == "conv"
    assert input_layer(skip) is None
    pre = copy.deepcopy(plain)
    pre.pre = True
    late = prepare_model(plain)  # traced without the skip: the shortcut is planned
    late.skip = True  # ... but at run time the input also reaches the output
    late_pre = prepare_model(plain)
    late_pre.pre = True  # ... or the conv is not fed the input itself
    for model, ref in [(plain, plain), (skip, skip), (late, skip), (late_pre, pre)]:
        ours = attribute(model, x, ig_steps=8, methods=("integrated_gradients",))
        ig, delta = IntegratedGradients(ref).attribute(
            x, target=ours["target"], n_steps=8, return_convergence_delta=True
        )
        _close(ours["integrated_gradients"], ig, what=f"IG, skip={model.skip}, pre={model.pre}")
        _close_delta(ours, delta)


def test_bad_arguments(x):
    model, _ = _model("custom")
    with pytest.raises(ValueError, match="unknown methods"):
        attribute(model, x, methods=("lime",))
    with pytest.raises(ValueError, match="does not broadcast"):
        attribute(model, x, baseline=torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        attribute(model, x[0])
    with pytest.raises(ValueError, match="score"):
        attribute(model, x, score="loss")


def test_bf16_precision_runs_and_auto_falls_back_to_fp32(x):
    model, _ = _model("custom")
    model, x = model.float(), x.float()
    fp32 = attribute(model, x, ig_steps=6)
    bf16 = attribute(model, x, ig_steps=6, precision="bf16")
    assert torch.equal(bf16["target"], fp32["target"])
    # bf16 is close but not exact; 'auto' on a CPU is fp32
    rel = (bf16["integrated_gradients"] - fp32["integrated_gradients"]).abs().max()
    assert 0 < rel < 0.1 * fp32["integrated_gradients"].abs().max()
    auto = attribute(model, x, ig_steps=6, precision="auto")
    torch.testing.assert_close(auto["integrated_gradients"], fp32["integrated_gradients"])


@pytest.mark.parametrize("arch", ["resnet18", "custom"])
def test_float32_fast_form_is_as_exact_as_captum_in_float32(arch, x):
    """The float32 fast path (BN folded, channels_last, space-to-depth stem) against float64:
    its error is of the size of Captum's own float32 error on the same model."""
    model64, layer = _model(arch)
    ref = attribute(model64, x, ig_steps=6, gradcam_layer=layer)  # float64, checked above
    model, x32 = copy.deepcopy(model64).float(), x.float()
    ours = attribute(model, x32, ig_steps=6, gradcam_layer=layer)
    t = ref["target"]
    assert torch.equal(ours["target"], t)
    sal = Saliency(model).attribute(x32, target=t, abs=True).amax(dim=1)
    ig = IntegratedGradients(model).attribute(x32, target=t, n_steps=6, method="gausslegendre")
    captum_err = {
        "saliency": (sal.double() - ref["saliency"]).abs().max() / ref["saliency"].abs().max(),
        "integrated_gradients": (ig.double() - ref["integrated_gradients"]).abs().max()
        / ref["integrated_gradients"].abs().max(),
    }
    for key in ("saliency", "integrated_gradients", "gradcam"):
        assert ours[key].dtype == torch.float32
        err = (ours[key].double() - ref[key]).abs().max() / ref[key].abs().max()
        bound = max(20 * captum_err.get(key, 0.0), 1e-4)
        assert err <= bound, f"{key}: float32 error {err:.2e} > {bound:.2e}"


# --- vision transformers: the prepared form (sequence-first attention, patch-embedding shortcut)


def _tiny_vits():
    """torchvision's VisionTransformer (nn.MultiheadAttention, batch_first) and timm's test_vit
    (its own Attention), 32 px, seeded random weights: (name, model, patch-embedding conv)."""
    import timm

    from xai_workers.models.testing import tiny_torchvision_vit

    torch.manual_seed(0)
    tv = tiny_torchvision_vit().eval()
    # test_vit resizes its position embedding to any input (dynamic_img_size), which torch.fx
    # cannot trace; timm's ImageNet ViTs have a fixed size, as here
    tm = timm.create_model(
        "test_vit", pretrained=False, img_size=32, num_classes=5, dynamic_img_size=False
    ).eval()
    return [("torchvision", tv, "conv_proj"), ("timm", tm, "patch_embed.proj")]


def test_sequence_first_attention_equals_torch_attention():
    """SequenceFirstAttention against the nn.MultiheadAttention it replaces, in float64, with and
    without autograd: self-attention, key = value, distinct key and value, masks, the attention
    weights. A wrong transpose or a lost identity (query is key) changes outputs by O(1); float64
    summation order (one matrix product instead of many) moves them by ~1e-16: 1e-12 relative."""
    from xai_workers.engine import SequenceFirstAttention, sequence_first_attention

    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    ours = copy.deepcopy(ref)
    assert sequence_first_attention(nn.Sequential(ours)) == 1
    assert type(ours) is SequenceFirstAttention and ours.batch_first
    assert ours.state_dict().keys() == ref.state_dict().keys()
    q, kv, v = (torch.randn(3, n, 16, dtype=torch.float64) for n in (5, 7, 7))
    mask = torch.randn(5, 7, dtype=torch.float64)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, -2:] = True
    cases = {
        "self": ((q, q, q), {"need_weights": False}),
        "self, weights": ((q, q, q), {}),
        "key is value": ((q, kv, kv), {"need_weights": False}),
        "distinct": ((q, kv, v), {"attn_mask": mask, "key_padding_mask": pad}),
    }
    for what, (args, kwargs) in cases.items():
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                leaves = {id(a): a.clone().requires_grad_(grad) for a in args}
                mine = tuple(leaves[id(a)] for a in args)  # the identities of args (q is k)
                out, w = ours(*mine, **kwargs)
                out_ref, w_ref = ref(*args, **kwargs)
                assert out.shape == out_ref.shape == (3, 5, 16)
                _close(out, out_ref, 1e-12, what=f"{what}, grad={grad}")
                if w_ref is not None:
                    _close(w, w_ref, 1e-12, what=f"{what} weights")
                if grad:  # input gradients of a random projection, against torch's own
                    cot = torch.randn_like(out_ref)
                    g = torch.autograd.grad(out, list(leaves.values()), cot)
                    g_ref = torch.autograd.grad(ref(*mine, **kwargs)[0], list(leaves.values()), cot)
                    for a, b in zip(g, g_ref, strict=True):
                        _close(a, b, 1e-12, what=f"{what} input gradient")


@pytest.mark.parametrize("which", ["torchvision", "timm"])
def test_vision_transformer_fast_form_equals_captum(which, monkeypatch):
    """A ViT's patch embedding takes the input-layer shortcut (the model reads the input's shape
    first; torch.fx sees through that), torchvision's attention runs sequence-first, and
    saliency and IG (float64) still equal Captum's (1e-6, ``_close``)."""
    from xai_workers.engine import SequenceFirstAttention

    name, model, patch = next(v for v in _tiny_vits() if v[0] == which)
    model = model.double()
    assert input_layer(model) == patch
    net = prepare_model(model)
    n_mha = sum(type(m) is nn.MultiheadAttention for m in model.modules())
    assert sum(type(m) is SequenceFirstAttention for m in net.modules()) == n_mha
    assert n_mha == (2 if which == "torchvision" else 0)
    # count the rows the patch embedding really computes: with the shortcut, not one per point
    conv = net.get_submodule(patch)
    rows = {"n": 0}
    real = conv._conv_forward

    def counting(inp, weight, bias):
        rows["n"] += inp.shape[0]
        return real(inp, weight, bias)

    monkeypatch.setattr(conv, "_conv_forward", counting)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    steps = 16
    ours = attribute(net, x, methods=("saliency", "integrated_gradients"), ig_steps=steps)
    # pass at x (2), baseline forward (1), first(x'), L(x - x'), L(0) (1 + 2 + 1), map back (2):
    # 9, against 2 x 16 = 32 path points more without the shortcut
    assert rows["n"] < x.shape[0] * steps
    t = ours["target"]
    sal = Saliency(model).attribute(x, target=t, abs=True).amax(dim=1)
    ig, delta = IntegratedGradients(model).attribute(
        x, target=t, n_steps=steps, method="gausslegendre", return_convergence_delta=True
    )
    _close(ours["saliency"], sal, what=f"{name} saliency")
    _close(ours["integrated_gradients"], ig, what=f"{name} IG")
    _close_delta(ours, delta)


def test_vision_transformer_attention_is_fused_and_projections_one_matmul():
    """In our sweep (float32; every pass records gradients: the trapezoid rule has a = 0 and
    a = 1, so no gradient-free forward of the baseline, where torch's MHA takes its own inference
    kernel), attention runs through the fused CPU kernel of scaled_dot_product_attention forward
    and backward, and no projection runs as batched small matrix products (``aten::bmm``).
    Without ``SequenceFirstAttention`` torchvision's q/k/v projection does, on the torch we test
    (at::matmul folds a transposed input only for weights that require grad): that part fails
    if torch changes this, and the switch may then go."""
    from torch.profiler import ProfilerActivity, profile

    def ops(net, x):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            attribute(
                net, x, methods=("integrated_gradients",), ig_steps=3,
                ig_method="riemann_trapezoid",
            )  # fmt: skip
        return {e.key for e in prof.key_averages()}

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name, model, _ in _tiny_vits():
        seen = ops(prepare_model(model), x)
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in seen, name
        assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in seen, name
        assert "aten::bmm" not in seen, name
        if name == "torchvision":
            assert "aten::bmm" in ops(prepare_model(model, sequence_first=False), x)
