"""Feature visualization: a batch of channel objectives against one objective at a time, and the
activation reached against an independent one-at-a-time implementation of Lucid's defaults.

Model: torchvision ResNet-18, random weights (seeded), eval mode, frozen, channels_last weights
as the job's actors hold them (``--nchw``: not), shared by all variants; objectives
``channel:layer4:K``. Settings: ``--size`` px (128), FFT parameterisation with colour
decorrelation, the ``lucid`` transforms, Adam at lr 0.05.

1. Speed (``--steps`` steps; the cost of a step does not change with the step count, so a short
   run measures the rate of a long one). Objectives per second of

   - **batched**: ``xai_workers.visualize`` on ``--batch`` objectives in one batch;
   - **ours, one at a time**: the same call on one objective, in a plain loop over
     ``--loop-objectives`` of them;
   - **Lucid loop**: ``lucid_one`` below (an independent re-implementation of Lucid's
     ``render_vis`` defaults: one image, its transforms applied one after another as Lucid does,
     the crops shrinking the image), in a plain loop over ``--loop-objectives`` objectives.

   Rounds alternate the three; medians over ``--rounds``. The ratios are what the issue asks
   for (>= 8x for batched against one at a time at 128 px on ResNet-18).

2. Activation (``--compare N``, 0 to skip): ``N`` channels (0..N-1) optimised for
   ``--compare-steps`` (512) steps by ours (one batch) and by ``lucid_one`` (one at a time, the
   same seed family: seed k for channel k); each final image's channel mean at ``layer4``,
   computed the same way for both on the untransformed image. Reports the medians (the issue:
   ours >= Lucid's) and every channel's value. ``--compare-which ours|lucid`` runs one side, so
   the two can run in two processes at once (the activations do not depend on timing).

    PYTHONPATH=. python benchmarks/visualize_batched.py [--size 128] [--steps 16] [--batch 64]
        [--loop-objectives 4] [--rounds 2] [--compare 32] [--compare-steps 512] [--threads N]
        [--compare-which both|ours|lucid] [--compare-start 0] [--compare-batch 0]

The machine may be shared: the figures are only as quiet as it is.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

# the module (the package's attribute xai_workers.visualize is the function)
V = importlib.import_module("xai_workers.visualize")


def resnet18(seed: int = 0) -> torch.nn.Module:
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.resnet18(weights=None).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# ---- an independent, one-at-a-time implementation of Lucid's defaults ------------------------


def lucid_one(net, layer: str, channel: int, steps: int, size: int, seed: int) -> torch.Tensor:
    """One channel objective as Lucid's ``render_vis`` with its defaults: FFT image (sd 0.01,
    decay power 1, /4), decorrelated colour, sigmoid; ``standard_transforms`` one after another
    (pad 12 with 0.5, jitter 8 as a random crop of side - 8, scale by resizing to
    ``int(s * side)``, rotate (bilinear, fill 0.5), jitter 4), ImageNet
    normalisation, Adam lr 0.05. Randomness: ``torch.manual_seed(seed)`` for the spectrum and
    ``numpy.random.RandomState(seed)`` for the transforms. Returns the final image (3, S, S)."""
    from torchvision.transforms.functional import InterpolationMode, rotate

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.RandomState(seed)
    h = w = size
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[: w // 2 + 1]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = torch.tensor(1.0 / np.maximum(freqs, 1.0 / max(w, h)), dtype=torch.float32)
    spectrum = (torch.randn(1, 3, *freqs.shape, 2, generator=gen) * 0.01).requires_grad_(True)
    color = torch.tensor(V.COLOR_CORRELATION, dtype=torch.float32)
    mean = torch.tensor(V.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(V.IMAGENET_STD).view(1, 3, 1, 1)

    def image():
        spec = torch.view_as_complex(scale[None, None, ..., None] * spectrum)
        t = torch.fft.irfftn(spec, s=(h, w), norm="ortho") / 4.0
        t = torch.einsum("nchw,dc->ndhw", t, color)
        return torch.sigmoid(t)

    def jitter(t, d):  # Lucid's jitter: tf.image.random_crop to (side - d), offsets 0..d
        dx, dy = rng.randint(0, d + 1), rng.randint(0, d + 1)
        h, w = t.shape[2:]
        return t[:, :, dy : dy + h - d, dx : dx + w - d]

    def transforms(t):
        t = F.pad(t, [12] * 4, mode="constant", value=0.5)
        t = jitter(t, 8)
        s = rng.choice([1 + (i - 5) / 50.0 for i in range(11)])
        # Lucid's random_scale: resize to int(s * side) (bilinear)
        t = F.interpolate(t, size=[int(s * d + 1e-9) for d in t.shape[2:]], mode="bilinear",
                          align_corners=False)  # fmt: skip
        angle = float(rng.choice(list(range(-10, 11)) + 5 * [0]))
        t = rotate(t, angle, interpolation=InterpolationMode.BILINEAR, fill=[0.5, 0.5, 0.5])
        return jitter(t, 4)

    store = {}
    handle = net.get_submodule(layer).register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        opt = torch.optim.Adam([spectrum], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            net((transforms(image()) - mean) / std)
            loss = -store["a"][0, channel].mean()
            loss.backward()
            opt.step()
    finally:
        handle.remove()
    return image().detach()[0]


def channel_means(net, layer: str, images: torch.Tensor, channels) -> np.ndarray:
    """Channel k's mean activation at ``layer`` on image k (untransformed, normalised)."""
    store = {}
    handle = net.get_submodule(layer).register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        with torch.no_grad():
            m = torch.tensor(V.IMAGENET_MEAN).view(1, 3, 1, 1)
            s = torch.tensor(V.IMAGENET_STD).view(1, 3, 1, 1)
            net((images - m) / s)
    finally:
        handle.remove()
    a = store["a"]
    return np.array([a[i, k].mean().item() for i, k in enumerate(channels)])


# ---- measurements ----------------------------------------------------------------------------


def speed(net, args) -> dict:
    objs = [f"channel:layer4:{k}" for k in range(args.batch)]
    kw = dict(steps=args.steps, size=args.size)
    rates = {"batched": [], "ours_one_at_a_time": [], "lucid_loop": []}
    V.visualize(net, objs[:2], steps=2, size=args.size)  # warm-up
    for r in range(args.rounds):
        t0 = time.perf_counter()
        V.visualize(net, objs, **kw)
        rates["batched"].append(len(objs) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for o in objs[: args.loop_objectives]:
            V.visualize(net, [o], **kw)
        rates["ours_one_at_a_time"].append(args.loop_objectives / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for k in range(args.loop_objectives):
            lucid_one(net, "layer4", k, args.steps, args.size, seed=k)
        rates["lucid_loop"].append(args.loop_objectives / (time.perf_counter() - t0))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.4f} obj/s" for k, v in rates.items()),
              flush=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        **{f"{k}_obj_per_s": v for k, v in med.items()},
        "batched_vs_ours_one": med["batched"] / med["ours_one_at_a_time"],
        "batched_vs_lucid_loop": med["batched"] / med["lucid_loop"],
    }


def compare(net, args) -> dict:
    chans = list(range(args.compare_start, args.compare_start + args.compare))
    out: dict = {"channels": len(chans), "steps": args.compare_steps}
    acts = {}
    if args.compare_which in ("both", "ours"):
        t0 = time.perf_counter()
        images, reported = [], []
        bs = args.compare_batch or len(chans)
        for i in range(0, len(chans), bs):  # batches of --compare-batch, printed as they complete
            part = V.visualize(net, [f"channel:layer4:{k}" for k in chans[i : i + bs]],
                               steps=args.compare_steps, size=args.size)  # fmt: skip
            images.append(part["images"])
            reported.append(part["activation"])
            print(f"ours channels {chans[i]}-{chans[min(i + bs, len(chans)) - 1]}: "
                  f"{np.round(part['activation'].numpy(), 4).tolist()} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        out["ours_s"] = round(time.perf_counter() - t0, 1)
        acts["ours"] = channel_means(net, "layer4", torch.cat(images), chans)
        out["ours_reported_median"] = float(np.median(torch.cat(reported).numpy()))
    if args.compare_which in ("both", "lucid"):
        t0 = time.perf_counter()
        ref = []
        for k in chans:  # one at a time; each channel's value printed as it completes
            ref.append(lucid_one(net, "layer4", k, args.compare_steps, args.size, seed=k))
            a = channel_means(net, "layer4", ref[-1][None], [k])[0]
            print(f"lucid channel {k}: {a:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        ref = torch.stack(ref)
        out["lucid_s"] = round(time.perf_counter() - t0, 1)
        acts["lucid"] = channel_means(net, "layer4", ref, chans)
    for k, a in acts.items():
        out[f"{k}_median_activation"] = float(np.median(a))
        out[f"{k}_activations"] = np.round(a, 4).tolist()
    if len(acts) == 2:
        out["ours_ge_lucid_channels"] = int((acts["ours"] >= acts["lucid"]).sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--loop-objectives", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compare", type=int, default=32)
    p.add_argument("--compare-steps", type=int, default=512)
    p.add_argument("--compare-start", type=int, default=0, help="first channel compared")
    p.add_argument(
        "--compare-batch",
        type=int,
        default=0,
        help="objectives per visualize call in the comparison (0: all in one)",
    )
    p.add_argument(
        "--compare-which",
        choices=("both", "ours", "lucid"),
        default="both",
        help="run one side of the activation comparison (two processes in parallel)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--nchw",
        action="store_true",
        help="keep the weights NCHW (default: "
        "channels_last, as the job's actors; all three variants share the model)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    net = resnet18()
    if not args.nchw:  # as the job's actors hold it (changes no value)
        net = net.to(memory_format=torch.channels_last)
    if args.rounds:
        for k, v in speed(net, args).items():
            print(f"{k}: {v:.4f}", flush=True)
    if args.compare:
        for k, v in compare(net, args).items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
