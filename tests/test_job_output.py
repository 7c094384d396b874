"""The job's bookkeeping without Ray: shards, atomic keyed parts, the exactly-once scan."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xai_audit import output as out
from xai_audit import sources
from xai_workers import schema as S
from xai_workers.demo import write_demo_dataset
from xai_workers.preprocess import Preprocessing

LAYOUT = S.OutputLayout(methods=("saliency",), image_shape=(3, 4, 4))
SCHEMA = S.output_schema(LAYOUT)


def _rows(source: str, rows) -> pa.Table:
    rows = list(rows)
    return S.build_table(
        SCHEMA,
        ids=[f"{source}:{r}" for r in rows],
        sources=[source] * len(rows),
        source_rows=rows,
        errors=[None if r % 5 else "bad" for r in rows],
        values={
            "saliency": np.full((len(rows), 4, 4), 1.0, np.float32),
            "target": np.zeros(len(rows), np.int64),
        },  # fmt: skip
    )


def test_parts_are_atomic_keyed_and_idempotent(tmp_path):
    dest = str(tmp_path / "attributions")
    t = _rows("a.parquet", range(10))
    info = out.write_part(t, dest)
    assert info["rows"] == 10 and info["error"] == 2 and info["ok"] == 8 and info["bytes"] > 0
    again = out.write_part(t.take([3, 1, 2, 0, 4, 5, 6, 7, 8, 9]), dest)  # same rows, any order
    assert again["file"] == info["file"]  # a retried write lands on the same name
    files = sorted(p.name for p in (tmp_path / "attributions").iterdir())
    assert files == [info["file"]]  # no temporary file left behind
    back = pq.read_table(tmp_path / "attributions" / info["file"])
    assert back["source_row"].to_pylist() == list(range(10))  # sorted by key
    assert S.map_shape_of(back.schema.field("saliency").type) == (4, 4)


def test_sink_writes_at_most_rows_per_file(tmp_path):
    """Ray Data hands a write task whole blocks (>= rows_per_file rows, maybe many more): the
    sink cuts them into parts of --rows-per-file rows, so the flag is a maximum that holds."""
    from xai_audit.attribute import PartsDatasink

    dest = str(tmp_path / "attributions")
    sink = PartsDatasink(dest=dest, output=str(tmp_path), rows_per_file=5,
                         summary=False)  # fmt: skip
    assert sink.min_rows_per_write == 5
    infos = sink.write([_rows("a.parquet", range(13)), _rows("b.parquet", range(9))], ctx=None)
    assert [i["rows"] for i in infos] == [4, 4, 5, 4, 5]  # 22 rows: 5 parts, sizes within 1
    sizes = sorted(pq.read_metadata(f).num_rows for f in (tmp_path / "attributions").iterdir())
    assert sizes == [4, 4, 4, 5, 5]
    scanned = out.scan(dest, {"a.parquet": 13, "b.parquet": 9})
    src = {"a.parquet": 13, "b.parquet": 9}
    assert scanned.rows == 22 and not scanned.duplicates and scanned.missing(src) == 0


def test_scan_finds_every_row_once_and_removes_duplicates(tmp_path):
    dest = str(tmp_path / "attributions")
    sizes = {"a.parquet": 10, "b.parquet": 4}
    out.write_part(_rows("a.parquet", range(0, 6)), dest)
    out.write_part(_rows("a.parquet", range(4, 10)), dest)  # rows 4, 5 twice
    out.write_part(_rows("b.parquet", range(3)), dest)  # b row 3 missing
    out.write_part(_rows("zzz.parquet", [0]), dest)  # not an input file
    scan = out.scan(dest, sizes)
    assert scan.files == 4 and scan.rows == 16 and scan.duplicates == 2 and scan.unknown == 1
    assert scan.unknown_error == 1 and scan.error == 5  # zzz row 0 is an error row ("bad")
    assert scan.missing(sizes) == 1
    assert scan.done["a.parquet"].all() and scan.done["b.parquet"].tolist() == [1, 1, 1, 0]
    assert out.remove_duplicates(dest, sizes) == 2
    scan = out.scan(dest, sizes)
    assert scan.duplicates == 0 and scan.rows == 14 and scan.done["a.parquet"].all()


def test_rows_per_file_gives_sensible_files():
    big = S.output_schema(S.OutputLayout(methods=("saliency", "integrated_gradients", "gradcam"),
                                         image_shape=(3, 224, 224)))  # fmt: skip
    per_row = out.row_bytes(big)
    assert 5 * 224 * 224 * 4 <= per_row < 5 * 224 * 224 * 4 + 4096
    n = out.rows_per_file(big, 1_000_000)
    assert 100 <= n <= 140 and n * per_row <= out.TARGET_FILE_BYTES  # ~128 MiB per file
    small = S.output_schema(S.OutputLayout(methods=("saliency",), image_shape=(3, 32, 32)))
    assert out.rows_per_file(small, 1797) == 113  # 16 files for the demo, not one
    assert out.rows_per_file(small, 10) == 64  # tiny inputs: one file
    assert out.rows_per_file(small, 10**8) == out.TARGET_FILE_BYTES // out.row_bytes(small)


def test_shards_skip_rows_already_done_and_read_back(tmp_path):
    path = tmp_path / "d.parquet"
    write_demo_dataset(str(path), n=30)
    pq.write_table(pq.read_table(path), path, row_group_size=7)  # 7, 7, 7, 7, 2
    plan = sources.discover(str(path))
    assert plan.kind == "parquet" and plan.total_rows == 30 and plan.label_column == "label"
    shards, todo = sources.make_shards(plan, shard_rows=10)
    assert todo == 30 and [(s["start"], s["stop"]) for s in shards] == [(0, 14), (14, 28), (28, 30)]
    done = {"d.parquet": np.zeros(30, bool)}
    done["d.parquet"][[0, 1, 2, 5, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]] = True
    shards, todo = sources.make_shards(plan, done, shard_rows=10)
    assert todo == 30 - 18 and len(shards) == 2  # the middle shard is complete: left out
    assert shards[0]["skip"] == [[0, 3], [5, 6]]
    pre = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    blocks = [b for sh in shards for b in sources.read_shard(
        sh, preprocessing=pre, id_column="id", image_column="image", label_column="label",
        id_type=plan.id_type, label_type=plan.label_type, block_rows=4)]  # fmt: skip
    rows = [r for b in blocks for r in b["source_row"].to_pylist()]
    assert rows == [3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 28, 29]  # each row not done, once
    assert max(b.num_rows for b in blocks) <= 4
    assert blocks[0].schema.field("x").type == S.tensor_type((3, 32, 32))
    assert plan.fingerprint() == sources.discover(str(path)).fingerprint()


def test_discover_rejects_mixed_or_unusable_inputs(tmp_path):
    from xai_audit.config import ConfigError

    (tmp_path / "mix").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "mix" / "a.parquet")
    (tmp_path / "mix" / "b.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"Parquet files \(1\) and image files \(1\)"):
        sources.discover(str(tmp_path / "mix"))
    assert sources.discover(str(tmp_path / "mix"), input_format="images").kind == "images"
    pq.write_table(pa.table({"id": ["a"], "image": [1]}), tmp_path / "s.parquet")
    with pytest.raises(ConfigError, match="expected encoded bytes"):
        sources.discover(str(tmp_path / "s.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="cannot read Parquet file"):
        sources.discover(str(tmp_path / "junk.parquet"))


def test_unreadable_parts_are_reported_and_set_aside(tmp_path):
    dest = tmp_path / "attributions"
    out.write_part(_rows("a.parquet", range(4)), str(dest))
    (dest / "part-0000damaged.parquet").write_bytes(b"PAR1 not really")
    scan = out.scan(str(dest), {"a.parquet": 4})
    assert scan.files == 1 and len(scan.unreadable) == 1 and scan.rows == 4
    out.set_aside(scan.unreadable, str(dest))
    assert (dest / ".corrupt-part-0000damaged.parquet").exists()
    again = out.scan(str(dest), {"a.parquet": 4})
    assert not again.unreadable and again.missing({"a.parquet": 4}) == 0
