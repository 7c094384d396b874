"""The batch job end to end on a local Ray (one session for the module, 2 CPUs).

Numbers equal the engine's on the same preprocessed inputs; bad images become error rows; S3 in,
weights and out through moto's HTTP server; the output reads back with pyarrow (shape kept),
pandas and DuckDB in a process that never imports Ray; `xai-audit demo` runs.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image
from rowcheck import assert_rows_match_engine

from xai_audit import output as out
from xai_audit.attribute import run_job
from xai_audit.cli import main
from xai_audit.config import JobConfig
from xai_workers import schema as S
from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model, write_demo_dataset
from xai_workers.engine import attribute, make_baseline, prepare_model
from xai_workers.preprocess import Preprocessing, preprocess_bytes

SIZE = 32
N_DEMO = 40
SPEC = "xai_workers.demo:build_demo_model"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    dataset = str(root / "digits.parquet")
    write_demo_dataset(dataset, n=N_DEMO)
    t = pq.read_table(dataset)
    pq.write_table(t, dataset, row_group_size=10)  # 4 row groups
    torch.manual_seed(0)
    model = build_demo_model().eval()
    weights = str(root / "model.pt")
    torch.save(model.state_dict(), weights)
    return {"root": root, "dataset": dataset, "weights": weights, "model": model, "table": t}


def _cfg(data, output, **kw) -> JobConfig:
    base = dict(
        input=data["dataset"],
        output=str(output),
        model=SPEC,
        weights=data["weights"],
        image_size=SIZE,
        mean=DEMO_MEAN,
        std=DEMO_STD,
        ig_steps=4,
        batch_size=8,
        progress_interval_s=0.0,
        store="full",  # these tests compare full-resolution maps with the engine's
    )
    base.update(kw)
    return JobConfig(**base)


def _read(path) -> pa.Table:
    return pq.read_table(path).sort_by("id")


# --------------------------------------------------------------------------------------------


def test_end_to_end_equals_engine(ray_session, data, tmp_path):
    logs: list[str] = []
    res = run_job(_cfg(data, tmp_path / "out", rows_per_file=16), log=logs.append)
    assert res.exit_code == 0 and res.status == "complete"
    assert res.counts["rows_written"] == N_DEMO and res.counts["rows_ok"] == N_DEMO
    assert any("rows/s" in m and "ETA" in m for m in logs), logs
    assert "complete: 40/40 rows (40 ok, 0 errors" in res.summary

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["checksum_sha256"] and manifest["versions"]["ray"]
    assert manifest["counts"]["rows_ok"] == N_DEMO and manifest["timing"]["images_per_s"] > 0
    assert manifest["config"]["ig_steps"] == 4

    parts = sorted((tmp_path / "out" / "attributions").glob("*.parquet"))
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    assert sum(sizes) == N_DEMO and max(sizes) <= 16 and len(parts) >= 3  # --rows-per-file 16
    got = _read(tmp_path / "out" / "attributions")
    assert got.num_rows == N_DEMO
    assert got.column("id").to_pylist() == sorted(data["table"].column("id").to_pylist())
    assert S.map_shape_of(got.schema.field("integrated_gradients").type) == (3, SIZE, SIZE)

    # the engine on the very same preprocessed tensors
    pre = Preprocessing(image_size=SIZE, mean=DEMO_MEAN, std=DEMO_STD)
    by_id = dict(zip(data["table"]["id"].to_pylist(), data["table"]["image"].to_pylist(),
                     strict=True))  # fmt: skip
    x = torch.stack([preprocess_bytes(by_id[i], pre) for i in got.column("id").to_pylist()])
    net = prepare_model(data["model"])
    ref = attribute(
        net, x, ig_steps=4, baseline=make_baseline(x, "black", pre), gradcam_layer="features"
    )
    assert_rows_match_engine(got, ref)
    assert got["label"].to_pylist() == [int(v) for v in got["label"].to_pylist()]  # passed on
    assert set(got["source"].to_pylist()) == {"digits.parquet"}
    assert sorted(got["source_row"].to_pylist()) == list(range(N_DEMO))

    # nothing to do on a resume of a complete run; without --resume it refuses
    again = run_job(_cfg(data, tmp_path / "out", resume=True), log=logs.append)
    assert again.exit_code == 0 and again.counts["rows_computed_this_run"] == 0
    assert sorted((tmp_path / "out" / "attributions").glob("*.parquet")) == parts


READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pyarrow.parquet as pq, pandas as pd, duckdb
    from xai_workers.schema import tensor_to_numpy
    path = sys.argv[1]
    t = pq.read_table(path)
    sal = tensor_to_numpy(t.column("saliency"))
    ok = sal[~np.isnan(sal).any(axis=(1, 2))]
    df = pd.read_parquet(path)
    con = duckdb.connect()
    q = f"SELECT count(*), count(saliency), max(len(integrated_gradients)), " \\
        f"sum(CASE WHEN status = 'error' THEN 1 ELSE 0 END) FROM read_parquet('{path}/*.parquet')"
    print(json.dumps({
        "type": str(t.schema.field("saliency").type),
        "shape": list(ok.shape),
        "pandas": [len(df), int(df["status"].eq("ok").sum())],
        "duckdb": list(con.execute(q).fetchone()),
        "ray": any(m == "ray" or m.startswith("ray.") for m in sys.modules),
    }))
    """
)


def test_bad_inputs_become_error_rows_and_output_reads_without_ray(ray_session, data, tmp_path):
    ids, images, expect_ok = [], [], []
    for name, blob, ok in _bad_inputs():
        ids.append(name)
        images.append(blob)
        expect_ok.append(ok)
    for i in range(3):  # a few good digits between them
        ids.append(f"good{i}")
        images.append(data["table"]["image"][i].as_py())
        expect_ok.append(True)
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"id": ids, "image": pa.array(images, type=pa.binary())}), path, row_group_size=5
    )
    res = run_job(_cfg(data, tmp_path / "out", input=str(path)), log=lambda m: None)
    assert res.exit_code == 0, res.summary  # row errors do not fail the job
    got = _read(tmp_path / "out" / "attributions")
    assert sorted(got["id"].to_pylist()) == sorted(ids)  # every row exactly once
    status = dict(zip(got["id"].to_pylist(), got["status"].to_pylist(), strict=True))
    error = dict(zip(got["id"].to_pylist(), got["error"].to_pylist(), strict=True))
    for name, ok in zip(ids, expect_ok, strict=True):
        assert (status[name] == "ok") == ok, (name, error[name])
    assert "too large" in error["bomb"] and "null" in error["null"]
    assert "empty" in error["empty"] and "truncated" in error["truncated"]
    n_err = sum(not ok for ok in expect_ok)
    assert res.counts["rows_error"] == n_err
    assert f"{n_err} errors" in res.summary

    seen = json.loads(
        subprocess.run(
            [sys.executable, "-c", READER, str(tmp_path / "out" / "attributions")],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout.strip().splitlines()[-1]
    )  # fmt: skip
    n = len(ids)
    assert seen["type"] == f"fixed_size_list<element: float>[{SIZE * SIZE}]"
    assert seen["shape"] == [n - n_err, SIZE, SIZE]
    assert seen["pandas"] == [n, n - n_err]
    assert seen["duckdb"] == [n, n - n_err, 3 * SIZE * SIZE, n_err]
    assert seen["ray"] is False

    # --max-error-rate turns the same run into a failure (exit 3), after writing everything
    strict = run_job(
        _cfg(data, tmp_path / "strict", input=str(path), max_error_rate=0.1), log=lambda m: None
    )
    assert strict.exit_code == 3 and strict.counts["rows_written"] == n
    assert "max-error-rate" in strict.summary


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind, payload):
        crc = struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))  # fmt: skip


def _bad_inputs():
    """(id, bytes or None, decodes?) for the odd and the broken."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    i16 = Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16))
    good_png = _png(rgb)
    return [
        ("gray", _png(rgb.convert("L")), True),
        ("rgba", _png(rgb.convert("RGBA")), True),
        ("palette", _png(pal), True),
        ("cmyk", _png(rgb.convert("CMYK"), "JPEG"), True),
        ("16bit", _png(i16), True),
        ("1pixel", _png(Image.new("RGB", (1, 1), (200, 10, 10))), True),
        ("wide", _png(Image.new("RGB", (4000, 3), (9, 9, 9))), True),
        ("truncated", good_png[: len(good_png) // 2], False),
        ("garbage", bytes(rng.integers(0, 255, 500, dtype=np.uint8)), False),
        ("empty", b"", False),
        ("null", None, False),
        ("bomb", _bomb_png(100_000, 100_000), False),
    ]


def test_s3_input_weights_and_output(ray_session, data, s3_server, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(data["dataset"], f"{s3_bucket}/in/digits.parquet")
    fs.put(data["weights"], f"{s3_bucket}/models/model.pt")
    cfg = _cfg(
        data,
        f"s3://{s3_bucket}/runs/one",
        input=f"s3://{s3_bucket}/in/",
        weights=f"s3://{s3_bucket}/models/model.pt",
        s3_endpoint=s3_server,
        methods=("saliency", "gradcam"),
        rows_per_file=20,
    )
    res = run_job(cfg, log=lambda m: None)
    assert res.exit_code == 0 and res.counts["rows_ok"] == N_DEMO
    keys = sorted(fs.ls(f"{s3_bucket}/runs/one/attributions/"))
    assert len(keys) >= 2 and all(k.rsplit("/", 1)[1].startswith("part-") for k in keys)
    with fs.open(f"{s3_bucket}/runs/one/manifest.json") as f:
        assert json.load(f)["status"] == "complete"
    t = pq.read_table(f"{s3_bucket}/runs/one/attributions/", filesystem=fs)
    assert t.num_rows == N_DEMO and S.map_shape_of(t.schema.field("gradcam").type) == (SIZE, SIZE)
    assert "integrated_gradients" not in t.column_names
    # a second run into the same S3 output refuses; --resume finds it complete
    assert main(["run", "--config", _yaml(data, cfg)]) == 2
    again = run_job(JobConfig(**{**cfg.as_dict(), "resume": True,
                                 "methods": tuple(cfg.methods)}), log=lambda m: None)  # fmt: skip
    assert again.counts["rows_computed_this_run"] == 0 and again.exit_code == 0


def _yaml(data, cfg: JobConfig) -> str:
    import yaml

    path = data["root"] / "job.yaml"
    d = {k.replace("_", "-"): v for k, v in cfg.as_dict().items() if v is not None}
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_image_folder_input_and_demo_command(ray_session, data, tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"d{i}.png").write_bytes(data["table"]["image"][i].as_py())
    (folder / "sub" / "x.jpg").write_bytes(b"not a jpeg")
    (folder / "README.txt").write_text("not an image")
    res = run_job(
        _cfg(data, tmp_path / "out", input=str(folder), methods=("gradcam",)), log=lambda m: None
    )
    got = _read(tmp_path / "out" / "attributions")
    assert got["id"].to_pylist() == ["d0.png", "d1.png", "d2.png", "sub/x.jpg"]
    assert got["status"].to_pylist() == ["ok", "ok", "ok", "error"]
    assert res.exit_code == 0

    # `xai-audit demo` on a prepared data dir (the demo trains its model only when missing)
    from xai_workers import demo

    demo_dir = tmp_path / "demo-data"
    demo_dir.mkdir()
    (demo_dir / demo.DEMO_DATASET_FILE).write_bytes(open(data["dataset"], "rb").read())
    (demo_dir / demo.DEMO_WEIGHTS_FILE).write_bytes(open(data["weights"], "rb").read())
    argv = ["demo", "--data-dir", str(demo_dir), "--output", str(tmp_path / "demo-out"),
            "--ig-steps", "2", "--progress-interval-s", "0"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith(f"complete: {N_DEMO}/{N_DEMO} rows") for line in lines), lines
    assert (tmp_path / "demo-out" / "report" / "index.html").stat().st_size > 1000
    assert main(argv) == 0  # the demo replaces its own output on a second run
    # the demo's class prototypes (xai_audit.visualize.demo_prototypes) and their report section
    vm = json.loads((tmp_path / "demo-out" / "visualizations" / "manifest.json").read_text())
    labels = set(pq.read_table(data["dataset"], columns=["label"])["label"].to_pylist())
    assert vm["status"] == "complete" and vm["counts"]["rows_ok"] == len(labels)
    page = (tmp_path / "demo-out" / "report" / "index.html").read_text()
    assert 'id="prototypes"' in page and page.count('alt="prototype:') == len(labels)
    m = json.loads((tmp_path / "demo-out" / "manifest.json").read_text())
    assert m["model"]["gradcam_layer"] == "features.block4" and m["status"] == "complete"


def test_ray_write_parquet_keeps_the_map_type(ray_session, tmp_path):
    """If a caller writes worker output with Ray's own writer, the type and shape survive."""
    layout = S.OutputLayout(methods=("saliency",), image_shape=(3, 4, 4))
    schema = S.output_schema(layout)
    t = S.build_table(
        schema,
        ids=["a", "b"],
        sources=["s", "s"],
        source_rows=[0, 1],
        errors=[None, "bad"],
        values={"saliency": np.ones((2, 4, 4), np.float32)},
    )
    ray.data.from_arrow(t).write_parquet(str(tmp_path / "w"))
    back = pq.read_table(tmp_path / "w")
    assert back.schema.field("saliency").type == pa.list_(pa.float32(), 16)
    assert S.map_shape_of(back.schema.field("saliency").type) == (4, 4)
    assert back.column("saliency").null_count == 1
    assert out.exists(str(tmp_path / "w"))


def test_storage_profiles_keep_statistics_summary_and_report(ray_session, data, tmp_path):
    from xai_audit.report import build_report

    runs = {}
    for store in ("compact", "full", "stats"):
        logs: list[str] = []
        res = run_job(_cfg(data, tmp_path / store, store=store, map_size=16), log=logs.append)
        assert res.exit_code == 0 and res.counts["rows_ok"] == N_DEMO
        assert any(f"storage profile {store}" in m and "expect about 40 rows" in m for m in logs)
        assert res.manifest["output"]["store"] == store
        assert res.manifest["counts"]["bytes_per_row"] > 0
        runs[store] = res
    assert JobConfig().store == "compact" and JobConfig().map_size == 64
    tables = {s: _read(tmp_path / s / "attributions") for s in runs}
    assert S.map_shape_of(tables["compact"].schema.field("gradcam").type) == (16, 16)
    assert S.map_store_of(tables["compact"].schema.field("gradcam").type) == "compact"
    assert not any(m in tables["stats"].column_names for m in ("saliency", "gradcam"))
    sizes = {s: r.manifest["counts"]["bytes_per_row"] for s, r in runs.items()}
    assert sizes["stats"] < sizes["compact"] < sizes["full"], sizes

    # statistics byte-identical (exact equality of the Arrow columns), summaries equal
    full = tables["full"]
    stat_cols = [c for c in full.column_names if not S.is_tensor_type(full.schema.field(c).type)]
    for s in ("compact", "stats"):
        for c in stat_cols:
            assert tables[s][c].equals(full[c]), (s, c)
    summaries = {s: pq.read_table(tmp_path / s / "summary" / "summary.parquet") for s in runs}
    assert "gradcam_mean_map" in summaries["compact"].column_names
    for s in ("compact", "stats"):
        assert summaries[s].equals(summaries["full"]), s

    # the report flags the same images, whatever the profile
    flagged = {}
    for s in runs:
        rep = build_report(str(tmp_path / s), log=lambda m: None)
        flagged[s] = {k: [r["id"] for r in v] for k, v in rep.galleries.items()}
    assert flagged["full"] and any(flagged["full"].values())
    assert flagged["compact"] == flagged["full"] == flagged["stats"]


def test_every_input_format_end_to_end(ray_session, data, tmp_path, s3_server, s3_bucket,
                                       monkeypatch):  # fmt: skip
    """HF Parquet, class folders, WebDataset tars (written by their libraries) and a Parquet of
    references on S3: rows in = rows out, ids and labels as each format defines them, bad rows
    are error rows that name the row."""
    import datasets
    import s3fs
    import webdataset as wds

    from xai_audit.report import build_report, load_images
    from xai_workers.storage import configure as configure_storage

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})

    blobs = data["table"]["image"].to_pylist()[:6]
    labels = data["table"]["label"].to_pylist()[:6]

    def check(res, n_rows, n_errors):
        assert res.exit_code == 0, res.summary
        assert res.counts["rows_written"] == res.counts["rows_total"] == n_rows
        assert res.counts["rows_error"] == n_errors and res.counts["rows_missing"] == 0
        # the report finds every ok row's image again, as the model saw it
        t = pq.read_table(res.manifest["output"]["attributions"])
        ok = t.filter(pa.compute.equal(t["status"], "ok")).select(["source", "source_row"])
        configure_storage(s3_server)  # the report's process: the references are on S3
        pics = load_images(res.manifest, ok.to_pylist())
        assert len(pics) == ok.num_rows and all(p is not None for p in pics)

    # Hugging Face datasets Parquet: image structs, no id column, ClassLabel names
    monkeypatch.chdir(tmp_path)
    names = [f"digit-{i}" for i in range(10)]
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    )
    images = [Image.open(io.BytesIO(b)) for b in blobs] + [None]
    (tmp_path / "hf").mkdir()
    datasets.Dataset.from_dict({"image": images, "label": labels + [0]}, features=feats).to_parquet(
        str(tmp_path / "hf" / "train.parquet")
    )
    res = run_job(_cfg(data, tmp_path / "o-hf", input=str(tmp_path / "hf"), target="label"),
                  log=lambda m: None)  # fmt: skip
    check(res, 7, 1)
    got = _read(tmp_path / "o-hf" / "attributions")
    assert sorted(got["id"].to_pylist()) == sorted(f"train.parquet#{i}" for i in range(7))
    assert res.manifest["input"]["image_kind"] == "struct"
    assert res.manifest["input"]["class_names"] == 10
    # ClassLabel names: the model has 10 classes, so they name its predictions and targets
    assert res.manifest["model"]["class_names"] == {"source": "huggingface", "names": names}
    ok = got.filter(pa.compute.equal(got["status"], "ok"))
    assert ok["pred_name"].to_pylist() == [names[c] for c in ok["pred_class"].to_pylist()]
    assert ok["target_name"].to_pylist() == [names[c] for c in ok["label"].to_pylist()]
    summary = pq.read_table(tmp_path / "o-hf" / "summary" / "summary.parquet")
    for c, name in zip(summary["class"].to_pylist(), summary["name"].to_pylist(), strict=True):
        assert name == (None if c is None else names[c])
    page = open(build_report(str(tmp_path / "o-hf"), log=lambda m: None).index).read()
    c = ok["pred_class"][0].as_py()
    assert f"{names[c]} ({c})" in page  # the report speaks in names: class table, cards
    bad = got.filter(pa.compute.equal(got["status"], "error"))
    assert (
        bad["id"].to_pylist() == ["train.parquet#6"] and bad["error"][0].as_py() == "image is null"
    )

    # class folders: labels from sorted folder names
    root = tmp_path / "folders"
    for i, (b, lab) in enumerate(zip(blobs, labels, strict=True)):
        (root / f"class{lab}").mkdir(parents=True, exist_ok=True)
        (root / f"class{lab}" / f"{i}.png").write_bytes(b)
    res = run_job(_cfg(data, tmp_path / "o-dir", input=str(root)), log=lambda m: None)
    check(res, 6, 0)
    got = _read(tmp_path / "o-dir" / "attributions")
    order = sorted({f"class{lab}" for lab in labels})
    want = {f"class{lab}/{i}.png": order.index(f"class{lab}") for i, lab in enumerate(labels)}
    assert dict(zip(got["id"].to_pylist(), got["label"].to_pylist(), strict=True)) == want

    # WebDataset tars: sample keys as ids, cls labels, a sample without an image
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "part-%03d.tar"), maxcount=4) as sink:
        for i, (b, lab) in enumerate(zip(blobs, labels, strict=True)):
            sink.write({"__key__": f"k{i}", "png": b, "cls": str(lab).encode()})
        sink.write({"__key__": "kz", "txt": "no image"})
    res = run_job(_cfg(data, tmp_path / "o-wds", input=str(tmp_path / "wds")), log=lambda m: None)
    check(res, 7, 1)
    got = _read(tmp_path / "o-wds" / "attributions")
    assert got["id"].to_pylist() == sorted([f"k{i}" for i in range(6)] + ["kz"])
    assert got["label"].to_pylist()[:6] == labels
    assert "kz has no image member" in got["error"][6].as_py()

    # a Parquet of references on S3 (relative keys), one object missing
    for i, b in enumerate(blobs):
        fs.pipe(f"{s3_bucket}/refs/img/{i}.png", b)
    refs = [f"img/{i}.png" for i in range(6)] + ["img/missing.png"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(7)], "image": refs}), buf)
    fs.pipe(f"{s3_bucket}/refs/index.parquet", buf.getvalue())
    res = run_job(_cfg(data, tmp_path / "o-refs", input=f"s3://{s3_bucket}/refs/index.parquet",
                       s3_endpoint=s3_server), log=lambda m: None)  # fmt: skip
    check(res, 7, 1)
    got = _read(tmp_path / "o-refs" / "attributions")
    assert got["status"].to_pylist() == ["ok"] * 6 + ["error"]
    assert "refs/img/missing.png" in got["error"][6].as_py()
