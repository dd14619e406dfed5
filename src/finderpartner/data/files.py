"""Finding image files in a folder, with the size and modification time that tell when one changed.

Indexing (which re-embeds only changed files) and export verification (which needs a few real images) both
scan folders; the scan lives here, with the other data readers, so that neither has to import the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
}  # HEIC: pillow-heif


@dataclass(frozen=True)
class FileStamp:
    """A file's size and modification time: a file counts as changed when either differs."""

    size: int
    mtime_ns: int


def scan_images(root: Path) -> dict[str, FileStamp]:
    """Image files under ``root`` (recursively, by extension; hidden files and folders skipped) with their stamps."""
    if root.exists() and not root.is_dir():
        what = "an image" if root.suffix.lower() in IMAGE_EXTENSIONS else "a file"
        raise DataError(
            f"{root} is {what}, not a folder: --images takes the folder of images (searched recursively), "
            f"e.g. --images {root.parent}"
        )
    if not root.is_dir():
        raise DataError(f"image folder {root} not found")
    found: dict[str, FileStamp] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                full = Path(dirpath) / name
                try:
                    st = full.stat()
                except OSError:  # a dangling symlink, or deleted while we walk: not part of the gallery
                    continue
                found[full.relative_to(root).as_posix()] = FileStamp(st.st_size, st.st_mtime_ns)
    return found
