"""The job's Ray: connecting to (or starting) it, SIGTERM as an interruption, and sizing the
stages on the resources it offers."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from dataclasses import dataclass

from xai_audit.config import JobConfig


def connect(cfg: JobConfig) -> bool:
    """Connect to / start Ray unless the caller already did; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address
    if address is None and cfg.num_cpus is not None:
        address = "local"
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING)
    if address in (None, "local"):
        kwargs["num_cpus"] = cfg.num_cpus
    # Ray 2.60 says at every start that token authentication is on (it is, and we keep it):
    # not a warning for our users. Ray's own log files keep it.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    ray.init(address=address, **kwargs)
    return True


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as an interrupt: the manifest says 'interrupted', --resume continues."""


@contextlib.contextmanager
def sigterm_interrupts():
    """In the main thread: SIGTERM raises :class:`Terminated` there (instead of Ray's handler,
    which prints a C++ stack and shuts Ray down under the running pipeline). Restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Resources:
    """How the stages are sized on the cluster Ray gives us."""

    nodes: int
    cpus: float
    gpus: int
    device: str
    actors: int
    actor_num_cpus: float
    actor_num_gpus: float
    worker_threads: int | None
    read_num_cpus: float
    write_num_cpus: float

    def describe(self) -> dict:
        return dict(self.__dict__)


def plan_resources(cfg: JobConfig) -> Resources:
    """Size the actor pool and the tasks from the cluster's resources.

    GPU cluster: one actor per GPU (``--actors`` to change), 1 GPU each. CPU only: one actor per
    node (``--actors``: more), each reserving part of a node's CPUs so that read and write
    tasks always find a CPU (a 2-core machine never stalls); the worker sets its torch threads to
    its share of the node's cores (Ray's OMP_NUM_THREADS would follow the reservation).
    """
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    n_nodes = max(1, len(nodes))
    node_cpus = min((n["Resources"]["CPU"] for n in nodes), default=1.0)
    cpus = float(res.get("CPU", 0))
    if gpus:
        actors = cfg.actors or gpus
        gpu_nodes = [n for n in nodes if n["Resources"].get("GPU", 0) > 0] or nodes
        per_node_gpus = max(n["Resources"].get("GPU", 1) for n in gpu_nodes)
        gpu_node_cpus = min(n["Resources"]["CPU"] for n in gpu_nodes)
        actor_cpus = min(1.0, max(0.25, (gpu_node_cpus - 1) / max(1, per_node_gpus)))
        return Resources(n_nodes, cpus, gpus, "cuda", actors, actor_cpus, 1.0, None, 1.0, 0.5)
    actors = cfg.actors or n_nodes
    per_node = math.ceil(actors / n_nodes)
    threads = max(1, int(node_cpus // per_node))
    actor_cpus = max(0.25, min(float(threads), (node_cpus - 1) / per_node))
    small = node_cpus <= 4
    return Resources(
        n_nodes, cpus, 0, "cpu", actors, round(actor_cpus, 3), 0.0,
        threads if per_node > 1 else None, 0.5 if small else 1.0, 0.25 if small else 0.5,
    )  # fmt: skip
