"""``import finderpartner`` is light (no torch), and every name of its public API resolves to the real object."""

from __future__ import annotations

import subprocess
import sys

import pytest

import finderpartner


def test_importing_the_package_imports_no_heavy_dependency() -> None:
    code = "import sys, finderpartner; print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_every_public_name_resolves() -> None:
    from finderpartner.config import load_config
    from finderpartner.embedding import Searcher
    from finderpartner.index import index_folder
    from finderpartner.model import load_model
    from finderpartner.train import train

    assert finderpartner.load_config is load_config and finderpartner.load_model is load_model
    assert finderpartner.Searcher is Searcher and finderpartner.index_folder is index_folder
    assert finderpartner.train_model is train
    for name in finderpartner.__all__:
        assert getattr(finderpartner, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        finderpartner.nope  # noqa: B018
