"""The command-line side of the photo store: `finderpartner index [remove|compact]` and `search` on a store.
cli.py parses the arguments and calls these (it turns their exceptions into exit codes)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..processes import world
from .backends import open_store
from .faiss_store import FaissStore
from .filters import parse
from .indexing import index_photos
from .searcher import PhotoSearcher
from .store import SearchKnobs, nothing_removed

log = logging.getLogger(__name__)


def index_command(args: argparse.Namespace, make_embedder: Callable[[argparse.Namespace], Any]) -> int:
    action = args.action or "add"
    if action == "add":
        if not args.model:
            raise UsageError("index: --model is required to add photos (the model that embeds them)")
        if (args.images is None) == (getattr(args, "list", None) is None):
            raise UsageError("index: give the photos to add with --images DIR or --list FILE (CSV or JSONL)")
        if args.path or args.id or args.where:
            raise UsageError("--path/--id/--where select photos to remove: finderpartner index remove --out STORE ...")
        local = os.environ.get("LOCAL_RANK")
        if local is not None and torch.cuda.is_available() and torch.cuda.device_count() > int(local):
            torch.cuda.set_device(int(local))  # one GPU per launched process (device "auto" takes the current one)
        embedder = make_embedder(args)
        stats = index_photos(
            embedder,
            args.out,
            images=args.images,
            listing=args.list,
            attributes=args.attributes,
            overwrite=args.overwrite,
            model=args.model,
            chunk_size=8 * int(getattr(embedder, "batch_size", 64)),
        )
        if world()[0] == 0:
            for name, reason in stats.failed:
                shown = os.path.relpath(name, args.images) if args.images is not None else name
                log.warning("could not embed %s: %s", shown, reason)
            tail = " (base index built)" if stats.compacted else ""
            print(f"index {args.out}: {stats.live} images ({stats}){tail}")
        return 0
    if args.images is not None or getattr(args, "list", None) is not None or args.attributes is not None:
        raise UsageError(f"index {action} takes no --images/--list/--attributes")
    with FaissStore.open(args.out, writable=True) as store:
        if action == "remove":
            if not (args.path or args.id or args.where):
                raise UsageError("index remove: say what to remove with --path, --id or --where")
            where = parse(args.where, store.columns()) if args.where else None  # before anything changes
            paths = [str(Path(p).absolute()) for p in args.path or []]
            n = store.remove(ids=args.id or [], paths=paths, where=where)
            if n == 0:
                log.warning(nothing_removed(paths, args.id or [], args.where))
            print(
                f"removed {n} photo(s) from {args.out}: no search returns them from now on; "
                f"{store.count()} left (`finderpartner index compact --out {args.out}` drops them from disk)"
            )
            return 0
        stats = store.compact()
        info = store.manifest["base"]["info"]
        recall = f", recall@10 {info['recall_at_10']}" if info.get("recall_at_10") is not None else ""
        print(
            f"compacted {args.out}: {stats.live} photos, {stats.removed} removed photo(s) dropped, base index "
            f"{info['factory']}{recall}"
        )
    return 0


def knobs_from(args: argparse.Namespace) -> SearchKnobs:
    for flag in ("nprobe", "ef_search"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    return SearchKnobs(
        nprobe=getattr(args, "nprobe", None),
        ef_search=getattr(args, "ef_search", None),
        exact=bool(getattr(args, "exact", False)),
    )


def search_store(args: argparse.Namespace, embedder: Any) -> int:
    """`finderpartner search --index STORE`: the top-k photos, with --where and the knobs."""
    store = open_store(args.index)  # a store folder, or a Milvus collection (milvus:...: backends.py)
    try:
        searcher = PhotoSearcher(embedder, store, where=str(args.index))
        where = searcher.where(args.where)
        knobs = knobs_from(args)
        query = searcher.embed_query(prompt=args.prompt, image=args.image)
        hits = searcher.search(vector=query, k=args.top_k, where=where, knobs=knobs)
        what = args.prompt or str(args.image)
        if args.json:
            results = [
                {"rank": r + 1, "id": h.id, "path": h.path, "score": round(h.score, 6), **h.attributes}
                for r, h in enumerate(hits)
            ]
            print(json.dumps({"query": what, "where": args.where, "results": results}, indent=2))
        else:
            among = f" matching {args.where!r}" if args.where else ""
            print(f"top {len(hits)} of {store.count()} images{among} for {what!r}:")
            for r, h in enumerate(hits):
                attrs = ", ".join(f"{k}={v}" for k, v in h.attributes.items() if v is not None)
                print(f"{r + 1:>3}. {h.score:.4f}  {h.path}" + (f"  [{attrs}]" if attrs else ""))
    finally:
        store.close()
    return 0
