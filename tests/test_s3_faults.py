"""A flaky S3, for real: a fault proxy (tests/s3_fault_proxy.py) in front of moto's S3 server
answers ``503 SlowDown``, resets connections before or in the middle of an answer, and delays
requests. The job reads its input and weights and writes its output through it (s3fs, whose
retries and botocore's absorb every fault) and loses nothing: every id once, every object it left
complete."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from s3_fault_proxy import KINDS, FaultProxy

from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model, write_demo_dataset

#: s3fs uploads (and reads) in blocks of this size: its minimum, so that parts of a few MiB are
#: multipart uploads (the default, 50 MiB, would need 50 MiB parts)
BLOCK = 5 * 2**20


def test_read_bytes_survives_a_download_cut_mid_body(s3_server, s3_bucket, monkeypatch):
    """An object larger than s3fs's block size, read through the proxy with every 2nd request
    faulted (a dropped connection mid-body among them), comes back whole."""
    import boto3
    import fsspec.config

    from xai_workers.storage import read_bytes

    blob = os.urandom(3 * BLOCK + 12345)
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="w.bin", Body=blob)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"default_block_size": BLOCK})
    with FaultProxy(s3_server, every=2, seed=1, delay_s=0.05) as proxy:
        for _ in range(6):  # faults take turns: the 3rd is a reset mid-body
            assert read_bytes(f"s3://{s3_bucket}/w.bin", proxy.url) == blob
    assert proxy.faults["read", "reset_mid"] >= 1, proxy.faults  # else it proved nothing


def test_job_through_flaky_s3_writes_every_row_once(s3_server, s3_bucket, tmp_path):
    """Input, weights and output on S3 through the proxy, every 3rd request of each kind
    (listing, read, write, multipart upload) faulted: the job completes, every id is written
    once, every object under the output reads whole, and no upload is left half done."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    n, size = 192, 96
    dataset = str(tmp_path / "digits.parquet")
    write_demo_dataset(dataset, n=n, size=size)
    table = pq.read_table(dataset)
    for i, start in enumerate((0, n // 2)):  # two input files: several listings and reads
        buf = io.BytesIO()
        pq.write_table(table.slice(start, n // 2), buf, row_group_size=32)
        s3.put_object(Bucket=s3_bucket, Key=f"in/part-{i}.parquet", Body=buf.getvalue())
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(build_demo_model().state_dict(), buf)
    s3.put_object(Bucket=s3_bucket, Key="models/demo.pt", Body=buf.getvalue())

    # full float32 maps at 96 px: ~80 KB a row on disk, so 96-row parts are multipart uploads
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "FSSPEC_S3": json.dumps({"default_block_size": BLOCK})}  # fmt: skip
    mean, std = (",".join(str(v) for v in t) for t in (DEMO_MEAN, DEMO_STD))
    with FaultProxy(s3_server, every=3, seed=0, delay_s=0.2) as proxy:
        argv = [sys.executable, "-m", "xai_audit.cli", "run", "--input", f"s3://{s3_bucket}/in/",
                "--output", f"s3://{s3_bucket}/run", "--model",
                "xai_workers.demo:build_demo_model", "--weights",
                f"s3://{s3_bucket}/models/demo.pt", "--image-size", str(size), "--mean", mean,
                "--std", std, "--s3-endpoint", proxy.url, "--ig-steps", "2", "--store", "full",
                "--batch-size", "32", "--rows-per-file", "96", "--address", "local",
                "--num-cpus", "2", "--progress-interval-s", "0"]  # fmt: skip
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    # what is in the bucket, read directly (not through the proxy)
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(
        Bucket=s3_bucket, Prefix="run/") for o in p.get("Contents", [])]  # fmt: skip
    parts = [k for k in keys if k.startswith("run/attributions/")]
    assert parts and all(k.rsplit("/", 1)[1].startswith("part-") for k in parts), keys
    ids = []
    for key in keys:  # every object is complete: each Parquet file reads, each JSON parses
        body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        if key.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(body))
            if key in parts:
                ids += t.column("id").to_pylist()
        elif key.endswith(".json"):
            json.loads(body)
    assert sorted(ids) == sorted(table.column("id").to_pylist())  # every id, exactly once
    assert len(set(ids)) == n
    sizes = [s3.head_object(Bucket=s3_bucket, Key=k)["ContentLength"] for k in parts]
    assert max(sizes) > BLOCK, sizes  # so the parts were multipart uploads
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"), "a half upload"
    faults = proxy.faults
    # every kind of fault, on every kind of request, really happened: else this proves less
    for kind in KINDS:
        assert sum(v for (_, k), v in faults.items() if k == kind), (kind, faults)
    for op in ("list", "read", "write", "multipart"):
        assert sum(v for (o, _), v in faults.items() if o == op), (op, faults, proxy.requests)

    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="run/manifest.json")["Body"].read())
    assert manifest["status"] == "complete" and manifest["counts"]["rows_ok"] == n


@pytest.mark.parametrize("method,target,op", [
    ("GET", "/b?list-type=2&prefix=x", "list"), ("GET", "/b/k.parquet", "read"),
    ("HEAD", "/b/k", "read"), ("PUT", "/b/k", "write"), ("POST", "/b/k?uploads", "multipart"),
    ("PUT", "/b/k?partNumber=1&uploadId=u", "multipart"), ("DELETE", "/b/k", "delete"),
    ("POST", "/b?delete", "delete"), ("PUT", "/b", "other"), ("HEAD", "/b", "other"),
])  # fmt: skip
def test_proxy_sorts_requests(method, target, op):
    from s3_fault_proxy import operation

    assert operation(method, target) == op
