"""The explicit pyarrow schema of the ``attributions/`` output, and how tables in it are built.

One output row per input row (docs/conventions.md, "Output rows"). Column order:

====================  ===============================================  =========================
column                type                                             meaning
====================  ===============================================  =========================
id                    as in the input                                  the input row's id
label                 as in the input (only with a label column)       the input row's label
correct               bool (integer labels only)                       pred_class == label, or null
status                string, never null                               ``ok`` or ``error``
error                 string, null when ok                             what went wrong
target                int64 (fixed_size_list<int64>[K] with topk:K)    class(es) explained
target_name           dictionary<int32, string> (list [K] of string)   its name (names known)
pred_class            int64                                            argmax of the logits
pred_name             dictionary<int32, string>                        its name (names known)
pred_prob             float32                                          its softmax probability
topk_classes          fixed_size_list<int64>[R]                        R = min(5, classes)
topk_probs            fixed_size_list<float32>[R]
score                 float32 (list [K] with topk)                     F(x)
baseline_score        float32 (list [K]); only with IG                 F(x')
ig_delta              float32 (list [K]); only with IG                 completeness delta
ig_steps              int32 (list [K]); only with IG steps ``auto``     gradient evaluations used
ig_error_est          float32 (list [K]); IG steps ``auto``            estimated rel. L2 error
ig_converged          bool (list [K]); IG steps ``auto``               ig_error_est <= ig_tol
ig_path               struct<alpha, score> (list [K]); IG steps auto   the path trace
saliency              map (H, W): fixed_size_list<float32>[H*W]        ([K, H, W] with topk)
integrated_gradients  map (C, H, W)                                    ([K, C, H, W])
gradcam, cam          map (H, W)                                       ([K, H, W])
                      (compact profile: every map (M, M), IG summed over channels)
<statistics>          float32 (list [K] with topk)                     ``stats.row_statistics``
source                string, never null                               input file (relative)
source_row            int64, never null                                row in that file
====================  ===============================================  =========================

Only the maps that were asked for are present, shaped by the storage profile
(``xai_workers.profiles``): ``full`` float32 as above, ``compact`` (M, M) for every method (IG:
the signed channel sum) with float32 values rounded to bfloat16, ``stats`` none. A map is stored
flat in row-major order as a plain ``fixed_size_list<float32>[n]`` (:func:`map_type`), which
DuckDB reads as ``FLOAT[]``, Polars as ``Array(Float32)``, Spark as ``array<float>`` and pandas
as arrays, without casts; its canonical shape is in the metadata of the list's element field and
of the column's field (``xai_workers.shape``) and in the schema's ``xai_workers.shapes``;
:func:`tensor_to_numpy` gives it back as (N, *shape). The schema's metadata also records
``xai_workers.store`` and ``xai_workers.map_size``; every field has a ``description``. No Arrow
extension type is stored: Polars turns one into an opaque ``Extension`` its ``.arr`` functions
refuse. An error row has every computed column null.

``source`` / ``source_row`` say where the row came from (the input file relative to ``--input``
and the row's index in it; ``0`` for an image file). They are the key the job uses to resume and to
check that every input row was written exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from xai_workers.profiles import (
    DEFAULT_MAP_SIZE,
    MAP_KEYS,
    check_profile,
    effective_map_size,
    stored_shape,
)

#: "2": maps are plain ``fixed_size_list<float32>`` (:func:`map_type`), compact values rounded
#: to bfloat16; "1": ``arrow.fixed_shape_tensor`` maps, compact ones float16.
SCHEMA_VERSION = "2"
#: Metadata keys of a map's element field (and of the map's field): its canonical shape (JSON
#: list) and its storage profile.
SHAPE_KEY = "xai_workers.shape"
STORE_KEY = "xai_workers.store"
MAP_METHODS = MAP_KEYS
STATUS_OK = "ok"
STATUS_ERROR = "error"
#: Type of the class-name columns: dictionary-encoded strings (few distinct values).
NAME_TYPE = pa.dictionary(pa.int32(), pa.string())
#: One row's IG path trace: the alphas of the evaluated points in ascending order and the
#: target's score F(x' + alpha (x - x')) at each (``ig_steps`` entries each).
IG_PATH_TYPE = pa.struct(
    [pa.field("alpha", pa.list_(pa.float32())), pa.field("score", pa.list_(pa.float32()))]
)
#: Columns every output file has, whatever the configuration (besides ``label``).
KEY_COLUMNS = ("source", "source_row")

_DESCRIPTIONS = {
    "id": "the input row's id",
    "label": "the input row's label",
    "correct": "pred_class == label (integer labels only; null on error rows and null labels)",
    "status": "ok or error",
    "error": "what went wrong (null when ok)",
    "target": "class explained (K classes with topk:K targets)",
    "target_name": "name of the class explained (K names with topk:K targets)",
    "pred_name": "name of pred_class",
    "pred_class": "top-1 class at x (argmax of the logits)",
    "pred_prob": "softmax probability of pred_class",
    "topk_classes": "the best classes at x, best first",
    "topk_probs": "their softmax probabilities",
    "score": "F(x): the target's logit (or probability with score=prob)",
    "baseline_score": "F(x') at the IG baseline",
    "ig_delta": "sum(IG) - (F(x) - F(x')): IG completeness error",
    "ig_steps": "gradient evaluations used by the IG of this row (--ig-steps auto)",
    "ig_error_est": "estimated relative L2 error of the IG map (--ig-steps auto)",
    "ig_converged": "ig_error_est <= --ig-tol before --ig-max-steps was reached",
    "ig_path": "alphas (ascending) and the target's score F at each evaluated IG path point",
    "saliency": "saliency max_c |dF/dx| (H, W)",
    "integrated_gradients": "Integrated Gradients per channel (C, H, W)",
    "gradcam": "Grad-CAM upsampled to (H, W), raw (after its ReLU)",
    "cam": "CAM upsampled to (H, W), raw (signed)",
    "gradcam_pp": "Grad-CAM++ upsampled to (H, W), raw (after its ReLU)",
    "xgradcam": "XGrad-CAM upsampled to (H, W), raw (after its ReLU)",
    "layercam": "LayerCAM upsampled to (H, W), raw (after its ReLU)",
    "eigencam": "EigenCAM upsampled to (H, W), raw (after its ReLU)",
    "smoothgrad": "SmoothGrad: max_c mean over noisy copies of |dF/dx|",
    "smoothgrad_sq": "SmoothGrad-squared: max_c mean over noisy copies of (dF/dx)^2",
    "vargrad": "VarGrad: max_c variance over noisy copies of |dF/dx|",
    "source": "input file, relative to --input",
    "source_row": "row index in the input file (0 for an image file)",
}


def _map_description(method: str, layout: OutputLayout) -> str:
    """What ``method``'s stored map holds under ``layout``'s profile: meaning, shape, layout."""
    shape = layout.map_shape(method)
    dims = ", ".join(str(s) for s in shape)
    k = "one map per target (K first), " if layout.topk else ""
    flat = f"stored flat, row-major: fixed_size_list<float32>[{int(np.prod(shape))}]"
    if layout.store == "compact":
        what = (
            "Integrated Gradients summed over channels, signed (sum_c IG[c])"
            if method == "integrated_gradients"
            else _DESCRIPTIONS[method]
        )
        return (
            f"{what}: {k}the area mean of that full map over an M x M grid, M = "
            f"{layout.map_size}; shape ({dims}); float32 values rounded to bfloat16; {flat}"
        )
    return f"{_DESCRIPTIONS[method]}: {k}shape ({dims}), float32; {flat}"


def _described(f: pa.Field, layout: OutputLayout) -> pa.Field:
    """``f`` with its ``description`` metadata (and a map's canonical shape)."""
    if f.name in MAP_METHODS and map_shape_of(f.type) is not None:
        shape = json.dumps(list(layout.map_shape(f.name)))
        return f.with_metadata({"description": _map_description(f.name, layout), SHAPE_KEY: shape})
    text = _DESCRIPTIONS.get(f.name) or _statistic_description(f.name)
    return f.with_metadata({"description": text}) if text else f


#: Statistic columns ``{method}_{suffix}``: what each says about the method's 2-D map
#: (docs/conventions.md, "Output rows"; ``stats.row_statistics``).
_STAT_SUFFIXES = {
    "gini": "Gini index of the 2-D map (sparseness, 0 = flat, 1 = one pixel)",
    "entropy": "Shannon entropy of the 2-D map's shares m / sum(m), divided by log(n), in [0, 1]",
    "border_frac": "share of the 2-D map's sum within the outer 10% of the width and height",
    "com_x": "centre of mass of the 2-D map, fraction of the width",
    "com_y": "centre of mass of the 2-D map, fraction of the height",
}


def _statistic_description(name: str) -> str | None:
    """The description of a statistic column (None for a name that is not one)."""
    per_target = " (one per target with topk:K)"
    if name == "ig_rel_error":
        return "|ig_delta| / max(|F(x) - F(x')|, |F(x)|, 1e-6): relative completeness error"
    if name.startswith("agree_"):
        return (
            "Spearman rank correlation of two methods' 2-D maps, each average-pooled to at most "
            "32x32" + per_target
        )
    for suffix, text in _STAT_SUFFIXES.items():
        method = name[: -len(suffix) - 1]
        if name.endswith("_" + suffix) and method in MAP_METHODS:
            return f"{method}: {text}" + per_target
    return None


def tensor_type(shape: Sequence[int], value_type: pa.DataType | None = None) -> pa.DataType:
    """Arrow's canonical ``arrow.fixed_shape_tensor`` of ``value_type`` (float32 by default)
    with ``shape`` (row-major). In-flight columns only (the worker's input ``x``); stored maps
    are :func:`map_type`."""
    return pa.fixed_shape_tensor(value_type or pa.float32(), [int(s) for s in shape])


def map_type(shape: Sequence[int], store: str = "full") -> pa.DataType:
    """The stored type of a map of ``shape`` (row-major): ``fixed_size_list<float32>[prod]``,
    a plain list every engine reads (DuckDB ``FLOAT[]``, Polars ``Array(Float32)``, Spark
    ``array<float>``). Its element field's metadata holds the canonical shape
    (``xai_workers.shape``, JSON) and the profile (``xai_workers.store``): pyarrow keeps both
    through Parquet, so :func:`tensor_to_numpy` restores the shape from the column alone."""
    shape = [int(s) for s in shape]
    meta = {SHAPE_KEY: json.dumps(shape), STORE_KEY: store}
    return pa.list_(pa.field("element", pa.float32(), metadata=meta), int(np.prod(shape)))


def map_shape_of(t: pa.DataType) -> tuple[int, ...] | None:
    """The canonical shape of a map column's type: a :func:`map_type`, or a
    ``fixed_shape_tensor`` (outputs and summary partials written before schema version 2);
    None for any other type."""
    if isinstance(t, pa.FixedShapeTensorType):
        return tuple(int(s) for s in t.shape)
    if pa.types.is_fixed_size_list(t):
        meta = t.value_field.metadata or {}
        if SHAPE_KEY.encode() in meta:
            return tuple(int(s) for s in json.loads(meta[SHAPE_KEY.encode()]))
    return None


def map_store_of(t: pa.DataType) -> str | None:
    """The storage profile a map column's type was written under (``full`` or ``compact``);
    older outputs' float16 tensors are ``compact``, their float32 ones ``full``; None for a
    type that is not a map."""
    if isinstance(t, pa.FixedShapeTensorType):
        return "compact" if t.value_type == pa.float16() else "full"
    if map_shape_of(t) is not None:
        return (t.value_field.metadata or {}).get(STORE_KEY.encode(), b"full").decode()
    return None


def is_tensor_type(t: pa.DataType) -> bool:
    """True for a map column's type: :func:`map_type` (shape in its metadata) or the canonical
    fixed_shape_tensor extension type (any value type and shape)."""
    return map_shape_of(t) is not None


@dataclass(frozen=True)
class OutputLayout:
    """Everything the output columns depend on.

    - ``methods``: the maps computed, any of ``MAP_METHODS`` (order kept in the schema).
    - ``image_shape``: (C, H, W) of the model input; maps are (H, W), IG is (C, H, W).
    - ``stat_names``: the statistic columns, in order (``stats.row_statistics`` keys).
    - ``topk``: K with ``topk:K`` targets (every per-target column gains a K axis), else None.
    - ``num_reported``: R, the width of ``topk_classes`` / ``topk_probs`` (min(5, classes)).
    - ``id_type`` / ``label_type``: Arrow types of the passed-through columns (no label: None).
    - ``has_ig_scalars``: whether ``baseline_score`` and ``ig_delta`` exist (IG computed).
    - ``has_names``: whether class names are known (``target_name``, ``pred_name`` columns).
    - ``store``: the storage profile, ``full`` (default here), ``compact`` or ``stats``;
      ``map_size``: M of compact maps (never above H).
    - ``adaptive_ig``: IG with ``ig_steps="auto"``: the columns ``ig_steps``, ``ig_error_est``,
      ``ig_converged`` and ``ig_path`` exist (with IG only).
    """

    methods: tuple[str, ...]
    image_shape: tuple[int, int, int]
    stat_names: tuple[str, ...] = ()
    topk: int | None = None
    num_reported: int = 5
    id_type: pa.DataType = field(default_factory=pa.string)
    label_type: pa.DataType | None = None
    store: str = "full"
    map_size: int = DEFAULT_MAP_SIZE
    has_names: bool = False
    adaptive_ig: bool = False

    def __post_init__(self):
        bad = [m for m in self.methods if m not in MAP_METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown methods {bad}; choose from {', '.join(MAP_METHODS)}")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape!r}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk!r}")
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        object.__setattr__(self, "stat_names", tuple(self.stat_names))
        check_profile(self.store, self.map_size)
        m = effective_map_size(self.map_size, min(self.image_shape[1:]))
        object.__setattr__(self, "map_size", m)

    @property
    def has_ig_scalars(self) -> bool:
        return "integrated_gradients" in self.methods

    @property
    def has_adaptive_ig(self) -> bool:
        return self.adaptive_ig and self.has_ig_scalars

    def map_shape(self, method: str) -> tuple[int, ...] | None:
        """Shape of one row's stored ``method`` map, K in front for topk; None under ``stats``.

        ``full``: (H, W), or (C, H, W) for IG; ``compact``: (M, M) for every method."""
        base = stored_shape(method, self.image_shape, self.store, self.map_size)
        if base is None:
            return None
        return (self.topk, *base) if self.topk else base

    def map_type(self, method: str) -> pa.DataType | None:
        """Stored type of ``method``'s map (:func:`map_type` of :meth:`map_shape`, float32
        under every profile; compact values are bfloat16-rounded); None under ``stats``."""
        shape = self.map_shape(method)
        return None if shape is None else map_type(shape, self.store)

    def per_target_type(self, value_type: pa.DataType) -> pa.DataType:
        """``value_type``, or a fixed_size_list of K of it with topk targets."""
        return pa.list_(value_type, self.topk) if self.topk else value_type

    def per_target_columns(self) -> tuple[str, ...]:
        """Columns with one value per target: they gain the K axis with topk targets."""
        cols = ["target", "score"]
        if self.has_ig_scalars:
            cols += ["baseline_score", "ig_delta"]
        if self.has_adaptive_ig:
            cols += ["ig_steps", "ig_error_est", "ig_converged", "ig_path"]
        return (*cols, *self.stat_names)


def output_schema(layout: OutputLayout) -> pa.Schema:
    """The pyarrow schema of the output rows for ``layout`` (see the module docstring)."""
    fields: list[pa.Field] = [pa.field("id", layout.id_type)]
    if layout.label_type is not None:
        fields.append(pa.field("label", layout.label_type))
        if pa.types.is_integer(layout.label_type):
            fields.append(pa.field("correct", pa.bool_()))
    fields += [
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("target", layout.per_target_type(pa.int64())),
    ]
    if layout.has_names:
        fields.append(pa.field("target_name", NAME_TYPE if not layout.topk else
                               pa.list_(pa.string(), layout.topk)))  # fmt: skip
    fields += [pa.field("pred_class", pa.int64())]
    if layout.has_names:
        fields.append(pa.field("pred_name", NAME_TYPE))
    fields += [
        pa.field("pred_prob", pa.float32()),
        pa.field("topk_classes", pa.list_(pa.int64(), layout.num_reported)),
        pa.field("topk_probs", pa.list_(pa.float32(), layout.num_reported)),
        pa.field("score", layout.per_target_type(pa.float32())),
    ]
    if layout.has_ig_scalars:
        fields += [
            pa.field("baseline_score", layout.per_target_type(pa.float32())),
            pa.field("ig_delta", layout.per_target_type(pa.float32())),
        ]
    if layout.has_adaptive_ig:
        fields += [
            pa.field("ig_steps", layout.per_target_type(pa.int32())),
            pa.field("ig_error_est", layout.per_target_type(pa.float32())),
            pa.field("ig_converged", layout.per_target_type(pa.bool_())),
            pa.field("ig_path", layout.per_target_type(IG_PATH_TYPE)),
        ]
    shapes = {}
    for method in MAP_METHODS:
        if method in layout.methods and layout.map_shape(method) is not None:
            shapes[method] = list(layout.map_shape(method))
            fields.append(pa.field(method, layout.map_type(method)))
    for name in layout.stat_names:
        fields.append(pa.field(name, layout.per_target_type(pa.float32())))
    fields += [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
    ]
    fields = [_described(f, layout) for f in fields]
    meta = {
        "xai_workers.schema_version": SCHEMA_VERSION,
        "xai_workers.store": layout.store,
        "xai_workers.map_size": str(layout.map_size),
        # the maps' canonical shapes, where a reader sees only the file's key-value metadata
        # (DuckDB ``parquet_kv_metadata``, Spark)
        "xai_workers.shapes": json.dumps(shapes),
    }
    return pa.schema(fields, metadata=meta)


# --------------------------------------------------------------------------------------------
# numpy -> Arrow
# --------------------------------------------------------------------------------------------


def tensor_array(
    values: np.ndarray,
    valid: np.ndarray | None = None,
    shape: Sequence[int] | None = None,
    value_type: pa.DataType | None = None,
) -> pa.ExtensionArray:
    """(N, *shape) values -> a canonical fixed_shape_tensor array of ``value_type`` (float32 by
    default), null where ``valid`` is False (the values stored under a null are zeros).
    ``shape`` defaults to values.shape[1:].
    """
    value_type = value_type or pa.float32()
    values = np.asarray(values, dtype=value_type.to_pandas_dtype())
    shape = tuple(values.shape[1:]) if shape is None else tuple(int(s) for s in shape)
    n = values.shape[0]
    size = int(np.prod(shape)) if shape else 1
    if values.size != n * size:
        raise ValueError(f"values of shape {values.shape} do not hold {n} tensors of {shape}")
    flat = values.reshape(n * size)
    mask = None
    if valid is not None and not np.all(valid):
        flat = flat.copy()
        flat.reshape(n, size)[~np.asarray(valid, dtype=bool)] = 0.0
        mask = pa.array(~np.asarray(valid, dtype=bool))
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), size, mask=mask)
    return pa.ExtensionArray.from_storage(tensor_type(shape, value_type), storage)


def map_array(values: np.ndarray, valid: np.ndarray | None, t: pa.DataType) -> pa.Array:
    """(N, *shape) values -> an array of the map type ``t`` (:func:`map_type`), null where
    ``valid`` is False (zeros stored under a null). The values are stored as float32, as given
    (the compact profile's bfloat16 rounding happens in ``profiles.reduce_map``)."""
    shape = map_shape_of(t)
    size = t.list_size
    values = np.asarray(values, dtype=np.float32)
    n = values.shape[0]
    if values.size != n * size:
        raise ValueError(f"values of shape {values.shape} do not hold {n} maps of {shape}")
    flat = values.reshape(n, size)
    mask = None
    if valid is not None and not np.all(valid):
        invalid = ~np.asarray(valid, dtype=bool)
        flat = flat.copy()
        flat[invalid] = 0.0
        mask = pa.array(invalid)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), type=t, mask=mask)


def _correct(labels, pred: np.ndarray | None, valid: np.ndarray) -> pa.Array:
    """bool (N,): ``pred == label`` where the row is ok and its label is not null, else null."""
    n = len(valid)
    if pred is None or labels is None:
        return pa.nulls(n, pa.bool_())
    lab = labels if isinstance(labels, pa.Array) else pa.array(labels)
    known = valid & ~np.asarray(lab.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    lab_np = np.asarray(lab.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    pred = np.asarray(pred).reshape(n, -1)[:, 0]
    return pa.array(pred == lab_np, type=pa.bool_(), mask=~known)


def _to_arrow(values, t: pa.DataType, valid: np.ndarray | None, n: int) -> pa.Array:
    """numpy values (N, ...) -> an Arrow array of type ``t``, null where ``valid`` is False."""
    invalid = None if valid is None or np.all(valid) else ~np.asarray(valid, dtype=bool)
    if values is None:
        return pa.nulls(n, type=t)
    if isinstance(t, pa.FixedShapeTensorType):
        return tensor_array(values, None if invalid is None else ~invalid, t.shape, t.value_type)
    if is_tensor_type(t):
        return map_array(values, None if invalid is None else ~invalid, t)
    if pa.types.is_struct(t) or (
        pa.types.is_fixed_size_list(t) and pa.types.is_struct(t.value_type)
    ):
        # ig_path: per row a dict (a list of K dicts with topk) of Python lists
        items = list(values)
        if invalid is not None:
            items = [None if bad else v for v, bad in zip(items, invalid, strict=True)]
        return pa.array(items, type=t)
    if pa.types.is_fixed_size_list(t):
        size = t.list_size
        arr = np.asarray(values, dtype=t.value_type.to_pandas_dtype()).reshape(n, size)
        if invalid is not None:
            arr = arr.copy()
            arr[invalid] = None if pa.types.is_string(t.value_type) else 0
        child = pa.array(arr.reshape(n * size), type=t.value_type)
        mask = None if invalid is None else pa.array(invalid)
        return pa.FixedSizeListArray.from_arrays(child, type=t, mask=mask)
    if isinstance(values, np.ndarray) and values.dtype != object:
        arr = values.reshape(n)
        if invalid is not None:
            arr = arr.copy()
            arr[invalid] = 0
        return pa.array(arr, type=t, mask=None if invalid is None else invalid)
    items = list(values)
    if invalid is not None:
        items = [None if bad else v for v, bad in zip(items, invalid, strict=True)]
    return pa.array(items, type=t)


def build_table(
    schema: pa.Schema,
    *,
    ids: pa.Array | Sequence,
    sources: pa.Array | Sequence[str],
    source_rows: pa.Array | Sequence[int],
    errors: Sequence[str | None],
    values: Mapping[str, np.ndarray] | None = None,
    labels: pa.Array | Sequence | None = None,
) -> pa.Table:
    """A table in ``schema`` for N rows.

    ``errors[i]`` None makes row i an ``ok`` row, a string makes it an ``error`` row whose
    computed columns are all null. ``values`` maps computed column names to numpy arrays with N
    rows (e.g. ``saliency`` (N, H, W) float32, ``target`` (N,) or (N, K) int64); what they hold
    on error rows is ignored. A computed column missing from ``values`` is all null (so
    ``values=None`` gives an all-error table). ``ids`` / ``labels`` are cast to the schema's
    types; ``labels`` is required when the schema has a ``label`` column.
    """
    n = len(errors)
    valid = np.array([e is None for e in errors], dtype=bool)
    values = values or {}
    unknown = set(values) - set(schema.names)
    if unknown:
        raise ValueError(f"values for columns not in the schema: {sorted(unknown)}")
    columns = []
    for f in schema:
        if f.name == "id":
            col = pa.array(ids, type=f.type) if not isinstance(ids, pa.Array) else ids.cast(f.type)
        elif f.name == "label":
            if labels is None:
                raise ValueError("the schema has a label column: pass labels")
            col = (
                labels.cast(f.type)
                if isinstance(labels, pa.Array)
                else pa.array(labels, type=f.type)
            )
        elif f.name == "correct":
            col = _correct(labels, values.get("pred_class"), valid)
        elif f.name == "status":
            col = pa.array(np.where(valid, STATUS_OK, STATUS_ERROR).tolist(), type=pa.string())
        elif f.name == "error":
            col = pa.array(list(errors), type=pa.string())
        elif f.name == "source":
            col = (
                sources.cast(f.type) if isinstance(sources, pa.Array) else pa.array(sources, f.type)
            )
        elif f.name == "source_row":
            col = (
                source_rows.cast(f.type)
                if isinstance(source_rows, pa.Array)
                else pa.array(np.asarray(source_rows, dtype=np.int64), f.type)
            )
        else:
            col = _to_arrow(values.get(f.name), f.type, valid, n)
        if len(col) != n:
            raise ValueError(f"column {f.name!r} has {len(col)} rows, expected {n}")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def error_table(
    schema: pa.Schema,
    *,
    ids,
    sources,
    source_rows,
    errors: Sequence[str],
    labels=None,
) -> pa.Table:
    """N error rows in ``schema``: every computed column null, ``error`` set."""
    return build_table(
        schema,
        ids=ids,
        sources=sources,
        source_rows=source_rows,
        errors=[str(e) for e in errors],
        labels=labels,
    )


# --------------------------------------------------------------------------------------------
# Arrow -> numpy (for readers of the output)
# --------------------------------------------------------------------------------------------


def tensor_to_numpy(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """A stored map column -> ``dtype`` (float32) ndarray (N, *shape) of its canonical shape.

    Reads every map type the job has written: :func:`map_type` (shape from its element field's
    metadata, which pyarrow keeps through Parquet), ``fixed_shape_tensor`` (outputs before
    schema version 2; their float16 compact maps are widened exactly), or a plain fixed-size
    or variable list of floats without a shape (then (N, length); every row of a variable
    list must have the same length). Null rows (error rows) come back as NaN::

        t = pq.read_table("out/attributions")
        sal = tensor_to_numpy(t["saliency"])  # (N, M, M) compact, (N, H, W) full
    """
    if isinstance(column, pa.ChunkedArray):
        chunks = column.chunks
        t = column.type
    else:
        chunks, t = [column], column.type
    shape = map_shape_of(t)
    parts = []
    for chunk in chunks:
        storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        if pa.types.is_fixed_size_list(storage.type):
            size = storage.type.list_size
            vals = storage.values.slice(storage.offset * size, len(storage) * size)
        else:  # list<float> (e.g. a map column rewritten by another engine)
            lengths = storage.value_lengths().drop_null().unique().to_pylist()
            if len(lengths) > 1:
                raise ValueError(f"map rows of different lengths {sorted(lengths)[:5]}")
            size = lengths[0] if lengths else 0
            vals = storage.fill_null(pa.scalar([0.0] * size, storage.type)).flatten()
        arr = vals.to_numpy(zero_copy_only=False).astype(dtype, copy=True)
        arr = arr.reshape(len(storage), *(shape or (size,)))
        if storage.null_count:
            arr[np.asarray(storage.is_null())] = np.nan
        parts.append(arr)
    if not parts:
        return np.zeros((0, *(shape or (0,))), dtype=dtype)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, order and types (a cheap check-and-cast).

    Raises ValueError naming the columns that are missing or extra.
    """
    if table.schema.equals(schema, check_metadata=False):
        return table.replace_schema_metadata(schema.metadata)
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise ValueError(
            f"table does not match the output schema: missing {missing}, extra {extra}"
        )
    cols = []
    for f in schema:
        col = table.column(f.name)
        cols.append(col if col.type.equals(f.type) else col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)
