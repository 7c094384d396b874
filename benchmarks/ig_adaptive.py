"""Adaptive Integrated Gradients (``ig_steps="auto"``) against fixed steps and Captum (issue 11).

For a trained ReLU CNN and a trained SiLU CNN (the demo net, 32 px, trained here in a few
seconds: ``ig_rules.train_net``) and held-out demo digits (black baseline, predicted target):

- reference: Gauss-Legendre with 512 points in float64, per image;
- ``attribute(ig_steps="auto", ig_tol=t)`` for t = 4%, 2%, 1%;
- ``attribute(ig_steps=n)`` (Gauss-Legendre) for n = 4 ... 256;
- Captum ``IntegratedGradients`` at its default 50 steps (Gauss-Legendre).

Per setting: share of rows converged (auto only), true error (relative L2 distance of the IG map
to the reference) median and p95, mean gradient evaluations per row (auto: ``ig_steps``, a = 1
included; fixed: n), and time per image (IG only, all images in one call, median of rounds).
Below each table, per tolerance: the oracle fixed n (the smallest n of 4, 8, ..., 256 whose p95
true error is <= the tolerance) and auto's mean evaluations / that n (issue 21's target: <= 1.25
on smooth nets). Prints Markdown. Run it on a quiet machine:

    python benchmarks/ig_adaptive.py [--images 64] [--rounds 3] [--threads 2]
        [--nets relu,silu,gelu] [--timm vit_tiny_patch16_224,convnext_atto --size 64]

``--timm``: timm models with random weights (seeded) at ``--size`` px, the same held-out digits
upsampled, reference Gauss-Legendre ``--timm-ref`` points (default 128: a smooth net).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ig_rules import eval_images, train_net  # noqa: E402

from xai_workers import attribute, prepare_model  # noqa: E402
from xai_workers.demo import demo_preprocess  # noqa: E402

IG = ("integrated_gradients",)


def reference(net, x, base, target, n=512) -> torch.Tensor:
    """Gauss-Legendre IG with n points in float64, (N, C, H, W)."""
    import copy

    net64 = copy.deepcopy(net).double()
    ref = IntegratedGradients(net64).attribute(
        x.double(), baselines=base.double().expand_as(x), target=target, n_steps=n,
        internal_batch_size=256,
    )  # fmt: skip
    return ref


def rel(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).numpy()


def timed(fn, rounds: int):
    out, times = None, []
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def bench(net, x, base, args, ref_steps=512) -> list[dict]:
    prepared = prepare_model(net)
    with torch.no_grad():
        target = net(x).argmax(dim=1)
    ref = reference(net, x, base, target, ref_steps)
    n = len(x)
    rows = []
    for tol in (0.04, 0.02, 0.01):
        out, t = timed(
            lambda tol=tol: attribute(
                prepared, x, target=target, methods=IG, baseline=base, ig_steps="auto", ig_tol=tol
            ),
            args.rounds,
        )
        err = rel(out["integrated_gradients"], ref)
        rows.append(
            dict(
                setting=f"auto, tol {tol:.0%}",
                converged=float(out["ig_converged"].float().mean()),
                p50=np.median(err),
                p95=np.quantile(err, 0.95),
                evals=float(out["ig_steps"].float().mean()),
                ms=1e3 * t / n,
            )
        )
    for steps in (4, 8, 16, 32, 64, 128, 256):
        out, t = timed(
            lambda s=steps: attribute(
                prepared, x, target=target, methods=IG, baseline=base, ig_steps=s
            ),
            args.rounds,
        )
        err = rel(out["integrated_gradients"], ref)
        rows.append(
            dict(setting=f"fixed GL n={steps}", converged=None, p50=np.median(err),
                 p95=np.quantile(err, 0.95), evals=float(steps), ms=1e3 * t / n)
        )  # fmt: skip
    ig = IntegratedGradients(net)
    out, t = timed(
        lambda: ig.attribute(x, baselines=base.expand_as(x), target=target, n_steps=50),
        args.rounds,
    )
    err = rel(out, ref)
    rows.append(
        dict(setting="Captum, 50 steps", converged=None, p50=np.median(err),
             p95=np.quantile(err, 0.95), evals=50.0, ms=1e3 * t / n)
    )  # fmt: skip
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--nets", default="relu,silu,gelu", help="demo CNNs: relu, silu, gelu")
    ap.add_argument("--timm", default="", help="timm models, random weights")
    ap.add_argument("--size", type=int, default=64, help="input size of the timm models")
    ap.add_argument("--timm-ref", type=int, default=128, help="reference GL points (timm)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = eval_images(args.images)
    base = demo_preprocess(np.zeros((1, 32, 32, 3), np.uint8))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(x)} images, "
        f"{args.rounds} rounds (median)"
    )
    nets = [(f"{a.upper()} demo CNN (32 px)", lambda a=a: train_net(a, args.epochs), x, 512)
            for a in args.nets.split(",") if a]  # fmt: skip
    for name in [m for m in args.timm.split(",") if m]:
        xs = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False)
        nets.append((f"timm {name}, random weights ({args.size} px)",
                     lambda name=name: timm_net(name, args.size), xs, args.timm_ref))  # fmt: skip
    for title, make, xs, ref_steps in nets:
        bs = F.interpolate(base, size=xs.shape[-2:]) if xs.shape[-1] != base.shape[-1] else base
        rows = bench(make(), xs, bs, args, ref_steps)
        print(f"\n### {title}\n")
        print("| setting | converged | true error p50 | p95 | evaluations / row | ms / image |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            conv = "" if r["converged"] is None else f"{r['converged']:.0%}"
            print(
                f"| {r['setting']} | {conv} | {r['p50']:.3%} | {r['p95']:.3%} | "
                f"{r['evals']:.1f} | {r['ms']:.1f} |"
            )
        print()
        for tol in (0.04, 0.02, 0.01):
            auto = next(r for r in rows if r["setting"] == f"auto, tol {tol:.0%}")
            fixed = [r for r in rows if r["setting"].startswith("fixed") and r["p95"] <= tol]
            if fixed:
                n = min(r["evals"] for r in fixed)
                print(f"- tol {tol:.0%}: oracle fixed n = {n:.0f}; auto / oracle = "
                      f"{auto['evals'] / n:.2f}")  # fmt: skip
            else:
                print(f"- tol {tol:.0%}: no fixed n up to 256 reaches it")


def timm_net(name: str, size: int) -> torch.nn.Module:
    """A timm model with seeded random weights for ``size`` px inputs, in eval mode."""
    import timm

    torch.manual_seed(0)
    kw = {"img_size": size} if "vit" in name else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()


if __name__ == "__main__":
    main()
