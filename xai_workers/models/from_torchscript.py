"""``torchscript:<uri>``: a ``torch.jit.save`` archive, local or ``s3://`` (holds its own weights).

TorchScript modules cannot be hooked, so layer methods (Grad-CAM, CAM) are not available for them.
"""

from __future__ import annotations

import hashlib
import io

import torch

from xai_workers.models.base import ModelSpecError, Source, read_uri


def load(uri: str, weights: str | None, *, seed: int, s3_endpoint: str | None) -> Source:
    if not uri:
        raise ModelSpecError("torchscript: needs a path or URI, e.g. torchscript:s3://b/model.pt")
    if weights is not None:
        raise ModelSpecError(
            "weights cannot be given with torchscript:<uri>: the TorchScript archive holds its "
            "own weights"
        )
    data = read_uri(uri, s3_endpoint, "TorchScript file")
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:
        raise ModelSpecError(
            f"{uri!r} is not a TorchScript archive (made by torch.jit.save): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from None
    return Source(module, hashlib.sha256(data).hexdigest())
