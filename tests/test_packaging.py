"""The wheel: built offline from a copy of the sources, it carries the licence, every module and the shipped
configs; installed (not editable) into a folder of its own and run from another folder, it prints a preset and
finds README's `--config configs/...` files inside itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def _run(args: list[str], cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not this checkout's src/
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of the sources (the build leaves build/ and
    *.egg-info beside them: not in this checkout)."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, f"setuptools {setuptools.__version__}: the build needs >= 77 (pip install -e '.[dev]')"
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("src", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            "dist",
            str(source),
        ],
        cwd=tmp,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (found,) = (tmp / "dist").glob("finderpartner-*.whl")
    return found


def test_the_wheel_has_the_licence_every_module_and_the_configs(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata = z.read(f"{info}/METADATA").decode()
        licence = z.read(f"{info}/licenses/LICENSE").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        for config in SHIPPED:
            assert z.read(f"finderpartner/configs/{config.name}") == config.read_bytes()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert licence.startswith("MIT License") and "Copyright (c) 2026 FinderPartner" in licence
    assert "Requires-Dist: transformers<6,>=4.41" in metadata
    assert "finderpartner = finderpartner.cli:main" in entry_points
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "finderpartner").rglob("*.py")}
    assert modules - names == set(), "a module is missing from the wheel: list its package in pyproject.toml"


def test_the_installed_wheel_prints_presets_and_finds_its_configs_from_any_folder(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    install = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"  # no configs/ here
    elsewhere.mkdir()

    printed = _run([sys.executable, "-m", "finderpartner.cli", "init-config", "--preset", "clip_tiny"], elsewhere, site)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert printed.stdout == (ROOT / "configs" / "clip_tiny.yaml").read_text(encoding="utf-8")

    probe = (
        "import sys, finderpartner\n"
        "from pathlib import Path\n"
        "from finderpartner.config import load_config, preset_config\n"
        "assert Path(finderpartner.__file__).is_relative_to(sys.argv[1]), finderpartner.__file__\n"
        "presets = ['clip_tiny', 'clip_base', 'minilm_tiny_vit', 'finetune']\n"
        "for stem in presets:\n"
        "    assert load_config(f'configs/{stem}.yaml') == preset_config(stem), stem\n"
        "print('found', len(presets))\n"
    )
    found = _run([sys.executable, "-c", probe, str(site)], elsewhere, site)
    assert found.returncode == 0 and found.stdout == "found 4\n", found.stderr[-3000:]
    assert {p.stem for p in SHIPPED} == {"clip_tiny", "clip_base", "minilm_tiny_vit", "finetune"}


def test_a_config_in_the_working_folder_wins_and_a_missing_one_is_still_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finderpartner.config import load_config, preset_config
    from finderpartner.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/clip_tiny.yaml") == preset_config("clip_tiny")  # this checkout's, from another folder
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "clip_tiny.yaml").write_text("experiment: mine\n", encoding="utf-8")
    assert load_config("configs/clip_tiny.yaml").experiment == "mine"
    with pytest.raises(ConfigError, match="configs/clip_tny.yaml not found"):
        load_config("configs/clip_tny.yaml")
    with pytest.raises(ConfigError, match="clip_tiny.yaml not found"):
        load_config("clip_tiny.yaml")  # only configs/<name>.yaml names a shipped config
