"""The command line of the summary and the report: ``xai-audit summarize|report`` and
``python -m xai_audit.report summarize|report``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import pyarrow.compute as pc

from xai_audit.config import add_s3_endpoint
from xai_audit.report.build import _log, build_report
from xai_audit.report.scan import DEFAULT_MAX_CLASSES, DEFAULT_SAMPLE, DEFAULT_TOP
from xai_workers.storage import configure


def _err(msg: str) -> None:
    print(f"xai-audit: error: {msg}", file=sys.stderr, flush=True)


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
    add_s3_endpoint(p)
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
    add_s3_endpoint(r)
    r.set_defaults(handler=report_main)


def summarize_main(args: argparse.Namespace) -> int:
    """``xai-audit summarize``: 0 when the summary is written, 2 when there is no output."""
    from xai_workers import summary as SM

    configure(getattr(args, "s3_endpoint", None))
    t0 = time.monotonic()
    try:
        table = SM.summarize_output(
            args.output,
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
    configure(getattr(args, "s3_endpoint", None))
    try:
        res = build_report(
            args.output,
            sample=getattr(args, "sample", DEFAULT_SAMPLE),
            top=getattr(args, "top", DEFAULT_TOP),
            max_classes=getattr(args, "max_classes", DEFAULT_MAX_CLASSES),
            seed=getattr(args, "seed", 0),
            visualizations=getattr(args, "visualizations", None),
        )
    except FileNotFoundError as e:
        _err(str(e))
        return 2
    print(f"report: {res.index}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xai_audit.report summarize|report ...`` (the same as ``xai-audit``'s)."""
    parser = argparse.ArgumentParser(prog="python -m xai_audit.report")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_subcommands(sub)
    ns = parser.parse_args(argv)
    return ns.handler(ns)
