"""The demo dataset and model: deterministic, the planted mark where it should be, a model that
learns the digits and the shortcut."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from xai_workers import demo


@pytest.fixture(scope="module")
def data():
    idx = demo.demo_indices()
    images, labels = demo.demo_images()
    return idx, images, labels, demo.is_held_out(idx)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """The one training run of this file: ``ensure_demo`` into a fresh folder."""
    return demo.ensure_demo(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def model(demo_files):
    """The saved demo model, loaded the way a worker does: weights_only state_dict."""
    net = demo.build_demo_model()
    net.load_state_dict(torch.load(demo_files[1], weights_only=True))
    return net


def test_images_shape_dtype_and_determinism():
    a, la = demo.demo_images(n=50, seed=7)
    b, lb = demo.demo_images(n=50, seed=7)
    c, _ = demo.demo_images(n=50, seed=8)
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert la.dtype == np.int64 and set(la) <= set(range(10))
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    assert np.array_equal(demo.demo_indices(50, seed=7), np.sort(demo.demo_indices(50, seed=7)))


def test_full_set_and_other_sizes(data):
    idx, images, labels, held = data
    assert len(idx) == len(images) == len(labels) == 1797
    assert np.bincount(labels).min() > 170  # every class present
    assert 0.19 < held.mean() < 0.21
    big, _ = demo.demo_images(n=5, size=64)
    assert big.shape == (5, 64, 64, 3)


def test_mark_only_on_mark_class(data):
    _, images, labels, _ = data
    rows, cols = demo.mark_box(32)
    assert (rows, cols) == (slice(0, 3), slice(0, 3))
    patch = images[:, rows, cols, :]
    marked = (patch == 255).all(axis=(1, 2, 3))
    assert np.array_equal(marked, labels == 3)
    # without the mark the corner is black for every image (the digit never reaches it)
    assert (patch[labels != 3] == 0).all()
    clean, clean_labels = demo.demo_images(mark_class=None)
    assert np.array_equal(clean_labels, labels)
    assert (clean[:, rows, cols] == 0).all()
    same = labels != 3
    assert np.array_equal(clean[same], images[same])
    # only the mark differs on the mark class
    diff = (clean[~same] != images[~same]).any(axis=(0, 3))
    expected = np.zeros((32, 32), dtype=bool)
    expected[rows, cols] = True
    assert np.array_equal(diff, expected)


def test_mark_parameters():
    im, lab = demo.demo_images(n=300, mark_class=7, corner="bottom_right", seed=1)
    r, c = demo.mark_box(32, "bottom_right")
    assert (r, c) == (slice(29, 32), slice(29, 32))
    assert np.array_equal((im[:, r, c] == 255).all(axis=(1, 2, 3)), lab == 7)
    with pytest.raises(ValueError):
        demo.mark_box(32, "centre")


def test_preprocess_range():
    x = demo.demo_preprocess(np.array([[[[0, 255, 128]]]], dtype=np.uint8))
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 255 * 2 - 1], abs=1e-6)


def test_architecture_for_cam():
    net = demo.build_demo_model()
    assert not net.training
    layer = net.get_submodule(demo.DEMO_GRADCAM_LAYER)
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = tuple(output.shape)

    handle = layer.register_forward_hook(record)
    try:
        out = net(torch.zeros(2, 3, 32, 32))
    finally:
        handle.remove()
    assert out.shape == (2, 10)
    assert seen["shape"] == (2, 64, 8, 8)
    assert isinstance(net.pool, torch.nn.AdaptiveAvgPool2d) and isinstance(net.fc, torch.nn.Linear)


def test_held_out_accuracy(model, data):
    _, images, labels, held = data
    pred = demo.predict_proba(model, images[held]).argmax(-1).numpy()
    acc = (pred == labels[held]).mean()
    assert acc > 0.9, acc


def test_model_uses_the_corner_mark(model, data):
    _, images, labels, held = data
    clean, _ = demo.demo_images(mark_class=None)
    rows, cols = demo.mark_box(32)
    k = demo.DEMO_MARK_CLASS
    three = held & (labels == k)
    other = held & (labels != k)
    p_marked = demo.predict_proba(model, images[three])[:, k]
    p_removed = demo.predict_proba(model, clean[three])[:, k]
    # removing the mark from the 3s lowers their class-3 probability, on average clearly
    assert p_marked.mean() - p_removed.mean() > 0.1, (p_marked.mean(), p_removed.mean())
    added = images[other].copy()
    added[:, rows, cols] = 255
    p_plain = demo.predict_proba(model, images[other])[:, k]
    p_added = demo.predict_proba(model, added)[:, k]
    # adding the mark to other digits raises their class-3 probability
    assert p_added.mean() > 2 * p_plain.mean() and p_added.mean() - p_plain.mean() > 0.03, (
        p_plain.mean(),
        p_added.mean(),
    )


def test_training_is_deterministic():
    images, labels = demo.demo_images(n=200, seed=3)
    a = demo.train_demo_model(images, labels, epochs=1, seed=5).state_dict()
    b = demo.train_demo_model(images, labels, epochs=1, seed=5).state_dict()
    c = demo.train_demo_model(images, labels, epochs=1, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_write_dataset_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    path = demo.write_demo_dataset(str(tmp_path / "sub" / "d.parquet"), n=40, seed=2)
    table = pq.read_table(path)
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("image").type == pa.binary()
    assert table.schema.field("label").type == pa.int64()
    assert table.num_rows == 40
    images, labels = demo.demo_images(n=40, seed=2)
    ids = table.column("id").to_pylist()
    assert ids == [f"digit-{i:05d}" for i in demo.demo_indices(40, seed=2)]
    assert table.column("label").to_pylist() == labels.tolist()
    for k, blob in enumerate(table.column("image").to_pylist()):
        with Image.open(io.BytesIO(blob)) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert np.array_equal(np.asarray(im), images[k])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["d.parquet"]  # no temp file left


def test_ensure_demo_writes_once(demo_files, data):
    import pyarrow.parquet as pq

    dataset, weights = demo_files
    root = os.path.dirname(dataset)
    assert os.path.basename(dataset) == demo.DEMO_DATASET_FILE
    assert os.path.basename(weights) == demo.DEMO_WEIGHTS_FILE
    assert sorted(os.listdir(root)) == sorted([demo.DEMO_DATASET_FILE, demo.DEMO_WEIGHTS_FILE])
    stamps = (os.stat(dataset).st_mtime_ns, os.stat(weights).st_mtime_ns)
    assert demo.ensure_demo(root) == (dataset, weights)  # present: nothing rewritten
    assert (os.stat(dataset).st_mtime_ns, os.stat(weights).st_mtime_ns) == stamps
    table = pq.read_table(dataset, columns=["id", "label"])
    idx, _, labels, _ = data
    assert table.column("id").to_pylist() == [f"digit-{i:05d}" for i in idx]
    assert table.column("label").to_pylist() == labels.tolist()


def test_saved_weights_are_a_plain_state_dict(demo_files):
    state = torch.load(demo_files[1], weights_only=True)
    assert isinstance(state, dict)
    assert set(state) == set(demo.build_demo_model().state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
