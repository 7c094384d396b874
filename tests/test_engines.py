"""Real engines on a real output: DuckDB, Polars and Spark (pyspark, local) read every column of
every storage profile (attributions and summary) without casts or options, each value equal to
pyarrow's; their list functions work on the maps; and docs/analytics.md's recipes, read from the
doc itself, give what the rows and the summary say.

One small output per profile (24 rows of 32 px through an untrained demo net, explaining the
rows' labels (3 classes), one error row, class names known) written by the job's own writer
(part + partial summary), and a second compact run of another net for the comparison recipe.
One local SparkSession for the module (Spark needs a Java runtime: ``scripts/install-java.sh``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from xai_audit.attribute import write_attributions
from xai_workers import demo
from xai_workers import schema as S
from xai_workers import summary as SM
from xai_workers.worker import AttributionWorker

N = 24
DOC = Path(__file__).resolve().parents[1] / "docs" / "analytics.md"
NAMES = [f"digit {i}" for i in range(10)]
MAPS = ("saliency", "integrated_gradients", "gradcam")


def _run(root: Path, store: str, seed: int) -> Path:
    """N rows through an untrained demo net initialised with ``seed``, written as the job does."""
    import torch

    torch.manual_seed(seed)
    w = AttributionWorker(demo.build_demo_model(), image_size=32, mean=demo.DEMO_MEAN,
                          std=demo.DEMO_STD, ig_steps=2, num_threads=1, pooled_columns=True,
                          label_type=pa.int64(), store=store, class_names=NAMES,
                          target="label")  # fmt: skip
    rng = np.random.default_rng(0)
    x = (rng.random((N, 3, 32, 32)) * 2 - 1).astype(np.float32)
    errors = [None] * N
    errors[5] = "cannot decode image: test"
    batch = pa.table({
        "id": [f"img-{i:03d}" for i in range(N)], "label": pa.array(np.arange(N) % 3, pa.int64()),
        "x": S.tensor_array(x), "error": pa.array(errors, pa.string()), "source": ["s"] * N,
        "source_row": np.arange(N),
    })  # fmt: skip
    write_attributions(w(batch), dest=str(root / "attributions"), output=str(root))
    SM.summarize_output(str(root))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("engines")
    out = {s: _run(base / s, s, seed=0) for s in ("compact", "full", "stats")}
    out["before"] = _run(base / "before", "compact", seed=1)
    return out


@pytest.fixture(scope="module")
def spark():
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        pytest.fail("Spark needs a Java runtime: run scripts/install-java.sh (README command 2)")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("xai-workers-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _norm(v):
    """A value as plain Python for exact comparison: lists for arrays and tuples, dicts for
    structs (Spark Rows), NaN as the string 'nan' (NaN != NaN)."""
    if v is None:
        return None
    if hasattr(v, "asDict"):  # pyspark Row
        return {k: _norm(x) for k, x in v.asDict(recursive=True).items()}
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_norm(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def _tables(root: Path) -> dict[str, tuple[str, pa.Table, list[str]]]:
    """{name: (path for the engines, pyarrow's table sorted by the key, key columns)}."""
    att = pq.read_table(root / "attributions").sort_by("id")
    summ = root / "summary" / "summary.parquet"
    key = ["group_by", "class"]
    summary = pq.read_table(summ)
    g, c = summary["group_by"].to_pylist(), summary["class"].to_pylist()
    order = sorted(range(len(g)), key=lambda i: (g[i], c[i] is not None, c[i] or 0))  # nulls 1st
    summary = summary.take(order)
    return {
        "attributions": (str(root / "attributions"), att, ["id"]),
        "summary": (str(summ), summary, key),
    }


def _assert_same(engine: str, name: str, col: str, got: list, want: pa.ChunkedArray):
    want_py = _norm(want.to_pylist())
    got_py = _norm(got)
    assert len(got_py) == len(want_py), (engine, name, col)
    bad = [i for i, (g, w) in enumerate(zip(got_py, want_py, strict=True)) if g != w]
    assert not bad, f"{engine} {name}.{col}: rows {bad[:5]} differ, e.g. {got_py[bad[0]]!r:.200}"


# --------------------------------------------------------------------------------------------
# every column of every profile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["compact", "full", "stats"])
def test_duckdb_reads_every_column_as_pyarrow_does(runs, store):
    con = duckdb.connect()
    for name, (path, want, key) in _tables(runs[store]).items():
        src = f"read_parquet('{path}/*.parquet')" if name == "attributions" else f"'{path}'"
        order = ", ".join(f'"{k}" NULLS FIRST' for k in key)
        res = con.execute(f"SELECT * FROM {src} ORDER BY {order}")
        cols = [d[0] for d in res.description]
        rows = res.fetchall()
        assert cols == want.column_names, (name, cols)
        for j, c in enumerate(cols):
            _assert_same("duckdb", name, c, [r[j] for r in rows], want[c])
    if store != "stats":  # list functions on the maps
        path, t, _ = _tables(runs[store])["attributions"]
        for m in MAPS:
            typ, got = zip(*con.execute(
                f"SELECT typeof({m}), list_avg({m}) FROM read_parquet('{path}/*.parquet') "
                "ORDER BY id").fetchall(), strict=True)  # fmt: skip
            assert set(typ) == {"FLOAT[]"}
            want = S.tensor_to_numpy(t[m]).reshape(t.num_rows, -1).astype(np.float64).mean(1)
            # float64 sums of the same float32 values: only the summation order differs
            np.testing.assert_allclose(np.array(got, dtype=np.float64), want, rtol=1e-12)


@pytest.mark.parametrize("store", ["compact", "full", "stats"])
def test_polars_reads_every_column_as_pyarrow_does(runs, store):
    import polars as pl

    for name, (path, want, key) in _tables(runs[store]).items():
        src = f"{path}/*.parquet" if name == "attributions" else path
        df = pl.read_parquet(src).sort(key, nulls_last=False)
        assert df.columns == want.column_names
        for c in df.columns:
            _assert_same("polars", name, c, df[c].to_list(), want[c])
    if store != "stats":  # .arr operations on the maps
        path, t, _ = _tables(runs[store])["attributions"]
        df = pl.read_parquet(f"{path}/*.parquet").sort("id")
        for m in MAPS:
            size = int(np.prod(S.map_shape_of(t.schema.field(m).type)))
            assert df.schema[m] == pl.Array(pl.Float32, size)
            got = df.select(pl.col(m).arr.sum()).to_series().to_numpy().astype(np.float64)
            want = S.tensor_to_numpy(t[m]).reshape(t.num_rows, -1).astype(np.float64).sum(1)
            ok = ~np.isnan(want)
            # Polars sums float32 in float32 (n <= 3072 values): 1e-4 of the absolute sum
            scale = np.abs(S.tensor_to_numpy(t[m]).reshape(t.num_rows, -1)).sum(1)[ok]
            assert (np.abs(got[ok] - want[ok]) <= 1e-4 * scale + 1e-30).all(), m
            assert df[m].null_count() == int((~ok).sum()) == 1


@pytest.mark.parametrize("store", ["compact", "full", "stats"])
def test_spark_reads_every_column_as_pyarrow_does(runs, spark, store):
    for name, (path, want, key) in _tables(runs[store]).items():
        df = spark.read.parquet(path)
        rows = df.orderBy(*[df[k].asc_nulls_first() for k in key]).collect()
        assert df.columns == want.column_names
        for c in df.columns:
            _assert_same("spark", name, c, [r[c] for r in rows], want[c])
        if name == "attributions" and store != "stats":
            types = dict(df.dtypes)
            assert {types[m] for m in MAPS} == {"array<float>"}


# --------------------------------------------------------------------------------------------
# docs/analytics.md: every recipe runs and gives what the rows say
# --------------------------------------------------------------------------------------------


def recipes() -> dict[str, tuple[str, str]]:
    """``<!-- recipe: NAME -->`` followed by a fenced block: {NAME: (language, code)}."""
    found = re.findall(r"<!-- recipe: (\S+) -->\n```(\w+)\n(.*?)```", DOC.read_text(), re.S)
    return {name: (lang, code) for name, lang, code in found}


def _at(code: str, runs, tmp_path) -> str:
    """The recipe with its paths pointing at the test's runs (``out/``, ``out-before/``,
    ``metadata.csv``)."""
    code = re.sub(r"(['\"])out-before/", rf"\g<1>{runs['before']}/", code)
    code = re.sub(r"(['\"])out/", rf"\g<1>{runs['compact']}/", code)
    return code.replace("'metadata.csv'", f"'{tmp_path / 'metadata.csv'}'")


def _ok_rows(root: Path) -> pa.Table:
    t = pq.read_table(root / "attributions").sort_by("id")
    return t.filter(pc.equal(t["status"], "ok"))


def _summary_mean_maps(root: Path) -> dict[int, np.ndarray]:
    s = SM.read_summary(str(root))
    s = s.filter(pc.equal(s["group_by"], "target"))
    maps = S.tensor_to_numpy(s["gradcam_mean_map"]).astype(np.float64)
    return {c: maps[i].ravel() for i, c in enumerate(s["class"].to_pylist())}


def _assert_mean_maps(got: dict[int, list], runs) -> None:
    want = _summary_mean_maps(runs["compact"])
    assert sorted(got) == sorted(want) and len(want) >= 2
    ok = _ok_rows(runs["compact"])
    stored = S.tensor_to_numpy(ok["gradcam"]).reshape(ok.num_rows, -1).astype(np.float64)
    target = np.asarray(ok["target"].to_pylist())
    for c, m in got.items():
        m = np.asarray(m, dtype=np.float64)
        assert m.shape == (32 * 32,)
        # the stored (bfloat16) values averaged: float32/float64 accumulation only
        np.testing.assert_allclose(m, stored[target == c].mean(0), rtol=1e-5, atol=1e-9)
        # the summary's map, from the full maps: each stored value within 2^-8 (relative) of
        # its exact value, so the mean within 2^-8 of the mean of |values| (plus float32)
        scale = np.abs(stored[target == c]).mean(0)
        assert (np.abs(m - want[c]) <= 2.0**-8 * scale + 1e-6 * np.abs(want[c]).max()).all(), c


def test_doc_has_every_recipe():
    assert set(recipes()) == {
        "mean_map_duckdb", "top_border_duckdb", "join_metadata_duckdb", "compare_runs_duckdb",
        "mean_map_polars", "mean_map_spark",
    }  # fmt: skip


def test_recipe_mean_map_duckdb_equals_the_summary(runs, tmp_path):
    _, sql = recipes()["mean_map_duckdb"]
    rows = duckdb.sql(_at(sql, runs, tmp_path)).fetchall()
    _assert_mean_maps({c: m for c, m in rows}, runs)


def test_recipe_mean_map_polars_equals_the_summary(runs, tmp_path):
    _, code = recipes()["mean_map_polars"]
    ns: dict = {}
    exec(_at(code, runs, tmp_path), ns)
    _assert_mean_maps({r["target"]: r["mean_map"] for r in ns["mean_maps"].to_dicts()}, runs)


def test_recipe_mean_map_spark_sql_equals_the_summary(runs, spark, tmp_path):
    _, code = recipes()["mean_map_spark"]
    ns: dict = {}
    exec(_at(code, runs, tmp_path), ns)
    _assert_mean_maps({r["target"]: r["mean_map"] for r in ns["mean_maps"].collect()}, runs)


def test_recipe_top_border_rows_per_class(runs, tmp_path):
    _, sql = recipes()["top_border_duckdb"]
    rows = duckdb.sql(_at(sql, runs, tmp_path).replace("<= 20", "<= 3")).fetchall()
    ok = _ok_rows(runs["compact"]).to_pylist()
    want = []
    for c in sorted({r["target"] for r in ok}):
        mine = sorted((r for r in ok if r["target"] == c),
                      key=lambda r: (-r["gradcam_border_frac"], r["id"]))[:3]  # fmt: skip
        want += [(c, r["id"], r["gradcam_border_frac"], r["pred_prob"]) for r in mine]
    assert rows == want
    assert len(duckdb.sql(_at(sql, runs, tmp_path)).fetchall()) == len(ok)  # < 20 per class


def test_recipe_join_with_metadata(runs, tmp_path):
    ids = [f"img-{i:03d}" for i in range(0, N + 4, 2)]  # every other row, and 2 unknown ids
    sites = ["north" if i % 3 else "south" for i in range(len(ids))]
    (tmp_path / "metadata.csv").write_text(
        "id,site\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, sites, strict=True))
    )
    _, sql = recipes()["join_metadata_duckdb"]
    got = duckdb.sql(_at(sql, runs, tmp_path)).fetchall()
    site_of = dict(zip(ids, sites, strict=True))
    ok = [r for r in _ok_rows(runs["compact"]).to_pylist() if r["id"] in site_of]
    want = []
    for s in sorted(set(sites)):
        mine = [r for r in ok if site_of[r["id"]] == s]
        want.append((s, len(mine), np.mean([r["gradcam_border_frac"] for r in mine]),
                     np.mean([r["pred_class"] == r["label"] for r in mine])))  # fmt: skip
    assert [(s, n) for s, n, *_ in got] == [(s, n) for s, n, *_ in want]
    np.testing.assert_allclose([g[2:] for g in got], [w[2:] for w in want], rtol=1e-12)


def test_recipe_compare_two_runs(runs, tmp_path):
    _, sql = recipes()["compare_runs_duckdb"]
    got = duckdb.sql(_at(sql, runs, tmp_path)).fetchall()
    a = {r["id"]: r for r in _ok_rows(runs["before"]).to_pylist()}
    b = {r["id"]: r for r in _ok_rows(runs["compact"]).to_pylist()}
    want = []
    for i in sorted(a.keys() & b.keys()):
        db = b[i]["gradcam_border_frac"] - a[i]["gradcam_border_frac"]
        dg = b[i]["gradcam_gini"] - a[i]["gradcam_gini"]
        if a[i]["pred_class"] != b[i]["pred_class"] or abs(db) > 0.1 or abs(dg) > 0.1:
            want.append((i, a[i]["pred_class"], b[i]["pred_class"], db, dg))
    assert want  # two nets: rows changed
    assert [g[:3] for g in got] == [w[:3] for w in want]
    np.testing.assert_allclose([g[3:] for g in got], [w[3:] for w in want], rtol=1e-6, atol=1e-7)


def test_readme_reading_the_output_runs(runs, spark):
    """README's "Reading the output" (the Python block and the Spark SQL block) on a run."""
    readme = (DOC.parents[1] / "README.md").read_text()
    section = readme.split("## Reading the output", 1)[1].split("\n## ", 1)[0]
    (py,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (sql,) = re.findall(r"```sql\n(.*?)```", section, re.S)
    root = str(runs["compact"])
    ns: dict = {}
    exec(py.replace("demo-out/", f"{root}/"), ns)
    assert ns["gradcam"].shape == (N - 1, 32, 32)
    spark_rows = spark.sql(sql.replace("demo-out/", f"{root}/")).collect()
    duck = (
        ns["duckdb"]
        .sql(
            f"SELECT pred_class, count(*), avg(gradcam_border_frac), avg(list_max(gradcam)) "
            f"FROM '{root}/attributions/*.parquet' WHERE status = 'ok' GROUP BY pred_class "
            "ORDER BY 3 DESC"
        )
        .fetchall()
    )
    assert [tuple(r)[:2] for r in spark_rows] == [r[:2] for r in duck]
    # the same float32 values averaged in double by both: summation order only
    np.testing.assert_allclose([tuple(r)[2:] for r in spark_rows], [r[2:] for r in duck],
                               rtol=1e-12)  # fmt: skip


# --------------------------------------------------------------------------------------------
# outputs of schema version 1 (float16 / float32 fixed_shape_tensor maps) still read
# --------------------------------------------------------------------------------------------


def _as_schema_1(src: Path, dst: Path) -> Path:
    """A copy of output ``src`` with every map column (parts and summary partials) stored as
    schema version 1 did: ``fixed_shape_tensor``, float16 under compact, else float32."""
    shutil.copytree(src, dst)
    files = [*(dst / "attributions").glob("*.parquet"), *(dst / "summary").rglob("*.parquet")]
    for p in files:
        if p.name == "summary.parquet":
            p.unlink()  # rebuilt below
            continue
        t = pq.read_table(p)
        for i, f in enumerate(t.schema):
            if S.map_shape_of(f.type) is None:
                continue
            half = S.map_store_of(f.type) == "compact"
            v = S.tensor_to_numpy(t[f.name])
            valid = np.asarray(t[f.name].is_valid())
            col = S.tensor_array(np.nan_to_num(v), valid,
                                 value_type=pa.float16() if half else pa.float32())  # fmt: skip
            # float32 exact; float16 (a few bits less, subnormal below 6e-5) as schema 1 had it
            assert half or np.array_equal(S.tensor_to_numpy(col), v, equal_nan=True)
            t = t.set_column(i, pa.field(f.name, col.type, metadata=f.metadata), col)
        pq.write_table(t, p)
    return dst


def test_schema_1_outputs_still_summarize_compare_and_report(runs, tmp_path, capsys):
    from xai_audit.cli import main
    from xai_audit.report import build_report

    old = _as_schema_1(runs["compact"], tmp_path / "old")
    t = pq.read_table(old / "attributions")
    assert t.schema.field("gradcam").type == S.tensor_type((32, 32), pa.float16())
    new_summary = SM.read_summary(str(runs["compact"]))
    old_summary = SM.summarize_output(str(old))
    assert old_summary.column_names == new_summary.column_names
    for c in new_summary.column_names:
        if c.endswith("_map"):
            np.testing.assert_array_equal(S.tensor_to_numpy(old_summary[c]),
                                          S.tensor_to_numpy(new_summary[c]))  # fmt: skip
        else:
            assert old_summary[c].equals(new_summary[c]), c
    assert main(["compare", str(runs["before"]), str(old), "--dest", str(tmp_path / "cmp")]) == 0
    rep = build_report(str(old), log=lambda m: None)
    assert (old / "report" / "index.html").is_file() and rep.galleries
