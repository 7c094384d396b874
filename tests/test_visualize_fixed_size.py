"""``xai-audit visualize`` on models with a fixed input side, class-mean priors from every input
form ``run`` takes, and ``--overwrite`` that deletes only after validation (issue 22, items 3, 4).

Models: timm's tiny ``test_vit`` (160 px) and a tiny Hugging Face ViT (32 px), seeded random
weights saved to disk, as in tests/test_model_sources.py: nothing is downloaded.
"""

from __future__ import annotations

import importlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xai_audit import cli
from xai_audit import visualize as J

# the module itself: the package attribute xai_workers.visualize is the function
V = importlib.import_module("xai_workers.visualize")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _timm_vit(folder):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    path = folder / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return "timm:test_vit", str(path)


def _hf_vit(folder):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    names = {0: "cat", 1: "dog", 2: "bird"}
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label=names,
        label2id={v: k for k, v in names.items()},
    )  # fmt: skip
    torch.manual_seed(0)
    path = folder / "hf-vit"
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return f"hf:{path}", None


def test_geometry_resizes_to_the_models_side():
    """With ``out_side`` every image ends at that side, and the map is the chain's map followed
    by a resize: the source point of output pixel u is the chain's source point of
    u * side / out_side (checked against the chain without ``out_side``)."""
    tf = V.parse_transforms("lucid")
    draws = np.random.default_rng(0).random((5, V._draws_per_step(tf)))
    theta0, side0 = V._geometry(tf, draws, 64)
    theta1, side1 = V._geometry(tf, draws, 64, out_side=80)
    assert set(side0.tolist()) != {80} and (side1 == 80).all()
    # affine_grid with align_corners=False: normalized output coords are the same points of
    # the image whatever the side, so a pure resize leaves theta unchanged
    np.testing.assert_allclose(theta1, theta0, rtol=0, atol=1e-12)
    img = torch.rand(5, 3, 64, 64, dtype=torch.float64)
    a = V._resample(img, theta1, 80)
    b = torch.stack([
        torch.nn.functional.interpolate(V._resample(img[i : i + 1], theta0[i : i + 1],
                                                    int(side0[i])), size=(80, 80),
                                        mode="bilinear", align_corners=False)[0]
        for i in range(5)
    ])  # fmt: skip
    assert a.shape == (5, 3, 80, 80)
    # one resampling vs two: the same image up to the second interpolation's smoothing
    assert (a - b).abs().mean() < 0.05


@pytest.mark.parametrize("source", ["timm", "hf"])
def test_visualize_vit_with_lucid_transforms(tmp_path, source, capsys):
    spec, weights = (_timm_vit if source == "timm" else _hf_vit)(tmp_path)
    argv = ["visualize", "--model", spec, "--objectives", "class:0-1", "--steps", "2",
            "--size", "48", "--output", str(tmp_path / "o")]  # fmt: skip
    if weights:
        argv += ["--weights", weights]
    cfg = J.config_from_args(cli.build_parser().parse_args(argv))
    res = J.run_visualize(cfg, log=lambda m: None, in_process=True, num_threads=1)
    t = pq.read_table(tmp_path / "o" / "visualizations" / "parts")
    assert res.exit_code == 0, (res.summary, t["error"].to_pylist())
    assert t["status"].to_pylist() == ["ok", "ok"]
    assert res.manifest["settings"]["input_size"] == (160 if source == "timm" else 32)
    img = Image.open(io.BytesIO(t["image"][0].as_py()))
    assert img.size == (48, 48)  # the stored image keeps --size


def test_all_objectives_failing_exits_non_zero(tmp_path, monkeypatch):
    spec, weights = _hf_vit(tmp_path)
    argv = ["visualize", "--model", spec, "--objectives", "class:0-2", "--steps", "1",
            "--size", "32", "--output", str(tmp_path / "o")]  # fmt: skip
    cfg = J.config_from_args(cli.build_parser().parse_args(argv))

    def broken(*a, **k):
        raise RuntimeError("Input image size (231*231) doesn't match model (224*224)")

    monkeypatch.setattr(V, "visualize", broken)
    res = J.run_visualize(cfg, log=lambda m: None, in_process=True, num_threads=1)
    assert res.exit_code != 0
    assert "all 3 objectives failed" in res.summary and "231*231" in res.summary


def _rows(n_per=2):
    rng = np.random.default_rng(1)
    out = []
    for c in range(3):
        for k in range(n_per):
            a = np.full((40, 40, 3), 60 * c, np.uint8) + rng.integers(
                0, 30, (40, 40, 3), dtype=np.uint8
            )
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "PNG")
            out.append((c, k, buf.getvalue()))
    return out


def _inputs(tmp_path):
    """The same six images (two per class) as a class-folder tree, as Hugging Face Parquet
    (image structs, ClassLabel names, no id column) and as plain Parquet with an id column."""
    rows = _rows()
    names = ["cat", "dog", "bird"]
    tree = tmp_path / "tree"
    for c, k, data in rows:
        (tree / names[c]).mkdir(parents=True, exist_ok=True)
        (tree / names[c] / f"{k}.png").write_bytes(data)
    feats = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    hf = pa.table(
        {
            "image": pa.array(
                [{"bytes": d, "path": None} for _, _, d in rows],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "label": pa.array([c for c, _, _ in rows], pa.int64()),
        }
    ).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": feats}})})
    pq.write_table(hf, tmp_path / "hf.parquet")
    plain = pa.table(
        {
            "id": [f"r{i}" for i in range(len(rows))],
            "image": [d for _, _, d in rows],
            "label": [c for c, _, _ in rows],
        }
    )
    pq.write_table(plain, tmp_path / "plain.parquet")
    return {
        "tree": str(tree),
        "hf": str(tmp_path / "hf.parquet"),
        "plain": str(tmp_path / "plain.parquet"),
    }, rows


def test_class_mean_prior_from_every_input_form(tmp_path):
    """The priors are the per-class mean images whatever the form; the class folders are sorted
    bird, cat, dog (indices 0, 1, 2) but matched to the model's cat, dog, bird by name. Oracle:
    the plain Parquet, whose labels are the model's indices."""
    spec, _ = _hf_vit(tmp_path)
    inputs, _ = _inputs(tmp_path)
    got = {}
    for form, uri in inputs.items():
        cfg = J.VisualizeConfig(model=spec, objectives="prototype:0-2", output=str(tmp_path / form),
                                prior="class-mean", input=uri, size=32,
                                mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
        got[form] = J.prepare(cfg, log=lambda m: None).priors
    for form in ("tree", "hf"):
        for c in range(3):
            np.testing.assert_allclose(got[form][c], got["plain"][c], atol=1e-6, err_msg=form)
    assert not np.allclose(got["plain"][0], got["plain"][2])  # the classes differ


def test_overwrite_deletes_only_after_validation(tmp_path, capsys):
    spec, _ = _hf_vit(tmp_path)
    vis = tmp_path / "o" / "visualizations"
    (vis / "parts").mkdir(parents=True)
    (vis / "manifest.json").write_text("{}")
    (vis / "parts" / "keep.txt").write_text("earlier")
    argv = ["visualize", "--model", spec, "--objectives", "prototype:0", "--steps", "1",
            "--size", "32", "--output", str(tmp_path / "o"), "--overwrite", "--prior",
            "class-mean", "--input", str(tmp_path / "missing")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "not found" in capsys.readouterr().err
    assert (vis / "manifest.json").exists() and (vis / "parts" / "keep.txt").exists()


def test_class_mean_prior_with_a_folder_the_model_lacks(tmp_path):
    from xai_audit.config import ConfigError

    spec, _ = _hf_vit(tmp_path)
    inputs, rows = _inputs(tmp_path)
    zebra = tmp_path / "tree" / "zebra"
    zebra.mkdir()
    (zebra / "0.png").write_bytes(rows[0][2])
    cfg = J.VisualizeConfig(model=spec, objectives="prototype:0-2", output=str(tmp_path / "o"),
                            prior="class-mean", input=inputs["tree"], size=32,
                            mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    with pytest.raises(ConfigError, match=r"'zebra'.*'cat', 'dog', 'bird'"):
        J.prepare(cfg, log=lambda m: None)
    prep = J.prepare(J.VisualizeConfig(**{**cfg.__dict__, "unknown_labels": "error-rows"}),
                     log=lambda m: None)  # fmt: skip
    assert prep.prior_info["images_per_class"] == {0: 2, 1: 2, 2: 2}
    assert prep.prior_info["unreadable"] == 1  # the zebra image: left out
