"""The report's section "What the model thinks each class looks like".

When the run's output (or the folder given with ``xai-audit report --visualizations URI``, an
``xai-audit visualize --output``) holds visualizations (``<URI>/visualizations/parts``), each class
that has a ``prototype:C`` (preferred) or ``class:C`` image gets one row: that image, the class's
mean Grad-CAM and IG maps (the tiles of the section above, when the class is shown there) and a
few of its real images (the first rows of the attributions whose label, else prediction, is the
class). Nothing is shown, and nothing read beyond one listing, when there are no
visualizations.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

from xai_audit.report.pictures import picture_tile
from xai_audit.report.scan import load_images

#: Real images shown per class.
REAL_PER_CLASS = 3
#: Attribution files read at most to find them.
MAX_FILES = 64
#: Names of the mean maps beside a class's image.
TITLES = {"gradcam": "Grad-CAM", "integrated_gradients": "IG"}


def read_class_images(root: str) -> dict[int, dict]:
    """class -> {"kind", "objective", "image" (PNG bytes), "activation"} of the ok
    ``prototype:C`` (preferred) or ``class:C`` rows under ``<root>/visualizations/parts``;
    empty when there are none."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from xai_audit import visualize as J
    from xai_audit.output import list_files
    from xai_workers.storage import pyarrow_filesystem

    parts = [p for p in list_files(J.vis_uri(root, J.PARTS)) if p.endswith(".parquet")]
    if not parts:
        return {}
    fs, _ = pyarrow_filesystem(J.vis_uri(root, J.PARTS))
    cols = ["objective", "kind", "index", "status", "image", "activation"]
    t = ds.dataset(parts, filesystem=fs, format="parquet").to_table(columns=cols)
    kinds = pa.array(["prototype", "class"])
    t = t.filter(pc.and_(pc.equal(t["status"], "ok"), pc.is_in(t["kind"], kinds)))
    out: dict[int, dict] = {}
    for row in t.to_pylist():
        c = int(row["index"])
        if c not in out or (row["kind"] == "prototype" and out[c]["kind"] != "prototype"):
            out[c] = row
    return out


def real_rows(fs, files: list[str], classes: set[int], label_is_int: bool) -> dict[int, list]:
    """class -> up to ``REAL_PER_CLASS`` row dicts (``source``, ``source_row``) of ok rows whose
    label (when the output has integer labels), else prediction, is the class; reads the key
    columns of at most ``MAX_FILES`` files, in name order."""
    import pyarrow.parquet as pq

    found: dict[int, list] = {c: [] for c in classes}
    col = "label" if label_is_int else "pred_class"
    for path in files[:MAX_FILES]:
        with fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["source", "source_row", "status", col])
        for r in t.to_pylist():
            c = r[col]
            if r["status"] == "ok" and c in found and len(found[c]) < REAL_PER_CLASS:
                found[c].append({"source": r["source"], "source_row": r["source_row"]})
        if all(len(v) >= REAL_PER_CLASS for v in found.values()):
            break
    return found


def visualization_data(
    output: str,
    *,
    visualizations: str | None,
    class_maps: dict,
    files_out: dict,
    manifest: dict | None,
    fs,
    files: list[str],
    label_is_int: bool,
    log: Callable[[str], None],
    tile: int = 96,
) -> dict | None:
    """The section's data for the template (``root``; ``rows``: class and cells of ``src``,
    ``alt``, ``title``, ``note``), None without visualizations; its pictures go into
    ``files_out``."""
    from PIL import Image

    root = visualizations or output
    try:
        vis = read_class_images(root)
    except Exception as e:  # noqa: BLE001 - the report goes on without the section
        log(f"visualizations in {root} cannot be read ({type(e).__name__}: {e}); left out")
        return None
    if not vis:
        return None
    classes = sorted(vis)
    reals = real_rows(fs, files, set(classes), label_is_int)
    flat = [(c, r) for c in classes for r in reals[c]]
    pictures = load_images(manifest, [r for _, r in flat])
    by_class: dict[int, list] = {c: [] for c in classes}
    for (c, _), p in zip(flat, pictures, strict=True):
        if p is not None:
            by_class[c].append(p)
    from xai_audit.report.page import _cls, class_names

    names = class_names(manifest) or []
    rows = []
    for c in classes:
        label = _cls(c, names[c] if 0 <= c < len(names) else None)  # "cat (0)", or "0"
        v = vis[c]
        with Image.open(io.BytesIO(v["image"])) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        name = f"img/vis-{c}.png"
        files_out[name] = picture_tile(pixels, tile)
        what = (
            f"prototype, p = {v['activation']:.2f}"
            if v["kind"] == "prototype"
            else f"class logit {v['activation']:.2f}"
        )
        cells = [{"src": name, "alt": v["objective"], "title": v["objective"], "note": what}]
        for m in class_maps.get("methods", []):
            t = class_maps.get("tiles", {}).get((m, c))
            if t:
                cells.append({"src": t, "alt": f"class {c} mean {m}",
                              "title": f"mean {TITLES.get(m, m)}",
                              "note": f"predicted {label}"})  # fmt: skip
        for k, p in enumerate(by_class[c]):
            rn = f"img/vis-{c}-real{k}.png"
            files_out[rn] = picture_tile(p, tile)
            cells.append({"src": rn, "alt": f"an image of class {label}",
                          "title": f"a real {label}", "note": ""})  # fmt: skip
        rows.append({"cls": label, "cells": cells})
    return {"root": root, "rows": rows}


def visualization_section(output: str, **kw) -> str:
    """The section alone, as HTML ("" without visualizations); keywords as
    :func:`visualization_data`."""
    from xai_audit.report.page import _macro

    data = visualization_data(output, **kw)
    return "" if data is None else _macro("visualizations", data)
