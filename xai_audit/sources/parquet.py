"""Parquet inputs: encoded bytes, Hugging Face ``datasets`` images, or references to files.

The image column decides how a row's image is found (``InputPlan.image_kind``):

- ``binary``: the encoded image itself.
- ``struct``: ``struct<bytes: binary, path: string>``, what ``datasets.Dataset.to_parquet``
  writes for an ``Image()`` feature. ``bytes`` when not null; else ``path``, relative to the
  Parquet file's folder, absolute, or a URI (``s3://``); neither -> an error row.
- ``string``: a path or URI per row, resolved the same way and read with at most
  ``REFERENCE_THREADS`` reads in flight per read task; a missing object is an error row.

Without an id column (Hugging Face files usually have none) a row's id is
``<file relative to the input>#<row>``, stable across runs. Class names come from the file's
``huggingface`` schema metadata (the ``ClassLabel`` names of the label column).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from xai_audit.errors import ConfigError
from xai_audit.sources.base import (
    REFERENCE_THREADS,
    SHARD_ROWS,
    Block,
    InputPlan,
    Source,
    decode,
    in_ranges,
    join,
    max_rows_for,
    ranges,
    read_uri,
    resolve,
)


def image_kind(t: pa.DataType) -> str | None:
    """``binary`` | ``struct`` | ``string`` for an image column of type ``t``, None if unusable."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        if "bytes" in names or "path" in names:
            return "struct"
    return None


def hf_class_names(schema: pa.Schema, label: str | None) -> tuple[str, ...] | None:
    """The ``ClassLabel`` names of column ``label`` from the ``huggingface`` schema metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw or not label:
        return None
    try:
        feats = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    feat = feats.get(label) if isinstance(feats, dict) else None
    if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and feat.get("names"):
        return tuple(str(n) for n in feat["names"])
    return None


def discover(
    uri, fs, root, paths, id_column, image_column, label_column, need_label, threads
) -> InputPlan:
    import pyarrow.parquet as pq

    from xai_workers.storage import pyarrow_filesystem

    pafs, _ = pyarrow_filesystem(uri)

    def footer(path: str):
        try:
            with pafs.open_input_file(path) as f:
                md = pq.ParquetFile(f).metadata
                return md.schema.to_arrow_schema(), tuple(
                    md.row_group(i).num_rows for i in range(md.num_row_groups)
                )
        except Exception as e:  # noqa: BLE001 - any unreadable footer is a config error
            raise ConfigError(f"cannot read Parquet file {path}: {type(e).__name__}: {e}") from None

    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as ex:
        footers = list(ex.map(footer, paths))
    schema0 = footers[0][0]
    label = label_column
    if label is None and "label" in schema0.names:
        label = "label"
    id_col = id_column
    if id_col is None and all("id" in s.names for s, _ in footers):
        id_col = "id"
    kind = None
    for path, (schema, _) in zip(paths, footers, strict=True):
        missing = [c for c in (id_col, image_column, label) if c and c not in schema.names]
        if missing:
            raise ConfigError(
                f"input file {path} has no column(s) {missing} (it has {schema.names}); "
                "use --id-column / --image-column / --label-column"
            )
        t = schema.field(image_column).type
        k = image_kind(t)
        if k is None:
            raise ConfigError(
                f"image column {image_column!r} of {path} is {t}; expected encoded bytes "
                "(binary), a Hugging Face image struct<bytes, path> or a path/URI (string)"
            )
        if kind is not None and k != kind:
            raise ConfigError(f"image column {image_column!r} is {k} in {path} but {kind} before")
        kind = k
        for c in (id_col, label):
            if c and not schema.field(c).type.equals(schema0.field(c).type):
                raise ConfigError(
                    f"column {c!r} is {schema.field(c).type} in {path} but "
                    f"{schema0.field(c).type} in {paths[0]}"
                )
    label_type = schema0.field(label).type if label else None
    if need_label:
        if label is None:
            raise ConfigError("--target label needs a label column; the input has none")
        if not pa.types.is_integer(label_type):
            raise ConfigError(f"--target label needs integer labels; {label!r} is {label_type}")
    sources = tuple(
        Source(*join(uri, root, p), rows=sum(rgs), row_groups=rgs)
        for p, (_, rgs) in zip(paths, footers, strict=True)
    )
    id_type = schema0.field(id_col).type if id_col else pa.string()
    return InputPlan(
        "parquet", uri, sources, id_col, image_column, label, id_type, label_type,
        image_kind=kind, class_names=hf_class_names(schema0, label),
    )  # fmt: skip


def make_shards(plan: InputPlan, done: Mapping[str, np.ndarray], shard_rows: int = SHARD_ROWS):
    """Whole row groups of one file per shard (a row group larger than ``shard_rows`` is one
    shard, read as a stream), rows already done listed as ``skip`` ranges."""
    shards: list[dict] = []
    todo = 0
    for i, s in enumerate(plan.sources):
        d = done.get(s.rel)
        start = 0
        rgs: list[int] = []
        acc = 0
        bounds = np.cumsum((0, *s.row_groups))
        for g, n in enumerate(s.row_groups):
            rgs.append(g)
            acc += n
            last = g == len(s.row_groups) - 1
            if acc >= shard_rows or last:
                stop = start + acc
                skip = (
                    np.flatnonzero(d[start:stop]) + start
                    if d is not None
                    else np.zeros(0, np.int64)
                )
                if len(skip) < acc:
                    shards.append({
                        "kind": "parquet", "source": i, "uri": s.uri, "rel": s.rel,
                        "row_groups": rgs, "start": int(bounds[rgs[0]]), "stop": int(stop),
                        "skip": ranges(skip), "image_kind": plan.image_kind,
                    })  # fmt: skip
                    todo += acc - len(skip)
                start, rgs, acc = stop, [], 0
    return shards, todo


def image_bytes(value, kind: str, base: str) -> tuple[bytes | None, str | None]:
    """One row's image column value -> (encoded bytes, None) or (None, why not), for an image
    column of ``kind`` in a Parquet file in folder ``base`` (module docstring)."""
    if value is None:
        return None, "image is null"
    if kind == "binary":
        return value, None
    if kind == "struct" and value.get("bytes") is not None:
        return value["bytes"], None
    ref = value if kind == "string" else value.get("path")
    if not ref:
        return None, "image has neither bytes nor a path"
    return read_uri(resolve(ref, base))


def _fetch_all(values: list, kind: str, base: str, pool) -> list[tuple[bytes | None, str | None]]:
    """``image_bytes`` of each value, in row order; references are read by ``pool`` (bounded
    concurrency)."""
    if kind == "binary" or pool is None:
        return [image_bytes(v, kind, base) for v in values]
    return list(pool.map(lambda v: image_bytes(v, kind, base), values))


def read_shard(
    shard: Mapping, *, preprocessing, id_column, image_column, label_column, id_type, label_type,
    block_rows=None,
) -> Iterator[pa.Table]:  # fmt: skip
    """Blocks of preprocessed rows of a Parquet shard (``sources.read_shard``)."""
    import pyarrow.parquet as pq

    from xai_workers.storage import pyarrow_filesystem

    max_rows = max_rows_for(preprocessing, block_rows)
    block = Block(preprocessing.image_size, id_type, label_type if label_column else None, max_rows)
    kind = shard.get("image_kind", "binary")
    base = posixpath.dirname(shard["uri"])
    pafs, path = pyarrow_filesystem(shard["uri"])
    skip = in_ranges(shard["skip"])
    columns = [c for c in (id_column, image_column, label_column) if c]
    row = shard["start"]
    pool = ThreadPoolExecutor(REFERENCE_THREADS) if kind != "binary" else None
    try:
        with pafs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
            batch_rows = max(1, min(max(max_rows, 64), 256))
            for rb in pf.iter_batches(
                batch_size=batch_rows, row_groups=shard["row_groups"], columns=columns
            ):
                n = rb.num_rows
                keep = [j for j in range(n) if not skip(row + j)]
                ids = (
                    rb.column(id_column).to_pylist()
                    if id_column
                    else [f"{shard['rel']}#{row + j}" for j in range(n)]
                )
                labels = rb.column(label_column).to_pylist() if label_column else [None] * n
                images = rb.column(image_column)
                got = _fetch_all([images[j].as_py() for j in keep], kind, base, pool)
                for j, (data, err) in zip(keep, got, strict=True):
                    x = None
                    if err is None:
                        x, err = decode(data, preprocessing)
                    block.add(ids[j], labels[j], x, err, shard["rel"], row + j)
                    if block.full:
                        yield block.table()
                row += n
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    if row != shard["stop"]:
        raise RuntimeError(
            f"{shard['uri']}: read {row - shard['start']} rows of row groups "
            f"{shard['row_groups']}, expected {shard['stop'] - shard['start']} (file changed?)"
        )
    if len(block):
        yield block.table()
