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

The package: ``scan`` (what to show: the galleries' top-k, the chosen rows and their images, the
standouts, the error rows), ``pictures`` (overlays, tiles, colour bars, PNG), ``page`` (plain
values for the Jinja2 template ``templates/report.html.j2``, which lays the page out),
``visualizations`` (the prototypes section), ``build`` (``build_report``: all of it, written),
``cli`` (the command line).
"""

from xai_audit.report.build import ReportResult, build_report
from xai_audit.report.cli import add_subcommands, main, report_main, summarize_main
from xai_audit.report.page import (
    Card,
    _adaptive_ig_items,
    _findings,
    card_data,
    class_table_data,
    environment,
    faithfulness_data,
    findings_data,
    page_data,
    render_html,
)
from xai_audit.report.pictures import (
    CLASS_TILE,
    OVERLAY_ALPHA,
    OVERLAY_PERCENTILE,
    TILE,
    class_map_tile,
    colorbar,
    deviation,
    display_scale,
    overlay,
)
from xai_audit.report.scan import (
    BORDER_ABSOLUTE,
    BORDER_AREA,
    CLASS_MAP_METHODS,
    DEFAULT_MAX_CLASSES,
    DEFAULT_SAMPLE,
    DEFAULT_TOP,
    ERROR_SHARE_FINDING,
    ERRORS_LISTED,
    IG_ERROR_FINDING,
    METHOD_LONG,
    METHOD_TITLES,
    METHODS,
    STANDOUT_MIN_COUNT,
    STANDOUT_MIN_DIFF,
    STANDOUT_RATIO,
    Gallery,
    TopK,
    error_rows,
    fetch_rows,
    galleries_for,
    load_images,
    map_group,
    scan_galleries,
    standouts,
)
from xai_audit.report.visualizations import visualization_data, visualization_section

__all__ = [
    "BORDER_ABSOLUTE", "BORDER_AREA", "CLASS_MAP_METHODS", "CLASS_TILE", "DEFAULT_MAX_CLASSES",
    "DEFAULT_SAMPLE", "DEFAULT_TOP", "ERRORS_LISTED", "ERROR_SHARE_FINDING", "IG_ERROR_FINDING",
    "METHODS", "METHOD_LONG", "METHOD_TITLES", "OVERLAY_ALPHA", "OVERLAY_PERCENTILE",
    "STANDOUT_MIN_COUNT", "STANDOUT_MIN_DIFF", "STANDOUT_RATIO", "TILE", "Card", "Gallery",
    "ReportResult", "TopK", "_adaptive_ig_items", "_findings", "add_subcommands", "build_report",
    "card_data", "class_map_tile", "class_table_data", "colorbar", "deviation", "display_scale",
    "environment", "error_rows", "faithfulness_data", "fetch_rows", "findings_data",
    "galleries_for", "load_images", "main", "map_group", "overlay", "page_data", "render_html",
    "report_main", "scan_galleries", "standouts", "summarize_main", "visualization_data",
    "visualization_section",
]  # fmt: skip
