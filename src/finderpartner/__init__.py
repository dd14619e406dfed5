"""FinderPartner: fine-tune a CLIP dual encoder on image-caption pairs, evaluate it, search a gallery.

The public API, as open_clip exposes ``create_model_and_transforms``::

    from pathlib import Path
    import torch
    import finderpartner as fp

    cfg = fp.load_config("configs/clip_tiny.yaml", ["train.max_steps=100"])
    result = fp.train_model(cfg)                             # -> TrainResult: run_dir, best_model, ...
    encoder = fp.load_model(result.best_model)           # a saved folder or a hub id -> DualEncoder
    searcher = fp.Searcher(encoder, device=torch.device("cpu"))  # .embed_texts([...]), .embed_paths([...])
    index, stats = fp.index_folder(searcher, Path("photos"), Path("photos.index"))
    hits = index.search(searcher.embed_texts(["a dog on a beach"]), k=5)

Each name is imported when first used (module ``__getattr__``), so ``import finderpartner`` stays light: no torch,
transformers or FAISS until a function needs them (``check-env`` relies on that). The imports are by
``importlib`` on purpose: scripts/import_graph.py reads import statements, and these would make the package's
``__init__`` depend on modules that import ``__version__`` from it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (relative to the package)
_API = {
    "load_config": "config",
    "Config": "config",
    "load_model": "model",
    "DualEncoder": "model",
    "Searcher": "embedding",
    "index_folder": "index",
    "GalleryIndex": "index",
    "train_model": "train",  # train.train; the name ``train`` is the sub-package's (Python binds it on import)
    "TrainResult": "train",
}
_RENAMED = {"train_model": "train"}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'finderpartner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), _RENAMED.get(name, name))
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
