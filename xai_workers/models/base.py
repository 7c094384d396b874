"""What every model source shares: the error type, what a source returns, weights files, seeds.

State dicts are read with ``torch.load(..., weights_only=True)`` or safetensors, never by
unpickling arbitrary objects.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from xai_workers import storage

# Checkpoint keys wrapping a state_dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
#: the ``weights`` value that asks for a seeded random initialisation on purpose
RANDOM = "random"


class ModelSpecError(ValueError):
    """A spec, weights file or weights name that cannot give a model; says why and what to do."""


@dataclass(frozen=True)
class Source:
    """What a model source adapter returns.

    - ``module``: the ``nn.Module`` (any mode, any device; ``load_model`` moves it to CPU, eval).
    - ``checksum``: sha256 hex of the weights file's bytes, or None (then ``load_model`` hashes the
      module's state_dict).
    - ``preprocessing``: the model's own evaluation transform as ``Preprocessing`` keyword
      arguments (``image_size``, ``resize_size``, ``resize_mode``, ``interpolation``,
      ``crop_anchor``, ``mean``, ``std``), or None when the model carries none.
    - ``preprocessing_from``: where that came from, for the manifest (e.g. ``timm pretrained_cfg``).
    - ``class_names``: one name per logit, or None when unknown.
    """

    module: nn.Module
    checksum: str | None = None
    preprocessing: dict | None = None
    preprocessing_from: str | None = None
    class_names: tuple[str, ...] | None = None


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with torch's CPU generator seeded by ``seed``; the caller's RNG state is kept.

    The same seed gives bit-identical parameters on every call (``torch.random.fork_rng`` saves
    and restores the global CPU generator around the build).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


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
    data = read_uri(uri, s3_endpoint, "weights file")
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


def read_uri(uri: str, s3_endpoint: str | None, what: str) -> bytes:
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


def strip_module_prefix(state_dict: dict, model_keys) -> dict:
    """Drop a ``module.`` prefix (saved from DataParallel/DDP) when every key has it."""
    model_keys = set(model_keys)
    if (
        state_dict
        and all(k.startswith("module.") for k in state_dict)
        and not model_keys & set(state_dict)
    ):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def load_into(module: nn.Module, state_dict: dict, uri: str) -> None:
    """``load_state_dict(strict=True)``, with a readable ModelSpecError on any mismatch."""
    own = module.state_dict()
    state_dict = strip_module_prefix(state_dict, own.keys())
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
