"""Which Ray a run uses, and how it ends when that Ray is not there (issues 22.2, 23.1, 23.4):
a private local Ray unless --address / RAY_ADDRESS names one; a stale ``ray_current_cluster``
file never captures a plain run; an unreachable address is one line and exit 2, quickly;
SIGTERM while connecting is an interruption; a cluster lost mid-run is noticed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest

from xai_audit import ray_session
from xai_audit.cli import main
from xai_audit.config import JobConfig
from xai_workers.demo import write_demo_dataset

SPEC = "xai_workers.demo:build_demo_model"


def _dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("rs") / "d.parquet"
    write_demo_dataset(str(path), n=6)
    return str(path)


def _argv(dataset, output, *extra):
    return ["run", "--input", dataset, "--output", str(output), "--model", SPEC,
            "--weights", "random", "--image-size", "32", *extra]  # fmt: skip


def test_a_stale_cluster_file_never_captures_a_plain_run(monkeypatch):
    """Ray's ``<RAY_TMPDIR>/ray/ray_current_cluster`` names a dead head (what `ray stop` or a
    stopped cluster/local_cluster.sh leaves): a run without --address starts its own Ray. The
    file is faked in a temporary RAY_TMPDIR, never in this machine's /tmp/ray."""
    import ray

    assert not ray.is_initialized()
    stale = f"127.0.0.1:{_dead_port()}"
    tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")  # short: Ray's socket paths live here
    os.makedirs(os.path.join(tmp, "ray"))
    with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write(stale)
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.monotonic()
    try:
        # no --num-cpus either (with it, earlier versions started a local Ray too)
        assert ray_session.connect(JobConfig()) is True
        assert ray.get_runtime_context().gcs_address != stale
    finally:
        ray.shutdown()
    assert time.monotonic() - t0 < 120


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_unreachable_address_is_one_line_and_exit_2(capsys, dataset, tmp_path, monkeypatch,
                                                       how):  # fmt: skip
    address = f"127.0.0.1:{_dead_port()}"
    extra = ("--address", address) if how == "flag" else ()
    if how == "env":
        monkeypatch.setenv("RAY_ADDRESS", address)
    t0 = time.monotonic()
    assert main(_argv(dataset, tmp_path / "o", *extra)) == 2
    assert time.monotonic() - t0 < ray_session.CONNECT_TIMEOUT_S + 30
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("xai-audit: error:")]
    assert len(lines) == 1, err
    assert address in lines[0] and "--address local" in lines[0], lines[0]
    assert not (tmp_path / "o" / "manifest.json").exists()  # checked before anything is written


def test_sigterm_while_connecting_is_an_interruption(dataset, tmp_path):
    """The address answers TCP but is no Ray (a socket that never speaks), so ray.init keeps
    retrying; SIGTERM then: exit 143, manifest 'interrupted', the resume command printed."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    address = f"127.0.0.1:{hole.getsockname()[1]}"
    output = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xai_audit.cli", *_argv(dataset, output, "--address", address)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )  # fmt: skip
    try:
        manifest = output / "manifest.json"
        deadline = time.monotonic() + 120
        while not manifest.exists():  # written just before the run connects to Ray
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(3)  # inside ray.init's connection retries (about 20 s of them)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        out_, err = proc.communicate(timeout=60)
    finally:
        hole.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only what this test started
    assert proc.returncode == 143, (out_, err)
    m = json.loads(manifest.read_text())
    assert m["status"] == "interrupted" and "SIGTERM" in m["error"], m.get("error")
    assert "SystemExit" not in err and "Traceback" not in err, err
    assert "--resume" in err and address in err, err


def test_a_lost_cluster_is_noticed(monkeypatch):
    """``cluster_watch`` raises ClusterLost (an interruption) once the GCS refuses connections
    for ``lost_after_s``, and stays quiet while it answers."""
    import ray

    alive = socket.socket()
    alive.bind(("127.0.0.1", 0))
    alive.listen(8)
    try:
        ctx = SimpleNamespace(gcs_address=f"127.0.0.1:{alive.getsockname()[1]}")
        monkeypatch.setattr(ray, "get_runtime_context", lambda: ctx)
        ray_session.cluster_watch(lost_after_s=0.0, probe_every_s=0.0)()  # answers: quiet
    finally:
        alive.close()
    ctx = SimpleNamespace(gcs_address=f"127.0.0.1:{_dead_port()}")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: ctx)
    check = ray_session.cluster_watch(lost_after_s=0.5, probe_every_s=0.0)
    check()  # first refusal: not yet lost
    time.sleep(0.6)
    with pytest.raises(ray_session.ClusterLost, match="stopped answering"):
        check()
    assert issubclass(ray_session.ClusterLost, KeyboardInterrupt)  # manifest: interrupted
