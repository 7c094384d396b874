"""One storage configuration per process (issue 20, item 3): ``xai_workers.storage.configure``
resolves the S3 endpoint once (``--s3-endpoint``, else ``AWS_ENDPOINT_URL``), every later call
uses it without being told, and ``worker_env`` hands it to other processes (Ray workers)."""

from __future__ import annotations

import os
import subprocess
import sys

from xai_audit import output as out
from xai_workers import storage


def test_aws_endpoint_url_is_honoured(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert storage.configure() == s3_server
    uri = f"s3://{s3_bucket}/x/manifest.json"
    out.write_json(uri, {"a": 1})  # no endpoint passed: the configured one
    assert out.read_json(uri) == {"a": 1}
    assert storage.worker_env() == {"AWS_ENDPOINT_URL": s3_server}


def test_flag_wins_over_the_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    storage.configure(s3_server)
    uri = f"s3://{s3_bucket}/y.json"
    out.write_json(uri, [1, 2])
    assert out.read_json(uri) == [1, 2]
    assert storage.worker_env() == {"AWS_ENDPOINT_URL": s3_server}


def test_nothing_configured_means_aws(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert storage.configure() is None and storage.worker_env() == {}
    fs, path = storage.filesystem("s3://bucket/key")
    assert path == "bucket/key" and fs.client_kwargs.get("endpoint_url") is None


def test_a_worker_process_gets_the_drivers_endpoint(s3_server, s3_bucket):
    """What a Ray worker does: a fresh process, with only ``worker_env()`` in its environment,
    reads what the driver wrote."""
    storage.configure(s3_server)
    uri = f"s3://{s3_bucket}/z.json"
    out.write_json(uri, {"z": 3})
    code = f"from xai_audit import output as out; print(out.read_json({uri!r})['z'])"
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    r = subprocess.run([sys.executable, "-c", code], env={**env, **storage.worker_env()},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr[-2000:]
