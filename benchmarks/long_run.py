"""A long run of the real job: is every process's memory flat, do open files and threads stay put?

``xai-audit run`` goes in a subprocess (its own session, a new local Ray) over ``--n`` small images
(the demo digits, repeated, each copy shifted by a few pixels so no two rows are the same bytes).
Every process of that session, the driver and every Ray process (GCS, raylet, the attribution
actors, the read/write task workers, Ray's agents), is sampled every ``--interval`` seconds with
psutil: resident set size (RSS), open file descriptors, threads.

The window measured is the pipeline's steady state, from the first progress line with rows written
to the last one before all are (so start-up and the actors' shutdown stay out), cut into quarters
by time. For every process that lives through
the whole window the figures are its peak RSS in the first and in the last quarter and its fds and
threads at the first and the last sample of the window; per process kind the worst (largest)
last/first ratio is printed. The run is memory-flat when every such ratio is at most
``--max-growth`` (1.10: the last quarter within 10% of the first); the script then exits 0, else 1.

    python benchmarks/long_run.py [--n 20000] [--ig-steps 8] [--batch-size 64] [--json FILE]

Memory figures do not depend on a quiet machine (the rate does); a run of 20,000 images takes
several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

try:
    import psutil
except ImportError:  # Ray bundles psutil: importing ray puts its copy on sys.path
    import importlib

    importlib.import_module("ray")
    psutil = importlib.import_module("psutil")


def make_dataset(path: str, n: int, size: int) -> None:
    """``n`` PNG images: the demo digits repeated, copy k rolled by (k mod 5, k // 5 mod 5)
    pixels, with id/image/label columns, row groups of 256 rows."""
    import numpy as np
    from PIL import Image

    from xai_workers.demo import demo_images

    base, labels = demo_images(None, size=size)
    writer = None
    chunk = 2048
    for start in range(0, n, chunk):
        ids, blobs, labs = [], [], []
        for i in range(start, min(n, start + chunk)):
            k, j = divmod(i, len(base))
            img = np.roll(base[j], (k % 5, (k // 5) % 5), axis=(0, 1))
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            ids.append(f"img-{i:07d}")
            blobs.append(buf.getvalue())
            labs.append(int(labels[j]))
        t = pa.table({"id": ids, "image": pa.array(blobs, pa.binary()), "label": labs})
        if writer is None:
            writer = pq.ParquetWriter(path, t.schema)
        writer.write_table(t, row_group_size=256)
    writer.close()


def kind_of(proc: psutil.Process, driver_pid: int) -> str:
    """A process's kind: driver, gcs_server, raylet, ``attribution actor``, ``progress actor``,
    another actor or agent by its class (Ray's process title), ``task worker`` (Ray's pooled
    workers: read, write and idle ones, and a worker not yet titled) or the script's name."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        args = proc.cmdline()
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    title = args[0].strip() if args else name
    if name in ("gcs_server", "raylet"):
        return name
    if title.startswith("ray::"):
        title = title[5:]
        if "JobWorker" in title:  # Ray Data's MapWorker(MapBatches(JobWorker))
            return "attribution actor"
        if "ProgressCounter" in title:
            return "progress actor"
        # Ray's agents and Ray Data's actors; not a task (titled by its function or "Write")
        if title not in ("IDLE", "Write") and re.fullmatch(r"_?[A-Z]\w*", title.split(".")[0]):
            return title.split(".")[0]
        return "task worker"
    scripts = [a.split("/ray/")[-1] for a in args if a.endswith(".py")]  # Ray's own, by path
    if any(a.endswith("default_worker.py") for a in scripts):
        return "task worker"
    if not scripts:
        return name
    known = {
        "dashboard/agent.py": "dashboard agent",
        "autoscaler/_private/monitor.py": "autoscaler monitor",
        "_private/runtime_env/agent/main.py": "runtime_env agent",
    }
    return known.get(scripts[0], os.path.basename(scripts[0])[:-3])


def sample(sid: int, driver_pid: int, kinds: dict) -> list[tuple[int, str, int, int, int]]:
    """``(pid, kind, rss, fds, threads)`` of every live process in session ``sid``."""
    rows = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) != sid:
                continue
            with proc.oneshot():
                rss = proc.memory_info().rss
                fds = proc.num_fds()
                threads = proc.num_threads()
            kind = kinds.get(proc.pid)
            if kind in (None, "task worker"):  # a pooled worker may become an actor later
                kind = kinds[proc.pid] = kind_of(proc, driver_pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        rows.append((proc.pid, kind, rss, fds, threads))
    return rows


PROGRESS = re.compile(r"(\d+)/(\d+) rows \(")


def run(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="xai-long-run-")
    try:
        return _run_in(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_in(tmp: str, args) -> dict:
    from xai_workers.demo import DEMO_MEAN, DEMO_STD

    data = os.path.join(tmp, "images.parquet")
    t0 = time.monotonic()
    make_dataset(data, args.n, args.size)
    print(f"dataset: {args.n} images in {time.monotonic() - t0:.0f} s -> {data}", flush=True)
    import torch

    from xai_workers.demo import build_demo_model

    torch.manual_seed(0)
    weights = os.path.join(tmp, "model.pt")
    torch.save(build_demo_model().state_dict(), weights)
    mean = ",".join(str(v) for v in DEMO_MEAN)
    std = ",".join(str(v) for v in DEMO_STD)
    cmd = [sys.executable, "-m", "xai_audit.cli", "run", "--input", data, "--output",
           os.path.join(tmp, "out"), "--model", "xai_workers.demo:build_demo_model",
           "--weights", weights, "--image-size", str(args.size), "--mean", mean, "--std", std,
           "--ig-steps", str(args.ig_steps), "--batch-size", str(args.batch_size),
           "--address", "local", "--num-cpus", str(args.num_cpus),
           "--progress-interval-s", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)  # fmt: skip
    marks: list[tuple[float, int]] = []  # (time, rows done) from the progress lines
    tail: list[str] = []

    def read_stderr():
        for line in p.stderr:
            tail.append(line)
            del tail[:-40]
            m = PROGRESS.search(line)
            if m:
                marks.append((time.monotonic(), int(m.group(1))))
            if args.verbose:
                print(line, end="", file=sys.stderr, flush=True)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    samples: list[tuple[float, list]] = []
    kinds: dict[int, str] = {}
    sid = os.getsid(p.pid)
    try:
        while p.poll() is None:
            samples.append((time.monotonic(), sample(sid, p.pid, kinds)))
            time.sleep(args.interval)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # Ray helpers left behind by this run only
        except ProcessLookupError:
            pass
    reader.join(timeout=10)
    last = p.stdout.read().strip()
    if p.returncode != 0:
        raise SystemExit(f"xai-audit run exited {p.returncode}:\n{''.join(tail)}")
    busy = [t for t, rows in marks if 0 < rows < args.n]  # before the actors are let go
    if len(busy) < 2:
        raise SystemExit("too few progress lines from the job to find its steady state")
    w0, w1 = busy[0], busy[-1]
    return analyse(samples, w0, w1, args, last, time.monotonic() - t0)


def analyse(samples, w0: float, w1: float, args, last: str, wall: float) -> dict:
    q = (w1 - w0) / 4
    window = [(t, rows) for t, rows in samples if w0 <= t <= w1]
    quarters = [[(t, r) for t, r in window if w0 + i * q <= t <= w0 + (i + 1) * q]
                for i in range(4)]  # fmt: skip
    first, final = quarters[0], quarters[3]
    if len(first) < 3 or len(final) < 3:
        raise SystemExit(f"too few samples in the window ({len(window)}): use more images")

    def by_pid(rows_list, col):
        out: dict[int, list] = {}
        for _, rows in rows_list:
            for row in rows:
                out.setdefault(row[0], []).append(row[col])
        return out

    kinds = {row[0]: row[1] for _, rows in window for row in rows}
    rss_q = [by_pid(part, 2) for part in quarters]
    rss_first, rss_last = rss_q[0], rss_q[3]
    fds, threads = by_pid(window, 3), by_pid(window, 4)
    through = sorted(set(rss_first) & set(rss_last))
    per_kind: dict[str, dict] = {}
    for pid in through:
        k = kinds[pid]
        d = per_kind.setdefault(k, {"processes": 0, "rss_first_mib": 0.0, "rss_last_mib": 0.0,
                                    "rss_ratio": 0.0, "fds": [0, 0],
                                    "threads": [0, 0]})  # fmt: skip
        a, b = max(rss_first[pid]), max(rss_last[pid])
        d["processes"] += 1
        if b / a >= d["rss_ratio"]:  # the worst process of the kind
            d.update(rss_first_mib=round(a / 2**20, 1), rss_last_mib=round(b / 2**20, 1),
                     rss_ratio=round(b / a, 4), rss_quarters_mib=[
                         round(max(r.get(pid, [0])) / 2**20, 1) for r in rss_q])  # fmt: skip
        d["fds"] = [d["fds"][0] + fds[pid][0], d["fds"][1] + fds[pid][-1]]
        d["threads"] = [d["threads"][0] + threads[pid][0], d["threads"][1] + threads[pid][-1]]
    born = len({r[0] for _, rows in window for r in rows} - set(through))
    total_first = max(sum(r[2] for r in rows) for _, rows in first)
    total_last = max(sum(r[2] for r in rows) for _, rows in final)
    worst = max((d["rss_ratio"] for d in per_kind.values()), default=float("nan"))
    fd_growth = sum(d["fds"][1] - d["fds"][0] for d in per_kind.values())
    thread_growth = sum(d["threads"][1] - d["threads"][0] for d in per_kind.values())
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "n": args.n,
        "ig_steps": args.ig_steps,
        "batch_size": args.batch_size,
        "wall_s": round(wall, 1),
        "window_s": round(w1 - w0, 1),
        "samples": len(window),
        "job_line": last,
        "per_kind": per_kind,
        "processes_not_through_window": born,
        "total_rss_first_mib": round(total_first / 2**20, 1),
        "total_rss_last_mib": round(total_last / 2**20, 1),
        "worst_rss_ratio": worst,
        "fd_growth": fd_growth,
        "thread_growth": thread_growth,
        "flat": bool(worst <= args.max_growth),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="images (default 20000)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-cpus", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--max-growth", type=float, default=1.10)
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--verbose", action="store_true", help="show the job's log")
    args = ap.parse_args(argv)
    res = run(args)
    print(f"{res['job_line']}")
    print(f"steady state {res['window_s']} s, {res['samples']} samples; {res['machine']}")
    print(f"{'process kind':<22} {'n':>3} {'RSS q1 MiB':>11} {'RSS q4 MiB':>11} {'ratio':>6} "
          f"{'fds start->end':>15} {'threads start->end':>19}")  # fmt: skip
    for k, d in sorted(res["per_kind"].items()):
        print(f"{k:<22} {d['processes']:>3} {d['rss_first_mib']:>11.1f} {d['rss_last_mib']:>11.1f}"
              f" {d['rss_ratio']:>6.3f} {d['fds'][0]:>7} -> {d['fds'][1]:<5}"
              f" {d['threads'][0]:>9} -> {d['threads'][1]:<5}")  # fmt: skip
    print(f"all processes: peak RSS sum {res['total_rss_first_mib']} MiB (q1) -> "
          f"{res['total_rss_last_mib']} MiB (q4); {res['processes_not_through_window']} processes "
          f"came or went in the window; worst ratio {res['worst_rss_ratio']:.3f} -> "
          f"{'flat' if res['flat'] else 'NOT flat'}")  # fmt: skip
    print("peak RSS per quarter (MiB) of the worst process of each kind:")
    for k, d in sorted(res["per_kind"].items()):
        print(f"  {k:<22} " + "  ".join(f"{v:8.1f}" for v in d["rss_quarters_mib"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
