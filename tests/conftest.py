"""Shared fixtures: a real S3 API (moto's HTTP server) on loopback, and fresh buckets in it.

``s3_server`` (session): starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 and a free port,
sets dummy AWS credentials and region in the environment for the session (so no real AWS account
or profile is ever used) and yields the endpoint URL, e.g. ``http://127.0.0.1:54321``. Pass it as
``s3_endpoint=`` / ``--s3-endpoint``; ``AWS_ENDPOINT_URL`` is NOT set, so tests choose.

``storage_unconfigured`` (autouse): every test starts with no process-wide storage configuration
(``xai_workers.storage.configure``), whatever an earlier test's job configured.

``s3_bucket`` (function): creates a new, empty bucket on that server and yields its name.

``ray_session`` (module): a local Ray (2 CPUs, no dashboard) for the module's tests, shut down
after them; started after ``s3_server`` so that Ray's workers inherit its AWS_* variables.
"""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(autouse=True)
def storage_unconfigured(monkeypatch):
    from xai_workers import storage

    monkeypatch.setattr(storage, "_ENDPOINT", None)


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name in (
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
        ):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_SESSION_TOKEN", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_REGION", "us-east-1")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="module")
def ray_session(s3_server):
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()
