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
- before (``--before REV``): ``deletion_insertion`` of ``xai_workers/faithfulness.py`` as it was
  at git revision REV (e.g. 32838cf, before issue 12's cost work), on the same inputs, so the
  two versions are timed interleaved in one process and compared as a ratio.
- SmoothGrad (``--smoothgrad``): the trio plus ``smoothgrad`` at M = 16 samples (its noisy rows
  run in the IG sweep's chunks), and the trio at ig_steps + 16: issue 12's bound is that
  SmoothGrad adds at most the time of 16 IG steps.
- Quantus (``--quantus``, ``pip install -e .[bench]``): Quantus' ``PixelFlipping`` (deletion;
  its per-step loop ``evaluate_batch``, see ``quantus_deletion``) on the same model (the
  prepared one, fed channels_last as ours is: ``ChannelsLastInput``), images, targets and the
  trio's three maps, with ``features_in_step = C*H*W / K`` so it takes the same K steps, beside
  our deletion alone at K on the same maps (no random order, no insertion). Both replace
  deleted pixels by 0 in input space (Quantus' ``perturb_baseline=0.0``; ours gets a zero
  baseline) and score the target's
  softmax probability, so the curves coincide at k = 1..K (Quantus has no k = 0 point) except
  where pixels tie: Quantus orders the C*H*W features (each pixel's value repeated over its
  channels) by ``np.argsort`` (not stable), ours orders pixels stably by index. Prints both
  times per image, the ratio, and each method's largest curve difference.

- forward limit (always): the chunk sizes the curves forwarded (counted with a forward hook) are
  run again as plain inference, the same prepared model on a channels_last batch of the same
  sizes under ``torch.inference_mode`` and nothing else: the curves' rows per second (all of
  their time, building the perturbed batches, ranking, softmax included) against plain
  inference's, and the ratio (issue 21's bound: >= 0.90). Wall-clock and process CPU time, each
  round interleaved, so the ratio holds on a loaded machine better than either rate.

Prints medians per image and the ratio faithfulness / trio. Run it on a quiet machine:

    python benchmarks/faithfulness_cost.py [--arch resnet18] [--size 224] [--batch 4] \\
        [--ig-steps 32] [--steps 16] [--rounds 3] [--loop] [--keep-freed-memory] \\
        [--before 32838cf] [--smoothgrad] [--quantus]
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import platform
import statistics
import subprocess
import tempfile
import time

import torch
import torchvision

from xai_workers import attribute, keep_freed_memory, make_baseline, prepare_model
from xai_workers.faithfulness import (
    curves,
    deletion_insertion,
    pixel_ranks,
    row_key,
    step_counts,
)
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


def forward_sizes(net, fn) -> tuple[list[int], object]:
    """Run ``fn`` and return the batch sizes ``net`` was called with, and ``fn``'s result."""
    sizes: list[int] = []
    handle = net.register_forward_hook(lambda m, inputs, out: sizes.append(len(inputs[0])))
    try:
        out = fn()
    finally:
        handle.remove()
    return sizes, out


def plain_inference(net, sizes, shape, device) -> None:
    """Forwards of the prepared model alone, at the batch sizes ``sizes``: a channels_last batch
    under ``torch.inference_mode``, the limit the curves' forwards are measured against."""
    xin = torch.randn(max(sizes), *shape, device=device)
    xin = xin.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for s in sizes:
            net(xin[:s])


def module_at(rev: str):
    """``xai_workers/faithfulness.py`` as it was at git revision ``rev``, as a module."""
    root = pathlib.Path(__file__).resolve().parents[1]
    text = subprocess.run(
        ["git", "-C", str(root), "show", f"{rev}:xai_workers/faithfulness.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = pathlib.Path(tempfile.mkdtemp()) / f"faithfulness_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class ChannelsLastInput(torch.nn.Module):
    """``net`` fed a channels_last copy of its input, as ``faithfulness`` feeds it. Quantus hands
    the model plain NCHW tensors, while the prepared model's weights are channels_last: with
    this wrapper both sides run exactly the same forward, so the comparison is of the loops
    around it."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))


def quantus_deletion(net, x, targets, maps, steps, device) -> dict[str, object]:
    """Quantus' PixelFlipping curves (N, K) per method: K steps of C*H*W / K features (a 2-D
    map broadcast over the channels), deleted features set to 0, the target's softmax
    probability after each step. ``PixelFlipping.__call__`` asserts that features_in_step
    divides H*W, which C*H*W / K does not (K = 16 at 224 px), so this runs the metric's own
    per-step loop, ``evaluate_batch``, with Quantus' own model wrapper; what ``__call__`` adds
    (asserts, wrapping, normalising) runs once per call, not per step."""
    import numpy as np
    import quantus
    from quantus.helpers.model.pytorch_model import PyTorchModel

    n, c, h, w = x.shape
    metric = quantus.PixelFlipping(
        features_in_step=c * h * w // steps, perturb_baseline=0.0, normalise=False, abs=False,
        return_aggregate=False, disable_warnings=True, display_progressbar=False,
    )  # fmt: skip
    wrapped = ChannelsLastInput(net).eval()
    model = PyTorchModel(wrapped, channel_first=True, softmax=True, device=str(device))
    xs, ys = x.cpu().numpy(), targets.cpu().numpy()
    out = {}
    for name, m in maps.items():
        a_batch = np.broadcast_to(m[:, None].cpu().numpy(), xs.shape)
        got = metric.evaluate_batch(model=model, x_batch=xs, y_batch=ys, a_batch=a_batch)
        out[name] = np.asarray(got, dtype=np.float64)
    return out


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
    p.add_argument("--before", metavar="REV", help="also time faithfulness.py at git REV")
    p.add_argument("--smoothgrad", action="store_true", help="also trio + SmoothGrad M=16")
    p.add_argument("--quantus", action="store_true", help="also Quantus PixelFlipping")
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
    old = module_at(a.before) if a.before else None
    trio_s, faith_s, loop_s = [], [], []
    limit: list[tuple[float, float, float, float]] = []
    extra: dict[str, list[float]] = {}
    sg_kw = dict(methods=(*METHODS, "smoothgrad"), smoothgrad_samples=16, noise_keys=keys)
    zero = torch.zeros_like(x[:1])
    for r in range(a.rounds + 1):  # round 0 warms up
        t_trio, out = _timed(
            lambda: attribute(net, x, ig_steps=a.ig_steps, baseline=base, methods=METHODS), device
        )
        maps = {m: map_2d(m, out[m]) for m in METHODS}
        c_faith = time.process_time()
        t_faith, (sizes, aucs) = _timed(
            lambda maps=maps, out=out: forward_sizes(
                net,
                lambda: deletion_insertion(
                    net, x, out["target"], maps, base, blurred, steps=a.steps, keys=keys
                ),
            ),
            device,
        )
        c_faith = time.process_time() - c_faith
        c_plain = time.process_time()
        t_plain, _ = _timed(lambda sizes=sizes: plain_inference(net, sizes, x.shape[1:], device),
                            device)  # fmt: skip
        c_plain = time.process_time() - c_plain
        rows = sum(sizes)
        line = f"round {r}: trio {t_trio / a.batch:.3f} s/img, faithfulness {t_faith / a.batch:.3f}"
        line += (
            f", forwards {rows} rows in {len(sizes)} chunks of <= {max(sizes)}: curves "
            f"{rows / t_faith:.1f} img/s, plain inference {rows / t_plain:.1f} img/s, ratio "
            f"{t_plain / t_faith:.3f} (CPU time {c_plain / c_faith:.3f})"
        )
        if r:
            limit.append((rows / t_faith, rows / t_plain, t_plain / t_faith, c_plain / c_faith))
        times = {}
        if old is not None:
            times["faithfulness before"], old_aucs = _timed(
                lambda maps=maps, out=out: old.deletion_insertion(
                    net, x, out["target"], maps, base, blurred, steps=a.steps, keys=keys
                ),
                device,
            )
            assert all(torch.equal(aucs[k].isnan(), old_aucs[k].isnan()) for k in aucs)
        if a.smoothgrad:
            times["trio + smoothgrad M=16"], _ = _timed(
                lambda: attribute(net, x, ig_steps=a.ig_steps, baseline=base, **sg_kw), device
            )
            times[f"trio, IG {a.ig_steps + 16} steps"], _ = _timed(
                lambda: attribute(net, x, ig_steps=a.ig_steps + 16, baseline=base, methods=METHODS),
                device,
            )
        if a.quantus:
            times["ours deletion"], ours = _timed(
                lambda maps=maps, out=out: curves(
                    net, x, out["target"], maps, zero, blurred, steps=a.steps,
                    metrics=("deletion",),
                ),
                device,
            )  # fmt: skip
            times["quantus deletion"], theirs = _timed(
                lambda maps=maps, out=out: quantus_deletion(
                    net, x, out["target"], maps, a.steps, device
                ),
                device,
            )
            diff = {
                m: float(
                    (ours[(m, "deletion")][:, 1:].cpu() - torch.as_tensor(theirs[m])).abs().max()
                )
                for m in METHODS
            }
            line += f", curves max |ours - quantus| {diff}"
        for k, t in times.items():
            line += f", {k} {t / a.batch:.3f}"
            if r:
                extra.setdefault(k, []).append(t / a.batch)
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
    curve_rate, plain_rate, ratio, cpu_ratio = (
        statistics.median(v) for v in zip(*limit, strict=True)
    )
    print(f"forward limit (medians over rounds, each taken alone): plain inference "
          f"{plain_rate:.1f} img/s, curves' forwards {curve_rate:.1f} img/s; ratio of each "
          f"round's times {ratio:.3f}, of its process CPU times {cpu_ratio:.3f} "
          "(bound: >= 0.90)")  # fmt: skip
    if loop_s:
        loop = statistics.median(loop_s)
        print(f"per-image loop {loop:.3f} s/img: batched is {loop / faith:.2f}x faster")
    med = {k: statistics.median(v) for k, v in extra.items()}
    for k, v in med.items():
        print(f"median {k} {v:.3f} s/img")
    if "faithfulness before" in med:
        print(f"faithfulness before / now: {med['faithfulness before'] / faith:.3f}")
    if a.smoothgrad:
        sg = med["trio + smoothgrad M=16"] - trio
        ig16 = med[f"trio, IG {a.ig_steps + 16} steps"] - trio
        print(f"SmoothGrad M=16 adds {sg:.3f} s/img; 16 IG steps add {ig16:.3f} s/img: "
              f"ratio {sg / ig16:.2f} (bound: <= 1)")  # fmt: skip
    if a.quantus:
        q, o = med["quantus deletion"], med["ours deletion"]
        print(f"deletion at K = {a.steps}, 3 maps: ours {o:.3f} s/img, Quantus {q:.3f} s/img: "
              f"ours {q / o:.2f}x faster (bound: >= 2)")  # fmt: skip
    print("AUCs of image 0:", {k: round(float(v[0]), 4) for k, v in aucs.items()})


if __name__ == "__main__":
    main()
