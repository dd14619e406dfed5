"""The package's imports form no cycle and none hides in a function (scripts/import_graph.py), and the checker
itself finds both in a package built to have them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_the_package_has_no_import_cycle_and_no_function_level_import() -> None:
    result = _run()
    assert result.returncode == 0, result.stderr
    assert "finderpartner.index -> " in result.stdout and "no cycles" in result.stdout
    index_line = next(line for line in result.stdout.splitlines() if line.startswith("finderpartner.index -> "))
    assert "embedding" not in index_line and "onnx_runtime" not in index_line and "export" not in index_line


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")  # a -> sub.b (a submodule named through its package)
    (pkg / "sub" / "b.py").write_text("import pkg.c\n")  # absolute
    (pkg / "c.py").write_text("def f():\n    from .a import x\n    return x\n")  # the circle closes in a function
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\nfrom . import sub\n"
    )
    result = _run(str(pkg))
    assert result.returncode == 1
    assert "cycle: pkg.a <-> pkg.c <-> pkg.sub.b" in result.stderr
    assert "function-level import: pkg.c (line 2) imports pkg.a" in result.stderr
    assert "pkg.d" not in result.stderr  # a TYPE_CHECKING import never runs
    assert "pkg.c -> a*" in result.stdout and "pkg.d -> a~, sub" in result.stdout


def test_the_checker_finds_layer_crossings(tmp_path: Path) -> None:
    """A train/ module imported from outside train/, and interop/ imported by the library (top level or data/)."""
    pkg = tmp_path / "pkg"
    for sub in ("train", "interop", "data", "cli"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("from .recipe import train\n")
    (pkg / "train" / "recipe.py").write_text("from .step import one\ndef train():\n    pass\n")
    (pkg / "train" / "step.py").write_text("one = 1\n")
    (pkg / "interop" / "export.py").write_text("from ..train import train\n")  # through the door: fine
    (pkg / "data" / "load.py").write_text("from ..interop.export import x\n")  # library -> interop
    (pkg / "model.py").write_text("from .train.step import one\n")  # around the door
    (pkg / "cli" / "run.py").write_text("from ..interop import export\nfrom ..train import train\n")  # fine
    result = _run(str(pkg))
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert problems == [
        "error: layer: the library module pkg.data.load (line 1) imports pkg.interop.export; "
        "only the command line may use pkg.interop",
        "error: layer: pkg.model (line 1) imports pkg.train.step; import it from pkg.train "
        "(its __init__ exports what others need)",
    ], result.stderr
