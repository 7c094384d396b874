"""``xai-audit summarize`` and ``xai-audit report``: the per-class summary, the HTML audit report.

::

    xai-audit summarize <output> [--s3-endpoint URL] [--recompute]
    xai-audit report <output> [--sample N] [--top K] [--max-classes M] [--seed S]
                     [--s3-endpoint URL]

``summarize`` writes ``<output>/summary/summary.parquet`` (``xai_workers.summary``) from the
partials the run wrote, reading the attribution parts only where a partial is missing
(``--recompute``: read every part).

``report`` writes ``<output>/report/index.html`` and its pictures (``report/img/*.png``): a static
page, no script, no server, no external URL. It shows the run (``manifest.json``), what stands
out (classes whose maps put clearly more mass in the border than the other classes), the
per-class mean maps (from the summary, computed first when missing), galleries of the rows that
most deserve a look, and the per-class table. The galleries come from a streaming top-k over
the scalar columns of at most ``--sample`` rows (whole part files in a seeded random order;
0 = every row); the tensors are then read for the chosen rows only (their row groups), and the
images from the run's input (``source`` / ``source_row`` of the row, preprocessed as the model saw
them). Nothing else reads a tensor column, so a report on ten million rows takes minutes.

See docs/report.md for how to read it.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Rows scanned for the galleries by default (whole part files; 0 = all).
DEFAULT_SAMPLE = 1_000_000
DEFAULT_TOP = 8
DEFAULT_MAX_CLASSES = 24
#: Tile side in the galleries (CSS pixels).
TILE = 132
#: Side of a class map tile.
CLASS_TILE = 96
#: Overlay: heatmap opacity over the image.
OVERLAY_ALPHA = 0.55
#: Display scaling of an overlay: the map divided by this percentile of its values.
OVERLAY_PERCENTILE = 99.5
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
METHODS = (
    "saliency", "integrated_gradients", "gradcam", "cam", "gradcam_pp", "xgradcam", "layercam",
    "eigencam", "smoothgrad", "smoothgrad_sq", "vargrad",
)  # fmt: skip
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


def _log(msg: str) -> None:
    print(f"[xai-audit] {msg}", file=sys.stderr, flush=True)


def _err(msg: str) -> None:
    print(f"xai-audit: error: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_subcommands(subparsers) -> None:
    """Register ``summarize`` and ``report`` on an argparse subparsers object. Each parser sets
    ``handler`` (``summarize_main`` / ``report_main``), which takes the parsed namespace and
    returns the exit code."""
    p = subparsers.add_parser(
        "summarize",
        help="write <output>/summary/summary.parquet (per-class summary)",
        description="Per-class summary of an output: counts, accuracy, statistics (mean, "
        "p5/p50/p95) and mean Grad-CAM/IG maps at 32x32. Uses the partials the run wrote; "
        "reads the attribution files only where a partial is missing.",
    )
    p.add_argument("output", metavar="OUTPUT", help="the run's --output (folder or s3:// prefix)")
    p.add_argument("--s3-endpoint", metavar="URL", default=None)
    p.add_argument("--recompute", action="store_true", help="ignore the partials, read every part")
    p.set_defaults(handler=summarize_main)

    r = subparsers.add_parser(
        "report",
        help="write <output>/report/index.html (the audit report)",
        description="Static HTML audit report of an output: the run, the per-class mean maps, "
        "and galleries of the rows that most deserve a look.",
    )
    r.add_argument("output", metavar="OUTPUT", help="the run's --output (folder or s3:// prefix)")
    r.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                   help=f"rows scanned for the galleries (whole part files in a random order; "
                   f"default {DEFAULT_SAMPLE:,}; 0 = all)")  # fmt: skip
    r.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K",
                   help=f"images per gallery (default {DEFAULT_TOP})")  # fmt: skip
    r.add_argument("--max-classes", type=int, default=DEFAULT_MAX_CLASSES, metavar="M",
                   help=f"classes shown as mean maps (default {DEFAULT_MAX_CLASSES}; standouts "
                   "first)")  # fmt: skip
    r.add_argument("--seed", type=int, default=0, help="seed of the sample's file order")
    r.add_argument("--visualizations", metavar="URI", default=None,
                   help="an `xai-audit visualize --output` whose prototypes to show (default: "
                   "OUTPUT itself, when it holds visualizations/)")  # fmt: skip
    r.add_argument("--s3-endpoint", metavar="URL", default=None)
    r.set_defaults(handler=report_main)


def summarize_main(args: argparse.Namespace) -> int:
    """``xai-audit summarize``: 0 when the summary is written, 2 when there is no output."""
    from xai_workers import summary as SM

    t0 = time.monotonic()
    try:
        table = SM.summarize_output(
            args.output,
            getattr(args, "s3_endpoint", None),
            use_partials=not getattr(args, "recompute", False),
            log=_log,
        )
    except FileNotFoundError as e:
        _err(str(e))
        return 2
    n = table.filter(pc.equal(table["group_by"], "pred_class")).num_rows
    print(
        f"summary: {table.schema.metadata.get(b'rows', b'?').decode()} rows, {n} predicted "
        f"classes in {time.monotonic() - t0:.1f} s -> {SM.summary_uri(args.output)}",
        flush=True,
    )
    return 0


def report_main(args: argparse.Namespace) -> int:
    """``xai-audit report``: 0 when the report is written, 2 when there is no output."""
    try:
        res = build_report(
            args.output,
            sample=getattr(args, "sample", DEFAULT_SAMPLE),
            top=getattr(args, "top", DEFAULT_TOP),
            max_classes=getattr(args, "max_classes", DEFAULT_MAX_CLASSES),
            seed=getattr(args, "seed", 0),
            s3_endpoint=getattr(args, "s3_endpoint", None),
            visualizations=getattr(args, "visualizations", None),
        )
    except FileNotFoundError as e:
        _err(str(e))
        return 2
    print(f"report: {res.index}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# galleries: streaming top-k over scalar columns
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# the images, as the model saw them
# --------------------------------------------------------------------------------------------


def load_images(
    manifest: dict | None, rows: list[dict], s3_endpoint: str | None = None
) -> list[np.ndarray | None]:
    """The model-input view of each row's image: float32 (H, W, 3) in [0, 1] (decoded,
    resized/cropped as the run did, no normalization), or None when the input cannot be read.

    The row's ``source`` (file relative to the input root) and ``source_row`` locate it in the
    input recorded in the manifest (``input.root``, ``input.kind``, ``input.image_column``,
    ``model.preprocessing``)."""
    import pyarrow.parquet as pq

    from jobs.sources.parquet import image_bytes
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
        fs, root_path = filesystem(root, s3_endpoint)
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
    image_kind = inp.get("image_kind") or "binary"  # HF structs, references (jobs.sources)
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("source") is not None:
            by_source.setdefault(r["source"], []).append(i)
    for rel, idxs in by_source.items():
        try:
            if kind == "webdataset":
                from jobs.sources.webdataset import sample_images

                got = sample_images(uri_of(rel), {int(rows[i]["source_row"]) for i in idxs},
                                    s3_endpoint)  # fmt: skip
                for i in idxs:
                    data = got.get(int(rows[i]["source_row"]))
                    out[i] = decode(data) if data is not None else None
                continue
            if kind == "images":
                data = read_bytes(uri_of(rel), s3_endpoint)
                for i in idxs:
                    out[i] = decode(data)
                continue
            pafs, path = pyarrow_filesystem(uri_of(rel), s3_endpoint)
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
                    data, _ = image_bytes(value, image_kind, uri_of(rel).rsplit("/", 1)[0],
                                          s3_endpoint)  # fmt: skip
                    out[i] = decode(data) if data is not None else None
        except Exception:  # noqa: BLE001 - a missing input file costs its pictures only
            continue
    return out


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _resize_float(m: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(m, dtype=np.float32), mode="F")
    res = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(img.resize((size, size), res), dtype=np.float32)


def _image_tile(image: np.ndarray | None, size: int) -> np.ndarray:
    """(H, W, 3) float [0, 1] or None -> (size, size, 3) float [0, 1] (None: mid gray)."""
    from PIL import Image

    if image is None:
        return np.full((size, size, 3), 0.5, np.float32)
    u8 = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(u8, mode="RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float32) / 255.0


def display_scale(m: np.ndarray) -> np.ndarray:
    """A 2-D map >= 0 scaled for display: ``m / percentile(m, 99.5)`` clipped to [0, 1] (zeros
    for an all-zero map)."""
    m = np.nan_to_num(np.asarray(m, np.float64))
    top = float(np.percentile(m, OVERLAY_PERCENTILE)) if m.size else 0.0
    if not top > 0:
        top = float(m.max()) if m.size else 0.0
    return np.clip(m / top, 0, 1) if top > 0 else np.zeros_like(m)


def deviation(m: np.ndarray) -> np.ndarray:
    """``|m - median(m)|`` divided by its largest value, in [0, 1] (zeros for a constant map):
    where the map departs from its typical value."""
    m = np.nan_to_num(np.asarray(m, np.float64))
    d = np.abs(m - np.median(m))
    top = d.max() if d.size else 0.0
    return d / top if top > 0 else np.zeros_like(d)


def overlay(image: np.ndarray | None, m: np.ndarray, size: int = TILE, cmap: str = "inferno",
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:  # fmt: skip
    """uint8 (size, size, 3): the colormapped ``m`` (already in [0, 1]) over the image with
    opacity ``alpha`` (image None: over mid gray)."""
    base = _image_tile(image, size)
    heat = _cmap(cmap)(np.clip(_resize_float(m, size), 0, 1))[..., :3]
    out = (1 - alpha) * base + alpha * heat
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def class_map_tile(share: np.ndarray, size: int = CLASS_TILE, cmap: str = "inferno") -> np.ndarray:
    """uint8 (size, size, 3): a class's mean share map (32x32), scaled by its own max, nearest
    upscaled, with the border band (the outer 10% that ``border_frac`` measures) dotted."""
    from xai_workers.stats import border_width

    m = np.nan_to_num(np.asarray(share, np.float64))
    top = m.max()
    m = m / top if top > 0 else m
    rgb = _cmap(cmap)(_resize_float(m, size, nearest=True))[..., :3]
    rgb = (rgb * 255).round().astype(np.uint8)
    h = m.shape[0]
    b = round(border_width(h) * size / h)
    dots = np.arange(1, size, 3)
    light = (rgb.astype(np.uint16) + 2 * 255) // 3  # two thirds of the way to white
    for line in (b, size - b - 1):
        rgb[line, dots] = light[line, dots]
        rgb[dots, line] = light[dots, line]
    return rgb


def colorbar(cmap: str = "inferno", width: int = 256, height: int = 12) -> np.ndarray:
    """uint8 (height, width, 3): the colormap from 0 (left) to 1 (right)."""
    ramp = _cmap(cmap)(np.linspace(0, 1, width))[None, :, :3].repeat(height, axis=0)
    return (ramp * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


@dataclass
class ReportResult:
    """What ``build_report`` wrote: the index URI, the files (relative to ``report/``), each
    gallery's rows (dicts of every column, tensors as numpy arrays), the rows
    scanned for the galleries and in the output, and the standout classes."""

    index: str
    files: list[str]
    galleries: dict[str, list[dict]]
    rows_scanned: int
    rows_total: int
    standouts: list[dict]
    errors: dict = field(default_factory=dict)


@dataclass
class Card:
    """One gallery entry: the row's values, its image and where its tiles are."""

    gallery: str
    rank: int
    score: float
    row: dict
    tiles: dict = field(default_factory=dict)


def _read_manifest(output: str, s3_endpoint: str | None) -> dict | None:
    from xai_workers.storage import join_uri, read_bytes

    try:
        return json.loads(read_bytes(join_uri(output, "manifest.json"), s3_endpoint).decode())
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


def build_report(
    output: str,
    *,
    sample: int | None = DEFAULT_SAMPLE,
    top: int = DEFAULT_TOP,
    max_classes: int = DEFAULT_MAX_CLASSES,
    seed: int = 0,
    s3_endpoint: str | None = None,
    threads: int = 8,
    log: Callable[[str], None] = _log,
    visualizations: str | None = None,
) -> ReportResult:
    """Write ``<output>/report/index.html`` and its pictures (``report/img/*.png``).

    ``sample``: rows scanned for the galleries (whole part files, seeded random order; 0 or None
    = every row); ``top``: cards per gallery; ``max_classes``: classes shown as mean maps.
    Raises FileNotFoundError when ``<output>/attributions`` holds no part files."""
    import pyarrow.parquet as pq

    from xai_workers import summary as SM
    from xai_workers.storage import join_uri, pyarrow_filesystem

    t0 = time.monotonic()
    attr = join_uri(output, SM.ATTRIBUTIONS_DIR)
    files = SM.list_parquet(attr, s3_endpoint)
    if not files:
        raise FileNotFoundError(f"no attribution files in {attr}")
    fs, _ = pyarrow_filesystem(attr, s3_endpoint)
    manifest = _read_manifest(output, s3_endpoint)

    try:
        summary = SM.read_summary(output, s3_endpoint)
    except (FileNotFoundError, OSError):
        log("no summary yet: computing it (xai-audit summarize)")
        summary = SM.summarize_output(output, s3_endpoint, log=log)

    with fs.open_input_file(files[0]) as f:
        schema = pq.ParquetFile(f).schema_arrow
    names = list(schema.names)
    if not _label_is_int(schema):
        names = [n for n in names if n != "label"]
    galleries = galleries_for(names)
    all_row = (_rows(summary, "all") or [{}])[0]
    total_rows = int(all_row.get("count", 0) + all_row.get("errors", 0))
    tops, scanned, n_files = _sampled_scan(
        fs, files, galleries, top, sample or 0, total_rows, seed, threads
    )
    log(f"galleries from {scanned} of {total_rows} rows ({n_files} of {len(files)} files)")

    wanted = {(int(f), int(r)) for t in tops.values() for f, r in zip(t.file, t.row, strict=True)}
    rows = fetch_rows(fs, files, wanted, threads)
    keys = sorted(rows)
    images = dict(zip(keys, load_images(manifest, [rows[k] for k in keys], s3_endpoint),
                      strict=True))  # fmt: skip
    methods = [m for m in METHODS if m in names]

    files_out: dict[str, bytes] = {}
    tile_names: dict[tuple[int, int], dict] = {}
    for n, k in enumerate(keys):
        row, image = rows[k], images[k]
        t = {}
        name = f"img/r{n:03d}"
        files_out[f"{name}-image.png"] = _png(
            (_image_tile(image, TILE) * 255).round().astype(np.uint8)
        )
        t["image"] = f"{name}-image.png"
        for m in methods:
            value = row.get(m)
            if value is None:
                continue
            m2 = _map2d(m, value, (manifest or {}).get("output", {}).get("store", "full"))
            files_out[f"{name}-{m}-overlay.png"] = _png(overlay(image, display_scale(m2)))
            files_out[f"{name}-{m}-dev.png"] = _png(
                overlay(image, deviation(m2), cmap="viridis", alpha=0.8)
            )
            t[m] = (f"{name}-{m}-overlay.png", f"{name}-{m}-dev.png")
        tile_names[k] = t
    cards = {
        g.key: [
            Card(g.key, i + 1, float(s), rows[(int(f), int(r))], tile_names[(int(f), int(r))])
            for i, (s, f, r) in enumerate(
                zip(tops[g.key].score, tops[g.key].file, tops[g.key].row, strict=True)
            )  # fmt: skip
        ]
        for g in galleries
    }

    class_maps = _class_maps(summary, max_classes, files_out)
    errors = error_rows(fs, files, threads=threads) if all_row.get("errors") else None
    from jobs.report_visualizations import visualization_section

    vis_html = visualization_section(
        output, visualizations=visualizations, class_maps=class_maps, files_out=files_out,
        manifest=manifest, fs=fs, files=files, label_is_int=_label_is_int(schema),
        s3_endpoint=s3_endpoint, log=log,
    )  # fmt: skip
    files_out["img/colorbar-inferno.png"] = _png(colorbar("inferno"))
    files_out["img/colorbar-viridis.png"] = _png(colorbar("viridis"))
    page = render_html(
        output=output,
        manifest=manifest,
        summary=summary,
        galleries=galleries,
        cards=cards,
        class_maps=class_maps,
        methods=methods,
        scanned=scanned,
        total_rows=total_rows,
        sample=sample,
        has_images=any(v is not None for v in images.values()),
        errors=errors,
        visualizations=vis_html,
    )
    files_out["index.html"] = page.encode("utf-8")
    report_dir = join_uri(output, "report")
    _write_files(report_dir, files_out, s3_endpoint)
    log(f"report with {len(files_out)} files in {time.monotonic() - t0:.1f} s -> {report_dir}")
    return ReportResult(
        index=join_uri(report_dir, "index.html"),
        files=sorted(files_out),
        galleries={k: [c.row for c in v] for k, v in cards.items()},
        rows_scanned=scanned,
        rows_total=total_rows,
        standouts=standouts(summary),
        errors=errors or {"total": 0, "messages": [], "rows": []},
    )


def _map2d(method: str, value: np.ndarray, store: str = "full") -> np.ndarray:
    """A row's tensor -> its 2-D map (first target with topk). Under the ``compact`` profile IG
    is stored summed over channels (signed): shown as ``|sum_c IG[c]|``."""
    import torch

    from xai_workers.stats import map_2d

    v = np.asarray(value, np.float32)
    if store == "compact" or (method == "integrated_gradients" and v.ndim == 2):
        # compact: (M, M), or (K, M, M) with topk
        v = v[0] if v.ndim == 3 else v
        return np.abs(v) if method == "integrated_gradients" else v
    base = 3 if method == "integrated_gradients" else 2
    if v.ndim == base + 1:
        v = v[0]
    return map_2d(method, torch.from_numpy(np.ascontiguousarray(v))).numpy()


def _write_files(folder: str, files: dict[str, bytes], s3_endpoint: str | None) -> None:
    """Write ``files`` (relative name -> bytes) under ``folder``; index.html last."""
    from xai_workers.storage import join_uri, open_file

    def put(name: str) -> None:
        with open_file(join_uri(folder, name), "wb", s3_endpoint=s3_endpoint) as f:
            f.write(files[name])

    names = [n for n in files if n != "index.html"]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(put, names))
    if "index.html" in files:
        put("index.html")


# --------------------------------------------------------------------------------------------
# summary -> class maps, standouts, table
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
:root { --ink:#1d2430; --muted:#5b6573; --line:#e3e7ee; --bg:#f6f7f9; --card:#fff;
        --accent:#b4231b; --ok:#1f7a3a; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 2px; }
h2 { font-size: 20px; margin: 34px 0 6px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 16px; margin: 16px 0 6px; }
p.lead, .muted { color: var(--muted); }
p.lead { margin: 2px 0 14px; }
code { font: 13px/1.3 ui-monospace, "DejaVu Sans Mono", monospace; background:#eef1f5;
       padding: 1px 4px; border-radius: 3px; }
.kpis { display:flex; flex-wrap:wrap; gap:10px; margin: 12px 0 4px; }
.kpi { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:8px 14px;
       min-width: 120px; }
.kpi b { display:block; font-size: 20px; }
.kpi span { color: var(--muted); font-size: 13px; }
.findings { background:#fff5f4; border:1px solid #f1c9c5; border-radius:8px; padding: 10px 16px;
            margin: 14px 0; }
.findings.calm { background:#f3f8f4; border-color:#cfe3d4; }
.findings h3 { margin: 4px 0 6px; }
.findings ul { margin: 0; padding-left: 20px; }
.findings li { margin: 3px 0; }
.mapgrid { display:flex; flex-wrap:wrap; gap: 10px 12px; }
.mapcell { width: 102px; text-align:center; font-size: 13px; line-height: 1.3; }
.mapcell img { display:block; width:102px; height:102px; image-rendering: pixelated;
               border-radius: 4px; border: 3px solid transparent; }
.mapcell.flag img { border-color: var(--accent); }
.mapcell.flag .c { color: var(--accent); font-weight: 700; }
.mapcell .c { font-weight: 600; }
.mapcell .s { color: var(--muted); font-size: 12px; }
.legend { display:flex; align-items:center; gap:8px; font-size:12px; color:var(--muted);
          margin: 6px 0 4px; }
.legend img { width: 160px; height: 10px; border-radius: 2px; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(572px, 1fr)); gap: 14px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px;
        padding: 10px 12px; }
.card .head { display:flex; justify-content:space-between; gap: 8px; font-size: 14px;
              margin-bottom: 6px; }
.card .head .id { color: var(--muted); overflow:hidden; text-overflow:ellipsis; white-space:nowrap;
                  max-width: 260px; }
.wrong { color: var(--accent); font-weight: 700; }
.right { color: var(--ok); font-weight: 700; }
.tiles { display:grid; grid-template-columns: repeat(4, 132px); gap: 6px 6px; }
.tiles img { width: 132px; height: 132px; display:block; border-radius: 3px; }
.tiles .lab { font-size: 12px; color: var(--muted); text-align: center; }
.tiles .rowlab { font-size: 12px; color: var(--muted); display:flex; align-items:center;
                 justify-content:center; text-align:center; }
.stats { font-size: 12.5px; line-height: 1.45; padding: 2px 4px 0; }
.stats div { display:flex; justify-content:space-between; gap: 6px; }
.agree { font-size: 12.5px; color: var(--muted); margin-top: 6px; }
.agree b { color: var(--ink); font-weight: 600; }
.agree .hot b { color: var(--accent); }
.stats b { font-weight: 600; }
.hot { color: var(--accent); font-weight: 700; }
table.classes { border-collapse: collapse; background: var(--card); font-size: 13.5px; }
table.classes th, table.classes td { border: 1px solid var(--line); padding: 4px 9px;
                                     text-align: right; }
table.classes th { background: #eef1f5; }
table.classes td.good { background: #e3f4e6; }
table.classes td.flag { background: #fde3e0; color: var(--accent); font-weight: 700; }
dl.run { display:grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 8px 0; }
dl.run dt { color: var(--muted); }
dl.run dd { margin: 0; }
details { margin: 10px 0; }
pre { background: #fff; border: 1px solid var(--line); padding: 10px; overflow: auto;
      font-size: 12px; max-height: 480px; }
"""


_HOT = ' class="hot"'


def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def _num(v, digits: int = 2, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _adaptive_ig_items(all_row: dict) -> list[str]:
    """--ig-steps auto: the error estimate beside the completeness error, and the steps."""
    if all_row.get("ig_error_est_p50") is None:
        return []
    conv = all_row.get("ig_converged_mean")
    steps = [all_row.get(f"ig_steps_p{q}") for q in (5, 50, 95)]
    return [
        f"<li>IG error estimate (relative L2 error of the IG map, --ig-steps auto; the "
        f"completeness error above understates it on ReLU networks): median "
        f"{_pct(all_row['ig_error_est_p50'])}, 95th percentile "
        f"{_pct(all_row.get('ig_error_est_p95'))}; "
        f"{_pct(conv)} of rows converged.</li>",
        "<li>IG steps per image: median {:.0f}, 5th–95th percentile {:.0f}–{:.0f}.</li>".format(
            *[math.nan if v is None else v for v in steps]
        ),
    ]


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


def _fmt_seconds(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 120:
        return f"{s:.1f} s"
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def _run_section(manifest: dict | None, output: str) -> tuple[str, str]:
    """(KPI strip, details) HTML for the run."""
    if not manifest:
        return (
            '<p class="muted">No manifest.json in this output: run details unknown.</p>',
            "",
        )
    counts = manifest.get("counts") or {}
    timing = manifest.get("timing") or {}
    cfg = manifest.get("config") or {}
    model = manifest.get("model") or {}
    kpis = [
        (manifest.get("status", "?"), "status"),
        (f"{counts.get('rows_total', counts.get('rows_written', '?')):,}"
         if isinstance(counts.get("rows_total"), int) else "?", "rows"),
        (f"{counts.get('rows_ok', '?'):,}" if isinstance(counts.get("rows_ok"), int) else "?",
         "ok"),
        (f"{counts.get('rows_error', '?'):,}" if isinstance(counts.get("rows_error"), int)
         else "?", "errors"),
        (_fmt_seconds(timing.get("wall_s")), "wall time"),
        (f"{timing['images_per_s']:.1f}" if timing.get("images_per_s") else "–", "images / s"),
    ]  # fmt: skip
    strip = (
        '<div class="kpis">'
        + "".join(f'<div class="kpi"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in kpis)
        + "</div>"
    )
    ig = f"{cfg.get('ig_steps')} steps, {cfg.get('ig_method')}, baseline {cfg.get('ig_baseline')}"
    pre = model.get("preprocessing") or {}
    items = [
        ("model", f"{model.get('spec') or cfg.get('model')}"
                  + (f" (weights {cfg.get('weights')})" if cfg.get("weights") else "")),
        ("model sha256", (model.get("checksum_sha256") or "–")[:16]),
        ("classes", model.get("num_classes")),
        ("methods", ", ".join(cfg.get("methods") or [])),
        ("target / score", f"{cfg.get('target')} / {cfg.get('score')}"),
        ("Integrated Gradients", ig),
        ("Grad-CAM layer", model.get("gradcam_layer") or cfg.get("gradcam_layer")),
        ("input", f"{cfg.get('input')}"),
        ("image size", f"{pre.get('image_size')} (mean {pre.get('mean')}, std {pre.get('std')})"),
        ("precision", cfg.get("precision")),
        ("output", output),
        ("started / finished", f"{manifest.get('started_at', '–')} / "
                               f"{manifest.get('finished_at', '–')}"),
        ("pipeline time", _fmt_seconds(timing.get("pipeline_s"))),
        ("runs", len(manifest.get("runs") or []) or 1),
    ]  # fmt: skip
    if manifest.get("error"):
        items.append(("error", manifest["error"]))
    versions = manifest.get("versions") or {}
    if versions:
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    dl = (
        '<dl class="run">'
        + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
        + "</dl>"
    )
    raw = json.dumps(manifest, indent=2, default=str)
    details = dl + f"<details><summary>manifest.json</summary><pre>{_e(raw)}</pre></details>"
    return strip, details


def _findings(
    summary: pa.Table, stand: list[dict], manifest: dict | None = None, errors: dict | None = None
) -> str:
    """The findings box: red ("What stands out") when any finding holds, green otherwise.

    Findings: a class whose maps put much mass in the border (:func:`standouts`: absolute or
    relative to the other classes), error rows above ERROR_SHARE_FINDING of all rows, an IG
    completeness error p95 above IG_ERROR_FINDING, a network with random weights."""
    all_row = (_rows(summary, "all") or [{}])[0]
    cfg = (manifest or {}).get("config") or {}
    names = {r["class"]: r.get("name") for r in _rows(summary, map_group(summary))}
    hot_items, items = [], []
    if cfg.get("weights") == "random":
        hot_items.append(
            '<li><b class="hot">Random weights</b>: this run explains a randomly initialised '
            f"network (--weights random, seed {_e(cfg.get('seed'))}). Its maps say nothing about "
            "a trained model.</li>"
        )
    by_class: dict = {}
    for d in stand:
        by_class.setdefault(d["class"], []).append(d)
    prefer = {m: i for i, m in enumerate(CLASS_MAP_METHODS)}
    for c, ds in by_class.items():
        said = []
        for d in sorted(ds, key=lambda d: prefer.get(d["method"], 9)):
            if math.isfinite(d["others_median"]):
                ratio = "" if not math.isfinite(d["ratio"]) else f", {d['ratio']:.1f}×"
                other = f"other classes: median {_pct(d['others_median'])}{ratio}"
            else:
                other = "no other classes to compare with"
            said.append(
                f"{METHOD_LONG[d['method']]} puts <b>{_pct(d['value'])}</b> of its mass in the "
                f"border ({other}; the band is {_pct(BORDER_AREA)} of the image)"
            )
        hot_items.append(
            f'<li><b class="hot">Class {_e(_cls(c, names.get(c)))}</b>: '
            + "; ".join(said)
            + ". Look at its mean "
            "maps below and at the border gallery: the model may be using something in the "
            "border (a mark, a frame, a watermark) rather than the object.</li>"
        )
    count, n_err = all_row.get("count", 0) or 0, all_row.get("errors", 0) or 0
    if n_err:
        share = n_err / max(1, count + n_err)
        text = (f"<b>{n_err:,}</b> rows ({_pct(share)}) could not be explained: they are listed "
                'with their messages under <a href="#errors">Error rows</a>.')  # fmt: skip
        if share > ERROR_SHARE_FINDING:
            hot_items.append(f'<li><b class="hot">Error rows</b>: {text}</li>')
        else:
            items.append(f"<li>{text}</li>")
    acc = all_row.get("accuracy")
    if acc is not None:
        items.append(f"<li>Accuracy against the labels: <b>{_pct(acc)}</b> of "
                     f"{all_row.get('labeled', 0):,} labelled rows.</li>")  # fmt: skip
    p50, p95 = all_row.get("ig_rel_error_p50"), all_row.get("ig_rel_error_p95")
    if p50 is not None:
        line = (
            f"IG completeness error (|sum(IG) − (F(x) − F(x'))| / max(|F(x) − F(x')|, |F(x)|)): "
            f"median {_pct(p50)}, 95th percentile <b>{_pct(p95)}</b>"
        )
        if p95 is not None and p95 > IG_ERROR_FINDING:
            hot_items.append(f'<li><b class="hot">IG</b>: {line} — above '
                             f"{_pct(IG_ERROR_FINDING)}: more --ig-steps would make IG more "
                             "faithful.</li>")  # fmt: skip
        else:
            items.append(f"<li>{line}.</li>")
    if cfg.get("ig_baseline") == "black" and "integrated_gradients_border_frac_mean" in all_row:
        items.append(
            "<li>IG's baseline is black: IG is zero wherever the image itself is black "
            "(x = x' there), so on black borders IG's border share is 0 by construction; read "
            "Grad-CAM's there.</li>"
        )
    items += _adaptive_ig_items(all_row)
    agrees = [k for k in all_row if k.startswith("agree_") and k.endswith("_mean")]
    if agrees:
        parts = ", ".join(
            f"{_agree_title(k[: -len('_mean')])} {_num(all_row[k], signed=True)}" for k in agrees
        )
        items.append(f"<li>Mean rank agreement between methods: {parts}.</li>")
    calm = not hot_items
    title = (
        f"Nothing stands out (border share below {_pct(BORDER_ABSOLUTE)} and not unusual between "
        f"classes, error rows at most {_pct(ERROR_SHARE_FINDING)}, IG error p95 at most "
        f"{_pct(IG_ERROR_FINDING)})"
        if calm
        else "What stands out"
    )
    return (
        f'<div class="findings{" calm" if calm else ""}"><h3>{title}</h3><ul>'
        + "".join(hot_items + items)
        + f'</ul><p class="muted" style="margin:6px 0 0">{count:,} rows explained.</p></div>'
    )


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


def _errors_section(errors: dict | None) -> str:
    if not errors or not errors["total"]:
        return ""
    common = "".join(f"<tr><td>{n:,}</td><td>{_e(m)}</td></tr>" for m, n in errors["messages"][:20])
    rows = "".join(f"<tr><td><code>{_e(i)}</code></td><td>{_e(m)}</td></tr>"
                   for i, m in errors["rows"])  # fmt: skip
    more = (
        f" The first {len(errors['rows'])} are listed; all are in the output "
        "(<code>status = 'error'</code>)."
        if errors["total"] > len(errors["rows"])
        else ""
    )
    return (
        f'<h2 id="errors">Error rows</h2><p class="lead">{errors["total"]:,} rows could not be '
        f"explained; each is a row of the output with its message.{more}</p>"
        f'<table class="classes"><tr><th>rows</th><th>message</th></tr>{common}</table>'
        f'<details><summary>rows (id, message)</summary><table class="classes">'
        f"<tr><th>id</th><th>message</th></tr>{rows}</table></details>"
    )


def _target_note(manifest: dict | None) -> str:
    """What the drawn maps explain, from the run's --target."""
    target = str(((manifest or {}).get("config") or {}).get("target") or "predicted")
    if target.startswith("topk:"):
        k = target.split(":", 1)[1]
        return (f"With --target {target} every row has {k} maps per method, one per target; "
                "this page draws and groups the first (each image's top-1 class). All "
                f"{k} are in the output.")  # fmt: skip
    if target == "predicted":
        return "Maps explain each image's predicted class (--target predicted)."
    if target == "label":
        return ("Maps explain each image's label (--target label), which is not always the "
                "predicted class: classes here are the labels.")  # fmt: skip
    return f"Maps explain class {_e(target)} for every image (--target {_e(target)})."


def _class_map_section(cm: dict, manifest: dict | None = None) -> str:
    if not cm["methods"]:
        return '<p class="muted">The output has no Grad-CAM, IG or CAM maps.</p>'
    parts = []
    note = (
        f" Showing {cm['shown']} of {cm['total']} classes (standouts and the largest border "
        "shares first); every class is in summary.parquet."
        if cm["shown"] < cm["total"]
        else ""
    )
    parts.append(
        '<p class="lead">Where the model looks, per class explained: the mean over the images '
        "whose maps explain that class (the target) of each map, as a share of the map's total "
        f"(32x32, every image weighs the same). {_target_note(manifest)} Tiles are "
        "scaled to their own maximum. The dotted line marks the border band (outer "
        f"10%) that the border share measures.{note}</p>"
        '<div class="legend">0<img src="img/colorbar-inferno.png" alt="colour scale">'
        "tile maximum</div>"
    )
    for m in cm["methods"]:
        cells = []
        for c in cm["classes"]:
            info = cm["info"][c]
            flag = c in cm["flagged"]
            b = info["border"].get(m)
            cells.append(
                f'<div class="mapcell{" flag" if flag else ""}">'
                f'<img src="{_e(cm["tiles"][(m, c)])}" alt="class {c} mean {m} map">'
                f'<div class="c">explains {_e(_cls(c, info.get("name")))}</div>'
                f'<div class="s">n={info["count"]:,}<br>border {_pct(b)}</div></div>'
            )
        parts.append(f'<h3>{METHOD_LONG[m]}</h3><div class="mapgrid">{"".join(cells)}</div>')
    return "".join(parts)


def _card(card: Card, methods: list[str], gallery: Gallery) -> str:
    """One gallery card: header (rank, prediction, label, id), a 4-column grid (image and one
    column per method): overlays, |map - median| views, the statistics under their method, and
    the rank agreements. The gallery's ranking statistics are highlighted."""
    r = card.row
    pred, label, prob = r.get("pred_class"), r.get("label"), r.get("pred_prob")
    if label is not None and isinstance(label, int):
        verdict = (
            '<span class="right">✓ correct</span>'
            if label == pred
            else '<span class="wrong">✗ wrong</span>'
        )
        lab = f"label <b>{_e(label)}</b> {verdict}"
    else:
        lab = "no label"
    target = r.get("target")
    tname = r.get("target_name")
    if isinstance(target, (list, tuple)):
        first = _cls(_first(target), _first(tname) if isinstance(tname, list) else None)
        explains = f" · maps explain <b>{_e(first)}</b> (1st of {len(target)} targets)"
    elif target is not None and target != pred:
        explains = f" · maps explain <b>{_e(_cls(target, tname))}</b>"
    else:
        explains = ""
    head = (
        f'<div class="head"><span>#{card.rank} · pred <b>{_e(_cls(pred, r.get("pred_name")))}</b> '
        f"(p={_num(prob)}){explains} · {lab}"
        f'</span><span class="id" title="{_e(r.get("id"))}">{_e(r.get("id"))}</span></div>'
    )
    hot = set(gallery.columns)

    def stat(name: str, text: str, value: str) -> str:
        cls = ' class="hot"' if name in hot else ""
        return f"<div><span>{_e(text)}</span><b{cls}>{value}</b></div>"

    blank = "<div></div>"
    labels = ['<div class="lab">image</div>']
    row1 = [f'<img src="{_e(card.tiles["image"])}" alt="image">']
    row2 = ['<div class="rowlab">|map − median|<br>÷ largest deviation</div>']
    row3 = [
        '<div class="stats">'
        + stat("pred_prob", "prob", _num(prob))
        + (stat("label", "label", _e(label)) if label is not None else "")
        + "</div>"
    ]
    for m in methods:
        labels.append(f'<div class="lab">{METHOD_TITLES[m]}</div>')
        if m in card.tiles:
            ov, dev = card.tiles[m]
            row1.append(f'<img src="{_e(ov)}" alt="{m} overlay">')
            row2.append(f'<img src="{_e(dev)}" alt="{m} |map - median|">')
        else:
            row1.append(blank)
            row2.append(blank)
        lines = []
        for key, text, fmt in (
            (f"{m}_border_frac", "border", _pct),
            (f"{m}_gini", "gini", _num),
        ):
            if key in r:
                lines.append(stat(key, text, fmt(_first(r[key]))))
        if m == "integrated_gradients" and "ig_rel_error" in r:
            lines.append(stat("ig_rel_error", "IG error", _pct(_first(r["ig_rel_error"]))))
        row3.append(f'<div class="stats">{"".join(lines)}</div>')
    filler = blank * max(0, 3 - len(methods))
    agrees = [
        f"<span{_HOT if k in hot else ''}>{_e(_agree_title(k))} "
        f"<b>{_num(_first(r[k]), signed=True)}</b></span>"
        for k in r
        if k.startswith("agree_")
    ]
    agree = f'<div class="agree">rank agreement: {" · ".join(agrees)}</div>' if agrees else ""
    grid = "".join("".join(cells) + filler for cells in (labels, row1, row2, row3))
    return f'<div class="card">{head}<div class="tiles">{grid}</div>{agree}</div>'


def _first(v):
    if isinstance(v, (list, tuple)):
        return v[0] if v else None
    return v


def _cls(index, name: str | None = None) -> str:
    """A class for people: ``name (index)`` when its name is known, else the index."""
    return f"{name} ({index})" if name else str(index)


def _faithfulness_section(summary: pa.Table) -> str:
    """'Which method is faithful for this model': per class (and all rows), each method's mean
    deletion AUC (lower is better) and insertion AUC (higher is better) beside a random pixel
    order's (the floor). Empty when the run had no --faithfulness."""
    rows = _rows(summary, "all") + _rows(summary, map_group(summary))
    if not rows:
        return ""
    metrics = [m for m in ("deletion", "insertion") if f"random_{m}_auc_mean" in rows[0]]
    if not metrics:
        return ""
    methods = [m for m in METHODS if any(f"{m}_{k}_auc_mean" in rows[0] for k in metrics)]
    titles = {**METHOD_TITLES, "random": "random"}
    head = (
        "<tr><th>class</th>"
        + "".join(f"<th>{_e(titles[m])} {k}</th>" for k in metrics for m in [*methods, "random"])
        + "</tr>"
    )
    body = []
    for r in rows:
        name = "all rows" if r.get("class") is None else _cls(r["class"], r.get("name"))
        cells = [f"<td><b>{_e(name)}</b></td>"]
        for k in metrics:
            floor = r.get(f"random_{k}_auc_mean")
            for m in [*methods, "random"]:
                v = r.get(f"{m}_{k}_auc_mean")
                better = (
                    m != "random" and v is not None and floor is not None
                    and (v < floor if k == "deletion" else v > floor)
                )  # fmt: skip
                cls = ' class="good"' if better else ""
                cells.append(f"<td{cls}>{'–' if v is None else _num(v, 3)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<h2 id="faithful">Which method is faithful for this model</h2><p class="lead">Deletion '
        "and insertion (Petsiuk et al. 2018): the target's probability as the pixels a map ranks "
        "first are removed (deletion: lower area is better) or restored into a blurred image "
        "(insertion: higher is better), against a random pixel order (the floor). Green: better "
        "than random. Means per class explained; docs/conventions.md has the definitions.</p>"
        f'<div style="overflow:auto"><table class="classes">{head}{"".join(body)}</table></div>'
    )


def _class_table(summary: pa.Table, stand: list[dict]) -> str:
    rows = _rows(summary, map_group(summary))
    if not rows:
        return '<p class="muted">No ok rows.</p>'
    flagged = {(d["class"], d["method"]) for d in stand}
    cols = [("count", "rows", lambda v: f"{v:,}", None),
            ("accuracy", "accuracy", _pct, None),
            ("pred_prob_mean", "mean prob", _num, None)]  # fmt: skip
    for m in METHODS:
        if f"{m}_border_frac_mean" in rows[0]:
            cols.append((f"{m}_border_frac_mean", f"border {METHOD_TITLES[m]}", _pct, m))
    for m in METHODS:
        if f"{m}_gini_mean" in rows[0]:
            cols.append((f"{m}_gini_mean", f"gini {METHOD_TITLES[m]}", _num, None))
    if "ig_rel_error_p50" in rows[0]:
        cols.append(("ig_rel_error_p50", "IG error p50", _pct, None))
    for k in rows[0]:
        if k.startswith("agree_") and k.endswith("_mean"):
            cols.append((k, f"agree {_agree_title(k[: -len('_mean')])}",
                         lambda v: _num(v, signed=True), None))  # fmt: skip
    head = "<tr><th>class</th>" + "".join(f"<th>{_e(t)}</th>" for _, t, _, _ in cols) + "</tr>"
    body = []
    for r in rows:
        cells = [f"<td><b>{_e(_cls(r['class'], r.get('name')))}</b></td>"]
        for k, _, fmt, m in cols:
            v = r.get(k)
            flag = m is not None and (r["class"], m) in flagged
            text = "–" if v is None else fmt(v)
            attr = ' class="flag"' if flag else ""
            cells.append(f"<td{attr}>{_e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div style="overflow:auto"><table class="classes">{head}{"".join(body)}</table></div>'


def render_html(
    *,
    output: str,
    manifest: dict | None,
    summary: pa.Table,
    galleries: list[Gallery],
    cards: dict[str, list[Card]],
    class_maps: dict,
    methods: list[str],
    scanned: int,
    total_rows: int,
    sample: int | None,
    has_images: bool,
    errors: dict | None = None,
    visualizations: str = "",
) -> str:
    """The page: header and run KPIs, findings, class maps, galleries, class table, run details.
    Self-contained (inline CSS, relative image paths, no script)."""
    strip, details = _run_section(manifest, output)
    stand = standouts(summary)
    model = ((manifest or {}).get("model") or {}).get("spec") or "?"
    cfg = (manifest or {}).get("config") or {}
    if cfg.get("weights") == "random":
        model += f" with RANDOM weights (seed {cfg.get('seed')})"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    errors_note = (
        ' (they are listed under <a href="#errors">Error rows</a>)'
        if errors and errors.get("total")
        else ""
    )
    sampled = (
        f"every row ({scanned:,})"
        if scanned >= total_rows
        else f"a sample of {scanned:,} of {total_rows:,} rows (whole files, --sample {sample})"
    )
    gal_html = []
    for g in galleries:
        cs = cards.get(g.key) or []
        body = (
            '<div class="cards">' + "".join(_card(c, methods, g) for c in cs) + "</div>"
            if cs
            else '<p class="muted">No rows qualify.</p>'
        )
        gal_html.append(f'<h2 id="{g.key}">{_e(g.title)}</h2><p class="lead">{_e(g.what)}</p>'
                        + body)  # fmt: skip
    no_img = (
        ""
        if has_images
        else '<p class="muted">The input images could not be read (input moved or not '
        "reachable): maps are shown over gray.</p>"
    )
    legend = (
        '<p class="lead">Each card: the image as the model saw it; top row, each method\'s map '
        "over the image (inferno, scaled to its 99.5th percentile, opacity 55%); bottom row, "
        "|map − median| scaled by its largest deviation (viridis): where the map departs from "
        "its typical value. Highlighted numbers are the ones the gallery ranks by.</p>"
        '<div class="legend">overlay: low<img src="img/colorbar-inferno.png" alt="inferno">high'
        ' &nbsp; deviation: 0<img src="img/colorbar-viridis.png" alt="viridis">largest</div>'
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>xai-audit report · {_e(output)}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>xai-audit report</h1>
<p class="lead">{_e(model)} · <code>{_e(output)}</code> · generated {_e(now)}</p>
{strip}
{_findings(summary, stand, manifest, errors)}
<h2 id="classes">Mean maps per class explained</h2>
{_class_map_section(class_maps, manifest)}
{visualizations}
<h2 id="galleries" style="border:0;margin-bottom:0">Images that deserve a look</h2>
<p class="lead">Ranked over {sampled}; error rows are left out{errors_note}.
{_target_note(manifest)}</p>
{legend}{no_img}
{"".join(gal_html)}
<h2 id="table">Per class explained</h2>
<p class="lead">Means over the ok rows whose maps explain the class (accuracy: the share of those
rows whose prediction agrees with their label). Red: a border share that stands out. The full
table, with percentiles and the predicted-class and label views, is
<code>summary/summary.parquet</code>.</p>
{_class_table(summary, stand)}
{_faithfulness_section(summary)}
{_errors_section(errors)}
<h2 id="run">The run</h2>
{details}
<p class="muted">How to read this report: docs/report.md in xai-workers.</p>
</main></body></html>
"""


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.report summarize|report ...`` (the same as ``xai-audit``'s)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.report")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_subcommands(sub)
    ns = parser.parse_args(argv)
    return ns.handler(ns)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
