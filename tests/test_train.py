from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import micro_config, modes_off_usual
from safetensors.torch import load_file

import finderpartner.train.recipe as train_module
from finderpartner.config import config_from_dict
from finderpartner.train import train

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(newest / "model.safetensors")


def test_training_run_produces_everything(small_data: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(micro_config(tmp_path, small_data, epochs=2))
    result = train(cfg)
    run = result.run_dir
    assert result.state.global_step == 16  # 128 pairs / batch 16 = 8 steps per epoch
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json", "README.md"):
        assert (result.best_model / name).is_file(), name
    card = (result.best_model / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card and "text_to_image" in card
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "train/loss" in r]
    val_lines = [r for r in lines if "val/mean_recall" in r]
    assert [r["step"] for r in train_lines] == list(range(2, 17, 2))
    assert [r["step"] for r in val_lines] == [8, 16]
    assert "val/retrieval/text_to_image_caption_aware/R@1" in val_lines[0]
    assert train_lines[-1]["train/loss"] < train_lines[0]["train/loss"]  # it learns
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000012", "step_000016"]  # keep 2
    assert result.final is not None and result.final.num_images == 24
    # everything readable by others as the umask allows: safetensors alone would write the weights 0600
    assert modes_off_usual(run) == {}


@pytest.mark.parametrize("workers", [0, 1])
def test_interrupted_run_resumes_to_identical_weights(
    small_data: Path, tmp_path: Path, monkeypatch, workers: int
) -> None:
    reference = train(config_from_dict(micro_config(tmp_path / "a", small_data)))

    real_step = train_module._train_step
    calls = {"n": 0}

    def crash_after_ten(run, batch, window):  # dies mid-epoch 2, two steps after the checkpoint at step 8
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        real_step(run, batch, window)

    raw = micro_config(tmp_path / "b", small_data)
    raw["data"]["num_workers"] = workers
    monkeypatch.setattr(train_module, "_train_step", crash_after_ten)
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(raw))
    monkeypatch.setattr(train_module, "_train_step", real_step)
    resumed = train(config_from_dict(raw), resume="auto")
    assert resumed.state.global_step == reference.state.global_step == 16

    ours, theirs = final_weights(resumed.run_dir), final_weights(reference.run_dir)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def _colour_folder(small_data: Path, out: Path) -> Path:
    """The val images as a zero-shot ImageFolder by colour (the caption's third word)."""
    import csv
    import shutil

    with open(small_data / "captions_val.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["caption"].startswith("a "):
                (out / row["caption"].split()[2]).mkdir(parents=True, exist_ok=True)
                shutil.copy(small_data / "images" / "val" / row["filename"], out / row["caption"].split()[2])
    return out


def test_fine_tuning_validates_once_before_the_first_step_and_reports_before_and_after(
    trained_model: Path, small_data: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """From pretrained weights (a saved folder) the split and each zero-shot set are validated before step 1; the
    summary and the card show before -> after for every figure; a resume keeps the first 'before' (no rerun)."""
    raw = micro_config(tmp_path, small_data)
    raw["model"] = {"name": str(trained_model)}
    raw["eval"] = {"zeroshot": [{"path": str(_colour_folder(small_data, tmp_path / "colours")), "name": "colour"}]}
    real_evaluate, real_step = train_module._evaluate, train_module._train_step
    evaluated: list[int] = []

    def counting_evaluate(run):  # the real validation, counted by the step it runs at
        evaluated.append(run.state.global_step)
        return real_evaluate(run)

    def crash_after_ten(run, batch, window):  # dies two steps after the checkpoint at step 8
        if run.state.global_step >= 10:
            raise KeyboardInterrupt
        real_step(run, batch, window)

    monkeypatch.setattr(train_module, "_evaluate", counting_evaluate)
    monkeypatch.setattr(train_module, "_train_step", crash_after_ten)
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(raw))
    assert evaluated == [0, 8]
    monkeypatch.setattr(train_module, "_train_step", real_step)
    with caplog.at_level("INFO", logger="finderpartner"):
        result = train(config_from_dict(raw), resume="auto")
    # resumed at step 8 (its checkpoint precedes that epoch's validation, which runs again): no second "before"
    assert evaluated == [0, 8, 8, 16]

    before = result.state.before
    assert before is not None and {"text_to_image_caption_aware/R@1", "loss", "zeroshot/colour/top1"} <= set(before)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in lines if "val/mean_recall" in r]
    assert val_steps[0] == 0 and val_steps.count(0) == 1 and val_steps[-1] == 16
    first = next(r for r in lines if "val/mean_recall" in r)
    assert first["val/mean_recall"] == pytest.approx(before["mean_recall"])
    assert first["val/zeroshot/colour/top1"] == pytest.approx(before["zeroshot/colour/top1"])
    card = (result.best_model / "README.md").read_text()
    summary = caplog.text[caplog.text.index("before -> after fine-tuning") :]
    for text in (card[card.index("Before -> after fine-tuning") :], summary):
        rows = {
            line.split()[0]: line.split()[1:]
            for line in text.splitlines()[1:]
            if line.split()[:1] in ([n] for n in before)
        }
        assert set(rows) == set(before)  # every figure, once
        for name, (was, now, change) in rows.items():
            assert float(was) == pytest.approx(before[name], abs=1e-4)
            assert float(change) == pytest.approx(float(now) - float(was), abs=2e-4)


def test_tiny_data_set_still_trains(tmp_path: Path) -> None:
    from finderpartner.data.sample import make_sample_data

    root = tmp_path / "few"
    make_sample_data(root, train_images=3, val_images=2, image_size=32)  # 6 pairs, batch 16
    result = train(config_from_dict(micro_config(tmp_path, root, epochs=1)))
    assert result.state.global_step == 1 and result.best_model.is_dir()


@pytest.mark.parametrize(("warmup", "total", "floor"), [(10, 100, 0.0), (5, 37, 0.1), (0, 20, 0.05)])
def test_the_lr_schedule_is_transformers_cosine_with_min_lr_after_the_warm_up(
    warmup: int, total: int, floor: float
) -> None:
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    def lrs(make) -> list[float]:  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler, out = make(optimizer), []
        for _ in range(total + 3):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    ours = lrs(lambda o: train_module.build_scheduler(o, warmup, total, floor))
    theirs = lrs(lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, warmup, total, min_lr_rate=floor))
    assert ours[warmup : total + 1] == pytest.approx(theirs[warmup : total + 1], abs=1e-12, rel=0)
    assert ours[total:] == [0.5 * floor] * 3  # past the end ours stays at the floor (theirs climbs back up)
    # the warm-up differs on purpose: theirs starts at 0 (a step that changes nothing), ours at 1/(w+1)
    assert all(0 < ours[s] <= 0.5 for s in range(warmup)) and (warmup == 0 or theirs[0] == 0)
