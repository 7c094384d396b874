"""AttributionWorker (no Ray): same numbers as the engine, bad rows become error rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from rowcheck import assert_maps_close, assert_rows_match_engine, assert_statistics_from_own_maps
from torch import nn

from xai_workers import schema as S
from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model
from xai_workers.engine import attribute, make_baseline, prepare_model
from xai_workers.preprocess import Preprocessing
from xai_workers.stats import gini as stats_gini
from xai_workers.worker import AttributionWorker, available_cores, parse_target

SIZE = 32
PRE = Preprocessing(image_size=SIZE, mean=DEMO_MEAN, std=DEMO_STD)
# store="full": these tests compare the full-resolution maps with the engine's
KW = dict(image_size=SIZE, mean=DEMO_MEAN, std=DEMO_STD, ig_steps=4, batch_size=3, store="full")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_demo_model().eval()


def _batch(x: np.ndarray, *, errors=None, labels=None, valid=None) -> pa.Table:
    n = len(x)
    cols = {"id": pa.array([f"r{i}" for i in range(n)])}
    if labels is not None:
        cols["label"] = pa.array(labels, type=pa.int64())
    cols["x"] = S.tensor_array(x, valid)
    cols["error"] = pa.array(errors or [None] * n, type=pa.string())
    cols["source"] = pa.array(["src.parquet"] * n)
    cols["source_row"] = pa.array(np.arange(n), type=pa.int64())
    return pa.table(cols)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, SIZE, SIZE, generator=g) - 0.5).div(0.5).numpy()


def test_parse_target():
    assert parse_target("predicted") == ("predicted", None)
    assert parse_target(None) == ("predicted", None)
    assert parse_target("label") == ("label", None)
    assert parse_target("7") == ("class", 7) and parse_target(3) == ("class", 3)
    assert parse_target("topk:3") == ("topk", 3)
    for bad in ("topk:0", "topk:x", "cat", "-1"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_matches_engine_on_same_inputs(model):
    x = _images(7)
    w = AttributionWorker(model, ig_baseline="blur", **KW)
    out = w(_batch(x))
    assert out.schema.equals(w.schema)
    assert out.column("status").to_pylist() == ["ok"] * 7
    assert out.column("id").to_pylist() == [f"r{i}" for i in range(7)]
    net = prepare_model(model)
    xt = torch.from_numpy(x)
    ref = attribute(
        net,
        xt,
        ig_steps=4,
        baseline=make_baseline(xt, "blur", PRE),
        gradcam_layer=w.gradcam_layer,
    )
    assert_rows_match_engine(out, ref)
    np.testing.assert_array_equal(
        np.asarray(out["topk_classes"].to_pylist()), ref["topk_classes"].numpy()
    )
    assert w.counters["rows"] == 7 and w.counters["errors"] == 0


def test_cam_has_statistics(model):
    """--methods cam: the rows get cam_{gini,...} statistics of ReLU(cam) (its 2-D map) and an
    agreement with the other maps, like every other method."""
    x = _images(4)
    w = AttributionWorker(model, methods=("saliency", "cam"), **KW)
    out = w(_batch(x))
    assert out.column("status").to_pylist() == ["ok"] * 4
    for s in ("gini", "entropy", "border_frac", "com_x", "com_y"):
        assert f"cam_{s}" in out.column_names
    assert "agree_saliency_cam" in out.column_names
    cam = torch.from_numpy(S.tensor_to_numpy(out["cam"]))
    assert (cam < 0).any()  # stored raw and signed
    gini = stats_gini(cam.clamp(min=0).double()).numpy()
    np.testing.assert_allclose(out["cam_gini"].to_numpy(), gini, rtol=1e-6)  # float32 cast
    assert_statistics_from_own_maps(out)


def test_gradcam_at_a_conv_that_has_a_batchnorm(model):
    """prepare_model folds BatchNorms into convs unless the conv is the Grad-CAM layer: the
    worker must keep the named conv's own activations."""
    x = _images(3)
    layer = "features.block3.conv"
    w = AttributionWorker(model, gradcam_layer=layer, methods=("gradcam",), **KW)
    out = w(_batch(x))
    assert out.column("status").to_pylist() == ["ok"] * 3
    ref = attribute(model, torch.from_numpy(x), methods=("gradcam",), gradcam_layer=layer)
    assert_maps_close(S.tensor_to_numpy(out["gradcam"]), ref["gradcam"].numpy(), "gradcam")


def test_bad_rows_become_error_rows(model):
    x = _images(6)
    x[4, 0, 0, 0] = np.nan
    valid = np.array([True, False, True, True, True, True])
    errors = [None, "cannot decode image: truncated", None, None, None, None]
    labels = [1, 2, None, 42, 3, 0]
    w = AttributionWorker(model, target="label", label_type=pa.int64(), **KW)
    out = w(_batch(x, errors=errors, labels=labels, valid=valid))
    assert out.num_rows == 6
    status = out.column("status").to_pylist()
    assert status == ["ok", "error", "error", "error", "error", "ok"]
    err = out.column("error").to_pylist()
    assert err[1] == "cannot decode image: truncated"
    assert "label is null" in err[2] and "not a class index" in err[3]
    assert "NaN" in err[4]
    assert out.column("target").to_pylist()[0] == 1 and out.column("target").to_pylist()[5] == 0
    assert out.column("label").to_pylist() == labels
    for name in ("saliency", "integrated_gradients", "gradcam", "score", "saliency_gini"):
        assert out.column(name).null_count == 4


class _Fussy(nn.Module):
    """Raises on any batch holding an image whose first pixel is above 50."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if (x[:, 0, 0, 0] > 50).any():
            raise RuntimeError("fussy model refuses this image")
        h = torch.relu(self.conv(x))
        return self.fc(h.mean(dim=(2, 3)))


def test_exception_in_model_isolated_to_its_row():
    torch.manual_seed(0)
    x = _images(5)
    x[2, 0, 0, 0] = 99.0
    w = AttributionWorker(_Fussy(), **{**KW, "batch_size": 5})
    out = w(_batch(x))
    assert out.column("status").to_pylist() == ["ok", "ok", "error", "ok", "ok"]
    assert "fussy model refuses" in out.column("error").to_pylist()[2]
    assert out.column("gradcam").null_count == 1


def test_topk_and_fixed_class_targets(model):
    x = _images(3)
    w = AttributionWorker(model, target="topk:2", methods=("saliency", "gradcam"), **KW)
    out = w(_batch(x))
    assert S.map_shape_of(out.schema.field("saliency").type) == (2, SIZE, SIZE)
    t = np.asarray(out.column("target").to_pylist())
    assert t.shape == (3, 2)
    np.testing.assert_array_equal(t[:, 0], out.column("pred_class").to_numpy())
    assert "integrated_gradients" not in out.column_names
    w2 = AttributionWorker(model, target=4, methods=("saliency",), **KW)
    assert set(w2(_batch(x)).column("target").to_pylist()) == {4}
    with pytest.raises(ValueError, match="not a class"):
        AttributionWorker(model, target=10, **KW)
    with pytest.raises(ValueError, match="label column"):
        AttributionWorker(model, target="label", **KW)


def test_all_rows_in_error_and_wrong_tensor_size(model):
    w = AttributionWorker(model, **KW)
    x = _images(2)
    out = w(_batch(x, valid=np.array([False, False]), errors=["a", "b"]))
    assert out.column("status").to_pylist() == ["error", "error"]
    small = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="image size"):
        w(_batch(small))


def test_cpu_threads_follow_cores_not_the_ray_request(model):
    torch.set_num_threads(1)  # what Ray's OMP_NUM_THREADS=1 gives a fractional-CPU actor
    try:
        w = AttributionWorker(model, device="cpu", **KW)
        assert w.num_threads == available_cores() == torch.get_num_threads()
        w1 = AttributionWorker(model, device="cpu", num_threads=1, **KW)
        assert w1.num_threads == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(available_cores())


def test_model_spec_with_weights_file(model, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    w = AttributionWorker(
        "xai_workers.demo:build_demo_model", str(path), methods=("saliency",), **KW
    )
    assert w.checksum and w.num_classes == 10 and w.device.type == "cpu"
    x = _images(2)
    out = w(_batch(x))
    ref = attribute(prepare_model(model), torch.from_numpy(x), methods=("saliency",))
    assert_maps_close(S.tensor_to_numpy(out["saliency"]), ref["saliency"].numpy(), "saliency")


def test_cam_family_columns_and_statistics(model):
    """The Grad-CAM family goes through the worker like Grad-CAM: a map column each (full
    store), the five statistics of it, rank agreements, all from the one pass at x."""
    x = _images(3)
    names = ("gradcam", "gradcam_pp", "xgradcam", "layercam", "eigencam")
    w = AttributionWorker(model, methods=names, **KW)  # KW: store="full"
    out = w(_batch(x))
    assert out.column("status").to_pylist() == ["ok"] * 3
    ref = attribute(prepare_model(model), torch.from_numpy(x), methods=names,
                    gradcam_layer=w.gradcam_layer)  # fmt: skip
    for name in names:
        assert f"{name}_border_frac" in out.column_names
        assert_maps_close(S.tensor_to_numpy(out[name]), ref[name].numpy(), name)
    assert "agree_gradcam_gradcam_pp" in out.column_names
    assert_statistics_from_own_maps(out)


def test_smoothgrad_noise_is_seeded_by_the_row_key(model):
    """The worker seeds each row's SmoothGrad noise with faithfulness.row_key(source,
    source_row): the same row gives the same map in any batch, on any actor, on resume."""
    from xai_workers.faithfulness import row_key

    x = _images(4)
    w = AttributionWorker(model, methods=("smoothgrad", "vargrad"), smoothgrad_samples=3, **KW)
    out = w(_batch(x))
    keys = [row_key("src.parquet", i) for i in range(4)]
    ref = attribute(prepare_model(model), torch.from_numpy(x), methods=("smoothgrad", "vargrad"),
                    smoothgrad_samples=3, noise_keys=keys)  # fmt: skip
    for name in ("smoothgrad", "vargrad"):
        assert_maps_close(S.tensor_to_numpy(out[name]), ref[name].numpy(), name)
        assert f"{name}_gini" in out.column_names
    one = _batch(x[2:3])
    one = one.set_column(
        one.schema.get_field_index("source_row"), "source_row", pa.array([2], pa.int64())
    )  # the same row, alone in its batch
    alone = w(one)
    assert_maps_close(S.tensor_to_numpy(alone["smoothgrad"]), ref["smoothgrad"][2:3].numpy(),
                      "smoothgrad")  # fmt: skip
