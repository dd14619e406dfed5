"""serve: the HTTP search service for apps (serve.py), over a store folder or a Milvus collection."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import signals
from ..errors import INTERRUPTED, UsageError
from .common import PORT, add_backend_args, add_trust_pickle, new_command
from .search import _searcher


def add_serve_command(sub: Any) -> None:
    p = new_command(
        sub,
        "serve",
        "HTTP search service for apps: POST /search (text or image, k, filter), GET /healthz, docs at /docs",
        description="""
Serve a photo store over HTTP (FastAPI + uvicorn): POST /search takes JSON {"text", "k", "where"} or a
multipart image upload and answers the best hits with scores and attributes; GET /healthz tells the model, the
store, its count and generation; /docs is the OpenAPI page. The model and store are loaded once; an update of
the store on disk (finderpartner index) is swapped in without refusing a query. Binds 127.0.0.1 unless --host
says otherwise; with a token (--token-file, or $FINDERPARTNER_SERVE_TOKEN) every search needs
`Authorization: Bearer <token>`. SIGTERM or Ctrl-C finishes the requests in flight, then stops (exit 130).""",
        examples="""
finderpartner serve --model outputs/clip_tiny/best_model --index photos_index
finderpartner serve --model outputs/clip_tiny/best_model --index milvus:photos.db --port 8080
finderpartner serve --backend onnx --model exports/clip --index photos_index --host 0.0.0.0 --token-file token.txt""",
        notes="""docs/serve.md has curl examples, the limits, how reloading works and how to point it at a Milvus cluster.""",
    )
    p.add_argument("--model", required=True, help="saved model folder, hub id, or (with --backend onnx) an export")
    add_trust_pickle(p)
    p.add_argument(
        "--index",
        required=True,
        help="the store: a folder made by `finderpartner index`, or milvus:FILE.db / milvus:http://host:19530[#name]",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=PORT, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--token-file", help="file whose first line is the bearer token (else $FINDERPARTNER_SERVE_TOKEN)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default: 10 MB)")
    p.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest uploaded image, width x height (default: 40M)"
    )
    p.add_argument("--max-k", type=int, default=100, help="most hits a request may ask for (default: 100)")
    p.add_argument(
        "--reload-interval", type=float, default=1.0, help="seconds between checks for a new store version (0: never)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--max-batch", type=int, default=32, help="queries encoded together when they arrive at once")
    p.add_argument("--search-threads", type=int, default=1, help="FAISS threads (default 1: the model has the cores)")
    add_backend_args(p)
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ..search.backends import open_store, store_version
    from ..serve import LiveStore, SearchService, ServeSettings, read_token, run

    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-pixels", args.max_pixels)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive (got {value})")
    if args.max_k < 1 or args.max_batch < 1:
        raise UsageError("--max-k and --max-batch must be at least 1")
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        token=read_token(args.token_file, dict(os.environ)),
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_k=args.max_k,
        max_batch=args.max_batch,
        search_threads=args.search_threads,
        reload_interval_s=args.reload_interval,
    )
    args.batch_size, args.workers = args.max_batch, 0  # an upload is one image: no decoding processes
    args.serving = True  # onnxruntime's threads do not busy-wait between queries
    searcher = _searcher(args)
    fingerprint = searcher.fingerprint
    live = LiveStore(lambda: open_store(args.index, fingerprint=fingerprint), store_version(args.index), fingerprint)
    service = SearchService(searcher, live, settings, model=str(args.model), store=str(args.index))
    try:
        run(service, log_level="info" if args.verbose else "warning", announce=lambda line: print(line, flush=True))
    except KeyboardInterrupt:  # uvicorn re-raises the signal it stopped for, once the requests in flight are done
        pass
    finally:
        service.close()
    if signals.received():
        print(f"serve stopped by {signals.received()}: the requests in flight were answered", file=sys.stderr)
        return INTERRUPTED
    return 0
