"""The report's page: plain dicts of already formatted values, laid out by the Jinja2 template
``templates/report.html.j2`` (sections: the macros of ``templates/macros.html.j2``; style:
``templates/report.css``, inlined).

Python decides what each number says ("30.1%", "–" for a missing value, "name (index)" for a
class); the templates decide where it goes. Autoescape is on and undefined values are errors
(``StrictUndefined``), so a value is always text and a missing one never renders as a blank.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from xai_audit.report.scan import (
    BORDER_ABSOLUTE,
    BORDER_AREA,
    CLASS_MAP_METHODS,
    ERROR_SHARE_FINDING,
    IG_ERROR_FINDING,
    METHOD_LONG,
    METHOD_TITLES,
    METHODS,
    Gallery,
    _agree_title,
    _rows,
    map_group,
    standouts,
)

#: The templates: report.html.j2 (the page), macros.html.j2 (its sections), report.css.
TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class Card:
    """One gallery entry: the row's values, its image and where its tiles are."""

    gallery: str
    rank: int
    score: float
    row: dict
    tiles: dict = field(default_factory=dict)


@functools.cache
def environment():
    """The Jinja2 environment of the report's templates (autoescape, StrictUndefined)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _macro(name: str, *args) -> str:
    """One section of the page alone: macro ``name`` of macros.html.j2 called with ``args``."""
    macros = environment().get_template("macros.html.j2").module
    return str(getattr(macros, name)(*args)).strip()


# --------------------------------------------------------------------------------------------
# values as the page says them
# --------------------------------------------------------------------------------------------


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def _num(v, digits: int = 2, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _text(v) -> str:
    """A value as text: None is empty."""
    return "" if v is None else str(v)


def _fmt_seconds(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 120:
        return f"{s:.1f} s"
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def _first(v):
    if isinstance(v, (list, tuple)):
        return v[0] if v else None
    return v


def _cls(index, name: str | None = None) -> str:
    """A class for people: ``name (index)`` when its name is known, else the index."""
    return f"{name} ({index})" if name else str(index)


# --------------------------------------------------------------------------------------------
# the sections' data
# --------------------------------------------------------------------------------------------


def run_data(manifest: dict | None, output: str) -> dict | None:
    """The run strip (``kpis``: (value, label)), its settings ((name, value)) and the raw
    manifest; None without a manifest."""
    if not manifest:
        return None
    counts = manifest.get("counts") or {}
    timing = manifest.get("timing") or {}
    cfg = manifest.get("config") or {}
    model = manifest.get("model") or {}

    def count(key: str) -> str:
        return f"{counts[key]:,}" if isinstance(counts.get(key), int) else "?"

    kpis = [
        (manifest.get("status", "?"), "status"),
        (count("rows_total"), "rows"),
        (count("rows_ok"), "ok"),
        (count("rows_error"), "errors"),
        (_fmt_seconds(timing.get("wall_s")), "wall time"),
        (f"{timing['images_per_s']:.1f}" if timing.get("images_per_s") else "–", "images / s"),
    ]
    ig = f"{cfg.get('ig_steps')} steps, {cfg.get('ig_method')}, baseline {cfg.get('ig_baseline')}"
    pre = model.get("preprocessing") or {}
    settings = [
        ("model", f"{model.get('spec') or cfg.get('model')}"
                  + (f" (weights {cfg.get('weights')})" if cfg.get("weights") else "")),
        ("model sha256", (model.get("checksum_sha256") or "–")[:16]),
        ("classes", model.get("num_classes")),
        ("methods", ", ".join(cfg.get("methods") or [])),
        ("target / score", f"{cfg.get('target')} / {cfg.get('score')}"),
        ("Integrated Gradients", ig),
        ("Grad-CAM layer", model.get("gradcam_layer") or cfg.get("gradcam_layer")),
        ("input", f"{cfg.get('input')}"),
        ("image size", f"{pre.get('image_size')} (mean {pre.get('mean')}, std {pre.get('std')})"),
        ("precision", cfg.get("precision")),
        ("output", output),
        ("started / finished", f"{manifest.get('started_at', '–')} / "
                               f"{manifest.get('finished_at', '–')}"),
        ("pipeline time", _fmt_seconds(timing.get("pipeline_s"))),
        ("runs", len(manifest.get("runs") or []) or 1),
    ]  # fmt: skip
    if manifest.get("error"):
        settings.append(("error", manifest["error"]))
    versions = manifest.get("versions") or {}
    if versions:
        settings.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    return {
        "kpis": [(_text(v), k) for v, k in kpis],
        "settings": [(k, _text(v)) for k, v in settings],
        "manifest_json": json.dumps(manifest, indent=2, default=str),
    }


def _adaptive_ig_findings(all_row: dict) -> list[dict]:
    """--ig-steps auto: the error estimate beside the completeness error, and the steps."""
    if all_row.get("ig_error_est_p50") is None:
        return []
    p5, p50, p95 = (_num(all_row.get(f"ig_steps_p{q}"), 0) for q in (5, 50, 95))
    return [
        {"kind": "ig_error_est", "hot": False, "p50": _pct(all_row["ig_error_est_p50"]),
         "p95": _pct(all_row.get("ig_error_est_p95")),
         "converged": _pct(all_row.get("ig_converged_mean"))},
        {"kind": "ig_steps", "hot": False, "p5": p5, "p50": p50, "p95": p95},
    ]  # fmt: skip


def _adaptive_ig_items(all_row: dict) -> list[str]:
    """The --ig-steps auto lines of the findings box, as HTML list items."""
    return [_macro("finding", f) for f in _adaptive_ig_findings(all_row)]


def _prediction_items(summary: pa.Table, manifest: dict | None) -> list[dict]:
    """Findings box lines about the prediction distribution (:func:`scan.prediction_findings`):
    a collapsed distribution, label classes never predicted, accuracy below the majority rate."""
    from xai_audit.report.scan import prediction_findings

    p = prediction_findings(summary)
    names = class_names(manifest) or []

    def cls(c):
        return _cls(c, names[c] if c is not None and 0 <= c < len(names) else None)

    items = []
    if p["collapsed"]:
        items.append({"kind": "collapsed", "hot": p["collapse_hot"], "cls": cls(p["top_class"]),
                      "share": _pct(p["top_share"]), "rows": f"{p['rows']:,}",
                      "labels": p["majority_share"] is not None,
                      "majority": _pct(p["majority_share"])})  # fmt: skip
    if p["never_predicted"]:
        items.append({"kind": "never_predicted", "hot": True,
                      "classes": [cls(c) for c in p["never_predicted"]]})  # fmt: skip
    if p["below_majority"]:
        items.append(
            {
                "kind": "below_majority",
                "hot": True,
                "accuracy": _pct(p["accuracy"]),
                "majority": _pct(p["majority_share"]),
                "cls": cls(p["majority_class"]),
            }
        )
    return items


def findings_data(
    summary: pa.Table, stand: list[dict], manifest: dict | None = None, errors: dict | None = None
) -> dict:
    """The findings box: ``items`` (dicts with a ``kind``, the findings first, ``hot``), ``calm``
    when none is a finding, the thresholds, the rows explained.

    Findings: a class whose maps put much mass in the border (:func:`standouts`: absolute or
    relative to the other classes), error rows above ERROR_SHARE_FINDING of all rows, an IG
    completeness error p95 above IG_ERROR_FINDING, a network with random weights, and the
    prediction distribution (:func:`_prediction_items`)."""
    all_row = (_rows(summary, "all") or [{}])[0]
    cfg = (manifest or {}).get("config") or {}
    names = {r["class"]: r.get("name") for r in _rows(summary, map_group(summary))}
    hot, items = [], []
    if cfg.get("weights") == "random":
        hot.append({"kind": "random_weights", "hot": True, "seed": _text(cfg.get("seed"))})
    by_class: dict = {}
    for d in stand:
        by_class.setdefault(d["class"], []).append(d)
    prefer = {m: i for i, m in enumerate(CLASS_MAP_METHODS)}
    for c, ds in by_class.items():
        said = []
        for d in sorted(ds, key=lambda d: prefer.get(d["method"], 9)):
            finite = math.isfinite(d["others_median"])
            said.append({
                "method": METHOD_LONG[d["method"]], "value": _pct(d["value"]),
                "median": _pct(d["others_median"]) if finite else None,
                "ratio": f"{d['ratio']:.1f}" if finite and math.isfinite(d["ratio"]) else "",
            })  # fmt: skip
        hot.append({"kind": "border", "hot": True, "cls": _cls(c, names.get(c)), "said": said,
                    "band": _pct(BORDER_AREA)})  # fmt: skip
    count, n_err = all_row.get("count", 0) or 0, all_row.get("errors", 0) or 0
    if n_err:
        share = n_err / max(1, count + n_err)
        f = {"kind": "errors", "hot": share > ERROR_SHARE_FINDING, "n": f"{n_err:,}",
             "share": _pct(share)}  # fmt: skip
        (hot if f["hot"] else items).append(f)
    acc = all_row.get("accuracy")
    if acc is not None:
        items.append({"kind": "accuracy", "hot": False, "accuracy": _pct(acc),
                      "labeled": f"{all_row.get('labeled', 0):,}"})  # fmt: skip
    for f in _prediction_items(summary, manifest):
        (hot if f["hot"] else items).append(f)
    p50, p95 = all_row.get("ig_rel_error_p50"), all_row.get("ig_rel_error_p95")
    if p50 is not None:
        f = {"kind": "ig_error", "hot": p95 is not None and p95 > IG_ERROR_FINDING,
             "p50": _pct(p50), "p95": _pct(p95), "limit": _pct(IG_ERROR_FINDING)}  # fmt: skip
        (hot if f["hot"] else items).append(f)
    if cfg.get("ig_baseline") == "black" and "integrated_gradients_border_frac_mean" in all_row:
        items.append({"kind": "black_baseline", "hot": False})
    items += _adaptive_ig_findings(all_row)
    agrees = [k for k in all_row if k.startswith("agree_") and k.endswith("_mean")]
    if agrees:
        pairs = [(_agree_title(k[: -len("_mean")]), _num(all_row[k], signed=True)) for k in agrees]
        items.append({"kind": "agreement", "hot": False, "pairs": pairs})
    return {
        "items": hot + items,
        "calm": not hot,
        "count": f"{count:,}",
        "border_absolute": _pct(BORDER_ABSOLUTE),
        "error_share": _pct(ERROR_SHARE_FINDING),
        "ig_error": _pct(IG_ERROR_FINDING),
    }


def _findings(
    summary: pa.Table, stand: list[dict], manifest: dict | None = None, errors: dict | None = None
) -> str:
    """The findings box alone, as HTML (:func:`findings_data`)."""
    return _macro("findings", findings_data(summary, stand, manifest, errors))


def errors_data(errors: dict | None) -> dict | None:
    """Every error row (``error_rows``): counts of the commonest 20 messages, the rows listed;
    None when there are none."""
    if not errors or not errors["total"]:
        return None
    return {
        "total": f"{errors['total']:,}",
        "listed": len(errors["rows"]) if errors["total"] > len(errors["rows"]) else None,
        "messages": [(f"{n:,}", _text(m)) for m, n in errors["messages"][:20]],
        "rows": [(_text(i), _text(m)) for i, m in errors["rows"]],
    }


def target_note(manifest: dict | None) -> dict:
    """What the drawn maps explain, from the run's --target: ``kind`` (topk, predicted, label,
    fixed), ``target``, ``k``."""
    target = str(((manifest or {}).get("config") or {}).get("target") or "predicted")
    if target.startswith("topk:"):
        return {"kind": "topk", "target": target, "k": target.split(":", 1)[1]}
    if target in ("predicted", "label"):
        return {"kind": target, "target": target, "k": ""}
    return {"kind": "fixed", "target": target, "k": ""}


def class_maps_data(cm: dict, manifest: dict | None = None) -> dict:
    """The per-class mean map tiles (``_class_maps``) by method: title, cells (tile, class,
    rows, border share, flagged)."""
    methods = [
        {
            "title": METHOD_LONG[m],
            "cells": [
                {
                    "flag": c in cm["flagged"],
                    "src": cm["tiles"][(m, c)],
                    "alt": f"class {c} mean {m} map",
                    "cls": _cls(c, cm["info"][c].get("name")),
                    "count": f"{cm['info'][c]['count']:,}",
                    "border": _pct(cm["info"][c]["border"].get(m)),
                }
                for c in cm["classes"]
            ],  # fmt: skip
        }
        for m in cm["methods"]
    ]
    return {
        "methods": methods,
        "shown": cm["shown"],
        "total": cm["total"],
        "target_note": target_note(manifest),
    }


def class_names(manifest: dict | None) -> list[str] | None:
    """The model's class names the run recorded (index order), or None."""
    names = (((manifest or {}).get("model") or {}).get("class_names") or {}).get("names")
    return list(names) if names else None


def card_data(
    card: Card, methods: list[str], gallery: Gallery, names: list[str] | None = None
) -> dict:
    """One gallery card: header (rank, prediction, label, id), a 4-column grid (image and one
    column per method): overlays, |map - median| views, the statistics under their method, and
    the rank agreements. ``hot``: the gallery ranks by that number. ``names``: the model's class
    names (:func:`class_names`), so that an integer label reads ``cat (0)``."""
    r = card.row
    pred, label, prob = r.get("pred_class"), r.get("label"), r.get("pred_prob")
    verdict = None
    if label is not None and isinstance(label, int):
        known = names is not None and 0 <= label < len(names)
        verdict = {"value": _cls(label, names[label] if known else None), "correct": label == pred}
    target, tname = r.get("target"), r.get("target_name")
    if isinstance(target, (list, tuple)):
        first = _cls(_first(target), _first(tname) if isinstance(tname, list) else None)
        explains = {"cls": first, "targets": len(target)}
    elif target is not None and target != pred:
        explains = {"cls": _cls(target, tname), "targets": 0}
    else:
        explains = None
    hot = set(gallery.columns)

    def stat(name: str, text: str, value: str) -> dict:
        return {"text": text, "value": value, "hot": name in hot}

    stats = [stat("pred_prob", "prob", _num(prob))]
    if label is not None:
        stats.append(stat("label", "label", verdict["value"] if verdict else _text(label)))
    cols = []
    for m in methods:
        ov, dev = card.tiles.get(m, (None, None))
        shown = ((f"{m}_border_frac", "border", _pct), (f"{m}_gini", "gini", _num))
        lines = [stat(key, text, fmt(_first(r[key]))) for key, text, fmt in shown if key in r]
        if m == "integrated_gradients" and "ig_rel_error" in r:
            lines.append(stat("ig_rel_error", "IG error", _pct(_first(r["ig_rel_error"]))))
        cols.append({"method": m, "title": METHOD_TITLES[m], "overlay": ov, "dev": dev,
                     "stats": lines})  # fmt: skip
    agrees = [
        {"title": _agree_title(k), "value": _num(_first(r[k]), signed=True), "hot": k in hot}
        for k in r
        if k.startswith("agree_")
    ]
    return {
        "rank": card.rank,
        "pred": _cls(pred, r.get("pred_name")),
        "prob": _num(prob),
        "explains": explains,
        "label": verdict,
        "id": _text(r.get("id")),
        "image": card.tiles["image"],
        "stats": stats,
        "methods": cols,
        "filler": max(0, 3 - len(methods)),
        "agrees": agrees,
    }


def faithfulness_data(summary: pa.Table) -> dict | None:
    """'Which method is faithful for this model': per class (and all rows), each method's mean
    deletion AUC (lower is better) and insertion AUC (higher is better) beside a random pixel
    order's (the floor); ``good``: better than random. None when the run had no
    --faithfulness."""
    rows = _rows(summary, "all") + _rows(summary, map_group(summary))
    if not rows:
        return None
    metrics = [m for m in ("deletion", "insertion") if f"random_{m}_auc_mean" in rows[0]]
    if not metrics:
        return None
    methods = [m for m in METHODS if any(f"{m}_{k}_auc_mean" in rows[0] for k in metrics)]
    titles = {**METHOD_TITLES, "random": "random"}
    body = []
    for r in rows:
        cells = []
        for k in metrics:
            floor = r.get(f"random_{k}_auc_mean")
            for m in [*methods, "random"]:
                v = r.get(f"{m}_{k}_auc_mean")
                better = (
                    m != "random" and v is not None and floor is not None
                    and (v < floor if k == "deletion" else v > floor)
                )  # fmt: skip
                cells.append({"text": "–" if v is None else _num(v, 3),
                              "css": "good" if better else ""})  # fmt: skip
        name = "all rows" if r.get("class") is None else _cls(r["class"], r.get("name"))
        body.append({"name": name, "cells": cells})
    head = [f"{titles[m]} {k}" for k in metrics for m in [*methods, "random"]]
    return {"head": head, "rows": body}


def class_table_data(summary: pa.Table, stand: list[dict]) -> dict | None:
    """The per-class table: rows, accuracy, mean probability, border share and gini per method,
    IG error, agreement; ``flag``: a border share that stands out. None without ok rows."""
    rows = _rows(summary, map_group(summary))
    if not rows:
        return None
    flagged = {(d["class"], d["method"]) for d in stand}
    cols = [("count", "rows", lambda v: f"{v:,}", None),
            ("accuracy", "accuracy", _pct, None),
            ("pred_prob_mean", "mean prob", _num, None)]  # fmt: skip
    for m in METHODS:
        if f"{m}_border_frac_mean" in rows[0]:
            cols.append((f"{m}_border_frac_mean", f"border {METHOD_TITLES[m]}", _pct, m))
    for m in METHODS:
        if f"{m}_gini_mean" in rows[0]:
            cols.append((f"{m}_gini_mean", f"gini {METHOD_TITLES[m]}", _num, None))
    if "ig_rel_error_p50" in rows[0]:
        cols.append(("ig_rel_error_p50", "IG error p50", _pct, None))
    for k in rows[0]:
        if k.startswith("agree_") and k.endswith("_mean"):
            cols.append((k, f"agree {_agree_title(k[: -len('_mean')])}",
                         lambda v: _num(v, signed=True), None))  # fmt: skip
    body = []
    for r in rows:
        cells = [
            {"text": "–" if r.get(k) is None else fmt(r.get(k)),
             "css": "flag" if m is not None and (r["class"], m) in flagged else ""}
            for k, _, fmt, m in cols
        ]  # fmt: skip
        body.append({"name": _cls(r["class"], r.get("name")), "cells": cells})
    return {"head": [t for _, t, _, _ in cols], "rows": body}


def page_data(
    *,
    output: str,
    manifest: dict | None,
    summary: pa.Table,
    galleries: list[Gallery],
    cards: dict[str, list[Card]],
    class_maps: dict,
    methods: list[str],
    scanned: int,
    total_rows: int,
    sample: int | None,
    has_images: bool,
    errors: dict | None = None,
    visualizations: dict | None = None,
    strategies: dict | None = None,
) -> dict:
    """Everything report.html.j2 shows, as plain values (see :func:`render_html`)."""
    from xai_audit.report.strategies import with_findings

    stand = standouts(summary)
    model = ((manifest or {}).get("model") or {}).get("spec") or "?"
    cfg = (manifest or {}).get("config") or {}
    if cfg.get("weights") == "random":
        model += f" with RANDOM weights (seed {cfg.get('seed')})"
    return {
        "output": output,
        "model": model,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "run": run_data(manifest, output),
        "findings": with_findings(findings_data(summary, stand, manifest, errors), strategies),
        "class_maps": class_maps_data(class_maps, manifest),
        "visualizations": visualizations,
        "strategies": strategies,
        "sampled": {
            "every": scanned >= total_rows,
            "scanned": f"{scanned:,}",
            "total": f"{total_rows:,}",
            "sample": _text(sample),
        },  # fmt: skip
        "target_note": target_note(manifest),
        "has_images": has_images,
        "galleries": [
            {
                "key": g.key,
                "title": g.title,
                "what": g.what,
                "cards": [
                    card_data(c, methods, g, class_names(manifest)) for c in cards.get(g.key) or []
                ],
            }
            for g in galleries
        ],  # fmt: skip
        "class_table": class_table_data(summary, stand),
        "faithfulness": faithfulness_data(summary),
        "errors": errors_data(errors),
    }


def render_html(**kw) -> str:
    """The page: header and run KPIs, findings, class maps, the visualizations (a dict from
    ``visualization_data``, or None), galleries, class table, faithfulness, error rows, run
    details. Self-contained (inline CSS, relative image paths, no script). Keywords: those of
    :func:`page_data`."""
    return environment().get_template("report.html.j2").render(page=page_data(**kw))
