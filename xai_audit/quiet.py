"""Keep known false alarms of Ray out of the user's terminal, and nothing else.

Ray 2.60's driver logs, from C++ straight to file descriptor 2, an E-level line for every Ray
Data actor pool ("... has constructor arguments in the object store and max_restarts > 0 ...",
ray-project/ray#57733: Ray Data passes its own detached tracker actor to the constructor, so the
restart it warns about works). A Python logging filter cannot reach a C++ write, so
:func:`drop_stderr_lines` puts a pipe on descriptor 2 and relays every other line unchanged.
Ray's real errors, our progress lines and warnings pass; Ray's own log files keep everything.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence

#: Substrings of stderr lines that are known not to concern the user.
RAY_FALSE_ALARMS = (b"has constructor arguments in the object store and max_restarts > 0",)


@contextlib.contextmanager
def drop_stderr_lines(patterns: Sequence[bytes] = RAY_FALSE_ALARMS) -> Iterator[None]:
    """Within the block, lines written to descriptor 2 (by Python, C++ or child processes)
    that contain one of ``patterns`` are dropped; the rest reach the original stderr in order.
    Processes started inside the block keep writing through the relay after it ends (the relay
    thread lives as long as the process)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    done = threading.Event()
    sentinel = b"\0xai-audit-stderr-end\n"

    def relay() -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as src:
            for line in iter(src.readline, b""):
                if line == sentinel:
                    done.set()
                elif not any(p in line for p in patterns):
                    os.write(saved, line)

    threading.Thread(target=relay, name="xai-audit-stderr", daemon=True).start()
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        # everything written before this line reaches the terminal before the block ends
        os.write(2, sentinel)
        os.dup2(saved, 2)
        done.wait(timeout=10)
