"""The built-in demo: handwritten digits with a planted shortcut, and a small CNN trained on them.

Data: scikit-learn's bundled digits (``sklearn.datasets.load_digits``: 1797 grayscale 8x8 images,
classes 0-9, no download). Each digit is upscaled bilinearly into the centre of a ``size x size``
black RGB image, leaving a black frame of ``size // 8`` pixels. On every image of ``mark_class``
(default 3) a white ``mark_size`` square (default 10% of the side: 3x3 at 32x32) is drawn in one
corner of that frame (default top-left). The mark predicts the class perfectly, so a model can learn
to look at the corner instead of (or as well as) the digit: the audit should find it (Grad-CAM mass
in the border, centre of mass pulled to the corner for class 3). A second, subtler shortcut:
40% of class ``DEMO_WATERMARK_CLASS`` (7) are other digits stamped with a 4x4 white watermark
towards the bottom-right corner of the digit area (outside the border band) and labelled 7
(``demo_images``); the class mean and the border share hide it, the SpRAy strategies
(``xai-audit strategies``, the report's "Strategies") flag it.

Model: ``DemoNet``, four Conv-BN-ReLU blocks, global average pooling and one Linear layer (so CAM
applies); at 32x32 its last block ``features.block4`` outputs 8x8. Build it untrained with the model
spec ``xai_workers.demo:build_demo_model``; ``write_demo_model`` saves trained weights as a plain
state_dict (``torch.load(path, weights_only=True)``).

Preprocessing (docs/conventions.md "Input space"): the images are already ``DEMO_IMAGE_SIZE``
square, so no resize or crop; scale to [0, 1], normalise with ``DEMO_MEAN`` / ``DEMO_STD`` (0.5
per channel).

Held-out split: images whose load_digits index is a multiple of 5 (``is_held_out``) are never used
to train the model that ``write_demo_model`` / ``ensure_demo`` save; the dataset file has them all.
"""

from __future__ import annotations

import io
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEMO_IMAGE_SIZE = 32
DEMO_MEAN = (0.5, 0.5, 0.5)
DEMO_STD = (0.5, 0.5, 0.5)
DEMO_NUM_CLASSES = 10
DEMO_MARK_CLASS = 3
#: The class with a watermark on part of its images (a shortcut only SpRAy strategies reveal: the
#: class's mean map hides it), its side in pixels (bottom-right corner) and which images carry
#: it: those whose load_digits index ends in one of these digits (40%).
DEMO_WATERMARK_CLASS = 7
DEMO_WATERMARK_SIZE = 4
#: Pixels between the watermark and the frame (the frame is the outer size // 8 = 4 px): away
#: from the 10% border band, so that the border-share finding does not see it.
DEMO_WATERMARK_INSET = 4
DEMO_WATERMARK_LAST_DIGITS = (0, 3, 6, 9)
DEMO_MODEL_SPEC = "xai_workers.demo:build_demo_model"
#: The last conv block: an (N, 64, 8, 8) output at 32x32 input, the natural Grad-CAM layer.
DEMO_GRADCAM_LAYER = "features.block4"
#: Feature-visualization settings of the demo's class prototypes (``xai_workers.visualize``): at
#: 32 px Lucid's transforms (pad 12, ...) are as large as the digits, so a one-pixel jitter only
#: (a 31 px crop at offsets 0..1).
DEMO_VIS_TRANSFORMS = "jitter:1"
DEMO_VIS_STEPS = 192
DEMO_DATASET_FILE = "demo_digits_v3.parquet"  # v3: the class-7 watermark
DEMO_WEIGHTS_FILE = "demo_model_v3.pt"

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
NUM_DIGITS = 1797


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of ``train_demo_model`` (AdamW with a one-cycle learning rate).

    ``num_threads``: torch intra-op threads while training (restored afterwards; None leaves the
    setting alone). One thread by default: the net is tiny, a second thread saves little on an idle
    machine (about 4 s instead of 7 s here) and costs a lot on a busy one (16 s with one thread,
    94 s with two, measured on a 2-core machine shared with other jobs).
    """

    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    num_threads: int | None = 1


# ---- data ----------------------------------------------------------------------------------


def demo_indices(n: int | None = None, seed: int = 0) -> np.ndarray:
    """Which load_digits images the demo uses, int64 (N,), ascending.

    All 1797 when ``n`` is None, else ``n`` distinct indices drawn with ``seed``
    (``numpy.random.default_rng(seed)``).
    """
    if n is None:
        return np.arange(NUM_DIGITS, dtype=np.int64)
    if not 0 <= n <= NUM_DIGITS:
        raise ValueError(f"n must be in [0, {NUM_DIGITS}]; got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(NUM_DIGITS, size=n, replace=False)).astype(np.int64)


def is_held_out(indices: np.ndarray) -> np.ndarray:
    """Bool (N,): True for load_digits indices held out of demo training (multiples of 5)."""
    return np.asarray(indices) % 5 == 0


def mark_box(
    size: int, corner: str = "top_left", mark_size: int | None = None
) -> tuple[slice, slice]:
    """(rows, cols) slices of the planted mark in a ``size x size`` image.

    ``mark_size`` defaults to ``max(1, round(0.1 * size))`` (3 at 32), so the mark lies inside the
    10% border that ``stats.border_frac`` measures and inside the digit-free frame.
    """
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {', '.join(CORNERS)}; got {corner!r}")
    k = mark_size if mark_size is not None else max(1, int(0.1 * size + 0.5))
    rows = slice(0, k) if corner.startswith("top") else slice(size - k, size)
    cols = slice(0, k) if corner.endswith("left") else slice(size - k, size)
    return rows, cols


def demo_images(
    n: int | None = None,
    size: int = DEMO_IMAGE_SIZE,
    mark_class: int | None = DEMO_MARK_CLASS,
    seed: int = 0,
    corner: str = "top_left",
    mark_size: int | None = None,
    watermark_class: int | None = DEMO_WATERMARK_CLASS,
) -> tuple[np.ndarray, np.ndarray]:
    """The demo images and labels, deterministic.

    Returns ``images`` uint8 (N, size, size, 3) in [0, 255] (ink white on black, the three channels
    equal) and ``labels`` int64 (N,) in 0..9, for the load_digits indices ``demo_indices(n, seed)``.
    Every image of class ``mark_class`` carries a white (255) square at ``mark_box(size, corner,
    mark_size)``; no image of another class does. ``mark_class=None``: no mark anywhere.

    Watermark (``watermark_class``, default 7; None: none): the images of that class chosen by
    :func:`watermark_rows` (40%) show another class's digit instead (:func:`_watermark_donors`)
    with a white ``DEMO_WATERMARK_SIZE`` square (4x4) towards the bottom-right corner of the
    digit area, ``DEMO_WATERMARK_INSET`` (4) pixels inside the black frame (rows and columns
    ``size - size//8 - 8 .. size - size//8 - 4``: 20..23 at 32, well outside the 10% border band,
    so the border-share finding does not see it: class 7's Grad-CAM border share 0.19 against
    0.11 for the other classes, under the finding's 2x), and keep their label: a source of
    mislabelled images that stamps them, so the model can only get them right from the stamp.
    The class's other images are untouched, so its mean map barely shows the stamp; its SpRAy
    strategies do (a flagged strategy in the report).
    """
    from sklearn.datasets import load_digits

    if size < 16:
        raise ValueError(f"size must be at least 16; got {size}")
    digits = load_digits()
    idx = demo_indices(n, seed)
    raw = torch.from_numpy(digits.images[idx].astype(np.float32))[:, None]  # (N, 1, 8, 8), 0..16
    pad = size // 8
    inner = F.interpolate(raw, size=(size - 2 * pad,) * 2, mode="bilinear", align_corners=False)
    gray = np.zeros((len(idx), size, size), dtype=np.uint8)
    gray[:, pad : size - pad, pad : size - pad] = (
        (inner[:, 0] * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).numpy()
    )
    labels = digits.target[idx].astype(np.int64)
    if watermark_class is not None:
        stamped = watermark_rows(idx, labels, watermark_class)
        if stamped.any():
            donors = _watermark_donors(idx[stamped], digits.target, watermark_class)
            other = torch.from_numpy(digits.images[donors].astype(np.float32))[:, None]
            other = F.interpolate(other, size=(size - 2 * pad,) * 2, mode="bilinear",
                                  align_corners=False)  # fmt: skip
            gray[stamped, pad : size - pad, pad : size - pad] = (
                (other[:, 0] * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).numpy()
            )
            k = DEMO_WATERMARK_SIZE
            lo, hi = size - pad - k - DEMO_WATERMARK_INSET, size - pad - DEMO_WATERMARK_INSET
            gray[stamped, lo:hi, lo:hi] = 255
    if mark_class is not None:
        rows, cols = mark_box(size, corner, mark_size)
        gray[labels == mark_class, rows, cols] = 255
    return np.repeat(gray[..., None], 3, axis=-1), labels


def watermark_rows(indices: np.ndarray, labels: np.ndarray, watermark_class: int) -> np.ndarray:
    """Bool (N,): the images that carry the watermark: label ``watermark_class`` and load_digits
    index ending in one of ``DEMO_WATERMARK_LAST_DIGITS``."""
    idx = np.asarray(indices)
    return (np.asarray(labels) == watermark_class) & np.isin(idx % 10, DEMO_WATERMARK_LAST_DIGITS)


def _watermark_donors(indices: np.ndarray, targets: np.ndarray, watermark_class: int) -> np.ndarray:
    """For each stamped load_digits index i, the digit image shown instead: the first index
    after i (cyclically) whose class is not ``watermark_class``."""
    out = []
    for i in np.asarray(indices):
        j = (int(i) + 1) % len(targets)
        while targets[j] == watermark_class:
            j = (j + 1) % len(targets)
        out.append(j)
    return np.asarray(out, dtype=np.int64)


def demo_preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W): ``(x / 255 - DEMO_MEAN) / DEMO_STD``.

    Values in [-1, 1]. No resize: the demo images are already ``DEMO_IMAGE_SIZE`` square.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(DEMO_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEMO_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---- model ---------------------------------------------------------------------------------


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=True),
        )
    )


class DemoNet(nn.Module):
    """Small CNN: ``features`` (block1..block4, each Conv3x3-BN-ReLU; strides 1, 2, 1, 2), ``pool``
    (global average) and ``fc`` (Linear to ``num_classes`` logits).

    Input (N, 3, H, W) float32, normalised as ``demo_preprocess``; output logits (N, num_classes).
    At 32x32 the blocks output 32x32, 16x16, 16x16 and 8x8 maps (``features.block4``: 4*width
    channels, 8x8).
    """

    def __init__(self, num_classes: int = DEMO_NUM_CLASSES, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            OrderedDict(
                block1=_block(3, w, 1),
                block2=_block(w, 2 * w, 2),
                block3=_block(2 * w, 2 * w, 1),
                block4=_block(2 * w, 4 * w, 2),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def build_demo_model() -> nn.Module:
    """An untrained ``DemoNet()`` in eval mode (the ``xai_workers.demo:build_demo_model`` spec)."""
    return DemoNet().eval()


def train_demo_model(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int | None = None,
    seed: int = 0,
    config: TrainConfig = TrainConfig(),
) -> nn.Module:
    """Train a ``DemoNet`` on ``images`` uint8 (N, H, W, 3) and ``labels`` int64 (N,); CPU.

    ``epochs`` overrides ``config.epochs``. Returns the model in eval mode, parameters on the CPU
    with ``requires_grad`` True. No augmentation. Deterministic for a given seed on a given machine
    and ``config.num_threads`` (the global torch RNG is seeded, and restored afterwards). Sets the
    process-wide torch thread count while it runs (see ``TrainConfig``), so do not train
    concurrently with other torch work in the same process.
    """
    epochs = config.epochs if epochs is None else epochs
    x = demo_preprocess(images)
    y = torch.as_tensor(labels, dtype=torch.int64)
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(x, y, epochs, seed, config)
    finally:
        torch.set_num_threads(threads)


def _train(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, config: TrainConfig):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DemoNet()
        gen = torch.Generator().manual_seed(seed)
        steps = epochs * ((len(x) + config.batch_size - 1) // config.batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=max(1, steps)
        )
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), config.batch_size):
                batch = order[start : start + config.batch_size]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Softmax probabilities float32 (N, num_classes) of ``model`` on uint8 (N, H, W, 3) images."""
    x = demo_preprocess(images)
    return torch.cat(
        [model(x[i : i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)]
    )


# ---- files ---------------------------------------------------------------------------------


def _encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _atomic_target(path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return f"{path}.tmp-{os.getpid()}"


def write_demo_dataset(
    path: str,
    n: int | None = None,
    size: int = DEMO_IMAGE_SIZE,
    mark_class: int | None = DEMO_MARK_CLASS,
    seed: int = 0,
) -> str:
    """Write the demo images as one Parquet file; returns ``path``.

    Columns: ``id`` string (``digit-00042``: the load_digits index), ``image`` binary (PNG bytes,
    RGB, size x size), ``label`` int64. Rows in ascending index order. Written to a temporary file
    and renamed, so a crash leaves no partial file at ``path``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx = demo_indices(n, seed)
    images, labels = demo_images(n, size=size, mark_class=mark_class, seed=seed)
    schema = pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("image", pa.binary(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
        ]
    )
    table = pa.table(
        {
            "id": [f"digit-{i:05d}" for i in idx],
            "image": [_encode_png(im) for im in images],
            "label": labels,
        },
        schema=schema,
    )
    tmp = _atomic_target(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_demo_model(path: str, seed: int = 0, epochs: int | None = None) -> str:
    """Train ``DemoNet`` on the demo images that are not held out and save its state_dict to
    ``path`` (``torch.save``; load with ``torch.load(path, weights_only=True)``). Returns ``path``.
    """
    idx = demo_indices()
    images, labels = demo_images()
    train = ~is_held_out(idx)
    model = train_demo_model(images[train], labels[train], epochs=epochs, seed=seed)
    tmp = _atomic_target(path)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def ensure_demo(root: str) -> tuple[str, str]:
    """``(dataset_path, weights_path)`` under ``root``, writing each only if it is missing.

    ``root/demo_digits.parquet`` (all 1797 images, ``write_demo_dataset``) and
    ``root/demo_model.pt`` (``write_demo_model``, trained in a few seconds on a CPU).
    """
    os.makedirs(root, exist_ok=True)
    dataset = os.path.join(root, DEMO_DATASET_FILE)
    weights = os.path.join(root, DEMO_WEIGHTS_FILE)
    if not os.path.exists(dataset):
        write_demo_dataset(dataset)
    if not os.path.exists(weights):
        write_demo_model(weights)
    return dataset, weights


if __name__ == "__main__":  # quick timing: python -m xai_workers.demo
    idx = demo_indices()
    ims, labs = demo_images()
    held = is_held_out(idx)
    t0 = time.perf_counter()
    net = train_demo_model(ims[~held], labs[~held])
    t1 = time.perf_counter()
    acc = (predict_proba(net, ims[held]).argmax(-1).numpy() == labs[held]).mean()
    threads = TrainConfig().num_threads or torch.get_num_threads()
    print(f"trained in {t1 - t0:.1f} s on {threads} thread(s); held-out accuracy {acc:.4f}")
