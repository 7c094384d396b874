"""``xai-audit``: the command line.

::

    xai-audit run --input URI --output URI --model SPEC [--weights URI] [...]
    xai-audit layers --model SPEC [--weights URI|random] [--image-size S] [--seed N]
    xai-audit demo [--output demo-out]
    xai-audit summarize <output> | report <output>          (xai_audit.report)
    xai-audit visualize --model SPEC --objectives LIST --output URI [...]   (xai_audit.visualize)
    xai-audit compare OUT_A OUT_B [--dest URI]                             (xai_audit.compare)
    xai-audit strategies OUTPUT [--resume] [...]                     (xai_audit.strategies)

``run`` flags are listed by ``xai-audit run --help`` and in docs/conventions.md; a YAML file
given with ``--config`` takes the same keys (``ig-steps`` or ``ig_steps``) and flags override it.

Exit codes: 0 the job completed (also with row errors; the last line says how many), 1 it failed,
2 a configuration mistake (reported before any heavy work), 3 it completed but the share of error
rows is above ``--max-error-rate``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from collections.abc import Sequence

from xai_audit.config import (
    S3_ENDPOINT_HELP,
    ConfigError,
    JobConfig,
    add_s3_endpoint,
    load_yaml,
    merge,
)
from xai_workers.storage import configure as configure_storage

#: (flag, metavar, help) of every ``run`` setting; the YAML keys are the same names.
RUN_FLAGS = (
    ("--input", "URI", "Parquet file, folder or s3:// prefix (id/image[/label] columns), "
                       "a folder/prefix of image files (id = path) or of WebDataset tars"),
    ("--output", "URI", "output folder or s3:// prefix: attributions/, manifest.json"),
    ("--model", "SPEC", "torchvision:<arch> | timm:<name> | hf:<folder or repo id> | "
                        "torchscript:<uri> | <module>:<callable>"),
    ("--weights", "URI", "state_dict (.pt/.pth/.safetensors, local or s3://), a "
                         "torchvision weights name, or 'random' (seeded by --seed; for tests)"),
    ("--methods", "LIST", "comma-separated: saliency,integrated_gradients,gradcam (default); "
                          "also cam, gradcam_pp, xgradcam, layercam, eigencam, smoothgrad, "
                          "smoothgrad_sq, vargrad"),
    ("--target", "T", "predicted (default) | label | <class index> | topk:K"),
    ("--score", "S", "logit (default) or prob"),
    ("--ig-steps", "N", "Integrated Gradients steps (default 32), or auto: per image until "
                        "the estimated relative L2 error of the IG map is <= --ig-tol"),
    ("--ig-tol", "F", "error target of --ig-steps auto (default 0.01)"),
    ("--ig-max-steps", "N", "--ig-steps auto: path points per image at most, besides the "
                            "pass at x itself (default 256)"),
    ("--ig-method", "NAME", "gausslegendre (default) | riemann_left | riemann_right | "
                            "riemann_middle | riemann_trapezoid"),
    ("--ig-baseline", "NAME", "black (default) | gray | blur | uniform | zeros"),
    ("--gradcam-layer", "NAME", "dotted layer name (default: last conv block; see "
                                "`xai-audit layers`)"),
    ("--precision", "P", "auto (default: bf16 on GPU where IG completeness holds, else fp32) "
                         "| fp32 | bf16"),
    ("--image-size", "S", "input side S (default: the model's own, else 224)"),
    ("--resize-size", "R", "resize the shorter side to R before the centre crop S "
                           "(default: the model's own, else S)"),
    ("--crop-pct", "F", "R = floor(S / F), timm's crop_pct (instead of --resize-size)"),
    ("--interpolation", "NAME", "bilinear | bicubic | nearest (default: the model's own, "
                                "else bilinear)"),
    ("--mean", "R,G,B", "normalization mean (default ImageNet's)"),
    ("--std", "R,G,B", "normalization std (default ImageNet's)"),
    ("--input-format", "F", "auto (default: from the files) | parquet (bytes, Hugging Face "
                            "image structs or paths/URIs) | images | webdataset (*.tar)"),
    ("--labels-from", "L", "image folders: auto (default: class folders when every image is "
                           "one folder down) | folders | none"),
    ("--class-names", "FILE", "class names: a file (one per line, a JSON list or a JSON object "
                              "index -> name) or 'imagenet' (torchvision's list)"),
    ("--unknown-labels", "W", "input class names (folders, Hugging Face ClassLabel) are matched "
                              "to the model's by name; one the model lacks is an error (exit 2, "
                              "the default: error) or makes its rows error rows (error-rows)"),
    ("--id-column", "NAME", "id column of a Parquet input (default: id when present, else "
                            "<file>#<row>)"),
    ("--image-column", "NAME", "encoded-image column (default image)"),
    ("--label-column", "NAME", "label column (default: 'label' when present)"),
    ("--store", "PROFILE", "compact (default: maps at --map-size rounded to bfloat16, IG summed "
                           "over channels) | full (float32 at the input size) | stats (no maps)"),
    ("--map-size", "M", "side of compact maps (default 64; never above the image size)"),
    ("--batch-size", "B", "images per actor call and per attribution batch (default 64)"),
    ("--actors", "N", "attribution actors (default: one per GPU, else one per node)"),
    ("--rows-per-file", "N", "at most N rows per output file (default: ~128 MiB per file)"),
    ("--max-error-rate", "F", "exit 3 when more than this share of rows are errors"),
    ("--s3-endpoint", "URL", S3_ENDPOINT_HELP),
    ("--address", "ADDR", "Ray cluster address (default: $RAY_ADDRESS, else a private local "
                          "Ray, never one already running); 'local' forces a private one"),
    ("--num-cpus", "N", "CPUs of a new local Ray (default: all)"),
    ("--seed", "N", "seed of the uniform baseline and of --weights random (default 0)"),
    ("--faithfulness", "LIST", "deletion,insertion: AUC columns per method and for a random "
                               "pixel order (default: none)"),
    ("--faithfulness-steps", "K", "steps of the deletion/insertion curves (default 16)"),
    ("--smoothgrad-samples", "M", "noisy copies for smoothgrad/smoothgrad_sq/vargrad (default 16)"),
    ("--smoothgrad-sigma", "F", "SmoothGrad noise, times each image's max(x) - min(x) "
                                "(default 0.15)"),
    ("--progress-interval-s", "SEC", "seconds between progress lines (default 5)"),
)  # fmt: skip
BOOL_FLAGS = (
    ("--resume", "finish an interrupted run in --output (rows written are kept)"),
    ("--overwrite", "replace what xai-audit wrote in --output before"),
    ("--no-summary", "skip the per-class summary (<output>/summary/)"),
    ("--no-strategies", "skip the SpRAy strategies (`xai-audit strategies OUTPUT` later)"),
    ("--unique-ids", "fail (exit 2) when an id appears twice in the input (default: warn)"),
    (
        "--incremental",
        "explain only input rows new since the output's last run (new files, "
        "rows appended to a file); report changed or removed files",
    ),
    ("--reprocess-changed", "with --incremental: replace the rows of changed or removed files"),
)


def _err(msg: str) -> None:
    print(f"xai-audit: error: {msg}", file=sys.stderr, flush=True)


def _add_run_flags(p: argparse.ArgumentParser, *, required_note: bool = True) -> None:
    p.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                   help="job file with the same keys as the flags (flags override it)")  # fmt: skip
    for flag, metavar, help_ in RUN_FLAGS:
        p.add_argument(flag, metavar=metavar, help=help_, default=argparse.SUPPRESS)
    for flag, help_ in BOOL_FLAGS:
        if flag.startswith("--no-"):
            p.add_argument(flag, action="store_false", dest=flag[5:].replace("-", "_"),
                           help=help_, default=argparse.SUPPRESS)  # fmt: skip
        else:
            p.add_argument(flag, action="store_true", help=help_, default=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xai-audit",
        description="Saliency, Integrated Gradients and Grad-CAM over whole datasets on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p_run = sub.add_parser("run", help="explain a dataset (Parquet/images, local or S3)")
    _add_run_flags(p_run)
    p_layers = sub.add_parser("layers", help="list a model's layers and output shapes")
    p_layers.add_argument("--model", required=True, metavar="SPEC",
                          help="as for run: torchvision:<arch> | timm:<name> | hf:<folder or "
                          "repo id> | torchscript:<uri> | <module>:<callable>")  # fmt: skip
    p_layers.add_argument("--weights", metavar="URI",
                          help="state_dict (local or s3://), a torchvision weights name, or "
                          "'random' (seeded by --seed)")  # fmt: skip
    p_layers.add_argument("--image-size", type=int, metavar="S",
                          help="side of the probe image the shapes are traced with (default: "
                          "the model's own, else 224)")  # fmt: skip
    p_layers.add_argument("--seed", type=int, default=0, metavar="N",
                          help="seed of --weights random (default 0)")  # fmt: skip
    add_s3_endpoint(p_layers)
    p_demo = sub.add_parser(
        "demo",
        help="run the whole job on the built-in digits demo (trains its model in seconds)",
        description="Writes the demo dataset and model to --data-dir (once), then runs the job "
        "on them into --output (default ./demo-out, replaced on each run unless --resume), "
        "then writes its audit report to <output>/report/index.html. "
        "Any run flag can be added, e.g. --ig-steps 16 or --actors 2.",
    )
    _add_run_flags(p_demo)
    p_demo.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="where the demo dataset and weights live (default: "
                        "~/.cache/xai-workers/demo)")  # fmt: skip
    from xai_audit.compare import add_subcommand as add_compare
    from xai_audit.report import add_subcommands
    from xai_audit.strategies import add_subcommand as add_strategies
    from xai_audit.visualize import add_subcommand as add_visualize

    add_subcommands(sub)
    add_visualize(sub)
    add_compare(sub)
    add_strategies(sub)
    return parser


def config_from_args(ns: argparse.Namespace, base: JobConfig | None = None) -> JobConfig:
    """JobConfig from parsed ``run`` flags: defaults < ``--config`` YAML < flags."""
    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "data_dir")}
    layers = []
    if getattr(ns, "config", None):
        layers.append((load_yaml(ns.config), ns.config))
    layers.append((flags, "the command line"))
    return merge(base or JobConfig(), layers)


def resume_command(argv: Sequence[str]) -> str:
    """The command that continues a run: the same one with ``--resume`` (and no --overwrite)."""
    args = [a for a in argv if a != "--overwrite"]
    return "xai-audit " + shlex.join(args + ([] if "--resume" in args else ["--resume"]))


def _run(cfg: JobConfig, argv: Sequence[str] = ("run", "...")) -> int:
    from xai_audit.attribute import EXIT_FAILED, run_job
    from xai_audit.quiet import drop_stderr_lines
    from xai_audit.ray_session import ClusterLost, Terminated

    try:
        from xai_audit import watch
        from xai_audit.ray_session import address_of

        terminal = os.dup(2)  # the watcher writes here, not through drop_stderr_lines' relay

        def watched() -> None:  # a driver Ray ends abruptly still leaves a true manifest
            cluster = address_of(cfg) or "a private local Ray"
            watch.start(cfg.output, cluster, resume_command(argv), stderr=terminal)

        try:
            with drop_stderr_lines():
                result = run_job(cfg, on_running=watched)
        finally:
            os.close(terminal)
    except ConfigError:
        raise
    except KeyboardInterrupt as e:
        again = resume_command(argv)
        if isinstance(e, ClusterLost):  # one line; Ray cannot shut down without its cluster
            _err(f"{e}: the run is interrupted, what was written is kept; continue with: {again}")
        else:
            _err(f"interrupted; run again with --resume to finish: {again}")
        if isinstance(e, (Terminated, ClusterLost)):  # Ray is still up under us (run_job)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(143 if isinstance(e, Terminated) else EXIT_FAILED)
        return 130
    except Exception as e:  # noqa: BLE001 - report, point at the manifest, exit 1
        traceback.print_exc()
        _err(f"the job failed: {type(e).__name__}: {e}".splitlines()[0])
        _err(f"what was written is kept; continue with: {resume_command(argv)}")
        return EXIT_FAILED
    print(result.summary, flush=True)
    if cfg.incremental and result.exit_code == 0:
        from xai_audit import output as out

        if out.exists(out.join(cfg.output, out.REPORT, "index.html")):
            endpoint = ["--s3-endpoint", cfg.s3_endpoint] if cfg.s3_endpoint else []
            return main(["report", cfg.output, *endpoint])  # the audit report, brought up to date
    return result.exit_code


def _demo_base(ns: argparse.Namespace) -> JobConfig:
    from xai_workers import demo

    root = getattr(ns, "data_dir", None) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xai-workers", "demo"
    )
    print(f"[xai-audit] demo data and model in {root} (created on first use)", file=sys.stderr)
    dataset, weights = demo.ensure_demo(root)
    resume = bool(getattr(ns, "resume", False))
    return JobConfig(
        input=dataset,
        output="demo-out",
        model=demo.DEMO_MODEL_SPEC,
        weights=weights,
        image_size=demo.DEMO_IMAGE_SIZE,
        mean=tuple(demo.DEMO_MEAN),
        std=tuple(demo.DEMO_STD),
        gradcam_layer=getattr(demo, "DEMO_GRADCAM_LAYER", None),
        overwrite=not resume,
    )


def _layers(ns: argparse.Namespace) -> int:
    from xai_workers.models import ModelSpecError, describe_layers, load_model

    try:
        loaded = load_model(
            ns.model,
            ns.weights,
            image_size=ns.image_size,
            seed=ns.seed,
        )
    except ModelSpecError as e:
        raise ConfigError(f"model: {e}") from None
    print(describe_layers(loaded))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xai-audit``; returns the exit code (module docstring)."""
    # Once the job shuts Ray down (end, error, SIGTERM), a Ray Data thread still running must not
    # start a new local Ray: Ray reads this before its first import.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    # one storage configuration for the process: --s3-endpoint, else $AWS_ENDPOINT_URL
    # (a run's --config file may name another endpoint: run_job configures it again)
    configure_storage(getattr(ns, "s3_endpoint", None))
    try:
        if ns.command == "layers":
            return _layers(ns)
        if ns.command in ("summarize", "report", "visualize", "compare", "strategies"):
            return ns.handler(ns)
        if ns.command == "demo":
            cfg = config_from_args(ns, _demo_base(ns))
            if cfg.resume and cfg.overwrite:
                cfg = cfg.updated({"overwrite": False})
            code = _run(cfg, argv)
            if code != 0:
                return code
            # what the model thinks each class looks like (the report shows it)
            from xai_audit.visualize import demo_prototypes

            try:
                print(demo_prototypes(cfg).summary, flush=True)
            except Exception as e:  # noqa: BLE001 - the attributions and report matter more
                _err(f"the demo's class prototypes failed ({type(e).__name__}: {e}); "
                     "the report leaves them out")  # fmt: skip
            # the demo ends with its audit report, where the planted shortcut shows
            endpoint = ["--s3-endpoint", cfg.s3_endpoint] if cfg.s3_endpoint else []
            return main(["report", cfg.output, *endpoint])
        return _run(config_from_args(ns), argv)
    except ConfigError as e:
        _err(str(e))
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
