"""Storage profiles (no Ray): compact maps are area averages of the full maps, statistics and the
summary's maps are the same under every profile, float columns are written BYTE_STREAM_SPLIT."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from xai_audit import output as out
from xai_workers import schema as S
from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model
from xai_workers.profiles import area_matrix, reduce_map
from xai_workers.summary import Summary
from xai_workers.worker import AttributionWorker

SIZE = 32
KW = dict(image_size=SIZE, mean=DEMO_MEAN, std=DEMO_STD, ig_steps=4, batch_size=4, num_threads=1)
MAPS = ("saliency", "integrated_gradients", "gradcam")
# bfloat16 keeps 8 significant bits: a stored value is within 2**-8 (relative, half an ulp) of
# the float32 average it rounds; 2**-8 + 1e-5 (float32 sums) catches a wrong average (a missing
# or extra pixel moves it by >= 1/16 of a pixel's value, far more) but not the rounding itself.
BF16_RTOL = 2.0**-8 + 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_demo_model().eval()


def _batch(n: int, seed: int = 0) -> pa.Table:
    g = torch.Generator().manual_seed(seed)
    x = ((torch.rand(n, 3, SIZE, SIZE, generator=g) - 0.5) / 0.5).numpy()
    errors = [None] * n
    errors[1] = "cannot decode image: test"  # an error row stays one, with null maps
    return pa.table({
        "id": [f"r{i}" for i in range(n)], "x": S.tensor_array(x),
        "error": pa.array(errors, pa.string()), "source": ["s.parquet"] * n,
        "source_row": pa.array(np.arange(n), pa.int64()),
    })  # fmt: skip


def _block_mean(m: np.ndarray, size: int) -> np.ndarray:
    """Float64 oracle of the area average: repeat each pixel k times per axis so that k*H is a
    multiple of ``size``, then average plain blocks. (..., H, W) -> (..., size, size)."""
    h = m.shape[-1]
    k = size // np.gcd(h, size)
    big = np.repeat(np.repeat(m.astype(np.float64), k, -2), k, -1)
    b = k * h // size
    return big.reshape(*m.shape[:-2], size, b, size, b).mean(axis=(-3, -1))


@pytest.mark.parametrize("size", [8, 12])  # 8 divides 32 (plain blocks), 12 does not
def test_compact_maps_are_area_averages_of_the_full_maps(model, size):
    batch = _batch(5)
    full = AttributionWorker(model, store="full", **KW)(batch)
    compact = AttributionWorker(model, store="compact", map_size=size, **KW)(batch)
    assert compact.schema.field("saliency").type == S.map_type((size, size), "compact")
    assert S.map_shape_of(compact.schema.field("integrated_gradients").type) == (size, size)
    assert compact.schema.metadata[b"xai_workers.store"] == b"compact"
    ok = np.array(full["status"].to_pylist()) == "ok"
    assert list(ok) == [True, False, True, True, True]
    for m in MAPS:
        f = S.tensor_to_numpy(full[m])[ok]
        if m == "integrated_gradients":
            f = f.astype(np.float64).sum(axis=1)  # signed channel sum
        want = _block_mean(f, size)
        got = S.tensor_to_numpy(compact[m])
        assert np.isnan(got[~ok]).all()  # error row: null map
        assert got.dtype == np.float32 and not (got[ok].view(np.uint32) & 0xFFFF).any()
        scale = np.abs(want).max()
        np.testing.assert_allclose(got[ok], want, rtol=BF16_RTOL, atol=1e-6 * scale)

    # completeness from the stored map: sum(map) * (H*W)/(M*M) == sum(IG) = delta + F(x) - F(x')
    ig_c = S.tensor_to_numpy(compact["integrated_gradients"])[ok].astype(np.float64)
    total = ig_c.sum(axis=(1, 2)) * SIZE * SIZE / size**2
    want = (
        np.asarray(full["ig_delta"])[ok].astype(np.float64)
        + np.asarray(full["score"])[ok]
        - np.asarray(full["baseline_score"])[ok]
    )
    # each stored value rounds by <= 2**-8 of itself; with the float32 sums (~1e-6 relative)
    # that bounds the error by 2**-8 * sum|map| * (H*W)/(M*M) (plus 1e-5 for the stored scalars)
    bound = 2.0**-8 * np.abs(ig_c).sum(axis=(1, 2)) * SIZE * SIZE / size**2 + 1e-5
    assert (np.abs(total - want) <= bound).all(), (total, want, bound)


def test_area_average_equals_adaptive_avg_pool_when_the_size_divides():
    # the independent oracle here is torch's adaptive_avg_pool2d (plain blocks when M | H)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    got = area_matrix(32, 8) @ x @ area_matrix(32, 8).T
    # float64 on both sides: 1e-12 catches any wrong weight, not summation-order noise (1e-16)
    torch.testing.assert_close(got, F.adaptive_avg_pool2d(x, 8), rtol=1e-12, atol=1e-12)
    a = area_matrix(224, 64)
    # each row a mean (sums to 1), each pixel counted once in all (columns sum to 64/224)
    torch.testing.assert_close(a.sum(1), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(a.sum(0), torch.full((224,), 64 / 224, dtype=torch.float64))
    # the map size never exceeds the input
    assert reduce_map("saliency", torch.rand(1, 16, 16), 64).shape == (1, 16, 16)


def test_statistics_and_summary_are_identical_under_every_profile(model):
    batch = _batch(6, seed=3)
    tables = {
        store: AttributionWorker(model, store=store, pooled_columns=True, **KW)(batch)
        for store in ("full", "compact", "stats")
    }
    assert not any(m in tables["stats"].column_names for m in MAPS)
    full = tables["full"]
    stat_cols = [c for c in full.column_names if c not in MAPS and not c.startswith("_")]
    for store, t in tables.items():
        for c in stat_cols:
            assert t[c].equals(full[c]), (store, c)
    summaries = {
        store: Summary().update(t).to_table() for store, t in tables.items()
    }  # from the in-flight pooled columns, as the job's writer does
    assert summaries["full"].column_names == summaries["compact"].column_names
    assert "gradcam_mean_map" in summaries["full"].column_names
    for store in ("compact", "stats"):
        assert summaries[store].equals(summaries["full"]), store
    # and the same as the summary of the written full maps without pooled columns (the
    # fallback when a part has no partial)
    plain = full.select([c for c in full.column_names if not c.startswith("_")])
    assert Summary().update(plain).to_table().equals(summaries["full"])


def test_parts_use_byte_stream_split_and_drop_in_flight_columns(model, tmp_path):
    t = AttributionWorker(model, store="compact", pooled_columns=True, **KW)(_batch(4))
    assert "_pooled_gradcam" in t.column_names
    info = out.write_part(t, str(tmp_path))
    pf = pq.ParquetFile(tmp_path / info["file"])
    assert not any(n.startswith("_") for n in pf.schema_arrow.names)
    rg = pf.metadata.row_group(0)
    enc = {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}
    for path in ("saliency.list.element", "integrated_gradients.list.element", "score"):
        assert "BYTE_STREAM_SPLIT" in enc[path].encodings, path
        assert enc[path].compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" not in enc["pred_class"].encodings
    back = pq.read_table(tmp_path / info["file"])
    assert back.schema.field("gradcam").type == S.map_type((32, 32), "compact")
    # the shape survives Parquet in the element field's metadata (== ignores metadata)
    assert S.map_shape_of(back["gradcam"].type) == (32, 32)
    assert S.map_store_of(back["gradcam"].type) == "compact"


def test_round_bf16_is_round_to_nearest_even_on_the_low_16_bits():
    from xai_workers.profiles import round_bf16

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-30, 30, 100_000)).astype(np.float32)
    # ties: the low 16 bits exactly 0x8000, with an even and an odd bit 16
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000], np.uint32).view(np.float32)
    x = np.concatenate([x, ties, np.float32([0.0, -0.0, np.inf, -np.inf, 3.4e38])])
    # oracle: integer round-to-nearest-even of the float32 bit pattern (finite values)
    u = x.view(np.uint32).astype(np.uint64)
    want = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    got = round_bf16(torch.from_numpy(x)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not (got.view(np.uint32) & 0xFFFF).any()
    assert list(got[-9:-5].view(np.uint32)) == [0x3F800000, 0x3F820000, 0xBF800000, 0xBF820000]
    assert np.isnan(round_bf16(torch.tensor([float("nan")])).numpy()).all()  # not inf
    rel = np.abs(got[:100_000].astype(np.float64) / x[:100_000] - 1)
    assert rel.max() <= 2.0**-8  # half an ulp of 8 significant bits


def test_tensor_to_numpy_reads_schema_1_float16_tensors(tmp_path):
    # outputs written before schema version 2: fixed_shape_tensor, compact maps float16
    v = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4) / 7
    old = S.tensor_array(v, np.array([True, False]), value_type=pa.float16())
    pq.write_table(pa.table({"saliency": old}), tmp_path / "old.parquet")
    col = pq.read_table(tmp_path / "old.parquet")["saliency"]
    got = S.tensor_to_numpy(col)
    assert got.shape == (2, 3, 4) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], v[0].astype(np.float32))  # widened exactly
    assert np.isnan(got[1]).all()
    assert S.map_store_of(col.type) == "compact" and S.is_tensor_type(col.type)
    # a map column read back by another engine as list<float> (no shape): (N, n)
    plain = pa.chunked_array([pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32()))])
    np.testing.assert_array_equal(S.tensor_to_numpy(plain)[[0, 2]], [[1, 2], [3, 4]])
    assert np.isnan(S.tensor_to_numpy(plain)[1]).all()
