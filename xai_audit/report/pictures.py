"""The report's pictures: overlays of a map on its image, the |map - median| view, class map
tiles, colour bars, PNG encoding. numpy/Pillow/matplotlib in, uint8 RGB arrays or PNG bytes out.
"""

from __future__ import annotations

import io

import numpy as np

#: Tile side in the galleries (CSS pixels).
TILE = 132
#: Side of a class map tile.
CLASS_TILE = 96
#: Overlay: heatmap opacity over the image.
OVERLAY_ALPHA = 0.55
#: Display scaling of an overlay: the map divided by this percentile of its values.
OVERLAY_PERCENTILE = 99.5


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _resize_float(m: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(m, dtype=np.float32), mode="F")
    res = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(img.resize((size, size), res), dtype=np.float32)


def _image_tile(image: np.ndarray | None, size: int) -> np.ndarray:
    """(H, W, 3) float [0, 1] or None -> (size, size, 3) float [0, 1] (None: mid gray)."""
    from PIL import Image

    if image is None:
        return np.full((size, size, 3), 0.5, np.float32)
    u8 = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(u8, mode="RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float32) / 255.0


def display_scale(m: np.ndarray) -> np.ndarray:
    """A 2-D map >= 0 scaled for display: ``m / percentile(m, 99.5)`` clipped to [0, 1] (zeros
    for an all-zero map)."""
    m = np.nan_to_num(np.asarray(m, np.float64))
    top = float(np.percentile(m, OVERLAY_PERCENTILE)) if m.size else 0.0
    if not top > 0:
        top = float(m.max()) if m.size else 0.0
    return np.clip(m / top, 0, 1) if top > 0 else np.zeros_like(m)


def deviation(m: np.ndarray) -> np.ndarray:
    """``|m - median(m)|`` divided by its largest value, in [0, 1] (zeros for a constant map):
    where the map departs from its typical value."""
    m = np.nan_to_num(np.asarray(m, np.float64))
    d = np.abs(m - np.median(m))
    top = d.max() if d.size else 0.0
    return d / top if top > 0 else np.zeros_like(d)


def overlay(image: np.ndarray | None, m: np.ndarray, size: int = TILE, cmap: str = "inferno",
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:  # fmt: skip
    """uint8 (size, size, 3): the colormapped ``m`` (already in [0, 1]) over the image with
    opacity ``alpha`` (image None: over mid gray)."""
    base = _image_tile(image, size)
    heat = _cmap(cmap)(np.clip(_resize_float(m, size), 0, 1))[..., :3]
    out = (1 - alpha) * base + alpha * heat
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def class_map_tile(share: np.ndarray, size: int = CLASS_TILE, cmap: str = "inferno") -> np.ndarray:
    """uint8 (size, size, 3): a class's mean share map (32x32), scaled by its own max, nearest
    upscaled, with the border band (the outer 10% that ``border_frac`` measures) dotted."""
    from xai_workers.stats import border_width

    m = np.nan_to_num(np.asarray(share, np.float64))
    top = m.max()
    m = m / top if top > 0 else m
    rgb = _cmap(cmap)(_resize_float(m, size, nearest=True))[..., :3]
    rgb = (rgb * 255).round().astype(np.uint8)
    h = m.shape[0]
    b = round(border_width(h) * size / h)
    dots = np.arange(1, size, 3)
    light = (rgb.astype(np.uint16) + 2 * 255) // 3  # two thirds of the way to white
    for line in (b, size - b - 1):
        rgb[line, dots] = light[line, dots]
        rgb[dots, line] = light[dots, line]
    return rgb


def colorbar(cmap: str = "inferno", width: int = 256, height: int = 12) -> np.ndarray:
    """uint8 (height, width, 3): the colormap from 0 (left) to 1 (right)."""
    ramp = _cmap(cmap)(np.linspace(0, 1, width))[None, :, :3].repeat(height, axis=0)
    return (ramp * 255).round().astype(np.uint8)


def _map2d(method: str, value: np.ndarray, store: str = "full") -> np.ndarray:
    """A row's tensor -> its 2-D map (first target with topk). Under the ``compact`` profile IG
    is stored summed over channels (signed): shown as ``|sum_c IG[c]|``."""
    import torch

    from xai_workers.stats import map_2d

    v = np.asarray(value, np.float32)
    if store == "compact" or (method == "integrated_gradients" and v.ndim == 2):
        # compact: (M, M), or (K, M, M) with topk
        v = v[0] if v.ndim == 3 else v
        return np.abs(v) if method == "integrated_gradients" else v
    base = 3 if method == "integrated_gradients" else 2
    if v.ndim == base + 1:
        v = v[0]
    return map_2d(method, torch.from_numpy(np.ascontiguousarray(v))).numpy()


def row_tiles(n: int, row: dict, image: np.ndarray | None, methods: list[str], store: str,
              files_out: dict[str, bytes]) -> dict:  # fmt: skip
    """Draw gallery row number ``n``: its image tile (``img/r{n:03d}-image.png``) and, for each
    of ``methods`` the row has a map of, the overlay and the |map - median| view, into
    ``files_out`` (name -> PNG bytes). Returns {"image": name, method: (overlay, deviation)}."""
    name = f"img/r{n:03d}"
    files_out[f"{name}-image.png"] = _png((_image_tile(image, TILE) * 255).round().astype(np.uint8))
    tiles: dict = {"image": f"{name}-image.png"}
    for m in methods:
        value = row.get(m)
        if value is None:
            continue
        m2 = _map2d(m, value, store)
        files_out[f"{name}-{m}-overlay.png"] = _png(overlay(image, display_scale(m2)))
        files_out[f"{name}-{m}-dev.png"] = _png(
            overlay(image, deviation(m2), cmap="viridis", alpha=0.8)
        )
        tiles[m] = (f"{name}-{m}-overlay.png", f"{name}-{m}-dev.png")
    return tiles


def picture_tile(pixels: np.ndarray | None, size: int) -> bytes:
    """PNG of an (H, W, 3) float [0, 1] image (None: mid gray) resized to (size, size)."""
    return _png((_image_tile(pixels, size) * 255).round().astype(np.uint8))
