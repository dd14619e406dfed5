"""A million photos: the photo store (search/faiss_store.py) at 1M x 512 clustered vectors, exact vs approximate.

The vectors are a mixture, not uniform noise (uniform vectors on a 512-d sphere have no neighbours worth the
name and make every index look bad): ``--clusters`` centroids share a common direction (CLIP embeddings of one
modality sit in a narrow cone: cosine to the mean direction ~0.6), cluster sizes follow a Zipf law (a few big
themes, a long tail), and each point lies at cosine ~0.6-0.85 from its centroid (the spread drawn per cluster).
Queries come from the same mixture, held out (never added), shifted by a common offset (the text/image gap of
CLIP). Two query sets: one tunes nprobe at build time (the store does this), the other measures the recall.

Measured, for the exact index (IndexFlatIP) and the store's approximate base (ann.choose_factory under the
memory budget, nprobe tuned to recall@10 >= 0.95): build time, index bytes, recall@10 vs exact, p50/p99 of one
query at a time, and the same with a filter (10 % of the rows) answered inside the search. Also the flat p99 at
smaller sizes: the threshold below which the store stays exact (ann.FLAT_BELOW). Writes JSON to
benchmarks/results/search_scale.json and the table into benchmarks/README.md ("## Search at a million photos").

    nice -n 10 python benchmarks/search_scale.py --out /tmp/store-1m     # keeps the built 1M store
    python benchmarks/search_scale.py --n 100000 --queries 200                  # a quick look
    python benchmarks/search_scale.py --compare-codes                           # why SQ8/SQ4 and not SQ6

``--compare-codes`` measures only the choice of code (ann.choose_factory's order): one IVF coarse quantizer
trained once, then IVF-SQ8, SQ4 and SQ6 on it, each timed one query at a time at nprobe 16/32/64 with the exact
re-scoring of 4k and 8k candidates that the store does, recall@10 against exact search.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

README_SECTION = "## Search at a million photos"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the store")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries (each of the two sets)")
    p.add_argument("--timed", type=int, default=300, help="single queries timed per configuration")
    p.add_argument("--threshold-sizes", type=int, nargs="*", default=[25_000, 50_000, 100_000, 200_000])
    p.add_argument("--out", type=Path, default=None, help="keep the built store in this folder (else a temp)")
    p.add_argument("--json", type=Path, default=None, help="JSON results (default benchmarks/results/...)")
    p.add_argument("--no-readme", action="store_true", help="do not write the table into benchmarks/README.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS threads while timing single queries (1: a service runs one query per core; with 2 threads "
        "on a busy 2-core machine OpenMP's waiting dominates); building uses all cores",
    )
    p.add_argument("--compare-codes", action="store_true", help="time SQ8 / SQ4 / SQ6 on one coarse quantizer")
    return p.parse_args(argv)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Mixture:
    """The generator (module docstring). ``sample(n)`` gives (vectors, cluster labels)."""

    def __init__(self, dim: int, clusters: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.dim = dim
        mean = _unit(rng.standard_normal(dim))
        own = _unit(rng.standard_normal((clusters, dim)))
        self.centroids = _unit(0.6 * mean + 0.8 * own).astype(np.float32)
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.8  # Zipf-like sizes
        self.weights = weights / weights.sum()
        # noise norm per cluster: cos(point, centroid) = 1 / sqrt(1 + s^2) in 0.6..0.85
        self.spread = rng.uniform(0.62, 1.33, clusters).astype(np.float32)
        self.gap = _unit(rng.standard_normal(dim)).astype(np.float32)

    def sample(self, n: int, *, query: bool = False) -> np.ndarray:
        rng = self.rng
        out = np.empty((n, self.dim), np.float32)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            c = rng.choice(len(self.centroids), m, p=self.weights)
            noise = rng.standard_normal((m, self.dim), dtype=np.float32) / math.sqrt(self.dim)
            x = self.centroids[c] + noise * self.spread[c, None]
            if query:
                x = _unit(x) + 0.3 * self.gap
            out[s : s + m] = _unit(x)
        return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Any, queries: np.ndarray) -> dict[str, float]:
    fn(queries[:1])
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q[None])
        times.append(1000 * (time.perf_counter() - t0))
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    from finderpartner.search.ann import recall_at

    return round(recall_at(found, truth), 4)


def flat_threshold(x: np.ndarray, queries: np.ndarray, sizes: list[int]) -> list[dict[str, Any]]:
    import faiss

    rows = []
    for n in sizes:
        if n > len(x):
            continue
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x[:n])
        t = timed(lambda q, index=index: index.search(q, 10), queries[:200])
        rows.append({"n": n, **t})
        print(f"  flat at {n:>9,}: p50 {t['p50_ms']:.2f} ms  p99 {t['p99_ms']:.2f} ms", flush=True)
        del index
    return rows


def compare_codes(args: argparse.Namespace) -> int:
    """``--compare-codes`` (module docstring)."""
    import faiss

    from finderpartner.search import ann

    print(common.machine_line(), flush=True)
    mix = Mixture(args.dim, args.clusters, args.seed)
    x = mix.sample(args.n)
    mix.sample(args.queries, query=True)  # the tuning set of main(): the same held-out queries follow
    queries = mix.sample(min(args.queries, args.timed), query=True)
    truth = ann.exact_top(queries, x, np.arange(args.n, dtype=np.int64), 10)
    nlist = 2 ** round(math.log2(4 * math.sqrt(args.n)))
    quantizer = faiss.IndexFlatIP(args.dim)
    sample = x[np.random.default_rng(args.seed).choice(args.n, min(args.n, nlist * ann.TRAIN_PER_LIST), replace=False)]
    faiss.IndexIVFFlat(quantizer, args.dim, nlist, faiss.METRIC_INNER_PRODUCT).train(sample)  # trains the quantizer
    rows = []
    for code, kind in (("SQ8", "QT_8bit"), ("SQ4", "QT_4bit"), ("SQ6", "QT_6bit")):
        qtype = getattr(faiss.ScalarQuantizer, kind)
        index = faiss.IndexIVFScalarQuantizer(quantizer, args.dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)  # the coarse quantizer is trained: this trains the scalar quantizer only
        faiss.omp_set_num_threads(faiss.omp_get_max_threads())
        index.add(x)
        faiss.omp_set_num_threads(args.threads)
        for nprobe in (16, 32, 64):
            index.nprobe = nprobe
            for refine in (4, 8):
                found, times = [], []
                for q in queries:
                    t0 = time.perf_counter()
                    _, cand = index.search(q[None], 10 * refine)
                    cand = cand[0][cand[0] >= 0]
                    found.append(cand[np.argsort(-(x[cand] @ q))[:10]])  # the store's exact re-scoring
                    times.append(1000 * (time.perf_counter() - t0))
                rec = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
                p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
                rows.append([f"IVF{nlist},{code}", nprobe, refine, f"{rec:.3f}", f"{p50:.2f}", f"{p99:.2f}"])
                print(f"  {rows[-1]}", flush=True)
        del index
    print(common.table(["index", "nprobe", "re-scored x", "recall@10", "p50 ms", "p99 ms"], rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare_codes:
        return compare_codes(args)
    import faiss

    from finderpartner.search import ann
    from finderpartner.search.faiss_store import FaissStore
    from finderpartner.search.filters import parse
    from finderpartner.search.store import PhotoRow, SearchKnobs

    print(common.machine_line(), flush=True)
    results: dict[str, Any] = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "queries": args.queries}
    results["machine_line"], results["load_avg_start"] = common.machine_line(), round(os.getloadavg()[0], 1)
    t0 = time.perf_counter()
    mix = Mixture(args.dim, args.clusters, args.seed)
    x = mix.sample(args.n)
    tune_q = mix.sample(args.queries, query=True)
    test_q = mix.sample(args.queries, query=True)
    print(f"generated {args.n:,} x {args.dim} in {time.perf_counter() - t0:.0f} s; RSS {rss_mb():.0f} MB", flush=True)
    ids = np.arange(args.n, dtype=np.int64)
    truth = ann.exact_top(test_q, x, ids, 10)
    all_threads = faiss.omp_get_max_threads()

    print("exact (IndexFlatIP):", flush=True)
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    faiss.omp_set_num_threads(args.threads)
    exact = {
        "index": "Flat",
        "build_s": round(time.perf_counter() - t0, 2),
        "bytes": args.n * args.dim * 4,
        "recall_at_10": 1.0,
        **timed(lambda q, index=flat: index.search(q, 10), test_q[: args.timed]),
    }
    del flat
    print(f"  {exact}", flush=True)
    results["exact"] = exact
    results["flat_threshold"] = flat_threshold(x, test_q, args.threshold_sizes)

    out = args.out or Path(common.CACHE_DIR) / "search-scale-store"
    if out.exists() and args.out is None:
        shutil.rmtree(out)
    cities = [f"city{i:02d}" for i in range(10)]
    rng = np.random.default_rng(args.seed + 1)
    city_of = rng.integers(0, len(cities), args.n)
    age_of = rng.integers(18, 80, args.n)
    print(f"building the store at {out}", flush=True)
    t0 = time.perf_counter()
    store = FaissStore.create(
        out, dim=args.dim, fingerprint="benchmark-mixture", model="search_scale.py", overwrite=True
    )
    for s in range(0, args.n, 100_000):  # ten appended segments, as a growing gallery would have
        e = min(args.n, s + 100_000)
        rows = [
            PhotoRow(f"/photos/{i:07d}.jpg", 0, 0, {"city": cities[city_of[i]], "age": int(age_of[i])})
            for i in range(s, e)
        ]
        store.add(rows, x[s:e])
    add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(all_threads)
    stats = store.compact(queries=tune_q)
    faiss.omp_set_num_threads(args.threads)
    compact_s = time.perf_counter() - t0
    info = store.manifest["base"]["info"]
    print(f"  added in {add_s:.0f} s, compacted in {compact_s:.0f} s: {info}", flush=True)
    knobs = SearchKnobs()
    _, found = store.search_ids(test_q, 10, None, knobs)
    approx = {
        "index": info["factory"],
        "nprobe": info["nprobe"],
        "refine": info.get("refine"),
        "add_s": round(add_s, 1),
        "build_s": round(compact_s, 1),
        "bytes": info["bytes"],
        "bytes_vs_flat": round(info["bytes"] / (args.n * args.dim * 4), 4),
        "recall_at_10_tuning_queries": info["recall_at_10"],
        "recall_at_10": recall(found, truth),
        "recall_by_nprobe": info["recall_by_nprobe"],
        **timed(lambda q: store.search_ids(q, 10, None, knobs), test_q[: args.timed]),
        "with_metadata": timed(lambda q: store.search(q, 10), test_q[: args.timed]),
        "live": stats.live,
    }
    print(f"  {approx}", flush=True)
    results["approximate"] = approx

    where = parse("city = 'city03'", store.columns())
    subset = np.flatnonzero(city_of == 3)
    sub_truth = ann.exact_top(test_q, x[subset], subset.astype(np.int64), 10)
    _, found = store.search_ids(test_q, 10, where, knobs)
    results["filtered"] = {
        "where": "city = 'city03'",
        "rows": int(len(subset)),
        "recall_at_10_vs_subset_exact": recall(found, sub_truth),
        **timed(lambda q: store.search_ids(q, 10, where, knobs), test_q[: args.timed]),
    }
    narrow = parse("city = 'city03' and age between 30 and 31", store.columns())
    sel = subset[(age_of[subset] >= 30) & (age_of[subset] <= 31)]
    sub_truth = ann.exact_top(test_q, x[sel], sel.astype(np.int64), 10)
    _, found = store.search_ids(test_q, 10, narrow, knobs)
    results["filtered_narrow"] = {
        "where": "city = 'city03' and age between 30 and 31",
        "rows": int(len(sel)),
        "recall_at_10_vs_subset_exact": recall(found, sub_truth),
        **timed(lambda q: store.search_ids(q, 10, narrow, knobs), test_q[: args.timed]),
    }
    print(f"  filtered: {results['filtered']}\n  narrow: {results['filtered_narrow']}", flush=True)
    store.close()
    del x
    results["rss_mb"] = round(rss_mb(), 0)
    results["peak_rss_mb"] = round(peak_rss_mb(), 0)
    results["store_on_disk_mb"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 0)
    results["store"] = str(out) if args.out else None
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    args.out = args.json
    common.save_results("search_scale", args, results)
    text = markdown(results)
    print(text)
    if not args.no_readme:
        write_section(text)
    return 0


def markdown(r: dict[str, Any]) -> str:
    e, a, f, fn = r["exact"], r["approximate"], r["filtered"], r["filtered_narrow"]
    mb = 2**20
    lines = [
        README_SECTION,
        "",
        f"benchmarks/search_scale.py, {r['n']:,} x {r['dim']} clustered vectors ({r['clusters']} clusters, module "
        f"docstring), recall@10 vs exact on {r.get('queries', 1000):,} held-out queries (not the ones nprobe was tuned on), one query at "
        f"a time, FAISS on 1 thread. {r.get('machine_line', 'machine: unknown')}; load average "
        f"{r.get('load_avg_start', '?')} at the start (latencies are worth comparing only from a run alone).",
        "",
        "| index | build | index bytes | vs flat | recall@10 | p50 | p99 |",
        "|---|---|---|---|---|---|---|",
        f"| exact (IndexFlatIP) | {e['build_s']:.1f} s | {e['bytes'] / mb:,.0f} MB | 1 | 1.000 | "
        f"{e['p50_ms']:.1f} ms | {e['p99_ms']:.1f} ms |",
        f"| {a['index']}, nprobe {a['nprobe']}, re-scored x{a['refine']} | {a['build_s']:.0f} s (+ {a['add_s']:.0f} s add) | "
        f"{a['bytes'] / mb:,.0f} MB | {a['bytes_vs_flat']:.3f} | {a['recall_at_10']:.3f} | {a['p50_ms']:.2f} ms | "
        f"{a['p99_ms']:.2f} ms |",
        f"| same, `{f['where']}` ({f['rows']:,} rows) | | | | {f['recall_at_10_vs_subset_exact']:.3f} | "
        f"{f['p50_ms']:.2f} ms | {f['p99_ms']:.2f} ms |",
        f"| same, `{fn['where']}` ({fn['rows']:,} rows: exact over the subset) | | | | "
        f"{fn['recall_at_10_vs_subset_exact']:.3f} | {fn['p50_ms']:.2f} ms | {fn['p99_ms']:.2f} ms |",
        "",
        f"With the metadata (SQLite rows of the hits): p50 {a['with_metadata']['p50_ms']:.2f} ms, p99 "
        f"{a['with_metadata']['p99_ms']:.2f} ms. nprobe vs recall@10 (tuning queries): "
        + ", ".join(f"{k}: {v}" for k, v in a["recall_by_nprobe"].items())
        + f". Process RSS at the end {r['rss_mb']:,.0f} MB, peak {r['peak_rss_mb']:,.0f} MB (the benchmark holds "
        f"the float32 vectors and the ground truth too); the store on disk {r['store_on_disk_mb']:,.0f} MB.",
        "",
        "Exact p99 by size (where the store switches to the approximate index, ann.FLAT_BELOW): "
        + ", ".join(f"{t['n']:,}: {t['p99_ms']:.1f} ms" for t in r["flat_threshold"])
        + ".",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    readme = common.BENCH_DIR / "README.md"
    content = readme.read_text(encoding="utf-8")
    start = content.find(README_SECTION)
    if start >= 0:
        end = content.find("\n## ", start + len(README_SECTION))
        content = content[:start] + text + (content[end + 1 :] if end >= 0 else "")
    else:
        content = content.rstrip("\n") + "\n\n" + text
    readme.write_text(content, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
