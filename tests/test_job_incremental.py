"""Scheduled audits on a growing dataset: `--incremental` explains only what is new since the
output's last run, reports changed and removed files, and with `--reprocess-changed` replaces
their rows, never duplicating one. Runs on a local Ray (one session for the module)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from xai_audit import output as out
from xai_audit.attribute import run_job
from xai_audit.config import ConfigError, JobConfig
from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model, write_demo_dataset


def _ids(output) -> list:
    return pq.read_table(output / "attributions", columns=["id"])["id"].to_pylist()


def test_incremental_runs_on_a_growing_input(ray_session, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    full = tmp_path / "all.parquet"
    write_demo_dataset(str(full), n=30)
    rows = pq.read_table(full)
    pq.write_table(rows.slice(0, 10), data / "a.parquet")
    pq.write_table(rows.slice(10, 10), data / "b.parquet")
    torch.manual_seed(0)
    weights = str(tmp_path / "m.pt")
    torch.save(build_demo_model().state_dict(), weights)
    output = tmp_path / "out"
    logs: list[str] = []

    def cfg(**kw):
        return JobConfig(input=str(data), output=str(output), model="xai_workers.demo:"
                         "build_demo_model", weights=weights, image_size=32, mean=DEMO_MEAN,
                         std=DEMO_STD, methods=("saliency",), batch_size=8,
                         progress_interval_s=0.0, **kw)  # fmt: skip

    assert run_job(cfg(), log=logs.append).exit_code == 0
    pq.write_table(rows.slice(20, 10), data / "c.parquet")  # the next night: 10 new images
    with pytest.raises(ConfigError, match="--incremental"):
        run_job(cfg(), log=logs.append)  # without it the output is refused, naming the flag
    res = run_job(cfg(incremental=True), log=logs.append)
    assert res.exit_code == 0 and res.counts["rows_computed_this_run"] == 10
    assert sorted(_ids(output)) == sorted(rows["id"].to_pylist())
    assert any("1 new since the last run" in m for m in logs)

    # b.parquet is rewritten with 6 rows (changed): reported, its 10 old rows kept
    pq.write_table(rows.slice(10, 6), data / "b.parquet")
    res = run_job(cfg(incremental=True), log=logs.append)
    assert res.counts["rows_computed_this_run"] == 0, "\n".join(logs[-12:])
    assert any("input files changed" in m and "b.parquet" in m for m in logs)
    assert len(_ids(output)) == 30
    # the 4 rows past b's new end are kept but are not rows of this input: "26/26", not "30/26"
    assert res.summary.startswith("complete: 26/26 rows (30 ok, 0 errors = 0.00%, 4 of them "
                                  "from inputs no longer present"), res.summary  # fmt: skip
    # --reprocess-changed: b's rows replaced, none twice
    res = run_job(cfg(incremental=True, reprocess_changed=True), log=logs.append)
    assert res.exit_code == 0 and res.counts["rows_computed_this_run"] == 6
    ids = _ids(output)
    assert len(ids) == len(set(ids)) == 26
    scan = out.scan(str(output / "attributions"), {"a.parquet": 10, "b.parquet": 6,
                                                     "c.parquet": 10})  # fmt: skip
    assert scan.duplicates == 0 and scan.unknown == 0
    m = json.loads((output / "manifest.json").read_text())
    assert len(m["runs"]) == 4 and m["runs"][1]["incremental"]["new"] == 1
    assert m["runs"][3]["incremental"]["changed"] == 1
    assert m["input"]["sources"] == {"a.parquet": 10, "b.parquet": 6, "c.parquet": 10}

    # c.parquet rewritten in place with as many rows, other images (other ids): its stamp
    # (size and modification time) changed, so it is "changed" although its row count is not
    other = rows.slice(0, 10).set_column(0, "id", pa.array([f"new{i}" for i in range(10)]))
    pq.write_table(other, data / "c.parquet", compression="zstd")  # another size, another mtime
    res = run_job(cfg(incremental=True, reprocess_changed=True), log=logs.append)
    assert any("--incremental: 1 changed since the last run" in m for m in logs), logs[-12:]
    assert res.exit_code == 0 and res.counts["rows_computed_this_run"] == 10
    ids = _ids(output)
    assert len(ids) == len(set(ids)) == 26 and sum(i.startswith("new") for i in ids) == 10
    assert pa.types.is_string(pq.read_schema(output / "summary" / "summary.parquet")
                              .field("group_by").type)  # the summary was rebuilt  # fmt: skip
