"""What the report shows: the galleries' streaming top-k over scalar columns, the chosen rows and
their images, the standout classes and the class maps to draw, the error rows.

Everything here reads the output (Parquet parts, summary, manifest, the run's input) and returns
plain values; nothing draws or formats (``xai_audit.report.pictures``, ``xai_audit.report.page``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xai_audit.report.pictures import _png, class_map_tile
from xai_workers.stats import METHODS as STAT_METHODS

#: Rows scanned for the galleries by default (whole part files; 0 = all).
DEFAULT_SAMPLE = 1_000_000
DEFAULT_TOP = 8
DEFAULT_MAX_CLASSES = 24

#: A class stands out when its mean border share is >= this many times the others' median...
STANDOUT_RATIO = 2.0
#: ...and at least this much larger in absolute terms...
STANDOUT_MIN_DIFF = 0.02
#: ...and has at least this many rows.
STANDOUT_MIN_COUNT = 5
#: A class whose mean border share is at least this stands out on its own, whatever the other
#: classes do: the border band (outer 10% of each side) is 36% of a square image's area, so a map
#: spread evenly puts 36% there, and 45% is 1.25x that.
BORDER_ABSOLUTE = 0.45
BORDER_AREA = 0.36
#: Error rows above this share of all rows are a finding; every error row is listed (up to
#: ERRORS_LISTED, the commonest messages first).
ERROR_SHARE_FINDING = 0.01
ERRORS_LISTED = 100
#: IG completeness error (95th percentile) above this is a finding.
IG_ERROR_FINDING = 0.1
#: Predictions (:func:`prediction_findings`), with at least PREDICTION_MIN_ROWS ok rows: one
#: class predicted for at least this share of the rows is a collapsed prediction distribution
#: (a finding when the labels are spread: their commonest class holds less than this share;
#: without labels it is only said)...
PRED_COLLAPSE_SHARE = 0.9
PREDICTION_MIN_ROWS = 10
#: ...a label class with at least this many ok rows that the model never predicts is a finding
#: (every such class is listed)...
NEVER_PREDICTED_MIN_ROWS = 3
#: ...and so is accuracy more than this below the majority rate (the share of the commonest
#: label: what always answering that class scores).
ACCURACY_BELOW_MAJORITY = 0.1
METHODS = STAT_METHODS  # every method with a 2-D map (xai_workers.stats), in its order
METHOD_TITLES = {
    "saliency": "Saliency", "integrated_gradients": "IG", "gradcam": "Grad-CAM", "cam": "CAM",
    "gradcam_pp": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM",
    "eigencam": "EigenCAM", "smoothgrad": "SmoothGrad", "smoothgrad_sq": "SmoothGrad²",
    "vargrad": "VarGrad",
}  # fmt: skip
METHOD_LONG = {
    "saliency": "Saliency",
    "integrated_gradients": "Integrated Gradients",
    "gradcam": "Grad-CAM",
    "cam": "CAM",
    "gradcam_pp": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "smoothgrad": "SmoothGrad",
    "smoothgrad_sq": "SmoothGrad (squared)",
    "vargrad": "VarGrad",
}
#: Methods with per-class mean maps, in the order the page shows them.
CLASS_MAP_METHODS = ("gradcam", "integrated_gradients", "cam")


@dataclass(frozen=True)
class Gallery:
    """One gallery: rows ranked by ``score`` (largest first) over the scalar ``columns``."""

    key: str
    title: str
    what: str
    columns: tuple[str, ...]
    score: Callable[[dict], np.ndarray]


def _nanmax(arrs: list[np.ndarray]) -> np.ndarray:
    stack = np.stack(arrs)
    out = np.where(np.isnan(stack), -np.inf, stack).max(axis=0)
    return np.where(np.isinf(out), np.nan, out)


def _nanmean(arrs: list[np.ndarray]) -> np.ndarray:
    stack = np.stack(arrs)
    n = np.isfinite(stack).sum(axis=0)
    total = np.where(np.isfinite(stack), stack, 0).sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def galleries_for(names: Sequence[str]) -> list[Gallery]:
    """The galleries an output with columns ``names`` supports, in page order."""
    out = []
    border = [f"{m}_border_frac" for m in CLASS_MAP_METHODS if f"{m}_border_frac" in names] or [
        c for c in names if c.endswith("_border_frac")
    ]
    if border:
        out.append(Gallery(
            "border", "Largest border share",
            "Share of the map's mass in the outer 10% of the image (the larger of "
            + " and ".join(_stat_title(c) for c in border)
            + "). A model that reads a watermark, a frame or a corner mark puts its attribution "
            "there.",
            tuple(border), lambda c, b=tuple(border): _nanmax([c[k] for k in b]),
        ))  # fmt: skip
    if "label" in names:
        out.append(Gallery(
            "wrong", "Confidently wrong",
            "Rows whose prediction differs from the label, most confident first.",
            ("label", "pred_prob"),
            lambda c: np.where(
                c["label_valid"] & (c["pred_class"] != c["label"]), c["pred_prob"], np.nan
            ),
        ))  # fmt: skip
    if "ig_rel_error" in names or {"ig_delta", "score", "baseline_score"} <= set(names):
        cols = (
            ("ig_rel_error",)
            if "ig_rel_error" in names
            else ("ig_delta", "score", "baseline_score")
        )
        out.append(Gallery(
            "completeness", "Largest IG completeness error",
            "|sum(IG) - (F(x) - F(x'))| / max(|F(x) - F(x')|, |F(x)|): where the Integrated "
            "Gradients do not add up to the score change, the path integral is poorly resolved "
            "(more --ig-steps) or the model is very non-linear along the path.",
            cols, _ig_error,
        ))  # fmt: skip
    if "ig_error_est" in names:
        out.append(Gallery(
            "ig_steps", "Largest IG error estimate (--ig-steps auto)",
            "Estimated relative L2 error of the IG map, largest first: rows above --ig-tol hit "
            "--ig-max-steps without converging. Saturated images (the score moves in a small part "
            "of the path, see ig_path) and ill-conditioned ones come first.",
            ("ig_error_est", "ig_steps"), lambda c: c["ig_error_est"],
        ))  # fmt: skip
    dels = tuple(c for c in names if c.endswith("_deletion_auc") and not c.startswith("random_"))
    if dels and "random_deletion_auc" in names:
        out.append(Gallery(
            "unfaithful", "Least faithful maps",
            "Deletion AUC of the map minus that of a random pixel order (the larger over "
            "methods): removing the pixels a map ranks first should make the score fall faster "
            "than removing random ones; near or above 0, the map does not show what the model "
            "uses.",
            (*dels, "random_deletion_auc"),
            lambda c, d=dels: _nanmax([c[k] - c["random_deletion_auc"] for k in d]),
        ))  # fmt: skip
    agree = tuple(c for c in names if c.startswith("agree_"))
    if agree:
        out.append(Gallery(
            "disagreement", "Lowest agreement between methods",
            "Mean Spearman rank correlation between the methods' maps (at 32x32), lowest first: "
            "where the methods disagree, no single map can be trusted on its own.",
            agree, lambda c, a=agree: -_nanmean([c[k] for k in a]),
        ))  # fmt: skip
    return out


def _ig_error(c: dict) -> np.ndarray:
    if "ig_rel_error" in c:
        return c["ig_rel_error"]
    # xai_workers.stats.ig_relative_error, for outputs written without the column
    scale = np.maximum(np.abs(c["score"] - c["baseline_score"]), np.abs(c["score"]))
    return np.abs(c["ig_delta"]) / np.maximum(scale, 1e-6)


class TopK:
    """The ``k`` largest finite scores seen, with their (file, row) locators; ties keep the
    earlier (file, row)."""

    def __init__(self, k: int):
        self.k = k
        self.score = np.zeros(0)
        self.file = np.zeros(0, np.int64)
        self.row = np.zeros(0, np.int64)

    def push(self, score: np.ndarray, file: np.ndarray, row: np.ndarray) -> None:
        keep = np.isfinite(score)
        s = np.concatenate([self.score, score[keep]])
        f = np.concatenate([self.file, file[keep]])
        r = np.concatenate([self.row, row[keep]])
        order = np.lexsort((r, f, -s))[: self.k]
        self.score, self.file, self.row = s[order], f[order], r[order]

    def merge(self, other: TopK) -> None:
        self.push(other.score, other.file, other.row)


def _scalar(col) -> np.ndarray:
    """A float column (topk: a fixed_size_list, first element) -> float64, NaN for nulls."""
    if pa.types.is_fixed_size_list(col.type):
        from xai_workers.schema import tensor_to_numpy

        return tensor_to_numpy(col)[:, 0].astype(np.float64)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def _batch_columns(rb: pa.RecordBatch, galleries: list[Gallery]) -> dict:
    c: dict = {}
    ok = np.asarray(rb.column("status").to_numpy(zero_copy_only=False) == "ok")
    c["ok"] = ok
    pred = rb.column("pred_class")
    c["pred_class"] = np.asarray(pred.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    if "label" in rb.schema.names:
        lab = rb.column("label")
        c["label_valid"] = np.asarray(lab.is_valid().to_numpy(zero_copy_only=False), bool)
        c["label"] = np.asarray(lab.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    for g in galleries:
        for name in g.columns:
            if name not in c and name != "label":
                c[name] = _scalar(rb.column(name))
    return c


def _scan_columns(schema: pa.Schema, galleries: list[Gallery]) -> list[str]:
    cols = ["status", "pred_class"]
    if "label" in schema.names and pa.types.is_integer(schema.field("label").type):
        cols.append("label")
    for g in galleries:
        cols += [c for c in g.columns if c in schema.names]
    return list(dict.fromkeys(cols))


def _label_is_int(schema: pa.Schema) -> bool:
    return "label" in schema.names and pa.types.is_integer(schema.field("label").type)


def scan_galleries(
    fs,
    files: list[str],
    galleries: list[Gallery],
    top: int,
    threads: int = 8,
    which: Sequence[int] | None = None,
) -> tuple[dict[str, TopK], int]:
    """Stream the scalar columns of ``files[i]`` for ``i`` in ``which`` (default: all; pyarrow
    filesystem paths) and keep each gallery's top ``top`` ok rows. Only the columns the
    galleries rank by are read (``_scan_columns``), never a tensor column. Returns ({gallery key:
    TopK whose ``file`` indexes ``files``}, rows read)."""
    import pyarrow.parquet as pq

    def one(i: int):
        tops = {g.key: TopK(top) for g in galleries}
        rows = 0
        with fs.open_input_file(files[i]) as f:
            pf = pq.ParquetFile(f)
            cols = _scan_columns(pf.schema_arrow, galleries)
            for rb in pf.iter_batches(batch_size=65536, columns=cols):
                c = _batch_columns(rb, galleries)
                idx = np.arange(rows, rows + rb.num_rows, dtype=np.int64)
                fidx = np.full(rb.num_rows, i, np.int64)
                for g in galleries:
                    with np.errstate(all="ignore"):
                        s = np.asarray(g.score(c), dtype=np.float64)
                    tops[g.key].push(np.where(c["ok"], s, np.nan), fidx, idx)
                rows += rb.num_rows
        return tops, rows

    which = range(len(files)) if which is None else which
    total = {g.key: TopK(top) for g in galleries}
    n = 0
    with ThreadPoolExecutor(max(1, min(threads, len(which) or 1))) as ex:
        for tops, rows in ex.map(one, which):
            for k, t in tops.items():
                total[k].merge(t)
            n += rows
    return total, n


def fetch_rows(fs, files: list[str], wanted: set[tuple[int, int]], threads: int = 8) -> dict:
    """Every column of the rows ``wanted`` ((file index, row in file)); reads only the row groups
    that hold them. Returns {(file, row): {column: python value or ndarray for tensors}}."""
    import pyarrow.parquet as pq

    from xai_workers.schema import is_tensor_type, tensor_to_numpy

    by_file: dict[int, list[int]] = {}
    for f, r in wanted:
        by_file.setdefault(f, []).append(r)

    def one(fi: int):
        out = {}
        with fs.open_input_file(files[fi]) as fh:
            pf = pq.ParquetFile(fh)
            md = pf.metadata
            starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
            by_rg: dict[int, list[int]] = {}
            for r in sorted(by_file[fi]):
                g = int(np.searchsorted(starts, r, side="right") - 1)
                by_rg.setdefault(g, []).append(r)
            for g, rows in by_rg.items():
                t = pf.read_row_group(g).take(pa.array([r - starts[g] for r in rows]))
                for j, r in enumerate(rows):
                    d = {}
                    for name in t.column_names:
                        col = t.column(name)
                        if is_tensor_type(col.type):
                            d[name] = tensor_to_numpy(col.slice(j, 1))[0]
                        else:
                            d[name] = col[j].as_py()
                    out[(fi, r)] = d
        return out

    got: dict = {}
    with ThreadPoolExecutor(max(1, min(threads, len(by_file) or 1))) as ex:
        for part in ex.map(one, sorted(by_file)):
            got.update(part)
    return got


def load_images(manifest: dict | None, rows: list[dict]) -> list[np.ndarray | None]:
    """The model-input view of each row's image: float32 (H, W, 3) in [0, 1] (decoded,
    resized/cropped as the run did, no normalization), or None when the input cannot be read.

    The row's ``source`` (file relative to the input root) and ``source_row`` locate it in the
    input recorded in the manifest (``input.root``, ``input.kind``, ``input.image_column``,
    ``model.preprocessing``)."""
    import pyarrow.parquet as pq

    from xai_audit.sources.parquet import image_bytes
    from xai_workers.preprocess import Preprocessing, input_to_pixels, preprocess_bytes
    from xai_workers.storage import filesystem, join_uri, pyarrow_filesystem, read_bytes

    out: list[np.ndarray | None] = [None] * len(rows)
    if not manifest:
        return out
    inp = manifest.get("input") or {}
    root = inp.get("root") or (manifest.get("config") or {}).get("input")
    pre_d = (manifest.get("model") or {}).get("preprocessing") or {}
    if not root or not pre_d.get("image_size"):
        return out
    # the run's own preprocessing (the model's resize, crop and filter), as the manifest has it
    extra = {k: pre_d[k] for k in ("max_pixels", "resize_size", "resize_mode", "interpolation",
                                   "crop_anchor") if pre_d.get(k) is not None}  # fmt: skip
    pre = Preprocessing(
        image_size=int(pre_d["image_size"]),
        mean=tuple(pre_d.get("mean") or (0.485, 0.456, 0.406)),
        std=tuple(pre_d.get("std") or (0.229, 0.224, 0.225)),
        **extra,
    )
    try:
        fs, root_path = filesystem(root)
        root_is_file = fs.isfile(root_path)
    except Exception:  # noqa: BLE001 - the input is gone or unreachable: no pictures
        return out

    def uri_of(rel: str) -> str:
        if root_is_file:
            return root
        return join_uri(root, rel)

    def decode(data) -> np.ndarray | None:
        try:
            x = preprocess_bytes(data, pre)
        except Exception:  # noqa: BLE001
            return None
        p = input_to_pixels(x, pre).clamp(0, 1).permute(1, 2, 0).numpy()
        return p.astype(np.float32)

    kind = inp.get("kind", "parquet")
    image_col = inp.get("image_column") or "image"
    image_kind = inp.get("image_kind") or "binary"  # HF structs, references (xai_audit.sources)
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("source") is not None:
            by_source.setdefault(r["source"], []).append(i)
    for rel, idxs in by_source.items():
        try:
            if kind == "webdataset":
                from xai_audit.sources.webdataset import sample_images

                got = sample_images(uri_of(rel), {int(rows[i]["source_row"]) for i in idxs})
                for i in idxs:
                    data = got.get(int(rows[i]["source_row"]))
                    out[i] = decode(data) if data is not None else None
                continue
            if kind == "images":
                data = read_bytes(uri_of(rel))
                for i in idxs:
                    out[i] = decode(data)
                continue
            pafs, path = pyarrow_filesystem(uri_of(rel))
            with pafs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                md = pf.metadata
                starts = np.cumsum(
                    [0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)]
                )
                for i in idxs:
                    r = int(rows[i]["source_row"])
                    g = int(np.searchsorted(starts, r, side="right") - 1)
                    if not 0 <= g < md.num_row_groups:
                        continue
                    t = pf.read_row_group(g, columns=[image_col])
                    value = t.column(0)[r - int(starts[g])].as_py()
                    data, _ = image_bytes(value, image_kind, uri_of(rel).rsplit("/", 1)[0])
                    out[i] = decode(data) if data is not None else None
        except Exception:  # noqa: BLE001 - a missing input file costs its pictures only
            continue
    return out


def _read_manifest(output: str) -> dict | None:
    from xai_workers.storage import join_uri, read_bytes

    try:
        return json.loads(read_bytes(join_uri(output, "manifest.json")).decode())
    except (FileNotFoundError, ValueError, OSError):
        return None


def _sampled_scan(
    fs,
    files: list[str],
    galleries: list[Gallery],
    top: int,
    sample: int,
    total_rows: int,
    seed: int,
    threads: int,
) -> tuple[dict[str, TopK], int, int]:
    """Scan every file, or (``sample`` > 0 and fewer than ``total_rows``) whole files in a
    seeded random order until at least ``sample`` rows are read; each round reads as many files
    as the average rows per file says are still needed, in parallel. Returns (tops, rows read,
    files read)."""
    if not sample or total_rows <= sample:
        tops, n = scan_galleries(fs, files, galleries, top, threads)
        return tops, n, len(files)
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    per_file = max(1.0, total_rows / max(1, len(files)))
    tops = {g.key: TopK(top) for g in galleries}
    scanned = pos = 0
    while scanned < sample and pos < len(order):
        need = max(1, math.ceil((sample - scanned) / per_file))
        part, n = scan_galleries(fs, files, galleries, top, threads, order[pos : pos + need])
        pos += need
        scanned += n
        for k, t in part.items():
            tops[k].merge(t)
    return tops, scanned, min(pos, len(order))


def _rows(summary: pa.Table, group: str) -> list[dict]:
    cols = [c for c in summary.column_names if not c.endswith("_map")]
    t = summary.filter(pc.equal(summary["group_by"], group))
    return t.select(cols).to_pylist()


def map_group(summary: pa.Table) -> str:
    """The summary group whose maps the page draws: ``target`` (the class each map explains),
    or ``pred_class`` for summaries written before the target group existed."""
    return "target" if "target" in set(summary["group_by"].to_pylist()) else "pred_class"


def standouts(summary: pa.Table) -> list[dict]:
    """Classes (grouped by the class their maps explain, :func:`map_group`) with at least
    STANDOUT_MIN_COUNT rows whose mean border share (per method) either is >= BORDER_ABSOLUTE on
    its own, or is >= STANDOUT_RATIO x the median of the other classes (3 or more) and
    >= STANDOUT_MIN_DIFF above it. Returns dicts (class, method, value, others_median, ratio,
    absolute), largest ratio first (``others_median`` and ``ratio`` NaN without 3 classes)."""
    rows = [r for r in _rows(summary, map_group(summary)) if r["count"] >= STANDOUT_MIN_COUNT]
    out = []
    for m in METHODS:
        col = f"{m}_border_frac_mean"
        vals = [(r["class"], r.get(col)) for r in rows if r.get(col) is not None]
        for c, v in vals:
            others = [w for cc, w in vals if cc != c]
            med = float(np.median(others)) if len(vals) >= 3 else math.nan
            ratio = (v / med if med > 0 else math.inf) if len(vals) >= 3 else math.nan
            relative = len(vals) >= 3 and ratio >= STANDOUT_RATIO and v - med >= STANDOUT_MIN_DIFF
            absolute = v >= BORDER_ABSOLUTE
            if relative or absolute:
                out.append({"class": c, "method": m, "value": v, "others_median": med,
                            "ratio": ratio, "absolute": absolute})  # fmt: skip
    key = lambda d: (-(d["ratio"] if math.isfinite(d["ratio"]) else 0), -d["value"])  # noqa: E731
    return sorted(out, key=lambda d: (*key(d), d["class"], d["method"]))


def prediction_findings(summary: pa.Table) -> dict:
    """What the prediction distribution says, from the summary's ``pred_class`` and ``label``
    rows (ok rows only): ``rows``; ``top_class``, ``top_share`` (the commonest prediction and its
    share); ``labeled``, ``majority_class``, ``majority_share`` (the commonest label and its
    share among labelled rows; None without labels), ``accuracy``; ``collapsed``
    (``top_share >= PRED_COLLAPSE_SHARE``, PREDICTION_MIN_ROWS rows or more), ``collapse_hot``
    (collapsed while the labels are spread), ``never_predicted`` (label classes with
    NEVER_PREDICTED_MIN_ROWS ok rows or more that no row is predicted as, sorted),
    ``below_majority`` (accuracy more than ACCURACY_BELOW_MAJORITY below the majority share,
    PREDICTION_MIN_ROWS labelled rows or more)."""
    preds = {r["class"]: r["count"] or 0 for r in _rows(summary, "pred_class")}
    labels = {r["class"]: r["count"] or 0 for r in _rows(summary, "label")}
    n = sum(preds.values())
    out = {"rows": n, "top_class": None, "top_share": None, "labeled": None,
           "majority_class": None, "majority_share": None, "accuracy": None, "collapsed": False,
           "collapse_hot": False, "never_predicted": [], "below_majority": False}  # fmt: skip
    if n == 0:
        return out
    top = min(preds, key=lambda c: (-preds[c], c))
    out.update(top_class=top, top_share=preds[top] / n)
    out["collapsed"] = n >= PREDICTION_MIN_ROWS and out["top_share"] >= PRED_COLLAPSE_SHARE
    all_row = (_rows(summary, "all") or [{}])[0]
    labeled = all_row.get("labeled") or 0
    if not labels or not labeled:
        return out
    maj = min(labels, key=lambda c: (-labels[c], c))
    m_share = labels[maj] / max(1, sum(labels.values()))
    acc = all_row.get("accuracy")
    out.update(labeled=labeled, majority_class=maj, majority_share=m_share, accuracy=acc)
    out["collapse_hot"] = out["collapsed"] and m_share < PRED_COLLAPSE_SHARE
    out["never_predicted"] = sorted(
        c for c, k in labels.items() if k >= NEVER_PREDICTED_MIN_ROWS and not preds.get(c)
    )
    out["below_majority"] = (
        acc is not None
        and labeled >= PREDICTION_MIN_ROWS
        and acc < m_share - ACCURACY_BELOW_MAJORITY
    )
    return out


def _class_maps(summary: pa.Table, max_classes: int, files_out: dict) -> dict:
    """Write the class map tiles; returns {"classes": [...], "methods": [...], "tiles": {(m, c):
    name}, "shown": n, "total": n}."""
    from xai_workers.schema import tensor_to_numpy

    pred = summary.filter(pc.equal(summary["group_by"], map_group(summary)))
    methods = [m for m in CLASS_MAP_METHODS if f"{m}_share_map" in pred.column_names]
    classes = pred["class"].to_pylist()
    counts = pred["count"].to_pylist()
    flagged = {d["class"] for d in standouts(summary)}

    def border(i: int) -> float:
        vals = [pred[f"{m}_border_frac_mean"][i].as_py() for m in methods
                if f"{m}_border_frac_mean" in pred.column_names]  # fmt: skip
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else 0.0

    order = list(range(len(classes)))
    if len(order) > max_classes:
        order.sort(key=lambda i: (classes[i] not in flagged, -border(i), -counts[i]))
        order = sorted(order[:max_classes], key=lambda i: classes[i])
    tiles = {}
    for m in methods:
        maps = tensor_to_numpy(pred[f"{m}_share_map"])
        for i in order:
            name = f"img/class-{m}-{classes[i]}.png"
            files_out[name] = _png(class_map_tile(maps[i]))
            tiles[(m, classes[i])] = name
    info = {}
    for i in order:
        info[classes[i]] = {
            "count": counts[i],
            "name": pred["name"][i].as_py() if "name" in pred.column_names else None,
            "border": {
                m: pred[f"{m}_border_frac_mean"][i].as_py()
                for m in methods
                if f"{m}_border_frac_mean" in pred.column_names
            },
        }
    return {
        "classes": [classes[i] for i in order],
        "methods": methods,
        "tiles": tiles,
        "info": info,
        "flagged": flagged,
        "shown": len(order),
        "total": len(classes),
    }


def _stat_title(col: str) -> str:
    for m in METHODS:
        if col.startswith(m + "_"):
            return f"{METHOD_TITLES[m]} {col[len(m) + 1 :].replace('_', ' ')}"
    return col.replace("_", " ")


def _agree_title(col: str) -> str:
    rest = col[len("agree_") :]
    for a in METHODS:
        for b in METHODS:
            if rest == f"{a}_{b}":
                return f"{METHOD_TITLES[a]}–{METHOD_TITLES[b]}"
    return rest


def error_rows(fs, files: list[str], limit: int = ERRORS_LISTED, threads: int = 8) -> dict:
    """Every error row's id and message (reads only ``id``, ``status``, ``error``). Returns
    {"total": n, "messages": [(message, count)] commonest first, "rows": [(id, message)] (the
    first ``limit`` in file order)}."""
    import pyarrow.parquet as pq

    def one(path: str) -> pa.Table:
        with fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["id", "status", "error"])
        return t.filter(pc.equal(t["status"], "error"))

    with ThreadPoolExecutor(max(1, min(threads, len(files) or 1))) as ex:
        tables = [t for t in ex.map(one, files) if t.num_rows]
    if not tables:
        return {"total": 0, "messages": [], "rows": []}
    t = pa.concat_tables(tables)
    msgs = t["error"].to_pylist()
    counts: dict[str, int] = {}
    for m in msgs:
        counts[m] = counts.get(m, 0) + 1
    return {
        "total": t.num_rows,
        "messages": sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])),
        "rows": list(zip(t["id"].to_pylist()[:limit], msgs[:limit], strict=True)),
    }
