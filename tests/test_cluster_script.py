"""cluster/local_cluster.sh as a new user runs it (issue 23, items 2 and 3): without an
activated venv it finds `ray` beside the Python it runs with, and the env file it prints is the
one README.md tells users to source. `check` starts nothing."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_cluster.sh"
VENV_BIN = Path(sys.executable).parent  # this test's venv: python and ray side by side


def _bare_env(**extra) -> dict:
    """No activated venv: no VIRTUAL_ENV, a PATH without the venv's bin."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **extra}


def test_finds_ray_beside_the_repos_venv_without_activation(tmp_path):
    assert (VENV_BIN / "ray").exists()
    repo = tmp_path / "repo"
    (repo / "cluster").mkdir(parents=True)
    shutil.copy2(SCRIPT, repo / "cluster" / "local_cluster.sh")
    (repo / ".venv").symlink_to(VENV_BIN.parent)  # a clone with its .venv, as README makes
    r = subprocess.run(["bash", str(repo / "cluster" / "local_cluster.sh"), "check"],
                       env=_bare_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"ray: {repo}/cluster/../.venv/bin/ray (ray, version" in r.stdout, r.stdout
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    assert f"env file: /tmp/xai-cluster-{user}/env.sh" in r.stdout, r.stdout


def test_xai_python_names_the_venv_and_no_ray_is_one_clear_line(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "check"], env=_bare_env(XAI_PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and f"ray: {VENV_BIN}/ray" in r.stdout, (r.stdout, r.stderr)
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.symlink_to(sys.executable)  # a Python with no ray beside it
    r = subprocess.run(["bash", str(SCRIPT), "start"], env=_bare_env(XAI_PYTHON=str(fake)),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "no ray beside" in r.stderr and "XAI_PYTHON" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_readme_sources_the_env_file_the_script_writes():
    script = SCRIPT.read_text()
    assert "STATE=${XAI_CLUSTER_DIR:-/tmp/xai-cluster-$(id -un)}" in script
    assert "ENV_FILE=$STATE/env.sh" in script and 'echo "source $ENV_FILE' in script
    for doc in ("README.md", "docs/operations.md"):
        lines = [ln for ln in (ROOT / doc).read_text().splitlines() if "xai-cluster-" in ln]
        assert lines, doc
        for ln in lines:
            assert "source /tmp/xai-cluster-$(id -un)/env.sh" in ln, (doc, ln)


def test_ray_datas_memory_warning_is_printed_once_per_operator():
    """Ray Data's issue detector repeats it every 30 s; the job lets the first one through."""
    from xai_audit.pipeline import OncePerOperator

    f = OncePerOperator()

    def rec(msg):
        return logging.LogRecord("x", logging.WARNING, __file__, 1, msg, None, None)

    # as Ray logs it: wrapped over lines
    warn = "\n\nOperator 'MapBatches(JobWorker)' uses 942.3MiB of memory per\nworker on average"
    later = "Operator 'MapBatches(JobWorker)' uses 1.4GiB of memory per worker on average (up to"
    other = "Operator 'MapBatches(read_and_preprocess)' uses 2GiB of memory per worker on average"
    seq = [warn, "Found 1 issues. To disable", later, "Found 1 issues. To disable", other,
           "Found 1 issues. To disable", "something else"]  # fmt: skip
    assert [f.filter(rec(m)) for m in seq] == [True, True, False, False, True, True, True]
