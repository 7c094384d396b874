"""Input formats (no Ray): data written by the library that writes it in real life (``datasets``,
``webdataset``, Pillow), read by ``xai_audit.sources``: ids, labels, class names, and every bad row
an error row that names it (rows in = rows out)."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xai_audit import sources
from xai_audit.config import ConfigError
from xai_workers.preprocess import Preprocessing, preprocess_bytes

PRE = Preprocessing(image_size=16)


def _png(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _read_all(plan) -> pa.Table:
    shards, todo = sources.make_shards(plan)
    assert todo == plan.total_rows
    blocks = [
        b
        for sh in shards
        for b in sources.read_shard(
            sh, preprocessing=PRE, id_column=plan.id_column, image_column=plan.image_column,
            label_column=plan.label_column, id_type=plan.id_type, label_type=plan.label_type,
            block_rows=3,
        )
    ]  # fmt: skip
    t = pa.concat_tables(blocks)
    assert t.num_rows == plan.total_rows  # rows in = rows out
    return t


def _x(t: pa.Table, i: int) -> np.ndarray:
    from xai_workers.schema import tensor_to_numpy

    return tensor_to_numpy(t["x"])[i]


def test_hf_parquet_bytes_paths_nulls_and_class_names(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)  # datasets resolves the relative paths it writes from here
    (tmp_path / "side.png").write_bytes(_png(1))
    (tmp_path / "gone.png").write_bytes(_png(2))
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])}
    )
    rows = {
        "image": [Image.open(io.BytesIO(_png(0))), {"path": "side.png", "bytes": None},
                  {"path": "gone.png", "bytes": None}, None],
        "label": [0, 1, 2, 1],
    }  # fmt: skip
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(path))
    os.remove(tmp_path / "gone.png")  # a path that no longer reads: an error row

    plan = sources.discover(str(path))
    assert plan.kind == "parquet" and plan.image_kind == "struct"
    assert plan.id_column is None and plan.class_names == ("cat", "dog", "eel")
    t = _read_all(plan)
    assert t["id"].to_pylist() == [f"train.parquet#{i}" for i in range(4)]
    assert t["label"].to_pylist() == [0, 1, 2, 1]
    err = t["error"].to_pylist()
    assert err[0] is None and err[1] is None
    assert "gone.png" in err[2] and "FileNotFoundError" in err[2]
    assert err[3] == "image is null"
    # the path row is the file next to the Parquet, decoded as it would be from its bytes
    np.testing.assert_array_equal(_x(t, 1), preprocess_bytes(_png(1), PRE).numpy())

    with pytest.raises(ConfigError, match="no column"):
        sources.discover(str(path), id_column="key")  # a configured id column stays required


def test_parquet_of_references_reads_what_each_row_names(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(10 + i))
    refs = ["imgs/0.png", str(tmp_path / "imgs" / "1.png"), "imgs/missing.png", "imgs/2.png"]
    pq.write_table(pa.table({"image": refs}), tmp_path / "refs.parquet")
    plan = sources.discover(str(tmp_path / "refs.parquet"))
    assert plan.image_kind == "string"
    t = _read_all(plan)
    err = t["error"].to_pylist()
    assert err[0] is None and err[1] is None and err[3] is None
    assert "imgs/missing.png" in err[2]
    np.testing.assert_array_equal(_x(t, 3), preprocess_bytes(_png(12), PRE).numpy())
    assert t["id"].to_pylist()[2] == "refs.parquet#2"


def test_class_folders_give_sorted_indices_and_names(tmp_path):
    root = tmp_path / "val"
    for cls, seeds in (("n02", [0, 1]), ("n01", [2])):
        (root / cls).mkdir(parents=True)
        for s in seeds:
            (root / cls / f"{s}.png").write_bytes(_png(s))
    (root / "n02" / "bad.png").write_bytes(b"not an image")
    plan = sources.discover(str(root))
    assert plan.class_names == ("n01", "n02") and plan.label_type == pa.int64()
    t = _read_all(plan).sort_by("id")
    assert t["id"].to_pylist() == ["n01/2.png", "n02/0.png", "n02/1.png", "n02/bad.png"]
    assert t["label"].to_pylist() == [0, 1, 1, 1]
    assert t["error"].to_pylist()[:3] == [None] * 3 and "decode" in t["error"][3].as_py()

    none = sources.discover(str(root), labels_from="none")
    assert none.label_column is None and none.class_names is None
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(_png(0))
    assert sources.discover(str(tmp_path / "flat")).label_column is None  # auto: no folders
    with pytest.raises(ConfigError, match="one folder below"):
        sources.discover(str(tmp_path / "flat"), labels_from="folders")
    with pytest.raises(ConfigError, match="--target label needs labels"):
        sources.discover(str(tmp_path / "flat"), need_label=True)


class _Trap:
    """Unpickling this creates a file: the proof that a member was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_webdataset_samples_labels_bad_members_and_no_unpickling(tmp_path):
    import webdataset as wds

    trap = tmp_path / "unpickled"
    pattern = str(tmp_path / "shard-%04d.tar")
    samples = [
        {"__key__": "s000", "jpg": _png(0), "cls": b"3"},  # webdataset writes bytes as they are
        {"__key__": "s001", "png": _png(1), "json": {"label": 1}, "pth": pickle.dumps(_Trap(
            str(trap)))},
        {"__key__": "s002", "txt": "no image here"},
        {"__key__": "s003", "jpg": b"this is not a jpeg", "cls": b"0"},
        {"__key__": "s004", "png": _png(4), "cls": b"cat"},
    ]  # fmt: skip
    with wds.ShardWriter(pattern, maxcount=3) as sink:
        for s in samples:
            sink.write(s)
    plan = sources.discover(str(tmp_path), input_format="webdataset")
    assert plan.kind == "webdataset" and len(plan.sources) == 2 and plan.total_rows == 5
    assert plan.label_type == pa.int64()
    t = _read_all(plan)
    assert t["id"].to_pylist() == [f"s00{i}" for i in range(5)]
    assert t["source"].to_pylist() == ["shard-0000.tar"] * 3 + ["shard-0001.tar"] * 2
    assert t["source_row"].to_pylist() == [0, 1, 2, 0, 1]
    assert t["label"].to_pylist()[:2] == [3, 1]
    err = t["error"].to_pylist()
    assert err[0] is None and err[1] is None
    assert "s002 has no image member" in err[2] and "txt" in err[2]
    assert err[3].startswith("sample s003: cannot decode image")
    assert "s004" in err[4] and "not an integer" in err[4]
    np.testing.assert_array_equal(_x(t, 1), preprocess_bytes(_png(1), PRE).numpy())
    assert not trap.exists()  # the .pth member was never unpickled
