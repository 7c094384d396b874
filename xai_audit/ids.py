"""Duplicate ids in the input: counted before any heavy work (ids are what downstream joins use).

A Parquet input with an id column is checked here: the id column alone is read (in parallel, one
file per task), so the check costs a small share of reading the images (about 20 bytes per row in
memory for short string ids). WebDataset sample keys are unique within a tar by the format, but two
tars may share one: they are counted while the plan reads the tars anyway
(``InputPlan.repeated_ids``). An image folder's ids are its paths and a Parquet without an id
column gets ``<file>#<row>``, unique by construction.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc


def duplicate_ids(
    plan, examples: int = 5, threads: int = 8
) -> tuple[int, list[tuple[object, int]]]:
    """``(rows whose id an earlier row already has, [(id, times it appears)] for up to
    ``examples`` repeated ids, most repeated first)``. ``plan``: a ``xai_audit.sources.InputPlan``.
    (0, []) for inputs whose ids cannot repeat."""
    if plan.kind == "webdataset":
        n, top = plan.repeated_ids
        return n, list(top)[:examples]
    if plan.kind != "parquet" or plan.id_column is None or not plan.sources:
        return 0, []  # ids made from file and row (or path) cannot repeat
    import pyarrow.parquet as pq

    from xai_workers.storage import pyarrow_filesystem

    pafs, _ = pyarrow_filesystem(plan.sources[0].uri)

    def ids(source) -> pa.ChunkedArray:
        _, path = pyarrow_filesystem(source.uri)
        with pafs.open_input_file(path) as f:
            return pq.read_table(f, columns=[plan.id_column]).column(0)

    with ThreadPoolExecutor(max(1, min(threads, len(plan.sources)))) as ex:
        chunks = [c for col in ex.map(ids, plan.sources) for c in col.chunks]
    if not chunks:
        return 0, []
    n, top = repeated_ids(pa.chunked_array(chunks, type=chunks[0].type), examples)
    return n, list(top)


def repeated_ids(
    ids: pa.ChunkedArray, examples: int = 5
) -> tuple[int, tuple[tuple[object, int], ...]]:
    """``(rows whose id an earlier row already has, ((id, times), ...))`` of ``ids``, the
    ``examples`` most repeated first (ties by id)."""
    if not len(ids):
        return 0, ()
    counts = pc.value_counts(ids)
    n = counts.field("counts").to_numpy()
    repeated = n > 1
    if not repeated.any():
        return 0, ()
    values = counts.field("values").to_pylist()
    top = sorted(
        ((values[i], int(n[i])) for i in repeated.nonzero()[0]), key=lambda kv: (-kv[1], str(kv[0]))
    )
    return int((n[repeated] - 1).sum()), tuple(top[:examples])
