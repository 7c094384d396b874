"""The job on a simulated two-node cluster (`ray.cluster_utils.Cluster`, one CPU each) gives the
same rows as the single-process worker on the same inputs, with one actor per node."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from rowcheck import assert_maps_close, assert_statistics_from_own_maps, stored_maps

from xai_audit import sources
from xai_audit.attribute import run_job
from xai_audit.config import JobConfig
from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model, write_demo_dataset
from xai_workers.preprocess import Preprocessing
from xai_workers.worker import AttributionWorker

N = 48


@pytest.fixture(scope="module")
def two_nodes():
    # a removed node is declared dead after 3 failed health checks 1 s apart (Ray's defaults:
    # 5 checks, 3 s apart), so the node-loss test waits less for Ray to notice
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": health},
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_same_rows_as_one_process(two_nodes, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    dataset = str(tmp_path / "d.parquet")
    write_demo_dataset(dataset, n=N)
    pq.write_table(pq.read_table(dataset), dataset, row_group_size=12)  # 4 shards' worth
    torch.manual_seed(0)
    model = build_demo_model().eval()
    weights = str(tmp_path / "m.pt")
    torch.save(model.state_dict(), weights)
    # full maps: the statistics are then checked against the rows' own maps (tests/rowcheck.py)
    kw = dict(methods=("saliency", "integrated_gradients", "gradcam"), ig_steps=4,
              image_size=32, mean=DEMO_MEAN, std=DEMO_STD, store="full")  # fmt: skip
    cfg = JobConfig(input=dataset, output=str(tmp_path / "out"), model="xai_workers.demo:"
                    "build_demo_model", weights=weights, batch_size=4, rows_per_file=12,
                    progress_interval_s=0, **kw)  # fmt: skip
    res = run_job(cfg, log=lambda m: None)
    assert res.exit_code == 0 and res.counts["rows_ok"] == N
    assert res.manifest["ray"]["nodes"] == 2 and res.manifest["ray"]["actors"] == 2
    got = pq.read_table(tmp_path / "out" / "attributions").sort_by("id")

    # the same rows from one worker in this process, on the same preprocessed blocks
    plan = sources.discover(dataset)
    shards, _ = sources.make_shards(plan, shard_rows=N)
    pre = Preprocessing(image_size=32, mean=DEMO_MEAN, std=DEMO_STD)
    blocks = [b for sh in shards for b in sources.read_shard(
        sh, preprocessing=pre, id_column="id", image_column="image", label_column="label",
        id_type=plan.id_type, label_type=plan.label_type)]  # fmt: skip
    worker = AttributionWorker(model, gradcam_layer=res.manifest["model"]["gradcam_layer"],
                               label_type=pa.int64(), batch_size=16, **kw)  # fmt: skip
    want = pa.concat_tables([worker(b) for b in blocks]).sort_by("id")

    assert got.column_names == want.column_names
    for name in ("id", "label", "status", "target", "pred_class", "source", "source_row"):
        assert got[name].to_pylist() == want[name].to_pylist(), name
    for name in ("saliency", "integrated_gradients", "gradcam"):
        assert_maps_close(stored_maps(got[name]), stored_maps(want[name]), name)
    # logits from another batch composition and thread count: see tests/rowcheck.py
    scale = np.maximum(np.abs(want["score"].to_numpy(zero_copy_only=False)), 1.0)
    for name in ("score", "ig_delta"):
        err = np.abs(got[name].to_numpy(zero_copy_only=False)
                     - want[name].to_numpy(zero_copy_only=False))  # fmt: skip
        assert (err <= 1e-4 * scale).all(), (name, err.max())
    assert_statistics_from_own_maps(got)


def test_cluster_files_are_valid():
    """The AWS launcher config passes Ray's own schema; the RayJob runs xai-audit with --resume
    and gives every Ray container and the submitter the token-auth settings."""
    from pathlib import Path

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    root = Path(__file__).resolve().parents[1] / "cluster"
    aws = yaml.safe_load((root / "aws.yaml").read_text())
    validate_config(prepare_config(aws))
    assert "RAY_AUTH_MODE=token" in " ".join(aws["worker_start_ray_commands"])
    job = yaml.safe_load((root / "rayjob.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "RayJob" and spec["entrypoint"].startswith("xai-audit run")
    assert "--resume" in spec["entrypoint"]
    pods = [spec["submitterPodTemplate"], spec["rayClusterSpec"]["headGroupSpec"]["template"]]
    pods += [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            names = {e["name"] for e in c["env"]}
            assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= names, c["name"]
    gpu = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (root / "local_cluster.sh").stat().st_mode & 0o111


def test_worker_node_removed_mid_run_loses_no_row(two_nodes, tmp_path):
    """The worker node is removed (its raylet and workers killed, as on a preempted spot node)
    while its actor holds a batch: `xai-audit run` completes on the head node, or exits 1 with
    one line that says to rerun with --resume, which then completes. Every id once either way."""
    import os
    import subprocess
    import sys
    import time

    from xai_audit.attribute import FAULT_ENV

    cluster = two_nodes
    worker = next(iter(cluster.worker_nodes))
    n = 96
    dataset = str(tmp_path / "d.parquet")
    write_demo_dataset(dataset, n=n)
    pq.write_table(pq.read_table(dataset), dataset, row_group_size=8)
    torch.manual_seed(0)
    weights = str(tmp_path / "m.pt")
    torch.save(build_demo_model().state_dict(), weights)
    marker = tmp_path / "holding"
    mean, std = (",".join(str(v) for v in t) for t in (DEMO_MEAN, DEMO_STD))
    argv = [sys.executable, "-m", "xai_audit.cli", "run", "--input", dataset, "--output",
            str(tmp_path / "out"), "--model", "xai_workers.demo:build_demo_model", "--weights",
            weights, "--image-size", "32", "--mean", mean, "--std", std, "--ig-steps", "8",
            "--batch-size", "4", "--rows-per-file", "8", "--address", cluster.address,
            "--progress-interval-s", "1"]  # fmt: skip
    # the worker node's actor holds its 1st batch until the node is gone (24 batches of 8 IG
    # steps: enough work that the head's actor cannot finish them all before the other starts)
    env = {**os.environ, FAULT_ENV: f"1:{marker}:hold:{worker.node_id}"}
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the worker node never held a batch: this would prove nothing"
        cluster.remove_node(worker, allow_graceful=False)
        stdout, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
        if len(cluster.worker_nodes) == 0:  # the module's fixture gets its two nodes back
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
    print(f"after the node's removal the run exited {job.returncode}")  # -rP shows which way
    if job.returncode != 0:
        assert job.returncode == 1, stderr[-3000:]
        assert "--resume" in stderr.strip().splitlines()[-1], stderr[-3000:]
        r = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        stdout = r.stdout
    assert stdout.strip().splitlines()[-1].startswith(f"complete: {n}/{n} rows"), stdout
    ids = pq.read_table(tmp_path / "out" / "attributions", columns=["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(pq.read_table(dataset)["id"].to_pylist())  # each id once
