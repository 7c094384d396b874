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
# ig_steps="auto": nested Clenshaw-Curtis levels
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


def cc_points(k: int) -> np.ndarray:
    """The 2^k + 1 Clenshaw-Curtis points of level k on [0, 1], float64 ascending:
    a_i = (1 - cos(pi i / 2^k)) / 2, i = 0 .. 2^k (the Chebyshev extrema). Level k's points are
    every other point of level k + 1, so levels nest."""
    return 0.5 * (1.0 - np.cos(np.pi * np.arange(2**k + 1) / 2**k))


def cc_weights(k: int) -> np.ndarray:
    """The Clenshaw-Curtis weights (2^k + 1,) float64 of ``cc_points(k)``, summing to 1: the
    integral on [0, 1] of the polynomial interpolating the points (exact for degree <= 2^k,
    and 2^k + 1 when 2^k is even). Level 0 is the trapezoid (1/2, 1/2). They are positive, and
    the weight of a point changes from level to level (unlike the trapezoid's)."""
    m = 2**k
    theta = np.pi * np.arange(m + 1) / m
    j = np.arange(1, m // 2 + 1)
    b = np.where(2 * j == m, 1.0, 2.0)
    s = (b / (4 * j * j - 1) * np.cos(2 * np.outer(theta, j))).sum(axis=1)
    c = np.where((np.arange(m + 1) == 0) | (np.arange(m + 1) == m), 1.0, 2.0)
    return c / m * (1.0 - s) / 2


def cc_level_index(k: int, finest: int) -> np.ndarray:
    """The points level k adds, as indices i of ``cc_points(finest)`` (k <= finest), ascending:
    level 0 adds i = 0 and 2^finest (a = 0 and a = 1); level k >= 1 the odd multiples of
    2^(finest - k). Levels 0..k together are every 2^(finest - k)-th point."""
    if k == 0:
        return np.array([0, 2**finest])
    return (2 * np.arange(2 ** (k - 1)) + 1) * 2 ** (finest - k)


def cc_weight_table(finest: int) -> np.ndarray:
    """W (finest + 1, 2^finest + 1) float64: W[k, i] is the weight of point i of
    ``cc_points(finest)`` in the level-k rule, 0 where level k does not hold it. The level-k
    Clenshaw-Curtis value of gradients g_i is sum_i W[k, i] g_i."""
    table = np.zeros((finest + 1, 2**finest + 1))
    for k in range(finest + 1):
        table[k, :: 2 ** (finest - k)] = cc_weights(k)
    return table
