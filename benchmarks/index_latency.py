"""Gallery search latency: ``GalleryIndex.search`` (exact FAISS inner-product index) at 10k and 100k vectors.

Random unit vectors (dim 512, the size of ViT-B/32 embeddings) stand in for a gallery; queries are other
random unit vectors. Reported per gallery size: build time, one query at a time (p50/p95 over ``--queries``
single searches) and a batch of ``--queries`` queries at once (per batch and per query), with a plain
numpy matrix product + argpartition as the baseline. The text encoder's time comes on top (export_latency.py).

    python benchmarks/index_latency.py
    python benchmarks/index_latency.py --sizes 10000 100000 1000000 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="gallery sizes (vectors)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200, help="single queries timed, and the batch size")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="FAISS/BLAS threads (default: FAISS's choice)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default benchmarks/results/index_latency.json)"
    )
    return p.parse_args(argv)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def numpy_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)


def per_query_ms(search: Any, queries: np.ndarray) -> list[float]:
    search(queries[:1])  # warm-up
    out = []
    for q in queries:
        t0 = time.perf_counter()
        search(q[None])
        out.append(1000 * (time.perf_counter() - t0))
    return out


def batch_ms(search: Any, queries: np.ndarray, repeats: int = 5) -> float:
    search(queries)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        search(queries)
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


def measure(size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    from finderpartner.data.files import FileStamp
    from finderpartner.index import GalleryIndex

    vectors = unit_vectors(size, args.dim, seed=0)
    queries = unit_vectors(args.queries, args.dim, seed=1)
    t0 = time.perf_counter()
    index = GalleryIndex(
        Path("/gallery"), "bench", [f"{i:07d}.jpg" for i in range(size)], [FileStamp(0, 0)] * size, vectors
    )
    index.faiss_index  # noqa: B018  (builds it)
    build_s = time.perf_counter() - t0
    hits = index.search(queries[:5], args.k)
    expected = numpy_search(vectors, queries[:5], args.k)
    assert [[h.path.name for h in row] for row in hits] == [[index.files[i] for i in row] for row in expected]
    rows = []
    for name, search in (
        ("GalleryIndex.search (faiss flat)", lambda q: index.search(q, args.k)),
        ("numpy matmul + argpartition", lambda q: numpy_search(vectors, q, args.k)),
    ):
        single = per_query_ms(search, queries)
        batched = batch_ms(search, queries)
        rows.append(
            {
                "size": size,
                "method": name,
                "build_s": build_s if "faiss" in name else 0.0,
                "single_p50_ms": float(np.median(single)),
                "single_p95_ms": float(np.percentile(single, 95)),
                "batch_ms": batched,
                "batch_per_query_ms": batched / len(queries),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(common.machine_line(), flush=True)
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    rows = [r for size in args.sizes for r in measure(size, args)]
    print(f"gallery search latency, dim {args.dim}, top-{args.k}, {args.queries} queries:\n")
    print(
        common.table(
            [
                "vectors",
                "method",
                "build s",
                "1 query p50 ms",
                "1 query p95 ms",
                f"batch of {args.queries} ms",
                "per query in batch ms",
            ],
            [
                [
                    r["size"],
                    r["method"],
                    r["build_s"],
                    r["single_p50_ms"],
                    r["single_p95_ms"],
                    r["batch_ms"],
                    r["batch_per_query_ms"],
                ]
                for r in rows
            ],
        )
    )
    out = common.write_json(
        args.out or common.default_out("index_latency"),
        {"machine": common.machine_info(), "args": vars(args), "rows": rows},
    )
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
