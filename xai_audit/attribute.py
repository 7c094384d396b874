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
streams, backpressures and retries as for its own writers; the tensors keep Arrow's canonical
``fixed_shape_tensor`` type (``xai_workers.schema``). Progress comes from a tiny actor the
write tasks report to.

On a 2-core machine every stage gets a fraction of a CPU (actor 1, reads 0.5, writes 0.25), so
reading, computing and writing all make progress; no stage takes a whole CPU by default (Ray's
``repartition`` would, so it is not used).

Every check that can fail on a configuration mistake (:func:`prepare`) runs before Ray starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
from ray.data import Datasink  # the driver side of the job is Ray's; the library never is

from xai_audit import lock as output_lock
from xai_audit import output as out
from xai_audit import sources
from xai_audit.config import ConfigError, JobConfig
from xai_workers.engine import LAYER_METHODS

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_ERROR_RATE = 3


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _default_log(msg: str) -> None:
    print(f"[xai-audit] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# stage functions and the sink (run in Ray tasks; importable, picklable)
# --------------------------------------------------------------------------------------------


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


def _progress_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressCounter:
        """Totals reported by the write tasks: rows, error rows, files, bytes."""

        def __init__(self):
            self.totals = [0, 0, 0, 0]
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

        def get(self) -> list[int]:
            return list(self.totals)

    return ProgressCounter


def _poll(counter, progress: Progress, force: bool = False) -> None:
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
) -> int:
    """Run ``pipeline(counter)`` (a blocking Ray Data pipeline whose write tasks report to the
    progress ``counter`` actor) in a thread, and print progress lines from the counter while it
    runs. Returns how many times an actor reported its start (restarts count again; -1 when
    unknown). The pipeline's exception is re-raised here; the counter is always killed."""
    import threading

    import ray

    counter = _progress_actor_class().remote()
    failure: list[BaseException] = []

    def target():
        try:
            pipeline(counter)
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread
            failure.append(e)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    poll = max(0.2, min(2.0, interval or 0.2))
    try:
        while thread.is_alive():
            thread.join(timeout=poll)
            _poll(counter, progress)
        _poll(counter, progress, force=True)
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
    test-only fault switch ``FAULT_ENV``."""

    def __init__(self, *, progress=None, **kwargs):
        from xai_workers.worker import AttributionWorker

        self.worker = AttributionWorker(**kwargs)
        self.batches = 0
        if progress is not None:
            progress.started.remote()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        fault = os.environ.get(FAULT_ENV)
        if fault:
            _test_fault(fault, self.batches)
        return self.worker(batch)


# --------------------------------------------------------------------------------------------
# preparation: every fail-fast check, no Ray
# --------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A checked job: resolved settings, the input plan, the model facts, the output state."""

    cfg: JobConfig
    plan: sources.InputPlan
    settings: dict
    model_info: dict
    layout: object
    schema: pa.Schema
    state: out.OutputState
    rows_per_file: int
    duplicate_ids: int = 0
    #: the output's lock (``xai_audit.lock``), held from ``prepare`` on; ``run_job`` releases it
    lock: output_lock.Lock | None = None
    #: ``--incremental``: the input's files new, grown, changed, removed since the last run
    changes: dict | None = None


def _check_gradcam_layer(cfg: JobConfig, loaded) -> str:
    """The Grad-CAM/CAM layer (``cfg.gradcam_layer`` or the model's default), checked against
    the traced layers; ConfigError naming the layer, its output shape and the usable ones."""
    import torch

    from xai_workers.hooks import default_gradcam_layer
    from xai_workers.models import is_gradcam_layer

    asked = [m for m in cfg.methods if m in LAYER_METHODS]
    if not loaded.layers:
        rest = [m for m in cfg.methods if m not in LAYER_METHODS]
        raise ConfigError(
            f"model {cfg.model} cannot be hooked (TorchScript), so {', '.join(asked)} "
            "cannot run on it; the methods that do work: "
            f"--methods {','.join(rest or ['saliency', 'integrated_gradients'])}"
        )
    layer = cfg.gradcam_layer
    if layer is None:
        try:
            s = loaded.preprocessing.image_size
            return default_gradcam_layer(loaded.module, torch.zeros(1, 3, s, s))
        except ValueError as e:
            raise ConfigError(f"no default Grad-CAM layer: {e}; pass --gradcam-layer") from None
    info = {i.name: i for i in loaded.layers}.get(layer)
    if info is not None and is_gradcam_layer(info):
        return layer
    usable = [i.name for i in loaded.layers if is_gradcam_layer(i)]
    shown = ", ".join(usable[-12:]) or "none"
    if len(usable) > 12:
        shown = f"the last 12 of {len(usable)}: {shown}"
    if info is None:
        why = f"has no layer named {layer!r}"
    elif info.calls != 1:
        why = f"runs the layer {layer!r} {info.calls} times per forward pass"
    else:
        why = (
            f"cannot use for Grad-CAM the layer {layer!r}: its output "
            f"{tuple(info.output_shape) if info.output_shape else None} does not read as a grid "
            "with h, w > 1 ((N, K, h, w), (N, h, w, D), or tokens (N, T, D) with T = h*w or "
            "1 + h*w)"
        )
    raise ConfigError(f"model {cfg.model} {why}; usable layers ({shown}) (see `xai-audit layers`)")


def prepare(cfg: JobConfig, log: Callable[[str], None] = _default_log) -> Prepared:
    """Run every check that a configuration mistake can fail, before any heavy work.

    Order: settings on their face; the input (exists, columns, types); the model (spec, weights,
    Grad-CAM layer, target against its classes); the output (not inside the input, existing
    output needs --resume or --overwrite and the same settings, writable). Raises ConfigError.
    """
    from xai_workers.models import ModelSpecError, load_model
    from xai_workers.storage import configure
    from xai_workers.worker import output_layout, parse_target

    cfg.validate()
    configure(cfg.s3_endpoint)  # the process's storage, once; Ray's workers: worker_env()
    mode, tval = parse_target(cfg.target)
    if _inside(cfg.output, cfg.input):
        raise ConfigError(f"output {cfg.output} lies inside the input {cfg.input}; choose another")
    plan = sources.discover(
        cfg.input,
        id_column=cfg.id_column,
        input_format=cfg.input_format,
        labels_from=cfg.labels_from,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        need_label=mode == "label",
        exclude=cfg.output,
    )
    if plan.total_rows == 0:
        log(f"input {cfg.input} has no rows")
    from xai_audit.ids import duplicate_ids

    n_dup, dup_examples = duplicate_ids(plan)
    if n_dup:
        shown = ", ".join(f"{i!r} ({k}x)" for i, k in dup_examples)
        where = f"column {plan.id_column!r}" if plan.id_column else "WebDataset sample keys"
        what = (f"{n_dup} input rows repeat an id that an earlier row has (e.g. {shown}) in "
                f"{where}")  # fmt: skip
        if cfg.unique_ids:
            raise ConfigError(f"--unique-ids: {what}; make the ids unique or drop --unique-ids")
        log(f"warning: {what}; every row is still explained, but joins on id will match "
            "several rows (--unique-ids makes this an error)")  # fmt: skip

    try:
        loaded = load_model(
            cfg.model,
            cfg.weights,
            image_size=cfg.image_size,
            mean=cfg.mean,
            std=cfg.std,
            resize_size=cfg.resize_size,
            crop_pct=cfg.crop_pct,
            interpolation=cfg.interpolation,
            seed=cfg.seed,
        )
    except ModelSpecError as e:
        raise ConfigError(f"model: {e}") from None
    pre = loaded.preprocessing
    if mode == "class" and tval >= loaded.num_classes:
        raise ConfigError(
            f"--target {tval} is not a class of this model (0..{loaded.num_classes - 1})"
        )
    if mode == "topk" and tval > loaded.num_classes:
        raise ConfigError(f"--target topk:{tval} > the model's {loaded.num_classes} classes")
    if plan.kind == "images" and plan.class_names and len(plan.class_names) > loaded.num_classes:
        raise ConfigError(
            f"the input has {len(plan.class_names)} class folders but the model has "
            f"{loaded.num_classes} classes, so folder indices are not its classes; pass "
            "--labels-from none, or point --input at folders of the model's classes"
        )
    classes = _class_names(cfg, loaded, plan, log)
    layer = cfg.gradcam_layer
    if any(m in LAYER_METHODS for m in cfg.methods):
        layer = _check_gradcam_layer(cfg, loaded)
    label_column = plan.label_column
    cfg = dataclasses.replace(
        cfg,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        image_size=pre.image_size,
        gradcam_layer=layer,
        label_column=label_column,
    )
    model_info = {
        "spec": loaded.spec,
        "weights": cfg.weights,
        "checksum_sha256": loaded.checksum,
        "num_classes": loaded.num_classes,
        "class_names": classes,
        "gradcam_layer": layer,
        "preprocessing_from": loaded.preprocessing_from,
        "preprocessing": {
            "image_size": pre.image_size,
            "resize_size": pre.resize_size or pre.image_size,
            "resize_mode": pre.resize_mode,
            "interpolation": pre.interpolation,
            "crop_anchor": pre.crop_anchor,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "max_pixels": pre.max_pixels,
        },
    }
    layout = output_layout(
        cfg.methods,
        pre.image_size,
        loaded.num_classes,
        cfg.target,
        id_type=plan.id_type,
        label_type=plan.label_type,
        store=cfg.store,
        map_size=cfg.map_size,
        has_names=classes is not None,
        adaptive_ig=cfg.ig_steps == "auto",
        faithfulness=cfg.faithfulness,
    )
    if layout.map_size != cfg.map_size and cfg.store == "compact":
        log(f"--map-size {cfg.map_size} is above the image size: compact maps are "
            f"{layout.map_size}x{layout.map_size}")  # fmt: skip
    cfg = dataclasses.replace(cfg, map_size=layout.map_size)
    settings = {**cfg.result_settings(), "model_checksum": loaded.checksum}
    from xai_workers.schema import output_schema

    schema = output_schema(layout)

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
    rpf = cfg.rows_per_file or out.rows_per_file(schema, plan.total_rows)
    return Prepared(cfg, plan, settings, model_info, layout, schema, state, rpf, n_dup, held,
                    changes)  # fmt: skip


def _class_names(cfg: JobConfig, loaded, plan, log) -> dict | None:
    """``{"source", "names"}`` of the model's classes, or None when unknown.

    In order: ``--class-names FILE|imagenet`` (its length must be the model's classes, else a
    ConfigError naming the file); the model's own (``loaded.class_names``: torchvision weights'
    ``meta["categories"]``, timm, Hugging Face); the input's (Hugging Face ``ClassLabel`` names,
    class folders) when there is one per class of the model (else they are only logged)."""
    from xai_workers.classnames import load_class_names

    n = loaded.num_classes
    if cfg.class_names:
        try:
            names = load_class_names(cfg.class_names)
        except ValueError as e:
            raise ConfigError(f"--class-names: {e}") from None
        if len(names) != n:
            raise ConfigError(
                f"--class-names {cfg.class_names} has {len(names)} names but the model has {n} "
                "classes"
            )
        return {"source": cfg.class_names, "names": list(names)}
    own = getattr(loaded, "class_names", None)  # models from timm/HF/torchvision weights
    if own is not None and len(own) == n:
        return {"source": "model", "names": [str(c) for c in own]}
    if plan.class_names:
        source = "folders" if plan.kind == "images" else "huggingface"
        if len(plan.class_names) == n:
            return {"source": source, "names": list(plan.class_names)}
        log(
            f"the input names {len(plan.class_names)} classes ({source}) but the model has {n}: "
            "not used as the model's class names (pass --class-names)"
        )
    return None


def _inside(output: str, input_: str) -> bool:
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


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class JobResult:
    """How a run ended: ``exit_code`` (0 ok, 1 failed, 3 error rate exceeded) and counts."""

    exit_code: int
    status: str
    manifest: dict
    summary: str
    counts: dict = field(default_factory=dict)


def _versions() -> dict:
    from importlib import metadata

    out_ = {"python": platform.python_version()}
    for pkg in ("xai-workers", "torch", "torchvision", "ray", "pyarrow", "numpy", "pillow"):
        try:
            out_[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out_[pkg] = None
    return out_


def _ray_init(cfg: JobConfig) -> bool:
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


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as an interrupt: the manifest says 'interrupted', --resume continues."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """In the main thread: SIGTERM raises :class:`_Terminated` there (instead of Ray's handler,
    which prints a C++ stack and shuts Ray down under the running pipeline). Restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated("SIGTERM")

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


class Progress:
    """Prints rows done, rows/s and ETA at most every ``interval`` seconds."""

    def __init__(self, total: int, before: int, log, interval: float = 5.0):
        self.total, self.before, self.log, self.interval = total, before, log, interval
        self.t0 = time.monotonic()
        self.first: tuple[float, int] | None = None
        self.last = 0.0
        self.rows = self.errors = self.files = self.bytes = 0
        self.printed: tuple[int, int, int] | None = None

    def start(self) -> None:
        """Start the clock (after Ray is up)."""
        self.t0 = self.last = time.monotonic()

    def update(self, rows: int, errors: int, files: int, nbytes: int, force: bool = False) -> None:
        """The totals so far (from the write tasks); prints a line when it is time."""
        now = time.monotonic()
        if self.first is None and files:
            self.first = (now, rows)
        self.rows, self.errors, self.files, self.bytes = rows, errors, files, nbytes
        # before the first part (minutes, for big images on CPUs) a heartbeat every 30 s
        wait = self.interval if files else max(30.0, self.interval)
        state = (rows, errors, files)
        if (force and state != self.printed) or now - self.last >= wait:
            self.last, self.printed = now, state
            self.log(self.line())

    def rate(self) -> float:
        """Rows/s: since the first part once there are a few (leaves out actor start-up)."""
        now = time.monotonic()
        if self.first is not None and self.files >= 3 and now > self.first[0]:
            return (self.rows - self.first[1]) / (now - self.first[0])
        dt = now - self.t0
        return self.rows / dt if dt > 0 else 0.0

    def line(self) -> str:
        grand = self.before + self.total
        done = min(self.before + self.rows, grand)  # a retried write reports twice
        pct = 100.0 * done / grand if grand else 100.0
        rate = self.rate()
        eta = (self.total - self.rows) / rate if rate > 0 else float("nan")
        return (
            f"{done}/{grand} rows ({pct:.0f}%) | {rate:.1f} rows/s | ETA {_hms(eta)} | "
            f"{self.errors} errors | {self.files} files"
        )


def _size(n: float) -> str:
    """Bytes for a person: 866.4 KB, 1.1 TB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_job(cfg: JobConfig, log: Callable[[str], None] = _default_log) -> JobResult:
    """Run (or resume) the job described by ``cfg``; ConfigError before any heavy work."""
    t_start = time.monotonic()
    started_at = _now()
    prep = prepare(cfg, log)
    prep.lock.start_heartbeat()
    try:
        return _run_prepared(prep, t_start, started_at, log)
    finally:
        prep.lock.release()


def _run_prepared(prep: Prepared, t_start: float, started_at: str, log) -> JobResult:
    """The run itself, with the output's lock held (``run_job``)."""
    cfg, plan = prep.cfg, prep.plan
    attr_uri = out.join(cfg.output, out.ATTRIBUTIONS)
    manifest_uri = out.join(cfg.output, out.MANIFEST)
    rows_by_source = {s.rel: s.rows for s in plan.sources}

    # what is there already (resume)
    previous_runs = []
    if prep.state.manifest is not None:
        previous_runs = list(prep.state.manifest.get("runs", []))
    if prep.state.temps:
        n = out.remove_temps(cfg.output, prep.state.temps)
        log(f"removed {n} temporary files of an interrupted run")
    replace = (prep.changes or {}).get("changed", []) + (prep.changes or {}).get("removed", [])
    if cfg.reprocess_changed and replace:
        n = out.remove_sources(attr_uri, replace)
        log(f"--reprocess-changed: removed {n} rows of {len(replace)} changed or removed files")
        prep.state = out.inspect(cfg.output)
    done = None
    before = 0
    if prep.state.parts:
        scan0 = out.scan(attr_uri, rows_by_source, prep.state.parts)
        if scan0.unreadable:  # parts are atomic: this is damage from outside; redo those rows
            log(f"{len(scan0.unreadable)} unreadable part files set aside (.corrupt-*)")
            out.set_aside(scan0.unreadable, attr_uri)
        done = scan0.done
        before = int(sum(d.sum() for d in done.values()))
        log(f"resuming: {before} of {plan.total_rows} rows already written in {scan0.files} files")
    shards, todo = sources.make_shards(plan, done)
    per_row = out.row_bytes(prep.schema)
    maps = "no maps" if cfg.store == "stats" else ", ".join(
        f"{f.name} {f.type.value_type}{list(f.type.shape)}"
        for f in prep.schema if f.name in prep.layout.methods
    )  # fmt: skip
    log(
        f"storage profile {cfg.store} ({maps}): expect about {todo} rows x {_size(per_row)} = "
        f"{_size(todo * per_row)} before compression (zstd usually writes less)"
    )

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
        "versions": _versions(),
        "counts": {"rows_total": plan.total_rows, "rows_written": before},
        "runs": previous_runs,
        "started_at": (prep.state.manifest or {}).get("started_at", started_at),
    }
    run_info = {"started_at": started_at, "resumed": before > 0, "rows_before": before}
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
    out.write_json(manifest_uri, manifest)

    started_ray = False
    progress = Progress(todo, before, log, cfg.progress_interval_s)
    t_pipe = time.monotonic()
    stack = contextlib.ExitStack()
    try:
        if todo:
            started_ray = _ray_init(cfg)
            stack.enter_context(_sigterm_interrupts())
            resources = plan_resources(cfg)
            t_pipe = time.monotonic()  # the pipeline's time leaves Ray's start-up out
            manifest["ray"] = resources.describe()
            log(
                f"{todo} rows to explain in {len(shards)} shards on {resources.nodes} node(s), "
                f"{resources.actors} {resources.device} actor(s); at most "
                f"{prep.rows_per_file} rows per file -> {attr_uri}"
            )
            progress.start()
            starts = drive_pipeline(
                lambda counter: _pipeline(prep, shards, resources, attr_uri, counter),
                progress, cfg.progress_interval_s,
            )  # fmt: skip
            manifest["ray"]["actor_starts"] = starts
            manifest["ray"]["actor_restarts"] = max(0, starts - resources.actors)
        t_pipe_end = time.monotonic()
        final = out.scan(attr_uri, rows_by_source)
        if final.duplicates:
            log(f"found {final.duplicates} rows written twice; removing the copies")
            out.remove_duplicates(attr_uri, rows_by_source)
            final = out.scan(attr_uri, rows_by_source)
    except BaseException as e:
        manifest["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        manifest["error"] = f"{type(e).__name__}: {e}"[:2000]
        run_info.update(finished_at=_now(), rows_computed=progress.rows)
        try:
            out.write_json(manifest_uri, manifest)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        if isinstance(e, KeyboardInterrupt):
            # Ray Data's executor thread is still running: once Ray is down it can only log
            # tracebacks about it. The interruption is what the user needs to hear.
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        if isinstance(e, _Terminated):
            # The process is ending: shutting Ray down under the running pipeline can make
            # Ray's core worker exit the process (code 1, silently) before the caller reports.
            # The caller exits instead (xai_audit.cli: code 143); a local Ray shares its fate.
            started_ray = False
        raise
    finally:
        stack.close()
        if started_ray:
            import ray

            ray.shutdown()

    if cfg.summary and final.files:
        manifest["summary"] = _summarize(cfg, log)
    missing = final.missing(rows_by_source)
    wall = time.monotonic() - t_start
    pipe_s = t_pipe_end - t_pipe
    # rows this run wrote (retries counted once; rows of files gone or shrunk are not this run's)
    computed = max(0, final.rows - final.unknown - before)
    counts = {
        "rows_total": plan.total_rows,
        "rows_written": final.rows,
        "rows_ok": final.ok,
        "rows_error": final.error,
        "rows_missing": missing,
        "rows_unknown": final.unknown,
        "rows_from_earlier_runs": before,
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
    run_info.update(
        finished_at=_now(),
        wall_s=round(wall, 3),
        pipeline_s=round(pipe_s, 3),
        rows_computed=computed,
        images_per_s=round(computed / pipe_s, 3) if pipe_s > 0 and computed else None,
    )
    manifest.update(
        status=status,
        counts=counts,
        error_rate=round(error_rate, 6),
        finished_at=_now(),
        timing={
            "wall_s": round(wall, 3),
            "pipeline_s": round(pipe_s, 3),
            "images_per_s": run_info["images_per_s"],
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
    out.write_json(manifest_uri, manifest)

    rate = f"{computed / pipe_s:.1f} rows/s" if pipe_s > 0 and computed else "nothing to do"
    earlier = f", {before} from an earlier run" if before else ""
    # rows of inputs gone or shrunk since an earlier run (kept, --incremental) are not counted
    # against this input's total: "N/M rows" never reads more than M of M
    gone = f", {final.unknown} of them from inputs no longer present" if final.unknown else ""
    summary = (
        f"{status}: {final.rows - final.unknown}/{plan.total_rows} rows ({final.ok} ok, "
        f"{final.error} errors = {100 * error_rate:.2f}%{gone}{earlier}) in {_hms(wall)}, "
        f"{rate}; {final.files} files, {final.bytes / 2**20:.1f} MiB -> {attr_uri}"
    )
    if exceeded:
        summary += f"; error rate above --max-error-rate {cfg.max_error_rate}"
    if not complete:
        summary += f"; {manifest['error']}"
    return JobResult(exit_code, status, manifest, summary, counts)


def _summarize(cfg: JobConfig, log) -> dict:
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


def _pipeline(
    prep: Prepared, shards: list[dict], res: Resources, attr_uri: str, progress_actor
) -> None:
    """Build and run the Ray Data pipeline to the end (blocking); parts report to the actor."""
    import ray

    from xai_workers.storage import worker_env

    cfg, plan = prep.cfg, prep.plan
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(os.environ.get("XAI_AUDIT_RAY_PROGRESS"))
    logging.getLogger("ray.data").setLevel(logging.WARNING)
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
