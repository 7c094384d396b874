"""The GPU path's scheduling on a CPU machine: Ray fakes the GPUs (``ray.init(num_gpus=...)``).

The job must give every actor one GPU, as many actors as GPUs, and still complete; with no CUDA
device behind the fake GPU the worker runs on the CPU, with the same numbers.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import ray

from xai_audit.attribute import plan_resources, run_job
from xai_audit.config import JobConfig
from xai_workers.demo import (
    DEMO_MEAN,
    DEMO_MODEL_SPEC,
    DEMO_STD,
    build_demo_model,
    write_demo_dataset,
)

N = 24


@pytest.fixture(scope="module")
def fake_gpu_ray():
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


def test_one_gpu_per_actor_and_the_job_completes(fake_gpu_ray, tmp_path):
    import torch

    dataset = str(tmp_path / "digits.parquet")
    write_demo_dataset(dataset, n=N)
    torch.manual_seed(0)
    weights = str(tmp_path / "model.pt")
    torch.save(build_demo_model().state_dict(), weights)
    cfg = JobConfig(
        input=dataset, output=str(tmp_path / "out"), model=DEMO_MODEL_SPEC, weights=weights,
        image_size=32, mean=DEMO_MEAN, std=DEMO_STD, ig_steps=4, batch_size=8,
    )  # fmt: skip

    plan = plan_resources(cfg)
    assert plan.gpus == 2 and plan.actors == 2 and plan.actor_num_gpus == 1.0
    assert plan.device == "cuda"
    assert 0 < plan.actor_num_cpus <= 1.0
    assert plan_resources(cfg.updated({"actors": 1})).actors == 1

    res = run_job(cfg.updated({"actors": 1}), log=lambda m: None)
    assert res.exit_code == 0 and res.status == "complete"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["ray"]["actor_num_gpus"] == 1.0 and manifest["ray"]["gpus"] == 2
    t = pq.read_table(tmp_path / "out" / "attributions")
    assert t.num_rows == N and set(t.column("status").to_pylist()) == {"ok"}
