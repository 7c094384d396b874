"""Faults injected for real into a running job: an attribution actor that dies mid-batch (the
process exits, as on a preempted node) and secrets that must never be written anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from xai_audit import output as out
from xai_audit.attribute import FAULT_ENV, run_job
from xai_audit.config import JobConfig
from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model, write_demo_dataset

N = 48


@pytest.fixture()
def data(tmp_path):
    dataset = str(tmp_path / "digits.parquet")
    write_demo_dataset(dataset, n=N)
    pq.write_table(pq.read_table(dataset), dataset, row_group_size=8)
    torch.manual_seed(0)
    weights = str(tmp_path / "model.pt")
    torch.save(build_demo_model().state_dict(), weights)
    return dataset, weights


def test_actor_dies_mid_batch_and_the_job_completes_exactly_once(
    ray_session, data, tmp_path, monkeypatch
):
    """The actor exits on its 3rd batch: Ray restarts it and retries the batch; every id is
    written exactly once and the manifest counts the restart."""
    dataset, weights = data
    marker = tmp_path / "died"
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}")  # the job forwards it to its actors
    cfg = JobConfig(input=dataset, output=str(tmp_path / "out"),
                    model="xai_workers.demo:build_demo_model", weights=weights,
                    image_size=32, mean=DEMO_MEAN, std=DEMO_STD, ig_steps=2, batch_size=4,
                    rows_per_file=8, progress_interval_s=0.0)  # fmt: skip
    res = run_job(cfg, log=lambda m: None)
    assert marker.exists(), "the fault did not fire: this test would prove nothing"
    assert res.exit_code == 0 and res.status == "complete", res.summary
    scan = out.scan(str(tmp_path / "out" / "attributions"), {"digits.parquet": N})
    assert scan.rows == N and scan.duplicates == 0 and scan.missing({"digits.parquet": N}) == 0
    ids = pq.read_table(tmp_path / "out" / "attributions", columns=["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == N
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["ray"]["actor_restarts"] >= 1 and m["ray"]["actor_starts"] >= 2


def test_secrets_never_written(data, tmp_path, s3_server, s3_bucket):
    """With AWS keys and a Ray token in the environment, nothing the job writes (its log, the
    manifest, error rows, summary, report) holds them."""
    import boto3

    dataset, weights = data
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.upload_file(dataset, s3_bucket, "in/digits.parquet")
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIAXAIAUDITFAKEKEY1",
        "AWS_SECRET_ACCESS_KEY": "xaiAuditFakeSecret+0123456789abcdefGHIJKLMNOP",
        "AWS_SESSION_TOKEN": "xaiAuditFakeSessionToken0123456789",
    }
    env = {**os.environ, **secrets, "PYTHONUNBUFFERED": "1"}
    output = f"s3://{s3_bucket}/run"
    mean = ",".join(str(v) for v in DEMO_MEAN)
    argv = [sys.executable, "-m", "xai_audit.cli", "run", "--output", output, "--input",
            f"s3://{s3_bucket}/in/", "--model", "xai_workers.demo:build_demo_model",
            "--weights", weights, "--image-size", "32", "--mean", mean, "--std", mean,
            "--s3-endpoint", s3_server, "--ig-steps", "2", "--address", "local",
            "--num-cpus", "2"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = subprocess.run(
        [sys.executable, "-m", "xai_audit.cli", "report", output, "--s3-endpoint", s3_server],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr[-3000:]
    token_file = os.path.expanduser("~/.ray/auth_token")
    if os.path.exists(token_file):  # the Ray token the local cluster used
        secrets["ray token"] = open(token_file).read().strip()
    written = [r.stdout.encode(), r.stderr.encode(), rep.stdout.encode(), rep.stderr.encode()]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="run/")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys) and any("report" in k for k in keys)
    for k in keys:
        written.append(s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read())
    for name, value in secrets.items():
        for blob in written:
            assert value.encode() not in blob, f"{name} was written"
