"""Which nested quadrature rule and error estimate for adaptive Integrated Gradients (issue 11).

Offline study: for each image the input gradient is computed (float32) at every point of the
finest dyadic grid (2^K + 1 points on [0, 1]) and of the Clenshaw-Curtis rules, so every rule at
every level is a weighted sum of stored gradients; adaptivity is then simulated per image. The
reference is a 512-point Gauss-Legendre IG in float64. True error = relative L2 distance of the
IG map (C, H, W) to the reference.

Nets: the project's demo CNN (``xai_workers.demo.DemoNet``, 4 conv-BN blocks) with ReLU, and the
same net with SiLU, each trained here for a few epochs on the demo digits (32 px); the images are
held-out digits, the baseline black, the target the predicted class.

Rules (all nested: a level reuses every gradient of the level before):
- ``T``: trapezoid on 2^k + 1 equally spaced points; ``S``: Simpson = Richardson of T (same
  points); ``R``: Romberg/Boole = Richardson of S; ``CC``: Clenshaw-Curtis on 2^k + 1 points.
Estimate at level k: ||Q_k - Q_{k-1}|| / ||Q_k|| on the IG maps (relative L2), optionally
maxed with the relative completeness error |sum(IG) - (F(x) - F(x'))| / |F(x) - F(x')|.

    python benchmarks/ig_rules.py [--images 32] [--kmax 8] [--epochs 8]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xai_workers.demo import DemoNet, demo_images, demo_preprocess, is_held_out


def train_net(act: str, epochs: int, seed: int = 0) -> nn.Module:
    """A DemoNet with ``act`` ("relu", "silu" or "gelu") trained on the non-held-out digits."""
    images, labels = demo_images()
    keep = ~is_held_out(np.arange(len(labels)))
    x, y = demo_preprocess(images[keep]), torch.as_tensor(labels[keep])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DemoNet()
        if act in ("silu", "gelu"):
            for name, m in list(net.named_modules()):
                if isinstance(m, nn.ReLU):
                    net.set_submodule(name, nn.SiLU() if act == "silu" else nn.GELU())
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        steps = epochs * ((len(x) + 63) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                b = order[i : i + 64]
                loss = F.cross_entropy(net(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def eval_images(n: int, seed: int = 1) -> torch.Tensor:
    """``n`` held-out demo images (N, 3, 32, 32) float32 in input space."""
    images, labels = demo_images()
    idx = np.flatnonzero(is_held_out(np.arange(len(labels))))
    pick = np.random.default_rng(seed).choice(idx, size=n, replace=False)
    return demo_preprocess(images[np.sort(pick)])


def path_grads(net, x, base, target, alphas, chunk=512):
    """Input gradients (P, C, H, W) and target scores (P,) at x' + a (x - x') for every a."""
    a = torch.as_tensor(alphas, dtype=x.dtype)
    gs, ss = [], []
    for i in range(0, len(a), chunk):
        al = a[i : i + chunk].view(-1, 1, 1, 1)
        inp = (base + al * (x - base)).requires_grad_(True)
        s = net(inp)[:, target]
        (g,) = torch.autograd.grad(s.sum(), inp)
        gs.append(g.detach())
        ss.append(s.detach())
    return torch.cat(gs), torch.cat(ss)


def cc_rule(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Clenshaw-Curtis points (ascending on [0, 1]) and weights (sum 1) with n = 2^k + 1 points."""
    m = n - 1
    theta = np.pi * np.arange(n) / m
    w = np.zeros(n)
    for j in range(n):
        s = 0.0
        for k in range(1, m // 2 + 1):
            b = 1.0 if 2 * k == m else 2.0
            s += b / (4 * k * k - 1) * np.cos(2 * k * theta[j])
        c = 1.0 if j in (0, m) else 2.0
        w[j] = c / m * (1 - s)
    pts = 0.5 * (1 - np.cos(theta))
    return pts, w / 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def study_image(net, net64, x, base, kmax):
    """Per-level IG maps of every rule, estimates and true errors for one image."""
    with torch.no_grad():
        target = int(net(x).argmax())
    diff = (x - base)[0]
    # float64 reference: GL 512
    nodes, wts = np.polynomial.legendre.leggauss(512)
    g64, _ = path_grads(net64, x.double(), base.double(), target, 0.5 * (nodes + 1), chunk=256)
    ref = diff.double() * torch.einsum("p,pchw->chw", torch.as_tensor(0.5 * wts), g64)
    n = 2**kmax + 1
    grid = np.arange(n) / (n - 1)
    g, s = path_grads(net, x, base, target, grid)
    g = g.double()
    gap = float(s[-1] - s[0])
    out = {"gap": gap, "ref_norm": float(ref.norm())}
    levels = {}
    for k in range(0, kmax + 1):
        step = 2 ** (kmax - k)
        gk = g[::step]
        w = np.full(len(gk), 1.0 / (len(gk) - 1))
        w[0] = w[-1] = 0.5 / (len(gk) - 1)
        levels.setdefault("T", []).append(
            diff * torch.einsum("p,pchw->chw", torch.as_tensor(w), gk)
        )
    T = levels["T"]
    levels["S"] = [T[0]] + [(4 * T[k] - T[k - 1]) / 3 for k in range(1, len(T))]
    S = levels["S"]
    levels["R"] = [T[0], S[1]] + [(16 * S[k] - S[k - 1]) / 15 for k in range(2, len(S))]
    cc = []
    for k in range(0, min(kmax, 7) + 1):
        pts, w = cc_rule(2**k + 1) if k > 0 else (np.array([0.0, 1.0]), np.array([0.5, 0.5]))
        gk, _ = path_grads(net, x, base, target, pts)
        cc.append(diff * torch.einsum("p,pchw->chw", torch.as_tensor(w), gk.double()))
    levels["CC"] = cc
    for name, qs in levels.items():
        rows = []
        for k, q in enumerate(qs):
            d = float((q - qs[k - 1]).norm()) if k else float("inf")
            est = d / max(float(q.norm()), 1e-30)
            compl = abs(float(q.sum()) - gap) / max(float(q.abs().sum()), 1e-30)
            row = {"k": k, "n": 2**k + 1, "true": rel(q, ref), "est": est, "compl": compl, "d": d}
            row["rate"] = rate_estimate(rows + [row]) if k >= 3 else est
            rows.append(row)
        out[name] = rows
    # fixed Gauss-Legendre n = 4..256 for comparison (float32)
    gl = {}
    for m in (4, 8, 16, 32, 64, 128, 256):
        nd, wt = np.polynomial.legendre.leggauss(m)
        gm, _ = path_grads(net, x, base, target, 0.5 * (nd + 1))
        q = diff * torch.einsum("p,pchw->chw", torch.as_tensor(0.5 * wt), gm.double())
        gl[m] = rel(q, ref)
    out["GL"] = gl
    return out


def rate_estimate(rows) -> float:
    """Richardson with the observed rate: d_k * phi(rho), rho = max of the last two ratios of
    successive level differences, phi(rho) = rho / (1 - rho) below 1/2, else 1; relative."""
    d = [r["d"] for r in rows[-3:]]
    rho = max(d[2] / max(d[1], 1e-30), d[1] / max(d[0], 1e-30))
    phi = rho / (1 - rho) if rho < 0.5 else 1.0
    return rows[-1]["est"] * phi


def engine_rows(im, safety=2.0):
    """Per level, what ``xai_workers.engine`` does: per column (T, S, B) the relative level
    difference times ``_rate_factor`` (from level 3), maxed with the completeness error; the
    column with the smallest estimate."""
    floors = {"T": 1 / 4, "S": 1 / 16, "R": 1 / 64}
    out = []
    for k in range(len(im["T"])):
        cands = []
        for c in ("T", "S", "R"):
            r = dict(im[c][k])
            e = r["est"]
            if k >= 3:
                d = [im[c][j]["d"] for j in (k - 2, k - 1, k)]
                rho = max(d[2] / max(d[1], 1e-30), d[1] / max(d[0], 1e-30), floors[c])
                rho = min(rho, 0.5)
                e *= min(1.0, safety * rho / (1 - rho))
            r["engine"] = max(e, r["compl"])
            cands.append(r)
        out.append(min(cands, key=lambda r: r["engine"]))
    return out


def best_rows(im):
    """Per level, the row of the column (T, S, R) with the smallest rate estimate."""
    return [
        min((im[c][k] for c in ("T", "S", "R")), key=lambda r: r["rate"])
        for k in range(len(im["T"]))
    ]


def simulate(per_image, rule, tol, kmin, kcap, use_compl, scale=1.0, estimate="est"):
    """Adaptive run of ``rule``: stop at the first level k >= kmin whose estimate <= tol."""
    evals, trues, conv = [], [], []
    for im in per_image:
        rows = {"best": best_rows, "engine": engine_rows}.get(rule, lambda im: im[rule])(im)
        last = min(kcap, len(rows) - 1)
        for r in rows[kmin : last + 1]:
            e = scale * r[estimate]
            if use_compl:
                e = max(e, r["compl"])
            if e <= tol or r["k"] == last:
                evals.append(r["n"])
                trues.append(r["true"])
                conv.append(e <= tol)
                break
    t = np.array(trues)
    return {
        "converged": float(np.mean(conv)),
        "true_p50": float(np.median(t)),
        "true_p95": float(np.quantile(t, 0.95)),
        "evals": float(np.mean(evals)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--kmax", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--save", help="pickle the per-image results to SAVE.<net>.pkl")
    ap.add_argument("--load", help="only the adaptive tables, from LOAD.<net>.pkl (of --save)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.load:
        import pickle

        for act in ("relu", "silu"):
            with open(f"{args.load}.{act}.pkl", "rb") as f:
                per = pickle.load(f)
            print(f"\n## {act} net ({len(per)} images, loaded)")
            report_adaptive(per, rules=("engine",), estimates=("engine",))
        return
    xs = eval_images(args.images)
    base = demo_preprocess(np.zeros((1, 32, 32, 3), np.uint8))
    for act in ("relu", "silu"):
        t0 = time.perf_counter()
        net = train_net(act, args.epochs)
        import copy

        net64 = copy.deepcopy(net).double()
        per = [study_image(net, net64, xs[i : i + 1], base, args.kmax) for i in range(len(xs))]
        if args.save:
            import pickle

            with open(f"{args.save}.{act}.pkl", "wb") as f:
                pickle.dump(per, f)
        print(f"\n## {act} net ({len(xs)} images, {time.perf_counter() - t0:.0f} s)")
        gl = {m: [im["GL"][m] for im in per] for m in per[0]["GL"]}
        print(
            "fixed GL n: true p50 / p95: "
            + "; ".join(
                f"{m}: {np.median(v):.4f}/{np.quantile(v, 0.95):.4f}" for m, v in gl.items()
            )
        )
        for rule in ("T", "S", "R", "CC"):
            ks = len(per[0][rule])
            line = []
            for k in range(1, ks):
                tr = np.array([im[rule][k]["true"] for im in per])
                es = np.array([im[rule][k]["est"] for im in per])
                ra = tr / np.maximum([im[rule][k]["rate"] for im in per], 1e-30)
                co = np.array([im[rule][k]["compl"] for im in per])
                ratio = tr / np.maximum(es, 1e-30)
                line.append(
                    f"  n={2**k + 1:3d} true p50 {np.median(tr):.4f}"
                    f" p95 {np.quantile(tr, 0.95):.4f}"
                    f" | est p50 {np.median(es):.4f} | true/est p50 {np.median(ratio):.2f}"
                    f" p95 {np.quantile(ratio, 0.95):.2f} max {ratio.max():.2f}"
                    f" | compl p50 {np.median(co):.4f} | true/rate p95 {np.quantile(ra, 0.95):.2f}"
                    f" max {ra.max():.2f}"
                )
            print(f"rule {rule}:\n" + "\n".join(line))
        report_adaptive(per)


def report_adaptive(per, rules=("T", "S", "R", "CC", "best", "engine"), estimates=("est", "rate")):
    print(
        "adaptive (tol, rule, estimate, kmin, completeness): converged, true p50/p95, "
        "mean evals; kcap = 8 (257 points)"
    )
    for tol in (0.04, 0.02, 0.01):
        for rule in rules:
            for est in ("engine",) if rule == "engine" else estimates:
                for kmin in (2, 3):
                    if rule == "CC" and est == "rate":
                        continue
                    for use_c in (False, True):
                        r = simulate(per, rule, tol, kmin, 8, use_c, estimate=est)
                        print(
                            f"  tol {tol:.2f} {rule:6s} {est:6s} kmin {kmin} compl "
                            f"{int(use_c)}: conv {r['converged']:.2f} true "
                            f"{r['true_p50']:.4f}/{r['true_p95']:.4f} evals {r['evals']:.1f}"
                        )


if __name__ == "__main__":
    main()
