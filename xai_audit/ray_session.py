"""The job's Ray: connecting to (or starting) it, SIGTERM as an interruption, and sizing the
stages on the resources it offers."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

from xai_audit.config import JobConfig
from xai_audit.errors import ConfigError

#: How long connecting to a given cluster may take before the run gives up (exit 2)
CONNECT_TIMEOUT_S = 10.0
#: How long a run's cluster may stay unreachable before the run ends as interrupted (Ray's own
#: driver gives up after ``gcs_rpc_server_reconnect_timeout_s``, 60 s, and exits silently)
LOST_AFTER_S = 15.0


def address_of(cfg: JobConfig) -> str | None:
    """The Ray cluster a run uses: ``--address``, else ``$RAY_ADDRESS``, else None: a private
    local Ray started for this run (never one already running on the machine, never the one a
    stale ``/tmp/ray/ray_current_cluster`` names). ``local`` also means a private local Ray."""
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def _unreachable(address: str) -> ConfigError:
    source = "" if address != os.environ.get("RAY_ADDRESS") else " ($RAY_ADDRESS)"
    return ConfigError(
        f"cannot connect to the Ray cluster at {address}{source} within "
        f"{CONNECT_TIMEOUT_S:.0f} s; start it, or pass --address local for a private local Ray"
    )


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a cluster address (``host:port``, ``ray://host:port``, ``auto``:
    the cluster Ray's own files name); None when there is none to find (``auto``)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto")
        except Exception:  # noqa: BLE001 - "no running cluster found"
            return None
        if address is None:
            return None
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected host:port, ray://host:port or local")
    return host.strip("[]"), int(port)


def check_address(cfg: JobConfig, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """ConfigError (exit 2, one line naming the address and ``--address local``) unless the
    cluster a run was told to use answers within ``timeout_s``; nothing for a private local
    Ray or when Ray is already up in this process. Runs before anything is written."""
    import ray

    address = address_of(cfg)
    if address is None or ray.is_initialized():
        return
    hp = _host_port(address)
    if hp is None:
        raise _unreachable(address)
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError:
        raise _unreachable(address) from None


def connect(cfg: JobConfig) -> bool:
    """Connect to the run's Ray (:func:`address_of`) unless the caller already did; True if
    this call started or joined it. SIGTERM while connecting raises :class:`Terminated` (Ray
    turns it into ``SystemExit(15)``); a cluster that does not answer is a ConfigError."""
    import ray

    if ray.is_initialized():
        return False
    address = address_of(cfg)
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING)
    if address is None:
        address = "local"
        kwargs["num_cpus"] = cfg.num_cpus
    # Ray 2.60 says at every start that token authentication is on (it is, and we keep it):
    # not a warning for our users. Ray's own log files keep it.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    try:
        ray.init(address=address, **kwargs)
    except SystemExit as e:  # Ray's SIGTERM handler while it connects: sys.exit(15)
        if e.code == signal.SIGTERM:
            raise Terminated("SIGTERM while connecting to Ray") from None
        raise
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        if address == "local":
            raise
        raise _unreachable(address) from e
    finally:
        _reinstall_sigterm()  # ray.init replaced the handler of sigterm_interrupts, if any
    return True


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as an interrupt: the manifest says 'interrupted', --resume continues."""


class ClusterLost(KeyboardInterrupt):
    """The run's Ray cluster stopped answering mid-run: an interruption (the manifest says
    'interrupted', --resume continues)."""


def _sigterm(signum, frame):
    raise Terminated("SIGTERM")


#: handlers installed by sigterm_interrupts, innermost last
_ACTIVE: list = []


def _reinstall_sigterm() -> None:
    if _ACTIVE and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


@contextlib.contextmanager
def sigterm_interrupts():
    """In the main thread: SIGTERM raises :class:`Terminated` there (instead of Ray's handler,
    which prints a C++ stack and shuts Ray down under the running pipeline). Restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _sigterm)
    _ACTIVE.append(previous)
    try:
        yield
    finally:
        _ACTIVE.pop()
        signal.signal(signal.SIGTERM, previous)


def cluster_watch(lost_after_s: float = LOST_AFTER_S, probe_every_s: float = 3.0):
    """A check for the driver's loop: call it often; it raises :class:`ClusterLost` once the
    cluster's GCS has refused connections for ``lost_after_s`` seconds (probed at most every
    ``probe_every_s``). A no-op when the address is unknown (Ray Client)."""
    import ray

    try:
        hp = _host_port(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - Ray Client, or no address: nothing to watch
        return lambda: None
    state = {"probed": 0.0, "since": None}

    def check() -> None:
        now = time.monotonic()
        if now - state["probed"] < probe_every_s:
            return
        state["probed"] = now
        try:
            socket.create_connection(hp, timeout=2.0).close()
            state["since"] = None
        except OSError:
            state["since"] = state["since"] or now
            if now - state["since"] >= lost_after_s:
                raise ClusterLost(
                    f"the Ray cluster at {hp[0]}:{hp[1]} stopped answering "
                    f"{now - state['since']:.0f} s ago"
                ) from None

    return check


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
