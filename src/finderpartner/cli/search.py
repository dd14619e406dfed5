"""index, search and demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .. import signals
from ..errors import (
    INTERRUPTED,
    DataError,
    UsageError,
)
from .common import (
    PORT,
    add_backend_args,
    add_runtime_args,
    add_trust_pickle,
    hidden_alias,
    load_for_inference,
    new_command,
    run_split,
)

log = logging.getLogger("finderpartner")


def add_index_command(sub: Any) -> None:
    p = new_command(
        sub,
        "index",
        "embed photos into a photo store (parallel, resumable); remove photos; compact",
        description="""
Embed every image under a folder (or listed in a CSV/JSONL) into a photo store: FAISS + SQLite, with
attribute columns for --where filters (docs/search.md). Run it again and only new and changed images are
embedded, appended without rewriting the index; under torchrun / accelerate launch (-m finderpartner.cli index ...)
each process embeds a share. Work is saved in parts as it goes: after Ctrl-C, SIGTERM or a crash the same command
continues. `index remove` hides photos from every search at once; `index compact` drops them from disk and
rebuilds the base index (exact for small stores, IVF with measured recall above).""",
        examples="""
finderpartner index --model outputs/clip_tiny/best_model --images photos --attributes people.csv --out store
finderpartner index remove --out store --where "city = 'Paris'"
finderpartner index compact --out store""",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["add", "remove", "compact"],
        default="add",
        help="add (default): embed photos; remove: hide photos now; compact: drop them, rebuild the index",
    )
    p.add_argument("--model", help="model folder (or export folder with --backend onnx); needed to add")
    add_trust_pickle(p)
    p.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--list", type=Path, help="CSV or JSONL naming the images (column path; other columns: attributes)")
    p.add_argument("--attributes", type=Path, help="CSV/JSONL: a file name column, then attribute columns")
    p.add_argument(
        "--out",
        "--store",
        dest="out",
        type=Path,
        required=True,
        help="photo store folder (new, or a store of the same model: photos are added), or a Milvus collection: "
        "milvus:FILE.db, milvus:http://host:19530[#name] (docs/serve.md)",
    )
    p.add_argument("--path", action="append", help="remove: this photo (repeatable)")
    p.add_argument("--id", action="append", type=int, help="remove: the photo with this id (repeatable)")
    p.add_argument("--where", help="remove: the photos matching this filter (docs/search.md: the grammar)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store of another model, or an index of an earlier version, at --out",
    )
    add_runtime_args(p)
    add_backend_args(p)
    p.set_defaults(handler=_index)


def add_search_command(sub: Any) -> None:
    p = new_command(
        sub,
        "search",
        "rank images by a text description (or by similarity to an image)",
        description="""
Rank a gallery's images by a text description (--prompt) or by similarity to an image (--image). The gallery
is an index made by `finderpartner index`, or a folder (whose index is kept in the cache and reused).""",
        examples="""
finderpartner search --model outputs/clip_tiny/best_model --images data/sample/images/val --prompt "a large red circle"
finderpartner search --model outputs/clip_tiny/best_model --index photos_index --image query.jpg --top-k 10 --json""",
    )
    p.add_argument("--model", required=True)
    add_trust_pickle(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--index", type=Path, help="store made by `finderpartner index` (a folder, or milvus:FILE.db / milvus:URI)"
    )
    where.add_argument("--images", type=Path, help="folder of images (embeddings cached and reused)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="describe what you are looking for")
    what.add_argument("--image", type=Path, help="find images similar to this one")
    p.add_argument("-k", "--top-k", type=int, default=5)
    p.add_argument(
        "--where",
        help="with --index: only photos matching this filter, e.g. \"city = 'Paris' and age between 25 and 35\" "
        "(docs/search.md)",
    )
    p.add_argument("--nprobe", type=int, help="with --index: IVF lists visited (default: tuned at build time)")
    p.add_argument("--exact", action="store_true", help="with --index: exact search over every photo")
    add_runtime_args(p)
    add_backend_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_search)


def add_demo_command(sub: Any) -> None:
    p = new_command(
        sub,
        "demo",
        "web demo: image-text scores, text comparison, gallery search by prompt",
        description="""
Start a Gradio web app: an image scored against several texts, texts compared with each other, and gallery
search by prompt with thumbnails. It binds 127.0.0.1 (this machine only) unless --host says otherwise.""",
        examples="""
finderpartner demo --model outputs/clip_tiny/best_model --images data/sample/images/val
finderpartner demo --model outputs/clip_tiny/best_model --index photos_index --port 8080""",
    )
    p.add_argument("--model", required=True, help="saved model folder or hub id")
    hidden_alias(p, "--model_path", "--model")
    add_trust_pickle(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--index", type=Path, help="gallery index made by `finderpartner index`")
    where.add_argument("--images", type=Path, help="gallery folder (default: the run's validation images, if known)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=PORT, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default: 10 MB)")
    add_runtime_args(p)
    add_backend_args(p)
    p.set_defaults(handler=_demo)


def _searcher(args: argparse.Namespace) -> Any:
    from ..embedding import Searcher
    from ..interop.onnx_runtime import OnnxSearcher

    if getattr(args, "backend", "torch") == "onnx":
        return OnnxSearcher(
            args.model,
            variant=args.onnx_variant,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.workers,
            spin=not getattr(args, "serving", False),
        )
    encoder, device, precision = load_for_inference(args)
    return Searcher(encoder, device=device, precision=precision, batch_size=args.batch_size, num_workers=args.workers)


def _index(args: argparse.Namespace) -> int:
    from ..search.commands import index_command
    from ..search.milvus_index import milvus_index_command
    from ..search.milvus_store import is_milvus_location

    if is_milvus_location(args.out):  # a Milvus collection (docs/serve.md), not a store folder
        return milvus_index_command(args, _searcher)
    return index_command(args, _searcher)


def _search(args: argparse.Namespace) -> int:
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError(
            "--prompt is empty: describe what you are looking for, e.g. --prompt 'a red circle on the left'"
        )
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {args.top_k})")
    if args.index is None and (args.where or args.nprobe or args.exact):
        raise UsageError("--where, --nprobe and --exact search a photo store: give it with --index STORE")
    searcher = _searcher(args)
    if args.index is not None:
        from ..search.commands import search_store

        return search_store(args, searcher)
    index = _gallery(args, searcher, progress=not args.json)
    if index is None:
        raise UsageError("give the gallery to search: --images DIR or --index INDEX")
    if args.prompt is not None:
        _warn_if_cut(searcher, args.prompt.strip())
        query = searcher.embed_texts([args.prompt.strip()])
    else:
        vectors, failed = searcher.embed_paths([args.image])
        if failed:
            raise DataError(f"cannot read query image {args.image}: {failed[0][1]}")
        query = vectors
    hits = index.search(query, args.top_k)[0]
    captions = _gallery_captions(index.root)  # a split of a data folder: what each hit shows, by its caption
    if args.json:
        results = [{"rank": h.rank, "path": str(h.path), "score": round(h.score, 6)} for h in hits]
        for result in results:
            if (caption := captions.get(Path(result["path"]))) is not None:
                result["caption"] = caption
        print(json.dumps({"query": args.prompt or str(args.image), "results": results}, indent=2))
    else:
        print(f"top {len(hits)} of {len(index)} images for {_shortened(args.prompt or str(args.image))!r}:")
        for h in hits:
            shown = f"  <- {captions[h.path]}" if h.path in captions else ""
            print(f"{h.rank:>3}. {h.score:.4f}  {h.path}{shown}")
    return 0


def _gallery_captions(folder: Path) -> dict[Path, str]:
    """The first caption of each image when the gallery is a split of a data folder (``<root>/images/<split>/`` beside
    ``<root>/captions_<split>.csv``), by image path; empty for any other folder or an unreadable CSV."""
    from ..data.dataset import read_split

    if folder.parent.name != "images":
        return {}
    table, _ = read_split(folder.parent.parent, folder.name)  # rows with a problem are left out, nothing raised
    captions: dict[Path, str] = {}
    for i in range(len(table)):
        captions.setdefault(table.path(i), table.captions[i])
    return captions


def _warn_if_cut(searcher: Any, prompt: str) -> None:
    """Say so when the prompt is longer than the model's context: the model reads its first tokens only."""
    encoder = getattr(searcher, "onnx", None) or searcher.encoder  # OnnxSearcher / Searcher
    tokens = len(encoder.tokenizer(prompt, truncation=False)["input_ids"])
    if tokens > encoder.context_length:
        log.warning(
            "--prompt is %d tokens long; the model reads only the first %d (its context length), the rest is "
            "ignored: %r",
            tokens,
            encoder.context_length,
            _shortened(prompt),
        )


def _shortened(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _gallery(args: argparse.Namespace, searcher: Any, progress: bool) -> Any:
    """The index to search: --index (checked against the model), --images (cached), else the run's val images."""
    from ..index import cached_gallery

    if args.index is not None:  # a photo store (`finderpartner index`), seen by the demo as a gallery
        from ..search.faiss_store import FaissStore
        from ..search.searcher import PhotoSearcher, StoreGallery

        store = FaissStore.open(args.index)
        PhotoSearcher(searcher, store, where=str(args.index))  # refuses another model's store
        return StoreGallery(store)
    images = args.images or _default_gallery(Path(getattr(searcher, "source", None) or args.model))
    if images is None:
        return None
    index, stats = cached_gallery(searcher, images, progress=progress)
    if stats.embedded or stats.removed:
        log.info("gallery %s: %s", images, stats)
    return index


def _default_gallery(model_dir: Path) -> Path | None:
    """No --images/--index: the validation images of the run that produced the model, if known."""
    found = run_split(model_dir)
    if found is not None:
        log.info("no --images/--index given: using %s (the run's validation images)", found[0])
    return found[0] if found else None


def _demo(args: argparse.Namespace) -> int:
    from ..demo import launch_demo

    args.serving = True  # a server too: onnxruntime's threads do not busy-wait between queries
    searcher = _searcher(args)
    index = _gallery(args, searcher, progress=True)
    if index is None:
        log.warning("no gallery (--index or --images): the gallery search tab stays empty")
    try:  # Gradio's serving loop closes the server on a KeyboardInterrupt (signals.py: SIGTERM raises one too)
        launch_demo(searcher, index, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    except KeyboardInterrupt:
        pass
    if signals.received():
        print(f"demo stopped by {signals.received()}: the server is closed", file=sys.stderr)
        return INTERRUPTED
    return 0
