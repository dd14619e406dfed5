"""``finderpartner index --out milvus:...``: the photos of a folder or a list into a Milvus collection.

The photo list, attributes and the "what changed" rule are indexing.py's (new and changed files are embedded,
unchanged ones kept, photos gone from an indexed folder removed); what differs is where the work is kept. Each
chunk of embedded photos is committed to the collection at once (a changed photo's old row removed, the new row
added), so Ctrl-C or SIGTERM finishes the chunk in progress and stops, and the same command again embeds only
the photos not yet in the collection: no parts folder is needed. One process writes (a Milvus server takes
parallel writers, but the ids here are assigned by one); under torchrun it is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Stopped, UsageError
from ..progress import Progress
from ..signals import StopRequest, received
from .filters import parse
from .indexing import Embedder, IndexStats, Photo, gather_photos, to_embed
from .meta import coerce
from .milvus_store import MilvusStore, parse_location
from .store import PhotoRow, nothing_removed

log = logging.getLogger(__name__)


def index_milvus(
    embedder: Embedder,
    location: str,
    *,
    images: Path | None = None,
    listing: Path | None = None,
    attributes: Path | None = None,
    model: str | None = None,
    chunk_size: int = 512,
    progress: bool = True,
    after_chunk: Callable[[int], None] | None = None,
) -> IndexStats:
    """Bring the collection at ``location`` up to date with the photos (module docstring)."""
    if (images is None) == (listing is None):
        raise UsageError("give the photos to index: --images DIR or --list FILE (CSV or JSONL)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("index into a Milvus store runs in one process: start it without torchrun / accelerate launch")
    root, photos, kinds = gather_photos(images, listing, attributes)
    loc = parse_location(location)
    dim = int(embedder.embed_texts(["a photo"]).shape[1])
    stats = IndexStats()
    with MilvusStore.create(loc, dim=dim, fingerprint=embedder.fingerprint, model=model or "", columns=kinds) as store:
        columns = store.columns()
        live = store.live_stamps()
        todo = to_embed(photos, live, None, stats)  # each chunk is committed as it goes: no parts to resume from
        if images is not None:  # photos gone from the indexed folder leave the store
            prefix = str(root) + os.sep
            present = {p.path for p in photos}
            gone = [path for path in live if path.startswith(prefix) and path not in present]
            if gone:
                stats.removed = store.remove(paths=gone)
        stopped = _embed_into(store, embedder, todo, live, columns, stats, chunk_size, progress, after_chunk)
        stats.live = store.count()
    if stopped:
        raise Stopped(
            f"{received() or 'interrupted'}: stopped; the {stats.embedded} images embedded so far are in {loc}, and "
            "the same command again embeds only the others"
        )
    return stats


def _embed_into(
    store: MilvusStore,
    embedder: Embedder,
    todo: list[Photo],
    live: dict[str, tuple[int, int, int]],
    columns: dict[str, str],
    stats: IndexStats,
    chunk_size: int,
    progress: bool,
    after_chunk: Callable[[int], None] | None,
) -> bool:
    """Embed and commit chunk by chunk; True when a stop signal came (the chunk in progress was committed)."""
    bar = Progress(total=len(todo), desc="embedding images", unit="image", disable=not progress or not todo)
    with StopRequest("adding the images embedded so far") as stop, bar:
        for start in range(0, len(todo), chunk_size):
            if stop.requested:
                return True
            chunk = todo[start : start + chunk_size]
            vectors, failures = embedder.embed_paths([Path(p.path) for p in chunk])
            bad = {row for row, _ in failures}
            stats.failed += [(chunk[row].path, reason) for row, reason in failures]
            good = [i for i in range(len(chunk)) if i not in bad]
            rows = [_row(chunk[i], columns) for i in good]
            replaced = [chunk[i].path for i in good if chunk[i].path in live]
            if replaced:
                store.remove(paths=replaced)
            if rows:  # their paths were compared with the live ones above (replaced ones just removed)
                store.add(rows, np.asarray(vectors, np.float32)[good], check_paths=False)
            stats.embedded += len(chunk)
            bar.update(len(chunk))
            if after_chunk is not None:
                after_chunk(start + len(chunk))
        return stop.requested


def _row(photo: Photo, columns: dict[str, str]) -> PhotoRow:
    attrs: dict[str, Any] = {}
    for name, value in photo.attributes.items():
        kind = columns.get(name)
        attrs[name] = coerce(value, kind, f"{photo.path}: {name}") if kind is not None else value
    return PhotoRow(photo.path, photo.size, photo.mtime_ns, attrs)


def milvus_index_command(args: Any, make_embedder: Callable[[Any], Any]) -> int:
    """`finderpartner index [add|remove|compact] --out milvus:...` (cli.py hands a Milvus --out here)."""
    action = getattr(args, "action", None) or "add"
    location = str(args.out)
    if action == "add":
        if not args.model:
            raise UsageError("index: --model is required to add photos (the model that embeds them)")
        if (args.images is None) == (getattr(args, "list", None) is None):
            raise UsageError("index: give the photos to add with --images DIR or --list FILE (CSV or JSONL)")
        if getattr(args, "overwrite", False):
            raise UsageError(
                "--overwrite does not drop a Milvus collection: index into another one (milvus:...#name), or drop "
                "it with Milvus's own tools"
            )
        embedder = make_embedder(args)
        stats = index_milvus(
            embedder,
            location,
            images=args.images,
            listing=getattr(args, "list", None),
            attributes=getattr(args, "attributes", None),
            model=str(args.model),
            chunk_size=8 * int(getattr(embedder, "batch_size", 64)),
        )
        for name, reason in stats.failed:
            log.warning("could not embed %s: %s", name, reason)
        print(f"index {parse_location(location)}: {stats.live} images ({stats})")
        return 0
    with MilvusStore.open(location, writing=True) as store:
        if action == "remove":
            from_paths = [str(Path(p).absolute()) for p in getattr(args, "path", None) or []]
            ids = getattr(args, "id", None) or []
            if not (from_paths or ids or args.where):
                raise UsageError("index remove: say what to remove with --path, --id or --where")
            where = parse(args.where, store.columns()) if args.where else None  # before anything changes
            n = store.remove(ids=ids, paths=from_paths, where=where)
            if n == 0:
                log.warning(nothing_removed(from_paths, ids, args.where))
            print(
                f"removed {n} photo(s) from {store.location}: no search returns them from now on; {store.count()} left"
            )
            return 0
        stats = store.compact()
        print(f"compaction of {store.location} requested ({stats.live} photos); Milvus drops removed rows itself")
    return 0
