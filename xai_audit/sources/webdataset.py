"""WebDataset tar shards (``*.tar``, as ``webdataset.ShardWriter`` or ``tarp`` write them).

A sample is a run of consecutive tar members sharing a key, WebDataset's rule: the key is the
member's path up to the first dot of its file name, the rest is the (lower-cased) extension
(``train/00042.seg.png`` -> key ``train/00042``, extension ``seg.png``). The id is the key and the
row key ``(tar file relative to the input, sample index in it)``.

A sample's image is its first ``jpg`` / ``jpeg`` / ``png`` / ``webp`` / ``ppm`` member; its label
the integer text of a ``cls`` member, else the ``label`` field of a ``json`` member, else null. A
sample without an image member, a member that does not decode, a ``cls`` that is not an integer:
error rows naming the sample. Tars are read as streams (``tarfile`` mode ``r|*``), never
extracted to disk; only image, ``cls`` and ``json`` members are read at all, so a member that
needs unpickling (``.pt``, ``.pth``, ``.pkl``, ``.pyd``, ...) is skipped, never decoded.

Discovery streams every tar once to count its samples (headers only, the data is skipped), so
``rows in = rows out`` can be checked.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from xai_audit.errors import ConfigError
from xai_audit.ids import repeated_ids
from xai_audit.sources.base import (
    Block,
    InputPlan,
    Source,
    decode,
    in_ranges,
    join,
    max_rows_for,
    ranges,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm")
LABEL_EXTS = ("cls", "json")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext


def split_key(name: str) -> tuple[str | None, str | None]:
    """Tar member name -> (sample key, lower-cased extension), (None, None) without a dot."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def iter_samples(f, read: bool = True) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: bytes}) per sample of the tar stream ``f``. Only image / cls / json
    members are read (others map to None); with ``read`` False none is (counting)."""
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        key, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_key(member.name)
            if k is None:
                continue
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            wanted = read and (ext in IMAGE_EXTS or ext in LABEL_EXTS)
            parts[ext] = tar.extractfile(member).read() if wanted else None
        if key is not None:
            yield key, parts


def discover(uri, root, paths, *, label_column, need_label, threads) -> InputPlan:
    from xai_workers.storage import open_file

    if label_column:
        raise ConfigError(f"--label-column {label_column!r}: WebDataset tars have no columns")

    def count(path: str) -> tuple[int, bool, pa.Array]:
        u, _ = join(uri, root, path)
        try:
            with open_file(u, "rb") as f:
                keys, labelled = [], False
                for key, parts in iter_samples(f, read=False):
                    keys.append(key)
                    labelled = labelled or any(e in parts for e in LABEL_EXTS)
                return len(keys), labelled, pa.array(keys, pa.string())
        except (OSError, tarfile.TarError) as e:
            raise ConfigError(f"cannot read tar file {u}: {type(e).__name__}: {e}") from None

    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as ex:
        counts = list(ex.map(count, paths))
    labelled = any(lab for _, lab, _ in counts)
    if need_label and not labelled:
        raise ConfigError("--target label needs labels; no sample has a cls or json member")
    sources = tuple(
        Source(*join(uri, root, p), rows=n) for p, (n, _, _) in zip(paths, counts, strict=True)
    )
    # keys are unique within a tar by the format, but two tars may share one (shards written
    # by separate processes, each counting from 000000): counted while the tars are read anyway
    repeated = repeated_ids(pa.chunked_array([k for _, _, k in counts], pa.string()))
    return InputPlan(
        "webdataset", uri, sources, None, "image", "label" if labelled else None, pa.string(),
        pa.int64() if labelled else None, repeated_ids=repeated,
    )  # fmt: skip


def make_shards(plan: InputPlan, done: Mapping[str, np.ndarray], shard_rows: int = 0):
    """One shard per tar (a tar is read as one stream), rows already done as ``skip``."""
    shards, todo = [], 0
    for i, s in enumerate(plan.sources):
        d = done.get(s.rel)
        skip = np.flatnonzero(d) if d is not None else np.zeros(0, np.int64)
        if len(skip) < s.rows:
            shards.append({"kind": "webdataset", "source": i, "uri": s.uri, "rel": s.rel,
                           "stop": s.rows, "skip": ranges(skip)})  # fmt: skip
            todo += s.rows - len(skip)
    return shards, todo


def _label(key: str, parts: dict) -> tuple[int | None, str | None]:
    if parts.get("cls") is not None:
        text = parts["cls"].decode("utf-8", "replace").strip()
        try:
            return int(text), None
        except ValueError:
            return None, f"sample {key}: cls member {text[:40]!r} is not an integer"
    if parts.get("json") is not None:
        try:
            meta = json.loads(parts["json"])
        except ValueError as e:
            return None, f"sample {key}: json member is not JSON ({e})"
        v = meta.get("label") if isinstance(meta, dict) else None
        if v is None or (isinstance(v, int) and not isinstance(v, bool)):
            return v, None
        return None, f"sample {key}: json label {v!r} is not an integer"
    return None, None


def sample_images(uri: str, rows: set[int]) -> dict[int, bytes]:
    """The image bytes of samples ``rows`` (indices) of one tar, streamed up to the last one."""
    from xai_workers.storage import open_file

    out: dict[int, bytes] = {}
    last = max(rows, default=-1)
    with open_file(uri, "rb") as f:
        for r, (_, parts) in enumerate(iter_samples(f)):
            if r > last:
                break
            image = next((parts[e] for e in IMAGE_EXTS if parts.get(e) is not None), None)
            if r in rows and image is not None:
                out[r] = image
    return out


def read_shard(
    shard: Mapping, *, preprocessing, label_column, id_type, label_type,
    block_rows=None, **_,
) -> Iterator[pa.Table]:  # fmt: skip
    """Blocks of preprocessed samples of one tar (``sources.read_shard``)."""
    from xai_workers.storage import open_file

    max_rows = max_rows_for(preprocessing, block_rows)
    block = Block(preprocessing.image_size, id_type, label_type if label_column else None, max_rows)
    skip = in_ranges(shard["skip"])
    row = 0
    with open_file(shard["uri"], "rb") as f:
        for key, parts in iter_samples(f):
            r, row = row, row + 1
            if skip(r):
                continue
            label, err = _label(key, parts)
            image = next((parts[e] for e in IMAGE_EXTS if parts.get(e) is not None), None)
            x = None
            if err is None and image is None:
                err = (
                    f"sample {key} has no image member ({'/'.join(IMAGE_EXTS)}); it has "
                    f"{', '.join(sorted(parts)) or 'nothing'}"
                )
            if err is None:
                x, err = decode(image, preprocessing)
                if err is not None:
                    err = f"sample {key}: {err}"
            block.add(key, label, x, err, shard["rel"], r)
            if block.full:
                yield block.table()
    if row != shard["stop"]:
        raise RuntimeError(f"{shard['uri']}: {row} samples, expected {shard['stop']} (changed?)")
    if len(block):
        yield block.table()
