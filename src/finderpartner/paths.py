"""Where FinderPartner keeps what it can rebuild: the user cache folder.

Both training (the measured micro-batch sizes) and search (cached gallery indexes) write there; the location
is decided here, in a module that imports nothing else of the package, so neither side depends on the other.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$FINDERPARTNER_CACHE``, else ``$XDG_CACHE_HOME/finderpartner``, else ``~/.cache/finderpartner``."""
    base = os.environ.get("FINDERPARTNER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finderpartner"
    )
    return Path(base)
