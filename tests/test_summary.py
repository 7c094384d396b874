"""The per-class summary (xai_workers.summary): it adds up to the rows, merges exactly in any order,
its percentiles are as precise as documented, and summarize_output pairs parts with partials.

Rows are made in the real output schema (``worker.output_layout`` + ``schema.build_table``) with
statistics from ``stats.row_statistics``, error rows and null labels; one test uses the
AttributionWorker itself (topk targets). No Ray.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from xai_workers import schema as S
from xai_workers import summary as SM
from xai_workers.stats import row_statistics
from xai_workers.worker import output_layout

METHODS = ("saliency", "integrated_gradients", "gradcam")
N_CLASSES = 5


def make_rows(
    n: int, seed: int = 0, size: int = 12, offset: int = 0, target_is_label: bool = False
) -> pa.Table:
    """``n`` attribution rows in the output schema: every 7th row an error row, every 5th label
    null, every 11th Grad-CAM map all zero (NaN statistics), predictions right ~70% of the time.
    Targets are the predictions, or (``target_is_label``) the labels (``--target label``)."""
    rng = np.random.default_rng(seed)
    layout = output_layout(METHODS, size, 10, "predicted", label_type=pa.int64(), store="full")
    schema = S.output_schema(layout)
    sal = rng.random((n, size, size)).astype(np.float32) ** 3
    ig = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    gc = np.maximum(rng.normal(size=(n, size, size)), 0).astype(np.float32)
    gc[::11] = 0.0
    score = rng.normal(3, 1, n).astype(np.float32)
    base = rng.normal(0, 1, n).astype(np.float32)
    delta = (rng.normal(0, 0.05, n) * (score - base)).astype(np.float32)
    res = {
        "saliency": torch.from_numpy(sal),
        "integrated_gradients": torch.from_numpy(ig),
        "gradcam": torch.from_numpy(gc),
        "score": torch.from_numpy(score),
        "baseline_score": torch.from_numpy(base),
        "ig_delta": torch.from_numpy(delta),
    }
    stats = {k: v.numpy() for k, v in row_statistics(res).items()}
    label = rng.integers(0, N_CLASSES, n)
    pred = np.where(rng.random(n) < 0.7, label, rng.integers(0, N_CLASSES, n))
    values = {
        "target": label if target_is_label else pred,
        "pred_class": pred,
        "pred_prob": rng.random(n).astype(np.float32),
        "topk_classes": np.tile(np.arange(5), (n, 1)),
        "topk_probs": np.full((n, 5), 0.2, np.float32),
        "score": score,
        "baseline_score": base,
        "ig_delta": delta,
        "saliency": sal,
        "integrated_gradients": ig,
        "gradcam": gc,
        **stats,
    }
    errors = [f"bad image {i}" if (i + offset) % 7 == 3 else None for i in range(n)]
    labels = [None if (i + offset) % 5 == 1 else int(label[i]) for i in range(n)]
    return S.build_table(
        schema,
        ids=[f"r{i + offset}" for i in range(n)],
        sources=["in.parquet"] * n,
        source_rows=np.arange(offset, offset + n),
        errors=errors,
        values=values,
        labels=labels,
    )


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    return make_rows(120, seed=1)


def _group(table: pa.Table, group: str) -> dict:
    t = table.filter(pa.compute.equal(table["group_by"], group))
    return {r["class"]: r for r in t.to_pylist()}


def _np(table: pa.Table, col: str) -> np.ndarray:
    return table.column(col).to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------------------------


def test_counts_add_up_to_the_rows(rows):
    t = SM.Summary().update(rows).to_table()
    ok = _np(rows, "status") == "ok"
    pred = np.nan_to_num(_np(rows, "pred_class").astype(float), nan=-1).astype(int)
    lab_valid = rows["label"].is_valid().to_numpy(zero_copy_only=False)
    label = np.asarray(rows["label"].fill_null(-1).to_numpy(), int)

    all_row = _group(t, "all")[None]
    assert all_row["count"] == ok.sum() and all_row["errors"] == (~ok).sum()
    assert all_row["count"] + all_row["errors"] == rows.num_rows
    by_pred = _group(t, "pred_class")
    # the acceptance check: the per-class counts add up to the ok rows; errors are separate
    assert sum(r["count"] for r in by_pred.values()) == ok.sum()
    assert all(r["errors"] == 0 for r in by_pred.values())
    by_label = _group(t, "label")
    assert sum(r["count"] + r["errors"] for r in by_label.values()) == lab_valid.sum()
    assert all_row["labeled"] == (ok & lab_valid).sum()
    for c in range(N_CLASSES):
        sel = ok & (pred == c)
        r = by_pred[c]
        assert r["count"] == sel.sum()
        assert r["labeled"] == (sel & lab_valid).sum()
        assert r["correct"] == (sel & lab_valid & (label == c)).sum()
        assert r["accuracy"] == pytest.approx(r["correct"] / r["labeled"])
        rl = by_label[c]
        assert rl["count"] == (ok & lab_valid & (label == c)).sum()
        assert rl["errors"] == (~ok & lab_valid & (label == c)).sum()
        assert rl["correct"] == (ok & lab_valid & (label == c) & (pred == c)).sum()
    # group order: all, then pred_class by class, then label by class
    assert t["group_by"].to_pylist() == (
        ["all"] + ["pred_class"] * 5 + ["label"] * 5 + ["target"] * 5
    )
    by_target = _group(t, "target")  # target = pred_class here: the same rows
    for c in range(N_CLASSES):
        assert by_target[c]["count"] == by_pred[c]["count"]
    assert t["class"].to_pylist() == [None] + [0, 1, 2, 3, 4] * 3


def test_means_and_maps_match_a_direct_computation(rows):
    t = SM.Summary().update(rows).to_table()
    assert t.schema.equals(
        SM.summary_schema(SM.statistic_columns(rows.schema), SM.map_columns(rows.schema)),
        check_metadata=False,
    )
    ok = _np(rows, "status") == "ok"
    pred = np.nan_to_num(_np(rows, "pred_class").astype(float), nan=-1).astype(int)
    by_pred = _group(t, "pred_class")
    for stat in ("gradcam_gini", "integrated_gradients_border_frac", "ig_rel_error", "pred_prob",
                 "agree_saliency_gradcam"):  # fmt: skip
        v = _np(rows, stat).astype(np.float64)
        for c in (0, 3):
            sel = ok & (pred == c) & np.isfinite(v)
            assert by_pred[c][f"{stat}_mean"] == pytest.approx(v[sel].mean(), rel=1e-12)
    # all-zero Grad-CAM maps have NaN statistics: left out of the mean, not counted as 0
    gini = _np(rows, "gradcam_gini")
    assert np.isnan(gini[ok]).any()
    assert "topk_probs_mean" not in t.column_names and "score_mean" not in t.column_names

    gc = S.tensor_to_numpy(rows["gradcam"])
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(gc[:, None]).double(), 32)[:, 0].numpy()
    c = 2
    sel = ok & (pred == c)
    mean_map = S.tensor_to_numpy(t["gradcam_mean_map"])[1 + c]
    np.testing.assert_allclose(mean_map, pooled[sel].mean(0), rtol=1e-5)
    total = pooled.sum(axis=(1, 2))
    share_sel = sel & (total > 0)
    share = S.tensor_to_numpy(t["gradcam_share_map"])[1 + c]
    np.testing.assert_allclose(
        share, (pooled[share_sel] / total[share_sel, None, None]).mean(0), rtol=1e-5
    )
    assert share.sum() == pytest.approx(1.0, abs=1e-5)
    assert S.tensor_to_numpy(t["integrated_gradients_mean_map"]).shape == (16, 32, 32)


def test_merge_is_exact_and_order_free(rows):
    whole = SM.Summary().update(rows).to_table()
    a = SM.Summary().update(rows.slice(0, 17))
    b = SM.Summary().update(rows.slice(17, 33))
    c = SM.Summary().update(rows.slice(67))
    d = SM.Summary().update(rows.slice(50, 17))

    def via_parquet(acc: SM.Summary) -> SM.Summary:
        buf = io.BytesIO()
        pq.write_table(acc.to_partial(), buf)
        return SM.Summary.from_partial(pq.read_table(io.BytesIO(buf.getvalue())))

    one = SM.merge(SM.merge(a, b), SM.merge(c, d)).to_table()
    two = SM.Summary()
    for acc in (d, c, b, a):
        two.merge(via_parquet(acc))
    two = two.to_table()
    for other in (one, two):
        assert other.column_names == whole.column_names
        for name in whole.column_names:
            x, y = whole[name], other[name]
            if name.endswith("_map"):
                np.testing.assert_allclose(S.tensor_to_numpy(x), S.tensor_to_numpy(y), rtol=1e-6)
            elif pa.types.is_floating(x.type):
                np.testing.assert_allclose(
                    x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False),
                    rtol=1e-12, equal_nan=True,
                )  # fmt: skip
            else:
                assert x.to_pylist() == y.to_pylist(), name
    # module-level spellings
    assert SM.to_table(SM.update(None, rows)).equals(whole)
    assert SM.Summary().update(rows.slice(0, 0)).rows == 0


@pytest.mark.parametrize("target_is_label", [False, True])
def test_partial_round_trip_is_exact_and_smaller(tmp_path, target_is_label):
    """A partial written by write_partial and read back gives the summary of its rows exactly
    (maps: float32 sums); with no dictionaries on floats, BYTE_STREAM_SPLIT and zstd it is at
    least a quarter smaller than the same table with pyarrow's defaults (as written before)."""
    # 32 px maps: pooled to 32x32 unchanged, as noisy as real maps (12 px ones, upsampled,
    # repeat values and compress well either way)
    rows = make_rows(120, seed=2, size=32, target_is_label=target_is_label)
    whole = SM.Summary().update(rows)
    uri = SM.write_partial(rows, str(tmp_path), "part-x.parquet")
    back = SM.Summary.from_partial(pq.read_table(uri)).to_table()
    want = whole.to_table()
    assert back.column_names == want.column_names
    for name in want.column_names:
        x, y = want[name], back[name]
        if name.endswith("_map"):
            np.testing.assert_allclose(S.tensor_to_numpy(y), S.tensor_to_numpy(x), rtol=1e-6)
        elif pa.types.is_floating(x.type):
            np.testing.assert_allclose(y.to_numpy(zero_copy_only=False),
                                       x.to_numpy(zero_copy_only=False), rtol=1e-12,
                                       equal_nan=True)  # fmt: skip
        else:
            assert y.to_pylist() == x.to_pylist(), name
    plain = io.BytesIO()
    pq.write_table(whole.to_partial(), plain)
    assert os.path.getsize(uri) < 0.75 * len(plain.getvalue())


def test_maps_are_grouped_by_the_class_they_explain():
    """--target label: a row's maps explain its label, not its prediction. The 'target' rows'
    mean maps average exactly the maps that explain that class (the report draws those)."""
    rows = make_rows(120, seed=3, target_is_label=True)
    t = SM.Summary().update(rows).to_table()
    ok = _np(rows, "status") == "ok"
    target = np.asarray(rows["target"].fill_null(-1).to_numpy(), int)
    pred = np.asarray(rows["pred_class"].fill_null(-1).to_numpy(), int)
    assert (ok & (target >= 0) & (target != pred)).sum() > 10  # the groups differ
    gc = S.tensor_to_numpy(rows["gradcam"])
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(gc[:, None]).double(), 32)[:, 0].numpy()
    groups = t["group_by"].to_pylist()
    classes = t["class"].to_pylist()
    maps = S.tensor_to_numpy(t["gradcam_mean_map"])
    for c in range(N_CLASSES):
        i = [k for k, (g, cc) in enumerate(zip(groups, classes, strict=True))
             if g == "target" and cc == c][0]  # fmt: skip
        sel = ok & (target == c)
        assert t["count"][i].as_py() == sel.sum()
        np.testing.assert_allclose(maps[i], pooled[sel].mean(0), rtol=1e-5)  # float32 storage


def test_partial_is_small_and_sparse(rows):
    part = SM.summarize_table(rows)
    # one row per key: all + 5 predicted + 5 labels + 5 targets; only nonzero histogram bins
    assert part.num_rows == 16
    bins = part["gradcam_gini__bins"].to_pylist()
    assert sum(len(b) for b in bins) <= 3 * rows.num_rows
    assert part.schema.metadata[b"xai_workers.summary_version"] == SM.SUMMARY_VERSION.encode()
    with pytest.raises(ValueError, match="version"):
        SM.Summary.from_partial(part.replace_schema_metadata({}))


@pytest.mark.parametrize(
    ("stat", "binning"),
    [("gradcam_border_frac", SM.UNIT_BINNING), ("agree_saliency_gradcam", SM.SIGNED_UNIT_BINNING),
     ("ig_rel_error", SM.LOG_BINNING)],
)  # fmt: skip
def test_percentiles_within_one_bin(stat, binning):
    assert SM.binning_for(stat) == binning
    rng = np.random.default_rng(3)
    for n in (1, 2, 37, 5000):
        if binning.kind == "log":
            v = np.exp(rng.normal(-3, 2, n))
        elif binning.lo < 0:
            v = np.clip(rng.normal(0.3, 0.4, n), -1, 1)
        else:
            v = rng.beta(2, 5, n)
        batch = {"status": np.array(["ok"] * n), "pred_class": np.zeros(n, np.int64), stat: v}
        t = SM.Summary().update(batch).to_table()
        r = _group(t, "pred_class")[0]
        assert r[f"{stat}_mean"] == pytest.approx(v.mean(), rel=1e-12)
        width = (binning.hi - binning.lo) / binning.bins
        ratio = (binning.hi / binning.lo) ** (1 / binning.bins) if binning.kind == "log" else 1
        for q in SM.PERCENTILES:
            est = r[f"{stat}_p{q}"]
            exact = np.percentile(v, q, method="lower")  # the order statistic at floor(q(n-1))
            assert v.min() <= est <= v.max()
            if binning.kind == "log":
                assert abs(math.log(est / exact)) <= math.log(ratio) + 1e-9, (n, q, est, exact)
            else:
                assert abs(est - exact) <= width + 1e-12, (n, q, est, exact)
            if n == 5000:  # with many rows also close to numpy's default (linear) percentile
                lin = np.percentile(v, q)
                tol = 2 * width if binning.kind == "linear" else 2 * (ratio - 1) * lin
                assert abs(est - lin) <= tol


def test_binning_edges_and_out_of_range():
    b = SM.UNIT_BINNING
    idx = b.index(np.array([-0.1, 0.0, 0.0049, 0.005, 0.5, 1.0, 1.5]))
    assert idx.tolist() == [0, 1, 1, 2, 101, 200, 201]
    lg = SM.LOG_BINNING
    assert lg.index(np.array([0.0, -1.0, 1e-6, 1.0, 1e7])).tolist()[:2] == [0, 0]
    assert lg.index(np.array([1e7]))[0] == lg.bins + 1
    # values outside the range still give exact min/max-clamped percentiles
    v = np.array([-2.0, -1.5, 3.0])
    t = (
        SM.Summary()
        .update(
            {"status": np.array(["ok"] * 3), "pred_class": np.zeros(3, np.int64), "pred_prob": v}
        )
        .to_table()
    )
    r = _group(t, "pred_class")[0]
    assert r["pred_prob_p5"] >= -2.0 and r["pred_prob_p95"] <= 3.0


def test_mapping_input_equals_table_input(rows):
    ok = _np(rows, "status") == "ok"
    batch = {
        "status": _np(rows, "status"),
        "pred_class": np.where(ok, np.nan_to_num(_np(rows, "pred_class").astype(float)), 0),
        "label": rows["label"].to_numpy(zero_copy_only=False),
        "gradcam_gini": _np(rows, "gradcam_gini"),
        "gradcam": S.tensor_to_numpy(rows["gradcam"]),
    }
    a = SM.Summary().update(batch).to_table()
    b = (
        SM.Summary()
        .update(rows.select(["status", "pred_class", "label", "gradcam_gini", "gradcam"]))
        .to_table()
    )
    assert a.column_names == b.column_names
    for name in ("count", "errors", "labeled", "correct", "gradcam_gini_mean", "gradcam_gini_p50"):
        np.testing.assert_allclose(
            a[name].to_numpy(zero_copy_only=False), b[name].to_numpy(zero_copy_only=False)
        )


def test_correct_column(rows):
    c = SM.correct_column(rows)
    ok = _np(rows, "status") == "ok"
    lv = rows["label"].is_valid().to_numpy(zero_copy_only=False)
    assert c.type == pa.bool_() and len(c) == rows.num_rows
    assert np.array_equal(c.is_valid().to_numpy(zero_copy_only=False), ok & lv)
    got = np.asarray(c.fill_null(False).to_numpy(zero_copy_only=False))
    pred = np.nan_to_num(_np(rows, "pred_class").astype(float), nan=-1)
    label = rows["label"].fill_null(-2).to_numpy()
    assert np.array_equal(got, ok & lv & (pred == label))
    assert SM.correct_column(rows.drop_columns(["label"])).null_count == rows.num_rows


def test_needed_columns_leave_out_what_is_not_summarized(rows):
    cols = SM.needed_columns(rows.schema)
    assert {"status", "pred_class", "label", "gradcam", "integrated_gradients"} <= set(cols)
    assert not {"saliency", "id", "error", "topk_probs", "score", "source"} & set(cols)
    assert not {"gradcam", "integrated_gradients"} & set(SM.needed_columns(rows.schema, False))


def test_topk_targets_use_the_first_target():
    from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model
    from xai_workers.worker import AttributionWorker

    torch.manual_seed(0)
    w = AttributionWorker(
        build_demo_model(), target="topk:2", image_size=32, mean=DEMO_MEAN, std=DEMO_STD,
        ig_steps=2, batch_size=8, num_threads=1, store="full",
    )  # fmt: skip
    n = 6
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy() * 2 - 1
    batch = pa.table({
        "id": [f"t{i}" for i in range(n)], "x": S.tensor_array(x),
        "error": pa.nulls(n, pa.string()), "source": ["s"] * n, "source_row": np.arange(n),
    })  # fmt: skip
    out = w(batch)
    assert pa.types.is_fixed_size_list(out.schema.field("gradcam_gini").type)
    t = SM.Summary().update(out).to_table()
    first = S.tensor_to_numpy(out["gradcam_gini"])[:, 0]
    all_row = _group(t, "all")[None]
    assert all_row["count"] == n
    assert all_row["gradcam_gini_mean"] == pytest.approx(np.nanmean(first), rel=1e-6)
    gc = S.tensor_to_numpy(out["gradcam"])  # (n, 2, 32, 32)
    np.testing.assert_allclose(
        S.tensor_to_numpy(t["gradcam_mean_map"])[0], gc[:, 0].mean(0), rtol=1e-5, atol=1e-7
    )


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _write_output(root, tables) -> list[str]:
    from xai_audit import output as out

    attr = str(root / "attributions")
    return [out.write_part(t, attr)["file"] for t in tables]


def test_summarize_output_pairs_parts_with_partials(tmp_path, rows):
    import duckdb

    parts = [rows.slice(0, 40), rows.slice(40, 40), rows.slice(80)]
    names = _write_output(tmp_path, parts)
    out = str(tmp_path)
    SM.write_partial(parts[0], out, names[0])
    SM.write_partial(SM.Summary().update(parts[1]), out, names[1])
    # a partial whose part is gone (e.g. rewritten after a crash) must not count
    SM.write_partial(make_rows(30, seed=9), out, "part-000000000000000000000000.parquet")
    # a temporary file of an interrupted write is not a part
    (tmp_path / "attributions" / ".tmp-abc-part-x.parquet").write_bytes(b"partial garbage")
    logs: list[str] = []
    t = SM.summarize_output(out, log=logs.append)
    expected = SM.Summary().update(rows).to_table()
    assert t.select(["group_by", "class", "count", "errors", "correct"]).equals(
        expected.select(["group_by", "class", "count", "errors", "correct"])
    )
    np.testing.assert_allclose(
        _np(t, "gradcam_border_frac_mean"), _np(expected, "gradcam_border_frac_mean"), rtol=1e-12
    )
    assert t.schema.metadata[b"parts"] == b"3" and t.schema.metadata[b"parts_from_partials"] == b"2"
    assert "3 parts (2 from partials)" in logs[-1]

    # written where the job and DuckDB expect it; it adds up to the attribution rows
    path = tmp_path / "summary" / "summary.parquet"
    assert path.exists() and SM.read_summary(out).equals(t)
    con = duckdb.connect()
    ok_rows, err_rows = con.execute(
        f"SELECT count(*) FILTER (status = 'ok'), count(*) FILTER (status = 'error') "
        f"FROM '{tmp_path}/attributions/part-*.parquet'"
    ).fetchone()
    per_class, all_errors = con.execute(
        f"SELECT sum(count) FILTER (group_by = 'pred_class'), sum(errors) FILTER "
        f"(group_by = 'all') FROM '{path}'"
    ).fetchone()
    assert per_class == ok_rows and all_errors == err_rows and ok_rows + err_rows == rows.num_rows
    mean_map = con.execute(
        f"SELECT gradcam_mean_map FROM '{path}' WHERE group_by = 'pred_class' AND class = 1"
    ).fetchone()[0]
    assert len(mean_map) == 32 * 32

    # a partial older than its part (left by an earlier run with a part of the same name)
    stale = tmp_path / "summary" / "partials" / names[1]
    part_time = (tmp_path / "attributions" / names[1]).stat().st_mtime
    os.utime(stale, (part_time - 60, part_time - 60))
    t1 = SM.summarize_output(out, write=False, log=logs.append)
    assert t1.schema.metadata[b"parts_from_partials"] == b"1" and t1["count"].equals(t["count"])
    assert "older than its part" in " ".join(logs)

    # an unreadable partial: its part is read instead
    (tmp_path / "summary" / "partials" / names[0]).write_bytes(b"not parquet")
    t2 = SM.summarize_output(out, write=False, log=logs.append)
    assert t2["count"].equals(t["count"]) and "unusable" in " ".join(logs)
    t3 = SM.summarize_output(out, use_partials=False, write=False)
    assert t3.schema.metadata[b"parts_from_partials"] == b"0" and t3["count"].equals(t["count"])

    with pytest.raises(FileNotFoundError, match="no attribution files"):
        SM.summarize_output(str(tmp_path / "nothing"))
