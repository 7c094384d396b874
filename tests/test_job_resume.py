"""Resume after a real SIGKILL of a running `xai-audit run` driver.

The first run is killed once some part files are written; `--resume` must finish the run without
recomputing or rewriting the rows already written, and every input row must end up in the output
exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from xai_audit import output as out
from xai_workers.demo import DEMO_MEAN, build_demo_model, write_demo_dataset

N = 96
ROWS_PER_FILE = 8


def _args(dataset, weights, output, *extra):
    mean = ",".join(str(v) for v in DEMO_MEAN)
    return [
        sys.executable, "-m", "xai_audit.cli", "run",
        "--input", dataset, "--output", output,
        "--model", "xai_workers.demo:build_demo_model", "--weights", weights,
        "--image-size", "32", "--mean", mean, "--std", mean,
        "--ig-steps", "8", "--batch-size", "4", "--rows-per-file", str(ROWS_PER_FILE),
        "--address", "local", "--num-cpus", "2", "--progress-interval-s", "1",
        *extra,
    ]  # fmt: skip


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


#: Ray helper processes that may outlive a killed driver for a while; they never write parts.
_AGENTS = ("DashboardAgent", "RuntimeEnvAgent", "dashboard", "log_monitor", "monitor.py")


def _group_workers(pgid: int) -> list[str]:
    """Command lines of the group's processes that could still write (agents left out)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        if cmd and not any(a in cmd for a in _AGENTS):
            found.append(cmd)
    return found


def _parts(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*.parquet")}


def test_resume_after_sigkill_neither_recomputes_nor_duplicates(tmp_path):
    dataset = str(tmp_path / "digits.parquet")
    write_demo_dataset(dataset, n=N)
    torch.manual_seed(0)
    weights = str(tmp_path / "model.pt")
    torch.save(build_demo_model().state_dict(), weights)
    output = tmp_path / "out"
    attr = output / "attributions"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        _args(dataset, weights, str(output)),
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    pgid = proc.pid  # its own session: the driver and everything Ray starts under it
    try:
        deadline = time.monotonic() + 240
        while len(_parts(attr)) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "no part file appeared in time"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as when its machine dies
        proc.wait(timeout=30)
        # Ray's raylet and workers share the driver's fate; wait until none is left writing
        deadline = time.monotonic() + 60
        while _group_workers(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_workers(pgid), _group_workers(pgid)
    finally:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)  # only what this test started
        log.close()
    assert proc.returncode == -signal.SIGKILL

    # A Ray worker outside the driver's process group may still finish a part it was writing
    # (atomically: it appears whole or not at all); count what is on disk once nothing changes.
    before, deadline = _parts(attr), time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = _parts(attr)
        if now == before:
            break
        before = now
    rows_before = sum(pq.ParquetFile(attr / name).metadata.num_rows for name in before)
    assert len(before) >= 2 and len(before) <= rows_before <= ROWS_PER_FILE * len(before), (
        "parts hold at most --rows-per-file rows"
    )
    assert rows_before < N, "the first run should have been cut short after a few parts"
    manifest = json.loads((output / "manifest.json").read_text())
    # "running" when the whole machine dies; "interrupted" when only the driver was killed and
    # its watcher (xai_audit.watch) outlived it
    assert manifest["status"] in ("running", "interrupted")

    # without --resume the output is refused, with a hint
    r = subprocess.run(_args(dataset, weights, str(output)), capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--resume" in r.stderr

    r = subprocess.run(_args(dataset, weights, str(output), "--resume"), capture_output=True,
                       text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"complete: {N}/{N} rows"), last
    assert f"{rows_before} from an earlier run" in last
    assert f"resuming: {rows_before} of {N} rows already written" in r.stderr
    _assert_only_our_lines(r.stderr)

    after = _parts(attr)
    for name, stat in before.items():  # written parts untouched: not rewritten, not removed
        assert after.get(name) == stat, name
    assert not [p for p in attr.iterdir() if p.name.startswith(".")]  # no temp file left

    scan = out.scan(str(attr), {"digits.parquet": N})
    assert scan.rows == N and scan.duplicates == 0 and scan.missing({"digits.parquet": N}) == 0
    m = json.loads((output / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["counts"]["rows_from_earlier_runs"] == rows_before
    assert m["counts"]["rows_computed_this_run"] == N - rows_before  # nothing recomputed
    assert len(m["runs"]) == 2 and "finished_at" not in m["runs"][0]
    assert m["runs"][1]["resumed"] is True


def _assert_only_our_lines(stderr: str) -> None:
    """The user sees our progress lines, warnings and errors, and no Ray noise: no token-auth
    notice, no core_worker.cc line about actor constructor arguments, no 'Progress bars
    disabled', and the final 100% line once."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    noise = [ln for ln in lines if not ln.startswith(("[xai-audit] ", "xai-audit: "))]
    assert not noise, noise
    assert sum("(100%)" in ln for ln in lines) == 1, lines


def test_sigterm_is_an_interruption_with_a_clean_message(tmp_path):
    """SIGTERM (what a scheduler or `kill` sends): exit 143, manifest 'interrupted', one line
    saying how to continue; no C++ stack, no traceback of Ray shutting down under the job."""
    dataset = str(tmp_path / "digits.parquet")
    write_demo_dataset(dataset, n=N)
    weights = str(tmp_path / "model.pt")
    torch.save(build_demo_model().state_dict(), weights)
    output = tmp_path / "out"
    proc = subprocess.Popen(
        _args(dataset, weights, str(output)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not _parts(output / "attributions"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        out_, err = proc.communicate(timeout=120)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)  # only what this test started
    assert proc.returncode == 143, (out_, err)
    assert "interrupted; run again with --resume to finish" in err
    assert "Traceback" not in err and "SIGTERM received" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert all(ln.startswith(("[xai-audit] ", "xai-audit: ")) for ln in lines), lines
    assert json.loads((output / "manifest.json").read_text())["status"] == "interrupted"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
