"""The report's "Strategies" section (SpRAy, ``xai_audit.strategies``): per class, flagged classes
first, each strategy's mean map, size and four member images with their maps, and the class's
2-D embedding coloured by strategy; flagged strategies also go to the findings box.

Reads ``summary/strategy_clusters.parquet`` and ``summary/strategies.parquet`` (local or S3, the
same storage helpers as the rest of the report); None when the output has none (the section is
then left out; ``xai-audit strategies OUTPUT`` makes them)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow.compute as pc

#: Classes shown (flagged first, then those with most strategies), members drawn per strategy.
MAX_CLASSES = 12
MEMBERS = 4
EMBED_SIZE = 200
#: Preferred method to show (the first present): Grad-CAM's maps are the least noisy.
PREFER = ("gradcam", "integrated_gradients", "cam", "saliency")
#: Strategy colours of the embedding (matplotlib's tab10), strategy i -> COLORS[i % 10].
COLORS = "tab10"


def _color(i: int) -> tuple[int, int, int]:
    import matplotlib

    r, g, b, _ = matplotlib.colormaps[COLORS](i % 10)
    return round(r * 255), round(g * 255), round(b * 255)


def _hex(i: int) -> str:
    r, g, b = _color(i)
    return f"#{r:02x}{g:02x}{b:02x}"


def embed_tile(xy: np.ndarray, strategy: np.ndarray, size: int = EMBED_SIZE) -> np.ndarray:
    """uint8 (size, size, 3): the 2-D embedding's points (n, 2) as 3x3 dots on white, coloured
    by strategy (``_color``); NaN points and strategy < 0 are left out."""
    img = np.full((size, size, 3), 255, np.uint8)
    ok = np.isfinite(xy).all(axis=1) & (strategy >= 0)
    if not ok.any():
        return img
    p = xy[ok]
    lo, hi = p.min(axis=0), p.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    pix = np.round((p - lo) / span * (size - 7) + 3).astype(int)
    for (x, y), s in zip(pix, strategy[ok], strict=True):
        img[size - 1 - y - 1 : size - 1 - y + 2, x - 1 : x + 2] = _color(int(s))
    return img


def strategies_data(
    output: str,
    *,
    fs,
    files: list[str],
    manifest: dict | None,
    files_out: dict[str, bytes],
    max_classes: int = MAX_CLASSES,
    log: Callable[[str], None] = lambda m: None,
) -> dict | None:
    """The section's values (plain, formatted) and its pictures (into ``files_out``): ``method``,
    ``classes`` (each: ``cls``, ``flagged``, ``embed`` picture, ``strategies`` with ``mean``
    picture, ``size``, ``share``, ``border``, ``concentration``, ``purity``, ``flagged``,
    ``reason``, ``members`` (overlay pictures)), ``findings`` (kind ``strategy``), counts. None
    when the output has no strategy tables."""
    import posixpath

    from xai_audit.report import pictures as G
    from xai_audit.report import scan as S
    from xai_audit.strategies import _read_table, clusters_uri, strategies_uri

    try:
        clusters = _read_table(clusters_uri(output))
        rows = _read_table(strategies_uri(output))
    except (FileNotFoundError, OSError):
        return None
    if clusters.num_rows == 0:
        return {"method": None, "method_title": None, "classes": [], "findings": [],
                "shown": 0, "total": 0, "flagged": 0, "others_flagged": 0}  # fmt: skip
    methods = set(clusters.column("method").to_pylist())
    method = next((m for m in PREFER if m in methods), sorted(methods)[0])
    cl = clusters.filter(pc.equal(clusters.column("method"), method)).to_pylist()
    rows = rows.filter(pc.equal(rows.column("method"), method))
    by_class: dict[int, list[dict]] = {}
    for c in cl:
        by_class.setdefault(c["target"], []).append(c)
    order = sorted(
        by_class,
        key=lambda t: (-any(s["flagged"] for s in by_class[t]), -len(by_class[t]), t),
    )
    shown = order[:max_classes]
    # the flagged strategies of the method shown go to the findings box, whether their class is
    # shown or not; other methods' flags are counted (IG's flag writing styles: conventions)
    others_flagged = sum(1 for c in clusters.to_pylist() if c["flagged"] and c["method"] != method)
    findings = [
        {"kind": "strategy", "hot": True, "cls": _cls(c["target"], c["target_name"]),
         "method": S.METHOD_LONG.get(c["method"], c["method"]), "strategy": c["strategy"],
         "size": f"{c['size']:,}", "share": f"{c['share']:.0%}", "reason": c["reason"] or ""}
        for c in cl if c["flagged"]
    ]  # fmt: skip

    # the members to draw: the first MEMBERS rows (in file order) of each shown strategy
    target = rows.column("target").to_numpy()
    strat = rows.column("strategy").fill_null(-1).to_numpy()
    part = rows.column("part").to_pylist()
    prow = rows.column("part_row").to_numpy()
    file_index = {posixpath.basename(f): i for i, f in enumerate(files)}
    wanted: dict[tuple[int, int], tuple[int, int]] = {}
    for t in shown:
        for s in range(len(by_class[t])):
            idx = np.flatnonzero((target == t) & (strat == s))[:MEMBERS]
            for i in idx:
                key = (file_index.get(part[i], -1), int(prow[i]))
                if key[0] >= 0:
                    wanted[key] = (t, s)
    got = S.fetch_rows(fs, files, set(wanted)) if wanted else {}
    keys = sorted(got)
    images = dict(zip(keys, S.load_images(manifest, [got[k] for k in keys]),
                      strict=True))  # fmt: skip
    store = ((manifest or {}).get("output") or {}).get("store", "compact")
    members: dict[tuple[int, int], list[str]] = {}
    for n, k in enumerate(keys):
        value = got[k].get(method)
        if value is None:
            continue
        name = f"img/strategy-{method}-m{n:04d}.png"
        m2 = G._map2d(method, value, store)
        files_out[name] = G._png(G.overlay(images[k], G.display_scale(m2)))
        members.setdefault(wanted[k], []).append(name)

    classes = []
    ex = rows.column("embed_x").to_numpy(zero_copy_only=False)
    ey = rows.column("embed_y").to_numpy(zero_copy_only=False)
    for t in shown:
        ss = sorted(by_class[t], key=lambda s: s["strategy"])
        sel = target == t
        emb = f"img/strategy-{method}-c{t}-embed.png"
        files_out[emb] = G._png(embed_tile(np.stack([ex[sel], ey[sel]], 1), strat[sel]))
        out_s = []
        for s in ss:
            mean_name = f"img/strategy-{method}-c{t}-s{s['strategy']}-mean.png"
            mean = np.asarray(s["mean_map"], np.float32).reshape(
                int(math.isqrt(len(np.asarray(s["mean_map"]).ravel()))), -1
            )
            files_out[mean_name] = G._png(G.class_map_tile(mean))
            out_s.append({
                "strategy": s["strategy"], "color": _hex(s["strategy"]),
                "mean": mean_name, "size": f"{s['size']:,}", "share": f"{s['share']:.0%}",
                "border": _pct(s["border_share"]), "concentration": _pct(s["concentration"]),
                "exclusive": _pct(s["exclusive_share"]), "purity": _pct(s["label_purity"]),
                "majority": "–" if s["label_majority"] is None else str(s["label_majority"]),
                "flagged": bool(s["flagged"]), "reason": s["reason"] or "",
                "members": members.get((t, s["strategy"]), []),
            })  # fmt: skip
        classes.append({
            "cls": _cls(t, ss[0]["target_name"]), "flagged": any(s["flagged"] for s in ss),
            "rows": f"{ss[0]['class_rows']:,}", "n": len(ss),
            "eigengap": "–" if ss[0]["eigengap"] is None else f"{ss[0]['eigengap']:.3f}",
            "embed": emb, "strategies": out_s,
        })  # fmt: skip
    log(f"strategies section: {len(shown)} of {len(by_class)} classes ({method})")
    return {
        "method": method,
        "method_title": S.METHOD_LONG.get(method, method),
        "classes": classes,
        "findings": findings,
        "shown": len(shown),
        "total": len(by_class),
        "flagged": len(findings),
        "others_flagged": others_flagged,
    }


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.0%}"


def _cls(index, name) -> str:
    return f"{name} ({index})" if name else str(index)


def with_findings(findings: dict, strategies: dict | None) -> dict:
    """The findings box (``page.findings_data``) with the flagged strategies first."""
    if not strategies or not strategies["findings"]:
        return findings
    return {**findings, "items": strategies["findings"] + findings["items"], "calm": False}
