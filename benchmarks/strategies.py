"""SpRAy on one class: ``xai_workers.strategies`` against CoRelAy's SpRAy pipeline, same maps.

Maps: ``--rows`` (default 10,000) synthetic 64x64 maps of one class, seeded: ``--strategies``
(default 4) planted strategies, each a Gaussian blob at its own place (one a small corner
"watermark" over a weaker central blob), with per-map jitter of position and scale and gamma
noise; shares 40/30/20/10%. Both pipelines get the same preprocessed maps (area mean to 32x32,
``|.|``, divided by the sum: docs/conventions.md, "Strategies"), k = 10 neighbours, 32
eigenvalues, c = the number of strategies our eigengap picks, seed 0, one thread each
(``threadpoolctl``), no 2-D embedding (timed separately for ours: scikit-learn t-SNE).

- **ours**: ``knn_affinity`` (scikit-learn kneighbors_graph) -> ``spectrum`` (``eigsh``,
  ``which="LA"`` on ``D^-1/2 A D^-1/2``) -> ``eigengap`` -> ``KMeans`` on the c eigenvectors.
- **CoRelAy 1.0**: ``SpectralClustering`` with ``SciPyPDist`` (dense n x n distances),
  ``SparseKNN(k)`` (a full argsort per row), ``SymmetricNormalLaplacian``,
  ``EigenDecomposition(32)`` (``eigsh``, ``which="LM"``) and ``KMeans(c)`` given the same c
  eigenvectors (its ``index``; its default takes all 32: docs/conventions.md says why not).

Reported: seconds per 1,000 rows of each (best of ``--repeat``), their ratio, the adjusted Rand
index between the two assignments (load-independent) and of each against the planted truth, the
largest eigenvalue difference. Preprocessing (the same code for both) is timed apart.

    PYTHONPATH=. python benchmarks/strategies.py [--rows 10000] [--repeat 3] [--tsne]

Smoke test (seconds): ``--rows 1500 --repeat 1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def planted_maps(rows: int, n_strategies: int = 4, size: int = 64, seed: int = 0):
    """(maps float32 (rows, size, size), truth int64 (rows,)): module docstring."""
    rng = np.random.default_rng(seed)
    shares = np.array([0.4, 0.3, 0.2, 0.1][:n_strategies], dtype=np.float64)
    shares = shares / shares.sum()
    truth = rng.choice(n_strategies, size=rows, p=shares)
    centres = [(0.5, 0.5), (0.3, 0.65), (0.7, 0.35), (0.92, 0.92), (0.2, 0.2), (0.8, 0.75)]
    yy, xx = np.mgrid[0:size, 0:size] / size
    maps = rng.gamma(1.0, 0.05, size=(rows, size, size))
    for s in range(n_strategies):
        idx = np.flatnonzero(truth == s)
        cy, cx = centres[s % len(centres)]
        jy = cy + rng.normal(0, 0.03, len(idx))[:, None, None]
        jx = cx + rng.normal(0, 0.03, len(idx))[:, None, None]
        width = (0.03 if s == 3 else 0.12) * rng.uniform(0.8, 1.2, len(idx))[:, None, None]
        blob = np.exp(-((yy - jy) ** 2 + (xx - jx) ** 2) / (2 * width**2))
        maps[idx] += blob * (3.0 if s == 3 else 1.0)
        if s == 3:  # the watermark strategy still looks at the object a little
            maps[idx] += 0.4 * np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / (2 * 0.12**2))
    return maps.astype(np.float32), truth


def ours(x: np.ndarray, k: int, n_eig: int, max_strategies: int, seed: int):
    from xai_workers import strategies as S

    lam, vec = S.spectrum(S.knn_affinity(x, k), n_eig, seed)
    c, _ = S.eigengap(lam, max_strategies)
    return S.kmeans(S.row_normalise(vec[:, :c]), c, seed), lam, c


def corelay(x: np.ndarray, k: int, n_eig: int, c: int, seed: int):
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.clustering import KMeans
    from corelay.processor.distance import SciPyPDist
    from corelay.processor.embedding import EigenDecomposition

    pipeline = SpectralClustering(
        pairwise_distance=SciPyPDist(metric="euclidean"),
        affinity=SparseKNN(n_neighbors=k, symmetric=True),
        embedding=EigenDecomposition(n_eigval=n_eig, is_output=True),
        clustering=KMeans(
            n_clusters=c,
            index=(slice(None), slice(-c, None)),
            kwargs={"random_state": seed, "n_init": 10},
            is_output=True,
        ),
    )
    (eigval, _), labels = pipeline(x)
    return np.asarray(labels), np.sort(eigval)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--strategies", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--eigenvalues", type=int, default=32)
    ap.add_argument("--max-strategies", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tsne", action="store_true", help="also time our 2-D t-SNE")
    a = ap.parse_args()

    from sklearn.metrics import adjusted_rand_score as ari
    from threadpoolctl import threadpool_limits

    from xai_workers import strategies as S

    maps, truth = planted_maps(a.rows, a.strategies, seed=a.seed)
    with threadpool_limits(1):
        t0 = time.perf_counter()
        shares, valid = S.preprocess(maps, 32)
        t_pre = time.perf_counter() - t0
        x = shares.reshape(len(shares), -1)
        t_ours, t_core = [], []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            lab_o, lam, c = ours(x, a.k, a.eigenvalues, a.max_strategies, a.seed)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lab_c, lam_c = corelay(x, a.k, a.eigenvalues, c, a.seed)
            t_core.append(time.perf_counter() - t0)
        t_tsne = None
        if a.tsne:
            _, vec = S.spectrum(S.knn_affinity(x, a.k), a.eigenvalues, a.seed)
            t0 = time.perf_counter()
            S.tsne_2d(S.row_normalise(vec), a.seed)
            t_tsne = time.perf_counter() - t0
    per_k = 1000.0 / a.rows
    out = {
        "rows": a.rows,
        "strategies_planted": a.strategies,
        "strategies_found": int(c),
        "preprocess_s_per_1000": round(t_pre * per_k, 4),
        "ours_s_per_1000": round(min(t_ours) * per_k, 4),
        "corelay_s_per_1000": round(min(t_core) * per_k, 4),
        "speedup": round(min(t_core) / min(t_ours), 2),
        "tsne_s_per_1000": None if t_tsne is None else round(t_tsne * per_k, 4),
        "ari_ours_vs_corelay": round(float(ari(lab_o, lab_c)), 4),
        "ari_ours_vs_truth": round(float(ari(truth[valid], lab_o)), 4),
        "ari_corelay_vs_truth": round(float(ari(truth[valid], lab_c)), 4),
        "max_eigenvalue_difference": float(np.abs(lam - lam_c).max()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": 1,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
