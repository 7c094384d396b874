"""``xai-audit compare OUT_A OUT_B``: what changed between two audits.

Two models on one dataset, or one model on two dates: rows are matched by ``id``, classes by the
class the maps explain (the summaries' ``target`` group, ``pred_class`` for older summaries).
Per class: the change in accuracy, the rows whose prediction flipped, the change in mean border
share (Grad-CAM and IG) and in the IG completeness error (median), and how far the class's mean
maps moved: L1 distance between the two mean share maps (each sums to 1, so the distance is in
[0, 2]). Written as ``<dest>/comparison.parquet`` and ``<dest>/index.html`` (default dest:
``OUT_B/compare``), sorted by the largest change first.
"""

from __future__ import annotations

import argparse
import html
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xai_audit.config import add_s3_endpoint

#: Columns of comparison.parquet, in order.
SCHEMA = pa.schema(
    [
        pa.field("class", pa.int64()),
        pa.field("name", pa.string()),
        pa.field("count_a", pa.int64()),
        pa.field("count_b", pa.int64()),
        pa.field("accuracy_a", pa.float64()),
        pa.field("accuracy_b", pa.float64()),
        pa.field("accuracy_change", pa.float64()),
        pa.field("flips", pa.int64()),
        pa.field("gradcam_border_change", pa.float64()),
        pa.field("ig_border_change", pa.float64()),
        pa.field("ig_error_p50_change", pa.float64()),
        pa.field("gradcam_map_l1", pa.float64()),
        pa.field("ig_map_l1", pa.float64()),
        pa.field("change", pa.float64()),
    ]
)


def _group(summary: pa.Table) -> dict[int, dict]:
    """class -> its summary row (the group the report draws, ``report.map_group``), with the
    mean share maps of Grad-CAM and IG as float64 (32, 32) under ``_maps``."""
    from xai_audit.report import map_group
    from xai_workers.schema import tensor_to_numpy

    t = summary.filter(pc.equal(summary["group_by"], map_group(summary)))
    maps = {
        m: (tensor_to_numpy(t[f"{m}_share_map"]).astype(np.float64),
            np.asarray(t[f"{m}_share_map"].is_valid()))
        for m in ("gradcam", "integrated_gradients") if f"{m}_share_map" in t.column_names
    }  # fmt: skip
    rows = {}
    plain = t.select([c for c in t.column_names if not c.endswith("_map")]).to_pylist()
    for i, r in enumerate(plain):
        r["_maps"] = {m: v[i] for m, (v, ok) in maps.items() if ok[i]}
        rows[r["class"]] = r
    return rows


def _predictions(output: str) -> pa.Table:
    from xai_workers import summary as SM
    from xai_workers.storage import join_uri, pyarrow_filesystem

    attr = join_uri(output, SM.ATTRIBUTIONS_DIR)
    fs, _ = pyarrow_filesystem(attr)
    tables = []
    for f in SM.list_parquet(attr):
        with fs.open_input_file(f) as fh:
            tables.append(pq.read_table(fh, columns=["id", "status", "pred_class"]))
    if not tables:
        raise FileNotFoundError(f"no attribution files in {attr}")
    t = pa.concat_tables(tables)
    t = t.filter(pc.equal(t["status"], "ok")).select(["id", "pred_class"])
    # ids are a string or an integer column: compare them as text
    return t.set_column(0, "id", pc.cast(t["id"], pa.string()))


def _diff(a, b):
    return None if a is None or b is None else float(b) - float(a)


def compare(out_a: str, out_b: str, dest: str | None = None, log=print) -> pa.Table:
    """Write the comparison of two outputs; returns its table (``SCHEMA``)."""
    from xai_audit import output as out
    from xai_workers import summary as SM

    t0 = time.monotonic()
    sa, sb = SM.read_summary(out_a), SM.read_summary(out_b)
    ga, gb = _group(sa), _group(sb)
    pa_, pb = _predictions(out_a), _predictions(out_b)
    joined = pa_.join(pb, "id", join_type="inner", left_suffix="_a", right_suffix="_b")
    pred_a = joined["pred_class_a"].to_numpy(zero_copy_only=False)
    pred_b = joined["pred_class_b"].to_numpy(zero_copy_only=False)
    flipped = pred_a != pred_b
    rows = []
    for c in sorted(set(ga) | set(gb)):
        a, b = ga.get(c, {}), gb.get(c, {})
        l1 = {}
        for m in ("gradcam", "integrated_gradients"):
            ma, mb = a.get("_maps", {}).get(m), b.get("_maps", {}).get(m)
            l1[m] = None if ma is None or mb is None else float(np.abs(ma - mb).sum())
        r = {
            "class": c,
            "name": b.get("name") or a.get("name"),
            "count_a": a.get("count", 0),
            "count_b": b.get("count", 0),
            "accuracy_a": a.get("accuracy"),
            "accuracy_b": b.get("accuracy"),
            "accuracy_change": _diff(a.get("accuracy"), b.get("accuracy")),
            # rows predicted as c in either audit whose prediction differs in the other
            "flips": int((flipped & ((pred_a == c) | (pred_b == c))).sum()),
            "gradcam_border_change": _diff(a.get("gradcam_border_frac_mean"),
                                           b.get("gradcam_border_frac_mean")),
            "ig_border_change": _diff(a.get("integrated_gradients_border_frac_mean"),
                                      b.get("integrated_gradients_border_frac_mean")),
            "ig_error_p50_change": _diff(a.get("ig_rel_error_p50"), b.get("ig_rel_error_p50")),
            "gradcam_map_l1": l1["gradcam"],
            "ig_map_l1": l1["integrated_gradients"],
        }  # fmt: skip
        parts = [abs(r[k]) for k in ("accuracy_change", "gradcam_border_change",
                                     "ig_border_change") if r[k] is not None]  # fmt: skip
        parts += [v / 2 for v in (r["gradcam_map_l1"], r["ig_map_l1"]) if v is not None]
        r["change"] = max(parts) if parts else 0.0
        rows.append(r)
    rows.sort(key=lambda r: (-r["change"], r["class"]))
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    dest = dest or out.join(out_b, "compare")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.write_bytes_atomic(out.join(dest, "comparison.parquet"), buf.getvalue())
    page = _page(out_a, out_b, table, len(joined), int(flipped.sum()))
    out.write_bytes_atomic(out.join(dest, "index.html"), page.encode())
    n_flips, secs = int(flipped.sum()), time.monotonic() - t0
    log(f"compared {len(joined):,} rows matched by id ({n_flips:,} predictions flipped), "
        f"{table.num_rows} classes in {secs:.1f} s -> {dest}")  # fmt: skip
    return table


def _page(out_a: str, out_b: str, table: pa.Table, matched: int, flips: int) -> str:
    e = html.escape

    def fmt(v, pct=False, signed=False):
        if v is None:
            return "–"
        if pct:
            return f"{100 * v:+.1f} pt" if signed else f"{100 * v:.1f}%"
        return f"{v:+.3f}" if signed else f"{v:.3f}" if isinstance(v, float) else f"{v:,}"

    cols = [("class", "class", None), ("count_a", "rows A", None), ("count_b", "rows B", None),
            ("accuracy_change", "accuracy", "pt"), ("flips", "flips", None),
            ("gradcam_border_change", "Grad-CAM border", "pt"),
            ("ig_border_change", "IG border", "pt"), ("ig_error_p50_change", "IG error p50", "pt"),
            ("gradcam_map_l1", "Grad-CAM map moved (L1)", None),
            ("ig_map_l1", "IG map moved (L1)", None)]  # fmt: skip
    head = "".join(f"<th>{e(t)}</th>" for _, t, _ in cols)
    body = []
    for r in table.to_pylist():
        cells = []
        for k, _, kind in cols:
            v = r[k]
            if k == "class":
                text = f"{r['name']} ({v})" if r["name"] else str(v)
            elif kind == "pt":
                text = fmt(v, pct=True, signed=True)
            else:
                text = fmt(v)
            cells.append(f"<td>{e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xai-audit compare</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ddd;padding:4px 8px;text-align:right}}
th{{background:#f4f4f4}}</style></head><body>
<h1>xai-audit compare</h1>
<p>A: <code>{e(out_a)}</code><br>B: <code>{e(out_b)}</code></p>
<p>{matched:,} rows matched by id; {flips:,} predictions flipped. Classes are the classes the
maps explain; changes are B minus A; a map moved by L1 between the two mean share maps (each sums
to 1: 0 is the same picture, 2 no overlap). Largest change first.</p>
<table><tr>{head}</tr>{"".join(body)}</table></body></html>
"""


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare two outputs (two models, or two dates): per-class changes",
        description="Per class: change in accuracy, prediction flips (rows matched by id), "
        "border share, IG completeness, and how far the mean maps moved. Writes "
        "comparison.parquet and index.html to --dest (default OUT_B/compare).",
    )
    p.add_argument("out_a", metavar="OUT_A", help="the first run's output folder or s3:// prefix")
    p.add_argument("out_b", metavar="OUT_B", help="the second run's output folder or s3:// prefix")
    p.add_argument("--dest", metavar="URI", default=None,
                   help="where to write comparison.parquet and index.html "
                   "(default OUT_B/compare)")  # fmt: skip
    add_s3_endpoint(p)
    p.set_defaults(handler=_main)


def _main(ns: argparse.Namespace) -> int:
    from xai_workers.storage import configure

    configure(ns.s3_endpoint)
    try:
        compare(ns.out_a, ns.out_b, ns.dest,
                log=lambda m: print(f"[xai-audit] {m}", flush=True))  # fmt: skip
    except (FileNotFoundError, OSError) as e:
        print(f"xai-audit: error: {e}", flush=True)
        return 2
    return 0
