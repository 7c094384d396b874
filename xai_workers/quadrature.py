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
