"""A driver that Ray ends abruptly (``_exit(1)`` when its cluster goes away: issue 22, item 2)
leaves a manifest saying ``interrupted``, and one line with the command that continues it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DRIVER = """
import json, os, sys
from xai_audit import watch
out = sys.argv[1]
watch.start(out, "127.0.0.1:6390", "xai-audit run --input x --output " + out + " --resume")
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump({"status": sys.argv[2], "runs": [{"pid": os.getpid()}]}, f)
os._exit(1)  # as Ray's core worker ends a driver whose cluster is gone
"""


@pytest.mark.parametrize("status", ["running", "complete"])
def test_an_abrupt_end_is_recorded_as_an_interruption(tmp_path, status):
    r = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), status],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1  # and run() waited for the watcher too: it holds the same pipes
    m = json.loads((tmp_path / "manifest.json").read_text())
    if status == "complete":  # an end the driver recorded itself: left alone, nothing said
        assert m["status"] == "complete" and not r.stderr.strip(), r.stderr
        return
    assert m["status"] == "interrupted" and "127.0.0.1:6390" in m["error"], m
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xai-audit: error: the run ended abruptly")
    assert lines[0].endswith(f"continue with: xai-audit run --input x --output {tmp_path} --resume")


def test_another_runs_manifest_is_left_alone(tmp_path):
    """The manifest of a run by another process (pid) is not this driver's to correct."""
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "running",
                                                        "runs": [{"pid": 1}]}))  # fmt: skip
    code = ("import os, sys; from xai_audit import watch; "
            "watch.start(sys.argv[1], 'c', 'again'); os._exit(1)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "running"
    assert not r.stderr.strip(), r.stderr
