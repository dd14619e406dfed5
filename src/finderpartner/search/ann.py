"""The base index of a FAISS store: exact below a measured size, an IVF index under a memory budget above it.

The rule (benchmarks/search_scale.py measures it on the 2-core reference machine; docs/search.md has the figures):

* ``n < FLAT_BELOW``: ``IndexFlatIP`` (exact). Below this size one exact query scans few enough bytes to stay
  well under the 10 ms p99 goal, and no training is needed.
* above it: ``IVF{nlist},{code}`` with ``nlist`` the power of two nearest ``4 * sqrt(n)``, and ``code`` the first
  of SQ8, SQ4, PQ{d/4} whose bytes per vector (code + 8 bytes of id) fit the memory budget (default
  ``MEMORY_FRACTION`` = 1/4 of the flat float32 index). SQ6 is not among them: FAISS scans byte codes twice as fast
  as the others, and with the exact re-scoring of 8k candidates SQ4 matched SQ6's latency and recall in 2/3 of its
  memory (``search_scale.py --compare-codes``, 1M x 512, nprobe 32, one thread, one coarse quantizer, recall@10
  and p50 / p99: SQ8 x4 0.974, 2.8 / 4.1 ms; SQ4 x8 0.971, 4.8 / 8.7 ms; SQ6 x4 0.974, 5.5 / 8.9 ms). SQ8 needs
  520 B a vector at d = 512, just over 1/4 of 2048: a ``memory_fraction`` of 0.26 buys it. Stores built with SQ6
  still open.
  The index proposes ``REFINE * k`` candidates, which the store re-scores exactly from its stored vectors (on
  disk, memory-mapped: only the candidates' rows are read), so the coarser code costs little recall (SQ4 at
  nprobe 32: recall@10 0.953 with 4k candidates, 0.971 with 8k). ``nprobe`` is then tuned at build time: the
  smallest power of two whose recall@10 against exact search reaches ``RECALL_TARGET`` on held-out queries; the
  recall reached is stored in the manifest. (PQ is the last resort: at 1M x 512 its training took 10x SQ's on 2
  cores and its recall with the same re-scoring stayed under 0.9 in our measurement.)

Ids are the store's photo ids (``add_with_ids``; the flat index wrapped in ``IndexIDMap2``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FinderPartnerError

log = logging.getLogger(__name__)

# Measured alone on the 2-core reference machine (search_scale.py, dim 512, one FAISS thread): an exact query's
# p99 is 6.1 ms at 25k vectors and 14.2 ms at 50k, so the 10 ms goal holds up to ~35k; 30k keeps a margin
FLAT_BELOW = 30_000
MEMORY_FRACTION = 0.25
RECALL_TARGET = 0.95
# nprobe is tuned to the target plus this margin: the queries that tune it are a sample, and recall on other queries
# (the held-out check, a user's) scatters around it (1M benchmark: 0.950 on the tuning queries, 0.943 held out)
TUNE_MARGIN = 0.01
REFINE = 8  # an approximate index proposes 8k candidates, re-scored exactly from the stored vectors
HELD_OUT = 1000  # queries used to measure recall at build time
TRAIN_PER_LIST = 40  # training points per IVF list (FAISS warns below 39)
ID_BYTES = 8


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError:
        raise FinderPartnerError(
            "the photo store needs FAISS: pip install 'finderpartner[index]' (faiss-cpu)"
        ) from None
    return faiss


@dataclass
class AnnInfo:
    """What the manifest records about a base index."""

    factory: str
    count: int
    nprobe: int | None = None
    ef_search: int | None = None
    refine: int = 1
    recall_at_10: float | None = None  # vs exact, on held-out queries, at the chosen nprobe
    recall_by_nprobe: dict[str, float] = field(default_factory=dict)
    bytes: int = 0
    build_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AnnInfo:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def code_bytes(code: str, d: int) -> int:
    if code == "SQ8":
        return d
    if code == "SQ6":
        return math.ceil(d * 6 / 8)
    if code == "SQ4":
        return math.ceil(d / 2)
    if code.startswith("PQ"):
        m = int(code[2:].split("x")[0])
        return m
    raise ValueError(code)


def choose_factory(n: int, d: int, memory_fraction: float = MEMORY_FRACTION, flat_below: int = FLAT_BELOW) -> str:
    """The factory string for ``n`` vectors of dim ``d`` (module docstring: the rule)."""
    if n < flat_below:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    budget = memory_fraction * 4 * d  # bytes per vector
    pq = f"PQ{max(1, d // 4)}" if d % 4 == 0 else f"PQ{max(1, d // 8)}"
    for code in ("SQ8", "SQ4", pq):  # the fastest to scan (module docstring)
        if code_bytes(code, d) + ID_BYTES <= budget:
            return f"IVF{nlist},{code}"
    return f"IVF{nlist},PQ{max(1, d // 16)}"


def nlist_of(index: Any) -> int | None:
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else None


def build(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str,
    *,
    queries: np.ndarray | None = None,
    recall_target: float = RECALL_TARGET,
    refine: int = REFINE,
    seed: int = 0,
    threads: int | None = None,
) -> tuple[Any, AnnInfo]:
    """Build the base index over ``vectors`` (float32, L2-normalised) with ``ids``; for an approximate index,
    tune nprobe on ``queries`` (held-out: default, ``HELD_OUT`` stored vectors moved off themselves)."""
    faiss = faiss_module()
    if threads:
        faiss.omp_set_num_threads(threads)
    n, d = vectors.shape
    start = time.perf_counter()
    if factory == "Flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if n:
            index.add_with_ids(vectors, ids)
        info = AnnInfo(factory, n)
    else:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:  # HNSW and the like hold no ids of their own
            index = faiss.IndexIDMap2(index)
        rng = np.random.default_rng(seed)
        nlist = ivf.nlist if ivf is not None else 0
        n_train = min(n, max(TRAIN_PER_LIST * nlist, 10_000))
        train = vectors[np.sort(rng.choice(n, n_train, replace=False))] if n_train < n else vectors
        if ivf is not None:
            ivf.cp.niter = 10  # k-means iterations: 10 reach the same recall as 25 here, at 40 % of the cost
            ivf.cp.max_points_per_centroid = TRAIN_PER_LIST * 4
        index.train(np.ascontiguousarray(train))
        for s in range(0, n, 65536):  # in slices: no second full-size copy
            index.add_with_ids(vectors[s : s + 65536], ids[s : s + 65536])
        info = AnnInfo(factory, n, refine=refine)
        if queries is None:
            queries = perturbed_queries(vectors, min(HELD_OUT, n), rng)
        tune(index, vectors, ids, queries, info, recall_target)
    info.build_s = round(time.perf_counter() - start, 3)
    info.bytes = index_bytes(index)
    return index, info


def perturbed_queries(vectors: np.ndarray, m: int, rng: np.random.Generator, cos: float = 0.8) -> np.ndarray:
    """Held-out queries from stored vectors: each moved to cosine ``cos`` from a stored one (a query is near a
    photo, never a copy of it: a copy would be found by any index and inflate the recall)."""
    base = vectors[rng.choice(len(vectors), m, replace=False)].astype(np.float32)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base  # orthogonal to the photo
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    q = cos * base + math.sqrt(1 - cos * cos) * noise
    return np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)


def exact_top(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids of each query (ground truth), -1 padded."""
    faiss = faiss_module()
    _, rows = faiss.knn(np.ascontiguousarray(queries, np.float32), vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    return np.where(rows >= 0, ids[np.clip(rows, 0, None)], -1)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, sum(int((t >= 0).sum()) for t in truth[:, :k]))


def rescore(queries: np.ndarray, candidates: np.ndarray, vectors_of: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k among each query's candidate ids (-1 = none), with ``vectors_of(ids) -> (n, d)``."""
    nq, m = candidates.shape
    flat = candidates.ravel()
    valid = flat >= 0
    vec = np.zeros((len(flat), queries.shape[1]), np.float32)
    if valid.any():
        vec[valid] = vectors_of(flat[valid])
    scores = np.einsum("qmd,qd->qm", vec.reshape(nq, m, -1), queries)
    scores = np.where(candidates >= 0, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)


def tune(index: Any, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, info: AnnInfo, target: float) -> None:
    """The smallest nprobe (powers of two) reaching ``target`` (+ ``TUNE_MARGIN``) recall@10 with ``info.refine``
    re-scoring; the last tried when none does."""
    faiss = faiss_module()
    truth = exact_top(queries, vectors, ids, 10)
    order = np.argsort(ids)

    def vectors_of(wanted: np.ndarray) -> np.ndarray:
        return vectors[order[np.searchsorted(ids, wanted, sorter=order)]]

    def search() -> np.ndarray:
        _, found = index.search(queries, 10 * info.refine)
        return rescore(queries, found, vectors_of, 10)[1] if info.refine > 1 else found

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        info.recall_at_10 = round(recall_at(search(), truth), 4)
        return
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        r = recall_at(search(), truth)
        info.recall_by_nprobe[str(nprobe)] = round(r, 4)
        if r >= min(target + TUNE_MARGIN, 1.0) or nprobe >= ivf.nlist:
            break
        nprobe *= 2
    info.nprobe, info.recall_at_10 = nprobe, round(r, 4)
    if r < target:
        log.warning("the approximate index reaches recall@10 %.3f < %.2f even at nprobe %d", r, target, nprobe)


def index_bytes(index: Any) -> int:
    return int(faiss_module().serialize_index(index).size)


def search_params(index: Any, sel: Any, nprobe: int | None, ef_search: int | None) -> Any:
    """SearchParameters for this index with an id selector and the knobs (None: the built-in values)."""
    faiss = faiss_module()
    inner = index.index if isinstance(index, faiss.IndexIDMap) else index
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe if nprobe is not None else ivf.nprobe)
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(ef_search if ef_search is not None else inner.hnsw.efSearch)
    else:
        params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel
    return params
