"""SpRAy strategy analysis: xai_workers.strategies (the computation) and xai_audit.strategies (the
Ray-task driver and its tables).

Oracles: the planted truth of a model trained here (one class learnt two ways: by its digit, and
by a watermark alone), CoRelAy's own SpRAy pipeline on the same maps, and a clean rerun of the
driver (identical files after an interruption and ``--resume``, and on S3)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score

from xai_workers import strategies as S

# --------------------------------------------------------------------------------------------
# a model trained on a class with two sub-populations
# --------------------------------------------------------------------------------------------

CLASSES = (0, 1, 2)
WATERMARK_CLASS = 1
SIZE = 32
MARK = 4  # the watermark's side in pixels (bottom-right)


def _watermark_data():
    """Digits 0, 1, 2 (all of load_digits' images of them) plus ~150 "watermark" images:
    digits 5-9 (no class of ours) with a white 4x4 square in the bottom-right corner, labelled 1.
    Returns images uint8 (N, 32, 32, 3), labels (N,), is_watermark (N,)."""
    from xai_workers.demo import demo_images

    images, labels = demo_images(size=SIZE, mark_class=None)
    ours = np.isin(labels, CLASSES)
    others = np.flatnonzero(~ours)[::6]  # ~150 images of 5-9
    wm_images = images[others].copy()
    wm_images[:, SIZE - MARK :, SIZE - MARK :] = 255
    imgs = np.concatenate([images[ours], wm_images])
    labs = np.concatenate([labels[ours], np.full(len(others), WATERMARK_CLASS)])
    wm = np.concatenate([np.zeros(ours.sum(), bool), np.ones(len(others), bool)])
    return imgs, labs.astype(np.int64), wm


@pytest.fixture(scope="module")
def trained_maps():
    """Grad-CAM maps (compact 16x16, as the job stores them) of a DemoNet trained here, with the
    predicted class as target. Returns dict(maps (N, 16, 16) float32, target (N,), labels (N,),
    watermark (N,))."""
    import torch

    from xai_workers import attribute
    from xai_workers.demo import DEMO_GRADCAM_LAYER, demo_preprocess, train_demo_model
    from xai_workers.profiles import reduce_map

    imgs, labs, wm = _watermark_data()
    model = train_demo_model(imgs, labs, epochs=6, seed=0)
    x = demo_preprocess(imgs)
    maps, targets = [], []
    for i in range(0, len(x), 256):
        out = attribute(
            model, x[i : i + 256], methods=("gradcam",), gradcam_layer=DEMO_GRADCAM_LAYER
        )
        maps.append(reduce_map("gradcam", out["gradcam"], 16).float().numpy())
        targets.append(out["target"].numpy())
    del torch
    return {
        "maps": np.concatenate(maps),
        "target": np.concatenate(targets).astype(np.int64),
        "labels": labs,
        "watermark": wm,
    }


def test_watermark_rows_form_one_flagged_strategy(trained_maps):
    d = trained_maps
    target, wm = d["target"], d["watermark"]
    # the model learnt the shortcut: the watermark images are predicted as its class
    assert (target[wm] == WATERMARK_CLASS).mean() > 0.9
    cfg = S.StrategyConfig(embed=False)
    for cls in CLASSES:
        rows = target == cls
        res = S.analyse_class(d["maps"][rows], cfg)
        stats = S.strategy_stats(res, d["labels"][rows])
        if cls != WATERMARK_CLASS:
            assert not any(s["flagged"] for s in stats), (cls, stats)
            continue
        assert res.n_strategies >= 2
        is_wm = wm[rows][res.valid]
        lab = res.strategy[res.valid]
        # the strategy holding most watermark rows
        best = np.bincount(lab[is_wm], minlength=res.n_strategies).argmax()
        members = lab == best
        purity = is_wm[members].mean()
        recall = members[is_wm].mean()
        assert purity >= 0.9 and recall >= 0.8, (purity, recall, res.n_strategies)
        assert stats[best]["flagged"], stats[best]
        assert "bottom-right" in stats[best]["reason"]
        assert [s["strategy"] for s in stats if s["flagged"]] == [best]


def test_same_clusters_as_corelay(trained_maps):
    """CoRelAy's SpRAy pipeline (its SparseKNN, SymmetricNormalLaplacian, EigenDecomposition and
    KMeans) on our preprocessed maps, same k, number of eigenvalues, clusters and seed, its KMeans
    given the eigenvectors of the c smallest eigenvalues (our rule; CoRelAy's default takes all)."""
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.clustering import KMeans
    from corelay.processor.embedding import EigenDecomposition
    from threadpoolctl import threadpool_limits

    d = trained_maps
    cfg = S.StrategyConfig(embed=False)
    for cls in CLASSES:
        maps = d["maps"][d["target"] == cls]
        ours = S.analyse_class(maps, cfg)
        c = ours.n_strategies
        if c < 2:
            continue
        shares, _ = S.preprocess(maps, cfg.grid)
        pipeline = SpectralClustering(
            affinity=SparseKNN(n_neighbors=cfg.k, symmetric=True),
            embedding=EigenDecomposition(n_eigval=cfg.eigenvalues, is_output=True),
            clustering=KMeans(
                n_clusters=c,
                # CoRelAy's eigenvalues come in descending order: the c smallest are the last
                index=(slice(None), slice(-c, None)),
                kwargs={"random_state": cfg.seed, "n_init": 10},
                is_output=True,
            ),
        )
        with threadpool_limits(1):
            (eigval, _), theirs = pipeline(shares.reshape(len(shares), -1))
        np.testing.assert_allclose(np.sort(eigval), ours.eigenvalues, atol=1e-8)
        assert adjusted_rand_score(ours.strategy[ours.valid], theirs) >= 0.9


# --------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------


def test_preprocess_is_area_mean_abs_and_sum_normalised():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 64, 64))
    maps[2] = 0.0  # unusable
    shares, valid = S.preprocess(maps, 32)
    assert valid.tolist() == [True, True, False]
    # 64 -> 32: plain 2x2 block means, then |.| and / sum (float64 oracle)
    blocks = np.abs(maps[:2].reshape(2, 32, 2, 32, 2).mean(axis=(2, 4)))
    np.testing.assert_allclose(shares, blocks / blocks.sum(axis=(1, 2), keepdims=True), rtol=1e-12)
    # a map smaller than the grid is kept at its size
    assert S.preprocess(rng.random((2, 8, 8)), 32)[0].shape == (2, 8, 8)


def test_spectrum_matches_dense_laplacian():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, (80, 5)), rng.normal(6, 1, (70, 5))])
    a = S.knn_affinity(x, 10)
    lam, vec = S.spectrum(a, 12, seed=0)
    dense = a.toarray()
    deg = dense.sum(1)
    lap = np.eye(len(x)) - dense / np.sqrt(np.outer(deg, deg))
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(lap)[:12], atol=1e-8)
    np.testing.assert_allclose(lap @ vec, vec * lam, atol=1e-7)
    assert S.eigengap(lam, 8)[0] == 2  # two blobs, two strategies


def test_flag_rule_and_stats():
    g = 8
    centre = np.zeros((g, g))
    centre[3:5, 3:5] = 1
    centre /= centre.sum()
    corner = 0.5 * centre.copy()
    corner[0, 0] += 0.5
    ex, flagged, reason = S.shortcut_flags(np.stack([centre, corner]), np.array([50, 20]))
    np.testing.assert_allclose(ex, [0.0, 0.5])
    assert flagged.tolist() == [False, True] and "top-left" in reason[1]
    # too small to flag
    assert not S.shortcut_flags(np.stack([centre, corner]), np.array([50, 4]))[1].any()
    # one strategy: nothing to compare with
    assert np.isnan(S.exclusive_shares(centre[None], np.array([9]))).all()
    assert S.concentration(centre) == pytest.approx(1.0)  # 4 cells hold it all, top 7 cells
    assert S.concentration(np.ones((10, 10))) == pytest.approx(0.1)
    assert S.label_purity(np.array([3, 3, 4, -1])) == (pytest.approx(2 / 3), 3, 3)
    assert S.relabel_by_size(np.array([5, 2, 2, 5, 2, 7])).tolist() == [1, 0, 0, 1, 0, 2]


# --------------------------------------------------------------------------------------------
# the driver: files, idempotence, resume, S3
# --------------------------------------------------------------------------------------------


def _planted_output(write, n_per_class=40, classes=3, parts=3, seed=0, size=16):
    """An output whose class 1 has a corner sub-population (35% of its rows); ``write(table,
    name)`` stores attribution part ``name``. Returns the watermark mask by row id."""
    from xai_workers.schema import OutputLayout, build_table, output_schema

    rng = np.random.default_rng(seed)
    layout = OutputLayout(
        methods=("gradcam", "integrated_gradients"), image_shape=(3, 32, 32), store="compact",
        map_size=size, label_type=pa.int64(),
    )  # fmt: skip
    schema = output_schema(layout)
    n = n_per_class * classes
    target = np.repeat(np.arange(classes), n_per_class)
    maps = rng.gamma(1.0, size=(n, size, size)).astype(np.float32) * 0.2
    maps[:, 5:11, 5:11] += 2
    wm = (target == 1) & (rng.random(n) < 0.35)
    maps[wm, :2, :2] += 20
    ig = maps * np.where(rng.random(maps.shape) < 0.5, -1, 1)
    errors = [None] * n
    errors[3] = "could not decode"
    for p, idx in enumerate(np.array_split(rng.permutation(n), parts)):
        t = build_table(
            schema, ids=[f"r{i:04d}" for i in idx], sources=["in.parquet"] * len(idx),
            source_rows=idx, errors=[errors[i] for i in idx],
            values={"target": target[idx], "pred_class": target[idx], "gradcam": maps[idx],
                    "integrated_gradients": ig[idx]},
            labels=target[idx],
        )  # fmt: skip
        write(t, f"part-{p:03d}.parquet")
    return {f"r{i:04d}": bool(wm[i]) for i in range(n)}


def _local_output(root):
    os.makedirs(os.path.join(root, "attributions"), exist_ok=True)
    return _planted_output(
        lambda t, name: pq.write_table(t, os.path.join(root, "attributions", name))
    )


def _files(root):
    with open(os.path.join(root, "summary", "strategies.parquet"), "rb") as f:
        a = f.read()
    with open(os.path.join(root, "summary", "strategy_clusters.parquet"), "rb") as f:
        b = f.read()
    return a, b


def test_driver_writes_tables_idempotently_and_resumes(tmp_path, ray_session):
    from xai_audit.strategies import clusters_schema, rows_schema, run_strategies

    out = str(tmp_path / "out")
    wm = _local_output(out)
    rec = run_strategies(out, buckets=3, use_ray=True)
    assert rec["status"] == "complete" and rec["flagged"] == 2  # class 1, both methods
    first = _files(out)
    assert not os.path.exists(os.path.join(out, "summary", "_strategies"))  # work removed

    rows = pq.read_table(os.path.join(out, "summary", "strategies.parquet"))
    clusters = pq.read_table(os.path.join(out, "summary", "strategy_clusters.parquet"))
    assert rows.schema.equals(rows_schema(pa.string()), check_metadata=False)
    assert clusters.schema.equals(clusters_schema(16), check_metadata=False)
    assert rows.num_rows == 2 * (120 - 1)  # ok rows x methods; the error row is left out
    assert rows.column("strategy").null_count == 0
    r = rows.filter(pa.compute.equal(rows.column("method"), "gradcam")).to_pylist()
    c = clusters.filter(pa.compute.equal(clusters.column("method"), "gradcam")).to_pylist()
    flagged = [(x["target"], x["strategy"]) for x in c if x["flagged"]]
    assert len(flagged) == 1 and flagged[0][0] == 1
    members = {x["id"] for x in r if (x["target"], x["strategy"]) == flagged[0]}
    planted = {i for i, w in wm.items() if w}
    assert members == planted
    assert all(np.isfinite(x["embed_x"]) for x in r)
    ig = rows.filter(pa.compute.equal(rows.column("method"), "integrated_gradients"))
    assert ig.column("embed_x").null_count == ig.num_rows  # the t-SNE for the report's method only

    # twice, the second time from the command line: the same bytes
    from xai_audit.cli import main

    assert main(["strategies", out, "--buckets", "3"]) == 0
    assert _files(out) == first
    assert main(["strategies", str(tmp_path / "missing")]) == 2

    # interrupted during the analysis (after the first bucket), then --resume
    os.remove(os.path.join(out, "summary", "strategies.parquet"))
    os.remove(os.path.join(out, "summary", "strategy_clusters.parquet"))

    def stop(msg):
        if msg.startswith("strategies: analysis 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_strategies(out, buckets=3, use_ray=True, log=stop)
    assert not os.path.exists(os.path.join(out, "summary", "strategies.parquet"))
    assert os.listdir(os.path.join(out, "summary", "_strategies", "results"))
    said = []
    run_strategies(out, buckets=3, resume=True, use_ray=True, log=said.append)
    assert any("resuming" in m for m in said)
    plan = next(m for m in said if "bucket(s); bucketing" in m)
    assert "bucketing 0/1" in plan and "analysing 3/3" not in plan
    assert _files(out) == first


def test_driver_on_s3_matches_local(tmp_path, s3_server, s3_bucket, ray_session):
    import pyarrow.fs as pafs

    from xai_audit.strategies import run_strategies

    local = str(tmp_path / "out")
    _local_output(local)
    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", region="us-east-1")

    def write(t, name):
        with fs.open_output_stream(f"{s3_bucket}/out/attributions/{name}") as f:
            pq.write_table(t, f)

    _planted_output(write)
    uri = f"s3://{s3_bucket}/out"
    from xai_workers.storage import configure

    configure(s3_server)  # the process's storage; the Ray tasks get it through worker_env()
    run_strategies(uri, config=S.StrategyConfig(embed=False), use_ray=True)
    run_strategies(local, config=S.StrategyConfig(embed=False))
    for name in ("strategies.parquet", "strategy_clusters.parquet"):
        with fs.open_input_file(f"{s3_bucket}/out/summary/{name}") as f:
            remote = pq.read_table(f)
        assert remote.equals(pq.read_table(os.path.join(local, "summary", name)))
    left = fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/out/summary", recursive=True))
    assert not [i.path for i in left if "_strategies" in i.path]

    # the report's Strategies section, from S3: the flagged class first, in the findings box too
    from xai_audit.report import build_report

    build_report(uri, log=lambda m: None)
    with fs.open_input_stream(f"{s3_bucket}/out/report/index.html") as f:
        page = f.read().decode()
    section = page[page.index('<h2 id="strategies">') :]
    assert section.index("Class 1") < section.index("Class 0")
    findings = page[page.index('<div class="findings') : page.index('<h2 id="classes">')]
    assert "Grad-CAM strategy 1" in findings and "shortcut candidate" in findings
    imgs = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/out/report/img"))]
    assert sum("strategy-gradcam-m" in p for p in imgs) == 4 * 4  # 4 members x 4 strategies


def test_driver_errors(tmp_path):
    from xai_audit.strategies import run_strategies

    with pytest.raises(FileNotFoundError):
        run_strategies(str(tmp_path / "nothing"))
    out = str(tmp_path / "out")
    _local_output(out)
    with pytest.raises(ValueError, match="no stored maps for saliency"):
        run_strategies(out, methods=["saliency"])
    with pytest.raises(ValueError, match="max_strategies"):
        S.StrategyConfig(max_strategies=40)


@pytest.mark.parametrize("store, topk", [("full", None), ("compact", 2)])
def test_driver_reads_full_maps_and_topk(tmp_path, store, topk):
    """Full-profile IG (C, H, W) is summed over channels (as compact stores it) and area-averaged;
    with ``topk:K`` the first target's map and class are used. In-process (no Ray)."""
    from xai_audit.strategies import run_strategies
    from xai_workers.schema import OutputLayout, build_table, output_schema

    rng = np.random.default_rng(3)
    n, size = 60, 32
    layout = OutputLayout(
        methods=("integrated_gradients",), image_shape=(3, size, size), store=store,
        map_size=16, topk=topk,
    )  # fmt: skip
    ig = rng.gamma(1.0, 0.1, size=(n, 3, size, size)).astype(np.float32)
    wm = rng.random(n) < 0.4
    ig[wm, :, :4, :4] += 5.0
    value = ig if store == "full" else ig.sum(axis=1).reshape(n, 16, 2, 16, 2).mean(axis=(2, 4))
    target = np.zeros(n, np.int64)
    if topk:
        value = np.stack([value, np.zeros_like(value)], axis=1)  # the second target: all zero
        target = np.stack([target, np.ones(n, np.int64)], axis=1)
    t = build_table(
        output_schema(layout), ids=[f"r{i}" for i in range(n)], sources=["x"] * n,
        source_rows=np.arange(n), errors=[None] * n,
        values={"target": target, "pred_class": target[:, 0] if topk else target,
                "integrated_gradients": value},
    )  # fmt: skip
    os.makedirs(tmp_path / "attributions")
    pq.write_table(t, tmp_path / "attributions" / "part-0.parquet")
    rec = run_strategies(str(tmp_path), use_ray=False)
    assert rec["class_methods_analysed"] == 1 and rec["flagged"] == 1
    rows = pq.read_table(tmp_path / "summary" / "strategies.parquet").to_pylist()
    assert {r["target"] for r in rows} == {0}
    clusters = pq.read_table(tmp_path / "summary" / "strategy_clusters.parquet")
    side = size if store == "full" else 16  # min(grid 32, the stored side)
    assert clusters.schema.field("mean_map").type.shape == [side, side]
    flagged = clusters.filter(pa.compute.field("flagged")).to_pylist()[0]["strategy"]
    members = np.array([r["strategy"] == flagged for r in rows])
    np.testing.assert_array_equal(members, wm)
