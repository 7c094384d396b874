"""A watcher beside ``xai-audit run``: when the driver ends without recording how (Ray's core
worker ends the driver with ``_exit(1)`` the moment its cluster goes away, before Python can
react), the manifest still says ``running``; the watcher then marks it ``interrupted`` and
prints one line with the command that continues the run.

The driver holds the write end of a pipe whose read end is the watcher's stdin; the watcher
waits for end-of-file, which comes only when the driver has exited, however it exited. A run
that ended normally, failed or was interrupted has already written its status: the watcher
leaves it alone. It acts only on the manifest of the driver's own run (``runs[-1].pid``).

    python -m xai_audit.watch OUTPUT DRIVER_PID CLUSTER RESUME_COMMAND
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def start(output: str, cluster: str, again: str, stderr: int | None = None) -> int:
    """Start the watcher of this process's run of ``output``; returns the pipe's write end,
    which this process keeps open until it exits (never close it: its end-of-file is the
    signal). The watcher gets this process's storage configuration; ``stderr``: the descriptor
    its line goes to (the terminal's, not ``xai_audit.quiet``'s relay, which dies with this
    process)."""
    from xai_workers.storage import worker_env

    r, w = os.pipe()  # not inheritable: Ray's processes started from here do not hold it
    subprocess.Popen(
        [sys.executable, "-m", "xai_audit.watch", output, str(os.getpid()), cluster, again],
        stdin=r,
        stderr=stderr,
        env={**os.environ, **worker_env()},
    )
    os.close(r)
    return w


def main(argv: list[str]) -> int:
    output, pid, cluster, again = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    while sys.stdin.buffer.read(65536):  # until the driver has exited
        pass
    from xai_audit import output as out

    uri = out.join(output, out.MANIFEST)
    try:
        manifest = out.read_json(uri)
    except Exception:  # noqa: BLE001 - no manifest (ended before it), nothing to correct
        return 0
    runs = manifest.get("runs") or [{}]
    if manifest.get("status") != "running" or runs[-1].get("pid") != int(pid):
        return 0
    why = f"the run ended abruptly (its Ray cluster, {cluster}, went away, or it was killed)"
    manifest.update(status="interrupted", error=why)
    try:
        out.write_json(uri, manifest)
    except Exception:  # noqa: BLE001 - say so; the line below still tells how to continue
        why += "; the manifest could not be updated"
    print(f"xai-audit: error: {why}; what was written is kept; continue with: {again}",
          file=sys.stderr, flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
