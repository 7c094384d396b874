"""Bytes per image of each storage profile, and how faithful the compact maps are.

Data: ``--n`` real photographs, 224 px JPEGs (quality 90): random crops, flips and colour jitter
of the three photos that ship with matplotlib and scikit-learn (``grace_hopper.jpg``,
``china.jpg``, ``flower.jpg``); the class is the source photo. Model: a torchvision ResNet-18
(3 classes) trained on them for ``--train-steps`` SGD steps from a seeded random init (no
download), so its maps are those of a model that learned something. The job then runs once per
profile (``compact`` at ``--map-size``, ``full``, ``stats``), all three methods, on a local Ray.

Reported per profile: bytes on disk per row (part files / rows) and per tensor column (the
Parquet column chunks' compressed sizes / rows); for ``full``, the same table written without
BYTE_STREAM_SPLIT (what that encoding saves); for ``compact``, the same rows rewritten with the
maps stored as float16 tensors (schema version 1) and as float32 holding bfloat16 values (now),
both reduced from the same full maps (``same_maps_bytes_per_row``). Fidelity of each compact
map against the full map reduced the same way in float64 (area average to M x M; IG summed over
channels first): relative L2 error, Spearman rank correlation, IoU of the top-10% pixels (median
and worst over images); ``bounds`` checks the issue's (<= 20 KB a row, relative L2 <= 5e-3).
Finally the audit report is built from the compact and the full output and their galleries
compared (the same images must be flagged).

    PYTHONPATH=. python benchmarks/storage_profiles.py [--n 24] [--ig-steps 32]
        [--map-size 64] [--train-steps 60] [--batch-size 8] [--out /tmp/xai-profiles]

Smoke test (seconds): ``--n 4 --ig-steps 2 --train-steps 1``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from xai_audit.attribute import run_job
from xai_audit.config import JobConfig
from xai_audit.report import build_report
from xai_workers import schema as S
from xai_workers.profiles import area_matrix, effective_map_size
from xai_workers.worker import available_cores

PHOTOS = ("matplotlib/mpl-data/sample_data/grace_hopper.jpg",
          "sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg")  # fmt: skip
MAPS = ("saliency", "integrated_gradients", "gradcam")


def photos() -> list:
    import matplotlib
    from PIL import Image

    site = os.path.dirname(os.path.dirname(matplotlib.__file__))
    return [Image.open(os.path.join(site, p)).convert("RGB") for p in PHOTOS]


def make_dataset(path: str, n: int, seed: int = 0) -> None:
    """n 224 px JPEGs: random crops (40-90% of the short side), flips, brightness jitter."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    srcs = photos()
    ids, blobs, labels = [], [], []
    for i in range(n):
        c = i % len(srcs)
        im = srcs[c]
        side = int(min(im.size) * rng.uniform(0.4, 0.9))
        x0 = int(rng.integers(0, im.size[0] - side + 1))
        y0 = int(rng.integers(0, im.size[1] - side + 1))
        crop = im.crop((x0, y0, x0 + side, y0 + side)).resize((224, 224), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        ids.append(f"img-{i:05d}")
        blobs.append(buf.getvalue())
        labels.append(c)
    pq.write_table(
        pa.table({"id": ids, "image": pa.array(blobs, pa.binary()), "label": labels}), path
    )


def train_resnet18(dataset: str, steps: int, path: str, batch: int = 8) -> float:
    """Train a 3-class ResNet-18 on the dataset for ``steps`` SGD steps; save the state_dict.
    Returns the final training accuracy (eval mode, whole dataset)."""
    import torchvision

    from xai_workers.preprocess import Preprocessing, preprocess_bytes

    torch.manual_seed(0)
    torch.set_num_threads(available_cores())
    t = pq.read_table(dataset)
    pre = Preprocessing(image_size=224)
    x = torch.stack([preprocess_bytes(b, pre) for b in t["image"].to_pylist()])
    y = torch.tensor(t["label"].to_pylist())
    net = torchvision.models.resnet18(num_classes=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
    torch.save(net.state_dict(), path)
    return acc


def column_bytes(folder: str) -> dict[str, float]:
    """Compressed bytes per row of each top-level column, summed over the part files."""
    sizes: dict[str, int] = {}
    rows = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".parquet"):
            continue
        md = pq.ParquetFile(os.path.join(folder, name)).metadata
        rows += md.num_rows
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for i in range(rg.num_columns):
                col = rg.column(i)
                top = col.path_in_schema.split(".")[0]
                sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    return {k: v / rows for k, v in sizes.items()}


def without_bss_bytes(folder: str) -> tuple[int, int]:
    """(bytes with the job's encoding, bytes rewritten the same way but without
    BYTE_STREAM_SPLIT) of the output's rows."""
    from xai_audit.output import float_leaves

    t = pq.read_table(folder)
    strings = [f.name for f in t.schema if pa.types.is_string(f.type)]
    out = []
    for bss in (float_leaves(t.schema), False):
        buf = io.BytesIO()
        pq.write_table(t, buf, compression="zstd", write_statistics=False,
                       use_dictionary=strings, use_byte_stream_split=bss)  # fmt: skip
        out.append(len(buf.getvalue()))
    return out[0], out[1]


def float16_bytes(full: pa.Table, compact: pa.Table, map_size: int, root: str) -> dict:
    """Bytes per row, written by the job's writer (``write_part``), of the compact rows with
    their maps stored as schema version 1 did (float16 ``fixed_shape_tensor``, BYTE_STREAM_SPLIT:
    what Spark and DuckDB refuse) and as now (float32 holding bfloat16 values), the maps reduced
    from the same full maps in float32. Same rows, same maps: only the stored type differs."""
    from xai_audit.output import write_part
    from xai_workers.profiles import reduce_map

    ok = np.array(full["status"].to_pylist()) == "ok"
    out = {}
    for kind in ("float16", "bfloat16"):
        t = compact
        for m in MAPS:
            f = torch.from_numpy(np.nan_to_num(S.tensor_to_numpy(full[m])))
            if kind == "float16":  # the float32 area mean, then float16 (schema 1)
                v = _area_f32(m, f, map_size).astype(np.float16)
                col = S.tensor_array(v, ok, value_type=pa.float16())
            else:  # float32 holding bfloat16 values (schema 2)
                v = reduce_map(m, f, map_size).numpy()
                col = S.map_array(v, ok, compact.schema.field(m).type)
            t = t.set_column(t.schema.get_field_index(m), pa.field(m, col.type), col)
        dest = os.path.join(root, f"bytes-{kind}")
        info = write_part(t, dest)
        out[kind] = info["bytes"] / info["rows"]
    return out


def _area_f32(method: str, full: torch.Tensor, map_size: int) -> np.ndarray:
    """The compact reduction before its rounding: float32 (N, M, M)."""
    v = full.float()
    if method == "integrated_gradients":
        v = v.sum(dim=-3)
    a = area_matrix(v.shape[-1], effective_map_size(map_size, v.shape[-1]), dtype=v.dtype)
    return (a @ v @ a.T).numpy()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def _top_iou(a: np.ndarray, b: np.ndarray, q: float = 0.1) -> float:
    """IoU of the top-q pixels of a and of b (by value; ties broken by position, stable)."""
    k = max(1, int(round(q * a.size)))
    ta = set(np.argsort(-a.ravel(), kind="stable")[:k].tolist())
    tb = set(np.argsort(-b.ravel(), kind="stable")[:k].tolist())
    return len(ta & tb) / len(ta | tb)


def fidelity(full: pa.Table, compact: pa.Table, map_size: int) -> dict:
    out = {}
    ok = np.array(full["status"].to_pylist()) == "ok"
    for m in MAPS:
        f = torch.from_numpy(S.tensor_to_numpy(full[m])[ok]).double()
        v = f.sum(dim=-3) if m == "integrated_gradients" else f
        a = area_matrix(v.shape[-1], effective_map_size(map_size, v.shape[-1]))
        want = (a @ v @ a.T).numpy()  # the compact reduction, in float64 and without rounding
        got = S.tensor_to_numpy(compact[m])[ok].astype(np.float64)
        rel = [
            np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
            for g, w in zip(got, want, strict=True)
        ]
        rho = [_spearman(g, w) for g, w in zip(got, want, strict=True)]
        # IG is signed: rank by magnitude, as the report shows it
        mag = np.abs if m == "integrated_gradients" else (lambda z: z)
        iou = [_top_iou(mag(g), mag(w)) for g, w in zip(got, want, strict=True)]
        out[m] = {
            "rel_l2_median": float(np.median(rel)), "rel_l2_max": float(np.max(rel)),
            "spearman_median": float(np.median(rho)), "spearman_min": float(np.min(rho)),
            "top10_iou_median": float(np.median(iou)), "top10_iou_min": float(np.min(iou)),
        }  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--map-size", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="xai-profiles-")
    os.makedirs(root, exist_ok=True)
    dataset = os.path.join(root, "photos.parquet")
    make_dataset(dataset, args.n)
    jpeg = np.mean([len(b) for b in pq.read_table(dataset)["image"].to_pylist()])
    weights = os.path.join(root, "resnet18.pt")
    acc = train_resnet18(dataset, args.train_steps, weights)
    res = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                      f"{available_cores()} cores", "n": args.n, "jpeg_bytes_mean": jpeg,
           "train_accuracy": acc, "ig_steps": args.ig_steps, "map_size": args.map_size}  # fmt: skip
    tables = {}
    for store in ("compact", "full", "stats"):
        out = os.path.join(root, store)
        cfg = JobConfig(
            input=dataset, output=out, model="torchvision:resnet18", weights=weights,
            ig_steps=args.ig_steps, batch_size=args.batch_size, store=store,
            map_size=args.map_size, overwrite=True, progress_interval_s=1e9,
        )  # fmt: skip
        r = run_job(cfg, log=lambda m: None)
        assert r.exit_code == 0, r.summary
        attr = os.path.join(out, "attributions")
        res[store] = {
            "bytes_per_row": r.manifest["counts"]["bytes_per_row"],
            "expected_bytes_per_row_uncompressed": r.manifest["output"]["expected_bytes_per_row"],
            "column_bytes_per_row": {
                k: round(v, 1) for k, v in column_bytes(attr).items() if k in MAPS
            },
        }
        tables[store] = pq.read_table(attr).sort_by("id")
    with_bss, without = without_bss_bytes(os.path.join(root, "full", "attributions"))
    res["full"]["bss_saving"] = round(1 - with_bss / without, 4)
    res["fidelity"] = fidelity(tables["full"], tables["compact"], args.map_size)
    res["compact"]["same_maps_bytes_per_row"] = float16_bytes(
        tables["full"], tables["compact"], args.map_size, root
    )
    worst = max(f["rel_l2_max"] for f in res["fidelity"].values())
    # the bounds: <= 20 KB per 224 px row (3 methods), each map within 5e-3 (rel. L2)
    res["bounds"] = {
        "bytes_per_row_at_most_20000": res["compact"]["bytes_per_row"] <= 20_000,
        "rel_l2_max_at_most_5e-3": worst <= 5e-3,
    }
    flagged = {}
    for store in ("compact", "full"):
        rep = build_report(os.path.join(root, store), log=lambda m: None)
        flagged[store] = {k: [r["id"] for r in v] for k, v in rep.galleries.items()}
    res["report_same_images"] = flagged["compact"] == flagged["full"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
