"""Spectral Relevance Analysis (SpRAy) of one class's maps: which strategies does the model use?

Pure computation over arrays (numpy, scipy, scikit-learn; no Ray, no I/O). The driver that runs it
per class over a finished output is ``xai_audit.strategies``. Definitions (docs/conventions.md,
"Strategies (SpRAy)"):

1. **Preprocessing** (:func:`preprocess`): each map (H, W) is area-averaged to ``grid x grid``
   (exact area mean, ``profiles.area_matrix``; a map smaller than the grid is kept as it is), made
   non-negative with ``|.|`` and divided by its sum: CoRelAy's SpRAy preprocessing (ViRelAy's
   ``meta_analysis`` ``absspectral`` variant: ``Absolute``, ``SumChannel``, ``Normalize``,
   ``Flatten``) on maps that already have one channel. A map that is null, not finite or sums to
   0 is left out (its row gets no strategy).
2. **Affinity** (:func:`knn_affinity`): binary k-nearest-neighbour graph in Euclidean distance
   (the point itself excluded), symmetrised ``(C + C^T) / 2``: CoRelAy's ``SparseKNN``.
3. **Spectrum** (:func:`spectrum`): ``M = D^-1/2 A D^-1/2``; the ``eigenvalues`` largest
   eigenvalues ``mu`` of M by ``scipy.sparse.linalg.eigsh`` (``which="LA"``, a seeded start
   vector), reported as the normalised Laplacian's smallest, ``lambda = 1 - mu``, ascending, with
   their eigenvectors.
4. **Eigengap** (:func:`eigengap`): the number of strategies c in ``1..max_strategies`` maximises
   ``lambda[c] - lambda[c - 1]``.
5. **Strategies**: scikit-learn ``KMeans(c, n_init=10, random_state=seed)`` on the eigenvectors of
   the c smallest eigenvalues, each row scaled to unit length (Ng, Jordan and Weiss); relabelled
   by size, 0 = the largest (ties: the strategy holding the earlier row first). CoRelAy's
   ``KMeans`` defaults to all E eigenvectors (rows normalised over E): on a class with two clear
   strategies that clusters the E - 2 noise directions (adjusted Rand index 0.26 against the
   truth on a planted example where the c eigenvectors give 1.0), so we use the c that the
   eigengap chose; the test compares with CoRelAy given the same columns (its ``index``).
6. **Pictures**: a seeded 2-D t-SNE of all E eigenvectors, rows scaled to unit length (CoRelAy's
   ``TSNEEmbedding`` input).
7. **Per strategy** (:func:`strategy_stats`): size, share, mean (share) map, its border share and
   concentration, label purity, and the shortcut-candidate flag (:func:`shortcut_flags`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_GRID = 32
DEFAULT_K = 10
DEFAULT_EIGENVALUES = 32
DEFAULT_MAX_STRATEGIES = 8
DEFAULT_MIN_CLASS_ROWS = 20
#: Top share of cells whose mass is a map's concentration.
CONCENTRATION_TOP = 0.1
#: A cell is "the strategy's own" when its mean share there is at least this many times the other
#: strategies' (their size-weighted mean share map)...
FLAG_RATIO = 4.0
#: ...and a strategy is a shortcut candidate when at least this share of its mass lies in its own
#: cells...
FLAG_EXCLUSIVE = 0.12
#: ...and it has at least this many rows and this share of the class's analysed rows.
FLAG_MIN_SIZE = 5
FLAG_MIN_SHARE = 0.1
#: t-SNE iterations of the 2-D picture embedding.
TSNE_ITER = 500


@dataclass(frozen=True)
class StrategyConfig:
    """Settings of one class's analysis (docs/conventions.md, "Strategies (SpRAy)").

    ``grid``: side of the maps after area averaging; ``k``: neighbours of the affinity graph;
    ``eigenvalues``: how many of the Laplacian's smallest eigenvalues (and eigenvectors) to
    compute; ``max_strategies``: the largest number of strategies the eigengap may choose;
    ``min_class_rows``: classes with fewer usable maps are not analysed; ``seed``: the eigensolver's
    start vector, k-means and t-SNE; ``embed``: compute the 2-D t-SNE embedding; ``threads``:
    BLAS/OpenMP threads of the analysis (``threadpoolctl``; one by default: classes run in
    parallel as tasks, and oversubscribed OpenMP made k-means and t-SNE 10-60x slower on a
    loaded 2-core machine).
    """

    grid: int = DEFAULT_GRID
    k: int = DEFAULT_K
    eigenvalues: int = DEFAULT_EIGENVALUES
    max_strategies: int = DEFAULT_MAX_STRATEGIES
    min_class_rows: int = DEFAULT_MIN_CLASS_ROWS
    seed: int = 0
    embed: bool = True
    threads: int = 1

    def __post_init__(self):
        for name in ("grid", "k", "eigenvalues", "max_strategies", "min_class_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_strategies > self.eigenvalues - 1 and self.eigenvalues > 1:
            raise ValueError(
                f"max_strategies ({self.max_strategies}) must be below eigenvalues "
                f"({self.eigenvalues}): the eigengap needs eigenvalue c to choose c strategies"
            )
        if self.min_class_rows < 3:
            raise ValueError(f"min_class_rows must be >= 3, got {self.min_class_rows}")


@dataclass(frozen=True)
class ClassStrategies:
    """One class's result. N rows given, n of them usable (``valid``).

    ``valid`` bool (N,); ``strategy`` int64 (N,), -1 where not valid; ``embed`` float32 (N, 2), NaN
    where not valid (or all NaN without ``embed``); ``eigenvalues`` float64 (E,) ascending (the
    Laplacian's, in [0, 2]); ``n_strategies`` c; ``eigengap`` ``lambda[c] - lambda[c-1]``;
    ``maps`` float64 (n, g, g): the preprocessed maps of the valid rows (each sums to 1).
    """

    valid: np.ndarray
    strategy: np.ndarray
    embed: np.ndarray
    eigenvalues: np.ndarray
    n_strategies: int
    eigengap: float
    maps: np.ndarray


def downsample(maps: np.ndarray, grid: int) -> np.ndarray:
    """Exact area mean of maps (N, H, W) to (N, g, g) float64 with g = min(grid, H, W)
    (``xai_workers.profiles.area_matrix``: output cell (i, j) is the mean of the map over its
    rectangle, input pixels weighted by the share of them inside it)."""
    from xai_workers.profiles import area_matrix

    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W); got shape {maps.shape}")
    h, w = maps.shape[1:]
    g = max(1, min(int(grid), h, w))
    if (h, w) == (g, g):
        return maps.copy()
    rows = area_matrix(h, g).numpy()
    cols = area_matrix(w, g).numpy()
    return np.einsum("ih,nhw,jw->nij", rows, maps, cols, optimize=True)


def preprocess(maps: np.ndarray, grid: int = DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, H, W) -> ``(shares, valid)``: ``shares`` float64 (n, g, g), each ``|map|``
    area-averaged to the grid and divided by its sum (sums to 1, values in [0, 1]); ``valid`` bool
    (N,) False for maps that are not finite (null rows read as NaN) or sum to 0."""
    small = np.abs(downsample(maps, grid))
    total = small.sum(axis=(1, 2))
    valid = np.isfinite(total) & (total > 0)
    return small[valid] / total[valid, None, None], valid


def knn_affinity(x: np.ndarray, k: int = DEFAULT_K):
    """Symmetric sparse affinity (n, n) of the rows of ``x`` (n, d): ``C[i, j] = 1`` when j is one
    of the ``min(k, n - 1)`` nearest neighbours of i (Euclidean, i itself excluded), then
    ``(C + C^T) / 2`` (values 0, 0.5, 1). scipy CSR, float64."""
    from sklearn.neighbors import kneighbors_graph

    n = len(x)
    c = kneighbors_graph(x, n_neighbors=min(int(k), n - 1), mode="connectivity", include_self=False)
    return ((c + c.T) / 2.0).tocsr().astype(np.float64)


def spectrum(affinity, n_eig: int = DEFAULT_EIGENVALUES, seed: int = 0):
    """``(eigenvalues, vectors)`` of an affinity (n, n): the ``E = min(n_eig, n - 1)`` smallest
    eigenvalues of the normalised Laplacian ``I - D^-1/2 A D^-1/2``, float64 (E,) ascending, and
    the matching unit eigenvectors as columns, float64 (n, E).

    Computed as the largest algebraic eigenvalues of ``D^-1/2 A D^-1/2`` (``eigsh(which="LA")``,
    start vector uniform in [0, 1) from ``numpy.random.default_rng(seed)``: the same numbers on
    every call); a dense ``numpy.linalg.eigh`` when n is too small for ARPACK (E >= n - 1).
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    n = affinity.shape[0]
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    inv = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    d = sp.diags(inv)
    m = (d @ affinity @ d).tocsr()
    e = max(1, min(int(n_eig), n - 1))
    if e >= n - 1 or n < 64:
        mu, vec = np.linalg.eigh(m.toarray())
        mu, vec = mu[::-1][:e], vec[:, ::-1][:, :e]
    else:
        v0 = np.random.default_rng(seed).uniform(size=n)
        mu, vec = eigsh(m, k=e, which="LA", v0=v0)
    order = np.argsort(-mu, kind="stable")
    return 1.0 - mu[order], vec[:, order]


def row_normalise(vectors: np.ndarray) -> np.ndarray:
    """Each row of ``vectors`` (n, d) scaled to unit L2 norm (all-zero rows kept), float64."""
    v = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


def eigengap(eigenvalues: np.ndarray, max_strategies: int) -> tuple[int, float]:
    """``(c, gap)``: the c in ``1..min(max_strategies, E - 1)`` maximising
    ``eigenvalues[c] - eigenvalues[c - 1]`` (the first on ties) and that gap; ``(1, nan)`` when
    fewer than two eigenvalues are known."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    top = min(int(max_strategies), len(lam) - 1)
    if top < 1:
        return 1, math.nan
    gaps = np.diff(lam[: top + 1])
    c = int(np.argmax(gaps)) + 1
    return c, float(gaps[c - 1])


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster labels (n,) -> int64 labels 0..c-1 with 0 the largest cluster (ties: the cluster
    whose first row comes first)."""
    labels = np.asarray(labels)
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    new = np.empty(len(uniq), dtype=np.int64)
    new[order] = np.arange(len(uniq))
    return new[np.searchsorted(uniq, labels)]


def kmeans(embedding: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """scikit-learn ``KMeans(n_clusters, n_init=10, random_state=seed)`` on the rows of
    ``embedding``; labels relabelled by size (:func:`relabel_by_size`), int64 (n,)."""
    from sklearn.cluster import KMeans

    if n_clusters <= 1:
        return np.zeros(len(embedding), dtype=np.int64)
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    return relabel_by_size(km.fit_predict(embedding))


def tsne_2d(embedding: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded 2-D t-SNE (scikit-learn, PCA initialisation, perplexity ``min(30, (n - 1) / 3)``,
    ``TSNE_ITER`` iterations: half scikit-learn's default, for cost) of the rows of
    ``embedding`` (n, d) -> float32 (n, 2)."""
    from sklearn.manifold import TSNE

    n = len(embedding)
    if n < 4:
        return np.zeros((n, 2), dtype=np.float32)
    perplexity = float(min(30.0, (n - 1) / 3.0))
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=TSNE_ITER
    )
    return tsne.fit_transform(np.asarray(embedding, dtype=np.float64)).astype(np.float32)


def analyse_class(maps: np.ndarray, config: StrategyConfig = StrategyConfig()) -> ClassStrategies:
    """SpRAy on one class's maps (N, H, W) (raw, any sign; NaN rows = null maps): steps 1-6 of
    the module docstring. Raises ValueError when fewer than ``config.min_class_rows`` maps are
    usable."""
    shares, valid = preprocess(maps, config.grid)
    n = len(shares)
    if n < config.min_class_rows:
        raise ValueError(f"{n} usable maps, fewer than min_class_rows={config.min_class_rows}")
    from threadpoolctl import threadpool_limits

    x = shares.reshape(n, -1)
    with threadpool_limits(limits=config.threads):
        lam, vec = spectrum(knn_affinity(x, config.k), config.eigenvalues, config.seed)
        c, gap = eigengap(lam, config.max_strategies)
        labels = kmeans(row_normalise(vec[:, :c]), c, config.seed)
        strategy = np.full(len(valid), -1, dtype=np.int64)
        strategy[valid] = labels
        embed = np.full((len(valid), 2), np.nan, dtype=np.float32)
        if config.embed:
            embed[valid] = tsne_2d(row_normalise(vec), config.seed)
    return ClassStrategies(valid, strategy, embed, lam, c, gap, shares)


def concentration(m: np.ndarray, top: float = CONCENTRATION_TOP) -> float:
    """Share of a map's (g, g) mass (``|m|``) in its ``ceil(top * g*g)`` largest cells, in
    [top, 1] for a map spread evenly ... all in one cell; NaN for an all-zero map."""
    v = np.sort(np.abs(np.asarray(m, dtype=np.float64)).ravel())[::-1]
    total = v.sum()
    if not total > 0:
        return math.nan
    return float(v[: max(1, math.ceil(top * v.size))].sum() / total)


def border_share(m: np.ndarray) -> float:
    """``xai_workers.stats.border_frac`` of one map (g, g) (outer 10% of each side)."""
    import torch

    from xai_workers.stats import border_frac

    return float(border_frac(torch.from_numpy(np.abs(np.asarray(m, dtype=np.float64)))))


def exclusive_shares(means: np.ndarray, sizes: np.ndarray, ratio: float = FLAG_RATIO) -> np.ndarray:
    """For each strategy s of a class (``means`` (c, g, g) mean share maps, ``sizes`` (c,)):
    the share of its mass in cells where its mean share is at least ``ratio`` times the
    size-weighted mean share map of the class's other strategies. float64 (c,); NaN when c = 1.

    A mean, not a median over the other strategies: a shortcut that the eigengap splits over two
    strategies still stands out against the rest of the class as long as it is not most of the
    rest, whereas a median flags the object strategy once the shortcut strategies outnumber it
    (in the demo: the digit strategy 0.68 "exclusive" against a median). Requiring also that the
    rest look little there (below the uniform share) lost split shortcuts (both halves see the
    watermark, so the rest does too) and was dropped."""
    means = np.asarray(means, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    c = len(means)
    out = np.full(c, np.nan)
    if c < 2:
        return out
    for s in range(c):
        w = sizes.copy()
        w[s] = 0.0
        rest = np.tensordot(w / w.sum(), means, axes=1)
        own = means[s] >= ratio * rest
        total = means[s].sum()
        out[s] = float(means[s][own].sum() / total) if total > 0 else np.nan
    return out


def shortcut_flags(
    means: np.ndarray,
    sizes: np.ndarray,
    ratio: float = FLAG_RATIO,
    exclusive: float = FLAG_EXCLUSIVE,
    min_size: int = FLAG_MIN_SIZE,
    min_share: float = FLAG_MIN_SHARE,
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """``(exclusive_share, flagged, reason)`` per strategy (docs/conventions.md): a strategy is a
    shortcut candidate when ``exclusive_share >= exclusive``, it has ``>= min_size`` rows and
    ``>= min_share`` of the class, and its ``exclusive_share`` is the largest of the class's
    strategies that qualify (at most one flag per class and method);
    ``reason`` says where its own mass lies and how much, None when not flagged."""
    ex = exclusive_shares(means, sizes, ratio)
    sizes = np.asarray(sizes)
    eligible = (
        np.isfinite(ex)
        & (np.nan_to_num(ex) >= exclusive)
        & (sizes >= min_size)
        & (sizes >= min_share * sizes.sum())
    )
    flagged = np.zeros(len(ex), dtype=bool)
    reasons: list[str | None] = [None] * len(ex)
    if eligible.any():
        s = int(np.argmax(np.where(eligible, ex, -np.inf)))
        flagged[s] = True
        reasons[s] = (
            f"{ex[s]:.0%} of its mean map's mass lies in cells ({_where(means[s])}) where"
            f" it is >= {ratio:g}x the class's other strategies'"
        )
    return ex, flagged, reasons


def _where(m: np.ndarray) -> str:
    """Where a strategy's densest own cell lies, in words (``top-left``, ``centre``, ...)."""
    g = m.shape[0]
    i, j = np.unravel_index(int(np.argmax(m)), m.shape)
    third = lambda v: ("top", "middle", "bottom")[min(2, 3 * v // g)]  # noqa: E731
    col = ("left", "centre", "right")[min(2, 3 * j // m.shape[1])]
    row = third(i)
    return "centre" if (row, col) == ("middle", "centre") else f"{row}-{col}".replace("middle-", "")


def label_purity(labels: np.ndarray) -> tuple[float, int | None, int]:
    """``(purity, majority, labelled)`` of a strategy's labels (n,) (negative = no label): the
    share of labelled rows carrying the most common label, that label, and how many rows are
    labelled; ``(nan, None, 0)`` when none is."""
    lab = np.asarray(labels)
    lab = lab[lab >= 0]
    if len(lab) == 0:
        return math.nan, None, 0
    vals, counts = np.unique(lab, return_counts=True)
    i = int(np.argmax(counts))
    return float(counts[i] / len(lab)), int(vals[i]), int(len(lab))


def strategy_stats(result: ClassStrategies, labels: np.ndarray | None = None) -> list[dict]:
    """One dict per strategy (0..c-1) of a class's result: ``strategy``, ``size``, ``share`` (of
    the class's analysed rows), ``mean_map`` float32 (g, g) (mean of the members' share maps,
    sums to 1), ``border_share``, ``concentration``, ``exclusive_share``, ``flagged``, ``reason``,
    and with ``labels`` (N,) int (negative = none) ``label_purity``, ``label_majority``,
    ``labelled``."""
    lab = result.strategy[result.valid]
    c = result.n_strategies
    sizes = np.bincount(lab, minlength=c)
    means = np.stack([result.maps[lab == s].mean(axis=0) for s in range(c)])
    ex, flagged, reasons = shortcut_flags(means, sizes)
    valid_labels = None if labels is None else np.asarray(labels)[result.valid]
    out = []
    for s in range(c):
        row = {
            "strategy": s,
            "size": int(sizes[s]),
            "share": float(sizes[s] / sizes.sum()),
            "mean_map": means[s].astype(np.float32),
            "border_share": border_share(means[s]),
            "concentration": concentration(means[s]),
            "exclusive_share": float(ex[s]),
            "flagged": bool(flagged[s]),
            "reason": reasons[s],
        }
        if valid_labels is not None:
            p, maj, n = label_purity(valid_labels[lab == s])
            row.update(label_purity=p, label_majority=maj, labelled=n)
        else:
            row.update(label_purity=math.nan, label_majority=None, labelled=0)
        out.append(row)
    return out
