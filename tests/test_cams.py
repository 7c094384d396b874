"""The Grad-CAM family's weighting functions against pytorch-grad-cam's classes, in numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from xai_workers.cams import CAMS, FAMILY, cam_map, eigencam
from xai_workers.hooks import capture_activation

REFERENCE = {
    "gradcam": GradCAM,
    "gradcam_pp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
}


class Residual(nn.Module):
    """A custom model: inplace ReLUs, a residual add, global average pooling and a linear head."""

    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        y = self.relu(self.stem(x))
        z = self.relu1(self.c1(y))
        y = self.relu2(self.c2(z) + y)
        return self.head(y.mean(dim=(2, 3)))


# (model, layer, input side): layers whose maps have several pixels at these small inputs
CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), "layer3", 48),  # 3x3
    "densenet121": (
        lambda: torchvision.models.densenet121(num_classes=10),
        "features.denseblock2",  # 4x4 at 32 px
        32,
    ),
    "custom": (Residual, "c2", 48),  # 24x24
}


def _scaled(m: torch.Tensor) -> torch.Tensor:
    lo = m.amin(dim=(1, 2), keepdim=True)
    return (m - lo) / (1e-7 + (m - lo).amax(dim=(1, 2), keepdim=True))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """A float64 random network, its layer's activations A and gradients G of the predicted
    class's logit at a random batch, and pytorch-grad-cam's map for every member."""
    build, layer, size = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval().double().requires_grad_(False)
    # the input requires grad so the layer's output does (parameters are frozen: no weight grads)
    x = torch.randn(2, 3, size, size, dtype=torch.float64).requires_grad_(True)
    ours = copy.deepcopy(model)
    with torch.enable_grad(), capture_activation(ours, layer) as store:
        logits = ours(x)
        t = logits.argmax(dim=1)
        (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), store["act"])
    a = store["act"].detach()
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    ref = {}
    for name, cls in REFERENCE.items():
        reference = copy.deepcopy(model)
        with cls(model=reference, target_layers=[reference.get_submodule(layer)]) as cam:
            ref[name] = torch.from_numpy(cam(input_tensor=x, targets=targets))
    return request.param, a, g, (size, size), ref


@pytest.mark.parametrize("name", list(CAMS))
def test_cam_equals_pytorch_grad_cam(case, name):
    arch, a, g, size, ref = case
    assert a.shape[-1] * a.shape[-2] > 1
    ours = _scaled(cam_map(name, a, g, size))
    expected = ref[name]
    assert expected.amax() > 0.5, f"{arch}/{name}: the reference map is empty, compares nothing"
    # 2e-3: pytorch-grad-cam min-max scales at (h, w), resizes with OpenCV (bilinear, half-pixel
    # centres, float32 weights) and scales again; we upsample with torch in float64 and scale
    # once. That leaves ~1e-4; a wrong weighting (a missing ReLU, eps or power) moves whole
    # regions by >0.05.
    if name != "eigencam":
        err = _max_err(ours, expected)
        assert err <= 2e-3, f"{arch}/{name}: max |ours - pytorch-grad-cam| = {err:.3g}"
        return
    # EigenCAM: pytorch-grad-cam keeps the sign its SVD returns, ours is fixed (sum(v) >= 0).
    # eigencam(-A) is the opposite sign's map: per image the reference must equal one of the two,
    # and the two must differ, or this compares nothing.
    flipped = _scaled(cam_map(name, -a, None, size))
    for i in range(len(a)):
        assert _max_err(ours[i], flipped[i]) > 0.1, f"{arch}: both signs give the same map"
        err = min(_max_err(ours[i], expected[i]), _max_err(flipped[i], expected[i]))
        assert err <= 2e-3, f"{arch}/eigencam image {i}: max |ours - reference| = {err:.3g}"


def test_eigencam_sign_points_at_the_active_region():
    """Channels that all fire at one position: the map is high there, whatever the SVD sign."""
    g = torch.Generator().manual_seed(0)
    a = 0.1 * torch.rand(2, 16, 5, 5, generator=g, dtype=torch.float64)
    a[0, :, 1, 3] += 1.0 + torch.rand(16, generator=g, dtype=torch.float64)
    a[1, :, 4, 0] += 1.0 + torch.rand(16, generator=g, dtype=torch.float64)
    m = eigencam(a)
    assert m.shape == (2, 5, 5)
    # with the other sign the spike would be the most negative projection, 0 after the ReLU
    assert m[0].argmax().item() == 1 * 5 + 3 and m[1].argmax().item() == 4 * 5 + 0


def test_bad_inputs_are_refused():
    a = torch.rand(1, 4, 3, 3)
    with pytest.raises(ValueError, match="unknown CAM"):
        cam_map("scorecam", a, a, (6, 6))
    with pytest.raises(ValueError, match="needs the gradients"):
        cam_map("gradcam_pp", a, None, (6, 6))
    with pytest.raises(ValueError, match="do not match"):
        cam_map("layercam", a, a[:, :2], (6, 6))
    with pytest.raises(ValueError, match=r"\(N, K, h, w\)"):
        cam_map("gradcam", a[0], a[0], (6, 6))


def test_engine_reads_the_family_out_of_its_pass_at_x(case):
    """``attribute(methods=...)`` gives every member from the one pass at x (its own
    activations and gradients), equal to the weighting functions on A and G captured by hand:
    float64 throughout, so 1e-9 of the map's maximum catches any other layer, target, gradient
    or upsampling (which move maps by > 1%)."""
    from xai_workers.engine import attribute

    arch, a, g, size, _ = case
    build, layer, side = CASES[arch]
    torch.manual_seed(0)
    model = build().eval().double().requires_grad_(False)
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    names = ("gradcam", *FAMILY)
    out = attribute(model, x, methods=names, gradcam_layer=layer)
    for name in names:
        want = cam_map(name, a, g, size)
        scale = want.abs().amax().item()
        assert scale > 0, name
        err = (out[name] - want).abs().max().item()
        assert err <= 1e-9 * scale, f"{arch}/{name}: {err:.3g} of {scale:.3g}"
