"""Load a model from a spec string: module (eval mode, CPU) + its preprocessing + named layers.

Specs (see "Command line" in docs/conventions.md):

- ``torchvision:<arch>``: a ``torchvision.models`` image classifier. ``weights`` is a state_dict
  file (``.pt``/``.pth``/``.safetensors``, local or ``s3://``; the number of classes follows the
  checkpoint's head), a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``,
  ``ResNet18_Weights.IMAGENET1K_V1``: needs the internet or torch.hub's cache), or None: random
  initialization (useful for tests, meaningless for explanations).
- ``torchscript:<uri>``: a ``torch.jit.save`` archive, local or ``s3://`` (holds its own weights).
- ``<module>:<callable>``: ``importlib.import_module(module)``, then ``callable()`` with no
  arguments must return an ``nn.Module``; ``weights``, when given, is a state_dict loaded into it.

State dicts are read with ``torch.load(..., weights_only=True)`` or safetensors, never by
unpickling arbitrary objects.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import io
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
from torch import nn

from xai_workers import storage
from xai_workers.hooks import LayerInfo, default_gradcam_layer, trace_layers
from xai_workers.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

_IMPORT_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_WEIGHTS_NAME = re.compile(r"([A-Za-z_]\w*\.)?[A-Z][A-Z0-9_]*")
_SPEC_FORMS = "'torchvision:<arch>', 'torchscript:<uri>' or '<module>:<callable>'"
# Checkpoint keys wrapping a state_dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# torchvision models with auxiliary heads: present in a checkpoint only if trained with them.
_AUX_HEADS = {"googlenet": "aux1.", "inception_v3": "AuxLogits."}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for attribution.

    - ``module``: the ``nn.Module`` in eval mode, on CPU; maps float32 (N, 3, S, S) inputs (input
      space, see ``preprocessing``) to logits (N, ``num_classes``).
    - ``preprocessing``: how images become its inputs (S = ``preprocessing.image_size``).
    - ``layers``: ``hooks.trace_layers`` on a (1, 3, S, S) zero input, in the order the modules
      finished (empty for TorchScript modules, which cannot be hooked).
    - ``num_classes``: width of the logits, from that same forward pass.
    - ``checksum``: sha256 hex of the weights file's bytes (state_dict, TorchScript archive or
      torch.hub's cached download), else of the module's state_dict tensors
      (see :func:`state_dict_sha256`).
    - ``spec``: the spec string it was loaded from.
    """

    module: nn.Module
    preprocessing: Preprocessing
    layers: tuple[LayerInfo, ...]
    num_classes: int
    checksum: str
    spec: str


class ModelSpecError(ValueError):
    """A spec, weights file or weights name that cannot give a model; says why and what to do."""


def load_model(
    spec: str,
    weights: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    s3_endpoint: str | None = None,
) -> LoadedModel:
    """Load the model described by ``spec`` (forms in the module docstring) and describe it.

    ``weights``: local path or ``s3://`` URI of a state_dict, a torchvision weights name (for
    ``torchvision:`` only), or None (torchvision: random init; ``<module>:<callable>``: whatever
    the callable returns). ``image_size`` (default 224), ``mean``/``std`` (default ImageNet's)
    set the preprocessing. ``s3_endpoint`` overrides ``$AWS_ENDPOINT_URL`` for S3 reads.

    The module is returned in eval mode on CPU; its parameters are otherwise as loaded
    (requires_grad untouched). Runs one forward pass on a (1, 3, S, S) zero input (logits width
    and layer trace). Raises :class:`ModelSpecError` with a readable message.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec; expected {_SPEC_FORMS}")
    spec = spec.strip()
    if weights is not None:
        weights = os.fspath(weights)
    try:
        preprocessing = Preprocessing(
            image_size=224 if image_size is None else image_size,
            mean=IMAGENET_MEAN if mean is None else tuple(mean),
            std=IMAGENET_STD if std is None else tuple(std),
        )
    except (TypeError, ValueError) as e:
        raise ModelSpecError(f"bad preprocessing settings: {e}") from None

    kind, _, rest = spec.partition(":")
    if kind == "torchvision":
        module, checksum = _load_torchvision(rest.strip(), weights, s3_endpoint)
    elif kind == "torchscript":
        module, checksum = _load_torchscript(rest.strip(), weights, s3_endpoint)
    elif _IMPORT_SPEC.fullmatch(spec):
        module, checksum = _load_callable(spec, weights, s3_endpoint)
    else:
        raise ModelSpecError(f"cannot parse model spec {spec!r}; expected {_SPEC_FORMS}")

    module = module.cpu().eval()
    s = preprocessing.image_size
    x = torch.zeros(1, 3, s, s)
    num_classes, layers = _probe(module, x)
    return LoadedModel(
        module=module,
        preprocessing=preprocessing,
        layers=layers,
        num_classes=num_classes,
        checksum=checksum or state_dict_sha256(module),
        spec=spec,
    )


def is_gradcam_layer(layer: LayerInfo) -> bool:
    """Whether Grad-CAM can explain at ``layer``: a (N, K, h, w) output and one call per forward."""
    return layer.output_shape is not None and len(layer.output_shape) == 4 and layer.calls == 1


def describe_layers(loaded: LoadedModel) -> str:
    """A plain-text table of the model's layers (for ``xai-audit layers``).

    One line per traced module: dotted name, type, output shape for a (1, 3, S, S) input, and
    whether it is a valid Grad-CAM layer (4-D output, runs once; the default one is marked).
    """
    s = loaded.preprocessing.image_size
    head = (
        f"model {loaded.spec}: input (1, 3, {s}, {s}), {loaded.num_classes} classes, "
        f"sha256 {loaded.checksum[:16]}"
    )
    if not loaded.layers:
        return (
            f"{head}\nno layers traced (TorchScript modules cannot be hooked), so Grad-CAM is not "
            "available for this model"
        )
    default = None
    try:
        default = default_gradcam_layer(loaded.module, torch.zeros(1, 3, s, s))
    except (ValueError, RuntimeError):
        pass

    rows = [("name", "type", "output shape", "grad-cam")]
    for layer in loaded.layers:
        shape = "-" if layer.output_shape is None else str(tuple(layer.output_shape))
        if is_gradcam_layer(layer):
            ok = "yes (default)" if layer.name == default else "yes"
        elif layer.output_shape is not None and len(layer.output_shape) == 4:
            ok = f"no (runs {layer.calls}x)"
        else:
            ok = "no"
        rows.append((layer.name, layer.type, shape, ok))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head, ""]
    for r in rows:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        )
    n_ok = sum(is_gradcam_layer(layer) for layer in loaded.layers)
    lines.append("")
    lines.append(f"{len(loaded.layers)} layers, {n_ok} usable for Grad-CAM (--gradcam-layer NAME)")
    return "\n".join(lines)


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 hex over the module's state_dict: each key, dtype, shape and raw tensor bytes."""
    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state_dict_file(
    uri: str | os.PathLike, s3_endpoint: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Read a state_dict from a local path or ``s3://`` URI; returns ``(state_dict, sha256 hex)``.

    Formats by content (extension as a fallback): PyTorch ``torch.save`` files (``.pt``/``.pth``),
    read with ``weights_only=True``, and safetensors. A checkpoint dict holding the state_dict
    under ``state_dict``/``model_state_dict``/``model`` is unwrapped. Tensors are on CPU.
    """
    uri = os.fspath(uri)
    data = _read(uri, s3_endpoint, "weights file")
    checksum = hashlib.sha256(data).hexdigest()
    if _looks_like_safetensors(data) or (
        not _looks_like_torch(data) and uri.lower().endswith(".safetensors")
    ):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data), checksum
        except Exception as e:
            raise ModelSpecError(f"{uri!r} is not a valid safetensors file: {e}") from None
    if not _looks_like_torch(data):
        raise ModelSpecError(
            f"{uri!r} is neither a PyTorch state_dict file (torch.save) nor safetensors "
            f"({len(data)} bytes starting with {data[:8]!r})"
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise ModelSpecError(f"{uri!r} is not a PyTorch state_dict file: {e}") from None
        detail = re.search(r"WeightsUnpickler error: (.*?\.)(\s|$)", str(e))
        raise ModelSpecError(
            f"refusing to load {uri!r}: it contains Python objects other than tensors and "
            "plain containers, and weights are only read with torch.load(weights_only=True) "
            "(unpickling arbitrary objects could run code). Save the weights with "
            "torch.save(model.state_dict(), path) or as .safetensors."
            + (f" ({detail.group(1)})" if detail else "")
        ) from None
    except Exception as e:
        raise ModelSpecError(
            f"{uri!r} is not a PyTorch state_dict file: {type(e).__name__}: {e}"
        ) from None
    return _unwrap_state_dict(obj, uri), checksum


# --- torchvision --------------------------------------------------------------------------------


def _load_torchvision(
    arch: str, weights: str | None, s3_endpoint: str | None
) -> tuple[nn.Module, str | None]:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if arch not in names:
        if arch in tvm.list_models():
            raise ModelSpecError(
                f"torchvision model {arch!r} is not an image classifier; only the classification "
                "models of torchvision.models are supported (e.g. resnet50, vit_b_16)"
            )
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelSpecError(
            f"unknown torchvision architecture {arch!r}; {hint}valid names include "
            f"{', '.join(names[:: max(1, len(names) // 8)][:8])} "
            f"({len(names)} in all: torchvision.models.list_models(module=torchvision.models))"
        )
    if weights is None:
        return tvm.get_model(arch, weights=None), None
    if _WEIGHTS_NAME.fullmatch(weights) and not os.path.exists(weights):
        return _load_torchvision_pretrained(arch, weights)

    state_dict, checksum = load_state_dict_file(weights, s3_endpoint)
    skeleton = _skeleton(tvm, arch)
    state_dict = _strip_module_prefix(state_dict, skeleton.state_dict().keys())
    head = _head_name(skeleton)
    key = f"{head}.weight"
    if key not in state_dict or state_dict[key].dim() < 2:
        some = ", ".join(list(state_dict)[-5:])
        raise ModelSpecError(
            f"weights {weights!r} have no classifier head {key!r} of torchvision {arch!r} "
            f"(last keys: {some}); are they for another architecture?"
        )
    kwargs = {"num_classes": int(state_dict[key].shape[0])}
    if arch in _AUX_HEADS:
        kwargs["aux_logits"] = any(k.startswith(_AUX_HEADS[arch]) for k in state_dict)
        kwargs["init_weights"] = False
    model = tvm.get_model(arch, weights=None, **kwargs)
    _load_into(model, state_dict, weights)
    return model, checksum


def _skeleton(tvm, arch: str) -> nn.Module:
    """The architecture with default settings, built on the meta device (no memory, no init)."""
    kwargs = {"init_weights": False} if arch in _AUX_HEADS else {}
    try:
        with torch.device("meta"):
            return tvm.get_model(arch, weights=None, **kwargs)
    except Exception:
        return tvm.get_model(arch, weights=None, **kwargs)


def _head_name(model: nn.Module) -> str:
    """Dotted name of the classifier head: the last ``nn.Linear``, else the last ``nn.Conv2d``."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    conv = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if conv:
        return conv[-1]
    raise ModelSpecError(f"cannot find a classifier head in {type(model).__name__}")


def _load_torchvision_pretrained(arch: str, name: str) -> tuple[nn.Module, str | None]:
    import torchvision.models as tvm

    enum = tvm.get_model_weights(arch)
    valid = ", ".join(["DEFAULT", *(w.name for w in enum)])
    try:
        w = enum[name.rsplit(".", 1)[-1]]
        if "." in name and name.split(".", 1)[0] != enum.__name__:
            raise KeyError(name)
    except KeyError:
        raise ModelSpecError(
            f"{name!r} is neither a file nor a weights name of torchvision {arch!r}; "
            f"weights names: {valid} (or give a state_dict file, local or s3://)"
        ) from None
    try:
        model = tvm.get_model(arch, weights=w)
    except Exception as e:
        raise ModelSpecError(
            f"could not download torchvision weights {enum.__name__}.{w.name} from {w.url} "
            f"(offline?): {type(e).__name__}: {e}. Download the file where there is internet "
            "and pass it as the weights instead (a local path or s3:// URI of the state_dict)."
        ) from None
    cached = os.path.join(
        torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(w.url).path)
    )
    checksum = None
    if os.path.isfile(cached):
        h = hashlib.sha256()
        with open(cached, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        checksum = h.hexdigest()
    return model, checksum


# --- torchscript and <module>:<callable> ---------------------------------------------------------


def _load_torchscript(
    uri: str, weights: str | None, s3_endpoint: str | None
) -> tuple[nn.Module, str]:
    if not uri:
        raise ModelSpecError("torchscript: needs a path or URI, e.g. torchscript:s3://b/model.pt")
    if weights is not None:
        raise ModelSpecError(
            "weights cannot be given with torchscript:<uri>: the TorchScript archive holds its "
            "own weights"
        )
    data = _read(uri, s3_endpoint, "TorchScript file")
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:
        raise ModelSpecError(
            f"{uri!r} is not a TorchScript archive (made by torch.jit.save): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from None
    return module, hashlib.sha256(data).hexdigest()


def _load_callable(
    spec: str, weights: str | None, s3_endpoint: str | None
) -> tuple[nn.Module, str | None]:
    module_name, attr = spec.split(":", 1)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(
            f"cannot import module {module_name!r} of model spec {spec!r}: {e} "
            "(it must be importable on every worker)"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelSpecError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ModelSpecError(f"{spec!r} is not callable ({type(obj).__name__})")
    try:
        module = obj()
    except Exception as e:
        raise ModelSpecError(f"{spec}() raised {type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
        raise ModelSpecError(
            f"{spec}() returned {type(module).__name__}, expected a torch.nn.Module"
        )
    checksum = None
    if weights is not None:
        state_dict, checksum = load_state_dict_file(weights, s3_endpoint)
        _load_into(module, state_dict, weights)
    return module, checksum


# --- helpers -----------------------------------------------------------------------------------


def _read(uri: str, s3_endpoint: str | None, what: str) -> bytes:
    try:
        return storage.read_bytes(uri, s3_endpoint)
    except FileNotFoundError:
        raise ModelSpecError(f"{what} not found: {uri!r}") from None
    except IsADirectoryError:
        raise ModelSpecError(f"{what} {uri!r} is a directory, expected a file") from None
    except Exception as e:
        raise ModelSpecError(f"cannot read {what} {uri!r}: {type(e).__name__}: {e}") from None


def _looks_like_torch(data: bytes) -> bool:
    # torch.save: a zip archive (PK\x03\x04), or a legacy pickle (protocol byte 0x80)
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def _looks_like_safetensors(data: bytes) -> bool:
    # safetensors: little-endian u64 header length, then a JSON object
    if len(data) < 10 or data[8:9] != b"{":
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8


def _unwrap_state_dict(obj, uri: str) -> dict[str, torch.Tensor]:
    def is_state_dict(v) -> bool:
        return (
            isinstance(v, Mapping)
            and len(v) > 0
            and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())
        )

    if is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if is_state_dict(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ModelSpecError(
            f"{uri!r} holds a dict that is not a state_dict (name -> tensor) and has none under "
            f"{', '.join(_WRAPPER_KEYS)}; its keys: {keys}"
        )
    raise ModelSpecError(
        f"{uri!r} holds a {type(obj).__name__}, expected a state_dict (dict of name -> tensor)"
    )


def _strip_module_prefix(state_dict: dict, model_keys) -> dict:
    """Drop a ``module.`` prefix (saved from DataParallel/DDP) when every key has it."""
    model_keys = set(model_keys)
    if (
        state_dict
        and all(k.startswith("module.") for k in state_dict)
        and not model_keys & set(state_dict)
    ):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _load_into(module: nn.Module, state_dict: dict, uri: str) -> None:
    """``load_state_dict(strict=True)``, with a readable ModelSpecError on any mismatch."""
    own = module.state_dict()
    state_dict = _strip_module_prefix(state_dict, own.keys())
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        raise ModelSpecError(
            f"weights {uri!r} do not fit {type(module).__name__}: {', '.join(parts)}"
        )
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ModelSpecError(f"weights {uri!r} do not fit {type(module).__name__}: {e}") from None


def _probe(module: nn.Module, x: torch.Tensor) -> tuple[int, tuple[LayerInfo, ...]]:
    """One forward pass on ``x``: the logits width and the traced layers.

    Modules that cannot be hooked (TorchScript, or holding TorchScript parts) give no layers.
    """
    out: dict = {}
    layers: tuple[LayerInfo, ...] = ()
    try:
        handle = module.register_forward_hook(lambda m, i, o: out.__setitem__("logits", o))
    except RuntimeError:  # "register_forward_hook is not supported on ScriptModules"
        handle = None
    try:
        if handle is not None:
            try:
                layers = tuple(trace_layers(module, x))
            except RuntimeError as e:
                if "ScriptModule" not in str(e):
                    raise
        if "logits" not in out:
            with torch.no_grad():
                out["logits"] = module(x)
    except Exception as e:
        raise ModelSpecError(
            f"model fails on a zero input of shape {tuple(x.shape)}: {type(e).__name__}: {e} "
            "(does it need another image size?)"
        ) from None
    finally:
        if handle is not None:
            handle.remove()
    logits = out["logits"]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelSpecError(
            f"model must return logits of shape (N, num_classes); for input {tuple(x.shape)} "
            f"it returned {got}"
        )
    return int(logits.shape[1]), layers
