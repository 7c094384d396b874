"""xai_workers.models (and the storage helpers it reads through), local files and S3 via moto."""

from __future__ import annotations

import hashlib
import textwrap
import urllib.error
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from safetensors.torch import save as save_safetensors
from torch import nn

from xai_workers import storage
from xai_workers.models import (
    LoadedModel,
    ModelSpecError,
    describe_layers,
    load_model,
    load_state_dict_file,
    state_dict_sha256,
)
from xai_workers.preprocess import IMAGENET_MEAN, Preprocessing

S = 64  # small inputs keep the tests fast


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny forwards are fastest on one thread; on a busy 2-core box two threads spin for ages."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def resnet10():
    """resnet18 with a 10-class head, random weights, eval mode."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def resnet10_files(resnet10, tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    sd = resnet10.state_dict()
    torch.save(sd, d / "r18.pt")
    (d / "r18.safetensors").write_bytes(
        save_safetensors({k: v.contiguous() for k, v in sd.items()})
    )
    torch.save({"state_dict": sd, "epoch": 3, "best_acc": 0.5}, d / "r18_ckpt.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, d / "r18_ddp.pt")
    return d


def _x(n=2, s=S):
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))


def _same_outputs(loaded: LoadedModel, reference: nn.Module, s=S):
    x = _x(s=s)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), reference(x))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- torchvision + state_dict files --------------------------------------------------------------


@pytest.mark.parametrize("name", ["r18.pt", "r18.safetensors", "r18_ckpt.pth", "r18_ddp.pt"])
def test_torchvision_state_dict_sets_num_classes(resnet10, resnet10_files, name):
    loaded = load_model("torchvision:resnet18", str(resnet10_files / name), image_size=S)
    assert isinstance(loaded, LoadedModel)
    assert loaded.num_classes == 10
    assert loaded.module.fc.out_features == 10
    assert not loaded.module.training
    assert all(p.device.type == "cpu" and p.requires_grad for p in loaded.module.parameters())
    assert loaded.checksum == _sha256(resnet10_files / name)
    assert loaded.spec == "torchvision:resnet18"
    assert loaded.preprocessing == Preprocessing(image_size=S)
    _same_outputs(loaded, resnet10)


def test_safetensors_by_content_without_extension(resnet10, resnet10_files, tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes((resnet10_files / "r18.safetensors").read_bytes())
    sd, checksum = load_state_dict_file(str(p))
    assert checksum == _sha256(p) and sd["fc.weight"].shape == (10, 512)


def test_pickled_object_refused_without_running_it(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(10, 512), "payload": _Payload()}, p)
    _Payload.loaded = False
    with pytest.raises(ModelSpecError, match=r"refusing to load .*weights_only=True") as info:
        load_model("torchvision:resnet18", str(p))
    assert "Unsupported global: GLOBAL test_models._Payload" in str(info.value)
    assert _Payload.loaded is False


class _Payload:
    loaded = False

    def __setstate__(self, state):  # runs only if something unpickles it
        type(self).loaded = True


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(
        ModelSpecError, match="neither a PyTorch state_dict file .* nor safetensors"
    ):
        load_model("torchvision:resnet18", str(p))
    p = tmp_path / "broken.pt"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ModelSpecError, match="not a PyTorch state_dict file"):
        load_model("torchvision:resnet18", str(p))
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], p)
    with pytest.raises(ModelSpecError, match="expected a state_dict"):
        load_model("torchvision:resnet18", str(p))


def test_state_dict_mismatch_is_readable(resnet10, tmp_path):
    sd = dict(resnet10.state_dict())
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["layer4.1.bn2.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ModelSpecError) as info:
        load_model("torchvision:resnet18", str(tmp_path / "bad.pt"))
    msg = str(info.value)
    assert "1 missing keys (e.g. layer1.0.conv1.weight)" in msg
    assert "1 unexpected keys (e.g. extra.weight)" in msg
    assert "layer4.1.bn2.bias: file (3,) vs model (512,)" in msg


def test_checkpoint_for_another_architecture(resnet10_files):
    with pytest.raises(ModelSpecError, match=r"no classifier head 'classifier\.1\.weight'"):
        load_model("torchvision:mobilenet_v2", str(resnet10_files / "r18.pt"))


def test_unknown_arch():
    with pytest.raises(
        ModelSpecError, match=r"unknown torchvision architecture 'resnet181'.*resnet18"
    ):
        load_model("torchvision:resnet181")
    with pytest.raises(ModelSpecError, match="not an image classifier"):
        load_model("torchvision:fasterrcnn_resnet50_fpn")


@pytest.mark.parametrize("spec", ["", "   ", "resnet18", "s3://bucket/model.pt", "a b:c"])
def test_unparsable_spec(spec):
    with pytest.raises(ModelSpecError, match="torchvision:<arch>"):
        load_model(spec)


def test_missing_weights_file(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ModelSpecError, match=f"weights file not found: '{missing}'"):
        load_model("torchvision:resnet18", missing)


def test_random_init_and_layers_at_224():
    loaded = load_model("torchvision:resnet18", "random")
    assert loaded.num_classes == 1000
    assert loaded.preprocessing == Preprocessing()
    shapes = {layer.name: layer.output_shape for layer in loaded.layers}
    assert shapes["layer4"] == (1, 512, 7, 7)
    assert shapes["fc"] == (1, 1000)
    assert ("layer4", (1, 512, 7, 7)) in [(la.name, la.output_shape) for la in loaded.layers]
    assert loaded.checksum == state_dict_sha256(loaded.module)
    assert len(loaded.checksum) == 64

    text = describe_layers(loaded)
    lines = {line.split()[0]: line for line in text.splitlines()[2:] if line.strip()}
    assert "1000 classes" in text.splitlines()[0]
    assert "Sequential" in lines["layer4"] and "(1, 512, 7, 7)" in lines["layer4"]
    assert lines["layer4"].endswith("yes, 7x7 (default)")
    assert lines["layer3"].endswith("yes, 14x14")
    # issue 8 item 4: a 1x1 map is constant, so global pooling is no Grad-CAM layer
    assert "(1, 512, 1, 1)" in lines["avgpool"] and lines["avgpool"].endswith("no")
    assert lines["layer1.0.relu"].endswith("no (runs 2x)")
    assert lines["fc"].endswith("no")
    assert "usable for Grad-CAM" in text


def test_preprocessing_options():
    loaded = load_model(
        "torchvision:squeezenet1_1",
        "random",
        image_size=48,
        mean=[0.5, 0.5, 0.5],
        std=(0.2, 0.2, 0.2),
    )
    assert loaded.preprocessing == Preprocessing(48, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert loaded.num_classes == 1000
    with pytest.raises(ModelSpecError, match="3 values"):
        load_model("torchvision:resnet18", "random", mean=(0.5, 0.5))


def test_squeezenet_conv_head_classes(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.squeezenet1_1(num_classes=7).eval()
    torch.save(ref.state_dict(), tmp_path / "sq.pt")
    loaded = load_model("torchvision:squeezenet1_1", str(tmp_path / "sq.pt"), image_size=S)
    assert loaded.num_classes == 7
    _same_outputs(loaded, ref)


def test_torchvision_weights_name_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for name in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        with pytest.raises(ModelSpecError) as info:
            load_model("torchvision:resnet18", name)
        msg = str(info.value)
        assert "could not download torchvision weights ResNet18_Weights.IMAGENET1K_V1" in msg
        assert "offline?" in msg and "s3://" in msg
    with pytest.raises(ModelSpecError, match="weights names: DEFAULT, IMAGENET1K_V1"):
        load_model("torchvision:resnet18", "IMAGENET9K_V9")


def test_googlenet_state_dict_without_aux_heads(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.googlenet(num_classes=5, aux_logits=False, init_weights=False).eval()
    torch.save(ref.state_dict(), tmp_path / "g.pt")
    loaded = load_model("torchvision:googlenet", str(tmp_path / "g.pt"), image_size=S)
    assert loaded.num_classes == 5 and loaded.module.aux1 is None
    _same_outputs(loaded, ref)


# --- torchscript --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted_file(resnet10, tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / "r18_ts.pt"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated, still supported
        torch.jit.save(torch.jit.trace(resnet10, torch.zeros(1, 3, S, S)), str(path))
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_round_trip(resnet10, scripted_file):
    loaded = load_model(f"torchscript:{scripted_file}", image_size=S)
    assert loaded.num_classes == 10
    assert loaded.layers == ()
    assert loaded.checksum == _sha256(scripted_file)
    with torch.no_grad():
        x = _x()
        torch.testing.assert_close(loaded.module(x), resnet10(x))
    assert "Grad-CAM and CAM are not available" in describe_layers(loaded)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_errors(scripted_file, resnet10_files, tmp_path):
    with pytest.raises(ModelSpecError, match="holds its own weights"):
        load_model(f"torchscript:{scripted_file}", str(resnet10_files / "r18.pt"))
    with pytest.raises(ModelSpecError, match="not found"):
        load_model(f"torchscript:{tmp_path / 'missing.pt'}")
    with pytest.raises(ModelSpecError, match="not a TorchScript archive"):
        load_model(f"torchscript:{resnet10_files / 'r18.pt'}")


# --- <module>:<callable> -----------------------------------------------------------------------


@pytest.fixture
def tiny_package(tmp_path, monkeypatch):
    """An importable package ``tinypkg_<random>`` with a few builders; yields its name."""
    name = f"tinypkg_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / "src" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def build():
                torch.manual_seed(123)
                return nn.Sequential(
                    nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                    nn.Flatten(), nn.Linear(16, 3),
                ).train()

            class Factory:
                @staticmethod
                def make():
                    return build()

            def mixed():
                return nn.Sequential(
                    torch.jit.script(nn.Conv2d(3, 2, 3)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(2, 4),
                )

            def not_a_module():
                return 3

            def broken():
                raise RuntimeError("boom")

            NOT_CALLABLE = 5
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return name


def test_module_callable(tiny_package, tmp_path):
    loaded = load_model(f"{tiny_package}.nets:build", image_size=16)
    assert loaded.num_classes == 3
    assert not loaded.module.training
    assert [la.name for la in loaded.layers] == ["0", "1", "2", "3", "4"]
    assert loaded.layers[0].output_shape == (1, 4, 16, 16)
    assert load_model(f"{tiny_package}.nets:Factory.make", image_size=16).num_classes == 3

    # weights given: a state_dict loaded into what the callable returns
    import importlib

    other = importlib.import_module(f"{tiny_package}.nets").build()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    torch.save(other.state_dict(), tmp_path / "tiny.pt")
    loaded = load_model(f"{tiny_package}.nets:build", str(tmp_path / "tiny.pt"), image_size=16)
    _same_outputs(loaded, other.eval(), s=16)
    assert loaded.checksum == _sha256(tmp_path / "tiny.pt")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_module_with_torchscript_part_has_no_layers(tiny_package):
    loaded = load_model(f"{tiny_package}.nets:mixed", image_size=8)
    assert loaded.num_classes == 4 and loaded.layers == ()


@pytest.mark.parametrize(
    ("attr", "match"),
    [
        ("not_a_module", r"returned int, expected a torch.nn.Module"),
        ("broken", "raised RuntimeError: boom"),
        ("NOT_CALLABLE", "is not callable"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_module_callable_errors(tiny_package, attr, match):
    with pytest.raises(ModelSpecError, match=match):
        load_model(f"{tiny_package}.nets:{attr}")


def test_module_not_importable():
    with pytest.raises(ModelSpecError, match="cannot import module 'no_such_pkg_xyz.models'"):
        load_model("no_such_pkg_xyz.models:build")


# --- S3 (moto server) ----------------------------------------------------------------------------


def _upload(endpoint, bucket, key, data: bytes):
    import boto3

    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def test_weights_from_s3(resnet10, resnet10_files, s3_server, s3_bucket):
    for name in ("r18.safetensors", "r18.pt"):
        data = (resnet10_files / name).read_bytes()
        uri = _upload(s3_server, s3_bucket, f"models/{name}", data)
        loaded = load_model("torchvision:resnet18", uri, image_size=S, s3_endpoint=s3_server)
        assert loaded.num_classes == 10
        assert loaded.checksum == hashlib.sha256(data).hexdigest()
        _same_outputs(loaded, resnet10)
    with pytest.raises(ModelSpecError, match=f"weights file not found: 's3://{s3_bucket}/nope.pt'"):
        load_model("torchvision:resnet18", f"s3://{s3_bucket}/nope.pt", s3_endpoint=s3_server)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_from_s3_with_env_endpoint(
    resnet10, scripted_file, s3_server, s3_bucket, monkeypatch
):
    uri = _upload(s3_server, s3_bucket, "ts/model.pt", scripted_file.read_bytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # endpoint from the environment
    loaded = load_model(f"torchscript:{uri}", image_size=S)
    assert loaded.num_classes == 10
    with torch.no_grad():
        x = _x()
        torch.testing.assert_close(loaded.module(x), resnet10(x))


def test_storage_helpers_local_and_s3(tmp_path, s3_server, s3_bucket):
    # local: writing creates parent folders; file:// works
    out = tmp_path / "a" / "b" / "manifest.json"
    with storage.open_file(str(out), "w") as f:
        f.write('{"ok": true}')
    assert storage.read_bytes(f"file://{out}") == b'{"ok": true}'
    assert storage.join_uri(f"s3://{s3_bucket}/out/", "attributions", "/x.parquet") == (
        f"s3://{s3_bucket}/out/attributions/x.parquet"
    )

    # s3: write, read, list, pyarrow round trip
    uri = f"s3://{s3_bucket}/out/manifest.json"
    with storage.open_file(uri, "wb", s3_endpoint=s3_server) as f:
        f.write(b"hello")
    assert storage.read_bytes(uri, s3_endpoint=s3_server) == b"hello"
    fs, path = storage.filesystem(f"s3://{s3_bucket}/out", s3_endpoint=s3_server)
    assert path == f"{s3_bucket}/out"
    assert fs.ls(path, detail=False) == [f"{s3_bucket}/out/manifest.json"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{s3_bucket}/missing", s3_endpoint=s3_server)

    table = pa.table({"id": [1, 2], "image": [b"a", b"b"]})
    pafs, ppath = storage.pyarrow_filesystem(f"s3://{s3_bucket}/t.parquet", s3_server)
    pq.write_table(table, ppath, filesystem=pafs)
    assert pq.read_table(ppath, filesystem=pafs).equals(table)
    lfs, lpath = storage.pyarrow_filesystem(str(tmp_path / "t.parquet"))
    pq.write_table(table, lpath, filesystem=lfs)
    assert pq.read_table(lpath, filesystem=lfs).equals(table)


def test_imagenet_defaults_and_lazy_package_export():
    import xai_workers

    assert xai_workers.load_model is load_model
    assert Preprocessing().mean == IMAGENET_MEAN


def test_state_dict_sha256_is_deterministic(resnet10):
    a = state_dict_sha256(resnet10)
    b = state_dict_sha256(torchvision.models.resnet18(num_classes=10))
    assert a == state_dict_sha256(resnet10) and a != b


# --- weights: none is an error, "random" is seeded (issue 8 item 2) -----------------------------


def test_torchvision_without_weights_is_an_error_naming_the_choices():
    with pytest.raises(ModelSpecError) as info:
        load_model("torchvision:resnet18")
    msg = str(info.value)
    assert "needs weights" in msg and "state_dict" in msg and "'random'" in msg
    assert "IMAGENET1K_V1" in msg  # the torchvision weights names of this architecture


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = load_model("torchvision:squeezenet1_1", "random", image_size=S)
    b = load_model("torchvision:squeezenet1_1", "random", image_size=S)
    c = load_model("torchvision:squeezenet1_1", "random", image_size=S, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.checksum == b.checksum == state_dict_sha256(b.module)
    assert c.checksum != a.checksum
    # the checksum is of the actual tensors: equal checksums mean equal networks
    _same_outputs(a, b.module)


def test_cli_layers_without_weights_exits_2_and_random_is_reproducible(capsys):
    from xai_audit.cli import main

    assert main(["layers", "--model", "torchvision:squeezenet1_1"]) == 2
    assert "--weights" not in capsys.readouterr().out
    args = ["layers", "--model", "torchvision:squeezenet1_1", "--weights", "random"]
    assert main([*args, "--image-size", str(S)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert main([*args, "--image-size", str(S)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == first
    assert main([*args, "--image-size", str(S), "--seed", "7"]) == 0
    assert capsys.readouterr().out.splitlines()[0] != first
