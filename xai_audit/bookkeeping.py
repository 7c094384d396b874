"""The run's bookkeeping, in one room: who may write the output (lock, --resume, --incremental,
--overwrite), what earlier runs left (rows done, temporary and damaged files), the manifest from
"running" to how the run ended, and the counts and line a user reads at the end.

The manifest (``<output>/manifest.json``) is written when a run starts (``status: running``),
when it fails or is interrupted (``failed``, ``interrupted``: ``--resume`` continues) and when it
ends (``complete`` or ``incomplete``); ``runs`` keeps one entry per run of this output.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from xai_audit import lock as output_lock
from xai_audit import output as out
from xai_audit import sources
from xai_audit.config import JobConfig
from xai_audit.errors import ConfigError
from xai_audit.progress import hms, size_text

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_ERROR_RATE = 3


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# before the run: who may write the output, and with which settings
# --------------------------------------------------------------------------------------------


def claim_output(
    cfg: JobConfig, settings: dict, plan, log
) -> tuple[out.OutputState, output_lock.Lock, dict | None]:
    """Take the output for this run: writable, locked (one writer per output, from here on,
    before --overwrite removes anything), and what it holds either removed (--overwrite) or
    checked against this run (--resume: the same settings and input; --incremental: the same
    settings, and the input's changes since the last run). Returns ``(state, lock, changes)``;
    the caller releases the lock. ConfigError (lock released) when the output is not this
    run's to write."""
    out.check_writable(cfg.output)
    # one writer per output, from here on (before --overwrite removes anything)
    held = output_lock.acquire(cfg.output, log=log)
    changes = None
    try:
        state = out.inspect(cfg.output)
        if not state.empty:
            if cfg.overwrite:
                log(f"--overwrite: removing the earlier output in {cfg.output}")
                out.remove_owned(cfg.output)
                state = out.OutputState(None, [], [])
            elif cfg.resume:
                _check_resumable(state, settings, plan, cfg)
            elif cfg.incremental:
                changes = _input_changes(state, settings, plan, cfg, log)
            else:
                what = _describe_state(state)
                raise ConfigError(
                    f"output {cfg.output} already holds {what}; pass --resume to finish that "
                    "run, --incremental to add what is new, or --overwrite to replace it"
                )
    except BaseException:
        held.release()
        raise
    return state, held, changes


def inside(output: str, input_: str) -> bool:
    from xai_workers.storage import filesystem

    try:
        fo, po = filesystem(output)
        fi, pi = filesystem(input_)
    except (OSError, ValueError):
        return False
    if type(fo) is not type(fi):
        return False
    po, pi = po.rstrip("/"), pi.rstrip("/")
    return po == pi or po.startswith(pi + "/")


def _describe_state(state: out.OutputState) -> str:
    if state.manifest is None:
        return f"{len(state.parts)} part files (no manifest)"
    counts = state.manifest.get("counts", {})
    status = state.manifest.get("status", "?")
    return (
        f"a run with status {status!r} ({counts.get('rows_written', '?')} of "
        f"{counts.get('rows_total', '?')} rows written)"
    )


def _same_settings(state: out.OutputState, settings: dict, cfg: JobConfig, flag: str) -> None:
    if state.manifest is None:
        raise ConfigError(
            f"output {cfg.output} has part files but no manifest.json, so it cannot be checked "
            f"for {flag}; use --overwrite or another output"
        )
    from xai_workers.schema import SCHEMA_VERSION

    written = state.manifest.get("schema_version")
    if written is not None and str(written) != SCHEMA_VERSION:
        raise ConfigError(
            f"cannot {flag}: the output was written with schema version {written} (maps "
            f"{'float16 tensors' if written == '1' else 'of another type'}), this version "
            f"writes {SCHEMA_VERSION}; one output holds one schema: use --overwrite or another "
            "output (xai-audit report / summarize / compare still read the old one)"
        )
    before = state.manifest.get("settings", {})
    diffs = [
        f"{k}: {before.get(k)!r} -> {v!r}"
        for k, v in settings.items()
        if _norm(before.get(k)) != _norm(v)
    ]
    if diffs:
        raise ConfigError(
            f"cannot {flag}: the output was written with other settings ("
            + "; ".join(diffs)
            + "); use the same settings, --overwrite, or another output"
        )


def _input_changes(state: out.OutputState, settings: dict, plan, cfg: JobConfig, log) -> dict:
    """``--incremental``: the same settings as the output's runs, the input compared with the
    last run's (``manifest input.sources``, rows per file, and ``input.stamps``). Returns lists
    of file names: ``new``, ``grown`` (rows appended: the new rows are explained), ``changed``
    (fewer rows than before, or as many with another stamp: rewritten in place) and
    ``removed`` (gone from the input; their rows stay in the output unless
    ``--reprocess-changed``), and ``previous``: the last run's manifest ``input``."""
    _same_settings(state, settings, cfg, "--incremental")
    old = (state.manifest.get("input") or {}).get("sources")
    if old is None:
        raise ConfigError(
            f"cannot --incremental: the manifest of {cfg.output} does not list its input files "
            "(written before --incremental existed); finish it with --resume, or start anew"
        )
    now = {s.rel: s.rows for s in plan.sources}
    # a file rewritten in place with as many rows (images replaced, a Parquet rewritten) is
    # changed too: its stamp (size, ETag or modification time) differs from the last run's
    # (outputs written before stamps were recorded compare row counts only)
    old_stamps = state.manifest["input"].get("stamps", {})
    rewritten = {s.rel for s in plan.sources if old_stamps.get(s.rel, s.stamp) != s.stamp}
    changes = {
        "new": sorted(r for r in now if r not in old),
        "grown": sorted(r for r in now if r in old and now[r] > old[r]),
        "changed": sorted(
            r for r in now if r in old and (now[r] < old[r] or now[r] == old[r] and r in rewritten)
        ),
        "removed": sorted(r for r in old if r not in now),
    }
    said = ", ".join(f"{len(v)} {k}" for k, v in changes.items() if v) or "no file changed"
    log(f"--incremental: {said} since the last run")
    for kind in ("changed", "removed"):
        if changes[kind] and not cfg.reprocess_changed:
            shown = ", ".join(changes[kind][:5]) + (" ..." if len(changes[kind]) > 5 else "")
            log(f"warning: {len(changes[kind])} input files {kind} since the last run ({shown}): "
                "their earlier rows are kept; --reprocess-changed replaces them")  # fmt: skip
    # the last run's input (rows and stamps per file: what the kept rows came from)
    changes["previous"] = state.manifest["input"]
    return changes


def _check_resumable(state: out.OutputState, settings: dict, plan, cfg: JobConfig) -> None:
    _same_settings(state, settings, cfg, "--resume")
    fp = state.manifest.get("input", {}).get("fingerprint")
    if fp and fp != plan.fingerprint():
        raise ConfigError(
            "cannot --resume: the input changed since the run started (other files or row "
            "counts); use --overwrite or another output"
        )


def _norm(v):
    return json.loads(json.dumps(v, default=str))


@dataclass
class JobResult:
    """How a run ended: ``exit_code`` (0 ok, 1 failed, 3 error rate exceeded) and counts."""

    exit_code: int
    status: str
    manifest: dict
    summary: str
    counts: dict = field(default_factory=dict)


def versions() -> dict:
    from importlib import metadata

    out_ = {"python": platform.python_version()}
    for pkg in ("xai-workers", "torch", "torchvision", "ray", "pyarrow", "numpy", "pillow"):
        try:
            out_[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out_[pkg] = None
    return out_


# --------------------------------------------------------------------------------------------
# the run: from "running" to how it ended
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run in progress: its manifest (rewritten at each step), its entry in the manifest's
    ``runs``, what earlier runs wrote (``before`` rows) and what is left (``shards``, ``todo``
    rows)."""

    manifest: dict
    info: dict
    manifest_uri: str
    attr_uri: str
    rows_by_source: dict
    before: int
    shards: list
    todo: int


def begin_run(prep, started_at: str, log) -> Run:
    """Start the run's bookkeeping: what earlier runs left (:func:`_rows_done`), what is left to
    do, and the manifest with ``status: running``. ``prep``: the prepared job
    (``xai_audit.plan.Prepared``; its ``state`` is refreshed)."""
    cfg, plan = prep.cfg, prep.plan
    attr_uri = out.join(cfg.output, out.ATTRIBUTIONS)
    rows_by_source = {s.rel: s.rows for s in plan.sources}
    done, before = _rows_done(prep, attr_uri, rows_by_source, log)
    shards, todo = sources.make_shards(plan, done)
    per_row = out.row_bytes(prep.schema)
    from xai_workers.schema import map_shape_of

    maps = "no maps" if cfg.store == "stats" else ", ".join(
        f"{f.name} float32{list(map_shape_of(f.type))}"
        for f in prep.schema if f.name in prep.layout.methods
    )  # fmt: skip
    log(
        f"storage profile {cfg.store} ({maps}): expect about {todo} rows x {size_text(per_row)} = "
        f"{size_text(todo * per_row)} before compression (zstd usually writes less)"
    )
    manifest, run_info = _running_manifest(prep, attr_uri, before, started_at)
    manifest_uri = out.join(cfg.output, out.MANIFEST)
    out.write_json(manifest_uri, manifest)
    return Run(manifest, run_info, manifest_uri, attr_uri, rows_by_source, before, shards, todo)


def _rows_done(prep, attr_uri: str, rows_by_source: dict, log) -> tuple[dict | None, int]:
    """What earlier runs left, cleaned: an interrupted run's temporary files removed, the rows of
    changed input files removed (--reprocess-changed), unreadable parts set aside. Returns the
    rows already written (``out.scan``'s ``done``, None when nothing is) and their number."""
    cfg = prep.cfg
    if prep.state.temps:
        n = out.remove_temps(cfg.output, prep.state.temps)
        log(f"removed {n} temporary files of an interrupted run")
    replace = (prep.changes or {}).get("changed", []) + (prep.changes or {}).get("removed", [])
    if cfg.reprocess_changed and replace:
        n = out.remove_sources(attr_uri, replace)
        log(f"--reprocess-changed: removed {n} rows of {len(replace)} changed or removed files")
        prep.state = out.inspect(cfg.output)
    if not prep.state.parts:
        return None, 0
    scan0 = out.scan(attr_uri, rows_by_source, prep.state.parts)
    if scan0.unreadable:  # parts are atomic: this is damage from outside; redo those rows
        log(f"{len(scan0.unreadable)} unreadable part files set aside (.corrupt-*)")
        out.set_aside(scan0.unreadable, attr_uri)
    before = int(sum(d.sum() for d in scan0.done.values()))
    log(f"resuming: {before} of {prep.plan.total_rows} rows already written in {scan0.files} files")
    return scan0.done, before


def _running_manifest(prep, attr_uri: str, before: int, started_at: str) -> tuple[dict, dict]:
    """The manifest of a run that starts (``status: running``) and this run's entry in its
    ``runs`` (earlier runs' entries kept)."""
    cfg, plan = prep.cfg, prep.plan
    previous_runs = list((prep.state.manifest or {}).get("runs", []))
    manifest = {
        "tool": "xai-audit",
        "schema_version": prep.schema.metadata[b"xai_workers.schema_version"].decode(),
        "status": "running",
        "config": cfg.as_dict(),
        "settings": prep.settings,
        "model": prep.model_info,
        "input": plan.describe(),
        "output": {
            "attributions": attr_uri,
            "rows_per_file": prep.rows_per_file,
            "columns": prep.schema.names,
            "store": cfg.store,
            "map_size": cfg.map_size if cfg.store == "compact" else None,
            "expected_bytes_per_row": out.row_bytes(prep.schema),
        },
        "versions": versions(),
        "counts": {"rows_total": plan.total_rows, "rows_written": before},
        "runs": previous_runs,
        "started_at": (prep.state.manifest or {}).get("started_at", started_at),
    }
    # pid: xai_audit.watch corrects this run's manifest if the driver ends abruptly
    run_info = {"started_at": started_at, "resumed": before > 0, "rows_before": before,
                "pid": os.getpid()}  # fmt: skip
    if prep.changes is not None:
        run_info["incremental"] = {
            k: len(prep.changes[k]) for k in ("new", "grown", "changed", "removed")
        }
        if not cfg.reprocess_changed:  # the output still holds those files' earlier rows
            kept = prep.changes["changed"] + prep.changes["removed"]
            # their earlier row counts and stamps, so that the next run reports them again
            for what in ("sources", "stamps"):
                last = prep.changes["previous"].get(what, {})
                manifest["input"][what].update({r: last[r] for r in kept if r in last})
    manifest["runs"] = previous_runs + [run_info]
    return manifest, run_info


def record_failure(run: Run, e: BaseException, rows_computed: int) -> None:
    """The manifest of a run that ended by ``e``: ``interrupted`` (Ctrl-C, SIGTERM, a lost
    cluster: ``--resume`` continues) or ``failed``; never hides ``e`` (a manifest that cannot be
    written is only skipped)."""
    run.manifest["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    run.manifest["error"] = f"{type(e).__name__}: {e}"[:2000]
    run.info.update(finished_at=now(), rows_computed=rows_computed)
    try:
        out.write_json(run.manifest_uri, run.manifest)
    except Exception:  # noqa: BLE001 - the original error matters more
        pass


def check_written(run: Run, log) -> out.ScanResult:
    """What the output holds after the pipeline (every part read back); rows written twice (a
    retried write) are removed."""
    final = out.scan(run.attr_uri, run.rows_by_source)
    if final.duplicates:
        log(f"found {final.duplicates} rows written twice; removing the copies")
        out.remove_duplicates(run.attr_uri, run.rows_by_source)
        final = out.scan(run.attr_uri, run.rows_by_source)
    return final


def finish(prep, run: Run, final: out.ScanResult, t_start: float, pipe_s: float) -> JobResult:
    """The run's report: counts, status (``complete`` when every input row is there exactly
    once), exit code (--max-error-rate), timings, the manifest's last write, and the line a
    user reads."""
    cfg, plan, manifest = prep.cfg, prep.plan, run.manifest
    missing = final.missing(run.rows_by_source)
    wall = time.monotonic() - t_start
    # rows this run wrote (retries counted once; rows of files gone or shrunk are not this run's)
    computed = max(0, final.rows - final.unknown - run.before)
    counts = {
        "rows_total": plan.total_rows,
        "rows_written": final.rows,
        "rows_ok": final.ok,
        "rows_error": final.error,
        "rows_missing": missing,
        "rows_unknown": final.unknown,
        "rows_from_earlier_runs": run.before,
        "rows_computed_this_run": computed,
        "files": final.files,
        "bytes": final.bytes,
        "duplicate_ids": prep.duplicate_ids,
        "bytes_per_row": round(final.bytes / final.rows, 1) if final.rows else None,
    }
    # errors among this input's rows, over its rows (rows kept from inputs gone are not its own)
    error_rate = (final.error - final.unknown_error) / plan.total_rows if plan.total_rows else 0.0
    complete = missing == 0 and final.duplicates == 0 and not final.unreadable
    status = "complete" if complete else "incomplete"
    run.info.update(
        finished_at=now(),
        wall_s=round(wall, 3),
        pipeline_s=round(pipe_s, 3),
        rows_computed=computed,
        images_per_s=round(computed / pipe_s, 3) if pipe_s > 0 and computed else None,
    )
    manifest.update(
        status=status,
        counts=counts,
        error_rate=round(error_rate, 6),
        finished_at=now(),
        timing={
            "wall_s": round(wall, 3),
            "pipeline_s": round(pipe_s, 3),
            "images_per_s": run.info["images_per_s"],
        },
    )
    exit_code = EXIT_OK
    exceeded = cfg.max_error_rate is not None and error_rate > cfg.max_error_rate
    manifest["max_error_rate_exceeded"] = bool(exceeded)
    if not complete:
        exit_code = EXIT_FAILED
        manifest["error"] = (
            f"{missing} rows missing, {final.duplicates} duplicated, "
            f"{len(final.unreadable)} unreadable files"
        )
    elif exceeded:
        exit_code = EXIT_ERROR_RATE
    out.write_json(run.manifest_uri, manifest)

    rate = f"{computed / pipe_s:.1f} rows/s" if pipe_s > 0 and computed else "nothing to do"
    earlier = f", {run.before} from an earlier run" if run.before else ""
    # rows of inputs gone or shrunk since an earlier run (kept, --incremental) are not counted
    # against this input's total: "N/M rows" never reads more than M of M
    gone = f", {final.unknown} of them from inputs no longer present" if final.unknown else ""
    summary = (
        f"{status}: {final.rows - final.unknown}/{plan.total_rows} rows ({final.ok} ok, "
        f"{final.error} errors = {100 * error_rate:.2f}%{gone}{earlier}) in {hms(wall)}, "
        f"{rate}; {final.files} files, {final.bytes / 2**20:.1f} MiB -> {run.attr_uri}"
    )
    if exceeded:
        summary += f"; error rate above --max-error-rate {cfg.max_error_rate}"
    if not complete:
        summary += f"; {manifest['error']}"
    return JobResult(exit_code, status, manifest, summary, counts)
