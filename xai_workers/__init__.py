"""xai-workers: dataset-wide saliency, Integrated Gradients and Grad-CAM.

The library is plain PyTorch (and pyarrow for output); it never imports Ray.
"""

from xai_workers.engine import attribute, keep_freed_memory, make_baseline, prepare_model

__all__ = [
    "attribute",
    "keep_freed_memory",
    "load_model",
    "make_baseline",
    "prepare_model",
    "visualize",
]


def __getattr__(name):
    if name == "load_model":
        from xai_workers.models import load_model

        return load_model
    if name == "visualize":
        from xai_workers.visualize import visualize

        return visualize
    raise AttributeError(name)
