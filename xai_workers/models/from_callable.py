"""``<module>:<callable>``: ``importlib.import_module(module)``, then ``callable()``.

The callable takes no arguments and returns an ``nn.Module``; it must be importable on every
worker. ``weights``, when given, is a state_dict loaded into it; ``random`` runs the callable with
torch's generator seeded by ``seed`` (the caller's RNG state is kept).
"""

from __future__ import annotations

import importlib

from torch import nn

from xai_workers.models.base import (
    RANDOM,
    ModelSpecError,
    Source,
    load_into,
    load_state_dict_file,
    seeded,
)


def load(spec: str, weights: str | None, *, seed: int, s3_endpoint: str | None) -> Source:
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
        module = seeded(obj, seed) if weights == RANDOM else obj()
    except Exception as e:
        raise ModelSpecError(f"{spec}() raised {type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
        raise ModelSpecError(
            f"{spec}() returned {type(module).__name__}, expected a torch.nn.Module"
        )
    checksum = None
    if weights is not None and weights != RANDOM:
        state_dict, checksum = load_state_dict_file(weights, s3_endpoint)
        load_into(module, state_dict, weights)
    return Source(module, checksum)
