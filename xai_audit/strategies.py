"""``xai-audit strategies OUTPUT``: SpRAy strategy analysis per class and method of a run.

The computation is ``xai_workers.strategies`` (docs/conventions.md, "Strategies (SpRAy)"); this
module fans it out over classes as Ray tasks and writes its two tables:

- ``<output>/summary/strategies.parquet``: one row per analysed output row and method
  (``STRATEGY_ROWS_SCHEMA``): ``id``, ``target``, ``target_name``, ``method``, ``strategy`` (null
  when the row's class has fewer than ``min_class_rows`` usable maps, or its map is null or all
  zero), ``embed_x``, ``embed_y`` (null for methods without the 2-D embedding: by default only
  the method the report draws gets it, ``embed_methods``), and where the row lives (``source``,
  ``source_row``: its input; ``part``, ``part_row``: its attribution file and row there).
- ``<output>/summary/strategy_clusters.parquet``: one row per class, method and strategy
  (:func:`clusters_schema`).

How it scales (thousands of classes, millions of rows): two passes of Ray tasks, so that no task
reads more than a bounded share of the data and nothing reads a file more than once per pass.

1. **Bucketing**: each task takes up to ``PARTS_PER_TASK`` attribution files, reads only the
   columns it needs (key, target, label and the map columns), batch by batch, and writes each ok
   row's maps, already area-averaged to the grid (``grid^2`` float32 per method: 4 KiB at 32),
   to the shard of its class's bucket (``target mod B``) under
   ``<output>/summary/_strategies/shards/``. B = ``ceil(rows / ROWS_PER_BUCKET)`` (at most
   ``MAX_BUCKETS``), so a bucket holds about ``ROWS_PER_BUCKET`` rows.
2. **Analysis**: one task per bucket reads its shards and analyses its classes one by one
   (memory: the bucket's rows, about ``ROWS_PER_BUCKET x methods x grid^2 x 4`` bytes, 240 MiB for
   three methods at the defaults, plus one class's kNN graph and eigenvectors), writing its rows and
   clusters under ``_strategies/results/``.

Reads: every attribution file once (pass 1; the map columns only), every shard once (pass 2).
Each file of both passes is written whole or not at all; a rerun with ``resume=True`` (``--resume``)
keeps the finished tasks' files when the settings and the list of attribution files are the same
(``_strategies/settings.json``), else starts over. The final tables are written atomically and
sorted, from deterministic computations (seeded, single-threaded), so two runs give the same files
byte for byte; the work folder is removed at the end.

Storage goes through :func:`_fs` (a pyarrow filesystem from ``xai_workers.storage``) only.
"""

from __future__ import annotations

import argparse
import json
import math
import posixpath
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa

from xai_audit.config import add_s3_endpoint
from xai_workers.stats import METHODS as STAT_METHODS
from xai_workers.strategies import StrategyConfig

STRATEGIES_FILE = "strategies.parquet"
CLUSTERS_FILE = "strategy_clusters.parquet"
WORK_DIR = "_strategies"
WORK_VERSION = "1"
#: Attribution files per bucketing task.
PARTS_PER_TASK = 8
#: Rows per bucket the bucket count aims at, and the most buckets.
ROWS_PER_BUCKET = 20_000
MAX_BUCKETS = 4096
#: Outputs up to this many rows are analysed in-process unless Ray is already up (``use_ray``).
IN_PROCESS_ROWS = 20_000
#: Rows per batch when an attribution file is read.
BATCH_ROWS = 2048
#: The map methods analysed, when present in the output: every method with a 2-D map
#: (``xai_workers.stats.METHODS``, in its order).
METHODS = STAT_METHODS


def rows_schema(id_type: pa.DataType | None = None) -> pa.Schema:
    """Schema of ``summary/strategies.parquet``; ``id`` keeps the attribution files' type
    (string when None)."""
    id_type = id_type or pa.string()
    return pa.schema(
        [
            pa.field("id", id_type),
            pa.field("target", pa.int64(), nullable=False),
            pa.field("target_name", pa.string()),
            pa.field("method", pa.string(), nullable=False),
            pa.field("strategy", pa.int64()),
            pa.field("embed_x", pa.float32()),
            pa.field("embed_y", pa.float32()),
            pa.field("source", pa.string()),
            pa.field("source_row", pa.int64()),
            pa.field("part", pa.string(), nullable=False),
            pa.field("part_row", pa.int64(), nullable=False),
        ]
    )


def clusters_schema(grid: int) -> pa.Schema:
    """Schema of ``summary/strategy_clusters.parquet`` (``mean_map``: (grid, grid) tensor)."""
    from xai_workers.schema import tensor_type

    return pa.schema(
        [
            pa.field("target", pa.int64(), nullable=False),
            pa.field("target_name", pa.string()),
            pa.field("method", pa.string(), nullable=False),
            pa.field("strategy", pa.int64(), nullable=False),
            pa.field("n_strategies", pa.int64(), nullable=False),
            pa.field("class_rows", pa.int64(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("share", pa.float64(), nullable=False),
            pa.field("eigengap", pa.float64()),
            pa.field("eigenvalues", pa.list_(pa.float64())),
            pa.field("mean_map", tensor_type((grid, grid), pa.float32())),
            pa.field("border_share", pa.float64()),
            pa.field("concentration", pa.float64()),
            pa.field("exclusive_share", pa.float64()),
            pa.field("label_purity", pa.float64()),
            pa.field("label_majority", pa.int64()),
            pa.field("labelled", pa.int64(), nullable=False),
            pa.field("flagged", pa.bool_(), nullable=False),
            pa.field("reason", pa.string()),
        ]
    )


def _shard_schema(id_type: pa.DataType, methods: list[str], cells: int) -> pa.Schema:
    fields = [
        pa.field("id", id_type),
        pa.field("target", pa.int64(), nullable=False),
        pa.field("target_name", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("source_row", pa.int64()),
        pa.field("part", pa.string(), nullable=False),
        pa.field("part_row", pa.int64(), nullable=False),
    ]
    fields += [pa.field(m, pa.list_(pa.float32(), cells)) for m in methods]
    return pa.schema(fields)


# --------------------------------------------------------------------------------------------
# storage: every read, write, listing and removal goes through these few functions
# --------------------------------------------------------------------------------------------


def _join(uri: str, *parts: str) -> str:
    from xai_workers.storage import join_uri

    return join_uri(uri, *parts)


def _fs(uri: str):
    """``(pyarrow filesystem, path)`` of ``uri``."""
    from xai_workers.storage import pyarrow_filesystem

    return pyarrow_filesystem(uri)


def _write_table(table: pa.Table, uri: str) -> None:
    """Atomic Parquet write (``xai_workers.summary._write_parquet``: temporary name + rename
    locally, one upload on S3)."""
    from xai_workers.summary import _write_parquet

    _write_parquet(table, uri)


def _read_table(uri: str) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = _fs(uri)
    with fs.open_input_file(path) as f:
        return pq.read_table(f)


def _list(uri: str) -> list[str]:
    """Names (not paths) of the files directly under ``uri``, sorted; [] when it is missing."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(
        posixpath.basename(i.path)
        for i in infos
        if i.type == pafs.FileType.File and not posixpath.basename(i.path).startswith(".")
    )


def _exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _remove_tree(uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _read_json(uri: str):
    fs, path = _fs(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _write_json(obj, uri: str) -> None:
    fs, path = _fs(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj, sort_keys=True, indent=1).encode())


# --------------------------------------------------------------------------------------------
# pass 1: bucketing
# --------------------------------------------------------------------------------------------


def _first(col: pa.ChunkedArray) -> pa.Array:
    """A per-target column (``topk:K``: fixed_size_list) -> its first target's values."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
        import pyarrow.compute as pc

        return pc.list_element(col, 0)
    return col


def _grid_maps(method: str, col, topk: bool, grid: int) -> np.ndarray:
    """A map column -> float32 (N, g, g): the first target's map (``topk``), IG stored ``full``
    summed over channels (signed, as the compact profile stores it), area-averaged to the grid."""
    from xai_workers.schema import tensor_to_numpy
    from xai_workers.strategies import downsample

    arr = tensor_to_numpy(col)
    if topk:
        arr = arr[:, 0]
    if arr.ndim == 4:  # IG (C, H, W)
        arr = arr.sum(axis=1)
    if arr.shape[0] == 0:
        return np.zeros((0, grid, grid), np.float32)
    return downsample(arr, grid).astype(np.float32)


def bucket_parts(
    task: int,
    parts: list[str],
    attr_uri: str,
    work_uri: str,
    methods: list[str],
    grid: int,
    n_buckets: int,
) -> int:
    """Pass 1 for one task: the rows of attribution files ``parts`` (names under ``attr_uri``)
    into ``<work>/shards/b<bucket>/t<task>.parquet``, then ``<work>/done/t<task>.json``. Returns
    the number of rows bucketed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    by_bucket: dict[int, list[pa.Table]] = {}
    schema = None
    n = 0
    for name in parts:
        fs, path = _fs(_join(attr_uri, name))
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            have = pf.schema_arrow
            topk = "target" in have.names and not pa.types.is_integer(have.field("target").type)
            cols = [c for c in ("id", "status", "target", "target_name", "label", "source",
                                "source_row") if c in have.names] + methods  # fmt: skip
            offset = 0
            for rb in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                t = pa.Table.from_batches([rb])
                rows = np.arange(offset, offset + t.num_rows, dtype=np.int64)
                offset += t.num_rows
                target = _first(t.column("target"))
                keep = pc.is_valid(target)
                if "status" in t.column_names:
                    keep = pc.and_(keep, pc.equal(t.column("status"), "ok"))
                keep = np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)
                if not keep.any():
                    continue
                t, rows = t.filter(pa.array(keep)), rows[keep]
                target = np.asarray(_first(t.column("target")).to_numpy(), dtype=np.int64)
                out = {
                    "id": t.column("id"),
                    "target": pa.array(target, pa.int64()),
                    "target_name": _names(t),
                    "label": _labels(t),
                    "source": _opt(t, "source", pa.string()),
                    "source_row": _opt(t, "source_row", pa.int64()),
                    "part": pa.array([name] * t.num_rows, pa.string()),
                    "part_row": pa.array(rows, pa.int64()),
                }
                for m in methods:  # decoded by schema.tensor_to_numpy whatever the storage type
                    g = _grid_maps(m, t.column(m), topk, grid).reshape(t.num_rows, -1)
                    out[m] = pa.FixedSizeListArray.from_arrays(
                        pa.array(g.ravel(), pa.float32()), g.shape[1]
                    )
                if schema is None:
                    cells = out[methods[0]].type.list_size
                    schema = _shard_schema(have.field("id").type, methods, cells)
                table = pa.table(out, schema=schema)
                bucket = target % n_buckets
                for b in np.unique(bucket):
                    by_bucket.setdefault(int(b), []).append(table.filter(pa.array(bucket == b)))
                n += table.num_rows
    for b, tables in sorted(by_bucket.items()):
        uri = _join(work_uri, "shards", f"b{b:05d}", f"t{task:05d}.parquet")
        _write_table(pa.concat_tables(tables), uri)
    _write_json({"rows": n}, _join(work_uri, "done", f"t{task:05d}.json"))
    return n


def _names(t: pa.Table) -> pa.Array:
    if "target_name" not in t.column_names:
        return pa.nulls(t.num_rows, pa.string())
    col = _first(t.column("target_name"))
    if pa.types.is_dictionary(col.type):
        col = col.cast(pa.string())
    return col.cast(pa.string())


def _labels(t: pa.Table) -> pa.Array:
    if "label" not in t.column_names or not pa.types.is_integer(t.column("label").type):
        return pa.nulls(t.num_rows, pa.int64())
    return t.column("label").combine_chunks().cast(pa.int64())


def _opt(t: pa.Table, name: str, typ: pa.DataType) -> pa.Array:
    if name not in t.column_names:
        return pa.nulls(t.num_rows, typ)
    return t.column(name).combine_chunks().cast(typ)


# --------------------------------------------------------------------------------------------
# pass 2: analysis
# --------------------------------------------------------------------------------------------


def analyse_bucket(
    bucket: int,
    work_uri: str,
    methods: list[str],
    config: dict,
    id_type_name: str,
    embed_methods: list[str] | None = None,
) -> int:
    """Pass 2 for one bucket: every class in its shards, every method -> ``<work>/results/
    b<bucket>-rows.parquet`` and ``-clusters.parquet``. Returns the number of classes analysed."""
    from xai_workers import strategies as S

    cfg = StrategyConfig(**config)
    no_embed = replace(cfg, embed=False)
    embed_methods = methods if embed_methods is None else embed_methods
    folder = _join(work_uri, "shards", f"b{bucket:05d}")
    names = _list(folder)
    tables = [_read_table(_join(folder, n)) for n in names]
    id_type = _id_type(id_type_name)
    row_tables, cluster_rows = [], []
    analysed = 0
    if tables:
        t = pa.concat_tables(tables)
        t = t.sort_by([("target", "ascending"), ("part", "ascending"), ("part_row", "ascending")])
        target = t.column("target").to_numpy()
        labels = t.column("label").to_numpy(zero_copy_only=False)
        labels = np.where(np.isnan(labels.astype(np.float64)), -1, labels).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, target[1:] != target[:-1]])
        ends = np.r_[starts[1:], len(target)]
        for lo, hi in zip(starts, ends, strict=True):
            cls = t.slice(lo, hi - lo)
            name = cls.column("target_name")[0].as_py()
            for m in methods:
                flat = cls.column(m).combine_chunks()
                cells = flat.type.list_size
                side = math.isqrt(cells)
                maps = flat.values.to_numpy(zero_copy_only=False).reshape(len(cls), side, side)
                strategy = np.full(len(cls), -1, np.int64)
                embed = np.full((len(cls), 2), np.nan, np.float32)
                try:
                    res = S.analyse_class(maps, cfg if m in embed_methods else no_embed)
                except ValueError:  # fewer usable maps than min_class_rows
                    res = None
                if res is not None:
                    analysed += 1
                    strategy, embed = res.strategy, res.embed
                    for st in S.strategy_stats(res, labels[lo:hi]):
                        cluster_rows.append(
                            _cluster_row(int(target[lo]), name, m, res, st, int(res.valid.sum()))
                        )
                row_tables.append(
                    pa.table(
                        {
                            "id": cls.column("id").cast(id_type),
                            "target": cls.column("target"),
                            "target_name": cls.column("target_name"),
                            "method": pa.array([m] * len(cls), pa.string()),
                            "strategy": pa.array(strategy, pa.int64(), mask=strategy < 0),
                            "embed_x": pa.array(embed[:, 0], pa.float32(), from_pandas=True),
                            "embed_y": pa.array(embed[:, 1], pa.float32(), from_pandas=True),
                            "source": cls.column("source"),
                            "source_row": cls.column("source_row"),
                            "part": cls.column("part"),
                            "part_row": cls.column("part_row"),
                        },
                        schema=rows_schema(id_type),
                    )
                )
    rows = pa.concat_tables(row_tables) if row_tables else rows_schema(id_type).empty_table()
    clusters = _clusters_table(cluster_rows, cfg.grid)
    base = _join(work_uri, "results", f"b{bucket:05d}")
    _write_table(clusters, base + "-clusters.parquet")
    _write_table(rows, base + "-rows.parquet")  # last: its presence = bucket done
    return analysed


def _cluster_row(target: int, name, method: str, res, st: dict, class_rows: int) -> dict:
    nan_none = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
    return {
        "target": target,
        "target_name": name,
        "method": method,
        "strategy": st["strategy"],
        "n_strategies": res.n_strategies,
        "class_rows": class_rows,
        "size": st["size"],
        "share": st["share"],
        "eigengap": nan_none(res.eigengap),
        "eigenvalues": [float(v) for v in res.eigenvalues],
        "mean_map": st["mean_map"],
        "border_share": nan_none(st["border_share"]),
        "concentration": nan_none(st["concentration"]),
        "exclusive_share": nan_none(st["exclusive_share"]),
        "label_purity": nan_none(st["label_purity"]),
        "label_majority": st["label_majority"],
        "labelled": st["labelled"],
        "flagged": st["flagged"],
        "reason": st["reason"],
    }


def _clusters_table(rows: list[dict], grid_hint: int) -> pa.Table:
    from xai_workers.schema import tensor_array

    side = rows[0]["mean_map"].shape[0] if rows else grid_hint
    schema = clusters_schema(side)
    if not rows:
        return schema.empty_table()
    cols = {}
    for f in schema:
        if f.name == "mean_map":
            maps = np.stack([r["mean_map"] for r in rows]).astype(np.float32)
            cols[f.name] = tensor_array(maps)
        else:
            cols[f.name] = pa.array([r[f.name] for r in rows], f.type)
    return pa.table(cols, schema=schema)


def _id_type(name: str) -> pa.DataType:
    return {"string": pa.string(), "large_string": pa.large_string(), "int64": pa.int64(),
            "int32": pa.int32()}.get(name, pa.string())  # fmt: skip


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------


def strategies_uri(output: str) -> str:
    return _join(output, "summary", STRATEGIES_FILE)


def clusters_uri(output: str) -> str:
    return _join(output, "summary", CLUSTERS_FILE)


def _plan(output: str, methods, grid: int, buckets: int | None):
    """Attribution files, methods, id type and bucket count of ``output``."""
    import pyarrow.parquet as pq

    from xai_workers.schema import is_tensor_type
    from xai_workers.summary import list_parquet

    attr = _join(output, "attributions")
    paths = list_parquet(attr)
    if not paths:
        raise FileNotFoundError(f"no attribution files in {attr}")
    parts = [posixpath.basename(p) for p in paths]
    fs, _ = _fs(attr)
    rows = 0
    schema = None
    for p in paths:
        with fs.open_input_file(p) as f:
            md = pq.ParquetFile(f)
            rows += md.metadata.num_rows
            schema = schema or md.schema_arrow
    have = [m for m in METHODS if m in schema.names and is_tensor_type(schema.field(m).type)]
    if methods:
        missing = [m for m in methods if m not in have]
        if missing:
            raise ValueError(
                f"no stored maps for {', '.join(missing)} in {attr} (it has: "
                f"{', '.join(have) or 'none: was it run with --store stats?'})"
            )
        have = list(methods)
    if not have:
        raise ValueError(f"{attr} stores no maps (run with --store compact or full)")
    if buckets is None:
        buckets = max(1, min(MAX_BUCKETS, math.ceil(rows / ROWS_PER_BUCKET)))
    id_type = schema.field("id").type if "id" in schema.names else pa.string()
    return parts, have, str(id_type), int(buckets), rows


def run_strategies(
    output: str,
    *,
    config: StrategyConfig | None = None,
    methods: list[str] | None = None,
    resume: bool = False,
    buckets: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    use_ray: bool | None = None,
    embed_methods: str | list[str] = "auto",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Strategy analysis of a finished output (module docstring); returns a record for the
    manifest (``status``, URIs, counts, seconds). ``use_ray`` None: Ray tasks when Ray is already
    initialised, an ``address`` is given or the output has more than ``IN_PROCESS_ROWS`` rows,
    else the same functions run in this process (no Ray start-up for a small output). Starts a
    local Ray (or connects to ``address``) when needed, and shuts down only what it started.
    FileNotFoundError without attribution files; ValueError for methods not stored."""
    import ray

    log = log or (lambda m: None)
    config = config or StrategyConfig()
    t0 = time.monotonic()
    parts, methods, id_type, n_buckets, rows = _plan(output, methods, config.grid, buckets)
    embed = _embed_methods(embed_methods, methods) if config.embed else []
    work = _join(output, "summary", WORK_DIR)
    settings = {
        "embed_methods": embed,
        "version": WORK_VERSION,
        "config": asdict(config),
        "methods": methods,
        "buckets": n_buckets,
        "parts": parts,
        "parts_per_task": PARTS_PER_TASK,
    }
    earlier = _read_json(_join(work, "settings.json"))
    if resume and earlier == settings:
        log("strategies: resuming: keeping the finished tasks' files")
    else:
        if resume and earlier is not None:
            log("strategies: settings or attribution files changed since the interrupted run; "
                "starting over")  # fmt: skip
        _remove_tree(work)
        _write_json(settings, _join(work, "settings.json"))
    tasks = [parts[i : i + PARTS_PER_TASK] for i in range(0, len(parts), PARTS_PER_TASK)]
    done = set(_list(_join(work, "done")))
    todo1 = [i for i in range(len(tasks)) if f"t{i:05d}.json" not in done]
    finished = set(_list(_join(work, "results")))
    todo2 = [b for b in range(n_buckets) if f"b{b:05d}-rows.parquet" not in finished]
    log(
        f"strategies: {rows} rows in {len(parts)} files, methods {', '.join(methods)}; "
        f"{n_buckets} bucket(s); bucketing {len(todo1)}/{len(tasks)} task(s), analysing "
        f"{len(todo2)}/{n_buckets} bucket(s)"
    )
    if use_ray is None:  # a small output: no Ray to start (seconds), the same functions in-process
        use_ray = ray.is_initialized() or address not in (None, "local") or rows > IN_PROCESS_ROWS
    if not use_ray:
        attr = _join(output, "attributions")
        for n, i in enumerate(todo1, 1):
            bucket_parts(i, tasks[i], attr, work, methods, config.grid, n_buckets)
            log(f"strategies: bucketing {n}/{len(todo1)} done")
        for n, b in enumerate(todo2, 1):
            analyse_bucket(b, work, methods, asdict(config), id_type, embed)
            log(f"strategies: analysis {n}/{len(todo2)} done")
        todo1 = todo2 = []
    started = False
    if (todo1 or todo2) and not ray.is_initialized():
        kwargs = {"include_dashboard": False, "logging_level": "WARNING"}
        if address in (None, "local"):
            kwargs["num_cpus"] = num_cpus
        ray.init(address=address or "local", **kwargs)
        started = True
    try:
        attr = _join(output, "attributions")
        from xai_workers.storage import worker_env

        # the tasks' storage: this process's endpoint (xai_workers.storage.configure)
        opts = {"num_cpus": 1, "max_retries": 2, "runtime_env": {"env_vars": worker_env()}}
        b_task = ray.remote(**opts)(bucket_parts)
        refs = [
            b_task.remote(i, tasks[i], attr, work, methods, config.grid, n_buckets) for i in todo1
        ]
        _wait_all(refs, log, "bucketing")
        a_task = ray.remote(**opts)(analyse_bucket)
        cfg = asdict(config)
        refs = [a_task.remote(b, work, methods, cfg, id_type, embed) for b in todo2]
        _wait_all(refs, log, "analysis")
    finally:
        if started:
            ray.shutdown()
    out = _merge(output, work, n_buckets, config.grid, id_type)
    _remove_tree(work)
    flagged = int(
        np.asarray(out["clusters"].column("flagged").to_numpy(zero_copy_only=False)).sum()
    )
    classes = len(
        set(
            zip(
                out["clusters"].column("target").to_pylist(),
                out["clusters"].column("method").to_pylist(),
                strict=True,
            )
        )  # fmt: skip
    )
    record = {
        "status": "complete",
        "uri": strategies_uri(output),
        "clusters_uri": clusters_uri(output),
        "rows": out["rows"].num_rows,
        "class_methods_analysed": classes,
        "strategies": out["clusters"].num_rows,
        "flagged": flagged,
        "seconds": round(time.monotonic() - t0, 3),
    }
    log(
        f"strategies: {classes} class/method pairs analysed, {record['strategies']} strategies, "
        f"{flagged} flagged -> {record['uri']}"
    )
    return record


#: ``embed_methods="auto"``: the 2-D t-SNE (most of the analysis' time) for the first of these
#: the output stores: the method the report draws.
EMBED_PREFER = ("gradcam", "integrated_gradients", "cam", "saliency")


def _embed_methods(spec: str | list[str], methods: list[str]) -> list[str]:
    """The methods that get the 2-D embedding: ``"auto"`` (the first of ``EMBED_PREFER`` stored,
    else the first method), ``"all"``, or a list (ValueError for one not analysed)."""
    if spec == "all":
        return list(methods)
    if spec == "auto":
        return [next((m for m in EMBED_PREFER if m in methods), methods[0])]
    wanted = [spec] if isinstance(spec, str) else list(spec)
    bad = [m for m in wanted if m not in methods]
    if bad:
        raise ValueError(f"--embed-methods {', '.join(bad)}: not analysed ({', '.join(methods)})")
    return wanted


def _wait_all(refs: list, log, what: str) -> None:
    import ray

    pending, n, total = list(refs), 0, len(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
        n += 1
        log(f"strategies: {what} {n}/{total} done")


def _merge(output, work, n_buckets, grid, id_type) -> dict:
    base = _join(work, "results")
    rows = [_read_table(_join(base, f"b{b:05d}-rows.parquet")) for b in range(n_buckets)]
    clus = [_read_table(_join(base, f"b{b:05d}-clusters.parquet")) for b in range(n_buckets)]
    r = pa.concat_tables(rows).sort_by(
        [
            ("method", "ascending"),
            ("target", "ascending"),
            ("part", "ascending"),
            ("part_row", "ascending"),
        ]  # fmt: skip
    )
    clus = [c for c in clus if c.num_rows] or clus[:1]
    c = pa.concat_tables(clus).sort_by(
        [("method", "ascending"), ("target", "ascending"), ("strategy", "ascending")]
    )
    r = r.replace_schema_metadata({b"strategies_version": WORK_VERSION.encode()})
    c = c.replace_schema_metadata({b"strategies_version": WORK_VERSION.encode()})
    _write_table(c, clusters_uri(output))
    _write_table(r, strategies_uri(output))
    return {"rows": r, "clusters": c}


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_subcommand(subparsers) -> None:
    """``xai-audit strategies OUTPUT [...]``."""
    d = StrategyConfig()
    p = subparsers.add_parser(
        "strategies",
        help="SpRAy: which strategies does the model use, class by class (summary/strategies*)",
        description="Spectral relevance analysis of a finished run (local or s3://): per class "
        "and stored map method, clusters of similar maps (strategies), with shortcut candidates "
        "flagged. Writes <output>/summary/strategies.parquet and strategy_clusters.parquet.",
    )
    p.add_argument("output", metavar="OUTPUT", help="a finished run's output folder or S3 prefix")
    p.add_argument(
        "--min-class-rows",
        type=int,
        default=d.min_class_rows,
        help=f"classes with fewer usable maps are skipped (default {d.min_class_rows})",
    )
    p.add_argument(
        "--max-strategies",
        type=int,
        default=d.max_strategies,
        help=f"most strategies per class (default {d.max_strategies})",
    )
    p.add_argument("--k", type=int, default=d.k, help=f"kNN neighbours (default {d.k})")
    p.add_argument(
        "--grid",
        type=int,
        default=d.grid,
        help=f"maps are area-averaged to GRID x GRID (default {d.grid})",
    )
    p.add_argument(
        "--eigenvalues",
        type=int,
        default=d.eigenvalues,
        help=f"Laplacian eigenvalues computed (default {d.eigenvalues})",
    )
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed: eigensolver, k-means, t-SNE (default {d.seed})")  # fmt: skip
    p.add_argument(
        "--methods", default=None, help="comma-separated map methods (default: every stored one)"
    )
    p.add_argument(
        "--buckets",
        type=int,
        default=None,
        help=f"class buckets (default: rows / {ROWS_PER_BUCKET}, at least 1)",
    )
    p.add_argument("--no-embedding", action="store_true", help="skip the 2-D t-SNE pictures")
    p.add_argument(
        "--embed-methods",
        default="auto",
        help="methods that get the 2-D t-SNE (most of the time): auto (default: the "
        "one the report draws, Grad-CAM when stored), all, or a comma-separated list",
    )
    p.add_argument(
        "--resume", action="store_true", help="keep the finished tasks of an interrupted run"
    )
    p.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray (default: all)")  # fmt: skip
    add_s3_endpoint(p)
    p.set_defaults(handler=_main)


def _main(ns: argparse.Namespace) -> int:
    log = lambda m: print(f"[xai-audit] {m}", flush=True)  # noqa: E731
    try:
        cfg = StrategyConfig(
            grid=ns.grid, k=ns.k, eigenvalues=ns.eigenvalues, max_strategies=ns.max_strategies,
            min_class_rows=ns.min_class_rows, seed=ns.seed, embed=not ns.no_embedding,
        )  # fmt: skip
        methods = [m.strip() for m in ns.methods.split(",") if m.strip()] if ns.methods else None
        run_strategies(
            ns.output, config=cfg, methods=methods, resume=ns.resume, buckets=ns.buckets,
            address=ns.address, num_cpus=ns.num_cpus, log=log,
            embed_methods=ns.embed_methods if ns.embed_methods in ("auto", "all")
            else [m.strip() for m in ns.embed_methods.split(",") if m.strip()],
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"xai-audit: error: {e}", flush=True)
        return 2
    except KeyboardInterrupt:
        print("xai-audit: interrupted; `xai-audit strategies OUTPUT --resume` finishes", flush=True)
        return 130
    return 0


def run_for_job(cfg, log) -> dict:
    """The job's step after the summary (``xai_audit.attribute``; ``--no-strategies`` skips it):
    :func:`run_strategies` on ``cfg.output`` with the defaults, on the job's Ray address and
    CPUs. Returns the manifest's ``strategies`` record; a failure is logged and recorded, never
    raised (the attributions and summary are complete; ``xai-audit strategies OUTPUT`` can run it
    again)."""
    try:
        return run_strategies(
            cfg.output,
            address=cfg.address,
            num_cpus=None if cfg.num_cpus is None else max(1, int(cfg.num_cpus)),
            log=log,
        )
    except ValueError as e:  # no stored maps (--store stats)
        log(f"strategies: skipped ({e})")
        return {"status": "skipped", "reason": str(e)[:1000]}
    except Exception as e:  # noqa: BLE001 - never fail a finished job over its analysis
        log(f"the strategy analysis failed ({type(e).__name__}: {e}); the attributions are fine")
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:1000]}
