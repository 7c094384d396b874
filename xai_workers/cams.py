"""The Grad-CAM family as weighting functions over one layer's activations and gradients.

As in pytorch-grad-cam, a CAM method is only its weighting function: every function here maps the
activations ``A`` (N, K, h, w) of the Grad-CAM layer at x and the gradients ``G = dF/dA``
(N, K, h, w) of the target's score to the raw map (N, h, w), after a ReLU, as Grad-CAM is stored
(docs/conventions.md, "Grad-CAM family"). None of them runs the model: the engine's pass at x
already has ``A`` and ``G``. ``eigencam`` uses no gradient (``G`` may be None).

Results keep the dtype of ``A`` (float32 or float64; lower precisions are widened to float32) and
its device. ``upsample`` brings a map to the input's (H, W) exactly as Grad-CAM is upsampled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

#: pytorch-grad-cam's epsilons, kept so that the maps equal its classes'.
GRADCAM_PP_EPS = 1e-6
XGRADCAM_EPS = 1e-7


def _wide(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check(a: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if a.dim() != 4:
        raise ValueError(f"activations must be (N, K, h, w), got {tuple(a.shape)}")
    if g is not None and g.shape != a.shape:
        raise ValueError(f"gradients {tuple(g.shape)} do not match activations {tuple(a.shape)}")
    a = _wide(a.detach())
    return a, None if g is None else _wide(g.detach()).to(a.dtype)


def _weighted(a: Tensor, weights: Tensor) -> Tensor:
    """ReLU(sum_k weights[n, k] * A[n, k]): (N, K) weights -> (N, h, w)."""
    return torch.relu((weights[:, :, None, None] * a).sum(dim=1))


def gradcam(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``w_k = mean_hw G_k``, ``ReLU(sum_k w_k A_k)``."""
    a, g = _check(a, g)
    return _weighted(a, g.mean(dim=(2, 3)))


def gradcam_pp(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential's derivatives replaced by
    powers of G, as pytorch-grad-cam computes it):
    ``alpha = G^2 / (2 G^2 + sum_hw(A_k) G^3 + 1e-6)`` (0 where G = 0),
    ``w_k = sum_hw alpha * ReLU(G)``, map ``ReLU(sum_k w_k A_k)``."""
    a, g = _check(a, g)
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + GRADCAM_PP_EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return _weighted(a, (alpha * torch.relu(g)).sum(dim=(2, 3)))


def xgradcam(a: Tensor, g: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): ``w_k = sum_hw G_k A_k / (sum_hw A_k + 1e-7)``,
    map ``ReLU(sum_k w_k A_k)``."""
    a, g = _check(a, g)
    weights = (g * a / (a.sum(dim=(2, 3), keepdim=True) + XGRADCAM_EPS)).sum(dim=(2, 3))
    return _weighted(a, weights)


def layercam(a: Tensor, g: Tensor) -> Tensor:
    """LayerCAM (Jiang et al. 2021): a weight per position, ``ReLU(sum_k ReLU(G_k) * A_k)``."""
    a, g = _check(a, g)
    return torch.relu((torch.relu(g) * a).sum(dim=1))


def eigencam(a: Tensor, g: Tensor | None = None) -> Tensor:
    """EigenCAM (Muhammad and Yeasin 2020), no gradient: the projection of the activations,
    each channel centred over the positions (``X`` (h*w, K)), on their first principal direction
    ``v`` (first right singular vector of ``X``), ``ReLU(X v)`` as (h, w).

    A singular vector's sign is arbitrary (LAPACK returns either), so ours is fixed:
    ``sum_k v_k >= 0``, the direction in which the channels grow together, so the map is high
    where the layer is most active. pytorch-grad-cam keeps whichever sign its SVD returns; up to
    that sign the maps are equal. NaN activations count as 0, as there.
    """
    a, _ = _check(a, None)
    n, k, h, w = a.shape
    x = torch.nan_to_num(a, nan=0.0).reshape(n, k, h * w).transpose(1, 2)  # (N, hw, K)
    x = x - x.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    v = vh[:, 0, :]  # (N, K)
    sign = torch.where(v.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(v.dtype)
    proj = (x @ (v * sign)[:, :, None])[:, :, 0]  # (N, hw)
    return torch.relu(proj).reshape(n, h, w)


#: name -> weighting function (A (N, K, h, w), G (N, K, h, w) or None) -> raw map (N, h, w).
CAMS: dict[str, Callable[..., Tensor]] = {
    "gradcam": gradcam,
    "gradcam_pp": gradcam_pp,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "eigencam": eigencam,
}
#: the members that need no gradient at the layer.
GRADIENT_FREE = frozenset({"eigencam"})
#: The members besides Grad-CAM itself: the engine's methods of those names (``engine.attribute``).
FAMILY = ("gradcam_pp", "xgradcam", "layercam", "eigencam")
#: SmoothGrad and its variants (``engine.attribute``): 2-D maps like saliency, not CAMs; named
#: here, beside the other map methods' names, so the library has one list of them.
SMOOTHGRAD = ("smoothgrad", "smoothgrad_sq", "vargrad")


def upsample(m: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) -> (N, H, W), bilinear with ``align_corners=False``, as Grad-CAM is stored."""
    return F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def cam_map(name: str, a: Tensor, g: Tensor | None, size: tuple[int, int]) -> Tensor:
    """The stored map of CAM method ``name``: its weighting function, upsampled to ``size``."""
    try:
        fn = CAMS[name]
    except KeyError:
        raise ValueError(f"unknown CAM method {name!r}; one of {', '.join(CAMS)}") from None
    if g is None and name not in GRADIENT_FREE:
        raise ValueError(f"{name} needs the gradients at the layer")
    return upsample(fn(a, g), size)
