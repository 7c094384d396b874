"""What every input format shares: the plan, row keys, skip ranges, preprocessed blocks."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
    ".pnm", ".ico", ".tga", ".jp2", ".j2k",
)  # fmt: skip
PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
TAR_EXTENSIONS = (".tar",)
#: Rows per shard (one read + preprocess task); whole row groups are never split.
SHARD_ROWS = 256
#: Preprocessed bytes per block handed to the next stage.
BLOCK_BYTES = 32 * 2**20
#: Encoded images read at once from a Parquet of references (per read task).
REFERENCE_THREADS = 8


@dataclass(frozen=True)
class Source:
    """One input file: full ``uri``, ``rel`` path under the input root, ``rows`` it holds, for
    Parquet the rows of each row group, for an image in a class folder its ``label``, its
    listing's ``stamp`` (``xai_audit.sources.stamp``)."""

    uri: str
    rel: str
    rows: int
    row_groups: tuple[int, ...] = ()
    label: int | None = None
    stamp: str = ""  # size and version (ETag or modification time) when listed


@dataclass(frozen=True)
class InputPlan:
    """What the input is.

    - ``kind``: ``parquet`` | ``images`` | ``webdataset``; ``root``: the input URI.
    - ``id_column``: the Parquet id column, or None: ids are ``<rel>#<row>`` (Parquet without
      one), the file's ``rel`` (images) or the sample key (WebDataset).
    - ``image_column``: the Parquet image column; ``image_kind``: how its values hold the image
      (``binary`` encoded bytes, ``struct`` Hugging Face ``{bytes, path}``, ``string`` a path
      or URI); other kinds: ``binary``.
    - ``label_column``: the Parquet label column, or ``label`` for labels the reader makes
      (class folders, WebDataset ``cls``/``json``), or None.
    - ``class_names``: names of the classes when the input says them (HF ``ClassLabel``,
      folder names), else None.
    - ``label_map``: input class index -> model class index (-1: no such class), when labels
      are matched to the model's class names (:mod:`xai_audit.sources.labels`); None: the
      labels are the model's indices already.
    """

    kind: str
    root: str
    sources: tuple[Source, ...]
    id_column: str | None
    image_column: str
    label_column: str | None
    id_type: pa.DataType
    label_type: pa.DataType | None
    image_kind: str = "binary"
    class_names: tuple[str, ...] | None = None
    # WebDataset: (rows whose key an earlier tar already has, ((key, times), ...)), counted
    # while the tars are read for the plan; (0, ()) for other kinds (xai_audit.ids checks those)
    repeated_ids: tuple = (0, ())
    # input class index -> model class index (xai_audit.sources.labels), None: labels are
    # already model indices; set by the job once the model's class names are known
    label_map: tuple[int, ...] | None = None

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
            "image_kind": self.image_kind,
            "label_column": self.label_column,
            "class_names": len(self.class_names) if self.class_names else None,
            # input class index -> model class index, when labels are matched by name
            "label_map": list(self.label_map) if self.label_map is not None else None,
            "fingerprint": self.fingerprint(),
            # rows per file: what --incremental compares a later input with
            "sources": {s.rel: s.rows for s in self.sources},
            # size and version of each file: a file rewritten with as many rows is "changed"
            "stamps": {s.rel: s.stamp for s in self.sources},
        }


def join(root_uri: str, root_path: str, path: str) -> tuple[str, str]:
    """(full uri, relative path) of ``path`` (fs path) under the input root."""
    rel = posixpath.relpath(path, root_path) if path != root_path else posixpath.basename(path)
    if "://" in root_uri:
        proto = root_uri.split("://", 1)[0]
        return f"{proto}://{path}", rel
    return path, rel


def ranges(rows: np.ndarray) -> list[list[int]]:
    """Sorted row indices -> [[start, stop), ...] runs (compact in JSON)."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate([[rows[0]], rows[breaks + 1]])
    stops = np.concatenate([rows[breaks] + 1, [rows[-1] + 1]])
    return [[int(a), int(b)] for a, b in zip(starts, stops, strict=True)]


def in_ranges(rngs: list[list[int]]):
    """A predicate: is row r inside one of ``rngs``?"""
    if not rngs:
        return lambda r: False
    starts = np.array([a for a, _ in rngs])
    stops = np.array([b for _, b in rngs])

    def contains(r: int) -> bool:
        k = int(np.searchsorted(starts, r, side="right")) - 1
        return k >= 0 and r < stops[k]

    return contains


class Block:
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

    @property
    def full(self) -> bool:
        return len(self.ids) >= self.max_rows

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


def decode(data, preprocessing) -> tuple[np.ndarray | None, str | None]:
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


def read_uri(uri: str) -> tuple[bytes | None, str | None]:
    """The bytes at ``uri`` or (None, a message naming it): a missing object is a row error."""
    from xai_workers.storage import read_bytes

    try:
        return read_bytes(uri), None
    except Exception as e:  # noqa: BLE001 - a missing/unreadable file is a row error
        return None, f"cannot read {uri}: {type(e).__name__}: {e}"[:500]


def resolve(ref: str, base_uri: str) -> str:
    """A path or URI from the data -> a URI: absolute paths and ``scheme://`` stay as they are;
    a relative path is relative to ``base_uri`` (the folder of the file that names it)."""
    if "://" in ref or ref.startswith("/"):
        return ref
    return posixpath.join(base_uri.rstrip("/"), ref)


def max_rows_for(preprocessing, block_rows: int | None, block_bytes: int = BLOCK_BYTES) -> int:
    s = preprocessing.image_size
    max_rows = max(1, min(4096, block_bytes // (3 * s * s * 4)))
    if block_rows:
        max_rows = max(1, min(max_rows, int(block_rows)))
    return max_rows
