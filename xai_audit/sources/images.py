"""Folders of image files, flat or one folder per class (torchvision ``ImageFolder``).

The id of an image is its path relative to the input folder. With class folders
(``root/<class>/<image>``) the label is the index of the image's folder among the class folders
in sorted order (so ImageNet's validation set in synset folders gets torchvision's class
indices) and the class names are the folder names. ``--labels-from``: ``auto`` (the default:
folders when every image lies exactly one folder below the root), ``folders`` (required: a
configuration error otherwise) or ``none``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa

from xai_audit.errors import ConfigError
from xai_audit.sources.base import (
    SHARD_ROWS,
    Block,
    InputPlan,
    Source,
    decode,
    join,
    max_rows_for,
    read_uri,
)

LABELS_FROM = ("auto", "folders", "none")


def discover(uri, root, paths, *, labels_from, label_column, need_label) -> InputPlan:
    if label_column:
        raise ConfigError(f"--label-column {label_column!r}: an image folder has no columns")
    items = [join(uri, root, p) for p in paths]
    depth_one = all(rel.count("/") == 1 for _, rel in items)
    if labels_from == "folders" and not depth_one:
        deeper = next(rel for _, rel in items if rel.count("/") != 1)
        raise ConfigError(
            f"--labels-from folders needs every image exactly one folder below the input "
            f"(root/<class>/<image>); {deeper} is not"
        )
    use_folders = labels_from == "folders" or (labels_from == "auto" and depth_one)
    if need_label and not use_folders:
        raise ConfigError(
            "--target label needs labels; an image folder has them only as class folders "
            "(root/<class>/<image>, --labels-from folders)"
        )
    if not use_folders:
        sources = tuple(Source(u, rel, rows=1) for u, rel in items)
        return InputPlan("images", uri, sources, None, "image", None, pa.string(), None)
    classes = sorted({rel.split("/", 1)[0] for _, rel in items})
    index = {c: i for i, c in enumerate(classes)}
    sources = tuple(Source(u, rel, rows=1, label=index[rel.split("/", 1)[0]]) for u, rel in items)
    return InputPlan(
        "images", uri, sources, None, "image", "label", pa.string(), pa.int64(),
        class_names=tuple(classes),
    )  # fmt: skip


def make_shards(plan: InputPlan, done: Mapping[str, np.ndarray], shard_rows: int = SHARD_ROWS):
    """Groups of ``shard_rows`` files not yet done."""
    shards: list[dict] = []
    group: list[list] = []
    for i, s in enumerate(plan.sources):
        d = done.get(s.rel)
        if d is not None and d.all():
            continue
        group.append([i, s.uri, s.rel, s.label])
        if len(group) >= shard_rows:
            shards.append({"kind": "images", "items": group})
            group = []
    if group:
        shards.append({"kind": "images", "items": group})
    return shards, sum(len(s["items"]) for s in shards)


def read_shard(
    shard: Mapping, *, preprocessing, label_column, id_type, label_type,
    block_rows=None, **_,
) -> Iterator[pa.Table]:  # fmt: skip
    """Blocks of preprocessed rows of an image-files shard (``sources.read_shard``)."""
    max_rows = max_rows_for(preprocessing, block_rows)
    block = Block(preprocessing.image_size, id_type, label_type if label_column else None, max_rows)
    for item in shard["items"]:
        _, uri, rel = item[:3]
        label = item[3] if len(item) > 3 else None
        data, err = read_uri(uri)
        x = None
        if err is None:
            x, err = decode(data, preprocessing)
        block.add(rel, label, x, err, rel, 0)
        if block.full:
            yield block.table()
    if len(block):
        yield block.table()
