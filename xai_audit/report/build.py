"""``build_report``: scan the output, draw the pictures, render the page, write them all."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from xai_audit.report import page as P
from xai_audit.report import pictures as G
from xai_audit.report import scan as S
from xai_audit.report.strategies import strategies_data
from xai_audit.report.visualizations import visualization_data


def _log(msg: str) -> None:
    print(f"[xai-audit] {msg}", file=sys.stderr, flush=True)


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


def build_report(
    output: str,
    *,
    sample: int | None = S.DEFAULT_SAMPLE,
    top: int = S.DEFAULT_TOP,
    max_classes: int = S.DEFAULT_MAX_CLASSES,
    seed: int = 0,
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
    files = SM.list_parquet(attr)
    if not files:
        raise FileNotFoundError(f"no attribution files in {attr}")
    fs, _ = pyarrow_filesystem(attr)
    manifest = S._read_manifest(output)

    try:
        summary = SM.read_summary(output)
    except (FileNotFoundError, OSError):
        log("no summary yet: computing it (xai-audit summarize)")
        summary = SM.summarize_output(output, log=log)

    with fs.open_input_file(files[0]) as f:
        schema = pq.ParquetFile(f).schema_arrow
    names = list(schema.names)
    if not S._label_is_int(schema):
        names = [n for n in names if n != "label"]
    galleries = S.galleries_for(names)
    all_row = (S._rows(summary, "all") or [{}])[0]
    total_rows = int(all_row.get("count", 0) + all_row.get("errors", 0))
    tops, scanned, n_files = S._sampled_scan(
        fs, files, galleries, top, sample or 0, total_rows, seed, threads
    )
    log(f"galleries from {scanned} of {total_rows} rows ({n_files} of {len(files)} files)")

    wanted = {(int(f), int(r)) for t in tops.values() for f, r in zip(t.file, t.row, strict=True)}
    rows = S.fetch_rows(fs, files, wanted, threads)
    keys = sorted(rows)
    images = dict(zip(keys, S.load_images(manifest, [rows[k] for k in keys]),
                      strict=True))  # fmt: skip
    methods = [m for m in S.METHODS if m in names]
    store = (manifest or {}).get("output", {}).get("store", "full")

    files_out: dict[str, bytes] = {}
    tiles = {k: G.row_tiles(n, rows[k], images[k], methods, store, files_out)
             for n, k in enumerate(keys)}  # fmt: skip
    cards = {
        g.key: [
            P.Card(g.key, i + 1, float(s), rows[(int(f), int(r))], tiles[(int(f), int(r))])
            for i, (s, f, r) in enumerate(
                zip(tops[g.key].score, tops[g.key].file, tops[g.key].row, strict=True)
            )  # fmt: skip
        ]
        for g in galleries
    }

    class_maps = S._class_maps(summary, max_classes, files_out)
    errors = S.error_rows(fs, files, threads=threads) if all_row.get("errors") else None
    vis = visualization_data(
        output, visualizations=visualizations, class_maps=class_maps, files_out=files_out,
        manifest=manifest, fs=fs, files=files, label_is_int=S._label_is_int(schema), log=log,
    )  # fmt: skip
    strategies = strategies_data(
        output, fs=fs, files=files, manifest=manifest, files_out=files_out, log=log,
    )  # fmt: skip
    files_out["img/colorbar-inferno.png"] = G._png(G.colorbar("inferno"))
    files_out["img/colorbar-viridis.png"] = G._png(G.colorbar("viridis"))
    page = P.render_html(
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
        visualizations=vis,
        strategies=strategies,
    )
    files_out["index.html"] = page.encode("utf-8")
    report_dir = join_uri(output, "report")
    _write_files(report_dir, files_out)
    log(f"report with {len(files_out)} files in {time.monotonic() - t0:.1f} s -> {report_dir}")
    return ReportResult(
        index=join_uri(report_dir, "index.html"),
        files=sorted(files_out),
        galleries={k: [c.row for c in v] for k, v in cards.items()},
        rows_scanned=scanned,
        rows_total=total_rows,
        standouts=S.standouts(summary),
        errors=errors or {"total": 0, "messages": [], "rows": []},
    )


def _write_files(folder: str, files: dict[str, bytes]) -> None:
    """Write ``files`` (relative name -> bytes) under ``folder``; index.html last."""
    from xai_workers.storage import join_uri, open_file

    def put(name: str) -> None:
        with open_file(join_uri(folder, name), "wb") as f:
            f.write(files[name])

    names = [n for n in files if n != "index.html"]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(put, names))
    if "index.html" in files:
        put("index.html")
