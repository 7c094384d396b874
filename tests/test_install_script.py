"""scripts/install.sh picks the torch wheel index for the machine (issue 22, item 6), checked
with its dry run: a faked ``nvidia-smi`` on PATH says whether there is a GPU, and a local HTTP
server stands in for PyTorch's CPU index (this machine cannot reach the real one)."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install.sh"


def _fake_nvidia_smi(folder: Path, gpu: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = 'echo "GPU 0: NVIDIA H100 (UUID: GPU-0)"' if gpu else "exit 9"  # driver, no device
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{body}\n")
    (folder / "nvidia-smi").chmod(0o755)
    return folder


def _dry_run(path_dir: Path, index: str, extras: str = "test") -> tuple[list[str], str, float]:
    env = {**os.environ, "PATH": f"{path_dir}:{os.environ['PATH']}", "XAI_INSTALL_DRY_RUN": "1",
           "XAI_TORCH_CPU_INDEX": index}  # fmt: skip
    env.pop("XAI_TORCH_INDEX", None)
    t0 = time.monotonic()
    p = subprocess.run([str(SCRIPT), extras], env=env, capture_output=True, text=True,
                       timeout=60, check=True)  # fmt: skip
    return p.stdout.splitlines(), p.stderr, time.monotonic() - t0


@pytest.fixture
def cpu_index(tmp_path):
    """An HTTP server with a ``torch/`` page, like PyTorch's CPU index."""
    (tmp_path / "idx" / "torch").mkdir(parents=True)
    (tmp_path / "idx" / "torch" / "index.html").write_text("<html></html>")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "idx"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _torch_line(lines: list[str]) -> str:
    return next(ln for ln in lines if " install " in ln and "torch==" in ln)


def test_gpu_machine_keeps_the_default_index(tmp_path, cpu_index):
    lines, err, _ = _dry_run(_fake_nvidia_smi(tmp_path / "bin", gpu=True), cpu_index)
    assert _torch_line(lines).endswith("pip install torch==2.14.1 torchvision==0.29.1")
    assert "GPU found" in err
    assert lines[-1].endswith("pip install -e .[test]")


def test_cpu_machine_adds_the_cpu_index_when_it_answers(tmp_path, cpu_index):
    lines, err, _ = _dry_run(_fake_nvidia_smi(tmp_path / "bin", gpu=False), cpu_index, "analytics")
    assert f"--extra-index-url {cpu_index} torch==2.14.1 torchvision==0.29.1" in _torch_line(lines)
    assert lines[-1].endswith("pip install -e .[analytics]")
    # the pins come from pyproject.toml
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in text and '"torchvision==0.29.1"' in text


def test_cpu_machine_falls_back_fast_when_the_index_is_unreachable(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/whl/cpu"
    lines, err, took = _dry_run(_fake_nvidia_smi(tmp_path / "bin", gpu=False), dead)
    assert "--extra-index-url" not in _torch_line(lines)
    assert "does not answer" in err and took < 30
