"""ARCHITECTURE.md's module map names every module of the package, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "finderpartner"


def _map_entries(text: str) -> set[str]:
    """The module paths that start the lines of the code block under '## Module map'."""
    section = text.split("\n## Module map", 1)[1]
    block = section.split("```", 2)[1]
    return {m.group(1) for m in re.finditer(r"^([\w/]+\.py)\b", block, flags=re.M)}


def test_the_module_map_is_the_tree() -> None:
    named = _map_entries((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"))
    tree = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    assert sorted(tree - named) == [], "modules missing from ARCHITECTURE.md's module map"
    assert sorted(named - tree) == [], "ARCHITECTURE.md's module map names modules that do not exist"


def test_the_map_reader_sees_a_missing_and_an_extra_module() -> None:
    text = "intro\n## Module map\n\n```\nmodel.py   the model\ngone.py    removed\n```\n"
    assert _map_entries(text) == {"model.py", "gone.py"}
