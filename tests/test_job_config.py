"""Configuration mistakes fail fast, with one clear message, before Ray or any heavy work starts.

Also: the YAML job file (same keys as the flags, flags win), `--overwrite` removing only what
xai-audit wrote, and `xai-audit layers`.
"""

from __future__ import annotations

import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import xai_audit.attribute as job
from xai_audit import ray_session
from xai_audit.cli import main
from xai_audit.config import ConfigError, JobConfig
from xai_workers.demo import write_demo_dataset

SPEC = "xai_workers.demo:build_demo_model"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any test here that reaches Ray has failed to fail fast."""

    def boom(cfg):
        raise AssertionError("Ray was started for a configuration that should have failed")

    monkeypatch.setattr(ray_session, "connect", boom)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "d.parquet"
    write_demo_dataset(str(path), n=6)
    return str(path)


def _argv(dataset, output, *extra):
    return ["run", "--input", dataset, "--output", str(output), "--model", SPEC,
            "--image-size", "32", *extra]  # fmt: skip


def _fails(capsys, argv, *needles, seconds=20.0):
    t0 = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - t0 < seconds
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("xai-audit: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_input(capsys, tmp_path):
    _fails(capsys, _argv(str(tmp_path / "nope.parquet"), tmp_path / "o"), "input not found")
    (tmp_path / "empty").mkdir()
    _fails(capsys, _argv(str(tmp_path / "empty"), tmp_path / "o"), "no Parquet files")


def test_unknown_model_and_bad_weights(capsys, dataset, tmp_path):
    argv = _argv(dataset, tmp_path / "o")
    argv[argv.index(SPEC)] = "no_such_module_xyz:build"
    _fails(capsys, argv, "model:")
    argv[argv.index("no_such_module_xyz:build")] = "torchvision:not_an_arch"
    _fails(capsys, argv, "model:")
    _fails(capsys, _argv(dataset, tmp_path / "o", "--weights", str(tmp_path / "missing.pt")),
           "model:")  # fmt: skip


def test_wrong_layer_name(capsys, dataset, tmp_path):
    msg = _fails(capsys, _argv(dataset, tmp_path / "o", "--gradcam-layer", "features.block9"),
                 "no layer named 'features.block9'", "xai-audit layers")  # fmt: skip
    assert "features.block4" in msg  # the usable layers are listed
    _fails(capsys, _argv(dataset, tmp_path / "o", "--gradcam-layer", "fc"),
           "cannot use for Grad-CAM")  # fmt: skip


def test_one_pixel_layer_is_refused_and_a_cut_list_says_so(capsys, dataset, tmp_path):
    # issue 8 item 4: a 1x1 map gives a constant Grad-CAM; the demo has 17 usable layers, 12 shown
    _fails(capsys, _argv(dataset, tmp_path / "o", "--gradcam-layer", "pool"),
           "cannot use for Grad-CAM the layer 'pool'", "(1, 64, 1, 1)", "h, w > 1",
           "the last 12 of 17", "features.block4")  # fmt: skip


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_with_gradcam_names_the_methods_that_work(capsys, dataset, tmp_path):
    import torch

    from xai_workers.demo import build_demo_model

    path = tmp_path / "demo_ts.pt"
    torch.jit.save(torch.jit.script(build_demo_model().eval()), str(path))
    argv = _argv(dataset, tmp_path / "o", "--methods", "saliency,gradcam")
    argv[argv.index(SPEC)] = f"torchscript:{path}"
    _fails(capsys, argv, "cannot be hooked (TorchScript)", "gradcam", "--methods saliency")
    argv = _argv(dataset, tmp_path / "o2", "--methods", "cam")
    argv[argv.index(SPEC)] = f"torchscript:{path}"
    _fails(capsys, argv, "--methods saliency,integrated_gradients")


def test_preprocessing_flags_checked_before_heavy_work(capsys, dataset, tmp_path):
    _fails(capsys, _argv(dataset, tmp_path / "o", "--interpolation", "lanczos"),
           "--interpolation must be one of bilinear, bicubic, nearest")  # fmt: skip
    _fails(capsys, _argv(dataset, tmp_path / "o", "--crop-pct", "1.5"), "--crop-pct")
    _fails(capsys, _argv(dataset, tmp_path / "o", "--crop-pct", "0.9", "--resize-size", "40"),
           "not both")  # fmt: skip
    _fails(capsys, _argv(dataset, tmp_path / "o", "--resize-size", "16"),
           "resize_size must be an int >= image_size (32)")  # fmt: skip


def test_output_not_writable_or_inside_input(capsys, dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _fails(capsys, _argv(dataset, blocker / "out"), "not writable")
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    _fails(capsys, _argv(str(folder), folder / "out"), "inside the input")


def test_existing_output_needs_resume_or_overwrite(capsys, dataset, tmp_path):
    out = tmp_path / "o"
    (out / "attributions").mkdir(parents=True)
    (out / "attributions" / "part-abc.parquet").write_bytes(b"")
    (out / "manifest.json").write_text(json.dumps(
        {"status": "running", "counts": {"rows_written": 3, "rows_total": 6},
         "settings": {"ig_steps": 64}}))  # fmt: skip
    _fails(capsys, _argv(dataset, out), "already holds", "3 of 6 rows", "--resume", "--overwrite")
    _fails(capsys, _argv(dataset, out, "--resume"), "other settings", "ig_steps: 64 -> 32")
    _fails(capsys, _argv(dataset, out, "--resume", "--overwrite"), "exclude each other")


def test_flag_values_checked_on_their_face(capsys, dataset, tmp_path):
    o = tmp_path / "o"
    _fails(capsys, _argv(dataset, o, "--ig-method", "simpson"), "gausslegendre")
    _fails(capsys, _argv(dataset, o, "--target", "cats"), "topk:K")
    _fails(capsys, _argv(dataset, o, "--mean", "1,2"), "mean")
    _fails(capsys, _argv(dataset, o, "--methods", "saliency,lime"), "lime")
    _fails(capsys, _argv(dataset, o, "--ig-steps", "0"), "--ig-steps")
    _fails(capsys, _argv(dataset, o, "--target", "12"), "not a class of this model")
    _fails(capsys, _argv(dataset, o, "--target", "topk:11"), "topk:11")
    _fails(capsys, _argv(dataset, o, "--label-column", "species"), "species")
    _fails(capsys, _argv(dataset, o, "--id-column", "key"), "'key'")
    _fails(capsys, _argv(dataset, o, "--max-error-rate", "2"), "max-error-rate")
    _fails(capsys, _argv(dataset, o, "--store", "tiny"), "compact, full, stats")
    _fails(capsys, _argv(dataset, o, "--map-size", "0"), "--map-size")
    _fails(capsys, _argv(dataset, o, "--map-size", "1.5"), "map-size")
    with pytest.raises(SystemExit):
        main(["run", "--no-such-flag"])
    assert "unrecognized arguments" in capsys.readouterr().err
    nolabel = tmp_path / "nolabel.parquet"
    pq.write_table(pq.read_table(dataset).drop_columns(["label"]), nolabel)
    _fails(capsys, _argv(str(nolabel), o, "--target", "label"), "label column")
    strlabel = tmp_path / "strlabel.parquet"
    t = pq.read_table(dataset)
    t = t.set_column(2, "label", pa.array([str(v) for v in t["label"].to_pylist()]))
    pq.write_table(t, strlabel)
    _fails(capsys, _argv(str(strlabel), o, "--target", "label"), "integer labels")


def test_yaml_config_same_keys_flags_override(capsys, dataset, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({
        "input": dataset, "output": str(tmp_path / "o"), "model": SPEC, "image_size": 32,
        "ig-steps": 7, "methods": ["saliency", "gradcam"], "mean": "0.5,0.5,0.5",
    }))  # fmt: skip
    from xai_audit.cli import build_parser, config_from_args

    ns = build_parser().parse_args(["run", "--config", str(job_file), "--ig-steps", "3"])
    cfg = config_from_args(ns)
    assert cfg.ig_steps == 3 and cfg.methods == ("saliency", "gradcam")
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.image_size == 32
    prep = job.prepare(cfg, log=lambda m: None)  # everything checks out, nothing is run
    assert prep.cfg.gradcam_layer == "features" and prep.plan.total_rows == 6
    assert prep.rows_per_file == 64
    job_file.write_text(yaml.safe_dump({"input": dataset, "ig_stepz": 3}))
    _fails(capsys, ["run", "--config", str(job_file)], "unknown setting 'ig_stepz'")
    _fails(capsys, ["run", "--config", str(tmp_path / "none.yaml")], "config file not found")
    with pytest.raises(ConfigError, match="bad value for ig-steps"):
        JobConfig.from_mapping({"ig_steps": "many"})


def test_overwrite_removes_only_what_xai_audit_wrote(dataset, tmp_path):
    from xai_audit import output as out

    o = tmp_path / "o"
    (o / "attributions").mkdir(parents=True)
    (o / "attributions" / "part-1.parquet").write_bytes(b"")
    (o / "summary").mkdir()
    (o / "manifest.json").write_text("{}")
    (o / "notes.txt").write_text("mine")
    out.remove_owned(str(o))
    assert sorted(p.name for p in o.iterdir()) == ["notes.txt"]


def test_layers_command(capsys):
    assert main(["layers", "--model", SPEC, "--image-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "features.block4" in text and "(1, 64, 8, 8)" in text and "default" in text
    assert main(["layers", "--model", "torchvision:not_an_arch"]) == 2


def test_duplicate_ids_warned_counted_or_refused(capsys, tmp_path):
    """Two files of a Parquet input share ids: a warning names them and the count goes to the
    manifest (Prepared.duplicate_ids); --unique-ids makes it a configuration error."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_demo_dataset(str(folder / "a.parquet"), n=6)
    t = pq.read_table(folder / "a.parquet")
    ids = t["id"].to_pylist()
    dup = t.set_column(0, "id", pa.array(ids[:2] + ids[:2] + ids[:1] + ["fresh"]))
    pq.write_table(dup, folder / "b.parquet")  # b repeats ids of a: ids[0] 4x in all
    logs: list[str] = []
    cfg = JobConfig(input=str(folder), output=str(tmp_path / "o"), model=SPEC, image_size=32)
    prep = job.prepare(cfg, log=logs.append)
    assert prep.duplicate_ids == 5  # 12 rows, 7 distinct ids
    warning = [m for m in logs if m.startswith("warning:")]
    assert len(warning) == 1 and f"{ids[0]!r} (4x)" in warning[0] and "--unique-ids" in warning[0]
    _fails(capsys, _argv(str(folder), tmp_path / "o2", "--unique-ids"),
           "--unique-ids", "5 input rows repeat an id", f"{ids[0]!r} (4x)")  # fmt: skip
    one = job.prepare(
        JobConfig(
            input=str(folder / "a.parquet"),
            output=str(tmp_path / "o3"),
            model=SPEC,
            image_size=32,
            unique_ids=True,
        ),
        log=logs.append,
    )
    assert one.duplicate_ids == 0  # fmt: skip


def test_class_names_file_must_match_the_model(capsys, dataset, tmp_path):
    short = tmp_path / "names.txt"
    short.write_text("cat\ndog\n")
    _fails(capsys, _argv(dataset, tmp_path / "o", "--class-names", str(short)),
           str(short), "2 names", "10 classes")  # fmt: skip
    _fails(capsys, _argv(dataset, tmp_path / "o", "--class-names", str(tmp_path / "nope.txt")),
           "not found")  # fmt: skip
    good = tmp_path / "names.json"
    good.write_text(json.dumps({str(i): f"digit {i}" for i in range(10)}))
    cfg = JobConfig(input=dataset, output=str(tmp_path / "o"), model=SPEC, image_size=32,
                    class_names=str(good))  # fmt: skip
    prep = job.prepare(cfg, log=lambda m: None)
    assert prep.model_info["class_names"]["names"][3] == "digit 3"
    assert {"pred_name", "target_name"} <= set(prep.schema.names)


def test_overwrite_on_s3_removes_nested_prefixes(s3_server, s3_bucket):
    """On S3 a 'folder' is a key prefix: --overwrite removes every key under the owned prefixes,
    nested ones too (summary/partials/, report/img/), and keeps the user's own keys."""
    import boto3

    from xai_audit import output as out

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [
        "run/manifest.json", "run/attributions/part-1.parquet", "run/summary/summary.parquet",
        "run/summary/partials/part-1.parquet", "run/report/index.html",
        "run/report/img/r000-image.png", "run/notes/mine.txt",
    ]  # fmt: skip
    for k in keys:
        s3.put_object(Bucket=s3_bucket, Key=k, Body=b"x")
    from xai_workers.storage import configure

    configure(s3_server)  # the process's storage, as a job configures it
    out.remove_owned(f"s3://{s3_bucket}/run")
    left = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", []))
    assert left == ["run/notes/mine.txt"]


def test_more_class_folders_than_model_classes(capsys, tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    for c in range(11):  # the demo model has 10 classes
        (tmp_path / "in" / f"c{c:02d}").mkdir(parents=True)
        (tmp_path / "in" / f"c{c:02d}" / "a.png").write_bytes(buf.getvalue())
    _fails(capsys, _argv(str(tmp_path / "in"), tmp_path / "o"), "11 class folders", "10 classes")
    cfg = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "o"), model=SPEC,
                    image_size=32, labels_from="none")  # fmt: skip
    prep = job.prepare(cfg, log=print)
    assert prep.plan.label_column is None and prep.plan.total_rows == 11


def test_webdataset_keys_repeated_across_tars_are_counted(capsys, tmp_path):
    """Two tars written by separate writers both count from 000000: the keys (the ids) repeat
    across tars. The plan counts them while it reads the tars; the job warns, --unique-ids
    refuses."""
    import webdataset as wds
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 30)).save(png, format="PNG")
    for shard, n in (("a", 3), ("b", 2)):  # keys 000000.. in each: 000000, 000001 twice
        with wds.TarWriter(str(folder / f"{shard}.tar")) as sink:
            for i in range(n):
                sink.write({"__key__": f"{i:06d}", "png": png.getvalue(), "cls": b"1"})
    logs: list[str] = []
    cfg = JobConfig(input=str(folder), output=str(tmp_path / "o"), model=SPEC, image_size=32)
    prep = job.prepare(cfg, log=logs.append)
    assert prep.duplicate_ids == 2  # 5 samples, 3 distinct keys
    warning = [m for m in logs if m.startswith("warning:")]
    assert len(warning) == 1 and "WebDataset sample keys" in warning[0], logs
    assert "'000000' (2x)" in warning[0] and "'000001' (2x)" in warning[0]
    _fails(capsys, _argv(str(folder), tmp_path / "o2", "--unique-ids"),
           "--unique-ids", "2 input rows repeat an id")  # fmt: skip


def test_resume_onto_an_output_of_another_schema_version_is_refused(capsys, dataset, tmp_path):
    """Schema 1 stored float16 fixed_shape_tensor maps: new parts (float32 lists) beside them
    would make one output that no engine reads as one table."""
    out = tmp_path / "o"
    (out / "attributions").mkdir(parents=True)
    (out / "attributions" / "part-abc.parquet").write_bytes(b"")
    (out / "manifest.json").write_text(json.dumps(
        {"schema_version": "1", "status": "interrupted",
         "counts": {"rows_written": 3, "rows_total": 6}, "settings": {}}))  # fmt: skip
    for flag in ("--resume", "--incremental"):
        _fails(capsys, _argv(dataset, out, flag), f"cannot {flag}", "schema version 1",
               "float16", "--overwrite")  # fmt: skip
