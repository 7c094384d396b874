"""Output side of the job: the ``<output>`` layout, atomic part files, resume scan, manifest.

Layout (docs/conventions.md, "Output")::

    <output>/manifest.json        config, model checksum, versions, counts, timings
    <output>/attributions/        part-<hash>.parquet files, rows in ``xai_workers.schema``

Why the job can be killed at any moment and resumed without losing or duplicating a row:

- A part file appears complete or not at all: on a local/shared filesystem it is written under a
  hidden temporary name in the same folder and renamed; on S3 an object only exists once its
  upload has completed. Readers (pyarrow, DuckDB ``*.parquet``) never see temporary names.
- A part's name is a hash of the row keys ``(source, source_row)`` it holds, so a write task that
  Ray retries rewrites the same name instead of adding a copy.
- The output itself is the checkpoint: ``scan`` reads the key columns of every part and marks
  those rows done; ``make_shards`` leaves them out, so they are neither recomputed nor written
  again. Temporary leftovers of a killed run are removed first.
- At the end ``scan`` runs again and checks that every input row is present exactly once;
  a duplicate (only possible when Ray re-executes a task with different batching) is removed by
  rewriting the later part without it (``remove_duplicates``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from xai_audit.errors import ConfigError

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TMP_MARK = ".tmp-"
ATTRIBUTIONS = "attributions"
SUMMARY = "summary"
REPORT = "report"
MANIFEST = "manifest.json"
#: What ``--overwrite`` removes: only what xai-audit writes.
OWNED = (ATTRIBUTIONS, SUMMARY, REPORT, MANIFEST)
#: Target size of a part file (uncompressed in-memory bytes of its rows).
TARGET_FILE_BYTES = 128 * 2**20
#: Target size of a Parquet row group inside a part.
TARGET_ROW_GROUP_BYTES = 64 * 2**20
#: zstd levels of part files: rows up to SMALL_ROW_BYTES (uncompressed) / larger (write_part).
#: (128 KB: compact rows, float32 maps since schema version 2, stay at level 9 with any methods)
ZSTD_SMALL_ROWS, ZSTD_LARGE_ROWS, SMALL_ROW_BYTES = 9, 3, 128 * 1024


def join(uri: str, *parts: str) -> str:
    from xai_workers.storage import join_uri

    return join_uri(uri, *parts)


def _fs(uri: str):
    from xai_workers.storage import pyarrow_filesystem

    return pyarrow_filesystem(uri)


def _is_local(pafs) -> bool:
    import pyarrow.fs as pafs_mod

    return isinstance(pafs, pafs_mod.LocalFileSystem)


def list_files(uri: str, recursive: bool = False) -> list[str]:
    """Paths (filesystem paths, not URIs) of the files directly under folder/prefix ``uri``
    (``recursive``: at any depth)."""
    import pyarrow.fs as pafs_mod

    fs, path = _fs(uri)
    selector = pafs_mod.FileSelector(path, allow_not_found=True, recursive=recursive)
    infos = fs.get_file_info(selector)
    return sorted(i.path for i in infos if i.type == pafs_mod.FileType.File)


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs_mod

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs_mod.FileType.NotFound


# --------------------------------------------------------------------------------------------
# small JSON files
# --------------------------------------------------------------------------------------------


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that readers see the old or the new content, never a part."""
    fs, path = _fs(uri)
    parent = posixpath.dirname(path)
    if _is_local(fs):
        fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f"{TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(path)}")
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_json(uri: str, obj) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_json(uri: str):
    from xai_workers.storage import read_bytes

    return json.loads(read_bytes(uri).decode("utf-8"))


# --------------------------------------------------------------------------------------------
# checks before the run
# --------------------------------------------------------------------------------------------


@dataclass
class OutputState:
    """What is at ``<output>`` already: the manifest (or None) and the part files."""

    manifest: dict | None
    parts: list[str]
    temps: list[str]

    @property
    def empty(self) -> bool:
        return self.manifest is None and not self.parts


def inspect(output: str) -> OutputState:
    """Look at ``<output>`` (cheap: one listing, the manifest)."""
    attr = join(output, ATTRIBUTIONS)
    files = list_files(attr)
    parts = [
        p for p in files
        if posixpath.basename(p).startswith(PART_PREFIX) and p.endswith(PART_SUFFIX)
    ]  # fmt: skip
    temps = [p for p in files if posixpath.basename(p).startswith(TMP_MARK)]
    manifest = None
    m_uri = join(output, MANIFEST)
    if exists(m_uri):
        try:
            manifest = read_json(m_uri)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{m_uri} exists but cannot be read: {e}") from None
    return OutputState(manifest, parts, temps)


def check_writable(output: str) -> None:
    """Create ``<output>`` (local) and write + delete a probe file; ConfigError if that fails."""
    probe = join(output, f".xai-audit-probe-{uuid.uuid4().hex}")
    try:
        fs, path = _fs(probe)
        if _is_local(fs):
            fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(b"probe")
        fs.delete_file(path)
    except Exception as e:  # noqa: BLE001 - whatever the store says, it is not writable
        raise ConfigError(f"output {output} is not writable: {type(e).__name__}: {e}") from None


def remove_owned(output: str) -> None:
    """Delete what xai-audit wrote under ``<output>`` (``--overwrite``); nothing else."""
    import pyarrow.fs as pafs_mod

    for name in OWNED:
        fs, path = _fs(join(output, name))
        info = fs.get_file_info(path)
        if info.type == pafs_mod.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs_mod.FileType.File:
            fs.delete_file(path)
        elif not _is_local(fs):  # S3 "folders" are prefixes: delete all that is under it
            for p in list_files(join(output, name), recursive=True):
                fs.delete_file(p)


def set_aside(paths: Iterable[str], dest: str) -> None:
    """Rename part files to hidden ``.corrupt-<name>`` (readers and scans skip them)."""
    fs, _ = _fs(dest)
    for p in paths:
        fs.move(p, posixpath.join(posixpath.dirname(p), ".corrupt-" + posixpath.basename(p)))


def remove_temps(output: str, temps: Iterable[str]) -> int:
    fs, _ = _fs(join(output, ATTRIBUTIONS))
    n = 0
    for p in temps:
        try:
            fs.delete_file(p)
            n += 1
        except FileNotFoundError:
            pass
    return n


# --------------------------------------------------------------------------------------------
# part files (Ray task, no Ray import)
# --------------------------------------------------------------------------------------------


def rows_per_file(schema: pa.Schema, total_rows: int, target_bytes: int = TARGET_FILE_BYTES) -> int:
    """Rows per part: about ``target_bytes`` of output, at least 16 files' worth of parallelism
    on small inputs, never fewer than 64 rows (unless the whole input is smaller)."""
    per_row = row_bytes(schema)
    by_bytes = max(1, target_bytes // per_row)
    by_count = max(64, -(-total_rows // 16))
    return int(max(1, min(by_bytes, by_count)))


def row_bytes(schema: pa.Schema) -> int:
    """Approximate in-memory (uncompressed) bytes of one output row (tensors dominate)."""
    total = 64
    for f in schema:
        t = f.type
        if isinstance(t, pa.FixedShapeTensorType):
            total += int(np.prod(t.shape)) * t.value_type.bit_width // 8
        elif pa.types.is_fixed_size_list(t):  # maps (float32), top-k lists
            fixed = pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)
            total += t.list_size * (t.value_type.bit_width // 8 if fixed else 8)
        else:
            total += 16
    return total


def float_leaves(schema: pa.Schema) -> list[str]:
    """Parquet leaf paths of the float columns of ``schema``: ``name`` for a float column,
    ``name.list.element`` for a tensor or fixed-size list of floats (what
    ``use_byte_stream_split`` takes), maps included. The maps are float32 (compact ones hold
    bfloat16 values: their two low byte streams are zeros and compress to nothing); every
    engine decodes BYTE_STREAM_SPLIT on FLOAT (DuckDB 2.0 does not on float16, Spark reads no
    float16 at all, which is why no column is float16)."""
    out = []
    for f in schema:
        t = f.type
        if isinstance(t, pa.FixedShapeTensorType):
            t = t.storage_type
        if pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type):
            out.append(f"{f.name}.list.element")
        elif pa.types.is_floating(t):
            out.append(f.name)
    return out


def part_name(sources: pa.Array, rows: pa.Array) -> str:
    """``part-<hash>.parquet``: sha256 of the sorted row keys, so a retry reuses the name."""
    h = hashlib.sha256()
    for s, r in zip(sources.to_pylist(), rows.to_pylist(), strict=True):
        h.update(f"{s}\x00{r}\n".encode())
    return f"{PART_PREFIX}{h.hexdigest()[:24]}{PART_SUFFIX}"


def write_part(
    table: pa.Table,
    dest: str,
    *,
    compression: str = "zstd",
) -> dict:
    """Write ``table`` (rows in the output schema) as one part under folder ``dest``, atomically.

    Rows are sorted by (source, source_row); in-flight columns (name starting with ``_``, e.g.
    the worker's ``_pooled_*``) are dropped. Float columns, tensors included, are written with
    Parquet's BYTE_STREAM_SPLIT encoding (then zstd): on maps it takes about an eighth off.
    zstd runs at level 9 on small rows (compact / stats profiles: with float16 maps, schema 1,
    19.1 KB per 224 px ResNet-18 row against 19.9 KB at Arrow's default level 1, ~3 ms per row)
    and level 3 on large ones (full: 745 KB against 753 KB, no slower than level 1; level 9
    would cost 11 ms per row).
    Returns ``{"file", "rows", "ok", "error", "bytes"}`` (bytes on disk).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = table.select([n for n in table.column_names if not n.startswith("_")])
    table = table.sort_by([("source", "ascending"), ("source_row", "ascending")])
    name = part_name(table.column("source").combine_chunks(), table.column("source_row"))
    fs, folder = _fs(dest)
    final = posixpath.join(folder, name)
    per_row = max(1, row_bytes(table.schema))
    row_group = max(1, TARGET_ROW_GROUP_BYTES // per_row)
    # dictionary encoding only for strings: on float maps it costs 3x the write time and makes
    # files larger (pyarrow tries it, then falls back page by page)
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    kwargs = dict(
        compression=compression,
        compression_level=(ZSTD_SMALL_ROWS if per_row <= SMALL_ROW_BYTES else ZSTD_LARGE_ROWS)
        if compression == "zstd"
        else None,
        row_group_size=row_group,
        write_statistics=False,
        use_dictionary=strings,
        use_byte_stream_split=float_leaves(table.schema) or False,
    )
    if _is_local(fs):
        fs.create_dir(folder, recursive=True)
        tmp = posixpath.join(folder, f"{TMP_MARK}{uuid.uuid4().hex}-{name}")
        with fs.open_output_stream(tmp) as f:
            pq.write_table(table, f, **kwargs)
        fs.move(tmp, final)
    else:
        with fs.open_output_stream(final) as f:
            pq.write_table(table, f, **kwargs)
    size = fs.get_file_info(final).size
    n_ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    return {
        "file": name,
        "rows": table.num_rows,
        "ok": n_ok,
        "error": table.num_rows - n_ok,
        "bytes": int(size or 0),
    }


# --------------------------------------------------------------------------------------------
# scan: what is written, exactly once?
# --------------------------------------------------------------------------------------------


@dataclass
class ScanResult:
    """The rows present in the parts, checked against the input's sources.

    ``done``: rel -> bool array (rows,), rows present; ``dup_files``: part -> number of its rows
    that an earlier part already holds; ``unknown``: rows whose key is not an input row
    (``unknown_error``: how many of them are error rows).
    """

    done: dict[str, np.ndarray] = field(default_factory=dict)
    files: int = 0
    rows: int = 0
    ok: int = 0
    error: int = 0
    bytes: int = 0
    duplicates: int = 0
    unknown: int = 0
    unknown_error: int = 0  # error rows among the unknown ones
    dup_files: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)

    def missing(self, sources: Mapping[str, int]) -> int:
        return sum(n - int(self.done[r].sum()) if r in self.done else n for r, n in sources.items())


def _read_keys(fs, path: str):
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["source", "source_row", "status"])
        return path, t, fs.get_file_info(path).size
    except Exception as e:  # noqa: BLE001
        return path, e, 0


def scan(
    dest: str,
    sources: Mapping[str, int],
    parts: list[str] | None = None,
    *,
    threads: int = 16,
) -> ScanResult:
    """Read the key and status columns of every part under ``dest`` (in parallel).

    ``sources`` maps an input file's rel path to its row count. Parts are visited in name order;
    a key seen before counts as a duplicate of the part it appears in.
    """
    fs, folder = _fs(dest)
    if parts is None:
        parts = [
            p for p in list_files(dest)
            if posixpath.basename(p).startswith(PART_PREFIX) and p.endswith(PART_SUFFIX)
        ]  # fmt: skip
    res = ScanResult(done={r: np.zeros(n, dtype=bool) for r, n in sources.items()})
    with ThreadPoolExecutor(max(1, min(threads, len(parts) or 1))) as ex:
        for path, t, size in ex.map(lambda p: _read_keys(fs, p), sorted(parts)):
            if isinstance(t, Exception):
                res.unreadable.append(path)
                continue
            res.files += 1
            res.bytes += int(size or 0)
            src = t.column("source").to_numpy(zero_copy_only=False)
            row = t.column("source_row").to_numpy()
            status = t.column("status").to_numpy(zero_copy_only=False)
            res.rows += len(src)
            dups = 0
            for s in np.unique(src):
                sel = src == s
                d = res.done.get(s)
                rows = row[sel]
                known = np.zeros(len(rows), bool) if d is None else (rows >= 0) & (rows < len(d))
                res.unknown += int((~known).sum())  # a file gone, or rows past its end now
                res.unknown_error += int((status[sel][~known] != "ok").sum())
                rows = rows[known]
                if not len(rows):
                    continue
                seen = d[rows]
                # a key twice inside one part, or already in an earlier part
                uniq, counts = np.unique(rows, return_counts=True)
                dups += int(seen.sum()) + int((counts - 1).sum())
                d[rows] = True
            res.ok += int((status == "ok").sum())
            res.error += int((status != "ok").sum())
            if dups:
                res.dup_files[path] = dups
                res.duplicates += dups
    return res


def remove_sources(dest: str, rels: Iterable[str]) -> int:
    """Rewrite the parts that hold rows of the input files ``rels`` without those rows (a part
    left empty is deleted). Returns the number of rows removed (``--reprocess-changed``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rels = pa.array(sorted(set(rels)), pa.string())
    fs, _ = _fs(dest)
    removed = 0
    for path in list_files(dest):
        name = posixpath.basename(path)
        if not (name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)):
            continue
        with fs.open_input_file(path) as f:
            src = pq.read_table(f, columns=["source"]).column("source")
        drop = pc.is_in(src, value_set=rels)
        n = pc.sum(drop).as_py() or 0
        if not n:
            continue
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
        keep = pc.invert(drop)
        if n < table.num_rows:  # the new part first: a crash in between loses nothing
            write_part(table.filter(keep), dest)
        fs.delete_file(path)
        removed += n
    return removed


def remove_duplicates(dest: str, sources: Mapping[str, int]) -> int:
    """Rewrite the parts that hold rows an earlier part (name order) already holds, without
    those rows. Returns the number of rows removed. Rare: see the module docstring."""
    import pyarrow.parquet as pq

    fs, _ = _fs(dest)
    parts = sorted(
        p for p in list_files(dest)
        if posixpath.basename(p).startswith(PART_PREFIX) and p.endswith(PART_SUFFIX)
    )  # fmt: skip
    seen = {r: np.zeros(n, dtype=bool) for r, n in sources.items()}
    removed = 0
    for path in parts:
        with fs.open_input_file(path) as f:
            keys = pq.read_table(f, columns=["source", "source_row"])
        src = keys.column("source").to_numpy(zero_copy_only=False)
        row = keys.column("source_row").to_numpy()
        keep = np.ones(len(src), dtype=bool)
        for i, (s, r) in enumerate(zip(src, row, strict=True)):
            d = seen.get(s)
            if d is None or not 0 <= r < len(d):
                continue
            if d[r]:
                keep[i] = False
            d[r] = True
        if keep.all():
            continue
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
        removed += int((~keep).sum())
        if keep.any():  # the new part first: a crash in between leaves a duplicate, not a loss
            write_part(table.filter(pa.array(keep)), dest)
        fs.delete_file(path)
    return removed
