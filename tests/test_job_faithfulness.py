"""`--faithfulness` / `--faithfulness-steps`: flags, checks before heavy work, and a job whose
output and summary carry the AUC columns."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from xai_audit import ray_session
from xai_audit.cli import build_parser, config_from_args, main
from xai_audit.config import JobConfig
from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model, write_demo_dataset
from xai_workers.faithfulness import row_key

SPEC = "xai_workers.demo:build_demo_model"
AUCS = [
    f"{o}_{m}_auc"
    for o in ("saliency", "integrated_gradients", "gradcam", "random")
    for m in ("deletion", "insertion")
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faith")
    dataset = str(root / "digits.parquet")
    write_demo_dataset(dataset, n=10)
    torch.manual_seed(0)
    weights = str(root / "model.pt")
    torch.save(build_demo_model().eval().state_dict(), weights)
    return {"dataset": dataset, "weights": weights}


def _argv(data, output, *extra):
    return ["run", "--input", data["dataset"], "--output", str(output), "--model", SPEC,
            "--weights", data["weights"], "--image-size", "32", *extra]  # fmt: skip


def test_flags_parse_and_bad_values_fail_before_ray(data, tmp_path, capsys, monkeypatch):
    ns = build_parser().parse_args(
        _argv(
            data,
            tmp_path / "o",
            "--faithfulness",
            "deletion, insertion",
            "--faithfulness-steps",
            "8",
        )  # fmt: skip
    )
    cfg = config_from_args(ns)
    assert cfg.faithfulness == ("deletion", "insertion") and cfg.faithfulness_steps == 8
    assert {"faithfulness", "faithfulness_steps"} <= set(cfg.result_settings())
    assert JobConfig().faithfulness == () and JobConfig().faithfulness_steps == 16

    def boom(cfg):
        raise AssertionError("Ray was started for a configuration that should have failed")

    monkeypatch.setattr(ray_session, "connect", boom)
    for extra, needle in (
        (("--faithfulness", "deletion,pixelflip"), "--faithfulness takes deletion,insertion"),
        (("--faithfulness", "deletion,deletion"), "each once"),
        (("--faithfulness", "deletion", "--faithfulness-steps", "0"), "must be >= 1"),
        (("--faithfulness-steps", "2.5"), "faithfulness-steps"),
    ):
        assert main(_argv(data, tmp_path / "o", *extra)) == 2
        err = capsys.readouterr().err
        assert needle in err, err


def test_job_writes_auc_columns_and_their_summary_means(data, tmp_path):
    import ray

    from xai_audit.attribute import run_job

    cfg = JobConfig(
        input=data["dataset"],
        output=str(tmp_path / "out"),
        model=SPEC,
        weights=data["weights"],
        image_size=32,
        mean=DEMO_MEAN,
        std=DEMO_STD,
        ig_steps=4,
        batch_size=5,
        progress_interval_s=0.0,
        faithfulness=("deletion", "insertion"),
        faithfulness_steps=4,
        address="local",
        num_cpus=2,
    )
    try:
        res = run_job(cfg, log=lambda m: None)
    finally:
        ray.shutdown()
    assert res.exit_code == 0 and res.counts["rows_ok"] == 10
    t = pq.read_table(tmp_path / "out" / "attributions")
    for c in AUCS:
        v = np.asarray(t.column(c).to_pylist(), dtype=np.float64)
        assert str(t.schema.field(c).type) == "float" and np.isfinite(v).all(), c
        assert ((v >= 0) & (v <= 1)).all(), c  # a trapezoid of probabilities
    # the random order's seed is the row's (source, source_row): check one row by hand
    from xai_workers.faithfulness import random_ranks

    src, row = t.column("source")[0].as_py(), t.column("source_row")[0].as_py()
    perm = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(row_key(src, row)))
    assert random_ranks([row_key(src, row)], 32 * 32)[0, perm[:5]].tolist() == [0, 1, 2, 3, 4]

    summary = pq.read_table(tmp_path / "out" / "summary" / "summary.parquet")
    everything = summary.filter(summary.column("group_by").to_numpy(zero_copy_only=False) == "all")
    for c in AUCS:
        mean = everything.column(f"{c}_mean")[0].as_py()
        # 1e-6: the summary's mean is exact (float64 sums of the float32 column)
        assert mean == pytest.approx(np.mean(t.column(c).to_numpy()), abs=1e-6), c
    # the audit report still renders with the extra statistic columns
    assert main(["report", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report" / "index.html").stat().st_size > 0
