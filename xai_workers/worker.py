"""``AttributionWorker``: the callable class the batch job runs on each actor (plain PyTorch).

One worker holds one model, loaded and prepared once (``engine.prepare_model``: BatchNorm folded,
channels_last, frozen) on its device (CUDA when there is one, else the CPU). It is called with
batches of preprocessed rows and returns them as a ``pyarrow.Table`` in the output schema
(``schema.output_schema``). A row the worker cannot explain (a decoding error carried from the
preprocessing stage, a null or out-of-range label, a non-finite input, an exception inside the
model) becomes an error row; the batch goes on. Nothing here imports Ray.

Input batch (a ``pyarrow.Table``; ``batch_columns`` lists the names):

- ``id``: any type; ``label`` (only with a label column): integer for ``target="label"``;
- ``x``: canonical ``fixed_shape_tensor<float32>[3, S, S]``, the model input (input space), null
  on rows that could not be preprocessed; ``error``: string, the reason for those rows, else null;
- ``source`` (string) and ``source_row`` (int64): where the row came from; passed through.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from xai_workers import schema as S
from xai_workers.cams import FAMILY, SMOOTHGRAD
from xai_workers.engine import LAYER_METHODS
from xai_workers.profiles import DEFAULT_MAP_SIZE, DEFAULT_PROFILE, check_profile
from xai_workers.summary import MAP_METHODS as SUMMARY_MAP_METHODS
from xai_workers.summary import MAP_SIZE as SUMMARY_MAP_SIZE
from xai_workers.summary import POOLED_PREFIX

#: Columns an input batch carries (``label`` only with a label column).
BATCH_COLUMNS = ("id", "label", "x", "error", "source", "source_row")
TARGET_HELP = "predicted | label | <class index> | topk:K"


def parse_target(target: str | int | None) -> tuple[str, int | None]:
    """``target`` setting -> ("predicted", None) | ("label", None) | ("class", c) | ("topk", K).

    Raises ValueError with the accepted forms for anything else.
    """
    if target is None:
        return "predicted", None
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if target < 0:
            raise ValueError(f"target class must be >= 0, got {target}")
        return "class", int(target)
    t = str(target).strip()
    if t in ("predicted", "label"):
        return t, None
    if t.startswith("topk:"):
        k = t.split(":", 1)[1]
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"bad target {target!r}: topk needs K >= 1, e.g. topk:3")
        return "topk", int(k)
    if t.isdigit():
        return "class", int(t)
    raise ValueError(f"bad target {target!r}; expected {TARGET_HELP}")


def default_device() -> torch.device:
    """CUDA (the actor's first visible GPU) when available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), not OMP_NUM_THREADS.

    Ray sets ``OMP_NUM_THREADS`` (and so torch's default thread count) from an actor's CPU
    *request*, which may be a fraction of the cores it really has; on a 2-core machine that halves
    the throughput of a single CPU actor.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def stat_names(
    methods: Sequence[str], image_shape: tuple[int, int, int], topk: int | None
) -> tuple:
    """The statistic columns ``stats.row_statistics`` gives for these methods, in its order.

    Found by calling it on a zero result of the right shapes (one row), so the schema follows the
    stats module without a second list of names here.
    """
    from xai_workers.stats import row_statistics

    c, h, w = image_shape
    lead = (1, topk) if topk else (1,)
    fake: dict[str, torch.Tensor] = {"score": torch.zeros(lead), "target": torch.zeros(lead)}
    if "integrated_gradients" in methods:
        fake["integrated_gradients"] = torch.zeros(*lead, c, h, w)
        fake["baseline_score"] = torch.zeros(lead)
        fake["ig_delta"] = torch.zeros(lead)
    for m in ("saliency", "gradcam", "cam", *FAMILY, *SMOOTHGRAD):
        if m in methods:
            fake[m] = torch.zeros(*lead, h, w)
    return tuple(row_statistics(fake))


def output_layout(
    methods: Sequence[str],
    image_size: int,
    num_classes: int,
    target: str | int | None = "predicted",
    *,
    id_type: pa.DataType | None = None,
    label_type: pa.DataType | None = None,
    store: str = DEFAULT_PROFILE,
    map_size: int = DEFAULT_MAP_SIZE,
    has_names: bool = False,
    adaptive_ig: bool = False,
    faithfulness: Sequence[str] = (),
) -> S.OutputLayout:
    """The output layout a worker with these settings produces (the driver uses it too);
    ``adaptive_ig``: IG runs with ``ig_steps="auto"``."""
    from xai_workers.faithfulness import column_names

    mode, value = parse_target(target)
    topk = value if mode == "topk" else None
    image_shape = (3, int(image_size), int(image_size))
    faithful = column_names(methods, faithfulness) if faithfulness else ()
    return S.OutputLayout(
        methods=tuple(methods),
        image_shape=image_shape,
        stat_names=stat_names(methods, image_shape, topk) + faithful,
        topk=topk,
        num_reported=min(5, int(num_classes)),
        id_type=id_type if id_type is not None else pa.string(),
        label_type=label_type,
        store=store,
        map_size=map_size,
        has_names=has_names,
        adaptive_ig=adaptive_ig,
    )


class AttributionWorker:
    """Explain batches of preprocessed rows with one model; one instance per actor.

    Args:
        model: a model spec for ``models.load_model`` (``torchvision:resnet18``,
            ``torchscript:<uri>``, ``<module>:<callable>``), or an ``nn.Module`` (tests,
            notebooks; then ``image_size``/``mean``/``std`` describe its preprocessing).
        weights: state_dict (local or ``s3://``), torchvision weights name or ``random``
            (seeded by ``seed``), for a spec.
        methods: maps to compute, any of saliency, integrated_gradients, gradcam, cam.
        target: ``predicted`` (default), ``label`` (the row's label), a class index, ``topk:K``.
        ig_steps, ig_method: the IG quadrature (``ig_steps="auto"``: per image, to ``ig_tol``
            with at most ``ig_max_steps`` gradient evaluations; see ``engine.attribute``);
            ig_baseline: black | gray | blur | uniform | zeros (``engine.make_baseline``, seeded
            with ``seed``; so is ``weights="random"``).
        gradcam_layer: dotted layer name; None: ``hooks.default_gradcam_layer``, found once here.
        score: ``logit`` or ``prob``; precision: ``fp32`` | ``bf16`` | ``auto`` (engine).
        batch_size: images per ``attribute`` call (a bigger Ray batch is cut into these).
        image_size, resize_size, interpolation, mean, std: preprocessing overrides (default:
            the model's own).
        s3_endpoint: S3 endpoint for the weights (else ``$AWS_ENDPOINT_URL``).
        faithfulness: any of ``deletion``, ``insertion`` (``faithfulness.curves``): the columns
            ``{method}_{metric}_auc`` and ``random_{metric}_auc``, with ``faithfulness_steps``
            steps; deletion puts the IG baseline (``ig_baseline``) in, insertion starts from
            ``make_baseline(x, "blur")``; the random order is seeded from the row's
            (source, source_row) (``faithfulness.row_key``).
        device: ``cuda``/``cpu``/...; None: CUDA if available, else CPU.
        num_threads: torch threads on the CPU; None: every core of the affinity mask.
        id_type, label_type: Arrow types of the passed-through ``id`` and ``label`` columns
            (``label_type`` None: the input has no label column).
        store: storage profile of the maps, ``compact`` (default: ``map_size`` x
            ``map_size`` rounded to bfloat16, IG summed over channels), ``full`` (float32 as
            computed) or ``stats`` (no maps); ``xai_workers.profiles``. Statistics come from
            the full maps under every profile.
        map_size: side of compact maps (default 64; never above the image size).
        class_names: one name per class of the model (index -> name), or None; when given, rows
            gain ``target_name`` and ``pred_name``. Its length must be the model's classes.

        pooled_columns: when True (the job sets it), the returned table also carries, per method
            of ``summary.MAP_METHODS`` computed, a column ``_pooled_<method>`` (float64
            (32, 32): the row's 2-D map pooled from the full map, what ``summary.Summary``
            accumulates), so the summary is the same under every profile. Columns whose name
            starts with ``_`` are in-flight only: the job's writer drops them. Default False:
            the table is exactly ``self.schema``.
    """

    def __init__(
        self,
        model: str | nn.Module,
        weights: str | None = None,
        *,
        methods: Sequence[str] = ("saliency", "integrated_gradients", "gradcam"),
        target: str | int | None = "predicted",
        ig_steps: int | str = 32,
        ig_method: str = "gausslegendre",
        ig_tol: float = 0.01,
        ig_max_steps: int = 256,
        ig_baseline: str = "black",
        gradcam_layer: str | None = None,
        score: str = "logit",
        precision: str = "fp32",
        batch_size: int = 16,
        batch_budget_mb: float | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        s3_endpoint: str | None = None,
        device: str | torch.device | None = None,
        num_threads: int | None = None,
        id_type: pa.DataType | None = None,
        label_type: pa.DataType | None = None,
        seed: int = 0,
        store: str = DEFAULT_PROFILE,
        map_size: int = DEFAULT_MAP_SIZE,
        pooled_columns: bool = False,
        class_names: Sequence[str] | None = None,
        faithfulness: Sequence[str] = (),
        faithfulness_steps: int = 16,
        smoothgrad_samples: int = 16,
        smoothgrad_sigma: float = 0.15,
    ):
        from xai_workers.engine import BASELINES, keep_freed_memory, prepare_model
        from xai_workers.hooks import default_gradcam_layer, get_submodule
        from xai_workers.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cpu":
            self.num_threads = int(num_threads or available_cores())
            torch.set_num_threads(self.num_threads)
            keep_freed_memory()  # about 9% faster on a CPU: see engine.keep_freed_memory
        else:
            self.num_threads = torch.get_num_threads()
        self.mode, self.target_value = parse_target(target)
        if ig_baseline not in BASELINES:
            raise ValueError(f"unknown IG baseline {ig_baseline!r}; one of {', '.join(BASELINES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_profile(store, map_size)
        from xai_workers.faithfulness import METRICS

        self.faithfulness, self.faithfulness_steps = tuple(faithfulness), int(faithfulness_steps)
        self.smoothgrad_samples, self.smoothgrad_sigma = int(smoothgrad_samples), smoothgrad_sigma
        if (
            any(m not in METRICS for m in self.faithfulness)
            or len(set(self.faithfulness)) != len(self.faithfulness)
            or self.faithfulness_steps < 1
        ):
            raise ValueError(
                f"faithfulness must be any of {', '.join(METRICS)} (each once) with steps >= 1, "
                f"got {faithfulness!r}, {faithfulness_steps!r}"
            )

        if isinstance(model, nn.Module):
            module = model
            self.preprocessing = Preprocessing(
                image_size=image_size or 224,
                resize_size=resize_size,
                interpolation=interpolation or "bilinear",
                mean=tuple(mean) if mean is not None else IMAGENET_MEAN,
                std=tuple(std) if std is not None else IMAGENET_STD,
            )
            self.checksum = None
            s = self.preprocessing.image_size
            with torch.no_grad():
                self.num_classes = int(module.eval()(torch.zeros(1, 3, s, s)).shape[1])
        else:
            from xai_workers.models import load_model

            loaded = load_model(
                model,
                weights,
                image_size=image_size,
                resize_size=resize_size,
                interpolation=interpolation,
                mean=mean,
                std=std,
                seed=seed,
                s3_endpoint=s3_endpoint,
            )
            module, self.preprocessing = loaded.module, loaded.preprocessing
            self.num_classes, self.checksum = loaded.num_classes, loaded.checksum
        if self.mode == "class" and self.target_value >= self.num_classes:
            raise ValueError(
                f"target class {self.target_value} is not a class of this model "
                f"(0..{self.num_classes - 1})"
            )
        if self.mode == "topk" and self.target_value > self.num_classes:
            raise ValueError(f"topk:{self.target_value} > the model's {self.num_classes} classes")
        if self.mode == "label" and label_type is None:
            raise ValueError("target 'label' needs a label column")
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a model with {self.num_classes} classes"
            )
        self.class_names = None if class_names is None else np.array(list(class_names), object)

        self.net = prepare_model(module, device=self.device, gradcam_layer=gradcam_layer)
        s = self.preprocessing.image_size
        self.methods = tuple(methods)
        if gradcam_layer is None and any(m in LAYER_METHODS for m in self.methods):
            gradcam_layer = default_gradcam_layer(
                self.net, torch.zeros(1, 3, s, s, device=self.device)
            )
        elif gradcam_layer is not None:
            get_submodule(self.net, gradcam_layer)  # a readable KeyError if it is not there
        self.gradcam_layer = gradcam_layer
        self.ig_steps = "auto" if ig_steps == "auto" else int(ig_steps)
        self.ig_method, self.ig_baseline = ig_method, ig_baseline
        self.ig_tol, self.ig_max_steps = float(ig_tol), int(ig_max_steps)
        self.score, self.precision = score, precision
        self.batch_size, self.batch_budget_mb, self.seed = int(batch_size), batch_budget_mb, seed
        self.layout = output_layout(
            self.methods, s, self.num_classes, target, id_type=id_type, label_type=label_type,
            store=store, map_size=map_size, has_names=class_names is not None,
            adaptive_ig=self.ig_steps == "auto", faithfulness=self.faithfulness,
        )  # fmt: skip
        self.store, self.map_size = self.layout.store, self.layout.map_size
        self.pooled_columns = bool(pooled_columns)
        self.schema = S.output_schema(self.layout)
        #: rows seen, rows in error, seconds inside ``attribute`` (for the curious)
        self.counters = {"rows": 0, "errors": 0, "compute_s": 0.0}

    # ----------------------------------------------------------------------------------------

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows in (module docstring) -> the same rows, same order, in ``self.schema``."""
        if not isinstance(batch, pa.Table):
            batch = pa.Table.from_pydict(batch) if isinstance(batch, dict) else pa.table(batch)
        n = batch.num_rows
        errors: list[str | None] = (
            batch.column("error").to_pylist() if "error" in batch.column_names else [None] * n
        )
        has_label = self.layout.label_type is not None
        labels = batch.column("label") if has_label else None
        x_col = batch.column("x")
        if x_col.null_count:
            for i, is_null in enumerate(x_col.is_null().to_pylist()):
                if is_null and errors[i] is None:
                    errors[i] = "no input tensor for this row"
        if has_label and pa.types.is_integer(self.layout.label_type):
            self._check_labels(labels, errors)
        ok = np.array([e is None for e in errors], dtype=bool)
        values: dict[str, np.ndarray] = {}
        if ok.any():
            idx = np.flatnonzero(ok)
            x = self._tensor(x_col, idx)
            targets = self._targets(labels, idx, errors) if self.mode == "label" else None
            bad = ~torch.isfinite(x.reshape(len(idx), -1)).all(dim=1).numpy()
            for j in np.flatnonzero(bad):
                errors[idx[j]] = "input has NaN or infinite values"
            keep = np.array([errors[i] is None for i in idx], dtype=bool)
            if keep.any():
                keys = self._row_keys(batch, idx[keep])
                values = self._explain(
                    x[keep], None if targets is None else targets[keep], idx[keep], n, errors, keys
                )
        self.counters["rows"] += n
        self.counters["errors"] += sum(e is not None for e in errors)
        if self.class_names is not None and "pred_class" in values:
            values["pred_name"] = self.class_names[values["pred_class"]]
            values["target_name"] = self.class_names[values["target"]]
        names = set(self.schema.names)
        table = S.build_table(
            self.schema,
            ids=batch.column("id").combine_chunks(),
            labels=labels.combine_chunks() if has_label else None,
            sources=batch.column("source").combine_chunks(),
            source_rows=batch.column("source_row").combine_chunks(),
            errors=errors,
            values={k: v for k, v in values.items() if k in names},
        )
        valid = np.array([e is None for e in errors], dtype=bool)
        for m in self.pooled_methods:
            key = POOLED_PREFIX + m
            size = SUMMARY_MAP_SIZE
            v = values.get(key, np.zeros((n, size, size)))
            table = table.append_column(key, S.tensor_array(v, valid, None, pa.float64()))
        return table

    @property
    def pooled_methods(self) -> tuple[str, ...]:
        """The methods whose ``_pooled_<method>`` column the worker adds (class docstring)."""
        if not self.pooled_columns:
            return ()
        return tuple(m for m in SUMMARY_MAP_METHODS if m in self.methods)

    # ----------------------------------------------------------------------------------------

    def _tensor(self, x_col: pa.ChunkedArray, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` of the x column as a float32 (n, 3, S, S) CPU tensor."""
        arr = S.tensor_to_numpy(x_col)[idx]
        s = self.preprocessing.image_size
        if arr.shape[1:] != (3, s, s):
            raise ValueError(
                f"input tensors are {arr.shape[1:]}, the model expects (3, {s}, {s}): the "
                "preprocessing stage and the worker disagree on the image size"
            )
        return torch.from_numpy(np.ascontiguousarray(arr))

    def _check_labels(self, labels: pa.ChunkedArray, errors: list) -> None:
        """A non-null integer label outside the model's classes makes its row an error row."""
        for i, v in enumerate(labels.to_pylist()):
            if v is not None and errors[i] is None and not 0 <= v < self.num_classes:
                errors[i] = (
                    f"label {v} is not a class index of this model (0..{self.num_classes - 1})"
                )

    def _targets(self, labels: pa.ChunkedArray, idx: np.ndarray, errors: list) -> torch.Tensor:
        """Per-row target classes from the label column; bad labels become row errors."""
        raw = labels.combine_chunks().take(pa.array(idx)).to_pylist()
        out = np.zeros(len(idx), dtype=np.int64)
        for j, v in enumerate(raw):
            if v is None:
                errors[idx[j]] = "label is null (target 'label' needs one)"
            elif isinstance(v, (bool, float, str)) or not 0 <= int(v) < self.num_classes:
                errors[idx[j]] = (
                    f"label {v!r} is not a class index of this model (0..{self.num_classes - 1})"
                )
            else:
                out[j] = int(v)
        return torch.from_numpy(out)

    def _row_keys(self, batch: pa.Table, idx: np.ndarray) -> list[int] | None:
        """``faithfulness.row_key`` of rows ``idx``: what seeds their random pixel order and their
        SmoothGrad noise (None when neither is computed)."""
        if not self.faithfulness and not any(m in SMOOTHGRAD for m in self.methods):
            return None
        from xai_workers.faithfulness import row_key

        src = batch.column("source").to_pylist()
        row = batch.column("source_row").to_pylist()
        return [row_key(src[i], row[i]) for i in idx]

    def _attribute(
        self, x: torch.Tensor, targets: torch.Tensor | None, keys: list[int] | None = None
    ) -> dict[str, np.ndarray]:
        """One ``attribute`` call + statistics on CPU tensors -> numpy arrays per column."""
        from xai_workers.engine import attribute, make_baseline
        from xai_workers.profiles import reduce_maps
        from xai_workers.stats import row_statistics
        from xai_workers.summary import pooled_maps

        x = x.to(self.device)
        if self.mode == "topk":
            target = f"topk:{self.target_value}"
        elif self.mode == "class":
            target = self.target_value
        elif self.mode == "label":
            target = targets.to(self.device)
        else:
            target = None
        baseline = None
        if "integrated_gradients" in self.methods and self.ig_baseline != "zeros":
            baseline = make_baseline(x, self.ig_baseline, self.preprocessing, seed=self.seed)
        t0 = time.perf_counter()
        result = attribute(
            self.net,
            x,
            target=target,
            methods=self.methods,
            ig_steps=self.ig_steps,
            ig_method=self.ig_method,
            ig_tol=self.ig_tol,
            ig_max_steps=self.ig_max_steps,
            baseline=baseline,
            gradcam_layer=self.gradcam_layer,
            score=self.score,
            batch_budget_mb=self.batch_budget_mb,
            precision=self.precision,
            smoothgrad_samples=self.smoothgrad_samples,
            smoothgrad_sigma=self.smoothgrad_sigma,
            noise_keys=keys,
        )
        stats = row_statistics(result)  # from the full maps, under every profile
        if self.faithfulness:
            stats.update(self._faithfulness(x, result, keys, baseline))
        pooled = {
            POOLED_PREFIX + m: pooled_maps(m, result[m].detach().cpu().numpy())
            for m in self.pooled_methods
        }
        result = reduce_maps(result, self.store, self.map_size)
        self.counters["compute_s"] += time.perf_counter() - t0
        names = set(self.schema.names)
        out = {k: v.detach().cpu().numpy() for k, v in result.items() if k in names}
        out.update({k: v.detach().cpu().numpy() for k, v in stats.items() if k in names})
        out.update(pooled)
        if "ig_path" in names:
            out["ig_path"] = _path_rows(
                out["ig_steps"], result["ig_path_alpha"], result["ig_path_score"]
            )
        return out

    def _faithfulness(self, x, result, keys, baseline=None) -> dict[str, torch.Tensor]:
        """Deletion/insertion AUCs of every method's 2-D map (``stats.map_2d``). ``baseline``:
        the IG baseline already built for this batch (the same kind), reused."""
        from xai_workers.engine import make_baseline
        from xai_workers.faithfulness import deletion_insertion
        from xai_workers.stats import map_2d

        maps = {m: map_2d(m, result[m]) for m in self.methods if m in result}
        kind = self.ig_baseline
        base = baseline
        if base is None:
            base = (
                torch.zeros_like(x[:1])
                if kind == "zeros"
                else make_baseline(x, kind, self.preprocessing, seed=self.seed)
            )
        # the blurred image insertion starts from: the baseline itself when it is the blur
        blurred = base if kind == "blur" else make_baseline(x, "blur", self.preprocessing)
        return deletion_insertion(
            self.net,
            x,
            result["target"],
            maps,
            base,
            blurred,
            steps=self.faithfulness_steps,
            metrics=self.faithfulness,
            keys=keys,
            budget_mb=self.batch_budget_mb,
            known=self._known_at_x(x, result),
        )

    def _known_at_x(self, x, result) -> dict[str, torch.Tensor] | None:
        """The targets' softmax probabilities at x from the trio's own pass at x (its top-5),
        when that pass ran in fp32 (the curves' score is fp32) and every target is among the
        top 5 (the predicted class always is; ``topk:K`` with K <= 5): the curves then skip
        x's forward. None otherwise."""
        if self.precision == "bf16" or (self.precision == "auto" and x.device.type == "cuda"):
            return None
        classes, probs = result["topk_classes"], result["topk_probs"]
        t = result["target"].reshape(len(x), -1)
        hit = classes[:, None, :] == t[:, :, None]  # (N, T, 5)
        if not bool(hit.any(dim=-1).all()):
            return None
        return {"image": (probs.double()[:, None, :] * hit).sum(dim=-1)}

    def _explain(self, x, targets, rows, n, errors, keys=None) -> dict[str, np.ndarray]:
        """Attribute ``x`` (rows ``rows`` of a batch of ``n``) in chunks of ``batch_size``.

        A chunk that raises is redone row by row, so one bad row costs one error row and the
        others still get their results. Returns full-height (n, ...) arrays; rows not computed
        hold zeros (they are error rows, whose values are not stored).
        """
        full: dict[str, np.ndarray] = {}

        def put(part: dict[str, np.ndarray], where: np.ndarray):
            for k, v in part.items():
                if k not in full:
                    full[k] = np.zeros((n, *v.shape[1:]), dtype=v.dtype)
                full[k][where] = v

        for start in range(0, len(rows), self.batch_size):
            sl = slice(start, start + self.batch_size)
            xs, ts = x[sl], None if targets is None else targets[sl]
            ks = None if keys is None else keys[sl]
            try:
                put(self._attribute(xs, ts, ks), rows[sl])
            except Exception as e:  # noqa: BLE001 - isolate the row(s) that fail
                if len(xs) == 1:
                    errors[rows[sl][0]] = _describe(e)
                    continue
                for j in range(len(xs)):
                    r = rows[sl][j : j + 1]
                    try:
                        t1 = None if ts is None else ts[j : j + 1]
                        put(
                            self._attribute(
                                xs[j : j + 1], t1, None if ks is None else ks[j : j + 1]
                            ),
                            r,
                        )
                    except Exception as e1:  # noqa: BLE001
                        errors[r[0]] = _describe(e1)
        return full


def _path_rows(steps: np.ndarray, alpha: torch.Tensor, score: torch.Tensor) -> np.ndarray:
    """The engine's padded path traces -> an object array (N,) of ``{"alpha": [...], "score":
    [...]}`` (a list of K of them per row with topk), ``steps[i]`` entries each."""
    alpha, score = alpha.detach().cpu().numpy(), score.detach().cpu().numpy()
    flat_n = steps.reshape(-1)
    a, f = alpha.reshape(len(flat_n), -1), score.reshape(len(flat_n), -1)
    traces = [
        {"alpha": a[i, :m].tolist(), "score": f[i, :m].tolist()} for i, m in enumerate(flat_n)
    ]
    out = np.empty(steps.shape[0], dtype=object)
    per = len(flat_n) // max(steps.shape[0], 1)
    for i in range(steps.shape[0]):
        out[i] = traces[i] if steps.ndim == 1 else traces[i * per : (i + 1) * per]
    return out


def _describe(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"attribution failed: {type(e).__name__}: {msg}"[:500]
