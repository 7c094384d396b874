"""One writer per output (xai_audit.lock): a live run's lock refuses a second run with a message
naming it; a lock whose run is gone is taken over (at once on the same host when its pid is
dead, after its heartbeat goes stale elsewhere); the lock is released however a run ends. No Ray."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from xai_audit import lock as L
from xai_audit.config import ConfigError


def _plant(output, **held) -> None:
    """A lock file as another run would have left it."""
    info = {"tool": "xai-audit", "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": "2026-01-01T00:00:00+00:00", "token": "other",
            "heartbeat_unix": time.time(), **held}  # fmt: skip
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, L.LOCK_FILE), "w") as f:
        json.dump(info, f)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_live_holder_is_named_and_refused(tmp_path):
    out = str(tmp_path / "o")
    _plant(out, pid=os.getppid())  # a live process on this host that is not us
    with pytest.raises(ConfigError) as e:
        L.acquire(out)
    msg = str(e.value)
    for needle in (socket.gethostname(), f"pid {os.getppid()}", "2026-01-01T00:00:00", "heartbeat"):
        assert needle in msg, msg
    other_host = {"host": "elsewhere", "pid": 1, "heartbeat_unix": time.time() - 10}
    _plant(out, **other_host)  # another machine, heartbeat fresh: alive as far as we can tell
    with pytest.raises(ConfigError, match="host elsewhere"):
        L.acquire(out)


def test_gone_holders_are_taken_over(tmp_path):
    out = str(tmp_path / "o")
    logs: list[str] = []
    _plant(out, pid=_dead_pid())  # killed driver on this host: taken at once (then --resume)
    lock = L.acquire(out, log=logs.append)
    assert "is gone" in logs[-1]
    held = json.loads((tmp_path / "o" / L.LOCK_FILE).read_text())
    assert held["pid"] == os.getpid() and held["token"] == lock.info["token"]
    lock.release()
    assert not (tmp_path / "o" / L.LOCK_FILE).exists()
    _plant(out, host="elsewhere", pid=1, heartbeat_unix=time.time() - L.STALE_S - 5)
    with L.acquire(out, log=logs.append):
        assert "last heartbeat was" in logs[-1]
    assert not (tmp_path / "o" / L.LOCK_FILE).exists()


def test_heartbeat_keeps_the_lock_fresh_and_a_taken_over_lock_is_not_removed(tmp_path):
    out = str(tmp_path / "o")
    lock = L.acquire(out)
    first = lock.info["heartbeat_unix"]
    lock.start_heartbeat(every_s=0.05)
    time.sleep(0.5)
    held = json.loads((tmp_path / "o" / L.LOCK_FILE).read_text())
    assert held["heartbeat_unix"] > first
    lock._stop.set()
    lock._thread.join()
    _plant(out, host="elsewhere", token="newer")  # another run took over meanwhile
    lock.release()
    assert json.loads((tmp_path / "o" / L.LOCK_FILE).read_text())["token"] == "newer"


def test_a_second_run_is_refused_and_the_lock_released_after_a_failed_prepare(tmp_path):
    """Through the job: a live holder makes `xai-audit run` exit 2 before any work; a prepare
    that fails after taking the lock (existing output without --resume) gives it back."""
    from xai_audit import attribute as job
    from xai_audit.cli import main
    from xai_audit.config import JobConfig
    from xai_workers.demo import write_demo_dataset

    data = str(tmp_path / "d.parquet")
    write_demo_dataset(data, n=4)
    out = tmp_path / "o"
    _plant(str(out), pid=os.getppid())
    argv = ["run", "--input", data, "--output", str(out), "--model",
            "xai_workers.demo:build_demo_model", "--image-size", "32"]  # fmt: skip
    assert main(argv) == 2
    os.remove(out / L.LOCK_FILE)
    (out / "manifest.json").write_text("{}")  # an earlier run's output
    cfg = JobConfig(input=data, output=str(out), model="xai_workers.demo:build_demo_model",
                    image_size=32)  # fmt: skip
    with pytest.raises(ConfigError, match="already holds"):
        job.prepare(cfg, log=lambda m: None)
    assert not (out / L.LOCK_FILE).exists()
