"""The fused engine against Captum's three calls, side by side in one run.

For each model (ResNet-18 and ResNet-50 at 224 px by default; any torchvision classifier such as
``vit_b_16``, or ``timm:<name>``; random weights, eval mode) and a batch of 4 images, IG with 32
Gauss-Legendre steps, it times:

- ours: ``xai_workers.attribute`` (saliency + IG + Grad-CAM, predicted target) on a model prepared
  once (``prepare_model``, as the batch job does per actor), NCHW contiguous input;
- captum: on an untouched copy of the same model, the predicted target (one forward), then
  ``Saliency``, ``IntegratedGradients`` (internal_batch_size = the whole batch x steps,
  return_convergence_delta) and ``LayerGradCam`` + bilinear upsampling; once with contiguous NCHW
  inputs (what a DataLoader delivers) and once with channels_last inputs. The Grad-CAM layer is
  ours by default (``hooks.default_gradcam_layer``: ``layer4`` of a ResNet, the last block's first
  LayerNorm of a ViT); for a token layer, which Captum's LayerGradCam cannot read as a grid, the
  reference is pytorch-grad-cam's ``GradCAM`` with the ViT ``reshape_transform`` (its maps are
  min-max scaled, so the reported Grad-CAM error is on min-max scaled maps there).

Runs alternate (ours, captum NCHW, captum channels_last) after one warm-up round; the figures are
medians. It also counts the FLOPs of our call on the original model (torch.utils.flop_counter:
convolutions and matrix multiplies, forward and input-backward), nominal (every path point a
forward + input backward, what Captum runs) and executed (our sweep runs the input layer, forward
and input gradient, once per image instead of once per point), and compares the achieved FLOP/s
with a fp32 matrix multiply measured in the same run. ``--keep-freed-memory`` runs both sides with
``keep_freed_memory()`` (as the batch job's CPU workers do); by default glibc's malloc is left as
it is. Run it on a quiet machine:

    python benchmarks/engine_vs_captum.py [--models resnet18,resnet50,vit_b_16,timm:NAME]
                                          [--rounds 5] [--size 224] [--budget-mb MB]
                                          [--threads N] [--cpu-time]

``timm:vit_small_patch16_224`` and ``timm:convnext_tiny`` are timm's ViT and ConvNeXt (random
weights; timm must be installed). ``--budget-mb`` sets our chunk budget (``batch_budget_mb``;
default the engine's own) to see how the chunk size moves our time.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from captum.attr import IntegratedGradients, LayerGradCam, Saliency
from torch.utils.flop_counter import FlopCounterMode

from xai_workers import attribute, keep_freed_memory, prepare_model
from xai_workers.engine import input_layer
from xai_workers.hooks import default_gradcam_layer, grid_layout, trace_layers

STEPS, METHOD, BATCH, SIZE = 32, "gausslegendre", 4, 224


def _tokens_to_grid(t):
    """pytorch-grad-cam's ViT reshape_transform: drop the class token, (N, D, h, w)."""
    from xai_workers.hooks import as_grid, grid_layout

    return as_grid(t, grid_layout(t.shape))


def captum_three(model, x, layer):
    """Captum's three calls with the predicted target (Grad-CAM on a token layer: pytorch-grad-cam
    with a reshape_transform, min-max scaled); returns the maps."""
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    sal = Saliency(model).attribute(x, target=target, abs=True).amax(dim=1)
    ig, delta = IntegratedGradients(model).attribute(
        x,
        baselines=torch.zeros_like(x),
        target=target,
        n_steps=STEPS,
        method=METHOD,
        internal_batch_size=x.shape[0] * STEPS,
        return_convergence_delta=True,
    )
    if isinstance(layer, tuple):  # a token layer: (module, reshape_transform)
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with GradCAM(model=model, target_layers=[layer[0]], reshape_transform=layer[1]) as cam:
            gc = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in target])
        gc = torch.from_numpy(gc)
    else:
        gc = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
        gc = F.interpolate(gc, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return {"saliency": sal, "integrated_gradients": ig, "gradcam": gc, "ig_delta": delta}


def build(arch: str) -> torch.nn.Module:
    """A torchvision classifier (``vit_b_16``) or ``timm:<name>``, seeded random weights, eval."""
    torch.manual_seed(0)
    if arch.startswith("timm:"):
        import timm

        return timm.create_model(arch[5:], pretrained=False).eval()
    model = torchvision.models.get_model(arch, weights=None).eval()
    for m in model.modules():  # torchvision's ViT head starts at zero: every map would be 0
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)
    return model


def _minmax(m):
    lo = m.amin(dim=(-2, -1), keepdim=True)
    return (m - lo) / (1e-7 + (m - lo).amax(dim=(-2, -1), keepdim=True))


def matmul_rate(n=4096, reps=3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def _timed(fn) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def bench_model(arch: str, rounds: int, size: int = SIZE, budget_mb: float | None = None) -> dict:
    model = build(arch)
    reference = copy.deepcopy(model)  # untouched copy for Captum
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    name = default_gradcam_layer(model, x[:1])
    tokens = grid_layout(dict((i.name, i.output_shape) for i in trace_layers(model, x[:1]))[name])
    tokens = tokens is not None and tokens[0] != "nchw"
    layer = reference.get_submodule(name)
    if tokens:
        layer = (layer, _tokens_to_grid)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    t_prep = _timed(lambda: prepare_model(model))
    net = prepare_model(model)

    kw = dict(ig_steps=STEPS, ig_method=METHOD, gradcam_layer=name, batch_budget_mb=budget_mb)
    ours = attribute(net, x, **kw)
    ref = captum_three(reference, x, layer)
    if tokens:
        ours["gradcam"] = _minmax(ours["gradcam"])
    err = {
        k: ((ours[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)).item()
        for k in ("saliency", "integrated_gradients", "gradcam")
    }
    # FLOPs of one path point (forward + input backward) and of a forward alone, counted on one
    # image of the original model (frozen, so no weight gradients are counted; not the prepared
    # one, whose space-to-depth stem does ~2% more multiply-adds, on zero weights); our call makes
    # BATCH * (STEPS + 1) path points and one forward (the baseline).
    frozen = copy.deepcopy(model).requires_grad_(False)
    with FlopCounterMode(display=False) as fc1:
        with torch.no_grad():
            frozen(x[:1])
    fwd_flops = fc1.get_total_flops()
    xi = x[:1].clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fc2:
        frozen(xi)[0, 0].backward()
    point_flops = fc2.get_total_flops()
    # The sweep runs the input layer once per image, not at its STEPS points (sweep.ig_sweep):
    # per image one forward of L(diff) and one input gradient (+ a forward on a zero probe), and
    # once per call the layer at the baseline and at zero.
    first = input_layer(frozen)
    with FlopCounterMode(display=False) as fc3:
        if first is not None:
            with torch.no_grad():
                frozen.get_submodule(first)(x[:1])
    first_flops = fc3.get_total_flops()  # the layer's forward = its input gradient, per image
    del frozen
    # nominal: what the issue counts, a forward + input backward per path point (Captum's work);
    # executed: the multiply-adds our call really runs (the FLOP/s target is judged on this one)
    flops = BATCH * (STEPS + 1) * point_flops + fwd_flops
    executed = flops - 2 * BATCH * STEPS * first_flops + (3 * BATCH + 2) * first_flops

    times = {"ours": [], "captum_nchw": [], "captum_cl": []}
    rates = []
    for r in range(rounds + 1):
        t_ours = _timed(lambda: attribute(net, x, **kw))
        t_nchw = _timed(lambda: captum_three(reference, x, layer))
        t_cl = _timed(lambda: captum_three(reference, x_cl, layer))
        rates.append(matmul_rate())
        if r == 0:
            continue  # warm-up round
        times["ours"].append(t_ours)
        times["captum_nchw"].append(t_nchw)
        times["captum_cl"].append(t_cl)
        print(
            f"  {arch} round {r}: ours {t_ours / BATCH:.3f} s/img, captum NCHW "
            f"{t_nchw / BATCH:.3f}, captum channels_last {t_cl / BATCH:.3f}",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios_nchw = [c / o for c, o in zip(times["captum_nchw"], times["ours"], strict=True)]
    ratios_cl = [c / o for c, o in zip(times["captum_cl"], times["ours"], strict=True)]
    mm = statistics.median(rates)
    return {
        "arch": arch,
        "gradcam_layer": name + (" (tokens; reference pytorch-grad-cam)" if tokens else ""),
        "per_image": {k: v / BATCH for k, v in med.items()},
        "ratio_nchw": statistics.median(ratios_nchw),
        "ratio_cl": statistics.median(ratios_cl),
        "flops": flops,
        "fwd_flops": fwd_flops,
        "point_flops": point_flops,
        "achieved": flops / med["ours"],
        "executed": executed,
        "achieved_executed": executed / med["ours"],
        "matmul": mm,
        "prepare_s": t_prep,
        "max_rel_err": err,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=SIZE, help="image side (default 224)")
    p.add_argument("--steps", type=int, default=32, help="IG steps (default 32)")
    p.add_argument("--batch", type=int, default=4, help="images per call (default 4)")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="call keep_freed_memory() first, as the job's CPU workers do (it applies to "
        "Captum's calls in this process too)",
    )
    p.add_argument(
        "--budget-mb",
        type=float,
        default=None,
        help="our chunk budget (attribute's batch_budget_mb; default: the engine's)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time instead of the wall clock: with --threads 1, "
        "ratios stay meaningful on a machine other jobs share",
    )
    args = p.parse_args(argv)
    globals().update(STEPS=args.steps, BATCH=args.batch)  # smaller only to check that it runs
    if args.cpu_time:
        globals()["CLOCK"] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; batch {BATCH} x {args.size}px, "
        f"IG {STEPS} {METHOD} steps; "
        f"freed memory kept in the process (both sides): {kept}; our chunk budget: "
        f"{args.budget_mb or 'default'} MB; "
        + ("process CPU time" if args.cpu_time else "wall-clock time")
    )
    for arch in args.models.split(","):
        r = bench_model(arch, args.rounds, args.size, args.budget_mb)
        pi = r["per_image"]
        print(
            f"{arch} (Grad-CAM at {r['gradcam_layer']}): per image ours {pi['ours']:.3f} s "
            f"| captum NCHW {pi['captum_nchw']:.3f} s "
            f"| captum channels_last {pi['captum_cl']:.3f} s\n"
            f"  speed-up vs captum NCHW {r['ratio_nchw']:.2f}x, vs captum channels_last "
            f"{r['ratio_cl']:.2f}x (median of per-round ratios)\n"
            f"  our call: {r['flops'] / 1e9:.1f} GFLOP nominal (a path point "
            f"{r['point_flops'] / 1e9:.2f} GFLOP = {r['point_flops'] / r['fwd_flops']:.2f} x a "
            f"forward) at {r['achieved'] / 1e9:.1f} GFLOP/s = "
            f"{100 * r['achieved'] / r['matmul']:.0f}%; {r['executed'] / 1e9:.1f} GFLOP executed "
            f"at {r['achieved_executed'] / 1e9:.1f} GFLOP/s = "
            f"{100 * r['achieved_executed'] / r['matmul']:.0f}% of "
            f"fp32 matmul ({r['matmul'] / 1e9:.1f} GFLOP/s, 4096^2, same run)\n"
            f"  prepare_model once: {r['prepare_s']:.2f} s; max |ours - captum| / max |captum|: "
            + ", ".join(f"{k} {v:.1e}" for k, v in r["max_rel_err"].items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
