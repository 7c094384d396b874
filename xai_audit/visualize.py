"""``xai-audit visualize``: feature visualizations and class prototypes of a model, on Ray.

::

    xai-audit visualize --model SPEC [--weights URI] --objectives 'class:all' --output URI
                        [--steps 512] [--size 128] [--param fft] [--transforms lucid] [...]

The objectives (``class:all``, ``class:0,5,9``, ``channel:layer4:0-63``, ``prototype:all``, ...;
several separated by ``;``) are expanded in the order given and cut into batches of
``--batch-size`` in that fixed order; each batch is one ``xai_workers.visualize`` call on an actor
(one forward and backward of the whole batch per step). Because the batches never change, a rerun
or a resumed run reproduces every image bit for bit on the same hardware.

::

    from_items(batches)                       one item per batch of objectives
      .map_batches(VisualizationWorker,       actors, one model each (GPU or CPU, like `run`)
                   compute=ActorPoolStrategy)
      .write_datasink(VisualizationSink)      PNG files, then one atomic Parquet part

Output, all under ``<output>/visualizations/`` (so it can sit beside a run's attributions)::

    manifest.json      settings, model checksum, counts, timings
    parts/part-*.parquet   one row per objective (``visualization_schema``)
    png/<row>-<objective>.png

Rows are keyed like the attribution job's (``source`` = ``"objectives"``, ``source_row`` = the
objective's position), so ``xai_audit.output`` gives atomic parts named after their keys, the resume
scan and the exactly-once check. A batch is recomputed whole if any of its rows is missing, and
only the missing rows are written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from xai_audit import output as out
from xai_audit.errors import ConfigError

# xai_audit.attribute imports Ray: it is imported where the job runs, so `xai-audit --help`,
# `layers` and `report` start without Ray
EXIT_OK, EXIT_FAILED = 0, 1

VISUALIZATIONS = "visualizations"
PARTS = "parts"
PNG = "png"
SOURCE = "objectives"
PRIORS = ("class-mean",)


def _log(msg: str) -> None:
    print(f"[xai-audit] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class VisualizeConfig:
    """Settings of ``xai-audit visualize`` (flags of the same names; see ``--help``)."""

    model: str | None = None
    objectives: str | None = None
    output: str | None = None
    weights: str | None = None
    steps: int = 512
    size: int = 128
    param: str = "fft"
    transforms: str = "lucid"
    lr: float = 0.05
    seed: int = 0
    octaves: int = 1
    octave_scale: float = 1.4
    blur_every: int = 0
    blur_sigma: float = 0.5
    grad_norm: bool = False
    prior: str | None = None
    prior_weight: float = 0.1
    input: str | None = None
    id_column: str | None = None
    image_column: str = "image"
    label_column: str | None = None
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    batch_size: int = 64
    actors: int | None = None
    resume: bool = False
    overwrite: bool = False
    s3_endpoint: str | None = None
    address: str | None = None
    num_cpus: float | None = None
    progress_interval_s: float = 5.0
    # set by prepare, not a flag: the one input side the model takes (a ViT's), else None
    input_size: int | None = None
    unknown_labels: str = "error"

    def validate(self) -> None:
        """ConfigError for a setting that is wrong on its face (no I/O)."""
        from xai_workers.visualize import PARAMS, parse_transforms

        for name in ("model", "objectives", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        checks = (
            (self.steps >= 1, "--steps must be >= 1"),
            (self.size >= 8, "--size must be >= 8"),
            (self.param in PARAMS, f"--param must be one of {', '.join(PARAMS)}"),
            (self.lr > 0, "--lr must be > 0"),
            (self.octaves >= 1, "--octaves must be >= 1"),
            (self.octave_scale > 1 or self.octaves == 1, "--octave-scale must be > 1"),
            (self.blur_every >= 0, "--blur-every must be >= 0"),
            (self.blur_sigma > 0, "--blur-sigma must be > 0"),
            (self.prior in (None, *PRIORS), f"--prior must be one of {', '.join(PRIORS)}"),
            (self.prior_weight >= 0, "--prior-weight must be >= 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.actors is None or self.actors >= 1, "--actors must be >= 1"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
            (self.prior is None or self.input, "--prior class-mean needs --input (labelled)"),
            (
                self.unknown_labels in ("error", "error-rows"),
                "--unknown-labels must be one of error, error-rows",
            ),
        )
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.std is not None and any(not s > 0 for s in self.std):
            raise ConfigError(f"--std values must be > 0, got {self.std}")
        try:
            parse_transforms(self.transforms)
        except ValueError as e:
            raise ConfigError(f"--transforms: {e}") from None

    def library_kwargs(self) -> dict:
        """Keyword arguments of ``xai_workers.visualize`` that these settings fix."""
        return dict(
            steps=self.steps, size=self.size, param=self.param, transforms=self.transforms,
            lr=self.lr, seed=self.seed, octaves=self.octaves, octave_scale=self.octave_scale,
            blur_every=self.blur_every, blur_sigma=self.blur_sigma, grad_norm=self.grad_norm,
            prior_weight=self.prior_weight, input_size=self.input_size,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# schema and worker (run on actors; no Ray import)
# --------------------------------------------------------------------------------------------


def visualization_schema() -> pa.Schema:
    """One row per objective. ``image``: PNG bytes (RGB, size x size) of the [0, 1] image
    rounded to 8 bits; ``activation``: the objective's value on the final float image
    (``xai_workers.visualize``); ``loss_curve``: the loss of each step; null when ``status`` is
    ``error``."""
    return pa.schema(
        [
            pa.field("source", pa.string(), nullable=False),
            pa.field("source_row", pa.int64(), nullable=False),
            pa.field("objective", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("layer", pa.string()),
            pa.field("index", pa.int64()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("image", pa.binary()),
            pa.field("activation", pa.float32()),
            pa.field("loss_curve", pa.list_(pa.float32())),
            pa.field("steps", pa.int32(), nullable=False),
            pa.field("seed", pa.int64(), nullable=False),
            pa.field("size", pa.int32(), nullable=False),
            pa.field("batch", pa.int64(), nullable=False),
        ],
        metadata={b"xai_workers.visualizations_version": b"1"},
    )


def encode_png(image: np.ndarray) -> bytes:
    """float (3, S, S) in [0, 1] -> PNG bytes of the 8-bit RGB image (round to nearest)."""
    import io

    from PIL import Image

    rgb = np.clip(np.rint(np.asarray(image).transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def png_name(row: int, objective: str) -> str:
    """``000042-channel_layer4_7.png``: the row keeps names unique, the objective readable."""
    return f"{row:06d}-{re.sub(r'[^A-Za-z0-9.-]+', '_', objective)}.png"


class VisualizationWorker:
    """Optimise batches of objectives with one model; one instance per actor.

    Called with a table of batches (columns ``batch`` int64, ``objectives`` JSON ``[[row,
    text], ...]``, ``write`` JSON list of the rows to return); returns their rows in
    ``visualization_schema``. An exception in a batch makes its rows error rows.
    """

    def __init__(
        self, *, model, weights, image_size, mean, std, settings: dict,
        priors: dict | None = None, num_threads: int | None = None, device=None,
    ):  # fmt: skip
        import torch

        from xai_workers.models import load_model
        from xai_workers.worker import available_cores, default_device

        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cpu":
            torch.set_num_threads(int(num_threads or available_cores()))
        loaded = load_model(model, weights, image_size=image_size, mean=mean, std=std)  # fmt: skip
        # channels_last changes no value and is faster for convolutions on CPU and GPU
        self.module = loaded.module.to(self.device).to(memory_format=torch.channels_last)
        self.mean, self.std = loaded.preprocessing.mean, loaded.preprocessing.std
        self.settings = dict(settings)
        self.priors = (
            {int(k): torch.tensor(np.asarray(v)) for k, v in priors.items()} if priors else None
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [
            self.run_batch(int(b), json.loads(o), set(json.loads(w)))
            for b, o, w in zip(
                batch.column("batch").to_pylist(),
                batch.column("objectives").to_pylist(),
                batch.column("write").to_pylist(),
                strict=True,
            )
        ]
        return pa.concat_tables(tables) if tables else visualization_schema().empty_table()

    def run_batch(self, b: int, objectives: list, write: set) -> pa.Table:
        from xai_workers.visualize import parse_objective, visualize

        rows = [int(r) for r, _ in objectives]
        objs = [parse_objective(t) for _, t in objectives]
        kw = self.settings
        try:
            res = visualize(self.module, objs, mean=self.mean, std=self.std, prior=self.priors,
                            device=self.device, **kw)  # fmt: skip
            images = res["images"].numpy()
            acts = res["activation"].numpy()
            curves = res["loss_curve"].numpy()
            error = None
            bad = ~np.isfinite(acts) | ~np.isfinite(curves).all(axis=1)
        except Exception as e:  # noqa: BLE001 - the batch's rows become error rows
            error = f"{type(e).__name__}: {e}"[:2000]
        cols = {k: [] for k in visualization_schema().names}
        for i, (row, obj) in enumerate(zip(rows, objs, strict=True)):
            if row not in write:
                continue
            msg = error
            if msg is None and bad[i]:
                msg = "the optimisation diverged (non-finite activation or loss)"
            cols["source"].append(SOURCE)
            cols["source_row"].append(row)
            cols["objective"].append(obj.text)
            cols["kind"].append(obj.kind)
            cols["layer"].append(obj.layer)
            cols["index"].append(obj.index)
            cols["status"].append("ok" if msg is None else "error")
            cols["error"].append(msg)
            cols["image"].append(encode_png(images[i]) if msg is None else None)
            cols["activation"].append(float(acts[i]) if msg is None else None)
            cols["loss_curve"].append(curves[i].tolist() if msg is None else None)
            cols["steps"].append(kw["steps"])
            cols["seed"].append(kw["seed"])
            cols["size"].append(kw["size"])
            cols["batch"].append(b)
        return pa.table(cols, schema=visualization_schema())


def write_pngs(table: pa.Table, png_dir: str) -> None:
    """Write the PNG of every ok row of ``table`` to ``png_dir`` (atomic per file)."""
    for row, obj, img in zip(
        table.column("source_row").to_pylist(),
        table.column("objective").to_pylist(),
        table.column("image").to_pylist(),
        strict=True,
    ):
        if img is not None:
            out.write_bytes_atomic(out.join(png_dir, png_name(row, obj)), img)


def _sink_class():
    """``VisualizationSink``: a ``xai_audit.attribute.PartsDatasink`` that writes each row's PNG
    file before the row's part, so a part on disk means its PNGs are there too (a PNG without its
    part is rewritten on resume). Made on demand: its base class imports Ray."""
    from xai_audit.attribute import PartsDatasink

    class VisualizationSink(PartsDatasink):
        def __init__(self, *, png_dir: str, **kwargs):
            super().__init__(summary=False, **kwargs)
            self.png_dir = png_dir

        def get_name(self) -> str:
            return "XaiAuditVisualizations"

        def write(self, blocks, ctx) -> list[dict]:
            from ray.data.block import BlockAccessor

            blocks = list(blocks)  # may be an iterator; the parent reads it again
            for b in blocks:
                t = BlockAccessor.for_block(b).to_arrow()
                if t.num_rows:
                    write_pngs(t, self.png_dir)
            return super().write(blocks, ctx)

    return VisualizationSink


# --------------------------------------------------------------------------------------------
# preparation: every fail-fast check, no Ray
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedVis:
    cfg: VisualizeConfig
    objectives: list  # of xai_workers.visualize.Objective
    settings: dict
    model_info: dict
    priors: dict | None
    prior_info: dict | None
    manifest: dict | None
    parts: list[str]


def vis_uri(output: str, *parts: str) -> str:
    return out.join(output, VISUALIZATIONS, *parts)


def prepare(cfg: VisualizeConfig, log: Callable[[str], None] = _log) -> PreparedVis:
    """Every check a configuration mistake can fail, before Ray starts: settings, model,
    objectives against the model's classes and layers (probed at ``--size``), the class-mean
    priors (a pass over ``--input``), the output (resume / overwrite). Raises ConfigError.
    ``--overwrite`` deletes the earlier visualizations last, once everything else has passed."""
    import torch

    from xai_workers.hooks import trace_layers
    from xai_workers.models import ModelSpecError, load_model
    from xai_workers.visualize import expand_objectives, required_input_size

    cfg.validate()
    try:
        loaded = load_model(cfg.model, cfg.weights, image_size=cfg.image_size, mean=cfg.mean,
                            std=cfg.std)  # fmt: skip
    except ModelSpecError as e:
        raise ConfigError(f"model: {e}") from None
    pre = loaded.preprocessing
    try:  # a ViT takes one side only: every image is resampled to it
        fixed = required_input_size(loaded.module, cfg.size, pre.image_size)
    except ValueError as e:
        raise ConfigError(f"the model does not run on {cfg.size} px inputs (--size): {e}") from None
    if fixed is not None:
        log(f"the model takes {fixed} px inputs only: every image is resampled to {fixed} px")
    side = fixed or cfg.size
    try:
        layers = trace_layers(loaded.module, torch.zeros(1, 3, side, side))
    except Exception as e:  # noqa: BLE001 - a model that cannot take this size
        raise ConfigError(f"the model does not run on {side} px inputs (--size): {e}") from None
    usable = {
        i.name: i.output_shape for i in layers
        if i.output_shape is not None and len(i.output_shape) >= 2 and i.calls == 1
    }  # fmt: skip
    try:
        objs = expand_objectives(
            cfg.objectives, loaded.num_classes, {k: v[1] for k, v in usable.items()}
        )
    except ValueError as e:
        raise ConfigError(f"--objectives: {e}") from None
    for o in objs:
        if o.layer is not None and o.layer not in usable:
            raise ConfigError(
                f"--objectives: {o.text}: no usable layer {o.layer!r} (see `xai-audit layers`; "
                f"some layers: {', '.join(list(usable)[-8:])})"
            )
        if o.layer is not None and o.kind in ("channel", "neuron"):
            shape = usable[o.layer]
            if o.index >= shape[1]:
                raise ConfigError(f"--objectives: {o.text}: {o.layer} has {shape[1]} channels")
            if o.y is not None and (len(shape) != 4 or o.y >= shape[2] or o.x >= shape[3]):
                raise ConfigError(
                    f"--objectives: {o.text}: {o.layer} outputs {shape[2:]} at {side} px"
                )
    texts = [o.text for o in objs]
    dup = sorted({t for t in texts if texts.count(t) > 1}) if len(set(texts)) < len(texts) else []
    if dup:
        raise ConfigError(f"--objectives lists an objective twice: {', '.join(dup[:5])}")
    need = sorted({o.index for o in objs if o.kind == "prototype"})
    if need and cfg.prior is None:
        raise ConfigError("prototype objectives need --prior class-mean and a labelled --input")
    cfg = VisualizeConfig(**{**asdict(cfg), "mean": tuple(pre.mean), "std": tuple(pre.std),
                             "input_size": fixed})  # fmt: skip
    settings = {
        "model": cfg.model, "weights": cfg.weights, "model_checksum": loaded.checksum,
        "objectives_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        "objectives": len(texts), "batch_size": cfg.batch_size, "mean": list(cfg.mean),
        "std": list(cfg.std), "prior": cfg.prior, "input": cfg.input if need else None,
        **cfg.library_kwargs(),
    }  # fmt: skip
    model_info = {"spec": loaded.spec, "weights": cfg.weights, "checksum_sha256": loaded.checksum,
                  "num_classes": loaded.num_classes}  # fmt: skip

    manifest, parts = inspect(cfg.output)
    replace = (manifest is not None or parts) and cfg.overwrite
    if (manifest is not None or parts) and not replace:
        if cfg.resume:
            if manifest is None:
                raise ConfigError(f"{vis_uri(cfg.output)} has parts but no manifest.json; "
                                  "use --overwrite or another output")  # fmt: skip
            before = manifest.get("settings", {})
            diffs = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in settings.items()
                     if json.dumps(before.get(k)) != json.dumps(v)]  # fmt: skip
            if diffs:
                raise ConfigError("cannot --resume: other settings (" + "; ".join(diffs) + ")")
        else:
            raise ConfigError(
                f"{vis_uri(cfg.output)} already holds visualizations; pass --resume to finish "
                "that run or --overwrite to replace it"
            )
    out.check_writable(vis_uri(cfg.output))
    priors = prior_info = None
    if need:
        names = getattr(loaded, "class_names", None)
        names = [str(c) for c in names] if names and len(names) == loaded.num_classes else None
        priors, prior_info = class_mean_priors(cfg, need, log, model_names=names)
    if replace:  # last: a mistake found above leaves the earlier visualizations as they were
        log(f"--overwrite: removing the earlier visualizations in {vis_uri(cfg.output)}")
        remove(cfg.output)
        manifest, parts = None, []
    return PreparedVis(cfg, objs, settings, model_info, priors, prior_info, manifest, parts)


def class_mean_priors(
    cfg: VisualizeConfig, classes: Sequence[int], log, model_names: list[str] | None = None
) -> tuple[dict, dict]:
    """Class mean images (3, S, S) float32 in [0, 1] of ``classes`` from a pass over --input
    (resize and centre crop to --size, like the job's preprocessing); rows that cannot be read
    are counted and left out. ConfigError if a class has no image.

    ``--input`` takes every form ``run`` does (``xai_audit.sources``: Parquet with or without
    an id column, Hugging Face Parquet, class folders, WebDataset); when the input and the model
    (``model_names``) both name their classes, labels are matched by name
    (``xai_audit.sources.labels``)."""
    from xai_audit import sources
    from xai_audit.sources.labels import labels_by_name
    from xai_workers.preprocess import Preprocessing

    plan = sources.discover(cfg.input, id_column=cfg.id_column, image_column=cfg.image_column,
                            label_column=cfg.label_column, need_label=True)  # fmt: skip
    if model_names:
        plan = labels_by_name(plan, {"source": "model", "names": model_names},
                              unknown=cfg.unknown_labels, log=log)  # fmt: skip
    pre = Preprocessing(image_size=cfg.size, mean=cfg.mean, std=cfg.std)
    s = cfg.size
    sums = {c: np.zeros((3, s, s), dtype=np.float64) for c in classes}
    counts = dict.fromkeys(classes, 0)
    errors = rows = 0
    mean = np.asarray(cfg.mean, dtype=np.float64).reshape(3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float64).reshape(3, 1, 1)
    shards, _ = sources.make_shards(plan)
    t0 = time.monotonic()
    for shard in shards:
        for block in sources.read_shard(
            shard, preprocessing=pre, id_column=plan.id_column, image_column=plan.image_column,
            label_column=plan.label_column, id_type=plan.id_type, label_type=plan.label_type,
        ):  # fmt: skip
            labels = block.column("label").to_pylist()
            xs = block.column("x")
            for i, lab in enumerate(labels):
                rows += 1
                if not xs[i].is_valid or lab is None:
                    errors += 1
                    continue
                if lab in sums:
                    x = np.asarray(xs[i].to_numpy(), dtype=np.float64).reshape(3, s, s)
                    sums[lab] += x * std + mean
                    counts[lab] += 1
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        raise ConfigError(f"--input {cfg.input} has no readable image of class(es) {empty[:10]}")
    log(f"class mean images of {len(classes)} classes from {rows} rows ({errors} unreadable) "
        f"in {time.monotonic() - t0:.1f} s")  # fmt: skip
    priors = {c: (sums[c] / counts[c]).astype(np.float32) for c in classes}
    return priors, {"rows": rows, "unreadable": errors, "images_per_class": counts}


def inspect(output: str) -> tuple[dict | None, list[str]]:
    """(manifest or None, part paths) of ``<output>/visualizations``."""
    parts = [p for p in out.list_files(vis_uri(output, PARTS))
             if os.path.basename(p).startswith(out.PART_PREFIX)
             and p.endswith(out.PART_SUFFIX)]  # fmt: skip
    m_uri = vis_uri(output, out.MANIFEST)
    manifest = None
    if out.exists(m_uri):
        try:
            manifest = out.read_json(m_uri)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{m_uri} exists but cannot be read: {e}") from None
    return manifest, parts


def remove(output: str) -> None:
    """Delete ``<output>/visualizations`` (``--overwrite``); nothing else."""
    import pyarrow.fs as pafs

    fs, path = out._fs(vis_uri(output))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif not out._is_local(fs):
        for sub in (PARTS, PNG):
            for p in out.list_files(vis_uri(output, sub)):
                fs.delete_file(p)
        for p in out.list_files(vis_uri(output)):
            fs.delete_file(p)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class VisResult:
    exit_code: int
    status: str
    manifest: dict
    summary: str


def make_batches(objs, batch_size: int, done: np.ndarray | None) -> list[dict]:
    """Objectives cut into batches in their fixed order; a batch whose rows are all ``done`` is
    left out, and only the rows not done are written."""
    items = []
    for b, start in enumerate(range(0, len(objs), batch_size)):
        rows = list(range(start, min(start + batch_size, len(objs))))
        write = [r for r in rows if done is None or not done[r]]
        if write:
            items.append({
                "batch": b,
                "objectives": json.dumps([[r, objs[r].text] for r in rows]),
                "write": json.dumps(write),
            })  # fmt: skip
    return items


def run_visualize(
    cfg: VisualizeConfig,
    log: Callable[[str], None] = _log,
    in_process: bool = False,
    num_threads: int | None = None,
) -> VisResult:
    """Run (or resume) the visualization job. ``in_process``: no Ray, the batches run one after
    another in this process with ``num_threads`` torch threads (None: every core), for small
    jobs such as the demo's; the output is the same."""
    from xai_audit.attribute import Progress, _hms, _now, _ray_init, _versions, plan_resources
    from xai_workers.storage import configure

    configure(cfg.s3_endpoint)  # the process's storage, once (Ray workers: worker_env)
    t_start = time.monotonic()
    started_at = _now()
    prep = prepare(cfg, log)
    cfg = prep.cfg
    n = len(prep.objectives)
    parts_uri, png_dir = vis_uri(cfg.output, PARTS), vis_uri(cfg.output, PNG)
    manifest_uri = vis_uri(cfg.output, out.MANIFEST)
    done = None
    before = 0
    if prep.parts:
        scan0 = out.scan(parts_uri, {SOURCE: n}, prep.parts)
        if scan0.unreadable:
            out.set_aside(scan0.unreadable, parts_uri)
        done = scan0.done[SOURCE]
        before = int(done.sum())
        log(f"resuming: {before} of {n} objectives already written")
    items = make_batches(prep.objectives, cfg.batch_size, done)
    todo = sum(len(json.loads(it["write"])) for it in items)
    previous = list((prep.manifest or {}).get("runs", []))
    run_info = {"started_at": started_at, "resumed": before > 0, "rows_before": before}
    manifest = {
        "tool": "xai-audit visualize", "status": "running",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "settings": prep.settings, "model": prep.model_info, "prior": prep.prior_info,
        "output": {"parts": parts_uri, "png": png_dir, "columns": visualization_schema().names},
        "versions": _versions(), "counts": {"objectives": n, "rows_written": before},
        "runs": previous + [run_info],
        "started_at": (prep.manifest or {}).get("started_at", started_at),
    }  # fmt: skip
    out.write_json(manifest_uri, manifest)
    worker_kwargs = dict(
        model=cfg.model, weights=cfg.weights, image_size=cfg.image_size, mean=cfg.mean,
        std=cfg.std, settings=cfg.library_kwargs(),
        priors=prep.priors,
    )  # fmt: skip
    progress = Progress(todo, before, log, cfg.progress_interval_s)
    started_ray = False
    t_pipe = time.monotonic()
    try:
        if items and in_process:
            progress.start()
            threads = torch_threads()
            try:
                worker = VisualizationWorker(**worker_kwargs, num_threads=num_threads)
                totals = [0, 0, 0, 0]
                for it in items:
                    table = worker(pa.Table.from_pylist([it]))
                    write_pngs(table, png_dir)
                    info = out.write_part(table, parts_uri)
                    totals = [totals[0] + info["rows"], totals[1] + info["error"],
                              totals[2] + 1, totals[3] + info["bytes"]]  # fmt: skip
                    progress.update(*totals)
            finally:
                torch_threads(threads)
        elif items:
            started_ray = _ray_init(cfg)
            res = plan_resources(cfg)
            manifest["ray"] = res.describe()
            t_pipe = time.monotonic()
            log(f"{todo} objectives in {len(items)} batches of up to {cfg.batch_size} on "
                f"{res.actors} {res.device} actor(s) -> {vis_uri(cfg.output)}")  # fmt: skip
            progress.start()
            _run_pipeline(items, res, worker_kwargs, parts_uri, png_dir, cfg, progress)
        t_pipe_end = time.monotonic()
        final = out.scan(parts_uri, {SOURCE: n})
        if final.duplicates:
            out.remove_duplicates(parts_uri, {SOURCE: n})
            final = out.scan(parts_uri, {SOURCE: n})
    except BaseException as e:
        manifest["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        manifest["error"] = f"{type(e).__name__}: {e}"[:2000]
        try:
            out.write_json(manifest_uri, manifest)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    missing = final.missing({SOURCE: n})
    complete = missing == 0 and final.duplicates == 0 and not final.unreadable
    status = "complete" if complete else "incomplete"
    all_failed = n > 0 and final.rows > 0 and final.ok == 0
    wall, pipe_s = time.monotonic() - t_start, t_pipe_end - t_pipe
    computed = max(0, final.rows - before)
    rate = computed / pipe_s if pipe_s > 0 and computed else None
    run_info.update(finished_at=_now(), wall_s=round(wall, 3), pipeline_s=round(pipe_s, 3),
                    rows_computed=computed,
                    objectives_per_s=round(rate, 4) if rate else None)  # fmt: skip
    manifest.update(
        status=status,
        counts={"objectives": n, "rows_written": final.rows, "rows_ok": final.ok,
                "rows_error": final.error, "rows_missing": missing, "files": final.files,
                "rows_from_earlier_runs": before, "rows_computed_this_run": computed},
        finished_at=_now(),
    )  # fmt: skip
    if not complete:
        manifest["error"] = f"{missing} objectives missing, {final.duplicates} duplicated"
    elif all_failed:  # every row written is an error row: nothing to show, a failed run
        manifest["error"] = f"all {final.rows} objectives failed: {_first_error(parts_uri, cfg)}"
    out.write_json(manifest_uri, manifest)
    summary = (
        f"{status}: {final.rows}/{n} objectives ({final.ok} ok, {final.error} errors) in "
        f"{_hms(wall)}, {f'{rate:.3f} objectives/s' if rate else 'nothing to do'} -> "
        f"{vis_uri(cfg.output)}"
    )
    if all_failed:
        summary += f"\n{manifest['error']}"
    code = EXIT_OK if complete and not all_failed else EXIT_FAILED
    return VisResult(code, status, manifest, summary)


def _first_error(parts_uri: str, cfg: VisualizeConfig) -> str:
    """The error message of the first error row written (for the summary line)."""
    import pyarrow.parquet as pq

    try:
        fs, _ = out._fs(parts_uri)
        for path in sorted(out.list_files(parts_uri)):
            with fs.open_input_file(path) as f:
                errors = [e for e in pq.read_table(f, columns=["error"])["error"].to_pylist() if e]
            if errors:
                return errors[0][:500]
    except Exception as e:  # noqa: BLE001 - only a detail of the message
        return f"(error rows unreadable: {type(e).__name__})"
    return "(no message)"


def _run_pipeline(items, res, worker_kwargs, parts_uri, png_dir, cfg, progress) -> None:
    """The pipeline, with progress lines from its write tasks, as ``run`` does."""
    from xai_audit.attribute import drive_pipeline

    drive_pipeline(
        lambda counter: _pipeline(items, res, worker_kwargs, parts_uri, png_dir, cfg, counter),
        progress, cfg.progress_interval_s, name="xai-audit-visualize",
    )  # fmt: skip


def _pipeline(items, res, worker_kwargs, parts_uri, png_dir, cfg, counter=None) -> None:
    import logging

    import ray

    from xai_workers.storage import worker_env

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(os.environ.get("XAI_AUDIT_RAY_PROGRESS"))
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        VisualizationWorker,
        fn_constructor_kwargs=dict(**worker_kwargs, num_threads=res.worker_threads),
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=res.actors),
        num_cpus=res.actor_num_cpus,
        num_gpus=res.actor_num_gpus or None,
        runtime_env={"env_vars": worker_env()},
    )
    sink = _sink_class()(png_dir=png_dir, dest=parts_uri, output=cfg.output, rows_per_file=1,
                             progress=counter)  # fmt: skip
    ds.write_datasink(
        sink,
        ray_remote_args={"num_cpus": res.write_num_cpus, "runtime_env": {"env_vars": worker_env()}},
    )


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

#: (flag, type, metavar, help) of ``xai-audit visualize``.
FLAGS = (
    ("--model", str, "SPEC", "torchvision:<arch> | torchscript:<uri> | <module>:<callable>"),
    ("--weights", str, "URI", "state_dict (local or s3://), a weights name, or random"),
    ("--objectives", str, "LIST", "class:all | class:0,5,9 | channel:LAYER:0-63 | "
     "neuron:LAYER:K[:Y:X] | layer:LAYER | prototype:all; several separated by ';'"),
    ("--output", str, "URI", "output folder or s3:// prefix (writes <output>/visualizations/)"),
    ("--steps", int, "N", "Adam steps per image (default 512)"),
    ("--size", int, "S", "image side in pixels (default 128)"),
    ("--param", str, "P", "fft (default) | pixel"),
    ("--transforms", str, "T", "lucid (default) | none | pad:12,jitter:8,scale:0.9:1.1,"
     "rotate:-10:10,jitter:4"),
    ("--lr", float, "LR", "Adam learning rate (default 0.05)"),
    ("--seed", int, "N", "seed; each objective's generator is seeded from it and its text"),
    ("--octaves", int, "N", "optimise at N sizes, growing by --octave-scale (default 1)"),
    ("--octave-scale", float, "F", "size ratio between octaves (default 1.4)"),
    ("--blur-every", int, "K", "blur the image every K steps (default 0: never)"),
    ("--blur-sigma", float, "PX", "blur sigma in pixels (default 0.5)"),
    ("--prior", str, "NAME", "class-mean: prototypes are pulled towards their class's mean image"),
    ("--prior-weight", float, "W", "weight of the prior's MSE (default 0.1)"),
    ("--input", str, "URI", "labelled dataset for --prior class-mean (same forms as run)"),
    ("--id-column", str, "NAME", "id column of a Parquet input (default: id when present)"),
    ("--image-column", str, "NAME", "image column of a Parquet input (default image)"),
    ("--label-column", str, "NAME", "label column (default: 'label')"),
    ("--unknown-labels", str, "W", "input class names are matched to the model's by name (as for "
                                   "run); one the model lacks: error (default) or error-rows "
                                   "(its images are left out of the class means)"),
    ("--image-size", int, "S", "the model's input size (default: the model's, 224)"),
    ("--mean", str, "R,G,B", "normalization mean (default: the model's, ImageNet's)"),
    ("--std", str, "R,G,B", "normalization std (default: the model's, ImageNet's)"),
    ("--batch-size", int, "B", "objectives optimised together (default 64)"),
    ("--actors", int, "N", "actors (default: one per GPU, else one per node)"),
    ("--s3-endpoint", str, "URL", "S3-compatible endpoint"),
    ("--address", str, "ADDR", "Ray cluster address (as for run)"),
    ("--num-cpus", float, "N", "CPUs of a new local Ray (default: all)"),
    ("--progress-interval-s", float, "SEC", "seconds between progress lines (default 5)"),
)  # fmt: skip


def add_subcommand(subparsers) -> None:
    """Register ``visualize`` on an argparse subparsers object (``handler`` = :func:`main`)."""
    p = subparsers.add_parser(
        "visualize",
        help="feature visualizations and class prototypes of a model (Parquet + PNG)",
        description="Optimise one image per objective, many objectives per batch, on Ray. "
        "Writes <output>/visualizations/{parts/*.parquet,png/*.png,manifest.json}.",
    )
    for flag, typ, metavar, help_ in FLAGS:
        p.add_argument(flag, type=typ, metavar=metavar, help=help_, default=argparse.SUPPRESS)
    p.add_argument("--grad-norm", action="store_true", default=argparse.SUPPRESS,
                   help="divide each image's gradient by its standard deviation")  # fmt: skip
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                   help="finish an interrupted run (rows written are kept)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace <output>/visualizations")  # fmt: skip
    p.set_defaults(handler=main)


def config_from_args(ns: argparse.Namespace) -> VisualizeConfig:
    d = {k: v for k, v in vars(ns).items() if k not in ("command", "handler")}
    for name in ("mean", "std"):
        if d.get(name) is not None:
            try:
                vals = tuple(float(v) for v in str(d[name]).split(","))
            except ValueError:
                vals = ()
            if len(vals) != 3:
                raise ConfigError(f"--{name} must be three numbers R,G,B, got {d[name]!r}")
            d[name] = vals
    return VisualizeConfig(**d)


def main(ns: argparse.Namespace) -> int:
    """``xai-audit visualize``: 0 complete, 1 failed, incomplete or every objective an error
    row, 2 configuration mistake (ConfigError propagates to ``xai_audit.cli.main``, which
    prints it and returns 2)."""
    import traceback

    cfg = config_from_args(ns)
    try:
        result = run_visualize(cfg)
    except ConfigError:
        raise
    except KeyboardInterrupt:
        print("xai-audit: error: interrupted; run again with --resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        print(f"xai-audit: error: the job failed: {type(e).__name__}: {e}".splitlines()[0],
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    print(result.summary, flush=True)
    return result.exit_code


def torch_threads(n: int | None = None) -> int:
    """torch's intra-op thread count; sets it to ``n`` first when given."""
    import torch

    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def demo_prototypes(run_cfg, log: Callable[[str], None] = _log) -> VisResult:
    """The demo's class prototypes (``prototype:all``, class-mean prior from the demo dataset,
    ``demo.DEMO_VIS_*`` settings) into ``<output>/visualizations``, in this process: ten 32 px
    images take seconds, less than starting Ray again; one torch thread, as the demo trains (a
    second one saves little on this tiny net and costs a lot on a busy machine). Replaced on
    each demo run unless ``--resume``."""
    import pyarrow.parquet as pq

    from xai_workers import demo
    from xai_workers.storage import read_bytes

    # the classes the demo dataset holds (all ten for the built-in one)
    labels = pq.read_table(pa.BufferReader(read_bytes(run_cfg.input)),
                           columns=[run_cfg.label_column or "label"]).column(0)  # fmt: skip
    classes = sorted({int(c) for c in labels.to_pylist() if c is not None})
    cfg = VisualizeConfig(
        model=run_cfg.model, weights=run_cfg.weights,
        objectives="prototype:" + ",".join(map(str, classes)),
        output=run_cfg.output, steps=demo.DEMO_VIS_STEPS, size=demo.DEMO_IMAGE_SIZE,
        transforms=demo.DEMO_VIS_TRANSFORMS, prior="class-mean", input=run_cfg.input,
        image_size=run_cfg.image_size, mean=run_cfg.mean, std=run_cfg.std,
        resume=run_cfg.resume, overwrite=not run_cfg.resume,
        label_column=run_cfg.label_column,
    )  # fmt: skip
    return run_visualize(cfg, log=log, in_process=True, num_threads=1)
