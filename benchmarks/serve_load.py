"""`finderpartner serve` under load: p50/p99 latency of text queries over loopback, text encoder included.

For each store, the real server is started (`finderpartner serve --port 0`, its own process), warmed up, then a
bounded load generator (asyncio + httpx) sends exactly ``--requests`` text queries at each ``--concurrency``
(each worker sends its next query as soon as its last one is answered: a closed loop, so the server is never
asked for more than it can take and the latency is the service's own). Every query text is different (no cache
can help). Reported per store and concurrency: p50/p90/p99/max latency, throughput, the client's non-200 count and
the server's own error count (its /healthz `errors.server`, which must stay 0), and the server's exit code after
SIGTERM (130: stopped cleanly).

The model defaults to a random-weight ViT-B/32 (arch:ViT-B-32: the real text encoder's cost, 12 layers x 512,
77 tokens; no download); ``--text-tower minilm`` takes the towers preset's pretrained MiniLM-L6 instead. Stores:

- ``--index LOCATION``: an existing store. A FAISS store made for another model (search_scale.py's synthetic 1M
  store) is served through ``--adopt``: a folder beside it whose manifest names this model and whose segments and
  base index are the original's (symlinks; meta.sqlite copied): the original is not touched.
- ``--make faiss:N`` / ``--make milvus:N``: a synthetic clustered store of N vectors (dim = the model's),
  made once in ``--work`` and reused.

    python benchmarks/serve_load.py --make faiss:20000 --make milvus:20000 --requests 200     # a quick look
    nice -n 10 python benchmarks/search_scale.py --out /tmp/store-1m                    # the 1M store
    python benchmarks/serve_load.py --index /tmp/store-1m --adopt --requests 2000       # alone, 2 cores
    python benchmarks/serve_load.py --index /tmp/store-1m --adopt --encoder torch onnx:int8   # the text encoders
    python benchmarks/serve_load.py --index /tmp/store-1m --adopt --encoder torch onnx:int8 --text-tower minilm

``--encoder onnx:int8`` serves the model's ONNX export (made once, `finderpartner export --int8`) with
`serve --backend onnx`: the query text is embedded by onnxruntime, the store is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "grey", "brown", "teal"]
THINGS = ["dog", "cat", "bicycle", "beach", "mountain", "birthday cake", "car", "bridge", "child", "garden", "boat"]
PLACES = ["in Paris", "at night", "in the snow", "on a sunny day", "near the sea", "in a kitchen", "in a forest"]
CITIES = ["Paris", "Lyon", "Berlin", "Rome", "Madrid", "Oslo", "Lisbon", "Vienna", "Prague", "Athens"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model folder (default: one made once in --work, see --text-tower)")
    p.add_argument(
        "--text-tower",
        choices=["vit-b-32", "minilm"],
        default="vit-b-32",
        help="without --model: a random-weight ViT-B/32 (CLIP's text tower, 12 x 512), or the towers preset's "
        "all-MiniLM-L6-v2 (pretrained, 6 x 384; tiny ViT) with a 512-d projection",
    )
    p.add_argument("--index", action="append", default=[], help="an existing store (repeatable)")
    p.add_argument("--adopt", action="store_true", help="serve a FAISS store of another model through a view")
    p.add_argument("--make", action="append", default=[], help="faiss:N or milvus:N synthetic store (repeatable)")
    p.add_argument("--requests", type=int, default=400, help="timed requests at each concurrency")
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--where", default=None, help="a filter sent with every query (synthetic stores: city, year)")
    p.add_argument("--work", type=Path, default=common.CACHE_DIR / "serve_load")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for finderpartner serve")
    p.add_argument(
        "--encoder",
        nargs="+",
        default=["torch"],
        choices=["torch", "onnx:fp32", "onnx:int8"],
        help="how the server embeds the query text, each measured in turn: the PyTorch model, or its ONNX export "
        "(made once in --work with `finderpartner export --int8`) through `serve --backend onnx`",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/serve_load.json)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ model, stores


def model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    out = args.work / ("model-vit-b-32" if args.text_tower == "vit-b-32" else "model-minilm-512")
    if not (out / "config.json").is_file():
        from finderpartner.config import TinySpec, TowersConfig
        from finderpartner.model import build_arch, build_towers

        print(f"making a {args.text_tower} model in {out}", flush=True)
        if args.text_tower == "vit-b-32":
            build_arch("ViT-B-32").save(out)
        else:
            build_towers(TowersConfig(projection_dim=512), TinySpec()).save(out)
    return out


def model_facts(path: Path) -> tuple[str, int]:
    import torch

    from finderpartner.embedding import Searcher
    from finderpartner.model import load_model

    searcher = Searcher(load_model(path), device=torch.device("cpu"))
    return searcher.fingerprint, int(searcher.encoder.embed_dim)


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 500) -> np.ndarray:
    """Unit vectors in clusters inside a cone (CLIP-like: not uniform noise), made 100k at a time."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(dim)
    centroids = 0.6 * mean / np.linalg.norm(mean) + 0.8 * _unit(rng.standard_normal((clusters, dim)))
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        points = centroids[rng.integers(0, clusters, m)] + rng.standard_normal((m, dim)) / math.sqrt(dim)
        out[s : s + m] = _unit(points)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_store(spec: str, work: Path, fingerprint: str, dim: int) -> tuple[str, dict[str, Any]]:
    from finderpartner.search import PhotoRow

    kind, _, size = spec.partition(":")
    n = int(size)
    if kind not in ("faiss", "milvus"):
        raise SystemExit(f"--make {spec}: faiss:N or milvus:N")
    tag = f"{kind}-{n}-{fingerprint[:12]}"
    done = work / f"{tag}.done.json"
    location = str(work / tag) if kind == "faiss" else f"milvus:{work / tag}.db"
    if done.is_file():
        return location, json.loads(done.read_text())
    vectors = clustered(n, dim)
    rng = np.random.default_rng(1)
    cities, years = rng.integers(0, len(CITIES), n), rng.integers(2000, 2026, n)
    rows = [
        PhotoRow(f"img/{i:08d}.jpg", attributes={"city": CITIES[cities[i]], "year": int(years[i])}) for i in range(n)
    ]
    start = time.perf_counter()
    if kind == "faiss":
        from finderpartner.search.faiss_store import FaissStore

        shutil.rmtree(location, ignore_errors=True)
        with FaissStore.create(Path(location), dim=dim, fingerprint=fingerprint, model="serve_load.py") as store:
            for s in range(0, n, 100_000):
                store.add(rows[s : s + 100_000], vectors[s : s + 100_000])
            store.compact()
            info = store.describe()
    else:
        from finderpartner.search.milvus_store import MilvusStore

        for leftover in work.glob(f"{tag}.db*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        nlist = int(min(4096, max(16, 4 * math.sqrt(n))))
        with MilvusStore.create(
            location,
            dim=dim,
            fingerprint=fingerprint,
            model="serve_load.py",
            columns={"city": "text", "year": "integer"},
            index_type="IVF_FLAT" if n >= 50_000 else "FLAT",
            index_params={"nlist": nlist} if n >= 50_000 else {},
        ) as store:
            for s in range(0, n, 20_000):
                store.add(rows[s : s + 20_000], vectors[s : s + 20_000], check_paths=False)  # new, distinct paths
            store.compact()
            info = {"live": store.count(), "index": "IVF_FLAT" if n >= 50_000 else "FLAT", "nlist": nlist}
    info = {**info, "build_s": round(time.perf_counter() - start, 1), "n": n}
    done.write_text(json.dumps(common._jsonable(info)))
    return location, info


def adopt(store: Path, work: Path, fingerprint: str) -> str:
    """A view of a FAISS store that names this model: the manifest rewritten, the big files the original's."""
    manifest = json.loads((store / "manifest.json").read_text())
    if manifest["fingerprint"] == fingerprint:
        return str(store)
    view = work / f"view-{store.name}-{fingerprint[:12]}"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for name in ("segments", "ann"):
        (view / name).symlink_to((store / name).resolve(), target_is_directory=True)
    for name in ("meta.sqlite", "meta.sqlite-wal", ".finderpartner.json"):
        if (store / name).exists():
            shutil.copy2(store / name, view / name)
    manifest.update(fingerprint=fingerprint, model=f"adopted by serve_load.py from {manifest.get('model')}")
    (view / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return str(view)


# ------------------------------------------------------------------------------------------------ the server


def exported(model: Path, work: Path, fingerprint: str) -> Path:
    """The model's ONNX export (fp32 and int8), made once in ``work``."""
    out = work / f"export-{model.name}-{fingerprint[:12]}"
    if not (out / "finderpartner_export.json").is_file():
        print(f"exporting {model} to ONNX (fp32 and int8) in {out}", flush=True)
        command = [sys.executable, "-m", "finderpartner.cli", "export", "--model", str(model), "--out", str(out)]
        subprocess.run([*command, "--int8"], env=common.child_env(), check=True)
    return out


class Server:
    def __init__(self, model: Path, store: str, extra: list[str]) -> None:
        command = [sys.executable, "-m", "finderpartner.cli", "serve", "--model", str(model), "--index", store]
        self.proc = subprocess.Popen(
            [*command, "--port", "0", *extra],
            env=common.child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()  # type: ignore[arg-type]
        self.url = self._listening()

    def _listening(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.search(r" on (http://\S+) \(", line)
            if m:
                return m.group(1)
        self.proc.wait()
        raise SystemExit(f"serve exited with {self.proc.returncode}:\n{''.join(self.err)[-3000:]}")

    def cpu_s(self) -> float:
        """The server process's CPU seconds so far (user + system, all its threads): a figure that other jobs on
        the machine do not inflate, unlike wall-clock latency."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def query_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"a {COLORS[rng.integers(len(COLORS))]} {THINGS[rng.integers(len(THINGS))]} "
        f"{PLACES[rng.integers(len(PLACES))]} #{seed}-{i}"
        for i in range(n)
    ]


async def load(url: str, texts: list[str], concurrency: int, k: int, where: str | None) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    failures: dict[str, int] = {}
    queue = iter(texts)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: Any) -> None:
        for text in queue:
            body = {"text": text, "k": k, **({"where": where} if where else {})}
            start = time.perf_counter()
            try:
                r = await client.post("/search", json=body)
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            latencies.append(time.perf_counter() - start)
            if status != "200":
                failures[status] = failures.get(status, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "per_s": len(latencies) / wall,
        "client_failures": failures,
    }


def health(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/healthz", timeout=60).json()


def bench_store(model: Path, store: str, args: argparse.Namespace, seed: int, encoder: str) -> dict[str, Any]:
    backend = ["--backend", "onnx", "--onnx-variant", encoder.split(":")[1]] if encoder.startswith("onnx") else []
    server = Server(model, store, [*backend, *args.serve_arg])
    try:
        before = health(server.url)
        asyncio.run(load(server.url, query_texts(args.warmup, seed + 1000), 2, args.k, args.where))
        runs = []
        for c in args.concurrency:
            load_avg, cpu = os.getloadavg()[0], server.cpu_s()
            run = asyncio.run(load(server.url, query_texts(args.requests, seed + c), c, args.k, args.where))
            run["server_cpu_ms_per_request"] = (server.cpu_s() - cpu) * 1000 / run["requests"]
            run["load_avg_1m_before"] = load_avg
            runs.append(run)
            print(
                f"  c={c}: p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, {run['per_s']:.1f} req/s, "
                f"server CPU {run['server_cpu_ms_per_request']:.1f} ms/request, failures {run['client_failures'] or 0}, "
                f"load avg {load_avg:.1f}",
                flush=True,
            )
        after = health(server.url)
    finally:
        code = server.stop()
    return {
        "store": store,
        "encoder": encoder,
        "backend": after.get("backend"),
        "count": after.get("count"),
        "runs": runs,
        "server_errors": after["errors"]["server"] - before["errors"]["server"],
        "server_client_errors": after["errors"]["client"] - before["errors"]["client"],
        "exit_code_after_sigterm": code,
        "traceback_in_log": "Traceback" in "".join(server.err),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.index and not args.make:
        args.make = ["faiss:20000", "milvus:20000"]
    args.work.mkdir(parents=True, exist_ok=True)
    print(common.machine_line(), flush=True)
    model = model_dir(args)
    fingerprint, dim = model_facts(model)
    stores: list[tuple[str, dict[str, Any]]] = []
    for location in args.index:
        if args.adopt and not location.startswith("milvus:"):
            location = adopt(Path(location), args.work, fingerprint)
        stores.append((location, {}))
    for spec in args.make:
        print(f"store {spec}: making (once, reused from {args.work})", flush=True)
        stores.append(make_store(spec, args.work, fingerprint, dim))
    results = []
    for i, (location, info) in enumerate(stores):
        for encoder in args.encoder:
            print(f"serving {location}, text encoder {encoder}", flush=True)
            served = exported(model, args.work, fingerprint) if encoder.startswith("onnx") else model
            result = bench_store(served, location, args, seed=i, encoder=encoder)
            result["build"] = info
            results.append(result)
    rows = [
        [
            r["backend"],
            r["encoder"],
            r["count"],
            run["concurrency"],
            run["requests"],
            run["p50_ms"],
            run["p99_ms"],
            run["per_s"],
            run["server_cpu_ms_per_request"],
            sum(run["client_failures"].values()),
            r["server_errors"],
            r["exit_code_after_sigterm"],
        ]
        for r in results
        for run in r["runs"]
    ]
    headers = [
        "store",
        "encoder",
        "photos",
        "conc.",
        "requests",
        "p50 ms",
        "p99 ms",
        "req/s",
        "CPU ms/req",
        "failed",
        "server errors",
        "exit",
    ]
    print(common.table(headers, rows))
    common.save_results("serve_load", args, results)
    ok = all(r["server_errors"] == 0 and r["exit_code_after_sigterm"] == 130 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
