"""Per-class summary of an attribution output: a mergeable accumulator (plain numpy + pyarrow).

The summary is the dataset-level view of where a model looks: one row per predicted class (and per
label when the input has integer labels) with the count, the accuracy, the mean and percentiles of
every per-image statistic and the class's mean Grad-CAM and IG map at 32x32. It is built from the
attribution rows (``xai_workers.schema``) by a :class:`Summary` accumulator that any number of
workers can fill independently and merge in any order with the same result:

    acc = Summary()
    acc.update(batch)                # a pa.Table / pa.RecordBatch of attribution rows
    acc.merge(other)                 # another Summary (exact: sums, counts, fixed-bin histograms)
    part = acc.to_partial()          # small pa.Table, the mergeable state (sparse histograms)
    acc = Summary.from_partial(part)
    table = acc.to_table()           # the final summary, schema ``summary_schema(...)``

In the job (``<output>`` layout of docs/conventions.md), each attribution part file
``<output>/attributions/part-X.parquet`` gets one partial,
``<output>/summary/partials/part-X.parquet`` (:func:`write_partial`, written by the task that
writes the part, right after it, from the same in-memory rows: no second read).
:func:`summarize_output` then merges the partials of exactly the parts present, computes the
partial of any part that has none (an output written before, a partial that failed, a part
rewritten after a crash) by streaming that part, and writes ``<output>/summary/summary.parquet``.
So the summary always adds up to the attribution rows: partials of parts that no longer exist
are ignored, and so are partials older than their part (left by an earlier run).

Summary rows (``to_table``), in this order:

- ``group_by = 'all'``, ``class`` null: every row. ``count`` ok rows, ``errors`` error rows.
- ``group_by = 'pred_class'``, one per predicted class seen: ``count`` ok rows predicted as
  ``class`` (error rows have no prediction: they are only in ``all`` and ``label``). So
  ``sum(count) over pred_class == count of 'all' == rows with status ok``.
- ``group_by = 'label'`` (integer labels only), one per label: ``count`` ok rows with that label,
  ``errors`` error rows with that label. Rows with a null label are in no label group.
- ``group_by = 'target'``, one per class explained (the ``target`` column; the first target with
  ``topk:K``): ``count`` ok rows whose maps explain ``class``. With ``--target predicted`` these
  rows equal the ``pred_class`` ones; with ``label`` or a fixed class they differ, and the mean
  maps of a ``target`` row are the ones that mean something: every map in them explains the
  same class.

Columns: ``labeled`` (ok rows with a label), ``correct`` (of those, ``pred_class == label``),
``accuracy = correct / labeled`` (null without labels; per predicted class this is the precision
of the class, per label its recall). Per statistic ``s`` (every float statistic column of the
output: ``{method}_{gini,entropy,border_frac,com_x,com_y}``, ``ig_rel_error``, ``agree_*``,
``pred_prob``; with ``--ig-steps auto`` also ``ig_error_est``, ``ig_steps`` and
``ig_converged``, whose mean is the share of rows converged): ``s_mean`` (exact, over finite
values; NaN statistics, e.g. of an all-zero map, are left out), ``s_p5``, ``s_p50``,
``s_p95`` (from a fixed-bin histogram, see below). Per method
``m`` in ``MAP_METHODS`` that the output has: ``m_mean_map``, the mean of the rows' 2-D maps
(``stats.map_2d``) after ``adaptive_avg_pool2d`` to 32x32, raw units; and ``m_share_map``, the
mean of each row's pooled map divided by its sum (every image weighs the same; sums to 1; a row
whose map sums to 0 is left out). Both ``fixed_size_list<float32>[1024]`` (32x32 row-major, shape in
the element field's metadata: ``schema.map_type``). With ``topk:K``
targets the first (best) target's statistics and maps are used.

Percentile precision. Each statistic is counted in a fixed histogram (:func:`binning_for`), so
partials merge exactly and in any order. A percentile q is read off the histogram in the bin that
holds the order statistic of rank ``floor(q/100 * (n - 1))`` (numpy's ``percentile(...,
method="lower")``), by linear interpolation inside the bin (geometric for log bins), clamped to
the exact min and max. So it is within one bin of that order statistic: +-0.005 for statistics
in [0, 1] (200 bins: gini, entropy, border_frac, com_x, com_y, pred_prob) and for agreement in
[-1, 1] (400 bins); within a factor 1.047 for log-binned statistics (``ig_rel_error`` and any
other) in [1e-6, 1e6] (600 bins); outside those ranges, between the range's edge and the exact
min/max. With many rows per class this is also within about one bin of numpy's default
(linear) percentile; with few rows, consecutive order statistics can be far apart and the two
definitions differ. Counts, histograms and means are exact; maps are summed in float64 in memory
and stored as float32 sums in partials.

Sizes. In memory: per (group, class) key, 8 bytes x (bins of each statistic + 4 maps x 1024).
With 1000 classes, labels and 20 statistics that is about 130 MB in the driver. A partial holds
only the keys of its rows and only nonzero bins: 16 KB of maps per key present (4 maps of 32x32
float32 sums; float32 is ample for the sum over one part's rows) plus its histogram entries. So
a partial is small when a part holds few classes; a part of 128 shuffled ImageNet rows (about 120
classes, twice with labels) gives about 4 MB, ~3% of its 128 MiB part.
Partials are written (:func:`write_partial`) with BYTE_STREAM_SPLIT + zstd on float columns and
no dictionaries on them: pyarrow's defaults (dictionary-encoded floats, snappy) made the demo's
partials 8.5 MB for 7.3 MB of attributions (27 parts of about 67 rows, every part holding all ten
classes three times over); written so they take 4.7 MB. zstd also finds the ``target`` keys'
maps repeated from ``pred_class`` under ``--target predicted``: leaving them out saves 0.3% more.
"""

from __future__ import annotations

import json
import math
import posixpath
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from xai_workers.schema import is_tensor_type, map_shape_of, map_store_of, map_type, tensor_to_numpy

SUMMARY_VERSION = "1"
#: Side of the per-class mean maps.
MAP_SIZE = 32
#: Methods whose per-class mean map is kept.
MAP_METHODS = ("integrated_gradients", "gradcam", "cam")
#: A column ``_pooled_<method>`` (float64 (N, MAP_SIZE, MAP_SIZE), :func:`pooled_maps` of the
#: full map) is used instead of the method's tensor column when a batch has it: the job's worker
#: adds it, so the summary's maps come from the full maps under every storage profile.
POOLED_PREFIX = "_pooled_"
PERCENTILES = (5, 50, 95)
GROUP_ALL, GROUP_PRED, GROUP_LABEL, GROUP_TARGET = "all", "pred_class", "label", "target"
GROUPS = (GROUP_ALL, GROUP_PRED, GROUP_LABEL, GROUP_TARGET)
#: Folders and files under ``<output>`` (the same names as ``xai_audit.output``).
ATTRIBUTIONS_DIR = "attributions"
SUMMARY_DIR = "summary"
PARTIALS_DIR = "partials"
SUMMARY_FILE = "summary.parquet"
#: Float columns of the output that are not per-image statistics.
NOT_STATISTICS = frozenset({"score", "baseline_score", "ig_delta", "topk_probs"})
#: Integer and bool columns summarized like statistics (``--ig-steps auto``): the distribution of
#: the IG steps, and the share of rows converged (the mean of ``ig_converged``).
COUNT_STATISTICS = frozenset({"ig_steps", "ig_converged"})
_COUNTS = ("count", "errors", "labeled", "correct")


# --------------------------------------------------------------------------------------------
# fixed-bin histograms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binning:
    """A fixed histogram over one statistic: ``bins`` bins between ``lo`` and ``hi``, equal
    width (``linear``) or equal ratio (``log``, ``lo > 0``), plus an underflow bin (index 0,
    values ``< lo``, NaN excluded) and an overflow bin (index ``bins + 1``, values ``> hi``).
    """

    kind: str
    lo: float
    hi: float
    bins: int

    @property
    def size(self) -> int:
        """Number of counters: ``bins + 2``."""
        return self.bins + 2

    def edges(self) -> np.ndarray:
        """float64 (bins + 1,): the bin edges from ``lo`` to ``hi``."""
        if self.kind == "log":
            return np.geomspace(self.lo, self.hi, self.bins + 1)
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def index(self, v: np.ndarray) -> np.ndarray:
        """int64 bin index of each finite value ``v`` (float64, any shape), in [0, bins + 1]."""
        v = np.asarray(v, dtype=np.float64)
        if self.kind == "log":
            with np.errstate(divide="ignore", invalid="ignore"):
                pos = np.log(np.where(v > 0, v, self.lo) / self.lo) / math.log(self.hi / self.lo)
        else:
            pos = (v - self.lo) / (self.hi - self.lo)
        idx = np.floor(pos * self.bins).astype(np.int64) + 1
        idx = np.clip(idx, 1, self.bins)  # the top edge belongs to the last bin
        idx = np.where(v < self.lo, 0, idx)
        return np.where(v > self.hi, self.bins + 1, idx)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi, "bins": self.bins}


#: [0, 1] statistics: bins of 0.005.
UNIT_BINNING = Binning("linear", 0.0, 1.0, 200)
#: rank agreement in [-1, 1]: bins of 0.005.
SIGNED_UNIT_BINNING = Binning("linear", -1.0, 1.0, 400)
#: anything else (>= 0 expected): ratio 1.047 per bin between 1e-6 and 1e6.
LOG_BINNING = Binning("log", 1e-6, 1e6, 600)
_UNIT_SUFFIXES = (
    "_gini", "_entropy", "_border_frac", "_com_x", "_com_y", "_deletion_auc", "_insertion_auc"
)  # fmt: skip


def binning_for(stat: str) -> Binning:
    """The histogram of statistic column ``stat`` (decided by its name, so every accumulator of
    every worker agrees): [0, 1] for ``*_gini``, ``*_entropy``, ``*_border_frac``, ``*_com_x``,
    ``*_com_y``, ``*_deletion_auc``, ``*_insertion_auc``, ``pred_prob``; [-1, 1] for
    ``agree_*``; log bins for the rest (``ig_rel_error``)."""
    if stat in ("pred_prob", "ig_converged") or stat.endswith(_UNIT_SUFFIXES):
        return UNIT_BINNING
    if stat.startswith("agree_"):
        return SIGNED_UNIT_BINNING
    return LOG_BINNING


def _percentiles(
    hist: np.ndarray, vmin: np.ndarray, vmax: np.ndarray, binning: Binning, qs: Iterable[float]
) -> list[np.ndarray]:
    """Percentiles ``qs`` (0..100) of each row of ``hist`` (K, size) -> list of float64 (K,),
    NaN where a row is empty. Linear (log bins: geometric) interpolation inside the bin that holds
    rank ``q/100 * (n - 1)``, clamped to the row's exact [vmin, vmax]."""
    k = hist.shape[0]
    n = hist.sum(axis=1)
    cum = np.cumsum(hist, axis=1)
    edges = binning.edges()
    out = []
    rows = np.arange(k)
    for q in qs:
        r = q / 100.0 * np.maximum(n - 1, 0)
        b = (cum > r[:, None]).argmax(axis=1)
        c = hist[rows, b].astype(np.float64)
        before = cum[rows, b] - c
        frac = np.clip((r - before + 0.5) / np.maximum(c, 1), 0.0, 1.0)
        lo = np.where(b == 0, vmin, edges[np.clip(b - 1, 0, binning.bins)])
        hi = np.where(b == binning.bins + 1, vmax, edges[np.clip(b, 0, binning.bins)])
        lo, hi = np.maximum(lo, vmin), np.minimum(hi, vmax)
        if binning.kind == "log":
            inner = (b > 0) & (lo > 0) & (hi > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                geo = lo * (hi / lo) ** frac
                val = np.where(inner, geo, lo + frac * (hi - lo))
        else:
            with np.errstate(invalid="ignore"):  # empty rows (min inf, max -inf): NaN below
                val = lo + frac * (hi - lo)
        val = np.clip(val, vmin, vmax)
        out.append(np.where(n > 0, val, np.nan))
    return out


# --------------------------------------------------------------------------------------------
# reading a batch of attribution rows
# --------------------------------------------------------------------------------------------


def statistic_columns(schema: pa.Schema) -> tuple[str, ...]:
    """The statistic columns of an attribution schema, in schema order: every float column (or
    fixed_size_list of float, topk) except score / baseline_score / ig_delta; ``pred_prob``
    included."""
    out = []
    for f in schema:
        t = f.type
        if is_tensor_type(t) or f.name in NOT_STATISTICS:
            continue
        if pa.types.is_fixed_size_list(t):
            t = t.value_type
        if pa.types.is_floating(t) or f.name in COUNT_STATISTICS:
            out.append(f.name)
    return tuple(out)


def map_columns(schema: pa.Schema) -> tuple[str, ...]:
    """The methods of ``MAP_METHODS`` whose full-resolution maps ``schema`` holds: a
    ``_pooled_<method>`` column (the worker's), or the method's tensor column stored ``full``
    (a ``compact`` map, reduced and rounded, is not the map the summary averages)."""
    out = []
    for m in MAP_METHODS:
        if POOLED_PREFIX + m in schema.names:
            out.append(m)
        elif m in schema.names and is_full_map(schema.field(m).type):
            out.append(m)
    return tuple(out)


def is_full_map(t: pa.DataType) -> bool:
    """True for a map column stored at full resolution (the ``full`` profile)."""
    return map_store_of(t) == "full"


def needed_columns(schema: pa.Schema, maps: bool = True) -> list[str]:
    """Columns of an attribution file that :meth:`Summary.update` reads (``maps``: the tensor
    columns too)."""
    cols = ["status", "pred_class"]
    if "label" in schema.names and pa.types.is_integer(schema.field("label").type):
        cols.append("label")
    if "target" in schema.names:
        cols.append("target")
    cols += statistic_columns(schema)
    if maps:
        cols += map_columns(schema)
    return [c for c in dict.fromkeys(cols) if c in schema.names]


def _float_values(col) -> np.ndarray:
    """A float column (or fixed_size_list of floats: its first element) -> float64 (N,), NaN for
    nulls."""
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_fixed_size_list(col.type):
            return tensor_to_numpy(col)[:, 0].astype(np.float64)
        if not pa.types.is_floating(col.type):  # ig_steps, ig_converged: nulls become NaN
            col = col.cast(pa.float64())
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    arr = np.asarray(col, dtype=np.float64)
    return arr[:, 0] if arr.ndim == 2 else arr


def _int_values(col) -> tuple[np.ndarray, np.ndarray]:
    """An integer column -> (int64 values (N,) with 0 for nulls, bool valid (N,))."""
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        vals = np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        return vals, valid
    arr = np.asarray(col)
    if np.issubdtype(arr.dtype, np.floating):  # a numpy view of a nullable column: NaN = null
        valid = np.isfinite(arr)
        return np.where(valid, arr, 0).astype(np.int64), valid
    if arr.dtype == object:
        valid = np.array([v is not None for v in arr], dtype=bool)
        vals = np.array([int(v) if v is not None else 0 for v in arr], dtype=np.int64)
        return vals, valid
    return arr.astype(np.int64), np.ones(len(arr), dtype=bool)


def _first_of_list(col):
    """A target column: int (N,) as it is; a list column (``topk:K``) -> its first element."""
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
            import pyarrow.compute as pc

            return pc.list_element(col, 0)
        return col
    arr = np.asarray(col)
    return arr[:, 0] if arr.ndim == 2 else arr


def pooled_maps(method: str, value: np.ndarray, size: int = MAP_SIZE) -> np.ndarray:
    """A method's output tensor for N rows -> its 2-D maps pooled to (N, size, size) float64.

    ``value``: saliency / gradcam (N, H, W), integrated_gradients (N, C, H, W), or the same with a
    top-k axis after N (then the first target is used). ``stats.map_2d`` then
    ``adaptive_avg_pool2d`` to ``size x size``; NaN rows (error rows) stay NaN.
    """
    import torch
    import torch.nn.functional as F

    from xai_workers.stats import map_2d

    v = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    base = 4 if method == "integrated_gradients" else 3
    if v.dim() == base + 1:
        v = v[:, 0]
    if v.dim() != base:
        raise ValueError(f"{method}: unexpected tensor shape {tuple(value.shape)}")
    m = map_2d(method, v)
    with torch.no_grad():
        pooled = F.adaptive_avg_pool2d(m[:, None].double(), (size, size))[:, 0]
    return pooled.numpy()


def correct_column(table: pa.Table | pa.RecordBatch) -> pa.Array:
    """Per-row ``correct``: bool, ``pred_class == label`` on ok rows with an integer label, null
    otherwise (error rows, null labels, no or non-integer label column). Length N."""
    n = table.num_rows
    if "label" not in table.schema.names or not pa.types.is_integer(
        table.schema.field("label").type
    ):
        return pa.nulls(n, pa.bool_())
    pred, pv = _int_values(table.column("pred_class"))
    label, lv = _int_values(table.column("label"))
    ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok", dtype=bool)
    valid = ok & pv & lv
    return pa.array(pred == label, type=pa.bool_(), mask=~valid)


# --------------------------------------------------------------------------------------------
# the accumulator
# --------------------------------------------------------------------------------------------


class Summary:
    """Mergeable per-class summary state (module docstring). Not thread-safe; cheap to create.

    Keys are ``(group_by, class)``: ``("all", None)``, ``("pred_class", c)``, ``("label", c)``,
    ``("target", c)``.
    Per key it holds the counts, and per statistic the finite count, sum, min, max and a fixed-bin
    histogram (int64 (bins + 2,)), and per map method the sums of the pooled maps and of their
    shares (float64 (32, 32)) with their row counts.
    """

    def __init__(self, map_size: int = MAP_SIZE):
        self.map_size = int(map_size)
        #: map methods a file stored only compact, so left out of the mean maps (summarize_file)
        self.maps_left_out: list[str] = []
        self.keys: list[tuple[str, int | None]] = []
        self._index: dict[tuple[str, int | None], int] = {}
        self.counts = {c: np.zeros(0, np.int64) for c in _COUNTS}
        self.stats: dict[str, dict[str, np.ndarray]] = {}
        self.maps: dict[str, dict[str, np.ndarray]] = {}
        self.has_label = False
        #: rows seen (ok + error), for a quick check
        self.rows = 0

    # ---- structure ------------------------------------------------------------------------

    def _grow(self, n_new: int) -> None:
        def pad(a: np.ndarray, fill) -> np.ndarray:
            extra = np.full((n_new, *a.shape[1:]), fill, dtype=a.dtype)
            return np.concatenate([a, extra])

        for c in _COUNTS:
            self.counts[c] = pad(self.counts[c], 0)
        for st in self.stats.values():
            for k in st:
                st[k] = pad(st[k], np.inf if k == "min" else -np.inf if k == "max" else 0)
        for mp in self.maps.values():
            for k in mp:
                mp[k] = pad(mp[k], 0)

    def key_indices(self, keys: Iterable[tuple[str, int | None]]) -> np.ndarray:
        """Row index of each key (new keys are added), int64."""
        keys = list(keys)
        new = [k for k in dict.fromkeys(keys) if k not in self._index]
        if new:
            for k in new:
                self._index[k] = len(self.keys)
                self.keys.append(k)
            self._grow(len(new))
        return np.array([self._index[k] for k in keys], dtype=np.int64)

    def _ensure_stat(self, name: str) -> dict[str, np.ndarray]:
        if name not in self.stats:
            k, b = len(self.keys), binning_for(name).size
            self.stats[name] = {
                "n": np.zeros(k, np.int64),
                "sum": np.zeros(k, np.float64),
                "min": np.full(k, np.inf),
                "max": np.full(k, -np.inf),
                "hist": np.zeros((k, b), np.int64),
            }
        return self.stats[name]

    def _ensure_map(self, method: str) -> dict[str, np.ndarray]:
        if method not in self.maps:
            k, s = len(self.keys), self.map_size
            self.maps[method] = {
                "sum": np.zeros((k, s, s), np.float64),
                "n": np.zeros(k, np.int64),
                "share_sum": np.zeros((k, s, s), np.float64),
                "share_n": np.zeros(k, np.int64),
            }
        return self.maps[method]

    # ---- update ---------------------------------------------------------------------------

    def update(self, batch: pa.Table | pa.RecordBatch | Mapping) -> Summary:
        """Add N attribution rows; returns ``self``.

        ``batch``: a ``pa.Table`` / ``pa.RecordBatch`` in the output schema (at least ``status``
        and ``pred_class``; whichever of ``label``, the statistic columns and the ``gradcam`` /
        ``integrated_gradients`` tensor columns it has are used; other columns are ignored), or
        a mapping of the same names to arrays: ``status`` (N,) str, ``pred_class`` (N,) int,
        ``label`` (N,) int, statistics (N,) float, maps as numpy (N, H, W) / (N, C, H, W).
        """
        if isinstance(batch, (pa.Table, pa.RecordBatch)):
            names = batch.schema.names
            get = batch.column
            stat_names = statistic_columns(batch.schema)
            map_names = map_columns(batch.schema)
            label_ok = "label" in names and pa.types.is_integer(batch.schema.field("label").type)
            status = np.asarray(get("status").to_numpy(zero_copy_only=False))
        else:
            names = list(batch)
            get = batch.__getitem__
            map_names = tuple(m for m in MAP_METHODS if m in batch or POOLED_PREFIX + m in batch)
            stat_names = tuple(
                k
                for k in batch
                if k not in NOT_STATISTICS
                and k not in map_names
                and not k.startswith(POOLED_PREFIX)
                and k not in ("status", "pred_class", "label", "target", "id", "error")
                and np.issubdtype(np.asarray(batch[k]).dtype, np.floating)
            )
            label_ok = "label" in batch
            status = np.asarray(batch["status"])
        n = len(status)
        if n == 0:
            return self
        ok = status == "ok"
        pred, pred_valid = _int_values(get("pred_class"))
        pred_valid &= ok
        has_target = "target" in names
        if has_target:
            target, target_valid = _int_values(_first_of_list(get("target")))
            target_valid &= ok
        if label_ok:
            self.has_label = True
            label, label_valid = _int_values(get("label"))
        else:
            label, label_valid = np.zeros(n, np.int64), np.zeros(n, bool)

        # per grouping: the keys it touches and each row's position among them (-1: not in it)
        k_all = self.key_indices([(GROUP_ALL, None)])
        groupings = [(k_all, np.zeros(n, np.int64))]
        for group, vals, valid in (
            (GROUP_PRED, pred, pred_valid),
            (GROUP_LABEL, label, label_valid),
            *([(GROUP_TARGET, target, target_valid)] if has_target else []),
        ):
            pos = np.full(n, -1, np.int64)
            uniq = np.zeros(0, np.int64)
            if valid.any():
                u, pos[valid] = np.unique(vals[valid], return_inverse=True)
                uniq = self.key_indices([(group, int(c)) for c in u])
            groupings.append((uniq, pos))

        correct = ok & pred_valid & label_valid & (pred == label)
        for keys, pos in groupings:
            for name, rows in (
                ("count", ok),
                ("errors", ~ok),
                ("labeled", ok & label_valid),
                ("correct", correct),
            ):
                sel = rows & (pos >= 0)
                self.counts[name][keys] += np.bincount(pos[sel], minlength=len(keys))

        for name in stat_names:
            v = _float_values(get(name))
            st = self._ensure_stat(name)
            fin = ok & np.isfinite(v)
            binning = binning_for(name)
            bins = binning.index(np.where(fin, v, 0.0))
            for keys, pos in groupings:
                sel = fin & (pos >= 0)
                if not sel.any():
                    continue
                p, vs, k = pos[sel], v[sel], len(keys)
                st["n"][keys] += np.bincount(p, minlength=k)
                st["sum"][keys] += np.bincount(p, weights=vs, minlength=k)
                lo, hi = np.full(k, np.inf), np.full(k, -np.inf)
                np.minimum.at(lo, p, vs)
                np.maximum.at(hi, p, vs)
                st["min"][keys] = np.minimum(st["min"][keys], lo)
                st["max"][keys] = np.maximum(st["max"][keys], hi)
                flat = np.bincount(p * binning.size + bins[sel], minlength=k * binning.size)
                st["hist"][keys] += flat.reshape(k, binning.size)

        for method in map_names:
            mp = self._ensure_map(method)
            sel_rows = np.flatnonzero(ok)
            if len(sel_rows) == 0:
                continue
            pooled = None
            if POOLED_PREFIX + method in names:  # pooled from the full map by the worker
                col = get(POOLED_PREFIX + method)
                if isinstance(col, (pa.Array, pa.ChunkedArray)):
                    col = tensor_to_numpy(col, dtype=np.float64)
                col = np.asarray(col, dtype=np.float64)
                if col.shape[1:] == (self.map_size, self.map_size):
                    pooled = col[sel_rows].copy()
            if pooled is None:
                col = get(method)
                value = (
                    tensor_to_numpy(col) if isinstance(col, (pa.Array, pa.ChunkedArray)) else col
                )
                pooled = pooled_maps(method, np.asarray(value)[sel_rows], self.map_size)
            fin = np.isfinite(pooled).all(axis=(1, 2))
            pooled[~fin] = 0.0
            total = pooled.sum(axis=(1, 2))
            has_share = fin & (total > 0)
            share = pooled / np.where(has_share, total, 1.0)[:, None, None]
            share[~has_share] = 0.0
            flat, flat_share = pooled.reshape(len(pooled), -1), share.reshape(len(share), -1)
            for keys, pos in groupings:
                p = pos[sel_rows]
                for part, count, rows, values in (
                    ("sum", "n", fin, flat),
                    ("share_sum", "share_n", has_share, flat_share),
                ):
                    use = rows & (p >= 0)
                    if not use.any():
                        continue
                    onehot = np.zeros((len(keys), len(p)))
                    onehot[p[use], np.flatnonzero(use)] = 1.0
                    mp[part][keys] += (onehot @ values).reshape(len(keys), self.map_size,
                                                                self.map_size)  # fmt: skip
                    mp[count][keys] += np.bincount(p[use], minlength=len(keys))
        self.rows += n
        return self

    # ---- merge ----------------------------------------------------------------------------

    def merge(self, other: Summary) -> Summary:
        """Add ``other``'s state into ``self`` (exact; order does not matter); returns ``self``."""
        if other.map_size != self.map_size:
            raise ValueError(f"map sizes differ: {self.map_size} vs {other.map_size}")
        idx = self.key_indices(other.keys)
        for c in _COUNTS:
            self.counts[c][idx] += other.counts[c]
        for name, ost in other.stats.items():
            st = self._ensure_stat(name)
            st["n"][idx] += ost["n"]
            st["sum"][idx] += ost["sum"]
            st["min"][idx] = np.minimum(st["min"][idx], ost["min"])
            st["max"][idx] = np.maximum(st["max"][idx], ost["max"])
            st["hist"][idx] += ost["hist"]
        for method, omp in other.maps.items():
            mp = self._ensure_map(method)
            for k in mp:
                mp[k][idx] += omp[k]
        self.has_label |= other.has_label
        self.rows += other.rows
        return self

    # ---- partials -------------------------------------------------------------------------

    def partial_schema(self) -> pa.Schema:
        """Schema of :meth:`to_partial` for this accumulator's statistics and maps."""
        s = self.map_size
        fields = [
            pa.field("group_by", pa.string(), nullable=False),
            pa.field("class", pa.int64()),
            *(pa.field(c, pa.int64(), nullable=False) for c in _COUNTS),
        ]
        for name in self.stats:
            fields += [
                pa.field(f"{name}__n", pa.int64()),
                pa.field(f"{name}__sum", pa.float64()),
                pa.field(f"{name}__min", pa.float64()),
                pa.field(f"{name}__max", pa.float64()),
                pa.field(f"{name}__bins", pa.list_(pa.int32())),
                pa.field(f"{name}__counts", pa.list_(pa.int64())),
            ]
        for m in self.maps:
            fields += [
                pa.field(f"{m}__map_sum", map_type([s, s])),
                pa.field(f"{m}__map_n", pa.int64()),
                pa.field(f"{m}__share_sum", map_type([s, s])),
                pa.field(f"{m}__share_n", pa.int64()),
            ]
        meta = {
            "xai_workers.summary_version": SUMMARY_VERSION,
            "xai_workers.summary_kind": "partial",
            "map_size": str(s),
            "has_label": json.dumps(self.has_label),
            "rows": str(self.rows),
            "binning": json.dumps({n: binning_for(n).as_dict() for n in self.stats}),
        }
        return pa.schema(fields, metadata=meta)

    def to_partial(self) -> pa.Table:
        """The mergeable state as a small table: one row per key, histograms as sparse
        (bin, count) lists, map sums as float32 tensors. :meth:`from_partial` inverts it
        (exactly, but for the float32 rounding of the map sums)."""
        schema = self.partial_schema()
        k = len(self.keys)
        cols: dict[str, pa.Array] = {
            "group_by": pa.array([g for g, _ in self.keys], pa.string()),
            "class": pa.array([c for _, c in self.keys], pa.int64()),
        }
        for c in _COUNTS:
            cols[c] = pa.array(self.counts[c], pa.int64())
        for name, st in self.stats.items():
            cols[f"{name}__n"] = pa.array(st["n"])
            cols[f"{name}__sum"] = pa.array(st["sum"])
            cols[f"{name}__min"] = pa.array(st["min"])
            cols[f"{name}__max"] = pa.array(st["max"])
            rows, bins = np.nonzero(st["hist"])
            offsets = np.zeros(k + 1, np.int32)
            np.cumsum(np.bincount(rows, minlength=k), out=offsets[1:])
            off = pa.array(offsets, pa.int32())
            cols[f"{name}__bins"] = pa.ListArray.from_arrays(off, pa.array(bins, pa.int32()))
            cols[f"{name}__counts"] = pa.ListArray.from_arrays(
                off, pa.array(st["hist"][rows, bins], pa.int64())
            )
        for m, mp in self.maps.items():
            for part in ("sum", "share_sum"):
                t = schema.field(f"{m}__map_sum").type
                flat = pa.array(mp[part].reshape(-1).astype(np.float32), pa.float32())
                name = f"{m}__map_sum" if part == "sum" else f"{m}__share_sum"
                cols[name] = pa.FixedSizeListArray.from_arrays(flat, type=t)
            cols[f"{m}__map_n"] = pa.array(mp["n"])
            cols[f"{m}__share_n"] = pa.array(mp["share_n"])
        return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)

    @classmethod
    def from_partial(cls, table: pa.Table) -> Summary:
        """The accumulator a partial table (:meth:`to_partial`) describes.

        Raises ValueError for a partial of another summary version or other bins."""
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("xai_workers.summary_version") != SUMMARY_VERSION:
            raise ValueError(
                f"not a summary partial of version {SUMMARY_VERSION}: "
                f"{meta.get('xai_workers.summary_version')!r}"
            )
        acc = cls(map_size=int(meta.get("map_size", MAP_SIZE)))
        for name, spec in json.loads(meta.get("binning", "{}")).items():
            if spec != binning_for(name).as_dict():
                raise ValueError(f"partial bins of {name} differ from this version's: {spec}")
        keys = list(
            zip(
                table.column("group_by").to_pylist(), table.column("class").to_pylist(), strict=True
            )
        )
        acc.key_indices(keys)
        k = len(keys)
        for c in _COUNTS:
            acc.counts[c] = np.asarray(table.column(c).to_numpy(), np.int64).copy()
        names = table.schema.names
        for name in [n[: -len("__bins")] for n in names if n.endswith("__bins")]:
            st = acc._ensure_stat(name)
            st["n"] = table.column(f"{name}__n").to_numpy().astype(np.int64)
            st["sum"] = table.column(f"{name}__sum").to_numpy().astype(np.float64)
            st["min"] = table.column(f"{name}__min").to_numpy().astype(np.float64)
            st["max"] = table.column(f"{name}__max").to_numpy().astype(np.float64)
            bins_col = table.column(f"{name}__bins").combine_chunks()
            counts_col = table.column(f"{name}__counts").combine_chunks()
            lengths = np.diff(np.asarray(bins_col.offsets))
            rows = np.repeat(np.arange(k), lengths)
            bins = np.asarray(bins_col.flatten().to_numpy(), np.int64)
            counts = np.asarray(counts_col.flatten().to_numpy(), np.int64)
            np.add.at(st["hist"], (rows, bins), counts)
        for m in [n[: -len("__map_sum")] for n in names if n.endswith("__map_sum")]:
            mp = acc._ensure_map(m)
            mp["sum"] = tensor_to_numpy(table.column(f"{m}__map_sum")).astype(np.float64)
            mp["share_sum"] = tensor_to_numpy(table.column(f"{m}__share_sum")).astype(np.float64)
            mp["n"] = table.column(f"{m}__map_n").to_numpy().astype(np.int64)
            mp["share_n"] = table.column(f"{m}__share_n").to_numpy().astype(np.int64)
        acc.has_label = json.loads(meta.get("has_label", "false"))
        acc.rows = int(meta.get("rows", 0))
        return acc

    # ---- the final table ------------------------------------------------------------------

    def _order(self) -> list[int]:
        rank = {g: i for i, g in enumerate(GROUPS)}
        return sorted(
            range(len(self.keys)),
            key=lambda i: (
                rank[self.keys[i][0]],
                -1 if self.keys[i][1] is None else self.keys[i][1],
            ),
        )

    def to_table(self, class_names: Sequence[str] | None = None) -> pa.Table:
        """The summary: one row per key, ordered all, pred_class, label, target (by class); schema
        :func:`summary_schema` (module docstring for the columns). With ``class_names`` (index
        -> name) a ``name`` column follows ``class`` (null for ``all`` and unknown classes)."""
        if (GROUP_ALL, None) not in self._index:
            self.key_indices([(GROUP_ALL, None)])
        schema = summary_schema(
            tuple(self.stats), tuple(self.maps), self.map_size, class_names is not None
        )
        order = np.array(self._order(), dtype=np.int64)
        classes = [self.keys[i][1] for i in order]
        cols: dict[str, pa.Array] = {
            "group_by": pa.array([self.keys[i][0] for i in order], pa.string()),
            "class": pa.array(classes, pa.int64()),
        }
        if class_names is not None:
            cols["name"] = pa.array([
                class_names[c] if c is not None and 0 <= c < len(class_names) else None
                for c in classes
            ], pa.string())  # fmt: skip
        for c in _COUNTS:
            cols[c] = pa.array(self.counts[c][order], pa.int64())
        labeled, correct = self.counts["labeled"][order], self.counts["correct"][order]
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = correct / labeled
        cols["accuracy"] = pa.array(acc, pa.float64(), mask=labeled == 0)
        for name, st in self.stats.items():
            n = st["n"][order]
            empty = n == 0
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = st["sum"][order] / n
            cols[f"{name}_mean"] = pa.array(mean, pa.float64(), mask=empty)
            ps = _percentiles(
                st["hist"][order], st["min"][order], st["max"][order], binning_for(name),
                PERCENTILES,
            )  # fmt: skip
            for q, v in zip(PERCENTILES, ps, strict=True):
                cols[f"{name}_p{q}"] = pa.array(v, pa.float64(), mask=empty)
        for m, mp in self.maps.items():
            for part, count, col in (
                ("sum", "n", f"{m}_mean_map"),
                ("share_sum", "share_n", f"{m}_share_map"),
            ):
                n = mp[count][order]
                with np.errstate(divide="ignore", invalid="ignore"):
                    mean = (mp[part][order] / n[:, None, None]).astype(np.float32)
                mean[n == 0] = 0.0
                cols[col] = pa.FixedSizeListArray.from_arrays(
                    pa.array(mean.reshape(-1), pa.float32()),
                    type=schema.field(col).type,
                    mask=pa.array(n == 0),
                )
        table = pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
        meta = dict(schema.metadata or {})
        meta[b"rows"] = str(self.rows).encode()
        return table.replace_schema_metadata(meta)


def summary_schema(
    stat_names: Iterable[str],
    map_methods: Iterable[str],
    map_size: int = MAP_SIZE,
    has_names: bool = False,
) -> pa.Schema:
    """The explicit schema of the summary table (module docstring), for these statistics and
    map methods: ``group_by`` string, ``class`` int64 (null for ``all``), ``count``, ``errors``,
    ``labeled``, ``correct`` int64, ``accuracy`` float64, ``{s}_mean``/``_p5``/``_p50``/``_p95``
    float64 per statistic (``name`` string after ``class`` with ``has_names``),
    ``{m}_mean_map`` and ``{m}_share_map``
    maps (``schema.map_type``: ``fixed_size_list<float32>[map_size**2]``, row-major, shape in
    its metadata) per map method."""
    fields = [
        pa.field("group_by", pa.string(), nullable=False),
        pa.field("class", pa.int64()),
        *([pa.field("name", pa.string())] if has_names else []),
        *(pa.field(c, pa.int64(), nullable=False) for c in _COUNTS),
        pa.field("accuracy", pa.float64()),
    ]
    for name in stat_names:
        fields.append(pa.field(f"{name}_mean", pa.float64()))
        fields += [pa.field(f"{name}_p{q}", pa.float64()) for q in PERCENTILES]
    t = map_type([map_size, map_size])
    for m in map_methods:
        fields += [pa.field(f"{m}_mean_map", t), pa.field(f"{m}_share_map", t)]
    meta = {
        "xai_workers.summary_version": SUMMARY_VERSION,
        "xai_workers.summary_kind": "summary",
        "map_size": str(map_size),
        "percentiles": json.dumps(list(PERCENTILES)),
        "binning": json.dumps({n: binning_for(n).as_dict() for n in stat_names}),
    }
    return pa.schema(fields, metadata=meta)


# module-level spelling of the accumulator API


def update(acc: Summary | None, batch) -> Summary:
    """``acc.update(batch)`` (a new :class:`Summary` when ``acc`` is None); returns it."""
    return (acc if acc is not None else Summary()).update(batch)


def merge(a: Summary, b: Summary) -> Summary:
    """A new :class:`Summary` holding ``a`` + ``b`` (neither is changed)."""
    return Summary(a.map_size).merge(a).merge(b)


def to_table(acc: Summary) -> pa.Table:
    """``acc.to_table()``: the final summary table."""
    return acc.to_table()


def summarize_table(table: pa.Table | pa.RecordBatch) -> pa.Table:
    """The partial (``Summary.to_partial``) of a batch of attribution rows."""
    return Summary().update(table).to_partial()


# --------------------------------------------------------------------------------------------
# files: partials beside the parts, the summary of an output
# --------------------------------------------------------------------------------------------


def _join(uri: str, *parts: str) -> str:
    from xai_workers.storage import join_uri

    return join_uri(uri, *parts)


def partials_uri(output_uri: str) -> str:
    """``<output>/summary/partials``."""
    return _join(output_uri, SUMMARY_DIR, PARTIALS_DIR)


def summary_uri(output_uri: str) -> str:
    """``<output>/summary/summary.parquet``."""
    return _join(output_uri, SUMMARY_DIR, SUMMARY_FILE)


def _write_parquet(table: pa.Table, uri: str, s3_endpoint: str | None = None, **options) -> None:
    """Write ``table`` to ``uri`` so a reader sees it whole or not at all (local: temporary name
    in the same folder + rename; S3: an object exists once uploaded). ``options``: of
    ``pq.write_table``."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from xai_workers.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(uri, s3_endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        folder = posixpath.dirname(path)
        fs.create_dir(folder, recursive=True)
        tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        with fs.open_output_stream(tmp) as f:
            pq.write_table(table, f, **options)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            pq.write_table(table, f, **options)


def write_partial(
    rows: pa.Table | pa.RecordBatch | Summary,
    output_uri: str,
    part_name: str,
    s3_endpoint: str | None = None,
) -> str:
    """Write the partial summary of one attribution part: ``rows`` (the part's rows, or a
    :class:`Summary` of them) -> ``<output>/summary/partials/<part_name>``; returns that URI.

    ``part_name`` is the part's file name (``part-<hash>.parquet``), so :func:`summarize_output`
    pairs each part with its partial and ignores partials of parts that are gone. Call it after
    the part is written: a partial older than its part is taken as left over and ignored."""
    acc = rows if isinstance(rows, Summary) else Summary().update(rows)
    uri = _join(partials_uri(output_uri), posixpath.basename(part_name))
    table = acc.to_partial()
    # float columns (map sums, histogram sums) byte-stream-split then zstd, dictionaries only
    # for strings: the demo's partials take 4.7 MB instead of 8.5 MB (module docstring)
    floats = []
    for f in table.schema:
        t = f.type.storage_type if isinstance(f.type, pa.FixedShapeTensorType) else f.type
        if pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type):
            floats.append(f"{f.name}.list.element")
        elif pa.types.is_floating(t):
            floats.append(f.name)
    _write_parquet(table, uri, s3_endpoint, compression="zstd", use_dictionary=["group_by"],
                   use_byte_stream_split=floats or False)  # fmt: skip
    return uri


@dataclass(frozen=True)
class _Listed:
    path: str  # filesystem path (no protocol), as pyarrow_filesystem's paths
    mtime: float | None  # seconds since the epoch, None when the store does not say


def _mtime(entry: Mapping) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = entry.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


def _list_infos(uri: str, s3_endpoint: str | None = None) -> list[_Listed]:
    """The ``*.parquet`` files directly under folder/prefix ``uri`` with their modification
    times (fsspec listing: local ``mtime``, S3 ``LastModified``), sorted by path; hidden names
    (``.``/``_``, temporary files) left out; ``[]`` if the folder is missing."""
    from xai_workers.storage import filesystem

    fs, path = filesystem(uri, s3_endpoint)
    path = path.rstrip("/")
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = [
        _Listed(e["name"].rstrip("/"), _mtime(e))
        for e in entries
        if e.get("type") == "file"
        and e["name"].endswith(".parquet")
        and not posixpath.basename(e["name"]).startswith((".", "_"))
    ]
    return sorted(out, key=lambda i: i.path)


def list_parquet(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """Filesystem paths of the ``*.parquet`` files directly under folder/prefix ``uri``, sorted;
    hidden names (``.``/``_``, temporary files) left out; ``[]`` if the folder is missing."""
    return [i.path for i in _list_infos(uri, s3_endpoint)]


#: Bytes of tensor data per batch when a part is read back (``summarize_file``).
BATCH_BYTES = 64 * 2**20


def summarize_file(
    fs, path: str, batch_rows: int | None = None, map_size: int = MAP_SIZE
) -> Summary:
    """The :class:`Summary` of one attribution file (a pyarrow filesystem and a path in it),
    streamed a batch at a time, reading only the columns it needs (``needed_columns``).
    ``batch_rows`` None: as many rows as fit in ``BATCH_BYTES`` of tensors (e.g. 83 rows of
    224x224 IG + Grad-CAM, 16384 rows at most)."""
    import pyarrow.parquet as pq

    acc = Summary(map_size)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        cols = needed_columns(schema)
        acc.maps_left_out = [m for m in MAP_METHODS if m in schema.names and m not in cols]
        if batch_rows is None:
            per_row = sum(
                4 * int(np.prod(map_shape_of(schema.field(c).type)))
                for c in cols
                if is_tensor_type(schema.field(c).type)
            )
            batch_rows = int(min(16384, max(16, BATCH_BYTES // max(1, per_row))))
        for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
            acc.update(rb)
    return acc


def summarize_output(
    output_uri: str,
    s3_endpoint: str | None = None,
    *,
    use_partials: bool = True,
    write: bool = True,
    threads: int = 8,
    batch_rows: int | None = None,
    log: Callable[[str], None] | None = None,
    class_names: Sequence[str] | None = None,
) -> pa.Table:
    """The summary of ``<output>/attributions``, written to ``<output>/summary/summary.parquet``
    (unless ``write`` is False) and returned.

    Each part file contributes its partial from ``<output>/summary/partials/`` when there is one
    (``use_partials``), else its rows, streamed (``summarize_file``: only the needed columns,
    ``batch_rows`` rows per batch, default by size; parts read by ``threads`` threads, one part
    at a time each). Partials whose part is gone are ignored, and so is a partial older than its
    part (modification times from the listing): it was left by an earlier run whose part of the
    same name was replaced, so a job must write a part's partial after the part. Raises
    FileNotFoundError when there are no part files.
    """
    import pyarrow.parquet as pq

    from xai_workers.storage import pyarrow_filesystem

    log = log or (lambda m: None)
    attr = _join(output_uri, ATTRIBUTIONS_DIR)
    part_infos = _list_infos(attr, s3_endpoint)
    parts = [i.path for i in part_infos]
    if not parts:
        raise FileNotFoundError(f"no attribution files in {attr}")
    fs, _ = pyarrow_filesystem(attr, s3_endpoint)
    have = {}
    if use_partials:
        have = {
            posixpath.basename(i.path): i
            for i in _list_infos(partials_uri(output_uri), s3_endpoint)
        }
    part_mtime = {i.path: i.mtime for i in part_infos}
    pfs, _ = pyarrow_filesystem(partials_uri(output_uri), s3_endpoint)

    def one(path: str) -> tuple[Summary, bool]:
        name = posixpath.basename(path)
        info = have.get(name)
        if info is not None and _older(info.mtime, part_mtime[path]):
            log(f"partial {name} is older than its part (left from another run?); reading the part")
            info = None
        if info is not None:
            try:
                with pfs.open_input_file(info.path) as f:
                    return Summary.from_partial(pq.read_table(f)), True
            except (OSError, ValueError, pa.ArrowException) as e:
                log(f"partial {name} unusable ({type(e).__name__}: {e}); reading the part")
        acc = summarize_file(fs, path, batch_rows)
        if acc.maps_left_out:
            log(
                f"part {name} has no partial and stores compact maps: its rows are not in the "
                f"mean maps of {', '.join(acc.maps_left_out)} (statistics are complete)"
            )
        return acc, False

    total = Summary()
    used = 0
    with ThreadPoolExecutor(max(1, min(threads, len(parts)))) as ex:
        for start in range(0, len(parts), 4 * threads):  # bounded number of results in flight
            for acc, from_partial in ex.map(one, parts[start : start + 4 * threads]):
                total.merge(acc)
                used += from_partial
    log(f"summary of {total.rows} rows from {len(parts)} parts ({used} from partials)")
    if class_names is None:
        class_names = _manifest_class_names(output_uri, s3_endpoint)
    table = total.to_table(class_names)
    meta = dict(table.schema.metadata or {})
    meta.update({b"parts": str(len(parts)).encode(), b"parts_from_partials": str(used).encode()})
    table = table.replace_schema_metadata(meta)
    if write:
        _write_parquet(table, summary_uri(output_uri), s3_endpoint)
    return table


def _manifest_class_names(output_uri: str, s3_endpoint: str | None) -> list[str] | None:
    """``model.class_names.names`` of ``<output>/manifest.json``, None when absent."""
    from xai_workers.storage import read_bytes

    try:
        manifest = json.loads(read_bytes(_join(output_uri, "manifest.json"), s3_endpoint))
    except (OSError, ValueError):
        return None
    return ((manifest.get("model") or {}).get("class_names") or {}).get("names")


def _older(a, b) -> bool:
    """True when modification time ``a`` is known to be before ``b`` (None: unknown)."""
    return a is not None and b is not None and a < b


def read_summary(output_uri: str, s3_endpoint: str | None = None) -> pa.Table:
    """``<output>/summary/summary.parquet``; FileNotFoundError when it is missing."""
    import pyarrow.parquet as pq

    from xai_workers.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(summary_uri(output_uri), s3_endpoint)
    with fs.open_input_file(path) as f:
        return pq.read_table(f)
