from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from finderpartner.config import (
    Config,
    apply_overrides,
    config_from_dict,
    load_config,
    preset_config,
    preset_names,
    preset_path,
    render_yaml,
)
from finderpartner.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped() -> None:
    assert {p.name for p in CONFIGS} >= {"clip_tiny.yaml", "clip_base.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)  # raises ConfigError on any problem
    assert isinstance(cfg, Config)


def test_presets_are_the_shipped_files_and_old_names_are_aliases() -> None:
    root = Path(__file__).parents[1] / "configs"
    assert preset_names() == sorted(p.stem for p in CONFIGS)
    for name in preset_names():
        assert preset_path(name) == root / f"{name}.yaml"
    for old, new in {"tiny": "clip_tiny", "rtx3060": "clip_base", "minilm": "minilm_tiny_vit"}.items():
        assert preset_config(old) == preset_config(new) == load_config(root / f"{new}.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'; the presets are the shipped configs: clip_base, "):
        preset_path("huge")


def test_three_mistakes_are_all_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n  batch_sise: 64\nmodel:\n  tiny:\n    patch_size: 7\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "train.lr: Input should be greater than 0 (got -1)" in message
    assert "train.batch_sise: unknown key; did you mean 'batch_size'?" in message
    assert "model.tiny: patch_size 7 must divide image_size 64" in message


def test_unknown_section_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"modle: unknown key; did you mean 'model'\?"):
        config_from_dict({"modle": {"name": "tiny"}})


def test_wrong_type_and_choice_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"precision": "fp8", "epochs": "many"}})
    assert "train.precision" in str(err.value) and "'auto', 'fp32', 'bf16' or 'fp16'" in str(err.value)
    assert "train.epochs" in str(err.value)


def test_overrides_are_parsed_as_yaml_and_validated() -> None:
    cfg = load_config(
        None, ["train.lr=3e-4", "train.micro_batch_size=8", "data.augment.hflip=false", "model.name=tiny"]
    )
    assert cfg.train.lr == 3e-4 and cfg.train.micro_batch_size == 8
    assert cfg.data.augment.hflip is False and cfg.model.name == "tiny"
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr is a value, not a section"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="train.lrr: unknown key; did you mean 'lr'"):
        load_config(None, ["train.lrr=1"])


def test_missing_file_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found; `finderpartner init-config"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize("name", preset_names())
def test_rendered_config_round_trips(name: str) -> None:
    cfg = preset_config(name)
    text = render_yaml(cfg)
    assert "# " in text  # commented
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_config_is_immutable() -> None:
    cfg = preset_config("clip_tiny")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_best_metric_is_checked_up_front_and_ranks_count_lower_as_better() -> None:
    from finderpartner.evaluate import EvalResult

    with pytest.raises(ConfigError, match=r"eval.best_metric: .*did you mean 'text_to_image/R@1'"):
        config_from_dict({"eval": {"best_metric": "text_to_image/R1"}})
    assert config_from_dict({"eval": {"best_metric": "image_to_text_caption_aware/median_rank"}})
    better, worse = (
        EvalResult({"text_to_image": {"R@1": r1, "mean_rank": rank}}, loss, {}, 1, 1)
        for r1, rank, loss in ((0.8, 1.5, 0.5), (0.6, 3.0, 0.9))
    )
    for name in ("text_to_image/R@1", "text_to_image/mean_rank", "loss"):
        assert better.select(name) > worse.select(name), name


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("1h", 3600),
        ("90s", 90),
        ("1h30m", 5400),
        ("2.5h", 9000),
        ("10min", 600),
        (" 45 S ", 45),
        (120, 120),
        (1.5, 1.5),
    ],
)
def test_time_budget_is_parsed(text: object, seconds: float) -> None:
    cfg = config_from_dict({"train": {"time_budget": text}})
    assert cfg.train.time_budget_s == seconds
    assert config_from_dict(yaml.safe_load(render_yaml(cfg))) == cfg  # round-trips through the rendered YAML


@pytest.mark.parametrize("bad", ["5", "five minutes", "5x", "-5m", "0s", "5m30", "1.2.3h", "", True, "inf"])
def test_bad_time_budget_is_a_config_error_naming_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"train\.time_budget: ") as err:
        config_from_dict({"train": {"time_budget": bad}})
    assert "1 problem(s)" in str(err.value)
    assert config_from_dict({}).train.time_budget_s is None


def test_time_budget_override_from_the_command_line() -> None:
    assert load_config(None, ["train.time_budget=5m"]).train.time_budget_s == 300
    with pytest.raises(ConfigError, match=r"train\.time_budget: expected a duration such as '90s'"):
        load_config(None, ["train.time_budget=soon"])
