"""xai-workers: dataset-wide saliency, Integrated Gradients and Grad-CAM.

The library is plain PyTorch (and pyarrow for output); it never imports Ray.

``load_model`` and ``visualize`` are imported on first use (their modules pull in model zoos
and the feature-visualization code). Each name is one function on every access, whatever was
imported before: importing the submodule ``xai_workers.visualize`` does not replace the
function ``xai_workers.visualize`` (the submodule stays in ``sys.modules`` and is what ``from
xai_workers.visualize import ...`` reads).
"""

import importlib
import sys
import types

from xai_workers.engine import attribute, keep_freed_memory, make_baseline, prepare_model

__all__ = [
    "attribute",
    "keep_freed_memory",
    "load_model",
    "make_baseline",
    "prepare_model",
    "visualize",
]

#: Lazily exported name -> the module that defines it.
_LAZY = {"load_model": "xai_workers.models", "visualize": "xai_workers.visualize"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later accesses find it without __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type: the import system binds a submodule to its parent's attribute
    of the same name; for a lazily exported name that would replace the function by the module
    (``xw.visualize(...)`` then fails with 'module object is not callable'), so it is skipped."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
