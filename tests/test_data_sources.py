"""The data people already have: a Hugging Face dataset (save_to_disk, Parquet files streamed), the imagefolder
layout with metadata.jsonl, a JSONL manifest. Real ``datasets``, offline. Each trains, validates and resumes exactly;
processes see disjoint shares that cover the data; bad rows are named."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HIDE_PACKAGES, micro_config, run_torchrun
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import finderpartner.train.recipe as train_module
from finderpartner.cli import main
from finderpartner.config import config_from_dict
from finderpartner.data.dataset import read_split
from finderpartner.data.rows import RowSpec, open_tables, validate_rows
from finderpartner.data.sample_layouts import make_sample_layout
from finderpartner.data.shards import expand_shards, raw_samples
from finderpartner.data.stream import Columns, RowStream, open_streams, prepared
from finderpartner.errors import ConfigError, DataError, OutputError

datasets = pytest.importorskip("datasets")

SAMPLE = dict(train_images=64, val_images=24, image_size=48)  # the pairs of the small_data fixture


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The small sample data in each layout, plus the save_to_disk copy as hub-style Parquet files (2 train files)."""
    base = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout in ("hf", "imagefolder", "jsonl"):
        out[layout] = base / layout
        make_sample_layout(out[layout], layout, **SAMPLE)
    saved = datasets.load_from_disk(str(out["hf"]))
    out["parquet"] = base / "parquet"
    (out["parquet"] / "data").mkdir(parents=True)
    for i in range(2):
        saved["train"].shard(2, i, contiguous=True).to_parquet(
            out["parquet"] / "data" / f"train-0000{i}-of-00002.parquet"
        )
    saved["validation"].to_parquet(out["parquet"] / "data" / "validation-00000-of-00001.parquet")
    return out


# (data section, steps of the 2-epoch run): save_to_disk and imagefolder and JSONL are tables of 128 pairs (two
# captions per image: 8 steps of 16 per epoch); the Parquet stream is 64 rows (one caption drawn per image: 4 steps)
CASES = {
    "save_to_disk": ({"format": "hf"}, 16),
    "imagefolder": ({"format": "imagefolder"}, 16),
    "parquet_stream": ({"format": "hf", "streaming": True}, 8),
    "jsonl": ({"format": "jsonl"}, 16),
}
ROOT_OF = {"save_to_disk": "hf", "imagefolder": "imagefolder", "parquet_stream": "parquet", "jsonl": "jsonl"}


def _config(tmp: Path, root: Path, data: dict, workers: int = 0) -> dict:
    raw = micro_config(tmp, root)
    raw["data"].update(data, num_workers=workers)
    return raw


# ---------------------------------------------------------------------------------------------------------------
# Reading each layout


def test_every_layout_holds_the_pairs_of_the_folder_layout(layouts: dict[str, Path], small_data: Path) -> None:
    folder, _ = read_split(small_data, "train")
    for fmt, root in (("hf", layouts["hf"]), ("imagefolder", layouts["imagefolder"]), ("jsonl", layouts["jsonl"])):
        train, val = open_tables(RowSpec(fmt, root), "train", "val", "raise")
        assert train.captions == folder.captions, fmt  # same pairs, same order
        assert val is not None and len(val) == 48 and len(val.images()[0]) == 24, fmt
        first = train.source(0)
        data = first.data if hasattr(first, "data") else first.read_bytes()
        assert data == (small_data / "images" / "train" / folder.filenames[0]).read_bytes(), fmt


def test_the_imagefolder_also_loads_with_datasets(layouts: dict[str, Path], tmp_path: Path) -> None:
    loaded = datasets.load_dataset("imagefolder", data_dir=str(layouts["imagefolder"]), cache_dir=str(tmp_path))
    assert set(loaded) == {"train", "validation"}
    train, _ = open_tables(RowSpec("imagefolder", layouts["imagefolder"]), "train", "", "raise")
    theirs = [c for row in loaded["train"]["caption"] for c in row]
    assert sorted(theirs) == sorted(train.captions) and len(loaded["train"]) == 64
    assert isinstance(loaded["train"][0]["image"], Image.Image)


def test_a_data_set_without_validation_split_has_it_carved_by_image(layouts: dict[str, Path], tmp_path: Path) -> None:
    single = tmp_path / "single.jsonl"
    single.write_text(
        (layouts["jsonl"] / "train.jsonl").read_text().replace('"images/', f'"{layouts["jsonl"]}/images/')
    )
    spec = RowSpec("jsonl", single, val_carve=0.25, val_carve_seed=3)
    train, val = open_tables(spec, "train", "val", "raise")
    assert val is not None and len(val.images()[0]) == 16 and len(train.images()[0]) == 48  # 25% of 64 images
    train_files = {str(train.refs[k]) for k in train.images()[0]}
    assert not train_files & {str(val.refs[k]) for k in val.images()[0]}  # both captions of an image go together
    again = open_tables(spec, "train", "val", "raise")[1]
    assert again is not None and again.captions == val.captions  # the seed fixes it
    with pytest.raises(DataError, match="no split 'val'"):
        open_tables(RowSpec("jsonl", single, val_carve=0), "train", "val", "raise")


def test_sample_data_writes_each_layout_under_the_output_rule(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sample_hf"
    args = ["-q", "sample-data", "--out", str(out), "--format", "hf", "--train-images", "8", "--val-images", "4"]
    assert main(args) == 0
    assert "data.format=hf" in capsys.readouterr().out
    assert datasets.load_from_disk(str(out))["train"].num_rows == 8
    assert main(args) == 0  # a rerun reuses its own set
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError):
        make_sample_layout(mine, "jsonl", train_images=8, val_images=4)
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(os.listdir(mine)) == ["notes.txt"]


def test_make_shards_from_a_save_to_disk_folder(layouts: dict[str, Path], small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert main(["-q", "make-shards", "--data", str(layouts["hf"]), "--split", "train", "--out", str(out)]) == 0
    samples = list(raw_samples(expand_shards(str(out / "train-000000.tar"))))
    folder, _ = read_split(small_data, "train")
    assert [s["txt"].decode() for s in samples] == list(folder.captions)
    assert samples[0]["jpg"] == (small_data / "images" / "train" / folder.filenames[0]).read_bytes()


def test_hf_id_needs_format_hf() -> None:
    with pytest.raises(ConfigError, match="hf_id"):
        config_from_dict({"data": {"format": "csv", "hf_id": "user/captions"}})


def test_without_datasets_the_error_names_the_extra(layouts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(HIDE_PACKAGES, encoding="utf-8")
    src = Path(__file__).parents[1] / "src"
    env = {**os.environ, "FP_HIDE": "datasets", "PYTHONPATH": f"{tmp_path}{os.pathsep}{src}"}
    run = subprocess.run(
        [sys.executable, "-m", "finderpartner.cli", "validate-data", "--data", str(layouts["hf"])],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 4, run.stderr
    assert "pip install 'finderpartner[hf]'" in run.stderr and "Traceback" not in run.stderr


# ---------------------------------------------------------------------------------------------------------------
# Bad rows: one clear error naming each


def _png(colour: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


def test_bad_rows_of_a_manifest_are_named_by_line_at_once(tmp_path: Path, capsys) -> None:
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png((i * 40, 0, 0)))
    (tmp_path / "notes.png").write_text("not an image")
    rows = [
        {"image": "0.png", "caption": "a red square"},
        {"image": "1.png", "caption": "  "},  # line 2: empty caption
        {"image": "notes.png", "caption": "a text file"},  # line 3: not an image
        {"image": 5, "caption": "a number"},  # line 4: a non-image cell
        {"image": "3.png", "caption": "fine"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as info:
        open_tables(RowSpec("jsonl", tmp_path), "train", "", "raise")
    message = str(info.value)
    manifest = tmp_path / "train.jsonl"
    assert f"{manifest}:2: empty caption" in message
    assert f"{manifest}:3: " in message and "notes.png" in message and "cannot be decoded as an image" in message
    assert f"{manifest}:4: the 'image' cell is not an image nor a path: int" in message
    assert "3 problem(s)" in message and "data.on_error: skip" in message
    train, _ = open_tables(RowSpec("jsonl", tmp_path), "train", "", "skip")
    assert train.captions == ("a red square", "fine")
    assert main(["validate-data", "--data", str(tmp_path)]) == 1  # the layout is recognised: --format jsonl
    out = capsys.readouterr().out
    assert all(f"train.jsonl:{n}:" in out for n in (2, 3, 4))


def test_bad_rows_of_a_dataset_are_named_by_row(tmp_path: Path) -> None:
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    images = [{"bytes": _png((i * 30, 0, 0)), "path": None} for i in range(6)]
    images[2] = {"bytes": b"this is no image", "path": None}  # row 2: a non-image cell
    texts = ["one", "two", "three", "", "five", "six"]  # row 3: empty caption
    images[5] = None  # row 5: no image
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": images, "text": texts}, features=features)
    ).save_to_disk(str(tmp_path / "ds"))
    spec = RowSpec("hf", tmp_path / "ds")
    with pytest.raises(DataError) as info:
        open_tables(spec, "train", "", "raise")
    message = str(info.value)
    where = f"{tmp_path / 'ds'} [train]"
    assert f"{where}, row 2: the image: cannot be decoded as an image" in message
    assert f"{where}, row 3: empty caption in column 'text'" in message
    assert f"{where}, row 5: no image (the 'image' cell is empty)" in message
    with pytest.raises(DataError, match=r"no column 'caption'; its columns: image, text; set data.text_column"):
        open_tables(RowSpec("hf", tmp_path / "ds", text_column="caption"), "train", "", "raise")


def test_a_missing_column_stops_training_with_its_name(layouts: dict[str, Path], tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    raw = _config(tmp_path, layouts["imagefolder"], {"format": "imagefolder", "text_column": "title"})
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--config", str(cfg)]) == 4
    err = capsys.readouterr().err
    assert "no column 'title'" in err and "file_name, caption" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# Streams: batches independent of the workers, resumable


def _keep_caption(img: Image.Image, caption: str, rng: torch.Generator) -> tuple[torch.Tensor, str]:
    return torch.zeros(1), caption


def _captions(items: list) -> list[str]:
    return [i["caption"] for i in items]


def _stream_batches(root: Path, epoch: int, workers: int, start: int = 0, rank: int = 0, world: int = 1) -> list:
    spec = RowSpec("hf", root, streaming=True)
    streams, base, counts = open_streams(spec)
    columns = Columns.of(streams["train"], spec, "train")
    stream = RowStream(
        prepared(streams["train"], columns),
        _keep_caption,
        _captions,
        columns=columns,
        base=base,
        name="train",
        num_rows=counts["train"],
        global_batch=16,
        seed=5,
        lanes=max(1, workers),
        rank=rank,
        world_size=world,
        shuffle_buffer=20,
    )
    stream.set_position(epoch, start)
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def test_a_stream_gives_the_same_batches_for_any_worker_count_and_after_a_resume(layouts: dict[str, Path]) -> None:
    root = layouts["parquet"]
    one = _stream_batches(root, 0, 0)
    assert len(one) == 4 and all(len(b) == 16 for b in one)
    assert _stream_batches(root, 0, 2) == one
    assert _stream_batches(root, 0, 2, start=1) == one[1:]
    assert _stream_batches(root, 1, 0) != one  # a new order each epoch


# ---------------------------------------------------------------------------------------------------------------
# Two processes: disjoint shares that cover the data

_SHARES = """
import json, sys
import torch, torch.distributed as dist
from torch.utils.data import DataLoader
from finderpartner.config import config_from_dict
from finderpartner.data.sources import Loading, Passes, open_training_data

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
seen = {}
for name, raw in json.loads(sys.argv[1]).items():
    cfg = config_from_dict(raw)
    data = open_training_data(cfg.data, Passes.of(cfg.train), need_captions=False, progress=False)
    keep = lambda img, caption, rng: (torch.zeros(1), caption)
    collate = lambda items: [(i["index"], i["caption"]) for i in items]
    loading = Loading(keep, collate, 16, rank, world, 5, torch.device("cpu"), 0)
    batches, loader = data.batches(loading)
    batches.set_position(0, 0)
    seen[name] = [pair for batch in loader for pair in batch]
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:
    json.dump(seen, f)
dist.barrier()
"""


def _unique_rows(folder: Path, files: int) -> Path:
    """64 rows, each a distinct image and the caption 'row NN', as Parquet files (hub-style names)."""
    folder.mkdir()
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": _png((i, 0, 0)), "path": None} for i in range(64)]}
    rows["caption"] = [f"row {i:02d}" for i in range(64)]
    ds = datasets.Dataset.from_dict(rows, features=features)
    for i in range(files):
        ds.shard(files, i, contiguous=True).to_parquet(folder / f"train-{i:05d}-of-{files:05d}.parquet")
    return folder


def test_two_gloo_processes_see_disjoint_shares_that_cover_the_data(layouts: dict[str, Path], tmp_path: Path) -> None:
    configs = {}
    for name, root, data in (
        ("stream by files", _unique_rows(tmp_path / "two", 2), {"format": "hf", "streaming": True}),
        ("stream by rows", _unique_rows(tmp_path / "three", 3), {"format": "hf", "streaming": True}),
        ("jsonl table", layouts["jsonl"], {"format": "jsonl", "cache_images": False}),
    ):
        configs[name] = _config(tmp_path / name.replace(" ", "_"), root, {**data, "val_split": ""})
    script = tmp_path / "shares.py"
    script.write_text(_SHARES)
    run = run_torchrun(str(script), json.dumps(configs), str(tmp_path), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in configs:
        mine, theirs = ranks[0][name], ranks[1][name]
        assert len(mine) == len(theirs) > 0, name
        if name.startswith("stream"):
            assert not {c for _, c in mine} & {c for _, c in theirs}, name  # disjoint
            assert sorted(c for _, c in mine + theirs) == [f"row {i:02d}" for i in range(64)], name  # covering
        else:  # a table: every pair once per epoch, each position on one process
            positions = sorted(i for i, _ in mine + theirs)
            assert positions == sorted(set(positions)) and len(positions) == 128, name


# ---------------------------------------------------------------------------------------------------------------
# Training: a few steps, validation, and a resume bitwise equal to an uninterrupted run


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_training_validates_and_resumes_exactly(
    case: str, layouts: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    data, steps = CASES[case]
    root = layouts[ROOT_OF[case]]
    workers = 2 if case == "parquet_stream" else 0  # the stream's lanes; tables: the sampler in the main process
    reference = train_module.train(config_from_dict(_config(tmp_path / "a", root, data, workers)))
    assert reference.state.global_step == steps
    assert reference.final is not None and reference.final.num_images == 24 and reference.final.num_captions == 48

    real_step, calls = train_module._train_step, {"n": 0}

    def crash_after(run, batch, window):  # a crash mid-epoch 2, after the checkpoint of step 4 (and 8)
        calls["n"] += 1
        if calls["n"] > steps - 3:
            raise KeyboardInterrupt
        real_step(run, batch, window)

    monkeypatch.setattr(train_module, "_train_step", crash_after)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config_from_dict(_config(tmp_path / "b", root, data, workers)))
    monkeypatch.setattr(train_module, "_train_step", real_step)
    resumed = train_module.train(config_from_dict(_config(tmp_path / "b", root, data, workers)), resume="auto")
    assert resumed.state.global_step == steps
    ours = load_file(sorted((resumed.run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    theirs = load_file(sorted((reference.run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert resumed.final is not None and resumed.final.metrics == reference.final.metrics


@pytest.mark.slow
def test_save_to_disk_trains_exactly_as_the_folder_layout(
    layouts: dict[str, Path], small_data: Path, tmp_path: Path
) -> None:
    folder = train_module.train(config_from_dict(micro_config(tmp_path / "folder", small_data)))
    saved = train_module.train(config_from_dict(_config(tmp_path / "hf", layouts["hf"], {"format": "hf"})))
    a = load_file(folder.best_model / "model.safetensors")
    b = load_file(saved.best_model / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert folder.final is not None and saved.final is not None and folder.final.metrics == saved.final.metrics


def test_validate_rows_reports_every_split(layouts: dict[str, Path]) -> None:
    reports = validate_rows(RowSpec("hf", layouts["hf"]))
    assert [(r.split, len(r.table), r.fatal) for r in reports] == [("train", 128, []), ("validation", 48, [])]


def test_a_hub_id_is_read_through_datasets(layouts: dict[str, Path], tmp_path: Path) -> None:
    """data.hf_id goes through datasets.load_dataset as a hub id does; offline, a local folder stands for the hub."""
    from finderpartner.data.sources import Passes, open_training_data

    raw = _config(tmp_path, tmp_path / "unused", {"format": "hf", "hf_id": str(layouts["parquet"]), "streaming": True})
    cfg = config_from_dict(raw)
    data = open_training_data(cfg.data, Passes.of(cfg.train), need_captions=True, progress=False)
    assert data.num_rows == 64 and len(data.captions) == 128  # rows counted by reading; every caption for the tokenizer
    assert data.val is not None and len(data.val.images) == 24 and len(data.val.captions) == 48


@pytest.mark.slow
@pytest.mark.parametrize("case", ["save_to_disk", "parquet_stream"])
def test_a_time_budget_ends_cleanly_on_every_source(case: str, layouts: dict[str, Path], tmp_path: Path) -> None:
    from finderpartner.train.budget import MEASURE_STEPS, SKIP_STEPS

    data, _ = CASES[case]
    raw = _config(tmp_path, layouts[ROOT_OF[case]], data)
    raw["train"].update(time_budget="1s", warmup_steps=0)
    result = train_module.train(config_from_dict(raw))
    # (nearly) spent during start-up: the run stops at the steps it planned where the count is decided, after several
    # epochs of the stream (how many steps a fast machine still fits into the second is its own: 30 or 31 seen)
    assert result.state.global_step == result.state.planned_steps >= SKIP_STEPS + MEASURE_STEPS
    assert result.state.epoch >= (SKIP_STEPS + MEASURE_STEPS) // 8  # 8 steps an epoch: the source was read again
    assert result.final is not None and result.best_model.is_dir()
