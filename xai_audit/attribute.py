"""The attribution job on Ray Data: read -> decode/preprocess -> AttributionWorker -> Parquet.

::

    from_items(shards)                      one item per shard (xai_audit.sources.make_shards)
      .map_batches(read_and_preprocess)     CPU tasks: read rows, decode, preprocess -> x / error
      .map_batches(JobWorker,               actors (an AttributionWorker each, one model): 1 GPU
                   compute=ActorPoolStrategy)  per actor on a GPU cluster, else part of a node
      .write_datasink(PartsDatasink)        CPU tasks: atomic Parquet parts of at most N rows

Why the sink is ours and not ``Dataset.write_parquet``: in Ray 2.60 that names files
``{write_uuid}_{task}-{i}.parquet`` and writes them in place (not atomically), so after a crash a
rerun can neither tell complete files from partial ones nor avoid writing rows twice. Ray Data's
own checkpointing (``DataContext.checkpoint_config``) needs a unique id column in the input, keeps
every written id in memory on resume and is beta. Here the output is its own checkpoint (see
``xai_audit.output``): parts are atomic and named after the row keys ``(source, source_row)`` they
hold, a rerun with ``--resume`` reads those keys and skips the rows, and the end of every run
checks that each input row is present exactly once. The sink is a plain ``ray.data.Datasink``:
Ray Data bundles at least ``rows_per_file`` rows into each write task, which writes parts of at most
``rows_per_file`` rows (files of a sensible size),
streams, backpressures and retries as for its own writers; the maps keep their type and
shape metadata (``xai_workers.schema``). Progress comes from a tiny actor the
write tasks report to.

On a 2-core machine every stage gets a fraction of a CPU (actor 1, reads 0.5, writes 0.25), so
reading, computing and writing all make progress; no stage takes a whole CPU by default (Ray's
``repartition`` would, so it is not used).

Every check that can fail on a configuration mistake (:func:`prepare`) runs before Ray starts.

The job as named stages (:func:`run_job`), each in its own room with the state it needs passed in:

==========================  ===========================================================
plan input                  ``xai_audit.plan.plan_input`` (``xai_audit.sources``)
load model                  ``xai_audit.plan.load_checked_model``
check output/lock/resume    ``xai_audit.bookkeeping.claim_output``, ``begin_run``
Ray pipeline                ``xai_audit.pipeline.run_pipeline`` (``ray_session``, ``progress``)
summary                     :func:`summary_step` (``xai_workers.summary``)
report                      ``xai_audit.bookkeeping.finish`` (manifest, counts, the last line)
==========================  ===========================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable

from xai_audit import bookkeeping, pipeline, ray_session
from xai_audit.bookkeeping import (  # noqa: F401 - the job's public names, importable from here
    EXIT_CONFIG,
    EXIT_ERROR_RATE,
    EXIT_FAILED,
    EXIT_OK,
    JobResult,
)
from xai_audit.bookkeeping import now as _now  # noqa: F401 - xai_audit.visualize
from xai_audit.bookkeeping import versions as _versions  # noqa: F401 - xai_audit.visualize
from xai_audit.config import JobConfig
from xai_audit.pipeline import (  # noqa: F401
    FAULT_ENV,
    JobWorker,
    PartsDatasink,
    read_and_preprocess,
    write_attributions,
)
from xai_audit.plan import Prepared, default_log, prepare
from xai_audit.progress import Progress, drive_pipeline  # noqa: F401
from xai_audit.progress import hms as _hms  # noqa: F401 - xai_audit.visualize
from xai_audit.ray_session import Resources, plan_resources  # noqa: F401
from xai_audit.ray_session import connect as _ray_init  # noqa: F401 - xai_audit.visualize


def run_job(
    cfg: JobConfig,
    log: Callable[[str], None] = default_log,
    on_running: Callable[[], object] | None = None,
) -> JobResult:
    """Run (or resume) the job described by ``cfg``; ConfigError before any heavy work.
    ``on_running``: called once the manifest says ``running`` (``xai-audit run`` starts its
    watcher there: ``xai_audit.watch``)."""
    t_start = time.monotonic()
    started_at = bookkeeping.now()
    prep = prepare(cfg, log)  # plan input -> load model -> claim output (locked from here)
    prep.lock.start_heartbeat()
    try:
        run = bookkeeping.begin_run(prep, started_at, log)  # resume, manifest "running"
        with ray_session.sigterm_interrupts():  # from here on SIGTERM is an interruption
            final, pipe_s = compute(prep, run, log, on_running)
        return summarize_and_report(prep, run, final, t_start, pipe_s, log)
    finally:
        prep.lock.release()


def compute(prep: Prepared, run: bookkeeping.Run, log, on_running=None):
    """The Ray pipeline over what is left to do, then what the output holds (every part read
    back, duplicates removed). Returns ``(scan, pipeline seconds)``; on any exception (Ctrl-C,
    SIGTERM, a lost cluster, a failure) the manifest says how the run ended, and it is
    re-raised."""
    busy = "adaptive IG: a batch can take minutes" if prep.cfg.ig_steps == "auto" else None
    progress = Progress(run.todo, run.before, log, prep.cfg.progress_interval_s, busy)
    pipe_s = 0.0
    try:
        if on_running is not None:
            on_running()
        if run.todo:
            run.manifest["ray"], pipe_s = pipeline.run_pipeline(
                prep, run.shards, run.todo, progress, log
            )
        final = bookkeeping.check_written(run, log)
    except BaseException as e:
        bookkeeping.record_failure(run, e, progress.rows)
        raise
    return final, pipe_s


def summarize_and_report(
    prep: Prepared, run: bookkeeping.Run, final, t_start: float, pipe_s: float, log
) -> JobResult:
    """After the pipeline: the analyses that read the finished output, in order, then the
    run's report (manifest, counts, the line a user reads). An analysis that fails is recorded
    in the manifest and does not fail the job."""
    cfg = prep.cfg
    if cfg.summary and final.files:
        run.manifest["summary"] = summary_step(cfg, log)
    if cfg.summary and cfg.strategies and final.files:  # SpRAy (xai_audit.strategies)
        from xai_audit.strategies import run_for_job

        run.manifest["strategies"] = run_for_job(cfg, log)
    return bookkeeping.finish(prep, run, final, t_start, pipe_s)


def summary_step(cfg: JobConfig, log) -> dict:
    """``<output>/summary/`` from the parts' partials (``xai_workers.summary``), if available.

    A failure here does not fail the job (the attributions are complete); the manifest says so
    and the summary can be made again from the output alone."""
    try:
        from xai_workers.summary import summarize_output, summary_uri
    except ImportError:
        return {"status": "not available"}
    t0 = time.monotonic()
    try:
        table = summarize_output(cfg.output, log=log)
    except Exception as e:  # noqa: BLE001
        log(f"the per-class summary failed ({type(e).__name__}: {e}); the attributions are fine")
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:1000]}
    return {
        "status": "complete",
        "uri": summary_uri(cfg.output),
        "rows": table.num_rows,
        "seconds": round(time.monotonic() - t0, 3),
    }
