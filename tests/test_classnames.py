"""Class names: the file formats, torchvision's ImageNet list, and where names reach the output
(worker columns, summary ``name``, configuration errors)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from xai_workers import schema as S
from xai_workers.classnames import load_class_names, parse_class_names
from xai_workers.demo import DEMO_MEAN, DEMO_STD, build_demo_model
from xai_workers.summary import Summary
from xai_workers.worker import AttributionWorker

NAMES = [f"c{i}" for i in range(10)]


def test_file_formats_and_imagenet(tmp_path):
    assert parse_class_names("cat\ndog\n\n") == ("cat", "dog")
    assert parse_class_names('["cat", "dog"]') == ("cat", "dog")
    assert parse_class_names('{"1": "dog", "0": "cat"}') == ("cat", "dog")
    # Keras' imagenet_class_index.json form: index -> [wnid, name]
    assert parse_class_names('{"0": ["n01440764", "tench"]}') == ("tench",)
    for bad, why in (('{"0": "a", "2": "c"}', "0..1"), ('{"x": "a"}', "indices"),
                     ("[1.5]", "string"), ("[", "JSON"), ("", "no class names")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_class_names(bad, "f.txt")
    names = load_class_names("imagenet")
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    (tmp_path / "n.json").write_text(json.dumps(NAMES))
    assert load_class_names(str(tmp_path / "n.json")) == tuple(NAMES)
    with pytest.raises(ValueError, match="not found"):
        load_class_names(str(tmp_path / "missing.txt"))


def _batch(n, labels):
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(n, 3, 32, 32, generator=g) - 0.5) / 0.5).numpy()
    return pa.table({
        "id": [f"r{i}" for i in range(n)], "label": pa.array(labels, pa.int64()),
        "x": S.tensor_array(x), "error": pa.nulls(n, pa.string()), "source": ["s"] * n,
        "source_row": pa.array(np.arange(n), pa.int64()),
    })  # fmt: skip


@pytest.mark.parametrize("target", ["predicted", "topk:2"])
def test_name_columns_summary_name_and_labels_outside_the_model(target):
    torch.manual_seed(0)
    kw = dict(image_size=32, mean=DEMO_MEAN, std=DEMO_STD, ig_steps=2, num_threads=1,
              methods=("saliency",), label_type=pa.int64(), target=target)  # fmt: skip
    model = build_demo_model().eval()
    with pytest.raises(ValueError, match="3 class names for a model with 10 classes"):
        AttributionWorker(model, class_names=NAMES[:3], **kw)
    w = AttributionWorker(model, class_names=NAMES, **kw)
    t = w(_batch(4, [1, 12, None, 3]))
    assert t.schema.field("pred_name").type == S.NAME_TYPE
    assert t["status"].to_pylist() == ["ok", "error", "ok", "ok"]
    assert "label 12 is not a class index of this model" in t["error"][1].as_py()
    pred = t["pred_class"].to_pylist()
    assert t["pred_name"].to_pylist() == [None if p is None else NAMES[p] for p in pred]
    want_t = [None if v is None else ([NAMES[c] for c in v] if isinstance(v, list) else NAMES[v])
              for v in t["target"].to_pylist()]  # fmt: skip
    assert t["target_name"].to_pylist() == want_t
    summary = Summary().update(t).to_table(NAMES)
    rows = summary.select(["group_by", "class", "name"]).to_pylist()
    assert rows[0] == {"group_by": "all", "class": None, "name": None}
    for r in rows[1:]:  # label 12 (an error row's) is no class of the model: no name
        assert r["name"] == (NAMES[r["class"]] if r["class"] < 10 else None), r
    assert {"group_by": "label", "class": 12, "name": None} in rows
