"""The stages before Ray: plan the input, load and check the model, claim the output.

Every check that a configuration mistake can fail runs here (:func:`prepare`), before Ray starts:
settings on their face; the input (exists, columns, types, repeated ids); the model (spec, weights,
Grad-CAM layer, target against its classes); the output (``xai_audit.bookkeeping.claim_output``:
not inside the input, locked, existing output needs --resume, --incremental or --overwrite and the
same settings, writable). The model comes before the output because the output's settings check
compares the model's checksum.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from xai_audit import bookkeeping, ray_session, sources
from xai_audit import lock as output_lock
from xai_audit import output as out
from xai_audit.config import JobConfig
from xai_audit.errors import ConfigError
from xai_audit.sources.labels import labels_by_name
from xai_workers.engine import LAYER_METHODS


def default_log(msg: str) -> None:
    print(f"[xai-audit] {msg}", file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """A checked job: resolved settings, the input plan, the model facts, the output state."""

    cfg: JobConfig
    plan: sources.InputPlan
    settings: dict
    model_info: dict
    layout: object
    schema: pa.Schema
    state: out.OutputState
    rows_per_file: int
    duplicate_ids: int = 0
    #: the output's lock (``xai_audit.lock``), held from ``prepare`` on; ``run_job`` releases it
    lock: output_lock.Lock | None = None
    #: ``--incremental``: the input's files new, grown, changed, removed since the last run
    changes: dict | None = None


def _check_gradcam_layer(cfg: JobConfig, loaded) -> str:
    """The Grad-CAM/CAM layer (``cfg.gradcam_layer`` or the model's default), checked against
    the traced layers; ConfigError naming the layer, its output shape and the usable ones."""
    import torch

    from xai_workers.hooks import default_gradcam_layer
    from xai_workers.models import is_gradcam_layer

    asked = [m for m in cfg.methods if m in LAYER_METHODS]
    if not loaded.layers:
        rest = [m for m in cfg.methods if m not in LAYER_METHODS]
        raise ConfigError(
            f"model {cfg.model} cannot be hooked (TorchScript), so {', '.join(asked)} "
            "cannot run on it; the methods that do work: "
            f"--methods {','.join(rest or ['saliency', 'integrated_gradients'])}"
        )
    layer = cfg.gradcam_layer
    if layer is None:
        try:
            s = loaded.preprocessing.image_size
            return default_gradcam_layer(loaded.module, torch.zeros(1, 3, s, s))
        except ValueError as e:
            raise ConfigError(f"no default Grad-CAM layer: {e}; pass --gradcam-layer") from None
    info = {i.name: i for i in loaded.layers}.get(layer)
    if info is not None and is_gradcam_layer(info):
        return layer
    usable = [i.name for i in loaded.layers if is_gradcam_layer(i)]
    shown = ", ".join(usable[-12:]) or "none"
    if len(usable) > 12:
        shown = f"the last 12 of {len(usable)}: {shown}"
    if info is None:
        why = f"has no layer named {layer!r}"
    elif info.calls != 1:
        why = f"runs the layer {layer!r} {info.calls} times per forward pass"
    else:
        why = (
            f"cannot use for Grad-CAM the layer {layer!r}: its output "
            f"{tuple(info.output_shape) if info.output_shape else None} does not read as a grid "
            "with h, w > 1 ((N, K, h, w), (N, h, w, D), or tokens (N, T, D) with T = h*w or "
            "1 + h*w)"
        )
    raise ConfigError(f"model {cfg.model} {why}; usable layers ({shown}) (see `xai-audit layers`)")


def plan_input(cfg: JobConfig, log) -> tuple[sources.InputPlan, int]:
    """Stage 1: the input's plan (files, rows, columns, types; ``xai_audit.sources``) and how
    many rows repeat an earlier row's id (an error with ``--unique-ids``, else a warning)."""
    from xai_audit.ids import duplicate_ids
    from xai_workers.worker import parse_target

    if bookkeeping.inside(cfg.output, cfg.input):
        raise ConfigError(f"output {cfg.output} lies inside the input {cfg.input}; choose another")
    plan = sources.discover(
        cfg.input,
        id_column=cfg.id_column,
        input_format=cfg.input_format,
        labels_from=cfg.labels_from,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        need_label=parse_target(cfg.target)[0] == "label",
        exclude=cfg.output,
    )
    if plan.total_rows == 0:
        log(f"input {cfg.input} has no rows")
    n_dup, dup_examples = duplicate_ids(plan)
    if n_dup:
        shown = ", ".join(f"{i!r} ({k}x)" for i, k in dup_examples)
        where = f"column {plan.id_column!r}" if plan.id_column else "WebDataset sample keys"
        what = (f"{n_dup} input rows repeat an id that an earlier row has (e.g. {shown}) in "
                f"{where}")  # fmt: skip
        if cfg.unique_ids:
            raise ConfigError(f"--unique-ids: {what}; make the ids unique or drop --unique-ids")
        log(f"warning: {what}; every row is still explained, but joins on id will match "
            "several rows (--unique-ids makes this an error)")  # fmt: skip
    return plan, n_dup


@dataclass(frozen=True)
class ModelFacts:
    """What the model stage found: ``cfg`` completed with the model's preprocessing, Grad-CAM
    layer and map size; the manifest's ``model`` entry; the output's layout and schema; the
    settings a resumed run must repeat (model checksum included)."""

    cfg: JobConfig
    plan: sources.InputPlan  # labels mapped to the model's classes by name where both have names
    model_info: dict
    layout: object
    schema: pa.Schema
    settings: dict


def load_checked_model(cfg: JobConfig, plan: sources.InputPlan, log) -> ModelFacts:
    """Stage 2: load the model once in the driver and check it against the settings and the
    input (target and class folders against its classes, Grad-CAM layer, class names); the
    input's labels are mapped to the model's classes by name where both have names."""
    from xai_workers.models import ModelSpecError, load_model
    from xai_workers.schema import output_schema
    from xai_workers.worker import output_layout, parse_target

    mode, tval = parse_target(cfg.target)
    try:
        loaded = load_model(
            cfg.model,
            cfg.weights,
            image_size=cfg.image_size,
            mean=cfg.mean,
            std=cfg.std,
            resize_size=cfg.resize_size,
            crop_pct=cfg.crop_pct,
            interpolation=cfg.interpolation,
            seed=cfg.seed,
        )
    except ModelSpecError as e:
        raise ConfigError(f"model: {e}") from None
    pre = loaded.preprocessing
    if mode == "class" and tval >= loaded.num_classes:
        raise ConfigError(
            f"--target {tval} is not a class of this model (0..{loaded.num_classes - 1})"
        )
    if mode == "topk" and tval > loaded.num_classes:
        raise ConfigError(f"--target topk:{tval} > the model's {loaded.num_classes} classes")
    classes = _class_names(cfg, loaded, plan, log)
    plan = labels_by_name(plan, classes, unknown=cfg.unknown_labels, log=log)
    if (plan.kind == "images" and plan.class_names and plan.label_map is None
            and len(plan.class_names) > loaded.num_classes):  # fmt: skip
        raise ConfigError(
            f"the input has {len(plan.class_names)} class folders but the model has "
            f"{loaded.num_classes} classes, so folder indices are not its classes; pass "
            "--labels-from none, or point --input at folders of the model's classes"
        )
    layer = cfg.gradcam_layer
    if any(m in LAYER_METHODS for m in cfg.methods):
        layer = _check_gradcam_layer(cfg, loaded)
    label_column = plan.label_column
    cfg = dataclasses.replace(
        cfg,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        image_size=pre.image_size,
        gradcam_layer=layer,
        label_column=label_column,
    )
    model_info = {
        "spec": loaded.spec,
        "weights": cfg.weights,
        "checksum_sha256": loaded.checksum,
        "num_classes": loaded.num_classes,
        "class_names": classes,
        "gradcam_layer": layer,
        "preprocessing_from": loaded.preprocessing_from,
        "preprocessing": {
            "image_size": pre.image_size,
            "resize_size": pre.resize_size or pre.image_size,
            "resize_mode": pre.resize_mode,
            "interpolation": pre.interpolation,
            "crop_anchor": pre.crop_anchor,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "max_pixels": pre.max_pixels,
        },
    }
    layout = output_layout(
        cfg.methods,
        pre.image_size,
        loaded.num_classes,
        cfg.target,
        id_type=plan.id_type,
        label_type=plan.label_type,
        store=cfg.store,
        map_size=cfg.map_size,
        has_names=classes is not None,
        adaptive_ig=cfg.ig_steps == "auto",
        faithfulness=cfg.faithfulness,
    )
    if layout.map_size != cfg.map_size and cfg.store == "compact":
        log(f"--map-size {cfg.map_size} is above the image size: compact maps are "
            f"{layout.map_size}x{layout.map_size}")  # fmt: skip
    cfg = dataclasses.replace(cfg, map_size=layout.map_size)
    settings = {**cfg.result_settings(), "model_checksum": loaded.checksum}
    if plan.label_map is not None:  # labels by name: a run with other labels is not resumable
        settings["label_map"] = list(plan.label_map)
    return ModelFacts(cfg, plan, model_info, layout, output_schema(layout), settings)


def prepare(cfg: JobConfig, log: Callable[[str], None] = default_log) -> Prepared:
    """Run every check that a configuration mistake can fail, before any heavy work (module
    docstring): plan the input, load the model, claim the output (its lock is held from here
    on; ``run_job`` releases it). Raises ConfigError."""
    from xai_workers.storage import configure

    cfg.validate()
    configure(cfg.s3_endpoint)  # the process's storage, once; Ray's workers: worker_env()
    ray_session.check_address(cfg)  # a cluster named by --address / RAY_ADDRESS answers
    plan, n_dup = plan_input(cfg, log)
    model = load_checked_model(cfg, plan, log)
    cfg, plan = model.cfg, model.plan
    state, held, changes = bookkeeping.claim_output(cfg, model.settings, plan, log)
    rpf = cfg.rows_per_file or out.rows_per_file(model.schema, plan.total_rows)
    return Prepared(cfg, plan, model.settings, model.model_info, model.layout, model.schema,
                    state, rpf, n_dup, held, changes)  # fmt: skip


def _class_names(cfg: JobConfig, loaded, plan, log) -> dict | None:
    """``{"source", "names"}`` of the model's classes, or None when unknown.

    In order: ``--class-names FILE|imagenet`` (its length must be the model's classes, else a
    ConfigError naming the file); the model's own (``loaded.class_names``: torchvision weights'
    ``meta["categories"]``, timm, Hugging Face); the input's (Hugging Face ``ClassLabel`` names,
    class folders) when there is one per class of the model (else they are only logged)."""
    from xai_workers.classnames import load_class_names

    n = loaded.num_classes
    if cfg.class_names:
        try:
            names = load_class_names(cfg.class_names)
        except ValueError as e:
            raise ConfigError(f"--class-names: {e}") from None
        if len(names) != n:
            raise ConfigError(
                f"--class-names {cfg.class_names} has {len(names)} names but the model has {n} "
                "classes"
            )
        return {"source": cfg.class_names, "names": list(names)}
    own = getattr(loaded, "class_names", None)  # models from timm/HF/torchvision weights
    if own is not None and len(own) == n:
        return {"source": "model", "names": [str(c) for c in own]}
    if plan.class_names:
        source = "folders" if plan.kind == "images" else "huggingface"
        if len(plan.class_names) == n:
            return {"source": source, "names": list(plan.class_names)}
        log(
            f"the input names {len(plan.class_names)} classes ({source}) but the model has {n}: "
            "not used as the model's class names (pass --class-names)"
        )
    return None
