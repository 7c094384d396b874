"""SmoothGrad, SmoothGrad-squared and VarGrad (engine.attribute) against Captum's NoiseTunnel over
Saliency, with the same noise tensors handed to both; noise seeded by the row key."""

from __future__ import annotations

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from torch import nn

from xai_workers.engine import attribute, smoothgrad_noise

NAMES = {"smoothgrad": "smoothgrad", "smoothgrad_sq": "smoothgrad_sq", "vargrad": "vargrad"}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).double().eval()  # fmt: skip


def test_equals_captum_noise_tunnel_with_the_same_noise(monkeypatch):
    net = _net()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    keys, m, sigma = [11, 22, 33], 6, 0.15
    ours = attribute(net, x, methods=tuple(NAMES), smoothgrad_samples=m,
                     smoothgrad_sigma=sigma, noise_keys=keys, batch_budget_mb=0.01)  # fmt: skip
    noise = smoothgrad_noise(x, m, sigma, keys)  # (N, M, C, H, W), the definition's draws
    t = ours["target"]
    for i in range(3):
        # Captum draws its noise with torch.normal inside NoiseTunnel: hand it ours instead
        monkeypatch.setattr(torch, "normal", lambda mean, std, _n=noise[i]: _n.clone())
        for ours_name, nt_type in NAMES.items():
            ref = NoiseTunnel(Saliency(net)).attribute(
                x[i : i + 1], nt_type=nt_type, nt_samples=m, stdevs=1.0, target=int(t[i]),
            )  # fmt: skip
            # float64 both ways; only the order of the sums over samples differs (1e-12)
            torch.testing.assert_close(ours[ours_name][i], ref[0].amax(dim=0), rtol=1e-9,
                                       atol=1e-12)  # fmt: skip
        monkeypatch.undo()


def test_noise_follows_the_row_key_not_the_batch():
    net = _net()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    keys = [5, 6, 7, 8]
    whole = attribute(net, x, methods=("smoothgrad",), smoothgrad_samples=4, noise_keys=keys)
    part = attribute(net, x[2:], methods=("smoothgrad",), smoothgrad_samples=4,
                     noise_keys=keys[2:], batch_budget_mb=0.001)  # fmt: skip
    torch.testing.assert_close(part["smoothgrad"], whole["smoothgrad"][2:], rtol=1e-9, atol=1e-12)
    other = attribute(net, x[2:], methods=("smoothgrad",), smoothgrad_samples=4,
                      noise_keys=[1, 2])  # fmt: skip
    assert (other["smoothgrad"] - whole["smoothgrad"][2:]).abs().max() > 1e-6
    spread = (x[0].amax() - x[0].amin()).item()
    z = smoothgrad_noise(x, 4, 0.15, keys)
    assert z[0].std().item() == pytest.approx(0.15 * spread, rel=0.1)  # sigma x the input range
    with pytest.raises(ValueError, match="noise_keys"):
        attribute(net, x, methods=("smoothgrad",), noise_keys=[1])


class _TwoReads(nn.Module):
    """The input feeds two convolutions: no layer alone reads it (``engine.input_layer`` is
    None), so the sweep takes the plain path, where every row's input gradient is autograd's."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


def _noise_tunnel(net, x, noise, targets, monkeypatch) -> dict[str, torch.Tensor]:
    """Captum's NoiseTunnel(Saliency) per image and target with our noise: name -> (N, T, H, W)."""
    out = {name: torch.empty(*targets.shape, *x.shape[-2:], dtype=x.dtype) for name in NAMES}
    for i in range(x.shape[0]):
        monkeypatch.setattr(torch, "normal", lambda mean, std, _n=noise[i]: _n.clone())
        for j in range(targets.shape[1]):
            for name, nt_type in NAMES.items():
                ref = NoiseTunnel(Saliency(net)).attribute(
                    x[i : i + 1], nt_type=nt_type, nt_samples=noise.shape[1], stdevs=1.0,
                    target=int(targets[i, j]),
                )  # fmt: skip
                out[name][i, j] = ref[0].amax(dim=0)
        monkeypatch.undo()
    return out


@pytest.mark.parametrize("arch", ["input_layer", "plain"])
@pytest.mark.parametrize("target", [None, "topk:2"])
@pytest.mark.parametrize("steps", [5, "auto"])
def test_noisy_rows_join_the_ig_sweep(arch, target, steps, monkeypatch):
    """SmoothGrad's noisy rows run in the IG sweep's chunks (one forward + backward per chunk
    for both kinds) and still equal Captum's NoiseTunnel; IG is what it is without them."""
    from xai_workers.engine import _PREPARED, prepare_model

    model = _net() if arch == "input_layer" else _TwoReads().double().eval()
    net = prepare_model(model)
    # the shortcut through the input layer is taken for the first model only
    assert (_PREPARED[net].input_layer is not None) == (arch == "input_layer")
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keys, m = [3, 4], 4
    methods = ("integrated_gradients", *NAMES)
    kw = dict(target=target, ig_steps=steps, smoothgrad_samples=m, noise_keys=keys)
    sizes = []

    def count(mod, inputs, output):  # the batch sizes of the passes that take gradients
        if torch.is_grad_enabled():
            sizes.append(inputs[0].shape[0])

    handle = net.register_forward_hook(count)
    try:
        joint = attribute(net, x, methods=methods, **kw)
    finally:
        handle.remove()
    pairs = 2 * (2 if target else 1)
    if steps == 5:  # the pass at x, then one chunk of 5 path points and 4 noisy rows per pair
        assert sizes == [2, pairs * (5 + m)]
    ig_only = attribute(net, x, methods=("integrated_gradients",), **kw)
    # float64 both ways; only the order of sums differs (1e-12), a misplaced row is O(1)
    torch.testing.assert_close(joint["integrated_gradients"], ig_only["integrated_gradients"],
                               rtol=1e-9, atol=1e-12)  # fmt: skip
    targets = joint["target"].reshape(2, -1)
    ref = _noise_tunnel(net, x, smoothgrad_noise(x, m, 0.15, keys), targets, monkeypatch)
    for name in NAMES:
        got = joint[name].reshape(*targets.shape, 12, 12)
        torch.testing.assert_close(got, ref[name], rtol=1e-9, atol=1e-12)
    # one row per chunk: every chunk holds one kind, same numbers
    tiny = attribute(net, x, methods=methods, batch_budget_mb=1e-6, **kw)
    for name in ("integrated_gradients", *NAMES):
        torch.testing.assert_close(tiny[name], joint[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("steps", [4, "auto"])
def test_smoothgrad_stays_fp32_under_bf16(steps):
    """With bf16 autocast on the path points, the noisy rows run in chunks of their own in fp32:
    the maps equal the fp32 run's (bf16 would be off by about 1e-2 relative)."""
    net = _net().float()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    kw = dict(methods=("integrated_gradients", *NAMES), ig_steps=steps, smoothgrad_samples=3)
    fp32 = attribute(net, x, precision="fp32", **kw)
    bf16 = attribute(net, x, precision="bf16", **kw)
    assert (bf16["integrated_gradients"] - fp32["integrated_gradients"]).abs().max() > 0
    # and the path points stay in bf16 chunks of their own: IG is the bf16 IG without SmoothGrad
    # (a chunk shared with noisy rows would run in fp32, about 1e-2 relative away)
    ig_only = attribute(net, x, precision="bf16", **(kw | {"methods": ("integrated_gradients",)}))
    torch.testing.assert_close(bf16["integrated_gradients"], ig_only["integrated_gradients"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    for name in NAMES:
        # float32 summation order only (1e-6 relative); bf16 arithmetic would be ~1e-2
        torch.testing.assert_close(bf16[name], fp32[name], rtol=1e-5, atol=1e-7)
