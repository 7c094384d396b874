"""The output schema: map columns with their shape, null error rows, readable without Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xai_workers import schema as S

STATS = ("saliency_gini", "gradcam_border_frac", "agree_saliency_gradcam")


def _layout(**kw):
    base = dict(
        methods=("saliency", "integrated_gradients", "gradcam"),
        image_shape=(3, 6, 5),
        stat_names=STATS,
        label_type=pa.int64(),
    )
    base.update(kw)
    return S.OutputLayout(**base)


def _values(n, layout, rng):
    c, h, w = layout.image_shape
    k = (layout.topk,) if layout.topk else ()
    v = {
        "target": rng.integers(0, 10, (n, *k)),
        "pred_class": rng.integers(0, 10, n),
        "pred_prob": rng.random(n, dtype=np.float32),
        "topk_classes": rng.integers(0, 10, (n, 5)),
        "topk_probs": rng.random((n, 5), dtype=np.float32),
        "score": rng.random((n, *k), dtype=np.float32),
        "baseline_score": rng.random((n, *k), dtype=np.float32),
        "ig_delta": rng.random((n, *k), dtype=np.float32),
        "saliency": rng.random((n, *k, h, w), dtype=np.float32),
        "integrated_gradients": rng.standard_normal((n, *k, c, h, w)).astype(np.float32),
        "gradcam": rng.random((n, *k, h, w), dtype=np.float32),
    }
    for s in layout.stat_names:
        v[s] = rng.random((n, *k), dtype=np.float32)
    return v


def test_schema_columns_and_types():
    layout = _layout()
    s = S.output_schema(layout)
    assert s.names[:5] == ["id", "label", "correct", "status", "error"]
    assert s.field("correct").type == pa.bool_()
    assert "correct" not in S.output_schema(_layout(label_type=pa.string())).names
    assert "correct" not in S.output_schema(_layout(label_type=None)).names
    assert s.names[-2:] == ["source", "source_row"]
    for name in STATS:
        assert s.field(name).type == pa.float32()
    # maps: plain fixed_size_list<float32>, the shape in metadata (no extension type)
    assert s.field("saliency").type == pa.list_(pa.float32(), 30)
    assert S.map_shape_of(s.field("saliency").type) == (6, 5)
    assert S.map_shape_of(s.field("integrated_gradients").type) == (3, 6, 5)
    assert s.field("integrated_gradients").metadata[b"xai_workers.shape"] == b"[3, 6, 5]"
    assert json.loads(s.metadata[b"xai_workers.shapes"])["gradcam"] == [6, 5]
    assert not isinstance(s.field("gradcam").type, pa.ExtensionType)
    assert s.field("topk_classes").type == pa.list_(pa.int64(), 5)
    assert s.field("target").type == pa.int64()
    assert not s.field("status").nullable and not s.field("source_row").nullable
    assert "cam" not in s.names
    # without IG: no IG scalars, no IG map
    s2 = S.output_schema(_layout(methods=("saliency",), stat_names=()))
    assert "integrated_gradients" not in s2.names and "ig_delta" not in s2.names
    assert "label" not in S.output_schema(_layout(label_type=None)).names


def test_topk_layout_adds_k_axis():
    s = S.output_schema(_layout(topk=3))
    assert s.field("target").type == pa.list_(pa.int64(), 3)
    assert S.map_shape_of(s.field("saliency").type) == (3, 6, 5)
    assert S.map_shape_of(s.field("integrated_gradients").type) == (3, 3, 6, 5)
    assert s.field("saliency_gini").type == pa.list_(pa.float32(), 3)
    assert s.field("pred_class").type == pa.int64()  # prediction has no K axis


@pytest.mark.parametrize("topk", [None, 2])
def test_build_table_roundtrip_and_null_error_rows(tmp_path, topk):
    rng = np.random.default_rng(0)
    layout = _layout(topk=topk)
    schema = S.output_schema(layout)
    n = 5
    vals = _values(n, layout, rng)
    errors = [None, "cannot decode image: truncated", None, None, "label is null"]
    t = S.build_table(
        schema,
        ids=[f"r{i}" for i in range(n)],
        labels=[1, 2, None, 4, None],
        sources=["a.parquet"] * n,
        source_rows=range(n),
        errors=errors,
        values=vals,
    )
    assert t.schema.equals(schema, check_metadata=False)
    assert t.column("status").to_pylist() == ["ok", "error", "ok", "ok", "error"]
    path = tmp_path / "t.parquet"
    pq.write_table(t, path)
    back = pq.read_table(path)
    assert back.schema.field("saliency").type == schema.field("saliency").type
    for name in ("saliency", "integrated_gradients", "gradcam"):
        arr = S.tensor_to_numpy(back[name])
        assert arr.shape == (n, *layout.map_shape(name))
        ok = np.array([e is None for e in errors])
        np.testing.assert_array_equal(arr[ok], vals[name][ok])
        assert np.isnan(arr[~ok]).all()
        assert back[name].null_count == 2
    for name in ("target", "score", "pred_class", "topk_probs", *STATS):
        col = back[name].to_pylist()
        assert col[1] is None and col[4] is None and col[0] is not None
    np.testing.assert_allclose(
        np.asarray(back["score"].to_pylist()[0]), vals["score"][0], rtol=0, atol=0
    )
    assert back["error"].to_pylist()[0] is None
    assert back["label"].to_pylist() == [1, 2, None, 4, None]  # passed through as given
    # the shape comes back with the column's type (its element field's metadata)
    assert S.map_shape_of(back["saliency"].combine_chunks().slice(1, 2).type) == (
        layout.map_shape("saliency")
    )


def test_all_error_table_and_conform():
    schema = S.output_schema(_layout())
    t = S.error_table(
        schema,
        ids=["x"],
        labels=[None],
        sources=["f"],
        source_rows=[0],
        errors=["image is null"],
    )
    assert t.num_rows == 1 and t.column("saliency").null_count == 1
    assert S.conform(t, schema).schema.equals(schema)
    with pytest.raises(ValueError, match="missing"):
        S.conform(t.drop_columns(["gradcam"]), schema)


def test_tensor_array_rejects_wrong_sizes():
    with pytest.raises(ValueError):
        S.tensor_array(np.zeros((2, 3), np.float32), shape=(2, 2))
    a = S.tensor_array(np.ones((2, 2, 2)), valid=np.array([True, False]))
    assert a.null_count == 1 and a.type.shape == [2, 2]


READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pyarrow.parquet as pq, pandas as pd, duckdb
    path = sys.argv[1]
    t = pq.read_table(path)
    from xai_workers.schema import tensor_to_numpy
    typ = t.schema.field("saliency").type
    ig = tensor_to_numpy(t.column("integrated_gradients"))
    out = {
        "type": str(typ),
        "shape": list(tensor_to_numpy(t.column("saliency")).shape[1:]),
        "ig_shape": list(ig[~np.isnan(ig).reshape(len(ig), -1).any(axis=1)].shape),
        "pandas_rows": len(pd.read_parquet(path)),
        "pandas_len": len(pd.read_parquet(path)["saliency"].dropna().iloc[0]),
    }
    con = duckdb.connect()
    out["duck"] = con.execute(
        f"SELECT count(*), count(saliency), max(len(saliency)), "
        f"any_value(typeof(saliency)) FROM read_parquet('{path}')"
    ).fetchone()
    out["duck_first"] = con.execute(
        f"SELECT saliency[1] FROM read_parquet('{path}') WHERE status = 'ok' ORDER BY id LIMIT 1"
    ).fetchone()[0]
    out["ray_imported"] = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    print(json.dumps(out, default=str))
    """
)


def read_without_ray(path) -> dict:
    """Read an output with pyarrow, pandas and DuckDB in a fresh process that never imports Ray."""
    r = subprocess.run(
        [sys.executable, "-c", READER, str(path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_readable_by_pyarrow_pandas_duckdb_without_ray(tmp_path):
    rng = np.random.default_rng(1)
    layout = _layout()
    schema = S.output_schema(layout)
    vals = _values(4, layout, rng)
    t = S.build_table(
        schema,
        ids=["a", "b", "c", "d"],
        labels=[0, 1, 2, 3],
        sources=["s"] * 4,
        source_rows=range(4),
        errors=[None, None, "bad", None],
        values=vals,
    )
    pq.write_table(t, tmp_path / "part-0.parquet")
    got = read_without_ray(tmp_path / "part-0.parquet")
    assert got["type"] == "fixed_size_list<element: float>[30]"
    assert got["shape"] == [6, 5] and got["ig_shape"] == [3, 3, 6, 5]
    assert got["pandas_rows"] == 4 and got["pandas_len"] == 30
    assert got["duck"][:3] == [4, 3, 30]
    assert got["duck"][3].startswith("FLOAT[")  # a float array (list) per row
    assert got["duck_first"] == pytest.approx(float(vals["saliency"][0, 0, 0]))
    assert got["ray_imported"] is False


def test_correct_column_compares_prediction_and_label():
    layout = _layout()
    schema = S.output_schema(layout)
    values = _values(4, layout, np.random.default_rng(0))
    values["pred_class"] = np.array([3, 1, 2, 7])
    t = S.build_table(
        schema,
        ids=["a", "b", "c", "d"],
        sources=["f"] * 4,
        source_rows=[0, 1, 2, 3],
        errors=[None, None, "bad image", None],
        values=values,
        labels=pa.array([3, 2, 2, None], type=pa.int64()),
    )
    # right, wrong, error row (null), null label (null)
    assert t.column("correct").to_pylist() == [True, False, None, None]


def test_field_descriptions_say_what_each_profile_stores():
    full = S.output_schema(_layout(store="full"))
    compact = S.output_schema(_layout(store="compact", map_size=4))
    stats = S.output_schema(_layout(store="stats"))

    def desc(s, name):
        return s.field(name).metadata[b"description"].decode()

    assert "per channel (C, H, W)" in desc(full, "integrated_gradients")
    assert "shape (3, 6, 5)" in desc(full, "integrated_gradients")
    assert "shape (6, 5), float32" in desc(full, "saliency")
    ig = desc(compact, "integrated_gradients")
    # the compact IG map is the (M, M) signed channel sum, not (C, H, W)
    assert "summed over channels, signed" in ig and "shape (4, 4)" in ig
    assert "(C, H, W)" not in ig and "bfloat16" in ig and "M = 4" in ig
    assert "shape (4, 4)" in desc(compact, "gradcam") and "area mean" in desc(compact, "gradcam")
    assert "fixed_size_list<float32>[16]" in desc(compact, "saliency")
    assert S.map_shape_of(compact.field("saliency").type) == (4, 4)
    assert compact.field("saliency").metadata[b"xai_workers.shape"] == b"[4, 4]"
    assert not any(m in stats.names for m in ("saliency", "integrated_gradients", "gradcam"))
    assert json.loads(stats.metadata[b"xai_workers.shapes"]) == {}
    topk = S.output_schema(_layout(store="compact", map_size=4, topk=2))
    assert "one map per target (K first)" in desc(topk, "gradcam")
    assert "shape (2, 4, 4)" in desc(topk, "gradcam")
    # every field says what it is
    for s in (full, compact, stats, topk):
        assert all(f.metadata and b"description" in f.metadata for f in s), s.names
