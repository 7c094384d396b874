"""``JobConfig``: every setting of ``xai-audit run``, from flags and/or a YAML file.

The YAML file (``--config job.yaml``) takes the same keys as the flags, with ``-`` or ``_``
(``ig-steps: 16`` or ``ig_steps: 16``); flags given on the command line override it. Checks that
need no I/O happen here (:func:`JobConfig.validate`); the ones that do (input exists, model loads,
layer exists, output writable) happen in ``xai_audit.plan.prepare`` before Ray starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xai_audit.errors import ConfigError
from xai_audit.sources import INPUT_FORMATS, LABELS_FROM
from xai_workers.engine import BASELINES, DEFAULT_METHODS, METHODS
from xai_workers.preprocess import INTERPOLATIONS
from xai_workers.profiles import DEFAULT_MAP_SIZE, DEFAULT_PROFILE, PROFILES
from xai_workers.quadrature import ADAPTIVE_MIN_MAX_STEPS, QUADRATURES

__all__ = ["ConfigError", "JobConfig", "PRECISIONS", "load_yaml", "merge"]

PRECISIONS = ("fp32", "bf16", "auto")


#: ``--s3-endpoint``'s help, the same for every subcommand.
S3_ENDPOINT_HELP = "S3-compatible endpoint (default $AWS_ENDPOINT_URL, else AWS)"


def add_s3_endpoint(parser) -> None:
    """Add ``--s3-endpoint URL`` to an argparse parser (``xai_workers.storage.configure`` takes
    it once per process)."""
    parser.add_argument("--s3-endpoint", metavar="URL", default=None, help=S3_ENDPOINT_HELP)


@dataclass(frozen=True)
class JobConfig:
    """Settings of one attribution job (docs/conventions.md, "Command line").

    Results depend on: input and its columns, model/weights, preprocessing (image_size,
    resize_size, crop_pct, interpolation, mean, std), methods, target, score, ig_*,
    gradcam_layer, precision, seed (also of ``--weights random``). A resumed run must use the
    same values for these (:meth:`result_settings`).
    """

    input: str | None = None
    output: str | None = None
    model: str | None = None
    weights: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    target: str = "predicted"
    score: str = "logit"
    ig_steps: int | str = 32
    ig_tol: float = 0.01
    ig_max_steps: int = 256
    ig_method: str = "gausslegendre"
    ig_baseline: str = "black"
    gradcam_layer: str | None = None
    precision: str = "auto"
    image_size: int | None = None
    resize_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    id_column: str | None = None
    image_column: str = "image"
    label_column: str | None = None
    batch_size: int = 64
    actors: int | None = None
    rows_per_file: int | None = None
    resume: bool = False
    overwrite: bool = False
    unique_ids: bool = False
    incremental: bool = False
    reprocess_changed: bool = False
    max_error_rate: float | None = None
    s3_endpoint: str | None = None
    address: str | None = None
    num_cpus: float | None = None
    seed: int = 0
    progress_interval_s: float = 5.0
    summary: bool = True
    strategies: bool = True  # SpRAy strategies after the summary (xai_audit.strategies)
    store: str = DEFAULT_PROFILE
    map_size: int = DEFAULT_MAP_SIZE
    input_format: str = "auto"
    labels_from: str = "auto"
    class_names: str | None = None
    unknown_labels: str = "error"
    faithfulness: tuple[str, ...] = ()
    faithfulness_steps: int = 16
    smoothgrad_samples: int = 16
    smoothgrad_sigma: float = 0.15

    # ---------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "config") -> JobConfig:
        """A config from a mapping with flag-like keys (``ig-steps`` or ``ig_steps``)."""
        return cls().updated(data, where=where)

    def updated(self, data: Mapping[str, Any], *, where: str = "config") -> JobConfig:
        """A copy with ``data`` (flag-like keys) applied on top; types are coerced."""
        names = set(self.field_names())
        changes: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name == "config":
                continue
            if name not in names:
                close = ", ".join(sorted(names))
                raise ConfigError(f"unknown setting {key!r} in {where}; known settings: {close}")
            changes[name] = _coerce(name, value, where)
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every setting (for the manifest)."""
        out = {}
        for name in self.field_names():
            v = getattr(self, name)
            out[name] = list(v) if isinstance(v, tuple) else v
        return out

    def result_settings(self) -> dict[str, Any]:
        """The settings the output's numbers depend on (compared when resuming)."""
        keys = (
            "input", "model", "weights", "methods", "target", "score", "ig_steps", "ig_method",
            "ig_baseline", "gradcam_layer", "precision", "image_size", "resize_size", "crop_pct",
            "interpolation", "mean", "std",
            "id_column", "image_column", "label_column", "seed", "store", "map_size",
            "input_format", "labels_from", "class_names", "faithfulness", "faithfulness_steps",
            "smoothgrad_samples", "smoothgrad_sigma",
        )  # fmt: skip
        if self.ig_steps == "auto":  # only then: manifests of fixed-step runs stay comparable
            keys += ("ig_tol", "ig_max_steps")
        d = self.as_dict()
        return {k: d[k] for k in keys}

    # ---------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise :class:`ConfigError` for any setting that is wrong on its face (no I/O)."""
        from xai_workers.worker import parse_target

        for name in ("input", "output", "model"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"a method is listed twice: {', '.join(self.methods)}")
        try:
            parse_target(self.target)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.score not in ("logit", "prob"):
            raise ConfigError(f"--score must be logit or prob, got {self.score!r}")
        if self.ig_steps == "auto":
            if not 0 < self.ig_tol < 1:
                raise ConfigError(f"--ig-tol must be in (0, 1), got {self.ig_tol}")
            if self.ig_max_steps < ADAPTIVE_MIN_MAX_STEPS:
                raise ConfigError(
                    f"--ig-max-steps must be >= {ADAPTIVE_MIN_MAX_STEPS} (the points the first "
                    f"level of --ig-steps auto adds), got {self.ig_max_steps}"
                )
        elif self.ig_steps < 1:
            raise ConfigError(f"--ig-steps must be >= 1 or auto, got {self.ig_steps}")
        if self.ig_method not in QUADRATURES:
            raise ConfigError(
                f"unknown --ig-method {self.ig_method!r}; choose from {', '.join(QUADRATURES)}"
            )
        if self.ig_method == "riemann_trapezoid" and self.ig_steps != "auto" and self.ig_steps < 2:
            raise ConfigError("--ig-method riemann_trapezoid needs --ig-steps >= 2")
        if self.ig_baseline not in BASELINES:
            raise ConfigError(
                f"unknown --ig-baseline {self.ig_baseline!r}; choose from {', '.join(BASELINES)}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"--image-size must be >= 1, got {self.image_size}")
        if self.resize_size is not None and self.resize_size < 1:
            raise ConfigError(f"--resize-size must be >= 1, got {self.resize_size}")
        if self.resize_size is not None and self.crop_pct is not None:
            raise ConfigError("give --resize-size or --crop-pct, not both")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ConfigError(f"--crop-pct must lie in (0, 1], got {self.crop_pct}")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.std is not None and any(not s > 0 for s in self.std):
            raise ConfigError(f"--std values must be > 0, got {self.std}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if self.rows_per_file is not None and self.rows_per_file < 1:
            raise ConfigError(f"--rows-per-file must be >= 1, got {self.rows_per_file}")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise ConfigError(f"--max-error-rate must be in [0, 1], got {self.max_error_rate}")
        if self.store not in PROFILES:
            raise ConfigError(f"--store must be one of {', '.join(PROFILES)}, got {self.store!r}")
        if self.map_size < 1:
            raise ConfigError(f"--map-size must be >= 1, got {self.map_size}")
        if self.input_format not in INPUT_FORMATS:
            raise ConfigError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}")
        if self.labels_from not in LABELS_FROM:
            raise ConfigError(f"--labels-from must be one of {', '.join(LABELS_FROM)}")
        from xai_audit.sources.labels import UNKNOWN_LABELS

        if self.unknown_labels not in UNKNOWN_LABELS:
            raise ConfigError(f"--unknown-labels must be one of {', '.join(UNKNOWN_LABELS)}")
        from xai_workers.faithfulness import METRICS

        bad = [m for m in self.faithfulness if m not in METRICS]
        if bad or len(set(self.faithfulness)) != len(self.faithfulness):
            raise ConfigError(
                f"--faithfulness takes {','.join(METRICS)} (each once), got "
                f"{','.join(self.faithfulness)!r}"
            )
        if self.faithfulness_steps < 1:
            raise ConfigError(f"--faithfulness-steps must be >= 1, got {self.faithfulness_steps}")
        if self.smoothgrad_samples < 1:
            raise ConfigError(f"--smoothgrad-samples must be >= 1, got {self.smoothgrad_samples}")
        if not self.smoothgrad_sigma > 0:
            raise ConfigError(f"--smoothgrad-sigma must be > 0, got {self.smoothgrad_sigma}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.incremental and self.overwrite:
            raise ConfigError("--incremental and --overwrite exclude each other")
        if self.reprocess_changed and not self.incremental:
            raise ConfigError("--reprocess-changed goes with --incremental")


def _coerce(name: str, value: Any, where: str) -> Any:
    """A raw flag/YAML value -> the field's type; ConfigError naming the setting otherwise."""
    try:
        if value is None:
            return None
        if name in ("methods", "faithfulness"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(m).strip() for m in items if str(m).strip())
        if name in ("mean", "std"):
            items = value.split(",") if isinstance(value, str) else list(value)
            vals = tuple(float(v) for v in items)
            if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
                raise ValueError("expected three numbers R,G,B")
            return vals
        if name == "ig_steps" and str(value).strip().lower() == "auto":
            return "auto"
        if name in (
            "ig_steps", "ig_max_steps", "image_size", "resize_size", "batch_size", "actors",
            "rows_per_file", "seed", "map_size", "faithfulness_steps", "smoothgrad_samples",
        ):  # fmt: skip
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError("expected an integer")
            return int(float(value))
        if name in (
            "ig_tol", "max_error_rate", "num_cpus", "progress_interval_s", "crop_pct",
            "smoothgrad_sigma",
        ):  # fmt: skip
            return float(value)
        if name in ("resume", "overwrite", "summary", "unique_ids", "incremental",
                    "reprocess_changed", "strategies"):  # fmt: skip
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError("expected true or false")
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if name == "target":
            return str(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"bad value for {name.replace('_', '-')} in {where}: {value!r} ({e})"
        ) from None


def load_yaml(path: str) -> dict[str, Any]:
    """Read a job YAML file (local or s3://) into a dict; ConfigError if it is not a mapping."""
    import yaml

    from xai_workers.storage import read_bytes

    try:
        data = yaml.safe_load(read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return dict(data)


def merge(base: JobConfig, layers: Sequence[tuple[Mapping[str, Any], str]]) -> JobConfig:
    """``base`` with each (mapping, where) applied in order: later ones win."""
    cfg = base
    for data, where in layers:
        cfg = cfg.updated(data, where=where)
    return cfg
