"""`xai-audit compare`: two outputs of the same rows (as two models would give), per class the
changes in numbers computed here from the rows themselves. No Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xai_audit.attribute import write_attributions
from xai_audit.cli import main
from xai_workers import demo
from xai_workers import schema as S
from xai_workers import summary as SM
from xai_workers.worker import AttributionWorker

N = 24


def _run(root, seed: int) -> str:
    """N rows of one input through an (untrained) demo net initialised with ``seed``."""
    import torch

    torch.manual_seed(seed)
    w = AttributionWorker(demo.build_demo_model(), image_size=32, mean=demo.DEMO_MEAN,
                          std=demo.DEMO_STD, ig_steps=2, num_threads=1, pooled_columns=True,
                          label_type=pa.int64())  # fmt: skip
    rng = np.random.default_rng(0)
    x = (rng.random((N, 3, 32, 32)) * 2 - 1).astype(np.float32)
    batch = pa.table({
        "id": [f"i{i}" for i in range(N)], "label": pa.array(np.arange(N) % 3, pa.int64()),
        "x": S.tensor_array(x), "error": pa.nulls(N, pa.string()), "source": ["s"] * N,
        "source_row": np.arange(N),
    })  # fmt: skip
    write_attributions(w(batch), dest=str(root / "attributions"), output=str(root))
    SM.summarize_output(str(root))
    return str(root)


def test_compare_two_models_on_one_dataset(tmp_path, capsys):
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1)
    assert main(["compare", a, b]) == 0
    t = pq.read_table(tmp_path / "b" / "compare" / "comparison.parquet")
    assert (tmp_path / "b" / "compare" / "index.html").is_file()
    ra = pq.read_table(tmp_path / "a" / "attributions").sort_by("id")
    rb = pq.read_table(tmp_path / "b" / "attributions").sort_by("id")
    pred_a, pred_b = ra["pred_class"].to_numpy(), rb["pred_class"].to_numpy()
    assert (pred_a != pred_b).any()  # two random nets disagree: flips to count
    by_class = {r["class"]: r for r in t.to_pylist()}
    for c, r in by_class.items():
        assert r["flips"] == ((pred_a != pred_b) & ((pred_a == c) | (pred_b == c))).sum()
    sa, sb = SM.read_summary(a), SM.read_summary(b)

    def row(s, c):
        g = s.filter(pa.compute.equal(s["group_by"], "target"))
        return g.filter(pa.compute.equal(g["class"], c))

    for c, r in by_class.items():
        xa, xb = row(sa, c), row(sb, c)
        if xa.num_rows and xb.num_rows:
            want = (xb["gradcam_border_frac_mean"][0].as_py()
                    - xa["gradcam_border_frac_mean"][0].as_py())  # fmt: skip
            assert r["gradcam_border_change"] == pytest.approx(want, abs=1e-12)
            ma = S.tensor_to_numpy(xa["gradcam_share_map"])[0].astype(np.float64)
            mb = S.tensor_to_numpy(xb["gradcam_share_map"])[0].astype(np.float64)
            assert r["gradcam_map_l1"] == pytest.approx(np.abs(ma - mb).sum(), rel=1e-9)
    changes = t["change"].to_pylist()
    assert changes == sorted(changes, reverse=True)
    assert "rows matched by id" in capsys.readouterr().out
    assert main(["compare", a, str(tmp_path / "missing")]) == 2
