"""Class names: index -> name for a model's output classes, from a file or a known list.

``load_class_names(spec)`` reads ``spec``:

- ``imagenet``: torchvision's ImageNet-1k list (``ResNet50_Weights.IMAGENET1K_V2.meta
  ["categories"]``, shipped with torchvision: no download), 1000 names.
- a file (local or ``s3://``) holding a JSON list of names; a JSON object index -> name (keys
  ``"0"``.. ``"N-1"``, every index once; a value that is a list, as in Keras'
  ``imagenet_class_index.json`` ``{"0": ["n01440764", "tench"]}``, gives its last item); or else
  plain text, one name per line (blank lines at the end ignored, inner blank lines are names).

Raises ValueError naming the file for anything else.
"""

from __future__ import annotations

import json


def imagenet_names() -> tuple[str, ...]:
    """torchvision's ImageNet-1k class names, index order (1000)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def parse_class_names(text: str, where: str = "class names") -> tuple[str, ...]:
    """The names in ``text`` (a JSON list, a JSON object index -> name, or lines)."""
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except ValueError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from None
        if isinstance(data, list):
            names = [_name(v, where) for v in data]
        else:
            try:
                index = {int(k): v for k, v in data.items()}
            except ValueError:
                raise ValueError(f"{where}: JSON object keys must be class indices") from None
            if sorted(index) != list(range(len(index))):
                raise ValueError(
                    f"{where}: JSON object keys must be 0..{len(index) - 1}, once each"
                )
            names = [_name(index[i], where) for i in range(len(index))]
    else:
        names = text.rstrip("\r\n").splitlines()
        names = [n.strip() for n in names]
    if not names:
        raise ValueError(f"{where} holds no class names")
    return tuple(names)


def _name(v, where: str) -> str:
    if isinstance(v, list) and v:
        v = v[-1]
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise ValueError(f"{where}: a class name must be a string, got {v!r}")
    return str(v)


def load_class_names(spec: str, s3_endpoint: str | None = None) -> tuple[str, ...]:
    """Names from ``spec`` (module docstring): ``imagenet`` or a file path / URI."""
    if spec == "imagenet":
        return imagenet_names()
    from xai_workers.storage import read_bytes

    try:
        raw = read_bytes(spec, s3_endpoint)
    except FileNotFoundError:
        raise ValueError(f"class names file not found: {spec}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"class names file {spec} is not UTF-8 text") from None
    return parse_class_names(text, f"class names file {spec}")
