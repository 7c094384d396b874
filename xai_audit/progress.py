"""Progress of a running job: the counter actor the write tasks report to, the driver's loop that
polls it while the pipeline runs, and the progress line (rows, rows/s, ETA)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class ProgressCounter:
    """Totals reported by the job's tasks: rows, error rows, files and bytes written (the write
    tasks), and rows computed and in flight (the attribution actors, per batch: a batch of
    adaptive IG can take minutes before its first part is written). Runs as a Ray actor
    (:func:`progress_actor_class`)."""

    def __init__(self):
        self.totals = [0, 0, 0, 0]
        self.computed = self.in_flight = 0
        self.starts = 0

    def started(self) -> None:
        """An attribution actor started (a restarted one counts again)."""
        self.starts += 1

    def get_starts(self) -> int:
        return self.starts

    def add(self, rows: int, errors: int, nbytes: int) -> None:
        self.totals[0] += rows
        self.totals[1] += errors
        self.totals[2] += 1
        self.totals[3] += nbytes

    def batch_started(self, rows: int) -> None:
        self.in_flight += rows

    def batch_done(self, rows: int) -> None:
        self.in_flight = max(0, self.in_flight - rows)
        self.computed += rows

    def get(self) -> list[int]:
        """``[rows, errors, files, bytes, computed, in_flight]``: :meth:`Progress.update`'s."""
        return [*self.totals, self.computed, self.in_flight]


def progress_actor_class():
    import ray

    return ray.remote(num_cpus=0)(ProgressCounter)


def poll(counter, progress: Progress, force: bool = False) -> None:
    """One progress update from the counter actor; progress is never worth failing the job."""
    import ray

    try:
        totals = ray.get(counter.get.remote(), timeout=30)
    except Exception:  # noqa: BLE001
        return
    progress.update(*totals, force=force)


def drive_pipeline(
    pipeline: Callable[[object], None],
    progress: Progress,
    interval: float,
    name: str = "xai-audit-pipeline",
    watch: Callable[[], None] | None = None,
) -> int:
    """Run ``pipeline(counter)`` (a blocking Ray Data pipeline whose write tasks report to the
    progress ``counter`` actor) in a thread, and print progress lines from the counter while it
    runs. Returns how many times an actor reported its start (restarts count again; -1 when
    unknown). The pipeline's exception is re-raised here; the counter is always killed."""
    import threading

    import ray

    counter = progress_actor_class().remote()
    failure: list[BaseException] = []

    def target():
        try:
            pipeline(counter)
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread
            failure.append(e)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    every = max(0.2, min(2.0, interval or 0.2))
    try:
        while thread.is_alive():
            thread.join(timeout=every)
            poll(counter, progress)
            if watch is not None:
                watch()  # raises when the cluster is gone (xai_audit.ray_session.cluster_watch)
        poll(counter, progress, force=True)
        try:
            starts = int(ray.get(counter.get_starts.remote(), timeout=30))
        except Exception:  # noqa: BLE001 - a count is never worth failing the job
            starts = -1
    finally:
        try:
            ray.kill(counter)
        except Exception:  # noqa: BLE001 - already gone
            pass
    if failure:
        raise failure[0]
    return starts


class Progress:
    """Prints rows done, rows/s and ETA at most every ``interval`` seconds."""

    def __init__(
        self, total: int, before: int, log, interval: float = 5.0, busy: str | None = None
    ):
        self.total, self.before, self.log, self.interval = total, before, log, interval
        #: what a batch is doing, said while rows are computed but not yet written
        self.busy = busy
        self.t0 = time.monotonic()
        self.first: tuple[float, int] | None = None
        self.last = 0.0
        self.rows = self.errors = self.files = self.bytes = 0
        self.computed = self.in_flight = 0
        self.printed: tuple | None = None

    def start(self) -> None:
        """Start the clock (after Ray is up)."""
        self.t0 = self.last = time.monotonic()

    def update(
        self,
        rows: int,
        errors: int,
        files: int,
        nbytes: int,
        computed: int = 0,
        in_flight: int = 0,
        force: bool = False,
    ) -> None:
        """The totals so far (rows, errors, files, bytes from the write tasks; rows computed and
        in flight from the actors); prints a line when it is time."""
        now = time.monotonic()
        if self.first is None and files:
            self.first = (now, rows)
        self.rows, self.errors, self.files, self.bytes = rows, errors, files, nbytes
        self.computed, self.in_flight = computed, in_flight
        # before the first part (minutes, for big images on CPUs) a heartbeat every 30 s
        wait = self.interval if files else max(30.0, self.interval)
        state = (rows, errors, files, computed)
        if (force and state != self.printed) or now - self.last >= wait:
            self.last, self.printed = now, state
            self.log(self.line())

    def rate(self) -> float:
        """Rows/s: since the first part once there are a few (leaves out actor start-up)."""
        now = time.monotonic()
        first = self.first
        if first is not None and self.files >= 3 and self.rows > first[1] and now > first[0]:
            return (self.rows - first[1]) / (now - first[0])
        dt = now - self.t0
        return max(self.rows, self.computed) / dt if dt > 0 else 0.0

    def line(self) -> str:
        grand = self.before + self.total
        done = min(self.before + self.rows, grand)  # a retried write reports twice
        pct = 100.0 * done / grand if grand else 100.0
        rate = self.rate()
        left = self.total - max(self.rows, self.computed)
        eta = left / rate if rate > 0 else float("nan")
        line = (
            f"{done}/{grand} rows ({pct:.0f}%) | {rate:.1f} rows/s | ETA {hms(eta)} | "
            f"{self.errors} errors | {self.files} files"
        )
        if self.computed > self.rows or (self.in_flight and not self.computed):
            # rows leave the actors before they are written (a part holds many batches)
            what = f"{self.computed} computed" if self.computed else "first batch"
            busy = f" ({self.busy})" if self.busy else ""
            line += f" | {what}, {self.in_flight} rows in flight{busy}"
        return line


def size_text(n: float) -> str:
    """Bytes for a person: 866.4 KB, 1.1 TB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
