"""The Ray Data pipeline of a run: read -> decode/preprocess -> AttributionWorker -> Parquet parts.

::

    from_items(shards)                      one item per shard (xai_audit.sources.make_shards)
      .map_batches(read_and_preprocess)     CPU tasks: read rows, decode, preprocess -> x / error
      .map_batches(JobWorker,               actors (an AttributionWorker each, one model): 1 GPU
                   compute=ActorPoolStrategy)  per actor on a GPU cluster, else part of a node
      .write_datasink(PartsDatasink)        CPU tasks: atomic Parquet parts of at most N rows

Why the sink is ours and not ``Dataset.write_parquet``: see ``xai_audit.attribute``. Everything
here runs in Ray's tasks and actors (importable, picklable); :func:`run_pipeline` is the stage the
driver calls: it connects to Ray, sizes the stages, and runs the pipeline to its end while
printing progress.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator

import pyarrow as pa
from ray.data import Datasink  # the driver side of the job is Ray's; the library never is

from xai_audit import output as out
from xai_audit import ray_session, sources


def read_and_preprocess(batch: pa.Table, **kwargs) -> Iterator[pa.Table]:
    """Ray stage 1: each row holds one JSON shard; yield its preprocessed blocks."""
    from xai_workers.preprocess import Preprocessing

    pre = Preprocessing(**kwargs.pop("preprocessing"))
    for shard_json in batch.column("shard").to_pylist():
        yield from sources.read_shard(json.loads(shard_json), preprocessing=pre, **kwargs)


def write_attributions(table: pa.Table, *, dest: str, output: str, summary: bool = True) -> dict:
    """Write ``table`` (output rows) as one atomic part, then (``summary``) its partial per-class
    summary from the same in-memory rows (``xai_workers.summary.write_partial``). Returns the
    part's ``{"file", "rows", "ok", "error", "bytes", "partial"}``. A partial that fails is only
    reported: the summary step at the end recomputes it from the part."""
    info = out.write_part(table, dest)
    info["partial"] = False
    if summary:
        try:
            from xai_workers.summary import write_partial
        except ImportError:  # the summary module is optional for the job
            pass
        else:
            try:
                write_partial(table, output, info["file"])
                info["partial"] = True
            except Exception:  # noqa: BLE001 - never lose a written part over its summary
                pass
    return info


class PartsDatasink(Datasink):
    """Ray Data sink writing each write task's rows as atomic, keyed part files.

    ``min_rows_per_write`` makes Ray Data bundle at least ``rows_per_file`` rows into one write
    task (a task may get more: blocks are not split), and the task writes them as the fewest
    parts of equal size (within one row) that hold at most ``rows_per_file`` rows each. Each
    part reports its counts to ``progress`` (an actor with ``add``), if given.
    """

    def __init__(self, *, dest, output, rows_per_file, summary=True, progress=None):
        self.dest, self.output = dest, output
        self.rows_per_file, self.summary, self.progress = rows_per_file, summary, progress

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "XaiAuditParts"

    def write(self, blocks, ctx) -> list[dict]:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        infos = []
        n_parts = -(-table.num_rows // self.rows_per_file)  # as few parts as the maximum allows
        bounds = [table.num_rows * i // n_parts for i in range(n_parts + 1)]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            part = table.slice(start, stop - start)
            info = write_attributions(
                part, dest=self.dest, output=self.output,
                summary=self.summary,
            )  # fmt: skip
            if self.progress is not None:
                self.progress.add.remote(info["rows"], info["error"], info["bytes"])
            infos.append(info)
        return infos


#: Test-only fault switch: ``"K:PATH"`` makes the first attribution actor that reaches its K-th
#: batch while PATH does not exist create PATH and die (``os._exit``), as a preempted node's
#: process would. ``"K:PATH:hold:NODE_ID"``: the actor on Ray node NODE_ID (hex), at its K-th
#: batch, creates PATH and holds that batch (up to 120 s) so that a test can remove the node
#: while it has work in flight. Forwarded to the actors by the job when set in the driver.
FAULT_ENV = "XAI_AUDIT_TEST_ACTOR_EXIT"


def _test_fault(spec: str, batches: int) -> None:
    """The ``FAULT_ENV`` switch (tests only), checked before each batch of an actor."""
    k, path, *hold = spec.split(":")
    if batches != int(k):
        return
    if hold:
        import ray

        if ray.get_runtime_context().get_node_id() != hold[1]:
            return
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    if not hold:
        os._exit(1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.5)


class JobWorker:
    """The job's actor: the library's ``AttributionWorker`` plus what only a Ray job has: it
    reports its start to the progress actor (restarts are counted in the manifest), and the
    test-only fault switch ``FAULT_ENV``; it reports each batch's rows as in flight, then as
    computed (the progress line, before a part is written)."""

    def __init__(self, *, progress=None, **kwargs):
        from xai_workers.worker import AttributionWorker

        self.worker = AttributionWorker(**kwargs)
        self.batches = 0
        self.progress = progress
        if progress is not None:
            progress.started.remote()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        fault = os.environ.get(FAULT_ENV)
        if fault:
            _test_fault(fault, self.batches)
        if self.progress is not None:  # rows in flight, then computed: the progress line
            self.progress.batch_started.remote(batch.num_rows)
        out_ = self.worker(batch)
        if self.progress is not None:
            self.progress.batch_done.remote(batch.num_rows)
        return out_


#: Ray Data's logger of its issue detectors (the memory warning below)
ISSUE_LOGGER = "ray.data._internal.issue_detection.issue_detector_manager"


class OncePerOperator(logging.Filter):
    """Ray Data's issue detector repeats its "Operator 'X' uses N of memory per worker" warning
    every 30 s and again at the end, each followed by "Found 1 issues": an operator's first
    warning passes, its repeats (and the count line after them) do not."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()
        self.last_dropped = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = " ".join(record.getMessage().split())  # Ray wraps the message's lines
        m = re.search(r"Operator '([^']+)' use", msg)
        if m and "memory per worker" in msg:
            self.last_dropped = m.group(1) in self.seen
            self.seen.add(m.group(1))
            return not self.last_dropped
        if re.match(r"Found \d+ issues", msg):
            return not self.last_dropped
        return True


def _warn_once_per_operator() -> None:
    logger = logging.getLogger(ISSUE_LOGGER)
    if not any(isinstance(f, OncePerOperator) for f in logger.filters):
        logger.addFilter(OncePerOperator())


def build_and_run(
    prep, shards: list[dict], res: ray_session.Resources, attr_uri: str, progress_actor
) -> None:
    """Build and run the Ray Data pipeline to the end (blocking); parts report to the actor.
    ``prep``: the prepared job (``xai_audit.plan.Prepared``)."""
    import ray

    from xai_workers.storage import worker_env

    cfg, plan = prep.cfg, prep.plan
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(os.environ.get("XAI_AUDIT_RAY_PROGRESS"))
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    _warn_once_per_operator()
    if not ctx.enable_progress_bars:  # we print progress lines: Ray's note that its bars are off
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)

    # Blocks of about one batch: each actor task is then one batch, so work spreads over the
    # actors and results stream on to the writer (Ray coalesces a task's outputs up to this
    # size; the default, 128 MiB, would make a whole shard one actor task). The dataset keeps
    # its own copy of the context; the process-wide one is restored right away.
    s = prep.layout.image_shape[-1]
    block_bytes = max(64 * 1024, cfg.batch_size * (3 * s * s * 4 + 512))
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = min(saved or block_bytes, block_bytes)
    try:
        items = [{"shard": json.dumps(sh)} for sh in shards]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
    finally:
        ctx.target_max_block_size = saved
    # the workers' storage configuration is the driver's (and the test-only fault switch)
    env = {"env_vars": worker_env()}
    fault = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}
    pre = prep.model_info["preprocessing"]
    ds = ds.map_batches(
        read_and_preprocess,
        fn_kwargs=dict(
            preprocessing={k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()},
            id_column=plan.id_column,
            image_column=plan.image_column,
            label_column=plan.label_column,
            id_type=plan.id_type,
            label_type=plan.label_type,
            block_rows=cfg.batch_size,
        ),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=res.read_num_cpus,
        runtime_env=env,
    )
    # Ray Data schedules actors with DataContext.scheduling_strategy, "SPREAD" by default:
    # one CPU actor per node, not two on one
    ds = ds.map_batches(
        JobWorker,
        fn_constructor_kwargs=dict(
            progress=progress_actor,
            model=cfg.model,
            weights=cfg.weights,
            methods=cfg.methods,
            target=cfg.target,
            ig_steps=cfg.ig_steps,
            ig_method=cfg.ig_method,
            ig_tol=cfg.ig_tol,
            ig_max_steps=cfg.ig_max_steps,
            ig_baseline=cfg.ig_baseline,
            gradcam_layer=cfg.gradcam_layer,
            score=cfg.score,
            precision=cfg.precision,
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            resize_size=pre["resize_size"],
            interpolation=pre["interpolation"],
            mean=cfg.mean,
            std=cfg.std,
            num_threads=res.worker_threads,
            id_type=plan.id_type,
            label_type=plan.label_type,
            seed=cfg.seed,
            store=cfg.store,
            map_size=cfg.map_size,
            pooled_columns=True,  # the summary's maps from the full maps (write_attributions)
            class_names=(prep.model_info["class_names"] or {}).get("names"),
            faithfulness=cfg.faithfulness,
            faithfulness_steps=cfg.faithfulness_steps,
            smoothgrad_samples=cfg.smoothgrad_samples,
            smoothgrad_sigma=cfg.smoothgrad_sigma,
        ),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=res.actors),
        num_cpus=res.actor_num_cpus,
        num_gpus=res.actor_num_gpus or None,
        runtime_env={"env_vars": {**env["env_vars"], **fault}},
    )
    sink = PartsDatasink(
        dest=attr_uri,
        output=cfg.output,
        rows_per_file=prep.rows_per_file,
        summary=cfg.summary,
        progress=progress_actor,
    )
    ds.write_datasink(sink, ray_remote_args={"num_cpus": res.write_num_cpus, "runtime_env": env})


def run_pipeline(prep, shards: list[dict], todo: int, progress, log) -> tuple[dict, float]:
    """The Ray stage of a run: connect to Ray (``xai_audit.ray_session``), size the stages, run
    the pipeline over ``shards`` to its end with progress lines, shut down a Ray it started.
    SIGTERM raises ``ray_session.Terminated`` in the main thread (``sigterm_interrupts``).
    Returns the manifest's ``ray`` entry (resources, actor starts) and the pipeline's seconds
    (Ray's start-up left out)."""
    from xai_audit.progress import drive_pipeline

    cfg = prep.cfg
    attr_uri = out.join(cfg.output, out.ATTRIBUTIONS)
    started_ray = False
    try:
        with ray_session.sigterm_interrupts():
            started_ray = ray_session.connect(cfg)
            resources = ray_session.plan_resources(cfg)
            t_pipe = time.monotonic()
            info = resources.describe()
            log(
                f"{todo} rows to explain in {len(shards)} shards on {resources.nodes} node(s), "
                f"{resources.actors} {resources.device} actor(s); at most "
                f"{prep.rows_per_file} rows per file -> {attr_uri}"
            )
            progress.start()
            starts = drive_pipeline(
                lambda counter: build_and_run(prep, shards, resources, attr_uri, counter),
                progress, cfg.progress_interval_s, watch=ray_session.cluster_watch(),
            )  # fmt: skip
            info["actor_starts"] = starts
            info["actor_restarts"] = max(0, starts - resources.actors)
            return info, time.monotonic() - t_pipe
    except (ray_session.Terminated, ray_session.ClusterLost):
        # The process is ending: shutting Ray down under the running pipeline (or without its
        # cluster) can make Ray's core worker exit the process (code 1, silently) or hang before
        # the caller reports. The caller exits instead (xai_audit.cli: os._exit); a local Ray
        # shares its fate.
        started_ray = False
        raise
    except KeyboardInterrupt:
        # Ray Data's executor thread is still running: once Ray is down it can only log
        # tracebacks about it. The interruption is what the user needs to hear.
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
