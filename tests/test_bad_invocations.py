"""A careless user's invocations through the real CLI, each in its own process: every one ends with the tool's own
message and the documented exit code, never a Python traceback. And README's exit-code table is the CLI's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import MICRO_SPEC, micro_config

from finderpartner.cli import build_parser
from finderpartner.errors import (
    BROKEN_PIPE,
    EXIT_CODES,
    INTERNAL_ERROR,
    INTERRUPTED,
    ConfigError,
    FinderPartnerError,
    UsageError,
)

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, small_data: Path, trained_model: Path) -> dict[str, Path]:
    """Everything the invocations point at: data, a gallery, models, configs, an index, an export-less folder."""
    from finderpartner.config import TinySpec
    from finderpartner.model import build_tiny, save_model

    tmp = tmp_path_factory.mktemp("careless")
    w: dict[str, Path] = {"tmp": tmp, "model": trained_model, "data": Path(shutil.copytree(small_data, tmp / "data"))}
    w["gallery"] = Path(shutil.copytree(small_data / "images" / "val", tmp / "photos"))
    w["real_data"] = Path(shutil.copytree(small_data, tmp / "real_data"))  # a user's data set in the same layout
    for own in ("sample_meta.json", ".finderpartner.json"):
        (w["real_data"] / own).unlink()
    w["lone_model"] = Path(shutil.copytree(trained_model, tmp / "lone_model"))  # no run around it: no default gallery
    w["other_model"] = save_model(
        build_tiny(TinySpec(**MICRO_SPEC), ["a red circle", "a blue square"] * 4, seed=3), tmp / "other_model"
    )
    w["empty"] = tmp / "empty"
    w["empty"].mkdir()
    w["documents"] = tmp / "documents"
    w["documents"].mkdir()
    (w["documents"] / "thesis.docx").write_bytes(b"years of work")
    w["a_file"] = tmp / "a_file.txt"
    w["a_file"].write_text("not a folder")

    def config(name: str, **changes: object) -> Path:
        raw = micro_config(tmp / name, w["data"])
        for key, value in changes.items():
            node = raw
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    w["config"] = config("fresh")
    w["existing_run_config"] = config(
        "existing", output_dir=str(trained_model.parent.parent), experiment=trained_model.parent.name
    )
    w["shards_config"] = config(
        "shards", **{"data.format": "webdataset", "data.train_shards": str(tmp / "none-{0..3}.tar")}
    )
    w["under_a_file_config"] = config("under_file", output_dir=str(w["a_file"] / "outputs"))
    w["bad_value_config"] = config("bad_value", **{"train.lr": -1})
    w["bad_yaml"] = tmp / "bad.yaml"
    w["bad_yaml"].write_text("train: {lr: 1e-4\n  epochs: [")
    w["list_yaml"] = tmp / "list.yaml"
    w["list_yaml"].write_text("- train\n- eval\n")
    w["index"] = tmp / "index"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "finderpartner.cli",
            "index",
            "--model",
            str(trained_model),
            "--images",
            str(w["gallery"]),
            "--out",
            str(w["index"]),
            "--workers",
            "0",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    return w


# (arguments, exit code, a fragment of the message). {name} is replaced by the path world[name].
CASES: list[tuple[str, int, str]] = [
    # usage errors (2)
    ("", 2, "the following arguments are required: COMMAND"),
    ("nonsense", 2, "invalid choice: 'nonsense'"),
    ("train --bogus", 2, "unrecognized arguments: --bogus"),
    ("search --model {model}", 2, "one of the arguments --prompt --image is required"),
    ("search --model {model} --images {gallery} --prompt x --top-k 0", 2, "--top-k must be at least 1 (got 0)"),
    ("search --model {model} --images {gallery} --prompt x --top-k many", 2, "invalid int value: 'many'"),
    (
        "index --model {model} --images {gallery} --out {tmp}/bs0 --batch-size 0",
        2,
        "--batch-size: must be at least 1 (got 0)",
    ),
    ("search --model {model} --images {gallery} --prompt x --workers -1", 2, "--workers: must be at least 0 (got -1)"),
    ("serve --model {model} --index {index} --port 99999", 2, "--port: must be from 0 to 65535 (got 99999)"),
    ("demo --model {model} --port http", 2, "--port: not a whole number: 'http'"),
    ("search --model {lone_model} --prompt x", 2, "give the gallery to search: --images DIR or --index INDEX"),
    ("export --model {model}", 2, "the following arguments are required: --out"),
    ("make-shards --data {data} --out {tmp}/shards0 --shard-size 0", 2, "--shard-size must be at least 1"),
    ("train --config {config} --resume auto --overwrite", 2, "give one of them"),
    ("eval --model {model} --data {data} --device tpu", 2, "invalid choice: 'tpu'"),
    ("index --model {model} --images {gallery}", 2, "the following arguments are required: --out"),
    ("merge --base {model} --finetuned {model}", 2, "the following arguments are required: --out"),
    ("merge --base {model} --finetuned {model} --alpha 1.5 --out {tmp}/merged1", 2, "pass --extrapolate"),
    ("merge --base {model} --finetuned {model} --alpha 0.5 0.5 --out {tmp}/merged2", 2, "0.5 more than once"),
    ("eval --data {data}", 2, "eval needs --model DIR (or --sweep-alpha"),
    ("eval --model {model} --data {data} --alpha 0.5", 2, "--alpha only work(s) with --sweep-alpha"),
    ("eval --sweep-alpha --base {model} --data {data}", 2, "--sweep-alpha needs --finetuned"),
    ("eval --sweep-alpha --base {model} --finetuned {model} --data {data} --alpha -1", 2, "pass --extrapolate"),
    # configuration (3)
    ("train --config {tmp}/missing.yaml", 3, "missing.yaml not found; `finderpartner init-config >"),
    ("train --config {bad_yaml}", 3, "not valid YAML"),
    ("train --config {list_yaml}", 3, "the top level must be a mapping of sections, got list"),
    ("train --config {config} --set train.lr=-1", 3, "train.lr"),
    ("train --config {config} --set train.lrate=1e-4", 3, "train.lrate"),
    ("train --config {config} --set novalue", 3, "expected key=value"),
    ("train --config {config} --set eval.best_metric=R@1", 3, "unknown metric 'R@1'"),
    ("train --config {config} --set experiment=../escape", 3, "must be a plain folder name"),
    ("train --config {config} --set train.batch_size=1", 3, "train.batch_size"),
    ("train --config {config} --set train.precision=fp8", 3, "train.precision"),
    ("train --config {config} --set data.root=", 3, "--set: 1 problem(s):\n  - data.root: no value given (from --set"),
    ("train --config {bad_value_config}", 3, "bad_value.yaml: 1 problem(s):\n  - train.lr: Input should be greater"),
    # data (4)
    ("validate-data --data {tmp}/nowhere", 4, "--data {tmp}/nowhere does not exist"),
    ("validate-data --data {a_file}", 4, "is a file; give the data folder that holds images/<split>/"),
    ("train --config {config} --set data.root={tmp}/nowhere", 4, "captions_train.csv"),
    ("train --config {shards_config}", 4, "not found"),
    ("eval --model {model} --data {tmp}/nowhere --workers 0", 4, "captions_val.csv"),
    ("eval --model {model} --data {data} --split nosuch --workers 0", 4, "there is no split 'nosuch' (the splits in"),
    ("index --model {model} --images {tmp}/no_photos --out {tmp}/idx1 --workers 0", 4, "image folder"),
    ("index --model {model} --images {empty} --out {tmp}/idx2 --workers 0", 4, "no images under"),
    ("index --model {model} --images {a_file} --out {tmp}/idx3 --workers 0", 4, "a_file.txt is a file, not a folder"),
    ("search --model {model} --index {empty} --prompt x", 4, "is not a gallery index"),
    ("search --model {model} --index {a_file} --prompt x", 4, "a_file.txt is a file, not a gallery index"),
    ("search --model {model} --images {gallery} --image {tmp}/missing.jpg --workers 0", 4, "cannot read query image"),
    ("make-shards --data {data} --split nosuch --out {tmp}/shards1", 4, "captions_nosuch.csv"),
    # model (5)
    ("eval --model {tmp}/outputs/nope/best_model --data {data}", 5, "does not exist; train one first or fix the path"),
    ("search --model {empty} --images {gallery} --prompt x", 5, "has no config.json"),
    ("export --model {tmp}/no_model --out {tmp}/export1", 5, "does not exist"),
    ("export --model {a_file} --out {tmp}/export2", 5, "a_file.txt is a file; a model is a folder"),
    ("demo --model {tmp}/no_model", 5, "does not exist"),
    ("validate-data --data {data} --model {tmp}/no_model", 5, "does not exist"),
    ("merge --base {tmp}/no_model --finetuned {model} --out {tmp}/merged3", 5, "does not exist"),
    ("merge --base {model} --finetuned {other_model} --out {tmp}/merged4", 5, "their tokenizers differ"),
    (
        "eval --sweep-alpha --base {other_model} --finetuned {model} --data {data} --out {tmp}/wise1 --workers 0",
        5,
        "their tokenizers differ",
    ),
    ("train --config {config} --set model.name={tmp}/no_model", 5, "does not exist"),
    # checkpoint (6)
    ("train --config {config} --resume {tmp}/no_checkpoint", 6, "no_checkpoint: no such file or folder"),
    ("train --config {config} --resume {data}", 6, "neither a checkpoint (<run>/checkpoints/step_NNNNNN) nor a run"),
    # index made by another model (8)
    ("search --model {other_model} --index {index} --prompt x", 8, "was built by another model"),
    # export (9)
    ("search --backend onnx --model {model} --images {gallery} --prompt x", 9, "is not an ONNX export folder"),
    # output refused (10): nothing is changed
    ("index --model {model} --images {gallery} --out {gallery}", 10, "is the input images"),
    ("index --model {model} --images {gallery} --out {documents}", 10, "finderpartner did not write (thesis.docx)"),
    ("index --model {model} --images {gallery} --out {a_file}", 10, "exists and is not a folder"),
    ("export --model {model} --out {model}", 10, "is the input model"),
    ("eval --model {model} --data {data} --out {documents} --workers 0", 10, "it never replaces them"),
    ("merge --base {model} --finetuned {lone_model} --out {model}", 10, "is the input base"),
    ("merge --base {model} --finetuned {model} --out {documents} --overwrite", 10, "it never replaces them"),
    (
        "eval --sweep-alpha --base {model} --finetuned {model} --data {data} --out {model}/eval",
        10,
        "is inside the input",
    ),
    (
        "sample-data --out {real_data} --overwrite --train-images 2 --val-images 2",
        10,
        "which sample-data did not write",
    ),
    ("make-shards --data {data} --out {data}/images/train", 10, "is the input images"),
    ("sample-data --out {gallery} --train-images 2 --val-images 2", 10, "which sample-data did not write"),
    ("train --config {existing_run_config}", 10, "already holds a training run"),
    # storage (11)
    ("train --config {under_a_file_config}", 11, "Not a directory"),
]


def _run(world: dict[str, Path], case: str, number: int) -> subprocess.CompletedProcess:
    args = [part.format(**world) for part in case.split()]
    if "{config}" in case and "experiment=" not in case:  # each training its own run folder: they run in parallel
        args += ["--set", f"experiment=case{number}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINDERPARTNER_CACHE": str(world["tmp"] / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "finderpartner.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=world["tmp"],
    )


def test_no_user_mistake_ends_in_a_traceback(world: dict[str, Path]) -> None:
    assert len(CASES) >= 40
    protected = {
        p: p.read_bytes()
        for name in ("gallery", "documents", "data", "real_data")
        for p in world[name].rglob("*")
        if p.is_file()
    }
    protected |= {p: p.read_bytes() for p in world["model"].parent.rglob("*") if p.is_file() and p.name != ".lock"}
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda n: _run(world, CASES[n][0], n), range(len(CASES))))
    failures = []
    for (case, code, fragment), result in zip(CASES, results):
        output = result.stdout + result.stderr
        fragment = fragment.format(**world)
        if "Traceback" in output or result.returncode != code or fragment not in result.stderr:
            failures.append(
                f"finderpartner {case}\n  exit {result.returncode} (want {code}), want {fragment!r} in:\n"
                f"  {result.stderr.strip()[-1500:]}"
            )
    assert not failures, f"{len(failures)} of {len(CASES)} invocations misbehaved:\n" + "\n".join(failures)
    changed = [str(p) for p, data in protected.items() if not p.is_file() or p.read_bytes() != data]
    assert changed == []


def test_an_internal_error_prints_a_traceback_and_asks_for_a_report(tmp_path: Path) -> None:
    """A bug (here: a handler that divides by zero, run through the real main) is not dressed up as a user error."""
    code = (
        "import sys; from finderpartner import cli\n"
        "def broken(args): return 1 / 0\n"
        "parser = cli.build_parser\n"
        "def patched():\n"
        "    p = parser(); p._subparsers._group_actions[0].choices['init-config'].set_defaults(handler=broken)\n"
        "    return p\n"
        "cli.build_parser = patched\n"
        "sys.exit(cli.main(['init-config']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 70
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert "internal error: this is a bug in finderpartner" in result.stderr and "Please report it" in result.stderr


def test_readme_exit_code_table_matches_the_cli() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| *(\d+) *\| *(.+?) *\|$", section, flags=re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES
    help_text = build_parser().format_help()
    for code, meaning in EXIT_CODES.items():
        assert f"{code:>3}  {meaning}" in help_text


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def test_exit_codes_are_distinct_and_argparse_usage_errors_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each kind of error has a code of its own, listed in EXIT_CODES; argparse's own usage errors exit 2 like ours."""
    errors = [FinderPartnerError, *_subclasses(FinderPartnerError)]
    kinds = [cls for cls in errors if "exit_code" in vars(cls)]  # a refinement may share its parent's code
    codes = [cls.exit_code for cls in kinds]
    assert len(set(codes)) == len(codes), {cls.__name__: cls.exit_code for cls in kinds}
    assert {cls.exit_code for cls in errors} | {0, INTERNAL_ERROR, INTERRUPTED, BROKEN_PIPE} == set(EXIT_CODES)
    assert (UsageError.exit_code, ConfigError.exit_code) == (2, 3)
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["train", "--bogus"])
    assert err.value.code == UsageError.exit_code and "unrecognized arguments: --bogus" in capsys.readouterr().err
