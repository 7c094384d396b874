"""``xai-audit visualize``: through Ray with a tiny model, resume bit for bit, config errors."""

from __future__ import annotations

import importlib
import io
import json
import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xai_audit import cli
from xai_audit import visualize as J
from xai_workers import demo

# the module (the package's attribute xai_workers.visualize is the function)
V = importlib.import_module("xai_workers.visualize")

OBJECTIVES = "class:0-2;channel:features.block4:0-3;prototype:0,1"
N_OBJ = 9
WEIGHTS: list[str] = []


@pytest.fixture(autouse=True)
def _weights(weights):
    WEIGHTS[:] = [weights]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return demo.write_demo_dataset(str(tmp_path_factory.mktemp("vis") / "d.parquet"), n=60)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A seeded, untrained DemoNet's state_dict (every process loads the same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = demo.DemoNet().eval()
    path = str(tmp_path_factory.mktemp("w") / "net.pt")
    torch.save(net.state_dict(), path)
    return path


def args(out, dataset, *extra):
    return [
        "visualize", "--model", demo.DEMO_MODEL_SPEC, "--weights", WEIGHTS[0],
        "--objectives", OBJECTIVES,
        "--prior", "class-mean", "--input", dataset, "--steps", "4", "--size", "32",
        "--transforms", "jitter:1", "--batch-size", "4", "--image-size", "32",
        "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--output", str(out), *extra,
    ]  # fmt: skip


def cfg_of(argv):
    return J.config_from_args(cli.build_parser().parse_args(argv))


def read(out):
    t = pq.read_table(os.path.join(out, "visualizations", "parts"))
    return t.sort_by("source_row")


def test_through_ray(tmp_path, dataset):
    out = tmp_path / "out"
    assert cli.main(args(out, dataset, "--num-cpus", "2", "--address", "local")) == 0
    t = read(out)
    # every objective exactly once, in the order given, with its batch
    assert t.column("source_row").to_pylist() == list(range(N_OBJ))
    texts = [o.text for o in V.expand_objectives(OBJECTIVES)]
    assert t.column("objective").to_pylist() == texts
    assert t.column("batch").to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert set(t.column("status").to_pylist()) == {"ok"}
    assert t.column("kind").to_pylist()[3] == "channel" and t.column("layer")[3].as_py() == (
        "features.block4"
    )
    assert all(len(c) == 4 for c in t.column("loss_curve").to_pylist())
    manifest = json.loads((out / "visualizations" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows_ok"] == N_OBJ
    # each PNG file holds the same bytes as its row
    for row, text, img in zip(range(N_OBJ), texts, t.column("image").to_pylist(), strict=True):
        path = out / "visualizations" / "png" / J.png_name(row, text)
        assert path.read_bytes() == img
    # the same batches in this process (the library directly, as the worker calls it): the
    # activations agree with what the actor computed; float32 summation order may differ with
    # the actor's thread count, 4 Adam steps keep that at ~1e-6 relative (1e-4 catches a wrong
    # batch, seed, prior or setting, which changes the values by far more)
    cfg = cfg_of(args(out, dataset))
    prep_priors, _ = J.class_mean_priors(
        J.VisualizeConfig(**{**cfg.__dict__, "mean": (0.5,) * 3, "std": (0.5,) * 3}),
        [0, 1],
        lambda m: None,
    )
    net = demo.build_demo_model()
    net.load_state_dict(torch.load(WEIGHTS[0], weights_only=True))
    kw = dict(cfg.library_kwargs(), mean=(0.5,) * 3, std=(0.5,) * 3, prior=prep_priors)
    objs = V.expand_objectives(OBJECTIVES)
    acts = torch.cat([V.visualize(net, objs[i : i + 4], **kw)["activation"] for i in (0, 4, 8)])
    np.testing.assert_allclose(t.column("activation").to_numpy(), acts.numpy(), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    # the prior is the mean image of the class (pixels of the decoded dataset)
    images = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in
                       pq.read_table(dataset).column("image").to_pylist()])  # fmt: skip
    labels = pq.read_table(dataset).column("label").to_numpy()
    np.testing.assert_allclose(
        prep_priors[1], images[labels == 1].mean(0).transpose(2, 0, 1) / 255, atol=1e-6
    )  # fmt: skip  (float32 rounding of (x - m) / s and back)


def test_resume_reproduces_bit_for_bit(tmp_path, dataset):
    out = tmp_path / "out"
    first = J.run_visualize(cfg_of(args(out, dataset)), log=lambda m: None, in_process=True)
    assert first.exit_code == 0
    before = read(out)
    parts = sorted((out / "visualizations" / "parts").iterdir())
    assert len(parts) == 3  # one part per batch
    # lose the part of the middle batch and one PNG, as a crash would
    middle = [p for p in parts if 4 in pq.read_table(p).column("source_row").to_pylist()][0]
    middle.unlink()
    (out / "visualizations" / "png" / J.png_name(5, "channel:features.block4:2")).unlink()
    again = J.run_visualize(cfg_of(args(out, dataset, "--resume")), log=lambda m: None,
                            in_process=True)  # fmt: skip
    assert again.exit_code == 0
    assert again.manifest["counts"]["rows_computed_this_run"] == 4
    assert again.manifest["counts"]["rows_from_earlier_runs"] == 5
    after = read(out)
    assert after.num_rows == N_OBJ
    assert after.drop(["loss_curve"]).equals(before.drop(["loss_curve"]))
    assert after.column("loss_curve").to_pylist() == before.column("loss_curve").to_pylist()
    assert (out / "visualizations" / "png" / J.png_name(5, "channel:features.block4:2")).exists()
    # nothing left to do: a third run computes nothing
    third = J.run_visualize(cfg_of(args(out, dataset, "--resume")), log=lambda m: None,
                            in_process=True)  # fmt: skip
    assert third.manifest["counts"]["rows_computed_this_run"] == 0
    assert len(list((out / "visualizations" / "parts").iterdir())) == 3


@pytest.mark.parametrize(
    "change, message",
    [
        (["--objectives", "class:10"], "out of range"),
        (["--objectives", "channel:features.block4:64"], "out of range"),
        (["--objectives", "channel:nolayer:1"], "no .*layer"),
        (["--objectives", "class:1;class:1"], "twice"),
        (["--objectives", "wiggle:3"], "bad objective"),
        (["--transforms", "pad:x"], "transform"),
        (["--param", "wavelet"], "param"),
        (["--steps", "0"], "steps"),
    ],
)
def test_configuration_mistakes_exit_2(tmp_path, dataset, capsys, change, message):
    argv = args(tmp_path / "o", dataset)
    if change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
    else:
        argv += change
    assert cli.main(argv) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "o" / "visualizations" / "parts").exists()


def test_prototype_needs_a_prior_and_existing_output_needs_resume(tmp_path, dataset, capsys):
    argv = args(tmp_path / "o", dataset)
    i = argv.index("--prior")
    del argv[i : i + 2]
    assert cli.main(argv) == 2
    assert "--prior class-mean" in capsys.readouterr().err
    (tmp_path / "o" / "visualizations").mkdir(parents=True)
    (tmp_path / "o" / "visualizations" / "manifest.json").write_text("{}")
    assert cli.main(args(tmp_path / "o", dataset)) == 2
    assert "--resume" in capsys.readouterr().err


def test_report_section_shows_prototypes_first(tmp_path, dataset):
    from xai_audit.report.visualizations import visualization_section

    out = tmp_path / "out"
    J.run_visualize(cfg_of(args(out, dataset)), log=lambda m: None, in_process=True)
    t = read(out)
    files_out: dict = {}
    kw = dict(visualizations=None, class_maps={}, manifest=None, fs=None, files=[],
              label_is_int=True, log=lambda m: None)  # fmt: skip
    page = visualization_section(str(out), files_out=files_out, **kw)
    assert page.startswith('<h2 id="prototypes">What the model thinks each class looks like')
    # classes 0 and 1 have a prototype (preferred), class 2 only its class visualization
    assert "prototype:0" in page and "prototype:1" in page and "class:2" in page
    assert "class:0<" not in page and "class:1<" not in page
    assert sorted(files_out) == ["img/vis-0.png", "img/vis-1.png", "img/vis-2.png"]
    # the tile is the row's image, enlarged (uniform 3x3 blocks of its pixels at 96 px)
    row = t.filter(pc.equal(t["objective"], "prototype:1"))
    src = np.asarray(Image.open(io.BytesIO(row["image"][0].as_py())), dtype=np.float64)
    tile = np.asarray(Image.open(io.BytesIO(files_out["img/vis-1.png"])), dtype=np.float64)
    assert tile.shape == (96, 96, 3)
    # Lanczos resampling by 3x: block means equal the source up to ringing and 8-bit rounding
    blocks = tile.reshape(32, 3, 32, 3, 3).mean(axis=(1, 3))
    assert np.abs(blocks - src).mean() < 4, np.abs(blocks - src).mean()
    assert f"p = {row['activation'][0].as_py():.2f}" in page
    # the model's class names, when the run recorded them, name the classes (issue 22)
    named = {"model": {"class_names": {"source": "model", "names": ["cat", "dog", "bird"]}}}
    page = visualization_section(str(out), files_out={}, **{**kw, "manifest": named})
    assert "class cat (0)<" in page and "class bird (2)<" in page
    # an output without visualizations: no section, no files
    files_out.clear()
    assert visualization_section(str(tmp_path / "none"), files_out=files_out, **kw) == ""
    assert files_out == {}
