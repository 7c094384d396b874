"""Labels matched to the model's classes by name (issue 22, item 1).

A class-folder tree labels by sorted folder index; a Hugging Face model names its classes in
``id2label``. When both have names the job maps each folder to the model class of the same name
(case, ``_``, ``-`` and spaces ignored): ``correct`` and accuracy are then computed against the
right class. Oracle: the folder name of each row looked up in the model's ``id2label``.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xai_audit.config import ConfigError, JobConfig
from xai_audit.sources.labels import apply_label_map, label_map_for, match_names, normalize

MODEL_NAMES = {0: "cat", 1: "dog", 2: "golden retriever"}


def test_normalize_and_match():
    assert normalize("  Golden_Retriever ") == normalize("golden-retriever") == "golden retriever"
    # folders sort as Golden_Retriever, cat, dog; the model has cat, dog, golden retriever
    mapping, unknown, ambiguous = match_names(
        ["Golden_Retriever", "cat", "dog"], list(MODEL_NAMES.values())
    )
    assert (mapping, unknown, ambiguous) == ([2, 0, 1], [], [])
    # synonyms of a Hugging Face ImageNet name; a name two classes share is ambiguous
    mapping, unknown, ambiguous = match_names(
        ["tench", "crane", "zebra"], ["tench, Tinca tinca", "crane", "crane"]
    )
    assert mapping == [0, -1, -1] and unknown == ["zebra"]
    assert ambiguous == [("crane", ["crane", "crane"])]
    # the same names in the same order: labels are model indices already
    assert label_map_for(["a", "b"], ["A", "B", "c"]) is None
    assert label_map_for(None, ["a"]) is None and label_map_for(["a"], None) is None
    with pytest.raises(ConfigError, match=r"'zebra'.*model's classes: 'cat', 'dog'"):
        label_map_for(["cat", "zebra"], list(MODEL_NAMES.values()))


def test_apply_label_map_relabels_and_marks_unknown_rows():
    import pyarrow as pa

    block = pa.table({"id": ["a", "b", "c", "d"], "label": pa.array([0, 1, 2, None], pa.int64()),
                      "error": pa.array([None, None, None, None], pa.string())})  # fmt: skip
    got = apply_label_map(block, [2, -1, 0], ["x", "zebra", "y"])
    assert got["label"].to_pylist() == [2, None, 0, None]
    assert got["error"].to_pylist()[1] == "label 1 ('zebra') names no class of this model"
    assert got["error"].to_pylist()[0] is None and got["error"].to_pylist()[3] is None


def _hf_model(folder):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label=MODEL_NAMES,
        label2id={v: k for k, v in MODEL_NAMES.items()},
    )  # fmt: skip
    torch.manual_seed(0)
    path = folder / "hf-vit"
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return f"hf:{path}"


def _tree(root, folders, per=2):
    rng = np.random.default_rng(0)
    for name in folders:
        (root / name).mkdir(parents=True)
        for k in range(per):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(buf, "PNG")
            (root / name / f"{k}.png").write_bytes(buf.getvalue())


def test_unknown_folder_name_is_a_config_error(tmp_path):
    from xai_audit.attribute import prepare

    _tree(tmp_path / "in", ["cat", "dog", "zebra"], per=1)
    cfg = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                    model=_hf_model(tmp_path), methods=("saliency",))  # fmt: skip
    with pytest.raises(ConfigError) as e:
        prepare(cfg, log=lambda m: None)
    assert "'zebra'" in str(e.value) and "'golden retriever'" in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_folder_labels_by_name_through_the_job(ray_session, tmp_path):
    from xai_audit.attribute import run_job

    folders = ["Golden_Retriever", "cat", "dog", "zebra"]  # sorted: folder index != model index
    _tree(tmp_path / "in", folders)
    out = tmp_path / "out"
    res = run_job(
        JobConfig(input=str(tmp_path / "in"), output=str(out), model=_hf_model(tmp_path),
                  methods=("saliency",), batch_size=4, progress_interval_s=0.0,
                  unknown_labels="error-rows"),
        log=lambda m: None,
    )  # fmt: skip
    assert res.counts["rows_ok"] == 6 and res.counts["rows_error"] == 2, res.summary
    rows = pq.read_table(out / "attributions").to_pylist()
    by_name = {normalize(v): k for k, v in MODEL_NAMES.items()}
    for r in rows:
        folder = r["id"].split("/")[0]
        if folder == "zebra":
            assert r["status"] == "error" and "'zebra'" in r["error"] and r["label"] is None
            continue
        assert r["status"] == "ok"
        assert r["label"] == by_name[normalize(folder)], r["id"]
        assert r["correct"] == (r["pred_class"] == r["label"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["class_names"]["names"] == list(MODEL_NAMES.values())
    # Golden_Retriever, cat, dog, zebra -> golden retriever (2), cat (0), dog (1), none (-1)
    assert manifest["input"]["label_map"] == manifest["settings"]["label_map"] == [2, 0, 1, -1]


def test_report_card_names_the_label():
    """``pred dog (1) · label cat (0) ✗ wrong``: the label by name when the run knows names."""
    import re

    from xai_audit.report import page as P
    from xai_audit.report.scan import Gallery

    row = {"id": "cat/0.png", "pred_class": 1, "pred_name": "dog", "pred_prob": 0.5, "label": 0,
           "target": 1}  # fmt: skip
    g = Gallery("wrong", "t", "w", ("pred_prob",), lambda c: c)
    manifest = {"model": {"class_names": {"source": "model", "names": ["cat", "dog"]}}}
    card = P.card_data(P.Card("wrong", 1, 0.5, row, {"image": "i.png"}), [], g,
                       P.class_names(manifest))  # fmt: skip
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", P._macro("card", card)))
    assert "pred dog (1)" in text and "label cat (0)" in text and "✗ wrong" in text
    unnamed = P.card_data(P.Card("wrong", 1, 0.5, row, {"image": "i.png"}), [], g)
    assert unnamed["label"]["value"] == "0"  # no names recorded: the index alone
