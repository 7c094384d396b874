"""The audit report (xai_audit.report) on the digits demo with its planted corner mark on class 3.

The demo output is made without Ray but with the job's own pieces: the trained demo model
(``demo.ensure_demo``), the ``AttributionWorker`` on preprocessed rows, the job's write stage
(``xai_audit.attribute.write_attributions``: atomic part + summary partial) and a manifest from
``xai_audit.attribute.prepare``. Then: class 3 stands out in numbers; the report shows it; the page
renders in Debian's headless chromium with every picture; local and S3; sampling.
"""

from __future__ import annotations

import argparse
import html.parser
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xai_audit import output as out
from xai_audit import report as R
from xai_workers import demo
from xai_workers import schema as S
from xai_workers import summary as SM

N_ROWS = 300
ROWS_PER_PART = 100
BAD_ROWS = (5, 150)  # rows that become error rows (as an undecodable image would)
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)  # fmt: skip


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> str:
    """A finished demo run of N_ROWS images (ig_steps 8) in the job's output layout."""
    from xai_audit.attribute import prepare, write_attributions
    from xai_audit.config import JobConfig
    from xai_workers.preprocess import preprocess_bytes
    from xai_workers.worker import AttributionWorker

    root = tmp_path_factory.mktemp("demo")
    _, weights = demo.ensure_demo(str(root / "data"))  # trains the demo model (~10 s)
    dataset = str(root / "digits.parquet")
    demo.write_demo_dataset(dataset, n=N_ROWS)
    output = str(root / "out")
    cfg = JobConfig(
        input=dataset, output=output, model=demo.DEMO_MODEL_SPEC, weights=weights,
        image_size=demo.DEMO_IMAGE_SIZE, mean=demo.DEMO_MEAN, std=demo.DEMO_STD,
        gradcam_layer=demo.DEMO_GRADCAM_LAYER, ig_steps=8, batch_size=64,
    )  # fmt: skip
    prep = prepare(cfg, log=lambda m: None)
    cfg = prep.cfg
    worker = AttributionWorker(
        cfg.model, cfg.weights, methods=cfg.methods, target=cfg.target, ig_steps=cfg.ig_steps,
        gradcam_layer=cfg.gradcam_layer, batch_size=cfg.batch_size, image_size=cfg.image_size,
        mean=cfg.mean, std=cfg.std, num_threads=1, id_type=prep.plan.id_type,
        label_type=prep.plan.label_type, store=cfg.store, map_size=cfg.map_size,
        pooled_columns=True,  # as the job's actors: the summary's maps from the full maps
    )  # fmt: skip
    assert worker.schema.equals(prep.schema)
    table = pq.read_table(dataset)
    xs, errors = [], []
    for i, data in enumerate(table["image"].to_pylist()):
        bad = i in BAD_ROWS
        xs.append(np.zeros((3, 32, 32), np.float32) if bad else
                  preprocess_bytes(data, worker.preprocessing).numpy())  # fmt: skip
        errors.append("cannot decode image: test" if bad else None)
    rel = prep.plan.sources[0].rel
    batch = pa.table({
        "id": table["id"], "label": table["label"],
        "x": S.tensor_array(np.stack(xs), valid=np.array([e is None for e in errors])),
        "error": pa.array(errors, pa.string()), "source": [rel] * N_ROWS,
        "source_row": np.arange(N_ROWS, dtype=np.int64),
    })  # fmt: skip
    attr = out.join(output, out.ATTRIBUTIONS)
    for start in range(0, N_ROWS, ROWS_PER_PART):
        rows = worker(batch.slice(start, ROWS_PER_PART))
        write_attributions(rows, dest=attr, output=output, summary=True)
    counts = {"rows_total": N_ROWS, "rows_written": N_ROWS, "rows_ok": N_ROWS - len(BAD_ROWS),
              "rows_error": len(BAD_ROWS), "rows_missing": 0}  # fmt: skip
    manifest = {
        "tool": "xai-audit", "status": "complete", "config": cfg.as_dict(),
        "settings": prep.settings, "model": prep.model_info, "input": prep.plan.describe(),
        "output": {"attributions": attr, "columns": prep.schema.names, "store": cfg.store},
        "counts": counts,
        "timing": {"wall_s": 12.5, "pipeline_s": 10.0, "images_per_s": 30.0},
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:12+00:00",
    }  # fmt: skip
    out.write_json(out.join(output, out.MANIFEST), manifest)
    SM.summarize_output(output)  # what the job does at the end of a run
    return output


@pytest.fixture(scope="module")
def report(demo_out) -> R.ReportResult:
    return R.build_report(demo_out, top=8, log=lambda m: None)


def _pred_rows(summary: pa.Table) -> pa.Table:
    return summary.filter(pc.equal(summary["group_by"], "pred_class"))


# --------------------------------------------------------------------------------------------
# the planted shortcut, in numbers
# --------------------------------------------------------------------------------------------


def test_summary_adds_up_to_the_demo_run(demo_out):
    s = SM.read_summary(demo_out)
    assert s.schema.metadata[b"parts_from_partials"] == b"3"  # written by the write stage
    attr = pq.read_table(os.path.join(demo_out, "attributions"), columns=["status", "pred_class"])
    ok = pc.sum(pc.equal(attr["status"], "ok")).as_py()
    assert ok == N_ROWS - len(BAD_ROWS)
    assert pc.sum(_pred_rows(s)["count"]).as_py() == ok
    all_row = s.filter(pc.equal(s["group_by"], "all")).to_pylist()[0]
    assert all_row["count"] == ok and all_row["errors"] == len(BAD_ROWS)
    assert all_row["accuracy"] > 0.9


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients"])
def test_class_3_stands_out_in_the_border_statistic(demo_out, method):
    pred = _pred_rows(SM.read_summary(demo_out))
    classes = pred["class"].to_pylist()
    border = dict(zip(classes, pred[f"{method}_border_frac_mean"].to_pylist(), strict=True))
    k = demo.DEMO_MARK_CLASS
    others = [v for c, v in border.items() if c != k]
    assert border[k] > 2 * np.median(others) + 0.02, border
    assert border[k] > max(others), border
    # the mean map of class 3 is brightest, within the border band, in the top-left corner
    maps = S.tensor_to_numpy(pred[f"{method}_share_map"])
    for c, m in zip(classes, maps, strict=True):
        band = np.zeros_like(m, dtype=bool)
        band[:3], band[-3:], band[:, :3], band[:, -3:] = True, True, True, True
        corner = m[:4, :4].mean()
        rest_of_band = m[band & ~np.pad(np.ones((4, 4), bool), ((0, 28), (0, 28)))].mean()
        if c == k:
            assert corner > 5 * rest_of_band, (c, corner, rest_of_band)
        else:
            assert corner < 2 * rest_of_band + 1e-4, (c, corner, rest_of_band)


def test_report_shows_the_shortcut(report):
    k = demo.DEMO_MARK_CLASS
    assert {(d["class"], d["method"]) for d in report.standouts} >= {
        (k, "gradcam"),
        (k, "integrated_gradients"),
    }
    assert all(d["class"] == k for d in report.standouts), report.standouts
    border = [r["pred_class"] for r in report.galleries["border"]]
    assert len(border) == 8 and sum(c == k for c in border) >= 7, border
    page = open(report.index, encoding="utf-8").read()
    assert "Class 3</b>:" in page and "What stands out" in page
    assert 'class="mapcell flag"><img src="img/class-gradcam-3.png"' in page
    # the other galleries are there, and error rows never appear in them
    assert set(report.galleries) == {"border", "wrong", "completeness", "disagreement"}
    for rows in report.galleries.values():
        assert all(r["status"] == "ok" for r in rows)
    wrong = report.galleries["wrong"]
    assert all(r["pred_class"] != r["label"] for r in wrong)
    assert [r["pred_prob"] for r in wrong] == sorted((r["pred_prob"] for r in wrong), reverse=True)
    ig = [r["ig_rel_error"] for r in report.galleries["completeness"]]
    assert ig == sorted(ig, reverse=True)


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tags: set[str] = set()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        d = dict(attrs)
        if tag == "img":
            self.imgs.append(d.get("src") or "")
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def test_every_picture_resolves_and_the_page_is_self_contained(report):
    folder = os.path.dirname(report.index)
    text = open(report.index, encoding="utf-8").read()
    page = _Page()
    page.feed(text)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert "http://" not in text and "https://" not in text and "url(" not in text
    # 10 classes x 2 maps, 3 colour bars (2 files), per card 1 image + 2 tiles per method
    assert len(page.imgs) == 20 + 3 + 7 * sum(len(v) for v in report.galleries.values())
    for src in set(page.imgs):
        assert src and not src.startswith(("/", "file:", "data:")) and ".." not in src, src
        path = os.path.join(folder, src)
        assert os.path.isfile(path), src
        with Image.open(path) as im:
            im.load()
            assert im.width > 0 and im.height > 0
    assert set(report.files) == {"index.html"} | set(page.imgs)


def _chromium() -> str:
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )
    if path is None:
        pytest.fail(
            "chromium not found (on PATH or /usr/bin/chromium): the report's browser test needs "
            "Debian's chromium; install it with scripts/install-chromium.sh "
            "(apt-get install -y chromium)"
        )
    return path


def _run_chromium(args: list[str], profile) -> subprocess.CompletedProcess:
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_report_renders_in_headless_chromium(report, tmp_path):
    folder = os.path.dirname(report.index)
    shot = tmp_path / "report.png"
    _run_chromium(
        [f"--screenshot={shot}", "--window-size=1280,2000", f"file://{report.index}"],
        tmp_path / "profile1",
    )
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.std() > 25, gray.std()  # not blank
    assert (np.abs(gray - np.median(gray)) > 40).mean() > 0.1  # a good part of it is content

    # every <img> loaded in the browser: a copy of the page with a check script, DOM dumped
    check = os.path.join(folder, "_check.html")
    script = (
        "<script>window.addEventListener('load', function () {"
        "var imgs = Array.from(document.images);"
        "document.body.dataset.images = imgs.length;"
        "document.body.dataset.broken = imgs.filter(function (i) {"
        "return !i.complete || i.naturalWidth === 0; }).length; });</script>"
    )
    page = open(report.index, encoding="utf-8").read().replace("</body>", script + "</body>")
    with open(check, "w", encoding="utf-8") as f:
        f.write(page)
    try:
        res = _run_chromium(
            ["--dump-dom", "--virtual-time-budget=10000", f"file://{check}"], tmp_path / "profile2"
        )
    finally:
        os.remove(check)
    body = res.stdout
    assert 'data-broken="0"' in body, body[:2000]
    n = int(body.split('data-images="', 1)[1].split('"', 1)[0])
    assert n == 20 + 3 + 7 * sum(len(v) for v in report.galleries.values())


# --------------------------------------------------------------------------------------------
# sampling, S3, no manifest, command line
# --------------------------------------------------------------------------------------------


def test_sample_scans_whole_files_and_reads_tensors_of_chosen_rows_only(demo_out, monkeypatch):
    import pyarrow.parquet as pq_mod

    reads: list[tuple] = []
    orig_iter, orig_rg = pq_mod.ParquetFile.iter_batches, pq_mod.ParquetFile.read_row_group

    def iter_batches(self, *a, columns=None, **kw):
        reads.append(("scan", tuple(columns or ())))
        return orig_iter(self, *a, columns=columns, **kw)

    def read_row_group(self, i, *a, **kw):
        reads.append(("fetch", i))
        return orig_rg(self, i, *a, **kw)

    monkeypatch.setattr(pq_mod.ParquetFile, "iter_batches", iter_batches)
    monkeypatch.setattr(pq_mod.ParquetFile, "read_row_group", read_row_group)
    res = R.build_report(demo_out, sample=ROWS_PER_PART, top=3, log=lambda m: None)
    assert res.rows_scanned == ROWS_PER_PART and res.rows_total == N_ROWS
    scans = [cols for kind, cols in reads if kind == "scan"]
    assert len(scans) == 1  # one part file of 100 rows
    tensors = {"saliency", "integrated_gradients", "gradcam"}
    assert scans[0] and not tensors & set(scans[0]), scans[0]
    # tensors are read for the chosen rows' row group only, plus the input's image rows
    assert 1 <= sum(kind == "fetch" for kind, _ in reads) <= 1 + 4 * 3
    page = open(res.index, encoding="utf-8").read()
    assert f"a sample of {ROWS_PER_PART:,} of {N_ROWS:,} rows" in page


def test_report_and_summarize_on_s3(demo_out, s3_server, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/runs/demo"
    for name in ("manifest.json", "attributions"):
        fs.put(os.path.join(demo_out, name), f"{s3_bucket}/runs/demo/{name}", recursive=True)
    ns = argparse.Namespace(output=uri, s3_endpoint=s3_server, recompute=False)
    assert R.summarize_main(ns) == 0  # no partials there: read from the parts
    local = SM.read_summary(demo_out)
    remote = SM.read_summary(uri, s3_server)
    assert remote["count"].equals(local["count"])
    assert remote.schema.metadata[b"parts_from_partials"] == b"0"
    fs.put(os.path.join(demo_out, "summary", "partials"), f"{s3_bucket}/runs/demo/summary/partials",
           recursive=True)  # fmt: skip
    again = SM.summarize_output(uri, s3_server)  # partials newer than their parts: used
    assert again.schema.metadata[b"parts_from_partials"] == b"3"
    assert again["count"].equals(local["count"])
    ns = argparse.Namespace(output=uri, s3_endpoint=s3_server, sample=0, top=2, max_classes=24,
                            seed=0)  # fmt: skip
    assert R.report_main(ns) == 0
    fs.invalidate_cache()
    index = fs.cat_file(f"{s3_bucket}/runs/demo/report/index.html").decode()
    page = _Page()
    page.feed(index)
    for src in set(page.imgs):
        data = fs.cat_file(f"{s3_bucket}/runs/demo/report/{src}")
        with Image.open(__import__("io").BytesIO(data)) as im:
            im.load()


def test_report_without_manifest_or_summary(demo_out, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(os.path.join(demo_out, "attributions"), bare / "attributions")
    logs: list[str] = []
    res = R.build_report(str(bare), top=2, log=logs.append)
    assert any("computing it" in m for m in logs)
    assert (bare / "summary" / "summary.parquet").exists()
    page = open(res.index, encoding="utf-8").read()
    assert "No manifest.json" in page and "maps are shown over gray" in page


def test_command_line(demo_out, tmp_path):
    parser = argparse.ArgumentParser()
    R.add_subcommands(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["report", "out", "--sample", "5", "--s3-endpoint", "http://x"])
    assert ns.handler is R.report_main and ns.sample == 5 and ns.s3_endpoint == "http://x"
    ns = parser.parse_args(["summarize", "out", "--recompute"])
    assert ns.handler is R.summarize_main and ns.recompute

    missing = str(tmp_path / "missing")
    res = subprocess.run(
        [sys.executable, "-m", "xai_audit.report", "report", missing],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert res.returncode == 2 and "no attribution files" in res.stderr
    assert R.main(["summarize", demo_out]) == 0


def test_many_classes_show_the_standouts_first(demo_out):
    res = R.build_report(demo_out, top=1, max_classes=4, log=lambda m: None)
    shown = sorted(int(f.rsplit("-", 1)[1][:-4]) for f in res.files if "class-gradcam-" in f)
    assert len(shown) == 4 and demo.DEMO_MARK_CLASS in shown
    assert "Showing 4 of 10 classes" in open(res.index, encoding="utf-8").read()


def test_report_on_topk_output_without_labels(tmp_path):
    from xai_workers.worker import AttributionWorker

    rng = np.random.default_rng(0)
    w = AttributionWorker(
        demo.build_demo_model(), target="topk:2", image_size=32, mean=demo.DEMO_MEAN,
        std=demo.DEMO_STD, ig_steps=2, num_threads=1,
    )  # fmt: skip
    n = 12
    x = (rng.random((n, 3, 32, 32)) * 2 - 1).astype(np.float32)
    batch = pa.table({
        "id": [f"i{i}" for i in range(n)], "x": S.tensor_array(x),
        "error": pa.nulls(n, pa.string()), "source": ["s"] * n, "source_row": np.arange(n),
    })  # fmt: skip
    out.write_part(w(batch), str(tmp_path / "attributions"))
    res = R.build_report(str(tmp_path), top=2, log=lambda m: None)
    assert set(res.galleries) == {"border", "completeness", "disagreement"}
    assert all(len(v) == 2 for v in res.galleries.values())
    page = _Page()
    page.feed(open(res.index, encoding="utf-8").read())
    assert all((tmp_path / "report" / src).is_file() for src in page.imgs)
