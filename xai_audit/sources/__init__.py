"""Input side of the job: find the input rows, cut them into shards, read and preprocess a shard.

Formats, one module each, detected from what ``--input`` holds (``--input-format`` overrides),
local or ``s3://``:

- ``parquet`` (:mod:`.parquet`): one file, or a folder/prefix of ``*.parquet`` files (searched
  recursively); the image column holds encoded bytes, a Hugging Face ``datasets`` image struct
  ``<bytes, path>``, or a path/URI per row (a Parquet of references). Ids from the id column, or
  ``<file relative to the input>#<row>`` without one.
- ``images`` (:mod:`.images`): a folder/prefix of image files (by extension), flat or one folder
  per class (labels and class names from the folders); the id is the path relative to the input.
- ``webdataset`` (:mod:`.webdataset`): ``*.tar`` shards, a sample per key; the id is the key.

Every input row has a stable key ``(source, source_row)``: the file relative to the input root and
the row's index in it (0 for an image file, the sample index in a tar). The output carries the key,
so a resumed run knows which rows are already written (``xai_audit.output.scan``) and
``make_shards`` leaves them out.

A shard is a small, JSON-able dict describing rows of one file (whole Parquet row groups, one tar)
or a group of image files; ``read_shard`` turns it into blocks of preprocessed rows, the batch
format of ``xai_workers.worker`` (``id``, ``label``, ``x``, ``error``, ``source``,
``source_row``). A row that cannot be read or decoded gets ``x`` null and ``error`` set: it
travels on and becomes an error row, it is never dropped.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa

from xai_audit.errors import ConfigError
from xai_audit.sources import images as _images
from xai_audit.sources import parquet as _parquet
from xai_audit.sources import webdataset as _webdataset
from xai_audit.sources.base import (
    BLOCK_BYTES,
    IMAGE_EXTENSIONS,
    PARQUET_EXTENSIONS,
    SHARD_ROWS,
    TAR_EXTENSIONS,
    InputPlan,
    Source,
    join,
)

__all__ = [
    "BLOCK_BYTES", "IMAGE_EXTENSIONS", "INPUT_FORMATS", "LABELS_FROM", "PARQUET_EXTENSIONS",
    "SHARD_ROWS", "TAR_EXTENSIONS", "InputPlan", "Source", "discover", "make_shards",
    "read_shard",
]  # fmt: skip

INPUT_FORMATS = ("auto", "parquet", "images", "webdataset")
LABELS_FROM = _images.LABELS_FROM
_BY_KIND = {"parquet": _parquet, "images": _images, "webdataset": _webdataset}


def discover(
    uri: str,
    *,
    id_column: str | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    need_label: bool = False,
    exclude: str | None = None,
    threads: int = 16,
    input_format: str = "auto",
    labels_from: str = "auto",
) -> InputPlan:
    """List the input at ``uri`` and read what describes it (Parquet footers, tar headers);
    ConfigError for anything unusable.

    ``id_column`` None: a column named ``id`` when every Parquet file has one, else
    ``<rel>#<row>`` ids; a name given that a file lacks is a ConfigError. ``label_column`` None
    uses a column named ``label`` when the Parquet files have one. ``need_label``: the target is
    the label, so labels must exist and be integers. ``exclude``: a path (the job's output) whose
    files are never taken as input. ``input_format``: one of ``INPUT_FORMATS`` (``auto``: by the
    files found). ``labels_from``: for image folders, ``auto`` | ``folders`` | ``none``.
    """
    from xai_workers.storage import filesystem

    if input_format not in INPUT_FORMATS:
        raise ConfigError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}")
    if labels_from not in LABELS_FROM:
        raise ConfigError(f"--labels-from must be one of {', '.join(LABELS_FROM)}")
    try:
        fs, root = filesystem(uri)
        root = root.rstrip("/") or root
        is_file = fs.isfile(root)
        is_dir = not is_file and fs.isdir(root)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read input {uri}: {type(e).__name__}: {e}") from None
    if not is_file and not is_dir:
        raise ConfigError(f"input not found: {uri}")
    try:
        infos = {root: fs.info(root)} if is_file else fs.find(root, detail=True)
    except OSError as e:
        raise ConfigError(f"cannot list input {uri}: {type(e).__name__}: {e}") from None
    paths = sorted(infos)
    if exclude:
        _, ex = filesystem(exclude)
        ex = ex.rstrip("/")
        paths = [p for p in paths if p != ex and not p.startswith(ex + "/")]
    # hidden and underscore Parquet files (_SUCCESS, _metadata, .part-x.crc) are not data
    hidden = {p for p in paths if posixpath.basename(p).startswith((".", "_"))}
    found = {
        "parquet": [p for p in paths if p.lower().endswith(PARQUET_EXTENSIONS) and p not in hidden],
        "images": [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)],
        "webdataset": [p for p in paths if p.lower().endswith(TAR_EXTENSIONS)],
    }
    if is_file and not any(found.values()):
        found["parquet"] = paths  # a single file without the usual extension: try it as Parquet
    kind = input_format
    if kind == "auto":
        kinds = [k for k, v in found.items() if v]
        if len(kinds) > 1:
            names = {"parquet": "Parquet files", "images": "image files", "webdataset": "tar files"}
            what = " and ".join(f"{names[k]} ({len(found[k])})" for k in kinds)
            raise ConfigError(
                f"input {uri} holds {what}; point --input at one kind or choose one with "
                "--input-format"
            )
        if not kinds:
            raise ConfigError(f"input {uri} holds no Parquet files, image files or tar files")
        kind = kinds[0]
    if not found[kind]:
        raise ConfigError(f"input {uri} holds no {kind} files (--input-format {kind})")
    base = root if is_dir else posixpath.dirname(root)
    if kind != "parquet" and id_column is not None:
        raise ConfigError(f"--id-column {id_column!r}: {kind} inputs have no columns")
    if kind == "parquet":
        plan = _parquet.discover(
            uri, fs, base, found[kind], id_column, image_column, label_column, need_label, threads,
        )  # fmt: skip
    elif kind == "images":
        plan = _images.discover(
            uri, base, found[kind], labels_from=labels_from, label_column=label_column,
            need_label=need_label,
        )  # fmt: skip
    else:
        plan = _webdataset.discover(
            uri, base, found[kind], label_column=label_column, need_label=need_label,
            threads=threads,
        )  # fmt: skip
    stamps = {join(uri, base, p)[1]: stamp(infos[p]) for p in found[kind]}
    return dataclasses.replace(
        plan, sources=tuple(dataclasses.replace(s, stamp=stamps[s.rel]) for s in plan.sources)
    )


def stamp(info: Mapping) -> str:
    """``<size>:<version>`` of a file from its listing (fsspec ``info``): the version is the S3
    ETag, else the modification time. A file rewritten in place changes its stamp, even with the
    same number of rows (what ``--incremental`` compares)."""
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    version = str(version).strip('"')  # S3 ETags come quoted
    return f"{info.get('size')}:{version}"


def make_shards(
    plan: InputPlan,
    done: Mapping[str, np.ndarray] | None = None,
    shard_rows: int = SHARD_ROWS,
) -> tuple[list[dict], int]:
    """Cut the input into shards of about ``shard_rows`` rows, leaving out rows already done.

    ``done`` maps a source's ``rel`` to a bool array (rows,) marking rows already written.
    Returns (shards, rows to do). Parquet shards are whole row groups of one file (a row group
    larger than ``shard_rows`` is one shard, read as a stream); image shards group files; a tar
    is one shard.
    """
    shards, todo = _BY_KIND[plan.kind].make_shards(plan, done or {}, shard_rows)
    if plan.label_map is not None:  # labels by name: every shard relabels its rows
        extra = {"label_map": list(plan.label_map), "label_names": list(plan.class_names or ())}
        shards = [{**sh, **extra} for sh in shards]
    return shards, todo


def read_shard(
    shard: Mapping,
    *,
    preprocessing,
    id_column: str | None,
    image_column: str,
    label_column: str | None,
    id_type: pa.DataType,
    label_type: pa.DataType | None,
    block_rows: int | None = None,
) -> Iterator[pa.Table]:
    """Yield blocks of preprocessed rows of ``shard`` (worker batch format, module docstring).

    Blocks hold ``block_rows`` rows (the job passes its batch size, so that each actor task is
    one batch: work spreads over the actors and results stream on to the writer), and never more
    than ``BLOCK_BYTES`` of tensors. Rows listed in the shard's ``skip`` ranges (already
    written) are left out; every other row is yielded exactly once, as a tensor or with an error.
    A shard with a ``label_map`` (labels matched by name) yields model class indices as labels.
    """
    blocks = _BY_KIND[shard["kind"]].read_shard(
        shard, preprocessing=preprocessing, id_column=id_column, image_column=image_column,
        label_column=label_column, id_type=id_type, label_type=label_type, block_rows=block_rows,
    )  # fmt: skip
    if not shard.get("label_map"):
        return blocks
    from xai_audit.sources.labels import apply_label_map

    return (apply_label_map(b, shard["label_map"], shard.get("label_names")) for b in blocks)
