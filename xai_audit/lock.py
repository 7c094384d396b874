"""One writer per output: ``<output>/_xai_audit_lock.json``, with a heartbeat.

A run takes the lock before it changes anything under ``<output>`` (also before ``--overwrite``
removes an earlier output) and keeps it fresh from a thread every ``HEARTBEAT_S`` seconds; it
releases it when it ends, however it ends. A second run into the same output is refused with a
message that names the holder (host, pid, start time, last heartbeat). A lock left by a run that
is gone is taken over: at once when its holder was on this host and its pid no longer runs (a
killed driver, then ``--resume``), else once its heartbeat is older than ``STALE_S``.

Two runs starting within the same instant could both find no lock (S3 has no portable
create-if-absent): after writing, a run reads the lock back and gives way when another run's
token is there. The lock file starts with ``_``, so readers of ``<output>`` (pyarrow, DuckDB,
Spark) skip it, and ``--overwrite`` leaves it alone.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from xai_audit import output as out
from xai_audit.errors import ConfigError

LOCK_FILE = "_xai_audit_lock.json"
HEARTBEAT_S = 30.0
STALE_S = 180.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read(uri: str) -> dict | None:
    try:
        data = out.read_json(uri)
    except (FileNotFoundError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _why_stale(held: dict, now: float, stale_s: float) -> str | None:
    """Why ``held`` no longer holds (a reason to log), or None when its run is alive."""
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        if held["pid"] == os.getpid():
            return "this process's own earlier lock"
        if not _pid_alive(held["pid"]):
            return f"its run (pid {held['pid']} on this host) is gone"
        return None
    age = now - float(held.get("heartbeat_unix", 0.0))
    if age > stale_s:
        return f"its last heartbeat was {age:.0f} s ago (> {stale_s:.0f} s)"
    return None


@dataclass
class Lock:
    """A held lock; :meth:`release` (or the context manager) gives it up and stops the beat."""

    uri: str
    info: dict
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _write(self) -> None:
        self.info["heartbeat_at"] = _now()
        self.info["heartbeat_unix"] = time.time()
        out.write_json(self.uri, self.info)

    def start_heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        def beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    self._write()
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                    pass

        self._thread = threading.Thread(target=beat, name="xai-audit-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = _read(self.uri)
        if held is not None and held.get("token") != self.info["token"]:
            return  # taken over meanwhile (we were thought gone): not ours to remove
        try:
            fs, path = out._fs(self.uri)
            fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(
    output: str,
    *,
    stale_s: float = STALE_S,
    log=lambda msg: None,
    settle_s: float = 0.2,
) -> Lock:
    """Take the lock of ``output`` or raise :class:`ConfigError` naming the run that holds it."""
    uri = out.join(output, LOCK_FILE)
    held = _read(uri)
    if held is not None:
        why = _why_stale(held, time.time(), stale_s)
        if why is None:
            age = time.time() - float(held.get("heartbeat_unix", 0.0))
            raise ConfigError(
                f"output {output} is being written by another xai-audit run: host "
                f"{held.get('host')}, pid {held.get('pid')}, started {held.get('started_at')}, "
                f"last heartbeat {age:.0f} s ago. Wait for it to finish (or stop it), or write "
                f"elsewhere; a lock whose run is gone is taken over {stale_s:.0f} s after its "
                f"last heartbeat ({uri})"
            )
        if why != "this process's own earlier lock":
            log(f"taking over the lock of {output}: {why}")
    lock = Lock(
        uri,
        {
            "tool": "xai-audit",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": _now(),
            "token": uuid.uuid4().hex,
        },
    )
    lock._write()
    time.sleep(settle_s)
    now_held = _read(uri)
    if now_held is None or now_held.get("token") != lock.info["token"]:
        who = now_held or {}
        raise ConfigError(
            f"output {output} was taken by another xai-audit run starting at the same time "
            f"(host {who.get('host')}, pid {who.get('pid')}); write elsewhere or wait for it"
        )
    return lock
