"""Integrated Gradients path points and weights.

``path_points(n, method)`` returns the points a_k in [0, 1] and the weights w_k of the quadrature
rule, with ``sum(w_k) == 1`` for every rule (docs/conventions.md, "Integrated Gradients").
"""

from __future__ import annotations

import numpy as np

QUADRATURES = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)


def path_points(n: int, method: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """Points ``a`` (n,) float64 in [0, 1], ascending, and weights ``w`` (n,) float64 summing to 1.

    ===================  ==========================  ==================================
    method               a_k                         w_k
    ===================  ==========================  ==================================
    riemann_left         k/n, k = 0..n-1             1/n
    riemann_right        k/n, k = 1..n               1/n
    riemann_middle       (k + 1/2)/n, k = 0..n-1     1/n
    riemann_trapezoid    k/(n-1), k = 0..n-1         1/(n-1), halved at both ends
    gausslegendre        Legendre nodes on [0, 1]    Legendre weights / 2
    ===================  ==========================  ==================================
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"ig_steps must be a positive integer, got {n!r}")
    k = np.arange(n, dtype=np.float64)
    if method == "riemann_left":
        return k / n, np.full(n, 1.0 / n)
    if method == "riemann_right":
        return (k + 1) / n, np.full(n, 1.0 / n)
    if method == "riemann_middle":
        return (k + 0.5) / n, np.full(n, 1.0 / n)
    if method == "riemann_trapezoid":
        if n < 2:
            raise ValueError("riemann_trapezoid needs ig_steps >= 2")
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
        return k / (n - 1), w
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    raise ValueError(f"unknown ig_method {method!r}; choose one of {', '.join(QUADRATURES)}")


# --------------------------------------------------------------------------------------------
# ig_steps="auto": nested trapezoid levels and their Romberg columns
# --------------------------------------------------------------------------------------------

#: The first level at which ``ig_steps="auto"`` may stop: 2^2 + 1 = 5 points.
ADAPTIVE_MIN_LEVEL = 2
ADAPTIVE_MIN_STEPS = 2**ADAPTIVE_MIN_LEVEL + 1
#: The smallest ``ig_max_steps``: the 4 points level 2 adds to the pass at x.
ADAPTIVE_MIN_MAX_STEPS = 2**ADAPTIVE_MIN_LEVEL


def adaptive_max_level(max_steps: int) -> int:
    """The finest level ``max_steps`` allows: the largest k with 2^k <= max_steps.

    Level k has 2^k + 1 points, one of them a = 1, which is the pass at x that saliency and
    Grad-CAM use as well; ``max_steps`` bounds the other 2^k, the gradients IG adds (so the
    default 256 allows 257 points). ValueError below ADAPTIVE_MIN_MAX_STEPS.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
        raise ValueError(f"ig_max_steps must be an integer, got {max_steps!r}")
    if max_steps < ADAPTIVE_MIN_MAX_STEPS:
        raise ValueError(f"ig_max_steps must be >= {ADAPTIVE_MIN_MAX_STEPS}, got {max_steps}")
    return int(max_steps).bit_length() - 1


def level_points(k: int) -> np.ndarray:
    """The points level k adds to the levels before it, float64 ascending: level 0 is
    [0, 1]; level k >= 1 is (2j + 1) / 2^k, j = 0 .. 2^(k-1) - 1. Levels 0..k together are the
    2^k + 1 equally spaced points of [0, 1]."""
    if k == 0:
        return np.array([0.0, 1.0])
    return (2 * np.arange(2 ** (k - 1), dtype=np.float64) + 1) / 2**k


def romberg_row(k: int, t_k, prev=None) -> tuple:
    """Level k's Romberg row (T_k, S_k, B_k) from the trapezoid value T_k and the row of level
    k - 1 (``prev``, None at k = 0): S_k = (4 T_k - T_{k-1}) / 3 (Simpson), B_k = (16 S_k -
    S_{k-1}) / 15 (Boole); S_0 = B_0 = T_0 and B_1 = S_1. Works on anything with + - and
    scalar * (numpy arrays, tensors)."""
    if k == 0:
        return t_k, t_k, t_k
    t_prev, s_prev, _ = prev
    s_k = (4 * t_k - t_prev) / 3
    b_k = s_k if k == 1 else (16 * s_k - s_prev) / 15
    return t_k, s_k, b_k
