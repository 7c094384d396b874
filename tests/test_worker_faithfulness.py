"""AttributionWorker's faithfulness columns: the library's numbers, per row, whatever the batch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from xai_workers import schema as S
from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model
from xai_workers.engine import attribute, make_baseline, prepare_model
from xai_workers.faithfulness import deletion_insertion, row_key
from xai_workers.preprocess import Preprocessing
from xai_workers.stats import map_2d
from xai_workers.summary import statistic_columns
from xai_workers.worker import AttributionWorker

SIZE = 32
PRE = Preprocessing(image_size=SIZE, mean=DEMO_MEAN, std=DEMO_STD)
KW = dict(image_size=SIZE, mean=DEMO_MEAN, std=DEMO_STD, ig_steps=4, batch_size=3)
METHODS = ("saliency", "integrated_gradients", "gradcam")
COLUMNS = [f"{o}_{m}_auc" for o in (*METHODS, "random") for m in ("deletion", "insertion")]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_demo_model().eval()


def _batch(x: np.ndarray, rows: list[int], errors=None) -> pa.Table:
    n = len(x)
    return pa.table(
        {
            "id": pa.array([f"r{i}" for i in rows]),
            "x": S.tensor_array(x),
            "error": pa.array(errors or [None] * n, type=pa.string()),
            "source": pa.array(["a/src.parquet"] * n),
            "source_row": pa.array(rows, type=pa.int64()),
        }
    )


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, SIZE, SIZE, generator=g) - 0.5).div(0.5).numpy()


def test_worker_columns_equal_the_library_and_do_not_depend_on_the_batch(model):
    x = _images(5)
    w = AttributionWorker(model, faithfulness=("deletion", "insertion"), faithfulness_steps=4, **KW)
    for c in COLUMNS:
        assert w.schema.field(c).type == pa.float32()
    assert set(COLUMNS) <= set(statistic_columns(w.schema))  # the summary takes their means
    out = w(_batch(x, list(range(5)), errors=[None, "bad image", None, None, None]))
    assert out.column("status").to_pylist() == ["ok", "error", "ok", "ok", "ok"]
    assert out.column("random_deletion_auc").null_count == 1  # the error row has none

    ok = [0, 2, 3, 4]
    xt = torch.from_numpy(x[ok])
    net = prepare_model(model, gradcam_layer=w.gradcam_layer)
    ref = attribute(net, xt, ig_steps=4, baseline=make_baseline(xt, "black", PRE),
                    gradcam_layer=w.gradcam_layer)  # fmt: skip
    expected = deletion_insertion(
        net,
        xt,
        ref["target"],
        {m: map_2d(m, ref[m]) for m in METHODS},
        make_baseline(xt, "black", PRE),
        make_baseline(xt, "blur", PRE),
        steps=4,
        keys=[row_key("a/src.parquet", i) for i in ok],
    )
    for c in COLUMNS:
        got = np.asarray(out.column(c).to_pylist(), dtype=object)[ok].astype(np.float64)
        assert np.isfinite(got).all()
        # 1e-5: the worker's maps come from batches of 3, these from one batch of 4; float32
        # maps differ by ~1e-7 relative, which moves a near-tied pixel by a place or two: ~1e-6
        # of an AUC. A wrong baseline, blur or key moves an AUC by > 1e-3.
        np.testing.assert_allclose(got, expected[c].numpy(), rtol=0, atol=1e-5, err_msg=c)

    # the same rows in another order and another batch give the same values (row key, not
    # position in the batch)
    perm = [4, 3, 0, 2]
    again = w(_batch(x[perm], perm))
    for c in COLUMNS:
        a = dict(zip(out.column("id").to_pylist(), out.column(c).to_pylist(), strict=True))
        b = dict(zip(again.column("id").to_pylist(), again.column(c).to_pylist(), strict=True))
        for k, v in b.items():
            assert v == pytest.approx(a[k], abs=1e-5), (c, k)


def test_bad_faithfulness_settings(model):
    with pytest.raises(ValueError, match="faithfulness"):
        AttributionWorker(model, faithfulness=("pixelflip",), **KW)
    with pytest.raises(ValueError, match="each once"):
        AttributionWorker(model, faithfulness=("deletion", "deletion"), **KW)
    with pytest.raises(ValueError, match="steps >= 1"):
        AttributionWorker(model, faithfulness=("deletion",), faithfulness_steps=0, **KW)


def test_probabilities_at_x_come_from_the_trio_pass_when_it_has_them(model):
    """The curves skip x's forward when the trio's fp32 pass at x already holds the targets'
    probabilities (its top 5); a target outside the top 5, or a bf16 pass, runs x again."""
    w = AttributionWorker(model, faithfulness=("deletion",), faithfulness_steps=4, **KW)
    xt = torch.from_numpy(_images(3))
    res = attribute(w.net, xt, ig_steps=4, gradcam_layer=w.gradcam_layer)
    with torch.no_grad():
        p = torch.softmax(w.net(xt).double(), dim=1)
    known = w._known_at_x(xt, res)
    # 1e-6: the trio's float32 softmax of the same logits (a wrong class is off by > 1e-3)
    torch.testing.assert_close(
        known["image"], p.gather(1, res["target"].reshape(3, -1)), rtol=0, atol=1e-6
    )
    last = p.argmin(dim=1, keepdim=True)  # never in the top 5 of the demo's classes
    assert p.shape[1] > 5
    assert w._known_at_x(xt, dict(res, target=last[:, 0])) is None
    bf16 = AttributionWorker(model, faithfulness=("deletion",), precision="bf16", **KW)
    assert bf16._known_at_x(xt, res) is None
