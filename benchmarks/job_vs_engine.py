"""The batch job's steady-state throughput against the bare engine, and its memory as data grows.

Throughput. The same images, model and settings go through

- engine: ``xai_workers.attribute`` on the preprocessed tensors (decoded once, not timed) in
  batches of ``--batch-size`` on a model prepared once, torch threads = all cores; and the same
  plus ``stats.row_statistics`` (the statistics the job also computes);
- job: ``xai_audit.attribute.run_job`` on a local Ray (one session for all runs) for ``--n1`` and
  ``--n2`` images. Its steady-state rate is the marginal one, (n2 - n1) / (t2 - t1), with t the
  pipeline time of each run, which cancels Ray's and the actors' start-up.

Rounds alternate (engine, job n1, job n2); figures are medians over rounds.

Memory (``--memory``): ``xai-audit run`` in a subprocess for N and 4N images; the proportional set
size (PSS, so shared object-store pages count once) of every process of its session, driver and
all Ray processes, is sampled every 0.2 s; the peak of the sum is reported for both sizes.

    python benchmarks/job_vs_engine.py [--model demo|resnet18] [--size 32] [--ig-steps 32]
        [--n1 256] [--n2 1024] [--rounds 2] [--memory 512]

The machine may be shared: the figures are only as quiet as it is.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from xai_audit.attribute import run_job
from xai_audit.config import JobConfig
from xai_workers.engine import attribute, keep_freed_memory, make_baseline, prepare_model
from xai_workers.models import load_model
from xai_workers.preprocess import preprocess_bytes
from xai_workers.stats import row_statistics
from xai_workers.worker import available_cores


def make_dataset(path: str, n: int, size: int) -> None:
    """n PNG images (the demo digits, repeated, scaled to size x size) with id/image/label."""
    from PIL import Image

    from xai_workers.demo import demo_images

    base, labels = demo_images(None, size=size)
    ids, blobs, labs = [], [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(base[i % len(base)]).save(buf, format="PNG")
        ids.append(f"img-{i:07d}")
        blobs.append(buf.getvalue())
        labs.append(int(labels[i % len(base)]))
    t = pa.table({"id": ids, "image": pa.array(blobs, pa.binary()), "label": labs})
    pq.write_table(t, path, row_group_size=256)


def model_files(kind: str, root: str) -> tuple[str, str, dict]:
    """(spec, weights path, preprocessing kwargs) of a random-weight model."""
    torch.manual_seed(0)
    if kind == "demo":
        from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model

        m, spec, pre = (
            build_demo_model(),
            "xai_workers.demo:build_demo_model",
            {"mean": DEMO_MEAN, "std": DEMO_STD},
        )
    else:
        import torchvision

        m = getattr(torchvision.models, kind)(num_classes=10)
        spec, pre = f"torchvision:{kind}", {}
    path = os.path.join(root, f"{kind}.pt")
    torch.save(m.state_dict(), path)
    return spec, path, pre


def engine_rate(spec, weights, pre, dataset, n, args) -> tuple[float, float]:
    """(images/s of attribute, images/s of attribute + row_statistics) on n images."""
    torch.set_num_threads(available_cores())
    keep_freed_memory()  # as the job's CPU workers do
    loaded = load_model(spec, weights, image_size=args.size, **pre)
    net = prepare_model(loaded.module)
    from xai_workers.hooks import default_gradcam_layer

    layer = default_gradcam_layer(net, torch.zeros(1, 3, args.size, args.size))
    images = pq.read_table(dataset, columns=["image"]).column("image").to_pylist()[:n]
    x = torch.stack([preprocess_bytes(b, loaded.preprocessing) for b in images])
    rates = []
    for with_stats in (False, True):
        t0 = time.perf_counter()
        for i in range(0, n, args.batch_size):
            xb = x[i : i + args.batch_size]
            r = attribute(
                net,
                xb,
                ig_steps=args.ig_steps,
                gradcam_layer=layer,
                baseline=make_baseline(xb, "black", loaded.preprocessing),
            )
            if with_stats:
                row_statistics(r)
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1]


def job_seconds(spec, weights, pre, dataset, out, args) -> float:
    cfg = JobConfig(
        input=dataset,
        output=out,
        model=spec,
        weights=weights,
        image_size=args.size,
        ig_steps=args.ig_steps,
        batch_size=args.batch_size,
        overwrite=True,
        progress_interval_s=1e9,
        **pre,
    )
    res = run_job(cfg, log=lambda m: None)
    assert res.exit_code == 0, res.summary
    return float(res.manifest["timing"]["pipeline_s"])


def _session_pss(pgid: int) -> int:
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


def peak_memory(spec, weights, pre, dataset, out, args) -> tuple[int, float]:
    """(peak PSS bytes of the job's whole session, wall seconds) of `xai-audit run`."""
    cmd = [
        sys.executable,
        "-m",
        "xai_audit.cli",
        "run",
        "--input",
        dataset,
        "--output",
        out,
        "--model",
        spec,
        "--weights",
        weights,
        "--image-size",
        str(args.size),
        "--ig-steps",
        str(args.ig_steps),
        "--batch-size",
        str(args.batch_size),
        "--address",
        "local",
        "--num-cpus",
        str(available_cores()),
        "--overwrite",
    ]
    for k in ("mean", "std"):
        if k in pre:
            cmd += [f"--{k}", ",".join(str(v) for v in pre[k])]
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    peak = 0
    try:
        while p.poll() is None:
            peak = max(peak, _session_pss(p.pid))
            time.sleep(0.2)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # Ray helpers left behind by this run only
        except ProcessLookupError:
            pass
    assert p.returncode == 0, f"xai-audit run exited {p.returncode}"
    return peak, time.monotonic() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="demo | resnet18 | any torchvision arch")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n1", type=int, default=256)
    ap.add_argument("--n2", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--memory", type=int, default=0, help="N for the N vs 4N memory check")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args(argv)

    import ray

    root = tempfile.mkdtemp(prefix="xai-bench-")
    spec, weights, pre = model_files(args.model, root)
    n_max = max(args.n2, 4 * args.memory)
    dataset = os.path.join(root, "data.parquet")
    make_dataset(dataset, n_max, args.size)
    sizes = {}
    for n in {args.n1, args.n2, args.memory, 4 * args.memory} - {0}:
        p = os.path.join(root, f"data-{n}.parquet")
        pq.write_table(pq.read_table(dataset).slice(0, n), p, row_group_size=256)
        sizes[n] = p
    print(
        f"# job vs engine: {args.model} at {args.size} px, IG {args.ig_steps} steps, batch "
        f"{args.batch_size}; {platform.processor() or platform.machine()}, "
        f"{available_cores()} cores, torch {torch.__version__}, ray {ray.__version__}"
    )
    result = {"args": vars(args)}
    if not args.skip_throughput:
        ray.init(
            address="local",
            num_cpus=available_cores(),
            include_dashboard=False,
            logging_level="ERROR",
        )
        eng, eng_stats, marg, t1s, t2s = [], [], [], [], []
        try:
            for r in range(args.rounds):
                e, es = engine_rate(spec, weights, pre, sizes[args.n2], min(args.n2, 512), args)
                t1 = job_seconds(spec, weights, pre, sizes[args.n1], os.path.join(root, "o1"), args)
                t2 = job_seconds(spec, weights, pre, sizes[args.n2], os.path.join(root, "o2"), args)
                eng.append(e)
                eng_stats.append(es)
                t1s.append(t1)
                t2s.append(t2)
                marg.append((args.n2 - args.n1) / (t2 - t1))
                print(
                    f"round {r}: engine {e:.1f} img/s (+stats {es:.1f}); job {args.n1} in "
                    f"{t1:.1f} s, {args.n2} in {t2:.1f} s -> marginal {marg[-1]:.1f} img/s"
                )
        finally:
            ray.shutdown()
        m, e, es = statistics.median(marg), statistics.median(eng), statistics.median(eng_stats)
        result.update(engine=e, engine_stats=es, job_marginal=m, ratio=m / e, ratio_stats=m / es)
        print("\n| | images/s |\n| --- | --- |")
        print(f"| engine (attribute) | {e:.1f} |\n| engine + statistics | {es:.1f} |")
        print(f"| job, marginal ({args.n1} -> {args.n2} images) | {m:.1f} |")
        print(f"\njob / engine = {m / e:.2f}; job / (engine + statistics) = {m / es:.2f}")
    if args.memory:
        rows = []
        for n in (args.memory, 4 * args.memory):
            peak, wall = peak_memory(
                spec, weights, pre, sizes[n], os.path.join(root, f"m{n}"), args
            )
            rows.append((n, peak, wall))
            print(
                f"memory: {n} images -> peak PSS of all job processes {peak / 2**20:.0f} MiB "
                f"({wall:.0f} s)"
            )
        ratio = rows[1][1] / rows[0][1]
        result["memory"] = {str(n): p for n, p, _ in rows}
        result["memory_ratio"] = ratio
        print(f"peak(4N) / peak(N) = {ratio:.3f}")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
