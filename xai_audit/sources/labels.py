"""Labels by name: the input's class names (class folders, Hugging Face ``ClassLabel``) matched
to the model's.

An input's integer labels index the input's own class list (sorted folder names, the dataset's
``ClassLabel`` names), which is rarely the model's class order. When both the input and the model
name their classes, each input class is mapped to the model class of the same name, and the
labels the job compares with predictions are model indices. Never a silent index match.

Matching rule (:func:`normalize`): case-insensitive, with ``_``, ``-`` and runs of white space
read as one space, leading and trailing space ignored (``Golden_Retriever`` = ``golden
retriever``). A model name that lists synonyms separated by commas (Hugging Face ImageNet
models: ``tench, Tinca tinca``) also matches each synonym alone, when no model class has that
exact name. A name that matches two model classes is ambiguous, reported like an unknown name.

Names that match no model class: a :class:`~xai_audit.config.ConfigError` (the CLI exits 2)
naming them and some of the model's names; with ``unknown="error-rows"`` their rows become error
rows instead (``label_map`` holds -1 for them).
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from xai_audit.errors import ConfigError

#: ``--unknown-labels``: what a label name that the model does not have does.
UNKNOWN_LABELS = ("error", "error-rows")
#: The row error of a label whose name the model lacks (``--unknown-labels error-rows``).
#: Class name sources of the job (``_class_names``) that are the input's own names.
INPUT_SOURCES = ("folders", "huggingface")
UNKNOWN_ROW_ERROR = "label {label} ({name!r}) names no class of this model"


def normalize(name: str) -> str:
    """The form names are compared in: casefolded, ``_``/``-``/white space runs -> one space."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().casefold()


def match_names(
    input_names, model_names
) -> tuple[list[int], list[str], list[tuple[str, list[str]]]]:
    """Map each input class name to a model class index.

    Returns ``(label_map, unknown, ambiguous)``: ``label_map[i]`` is the model index of input
    class ``i`` or -1; ``unknown`` the input names that match no model class; ``ambiguous``
    (name, the model names it matches) for names that match several."""
    exact: dict[str, list[int]] = {}
    alias: dict[str, list[int]] = {}
    for j, n in enumerate(model_names):
        exact.setdefault(normalize(n), []).append(j)
        parts = [normalize(p) for p in str(n).split(",")]
        if len(parts) > 1:
            for p in dict.fromkeys(parts):
                if p:
                    alias.setdefault(p, []).append(j)
    label_map, unknown, ambiguous = [], [], []
    for name in input_names:
        key = normalize(name)
        hits = exact.get(key) or alias.get(key) or []
        if len(hits) == 1:
            label_map.append(hits[0])
            continue
        label_map.append(-1)
        if hits:
            ambiguous.append((str(name), [str(model_names[j]) for j in hits]))
        else:
            unknown.append(str(name))
    return label_map, unknown, ambiguous


def label_map_for(
    input_names, model_names, *, unknown: str = "error", where: str = "the input", log=None
) -> tuple[int, ...] | None:
    """The input-index -> model-index map for a job, or None when labels are already model
    indices (either side has no names, or the names agree index by index).

    ``unknown``: ``error`` (ConfigError naming the names that match no model class) or
    ``error-rows`` (their rows become error rows; ``log`` is told how many classes)."""
    if unknown not in UNKNOWN_LABELS:
        raise ConfigError(f"--unknown-labels must be one of {', '.join(UNKNOWN_LABELS)}")
    if not input_names or not model_names:
        return None
    mapping, missing, ambiguous = match_names(input_names, model_names)
    bad = missing + [n for n, _ in ambiguous]
    if bad and unknown == "error":
        shown = ", ".join(repr(n) for n in missing[:10]) + (" ..." if len(missing) > 10 else "")
        lines = []
        if missing:
            lines.append(f"{len(missing)} class name(s) of {where} match no class of the model: "
                         f"{shown}")  # fmt: skip
        for n, hits in ambiguous[:5]:
            lines.append(f"{n!r} matches several classes of the model: {hits}")
        names = ", ".join(repr(str(n)) for n in list(model_names)[:20])
        more = f" ... ({len(model_names)} in all)" if len(model_names) > 20 else ""
        raise ConfigError(
            "; ".join(lines) + f". The model's classes: {names}{more}. Labels are matched to "
            "the model's classes by name (case, '_', '-' and spaces ignored); rename the "
            "folders/classes, pass --class-names, or --unknown-labels error-rows to make their "
            "rows error rows"
        )
    if bad and log is not None:
        log(f"--unknown-labels error-rows: rows labelled {', '.join(map(repr, bad[:10]))} "
            "(no class of the model) become error rows")  # fmt: skip
    if mapping == list(range(len(mapping))):
        return None
    return tuple(mapping)


def labels_by_name(plan, classes: dict | None, *, unknown: str = "error", log=None):
    """``plan`` (an :class:`~xai_audit.sources.base.InputPlan`) with its ``label_map`` set when
    the input's class names (``plan.class_names``) and the model's (``classes``: the job's
    ``{"source", "names"}``, names from the model or ``--class-names``) are both known; the
    same plan otherwise. ConfigError for names the model lacks (``unknown="error"``)."""
    import dataclasses

    if not plan.class_names or not classes or classes.get("source") in INPUT_SOURCES:
        return plan
    where = "the class folders" if plan.kind == "images" else f"the input's {plan.kind} labels"
    mapping = label_map_for(plan.class_names, classes["names"], unknown=unknown, where=where,
                            log=log)  # fmt: skip
    return dataclasses.replace(plan, label_map=mapping)


def apply_label_map(block: pa.Table, label_map, names=None) -> pa.Table:
    """Relabel a worker batch (``label`` column: input class indices) to model indices; a row
    whose label has no model class (-1) gets ``x`` kept but ``error`` set, so the worker makes
    it an error row. Labels outside the input's classes are left as they are (the worker
    reports them). ``names``: the input's class names, for the error message."""
    if not label_map or "label" not in block.column_names:
        return block
    lut = np.asarray(label_map, dtype=np.int64)
    raw = block.column("label").to_pylist()
    errors = block.column("error").to_pylist()
    labels = []
    for i, v in enumerate(raw):
        if not isinstance(v, int) or not 0 <= v < len(lut):
            labels.append(v)
            continue
        m = int(lut[v])
        labels.append(None if m < 0 else m)
        if m < 0 and errors[i] is None:
            name = names[v] if names is not None and v < len(names) else f"class {v}"
            errors[i] = UNKNOWN_ROW_ERROR.format(label=v, name=name)
    i_label = block.column_names.index("label")
    i_err = block.column_names.index("error")
    block = block.set_column(i_label, "label", pa.array(labels, block.schema.field("label").type))
    return block.set_column(i_err, "error", pa.array(errors, pa.string()))
