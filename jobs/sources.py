"""Input side of the job: find the input rows, cut them into shards, read and preprocess a shard.

Inputs (docs/conventions.md, "Command line"):

- Parquet: one file, or a folder/prefix holding ``*.parquet`` files (searched recursively), with
  an id column, an image column of encoded bytes and optionally a label column.
- Images: a folder/prefix of image files (by extension, searched recursively); the id is the
  file's path relative to the input folder.

Every input row has a stable key ``(source, source_row)``: the file relative to the input root and
the row's index in it (0 for an image file). The output carries the key, so a resumed run knows
which rows are already written (``jobs.output.scan``) and ``make_shards`` leaves them out.

A shard is a small, JSON-able dict describing consecutive rows of one Parquet file (whole row
groups) or a group of image files; ``read_shard`` turns it into blocks of preprocessed rows, the
batch format of ``xai_workers.worker`` (``id``, ``label``, ``x``, ``error``, ``source``,
``source_row``). A row that cannot be decoded gets ``x`` null and ``error`` set: it travels on and
becomes an error row, it is never dropped.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs.config import ConfigError

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
    ".pnm", ".ico", ".tga", ".jp2", ".j2k",
)  # fmt: skip
PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
#: Rows per shard (one read + preprocess task); whole row groups are never split.
SHARD_ROWS = 256
#: Preprocessed bytes per block handed to the next stage.
BLOCK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Source:
    """One input file: full ``uri``, ``rel`` path under the input root, ``rows`` it holds and,
    for Parquet, the rows of each row group."""

    uri: str
    rel: str
    rows: int
    row_groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class InputPlan:
    """What the input is: its kind (``parquet`` | ``images``), root, files, and column types."""

    kind: str
    root: str
    sources: tuple[Source, ...]
    id_column: str
    image_column: str
    label_column: str | None
    id_type: pa.DataType
    label_type: pa.DataType | None

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.sources)

    def fingerprint(self) -> str:
        """sha256 of the files and their row counts: changes when the input does."""
        h = hashlib.sha256(self.kind.encode())
        for s in self.sources:
            h.update(f"\n{s.rel}\t{s.rows}".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "root": self.root,
            "files": len(self.sources),
            "rows": self.total_rows,
            "id_column": self.id_column,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "fingerprint": self.fingerprint(),
        }


# --------------------------------------------------------------------------------------------
# discovery (driver)
# --------------------------------------------------------------------------------------------


def _join(root_uri: str, root_path: str, path: str) -> tuple[str, str]:
    """(full uri, relative path) of ``path`` (fs path) under the input root."""
    rel = posixpath.relpath(path, root_path) if path != root_path else posixpath.basename(path)
    if "://" in root_uri:
        proto = root_uri.split("://", 1)[0]
        return f"{proto}://{path}", rel
    return path, rel


def discover(
    uri: str,
    *,
    id_column: str = "id",
    image_column: str = "image",
    label_column: str | None = None,
    need_label: bool = False,
    exclude: str | None = None,
    s3_endpoint: str | None = None,
    threads: int = 16,
) -> InputPlan:
    """List the input at ``uri`` and read Parquet footers; ConfigError for anything unusable.

    ``label_column`` None uses a column named ``label`` when the Parquet files have one.
    ``need_label``: the target is the label, so a label column must exist and be integer.
    ``exclude``: a path (the job's output) whose files are never taken as input.
    """
    from xai_workers.storage import filesystem

    try:
        fs, root = filesystem(uri, s3_endpoint)
        root = root.rstrip("/") or root
        is_file = fs.isfile(root)
        is_dir = not is_file and fs.isdir(root)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read input {uri}: {type(e).__name__}: {e}") from None
    if not is_file and not is_dir:
        raise ConfigError(f"input not found: {uri}")
    if is_file:
        paths = [root]
    else:
        try:
            paths = sorted(fs.find(root))
        except OSError as e:
            raise ConfigError(f"cannot list input {uri}: {type(e).__name__}: {e}") from None
    if exclude:
        _, ex = filesystem(exclude, s3_endpoint)
        ex = ex.rstrip("/")
        paths = [p for p in paths if p != ex and not p.startswith(ex + "/")]
    parquet = [p for p in paths if p.lower().endswith(PARQUET_EXTENSIONS)]
    images = [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)]
    hidden = [p for p in paths if posixpath.basename(p).startswith((".", "_"))]
    parquet = [p for p in parquet if p not in hidden]
    if is_file and not parquet and not images:
        parquet = paths  # a single file without the usual extension: try it as Parquet
    if parquet and images:
        raise ConfigError(
            f"input {uri} holds both Parquet files ({len(parquet)}) and image files "
            f"({len(images)}); point --input at one kind"
        )
    if parquet:
        return _discover_parquet(
            uri, fs, root if is_dir else posixpath.dirname(root), parquet,
            id_column, image_column, label_column, need_label, s3_endpoint, threads,
        )  # fmt: skip
    if images:
        if need_label:
            raise ConfigError("--target label needs a label column; an image folder has none")
        if label_column:
            raise ConfigError(f"--label-column {label_column!r}: an image folder has no columns")
        sources = tuple(
            Source(*_join(uri, root if is_dir else posixpath.dirname(root), p), rows=1)
            for p in images
        )
        return InputPlan("images", uri, sources, "id", "image", None, pa.string(), None)
    raise ConfigError(f"input {uri} holds no Parquet files and no image files")


def _discover_parquet(
    uri, fs, root, paths, id_column, image_column, label_column, need_label, s3_endpoint, threads
) -> InputPlan:
    import pyarrow.parquet as pq

    from xai_workers.storage import pyarrow_filesystem

    pafs, _ = pyarrow_filesystem(uri, s3_endpoint)

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
    for path, (schema, _) in zip(paths, footers, strict=True):
        missing = [c for c in (id_column, image_column, label) if c and c not in schema.names]
        if missing:
            raise ConfigError(
                f"input file {path} has no column(s) {missing} (it has {schema.names}); "
                "use --id-column / --image-column / --label-column"
            )
        t = schema.field(image_column).type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or
                pa.types.is_binary_view(t)):  # fmt: skip
            raise ConfigError(
                f"image column {image_column!r} of {path} is {t}, expected binary (encoded bytes)"
            )
        for c in (id_column, label):
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
        Source(*_join(uri, root, p), rows=sum(rgs), row_groups=rgs)
        for p, (_, rgs) in zip(paths, footers, strict=True)
    )
    id_type = schema0.field(id_column).type
    return InputPlan("parquet", uri, sources, id_column, image_column, label, id_type, label_type)


# --------------------------------------------------------------------------------------------
# shards (driver)
# --------------------------------------------------------------------------------------------


def _ranges(rows: np.ndarray) -> list[list[int]]:
    """Sorted row indices -> [[start, stop), ...] runs (compact in JSON)."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate([[rows[0]], rows[breaks + 1]])
    stops = np.concatenate([rows[breaks] + 1, [rows[-1] + 1]])
    return [[int(a), int(b)] for a, b in zip(starts, stops, strict=True)]


def make_shards(
    plan: InputPlan,
    done: Mapping[str, np.ndarray] | None = None,
    shard_rows: int = SHARD_ROWS,
) -> tuple[list[dict], int]:
    """Cut the input into shards of about ``shard_rows`` rows, leaving out rows already done.

    ``done`` maps a source's ``rel`` to a bool array (rows,) marking rows already written.
    Returns (shards, rows to do). Parquet shards are whole row groups of one file (a row group
    larger than ``shard_rows`` is one shard, read as a stream); image shards group files.
    """
    done = done or {}
    shards: list[dict] = []
    todo_rows = 0
    if plan.kind == "images":
        group: list[list] = []
        for i, s in enumerate(plan.sources):
            d = done.get(s.rel)
            if d is not None and d.all():
                continue
            group.append([i, s.uri, s.rel])
            if len(group) >= shard_rows:
                shards.append({"kind": "images", "items": group})
                group = []
        if group:
            shards.append({"kind": "images", "items": group})
        todo_rows = sum(len(s["items"]) for s in shards)
        return shards, todo_rows
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
                        "skip": _ranges(skip),
                    })  # fmt: skip
                    todo_rows += acc - len(skip)
                start, rgs, acc = stop, [], 0
    return shards, todo_rows


# --------------------------------------------------------------------------------------------
# reading + preprocessing (Ray task, no Ray import)
# --------------------------------------------------------------------------------------------


def _in_ranges(ranges: list[list[int]]):
    if not ranges:
        return lambda r: False
    starts = np.array([a for a, _ in ranges])
    stops = np.array([b for _, b in ranges])

    def contains(r: int) -> bool:
        k = int(np.searchsorted(starts, r, side="right")) - 1
        return k >= 0 and r < stops[k]

    return contains


class _Block:
    """Accumulates preprocessed rows and emits them as tables of the worker's batch format."""

    def __init__(self, size: int, id_type, label_type, max_rows: int):
        self.size, self.id_type, self.label_type = size, id_type, label_type
        self.max_rows = max_rows
        self.clear()

    def clear(self):
        self.ids, self.labels, self.xs = [], [], []
        self.errors, self.sources, self.rows = [], [], []

    def add(self, id_, label, x, error, source, row):
        self.ids.append(id_)
        self.labels.append(label)
        self.xs.append(x)
        self.errors.append(error)
        self.sources.append(source)
        self.rows.append(row)

    def __len__(self):
        return len(self.ids)

    def table(self) -> pa.Table:
        from xai_workers.schema import tensor_array

        n, s = len(self.ids), self.size
        arr = np.zeros((n, 3, s, s), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        for i, x in enumerate(self.xs):
            if x is not None:
                arr[i] = x
                valid[i] = True
        cols = {"id": pa.array(self.ids, type=self.id_type)}
        if self.label_type is not None:
            cols["label"] = pa.array(self.labels, type=self.label_type)
        cols["x"] = tensor_array(arr, valid)
        cols["error"] = pa.array(self.errors, type=pa.string())
        cols["source"] = pa.array(self.sources, type=pa.string())
        cols["source_row"] = pa.array(self.rows, type=pa.int64())
        out = pa.table(cols)
        self.clear()
        return out


def _decode(data, preprocessing) -> tuple[np.ndarray | None, str | None]:
    """Encoded bytes -> ((3, S, S) float32, None) or (None, a message for a person)."""
    from xai_workers.preprocess import ImageDecodeError, preprocess_bytes

    try:
        return preprocess_bytes(data, preprocessing).numpy(), None
    except ImageDecodeError as e:
        return None, f"cannot decode image: {e}"
    except MemoryError:
        return None, "cannot decode image: out of memory while decoding"
    except Exception as e:  # noqa: BLE001 - any odd image is a row error, never a crash
        return None, f"cannot preprocess image: {type(e).__name__}: {e}"[:500]


def read_shard(
    shard: Mapping,
    *,
    preprocessing,
    id_column: str,
    image_column: str,
    label_column: str | None,
    id_type: pa.DataType,
    label_type: pa.DataType | None,
    s3_endpoint: str | None = None,
    block_rows: int | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> Iterator[pa.Table]:
    """Yield blocks of preprocessed rows of ``shard`` (worker batch format, module docstring).

    Blocks hold ``block_rows`` rows (the job passes its batch size, so that each actor task is
    one batch: work spreads over the actors and results stream on to the writer), and never more
    than ``block_bytes`` of tensors. Rows listed in the shard's ``skip`` ranges (already
    written) are left out; every other row is yielded exactly once, as a tensor or with an error.
    """
    s = preprocessing.image_size
    max_rows = max(1, min(4096, block_bytes // (3 * s * s * 4)))
    if block_rows:
        max_rows = max(1, min(max_rows, int(block_rows)))
    block = _Block(s, id_type, label_type if label_column else None, max_rows)
    if shard["kind"] == "images":
        from xai_workers.storage import read_bytes

        for _, uri, rel in shard["items"]:
            try:
                data = read_bytes(uri, s3_endpoint)
            except Exception as e:  # noqa: BLE001 - a missing/unreadable file is a row error
                x, err = None, f"cannot read file: {type(e).__name__}: {e}"[:500]
            else:
                x, err = _decode(data, preprocessing)
            block.add(rel, None, x, err, rel, 0)
            if len(block) >= max_rows:
                yield block.table()
        if len(block):
            yield block.table()
        return

    import pyarrow.parquet as pq

    from xai_workers.storage import pyarrow_filesystem

    pafs, path = pyarrow_filesystem(shard["uri"], s3_endpoint)
    skip = _in_ranges(shard["skip"])
    columns = [id_column, image_column] + ([label_column] if label_column else [])
    row = shard["start"]
    with pafs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
        batch_rows = max(1, min(max(max_rows, 64), 256))
        for rb in pf.iter_batches(
            batch_size=batch_rows, row_groups=shard["row_groups"], columns=columns
        ):
            ids = rb.column(id_column).to_pylist()
            images = rb.column(image_column)
            labels = rb.column(label_column).to_pylist() if label_column else [None] * len(ids)
            for j in range(rb.num_rows):
                r = row + j
                if skip(r):
                    continue
                data = images[j].as_py()
                if data is None:
                    x, err = None, "image is null"
                else:
                    x, err = _decode(data, preprocessing)
                block.add(ids[j], labels[j], x, err, shard["rel"], r)
                if len(block) >= max_rows:
                    yield block.table()
            row += rb.num_rows
    if row != shard["stop"]:
        raise RuntimeError(
            f"{shard['uri']}: read {row - shard['start']} rows of row groups "
            f"{shard['row_groups']}, expected {shard['stop'] - shard['start']} (file changed?)"
        )
    if len(block):
        yield block.table()
