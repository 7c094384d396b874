"""What the report says, on small outputs made for each case (no Ray, no chromium): findings with
absolute thresholds, error rows listed, maps grouped by the class they explain, top-k and CAM on
the page, random weights in the headline, the black-baseline note."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from xai_audit import output as out
from xai_audit import report as R
from xai_audit.attribute import write_attributions
from xai_workers import demo
from xai_workers import schema as S
from xai_workers import summary as SM
from xai_workers.worker import AttributionWorker


def _summary(n: int, classes, border: float, errors: int = 0) -> pa.Table:
    """A summary of ``n`` ok rows (+ ``errors`` error rows) predicted (and explained) as
    ``classes`` in turn, every Grad-CAM map with border share ``border``."""
    status = np.array(["ok"] * n + ["error"] * errors)
    pred = np.array([classes[i % len(classes)] for i in range(n + errors)], np.int64)
    return (
        SM.Summary()
        .update(
            {
                "status": status,
                "pred_class": pred,
                "target": pred,
                "gradcam_border_frac": np.full(n + errors, border),
            }
        )  # fmt: skip
        .to_table()
    )


def test_one_class_with_most_of_its_mass_in_the_border_stands_out():
    """The case a user met: one predicted class, Grad-CAM border share 49.4%: there is no other
    class to compare with, but 49.4% in a band that is 36% of the image is a finding."""
    s = _summary(40, [7], 0.494)
    stand = R.standouts(s)
    assert [(d["class"], d["method"], d["absolute"]) for d in stand] == [(7, "gradcam", True)]
    box = R._findings(s, stand)
    assert "What stands out" in box and 'class="findings calm"' not in box
    assert "no other classes to compare with" in box and "49.4%" in box
    calm = _summary(40, [7], 0.30)  # below the band's own share: a map spread evenly gives 36%
    assert R.standouts(calm) == []
    assert 'class="findings calm"' in R._findings(calm, [])


def test_relative_rule_still_finds_a_class_among_others():
    s = SM.Summary().update({
        "status": np.array(["ok"] * 60), "pred_class": np.repeat([0, 1, 2], 20),
        "target": np.repeat([0, 1, 2], 20),
        "gradcam_border_frac": np.repeat([0.05, 0.06, 0.20], 20),
    }).to_table()  # fmt: skip
    stand = R.standouts(s)
    assert [(d["class"], d["absolute"]) for d in stand] == [(2, False)]
    assert stand[0]["ratio"] == pytest.approx(0.20 / 0.055)


def test_many_error_rows_are_a_finding():
    s = _summary(30, [1, 2, 3], 0.1, errors=11)  # 27% error rows
    box = R._findings(s, R.standouts(s))
    assert "What stands out" in box and "Error rows" in box and "26.8%" in box
    few = _summary(300, [1, 2, 3], 0.1, errors=1)  # 0.3%: said, not a finding
    box = R._findings(few, R.standouts(few))
    assert 'class="findings calm"' in box and "could not be explained" in box


def test_random_weights_and_black_baseline_are_said():
    s = SM.Summary().update({
        "status": np.array(["ok"] * 9), "pred_class": np.zeros(9, np.int64),
        "target": np.zeros(9, np.int64),
        "integrated_gradients_border_frac": np.zeros(9), "gradcam_border_frac": np.full(9, .2),
    }).to_table()  # fmt: skip
    manifest = {"config": {"weights": "random", "seed": 3, "ig_baseline": "black"}}
    box = R._findings(s, [], manifest)
    assert "Random weights" in box and "seed 3" in box and "What stands out" in box
    assert "IG is zero wherever the image itself is black" in box
    trained = {"config": {"weights": "w.pt", "ig_baseline": "gray"}}
    box = R._findings(s, [], trained)
    assert "Random weights" not in box and "black" not in box


def _worker_output(tmp_path, n=16, errors=(), **kw) -> str:
    """``n`` rows of the (untrained) demo net through the worker into ``tmp_path``'s layout."""
    rng = np.random.default_rng(0)
    w = AttributionWorker(
        demo.build_demo_model(), image_size=32, mean=demo.DEMO_MEAN, std=demo.DEMO_STD,
        ig_steps=2, num_threads=1, label_type=pa.int64(), pooled_columns=True, **kw,
    )  # fmt: skip
    x = (rng.random((n, 3, 32, 32)) * 2 - 1).astype(np.float32)
    err = [f"cannot decode image: row {i}" if i in errors else None for i in range(n)]
    batch = pa.table({
        "id": [f"i{i}" for i in range(n)], "label": pa.array(np.arange(n) % 3, pa.int64()),
        "x": S.tensor_array(x), "error": pa.array(err, pa.string()), "source": ["s"] * n,
        "source_row": np.arange(n),
    })  # fmt: skip
    # as the job writes: the part, and its summary partial from the full maps
    write_attributions(w(batch), dest=str(tmp_path / "attributions"), output=str(tmp_path))
    return str(tmp_path)


def test_label_targets_group_maps_by_the_class_they_explain(tmp_path):
    output = _worker_output(tmp_path, target="label")
    res = R.build_report(output, top=16, log=lambda m: None)
    s = SM.read_summary(output)
    target = s.filter(pa.compute.equal(s["group_by"], "target"))
    assert target["class"].to_pylist() == [0, 1, 2]  # the labels, not the predictions
    shown = sorted(int(f.rsplit("-", 1)[1][:-4]) for f in res.files if "class-gradcam-" in f)
    assert shown == [0, 1, 2]
    page = open(res.index, encoding="utf-8").read()
    differ = [r for c in res.galleries.values() for r in c if r["target"] != r["pred_class"]]
    assert differ and "maps explain <b>" in page


def test_topk_says_which_target_is_drawn_and_cam_has_its_place(tmp_path):
    output = _worker_output(tmp_path, target="topk:2",
                            methods=("saliency", "gradcam", "cam"))  # fmt: skip
    out.write_json(out.join(output, out.MANIFEST), {"config": {"target": "topk:2"}})
    res = R.build_report(output, top=2, log=lambda m: None)
    page = open(res.index, encoding="utf-8").read()
    assert "draws and groups the first (each image's top-1 class)" in page
    assert "(1st of 2 targets)" in page
    assert any("class-cam-" in f for f in res.files) and any("-cam-overlay" in f for f in res.files)
    assert "CAM" in page and "cam_border_frac" in set(res.galleries["border"][0])


def test_error_rows_are_listed_with_their_messages(tmp_path):
    output = _worker_output(tmp_path, n=11, errors=(2, 5, 9))
    res = R.build_report(output, top=2, log=lambda m: None)
    assert res.errors["total"] == 3
    assert res.errors["rows"] == [(f"i{i}", f"cannot decode image: row {i}") for i in (2, 5, 9)]
    page = open(res.index, encoding="utf-8").read()
    assert 'id="errors"' in page and "cannot decode image: row 9" in page and "i5" in page
    assert "What stands out" in page  # 27% error rows


def test_report_pictures_use_the_runs_own_preprocessing(tmp_path):
    """A model with its own resize and filter (timm, HF, torchvision weights): the report draws
    the image as the model saw it, from the manifest's preprocessing, not a plain centre crop."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from xai_workers.preprocess import Preprocessing, input_to_pixels, preprocess_bytes

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(buf, "PNG")
    data = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"id": ["a"], "image": [buf.getvalue()]}), data)
    own = {"image_size": 32, "resize_size": 40, "resize_mode": "shorter_side",
           "interpolation": "bicubic", "crop_anchor": "floor", "mean": [0.5] * 3,
           "std": [0.5] * 3}  # fmt: skip
    manifest = {"input": {"root": data, "kind": "parquet", "image_column": "image"},
                "model": {"preprocessing": own}}  # fmt: skip
    (pic,) = R.load_images(manifest, [{"source": "d.parquet", "source_row": 0}])
    pre = Preprocessing(image_size=32, resize_size=40, interpolation="bicubic",
                        crop_anchor="floor", mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    want = input_to_pixels(preprocess_bytes(buf.getvalue(), pre), pre).clamp(0, 1)
    np.testing.assert_allclose(pic, want.permute(1, 2, 0).numpy(), atol=1e-6)  # same pixels
    plain = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    other = input_to_pixels(preprocess_bytes(buf.getvalue(), plain), plain).clamp(0, 1)
    assert np.abs(pic - other.permute(1, 2, 0).numpy()).max() > 0.1  # the check can fail


def test_which_method_is_faithful_section_and_gallery(tmp_path):
    """With --faithfulness the page compares each method's mean deletion/insertion AUC with a
    random order's, per class, and ranks the least faithful maps (deletion AUC above random)."""
    output = _worker_output(tmp_path, faithfulness=("deletion", "insertion"),
                            faithfulness_steps=4)  # fmt: skip
    res = R.build_report(output, top=3, log=lambda m: None)
    page = open(res.index, encoding="utf-8").read()
    assert 'id="faithful"' in page and "Which method is faithful" in page
    s = SM.read_summary(output)
    all_row = s.filter(pa.compute.equal(s["group_by"], "all")).to_pylist()[0]
    for col in ("gradcam_deletion_auc_mean", "random_insertion_auc_mean"):
        assert f">{all_row[col]:.3f}<" in page, col  # the summary's own mean, shown
    rows = res.galleries["unfaithful"]
    methods = ("saliency", "integrated_gradients", "gradcam")
    gaps = [max(r[f"{m}_deletion_auc"] - r["random_deletion_auc"] for m in methods) for r in rows]
    assert len(rows) == 3 and gaps == sorted(gaps, reverse=True)  # largest gap first


def _labelled(pred, label) -> pa.Table:
    pred, label = np.asarray(pred, np.int64), np.asarray(label, np.int64)
    return SM.Summary().update({
        "status": np.array(["ok"] * len(pred)), "pred_class": pred, "target": pred,
        "label": label, "gradcam_border_frac": np.full(len(pred), 0.2),
    }).to_table()  # fmt: skip


def test_collapsed_predictions_and_never_predicted_classes_are_findings():
    """The case a user met (issue 22): one class predicted for 24 of 24 rows, three balanced
    label classes, accuracy 33%: the box said "Nothing stands out"."""
    s = _labelled(np.zeros(24), np.repeat([0, 1, 2], 8))
    manifest = {"model": {"class_names": {"names": ["cat", "dog", "bird"]}}}
    box = R._findings(s, R.standouts(s), manifest)
    assert 'class="findings calm"' not in box and "What stands out" in box
    assert "One class predicted" in box and "100.0%" in box and "cat (0)" in box
    assert "Never predicted" in box and "dog (1), bird (2)" in box
    # accuracy 33.3% equals the majority rate (33.3%): not "below the majority rate"
    assert "majority rate" not in box
    # the same predictions without labels: said, not a finding (a one-class input is fine)
    s = _summary(24, [0], 0.2)
    box = R._findings(s, R.standouts(s))
    assert 'class="findings calm"' in box and "no labels to compare with" in box
    # labels that are themselves one class: predicting it is no finding
    s = _labelled(np.zeros(24), np.zeros(24))
    assert 'class="findings calm"' in R._findings(s, R.standouts(s))


def test_accuracy_far_below_the_majority_rate_is_a_finding():
    # 20 rows, 15 labelled 0 and 5 labelled 1; every prediction wrong but two: 10% accuracy,
    # majority rate 75%; both classes are predicted, nothing collapsed
    label = np.array([0] * 15 + [1] * 5)
    pred = 1 - label
    pred[:2] = 0
    s = _labelled(pred, label)
    box = R._findings(s, R.standouts(s))
    assert "Accuracy below the majority rate" in box and "10.0%" in box and "75.0%" in box
    assert "Never predicted" not in box and "One class predicted" not in box
    # 70% against a 75% majority: within ACCURACY_BELOW_MAJORITY (10 points), not a finding
    pred = label.copy()
    pred[:6] = 1
    s = _labelled(pred, label)
    assert 'class="findings calm"' in R._findings(s, R.standouts(s))
