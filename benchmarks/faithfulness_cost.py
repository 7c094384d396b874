"""What deletion + insertion cost beside the trio (saliency + IG + Grad-CAM), in one run.

For one model (ResNet-18 at 224 px by default, random weights, eval mode, prepared once as a job
actor does) and a batch of images, round by round after one warm-up round:

- trio: ``xai_workers.attribute`` (saliency, IG with 32 Gauss-Legendre steps from the black
  baseline, Grad-CAM at the default layer, predicted target);
- faithfulness: ``faithfulness.deletion_insertion`` at K = 16 steps on the trio's three 2-D maps
  plus the random order (black baseline for deletion, ``make_baseline(x, "blur")`` for
  insertion): 2 x 4 x 15 + 3 = 123 forward passes per image, batched under the engine's budget;
- loop (``--loop``): the same curves for the first image only, one forward per perturbed image,
  as a per-sample evaluation (Quantus' ``evaluate_batch``, its issue 350) runs them; its time
  per image is compared with the batched one at equal steps.

Quantus itself is not run: ``pip install quantus`` needs scikit-image (a compiled package) and
cachetools, which this project does not install (docs/benchmarks.md).

Prints medians per image and the ratio faithfulness / trio. Run it on a quiet machine:

    python benchmarks/faithfulness_cost.py [--arch resnet18] [--size 224] [--batch 4] \\
        [--ig-steps 32] [--steps 16] [--rounds 3] [--loop] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

from xai_workers import attribute, keep_freed_memory, make_baseline, prepare_model
from xai_workers.faithfulness import deletion_insertion, pixel_ranks, row_key, step_counts
from xai_workers.stats import map_2d

METHODS = ("saliency", "integrated_gradients", "gradcam")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def loop_one_image(net, x, target, maps, baseline, blurred, steps) -> int:
    """The curves of image 0, one forward per perturbed image; returns the forwards run."""
    h, w = x.shape[-2:]
    counts = step_counts(steps, h * w)
    g = torch.Generator().manual_seed(row_key("bench", 0))
    orders = [pixel_ranks(m[0]).reshape(-1) for m in maps.values()]
    perm = torch.randperm(h * w, generator=g)
    rand = torch.empty_like(perm)
    rand[perm] = torch.arange(h * w)
    runs = 0
    with torch.no_grad():
        for ranks in [*orders, rand.to(x.device)]:
            for metric in ("deletion", "insertion"):
                for k in range(steps + 1):
                    mask = (ranks < counts[k]).view(1, 1, h, w)
                    if metric == "deletion":
                        img = torch.where(mask, baseline[:1], x[:1])
                    else:
                        img = torch.where(mask, x[:1], blurred[:1])
                    torch.softmax(net(img), dim=1)[0, target]
                    runs += 1
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--steps", type=int, default=16, help="deletion/insertion steps K")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loop", action="store_true", help="also time a per-image loop (image 0)")
    p.add_argument("--keep-freed-memory", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(0)
    net = prepare_model(getattr(torchvision.models, a.arch)().eval(), device=device)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    base = make_baseline(x, "black")
    blurred = make_baseline(x, "blur")
    keys = [row_key("bench", i) for i in range(a.batch)]
    print(
        f"{a.arch} {a.size}px batch {a.batch}, IG {a.ig_steps} steps, K = {a.steps}; "
        f"{platform.processor() or platform.machine()}, {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    trio_s, faith_s, loop_s = [], [], []
    for r in range(a.rounds + 1):  # round 0 warms up
        t_trio, out = _timed(
            lambda: attribute(net, x, ig_steps=a.ig_steps, baseline=base, methods=METHODS), device
        )
        maps = {m: map_2d(m, out[m]) for m in METHODS}
        t_faith, aucs = _timed(
            lambda maps=maps, out=out: deletion_insertion(
                net, x, out["target"], maps, base, blurred, steps=a.steps, keys=keys
            ),
            device,
        )
        line = f"round {r}: trio {t_trio / a.batch:.3f} s/img, faithfulness {t_faith / a.batch:.3f}"
        if a.loop:
            t_loop, runs = _timed(
                lambda maps=maps, out=out: loop_one_image(
                    net, x, int(out["target"][0]), maps, base, blurred, a.steps
                ),
                device,
            )
            line += f", per-image loop {t_loop:.3f} s/img ({runs} forwards)"
            if r:
                loop_s.append(t_loop)
        print(line + (" (warm-up)" if r == 0 else ""), flush=True)
        if r:
            trio_s.append(t_trio / a.batch)
            faith_s.append(t_faith / a.batch)
    trio, faith = statistics.median(trio_s), statistics.median(faith_s)
    print(f"median: trio {trio:.3f} s/img, deletion+insertion {faith:.3f} s/img, "
          f"ratio {faith / trio:.2f} (adds {100 * faith / trio:.0f}% to the trio)")  # fmt: skip
    if loop_s:
        loop = statistics.median(loop_s)
        print(f"per-image loop {loop:.3f} s/img: batched is {loop / faith:.2f}x faster")
    print("AUCs of image 0:", {k: round(float(v[0]), 4) for k, v in aucs.items()})


if __name__ == "__main__":
    main()
