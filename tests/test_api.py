"""The package's API: every lazily exported name is one function on every access, whatever was
imported before it (importing the submodule ``xai_workers.visualize`` once rebound the package
attribute to the module: ``xw.visualize(...)`` worked once, then was 'module' not callable).

Each order runs in a fresh interpreter: import order is process state."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent(
    """
    import json, sys, types
    ORDER = sys.argv[1]
    if ORDER == "submodules_first":
        import xai_workers.visualize, xai_workers.models, xai_workers.demo
        import xai_workers as xw
    elif ORDER == "package_first":
        import xai_workers as xw
        first = (xw.visualize, xw.load_model)  # resolved before the submodules are imported
        import xai_workers.visualize, xai_workers.models
        assert first[0] is xw.visualize and first[1] is xw.load_model
    else:  # from-imports, then the submodule
        from xai_workers import load_model, visualize
        from xai_workers.visualize import Objective
        import xai_workers.visualize
        import xai_workers as xw
        assert visualize is xw.visualize and load_model is xw.load_model
    import torch
    from xai_workers.demo import build_demo_model

    out = {"dir": [n for n in ("load_model", "visualize", "attribute") if n in dir(xw)]}
    vis_mod = sys.modules["xai_workers.visualize"]
    out["module_kept"] = isinstance(vis_mod, types.ModuleType) and callable(vis_mod.visualize)
    for name in ("visualize", "load_model", "attribute", "make_baseline", "prepare_model",
                 "keep_freed_memory"):
        a, b = getattr(xw, name), getattr(xw, name)
        out[name] = [type(a).__name__, a is b]
    out["same_as_defined"] = (xw.visualize is vis_mod.visualize
                              and xw.load_model is sys.modules["xai_workers.models"].load_model)
    # each called twice
    model = build_demo_model()
    for _ in range(2):
        r = xw.visualize(model, ["class:0"], steps=2, size=16, transforms="none")
        assert r["images"].shape == (1, 3, 16, 16)
        loaded = xw.load_model("xai_workers.demo:build_demo_model")
        assert isinstance(loaded.module, torch.nn.Module)
    out["called_twice"] = True
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("order", ["submodules_first", "package_first", "from_imports"])
def test_lazy_exports_are_the_same_function_after_any_import_order(order):
    r = subprocess.run(
        [sys.executable, "-c", CHECK, order], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["dir"] == ["load_model", "visualize", "attribute"]
    assert out["module_kept"] and out["same_as_defined"] and out["called_twice"]
    for name in ("visualize", "load_model", "attribute", "make_baseline", "prepare_model",
                 "keep_freed_memory"):  # fmt: skip
        assert out[name] == ["function", True], (name, out[name])


def test_unknown_attribute_is_an_attribute_error():
    import xai_workers

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = xai_workers.nope
    assert not hasattr(xai_workers, "nope")
