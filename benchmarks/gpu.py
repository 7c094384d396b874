"""The GPU measurement in one command: the trio in fp32 and bf16, bf16's fp32 fallbacks and its
map error, peak memory, JPEG decoding, and the whole job on one GPU (issue 21, item 3).

    python benchmarks/gpu.py            # ResNet-50 and ViT-B/16 at 224 px, 32 IG steps
    python benchmarks/gpu.py --smoke    # tiny models at 32 px, a few rows: any CPU, ~1 min

Weights are random (nothing is downloaded): speed and memory do not depend on them; the bf16
figures (rows sent back, map error) do, so they describe random-weight nets, not trained ones.

For each model (prepared once, as a job actor does) on ``--rows`` images decoded from a generated
JPEG dataset, in batches of ``--batch``, after one warm-up batch:

- trio fp32: ``xai_workers.attribute`` (saliency + IG with ``--ig-steps`` Gauss-Legendre steps
  from the black baseline + Grad-CAM at the default layer, predicted target), ``precision="fp32"``;
- trio bf16: what ``precision="auto"`` does on a GPU, done in the open so it runs on any device:
  the batch under bf16 autocast (``precision="bf16"``), then the rows whose relative completeness
  error |ig_delta| / |F(x) - F(x')| exceeds ``engine.BF16_MAX_REL_DELTA`` again in fp32; its
  time is both passes;
- bf16 rows sent back to fp32: the share of rows that second pass takes;
- max map error of the bf16 rows (those kept) against the fp32 run, per method: the largest
  max|bf16 - fp32| / max|fp32| over rows (each map against its own fp32 scale);
- peak memory: ``torch.cuda.max_memory_allocated`` during each pass (on a CPU: the process's peak
  resident set so far, ``ru_maxrss``, which only grows);
- job: ``xai-audit run`` (a subprocess: the real path through Ray Data, JPEG decode in the CPU
  preprocessing stage, one attribution actor on the GPU, default precision ``auto``) on
  ``--job-rows`` images and on 4x as many; img/s = rows / the manifest's ``pipeline_s``, and the
  steady state (n2 - n1) / (t2 - t1), which cancels Ray's and the actor's start;
- JPEG decode: the CPU stage's work per image (``preprocess_bytes``: decode, resize, crop,
  normalize) on one core, and ``torchvision.io.decode_jpeg`` of a batch on the device plus the
  same resize and normalization there; whether decoding on the device would help: only if the
  CPU workers' decode rate is below the job's.

``--smoke`` runs everything on tiny stand-ins (torchvision ResNet-18 and a 2-layer ViT at 32 px,
8 IG steps, 4 rows in one batch; the job once, on the ResNet only, 8 rows) so the suite runs this
file (tests/test_benchmarks_gpu.py) and it cannot rot. Prints one table, a column per model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision

from xai_workers import attribute, make_baseline, prepare_model
from xai_workers.engine import BF16_MAX_REL_DELTA
from xai_workers.preprocess import Preprocessing, preprocess_bytes
from xai_workers.worker import available_cores

METHODS = ("saliency", "integrated_gradients", "gradcam")


@dataclass(frozen=True)
class Model:
    """A model measured: ``arch`` builds it (random weights); ``spec`` runs it in the job (None:
    not in the job)."""

    name: str
    arch: str
    size: int
    spec: str | None


FULL = (
    Model("ResNet-50", "resnet50", 224, "torchvision:resnet50"),
    Model("ViT-B/16", "vit_b_16", 224, "torchvision:vit_b_16"),
)
SMOKE = (
    Model("ResNet-18 (smoke)", "resnet18", 32, "torchvision:resnet18"),
    Model("ViT 2 layers (smoke)", "vit_tiny", 32, None),
)


def build(arch: str) -> torch.nn.Module:
    """A torchvision model with random weights (seed 0), eval mode; ``vit_tiny``: a 2-layer
    ``VisionTransformer`` at 32 px (patch 8), the smoke stand-in for ViT-B/16. torchvision
    initialises a ViT's head to zeros (constant logits, all-zero maps): it gets ``nn.Linear``'s
    own random initialisation instead."""
    torch.manual_seed(0)
    if arch == "vit_tiny":
        from torchvision.models import VisionTransformer

        model = VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
            num_classes=10,
        )  # fmt: skip
    else:
        model = getattr(torchvision.models, arch)(weights=None)
    if hasattr(model, "heads"):
        model.heads.head.reset_parameters()
    return model.eval()


def jpeg_dataset(path: str, n: int, size: int) -> list[bytes]:
    """n JPEGs (quality 90) of smooth random colour fields, 8/7 of ``size`` on a side (so the
    preprocessing resizes and crops, as for photos), written as Parquet id/image/label."""
    from PIL import Image

    rng = np.random.default_rng(0)
    side = size * 8 // 7
    blobs = []
    for _ in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((side, side), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    table = pa.table(
        {
            "id": [f"img-{i:06d}" for i in range(n)],
            "image": pa.array(blobs, pa.binary()),
            "label": pa.array(np.arange(n) % 10, pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=64)
    return blobs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


def trio(net, x, baseline, steps: int, precision: str) -> dict[str, torch.Tensor]:
    return attribute(net, x, ig_steps=steps, baseline=baseline, methods=METHODS,
                     precision=precision)  # fmt: skip


def trio_bf16(net, x, baseline, steps: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``precision="auto"`` on a GPU, in the open: bf16, then the inexact rows in fp32. Returns
    the merged result and the (N,) bool of rows redone."""
    out = trio(net, x, baseline, steps, "bf16")
    gap = (out["score"] - out["baseline_score"]).abs().clamp_min(1e-6)
    rel = (out["ig_delta"].abs() / gap).reshape(len(x), -1).amax(dim=1)
    redo = rel > BF16_MAX_REL_DELTA
    if redo.any():
        idx = redo.nonzero().reshape(-1)
        again = trio(net, x[idx], baseline, steps, "fp32")
        for k, v in again.items():
            out[k][idx] = v.to(out[k].dtype)
    return out, redo


def measure_trio(m: Model, x: torch.Tensor, a, device) -> dict[str, object]:
    net = prepare_model(build(m.arch), device=device)
    pre = Preprocessing(image_size=m.size)
    baseline = make_baseline(x[:1], "black", pre)
    batches = [x[i : i + a.batch] for i in range(0, len(x), a.batch)]
    trio(net, batches[0], baseline, a.ig_steps, "fp32")  # warm-up: kernels, default layer
    trio_bf16(net, batches[0], baseline, a.ig_steps)
    row: dict[str, object] = {}
    ref: list[dict[str, torch.Tensor]] = []
    _reset_peak(device)
    _sync(device)
    t = time.perf_counter()
    for xb in batches:
        ref.append(trio(net, xb, baseline, a.ig_steps, "fp32"))
    _sync(device)
    row["trio fp32 img/s"] = len(x) / (time.perf_counter() - t)
    row["peak memory fp32 (GiB)"] = _peak_gib(device)
    got, redone = [], []
    _reset_peak(device)
    _sync(device)
    t = time.perf_counter()
    for xb in batches:
        out, redo = trio_bf16(net, xb, baseline, a.ig_steps)
        got.append(out)
        redone.append(redo)
    _sync(device)
    row["trio bf16 img/s"] = len(x) / (time.perf_counter() - t)
    row["peak memory bf16 (GiB)"] = _peak_gib(device)
    redo = torch.cat(redone).cpu()
    row["bf16 rows sent back to fp32"] = f"{int(redo.sum())}/{len(redo)}"
    keep = ~redo
    for method in METHODS:
        f = torch.cat([r[method] for r in ref]).float().cpu().reshape(len(x), -1)[keep]
        b = torch.cat([g[method] for g in got]).float().cpu().reshape(len(x), -1)[keep]
        scale = f.abs().amax(dim=1).clamp_min(1e-30)
        err = ((b - f).abs().amax(dim=1) / scale).max() if len(f) else torch.tensor(float("nan"))
        row[f"max map error bf16 vs fp32, {method}"] = float(err)
    return row


def decode_rates(blobs: list[bytes], size: int, device) -> tuple[float, float]:
    """(images/s of ``preprocess_bytes`` on one core, images/s of ``decode_jpeg`` of the batch on
    ``device`` + resize + normalize there)."""
    from torchvision.io import decode_jpeg

    pre = Preprocessing(image_size=size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        preprocess_bytes(blobs[0], pre)
        cpu = _rate(lambda: [preprocess_bytes(b, pre) for b in blobs], len(blobs), device)
    finally:
        torch.set_num_threads(threads)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)

    def run():
        imgs = torch.stack(decode_jpeg(data, device=device)).float().div_(255)
        imgs = torch.nn.functional.interpolate(
            imgs, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        return (imgs - mean) / std

    run()
    return cpu, _rate(run, len(blobs), device)


def _rate(fn, items: int, device, min_s: float = 0.5) -> float:
    """items/s of ``fn`` (which handles ``items``), repeated for at least ``min_s`` seconds."""
    _sync(device)
    t, done = time.perf_counter(), 0
    while True:
        fn()
        _sync(device)
        done += items
        if time.perf_counter() - t >= min_s:
            return done / (time.perf_counter() - t)


def job_seconds(m: Model, dataset: str, weights: str, out: str, a) -> float:
    """``xai-audit run`` on ``dataset``: the manifest's pipeline_s."""
    cmd = [
        sys.executable, "-m", "xai_audit.cli", "run", "--input", dataset, "--output", out,
        "--model", m.spec, "--weights", weights, "--image-size", str(m.size),
        "--ig-steps", str(a.ig_steps), "--batch-size", str(a.batch), "--address", "local",
        "--num-cpus", str(available_cores()), "--overwrite",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"xai-audit run exited {p.returncode}:\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    counts = manifest["counts"]
    if manifest["status"] != "complete" or counts.get("error", 0):
        raise RuntimeError(f"job not clean: {manifest['status']}, counts {counts}")
    return float(manifest["timing"]["pipeline_s"])


def measure_job(m: Model, root: str, a) -> dict[str, object]:
    if m.spec is None:
        return {"job img/s (n1 rows)": "not run (smoke: CNN only)",
                "job img/s steady (n2 - n1)": "not run (smoke: CNN only)"}  # fmt: skip
    weights = os.path.join(root, f"{m.arch}.pt")
    torch.save(build(m.arch).state_dict(), weights)
    n1, n2 = a.job_rows, 4 * a.job_rows
    times = {}
    for n in (n1,) if a.smoke else (n1, n2):
        ds = os.path.join(root, f"jobdata-{m.arch}-{n}.parquet")
        jpeg_dataset(ds, n, m.size)
        times[n] = job_seconds(m, ds, weights, os.path.join(root, f"out-{m.arch}-{n}"), a)
    steady = "not run (smoke: one job)"
    if n2 in times:
        steady = (n2 - n1) / max(times[n2] - times[n1], 1e-9)
    return {"job img/s (n1 rows)": n1 / times[n1], "job img/s steady (n2 - n1)": steady}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny models, a few rows, any CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ig-steps", type=int)
    p.add_argument("--rows", type=int, help="images per model for the trio")
    p.add_argument("--batch", type=int, help="images per attribute call and job batch")
    p.add_argument("--job-rows", type=int, help="n1: the job runs n1 and 4 n1 rows")
    p.add_argument("--no-job", action="store_true", help="skip xai-audit run")
    a = p.parse_args(argv)
    defaults = dict(ig_steps=8, rows=4, batch=4, job_rows=8) if a.smoke else dict(
        ig_steps=32, rows=64, batch=16, job_rows=256)  # fmt: skip
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    device = torch.device(a.device)
    models = SMOKE if a.smoke else FULL
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    print(f"benchmarks/gpu.py{' --smoke' if a.smoke else ''}: {device} ({gpu}), "
          f"{platform.machine()}, {available_cores()} cores, torch {torch.__version__}, "
          f"IG {a.ig_steps} steps, {a.rows} rows per model in batches of {a.batch}; "
          "random weights (no downloads)", flush=True)  # fmt: skip
    columns: dict[str, dict[str, object]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for m in models:
            blobs = jpeg_dataset(os.path.join(root, f"trio-{m.arch}.parquet"), a.rows, m.size)
            pre = Preprocessing(image_size=m.size)
            x = torch.stack([preprocess_bytes(b, pre) for b in blobs]).to(device)
            row = measure_trio(m, x, a, device)
            cpu, dev = decode_rates(blobs, m.size, device)
            row["JPEG decode img/s, CPU stage, 1 core"] = cpu
            row[f"JPEG decode img/s, decode_jpeg on {device.type}"] = dev
            if a.no_job:
                row["job img/s (n1 rows)"] = row["job img/s steady (n2 - n1)"] = "not run"
            else:
                row.update(measure_job(m, root, a))
            columns[m.name] = row
            print(f"  {m.name} done at {time.perf_counter() - t0:.0f} s", flush=True)
    names = list(columns)
    print(f"\n| field | {' | '.join(names)} |")
    print(f"| --- |{' ---: |' * len(names)}")
    for field in columns[names[0]]:
        cells = []
        for n in names:
            v = columns[n][field]
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print(f"| {field} | {' | '.join(cells)} |")
    cores = max(1, available_cores() - 1)
    for n in names:
        row = columns[n]
        job = row["job img/s steady (n2 - n1)"]
        job = job if isinstance(job, float) else row["job img/s (n1 rows)"]
        if isinstance(job, float):
            cap = cores * row["JPEG decode img/s, CPU stage, 1 core"]
            verdict = "would not help" if cap >= job else "may help"
            print(f"{n}: CPU decode capacity ~{cap:.4g} img/s ({cores} cores) against the job's "
                  f"{job:.4g} img/s: decoding on the device {verdict}")  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
