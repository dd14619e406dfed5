"""Zero-shot classification: the metrics by hand, equality with transformers' pipeline, the two layouts and their
bad inputs, the eval command's outputs, and eval.zeroshot during training."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import MICRO_SPEC, end_worker, micro_config, run_torchrun

from finderpartner.cli import main
from finderpartner.config import TinySpec, config_from_dict
from finderpartner.data.sample import COLOURS, make_sample_data
from finderpartner.data.transforms import normalize
from finderpartner.embedding import embed_images
from finderpartner.errors import ConfigError, DataError
from finderpartner.model import DualEncoder, build_tiny, load_model
from finderpartner.zeroshot import (
    TEMPLATES,
    ZeroShotSet,
    class_embeddings,
    evaluate_zeroshot,
    load_zeroshot_set,
    read_templates,
    score_zeroshot,
)

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

FAST = ["--precision", "fp32", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def shapes32(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    """12 sample images at 32 px (the micro model's own size: no resize, so any preprocessing agrees), by colour."""
    root = tmp_path_factory.mktemp("zs") / "sample"
    make_sample_data(root, train_images=0, val_images=12, image_size=32)
    with open(root / "captions_val.csv", encoding="utf-8", newline="") as f:
        first = {}
        for row in csv.DictReader(f):
            first.setdefault(row["filename"], row["caption"])  # "a large red circle on the left"
    files = sorted(first)
    return [root / "images" / "val" / name for name in files], [first[name].split()[2] for name in files]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory, shapes32: tuple[list[Path], list[str]]) -> Path:
    """ImageFolder layout: colours/<colour>/<file>."""
    root = tmp_path_factory.mktemp("folder") / "colours"
    for image, colour in zip(*shapes32):
        (root / colour).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / colour / image.name)
    return root


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])
    return path


# --------------------------------------------------------------------------------------------------------------
# (a) the metrics, by hand


def test_metrics_and_confusion_by_hand() -> None:
    class_emb = torch.eye(6)  # the scores of an image are its own coordinates
    image_emb = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # class 0: rank 1
            [0.2, 0.8, 0.5, 0.4, 0.3, 0.1],  # class 0: rank 5 (0.8, 0.5, 0.4, 0.3 above it), predicted 1
            [0.1, 0.7, 0.2, 0.0, 0.0, 0.0],  # class 1: rank 1
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # class 2: rank 3, predicted 0
            [0.1, 0.2, 0.3, 0.05, 0.4, 0.5],  # class 3: rank 6, predicted 5
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # class 5: rank 1
        ]
    )
    labels = [0, 0, 1, 2, 3, 5]  # class 4 has no image: left out of the mean per-class recall (as sklearn's)
    result = score_zeroshot("hand", image_emb, class_emb, labels, [f"c{i}" for i in range(6)], ["{}"])
    assert result.metrics["top1"] == pytest.approx(3 / 6)
    assert result.metrics["top5"] == pytest.approx(5 / 6)
    assert result.metrics["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 + 0 + 0 + 1) / 5)
    expected = torch.zeros(6, 6, dtype=torch.long)
    for true, predicted in [(0, 0), (0, 1), (1, 1), (2, 0), (3, 5), (5, 5)]:
        expected[true, predicted] += 1
    assert result.confusion.tolist() == expected.tolist()
    summary = result.summary()
    assert summary["per_class_recall"] == {"c0": 0.5, "c1": 1.0, "c2": 0.0, "c3": 0.0, "c4": None, "c5": 1.0}
    # fewer than 5 classes: no top5
    two = score_zeroshot("two", image_emb[:3, :2], torch.eye(2), [0, 0, 1], ["a", "b"], ["{}"])
    assert set(two.metrics) == {"top1", "mean_per_class_recall"} and two.metrics["top1"] == pytest.approx(2 / 3)


def test_class_embedding_is_the_renormalised_mean_of_normalised_prompts(trained_model: Path) -> None:
    encoder = load_model(trained_model)
    classes, templates = ["red", "blue", "dark green"], ["a {} circle", "{} square on the left", "a small {} star"]
    got = class_embeddings(encoder, classes, templates)
    with torch.no_grad():
        for i, name in enumerate(classes):
            each = encoder.encode_texts([t.replace("{}", name) for t in templates])  # normalised, one per template
            assert torch.allclose(each.norm(dim=-1), torch.ones(3), atol=1e-5)
            assert torch.allclose(got[i], F.normalize(each.mean(0), dim=0), atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# (b) equal to transformers' zero-shot-image-classification pipeline


def test_equals_transformers_pipeline(trained_model: Path, shapes32: tuple[list[Path], list[str]]) -> None:
    """Image by image: the pipeline's top label is ours and its scores are softmax(logit_scale.exp() * cos) of ours.

    The pipeline fills one ``hypothesis_template`` per label (no averaging), so one template is compared. It
    preprocesses with the saved CLIPImageProcessor; ours is PIL bicubic with ``reducing_gap`` then a centre crop,
    which differs by up to ~0.015 in normalised pixels when an image is resized: these images are already at the
    model's 32 px, where both leave the pixels as they are (checked below).
    """
    from PIL import Image
    from transformers import pipeline

    files, _ = shapes32
    encoder = load_model(trained_model)
    classes, template = sorted(COLOURS), "a large {} circle on the left"
    image_emb, failed = embed_images(encoder, files)
    assert not failed
    class_emb = class_embeddings(encoder, classes, [template])
    ours = torch.softmax(encoder.model.logit_scale.exp().item() * image_emb @ class_emb.T, dim=-1)
    pipe = pipeline("zero-shot-image-classification", model=str(trained_model), device="cpu")
    worst = 0.0
    for i, file in enumerate(files):
        with Image.open(file) as img:
            pixels = pipe.image_processor(images=[img.convert("RGB")], return_tensors="pt")["pixel_values"]
            # the same inputs (bitwise with transformers 5; transformers 4's processor rescales in another order)
            ours_pixels = normalize(encoder.preprocess([img.convert("RGB")]), encoder.image_spec)
            assert (ours_pixels - pixels).abs().max() < 1e-5
        answer = pipe(str(file), candidate_labels=classes, hypothesis_template=template)
        theirs = {a["label"]: a["score"] for a in answer}
        assert answer[0]["label"] == classes[int(ours[i].argmax())]
        worst = max(worst, max(abs(theirs[c] - float(ours[i, j])) for j, c in enumerate(classes)))
    print(f"pipeline vs ours: {len(files)} images, top label equal for all, max |score difference| {worst:.2e}")
    assert worst < 1e-4


# --------------------------------------------------------------------------------------------------------------
# (c) the two layouts, and bad inputs


def test_image_folder_layout(colour_folder: Path, tmp_path: Path) -> None:
    (colour_folder.parent / "dark_red").mkdir(exist_ok=True)  # not inside colour_folder: no effect
    zset = load_zeroshot_set(colour_folder)
    folders = sorted(p.name for p in colour_folder.iterdir())
    assert zset.name == "colours" and zset.classes == folders and len(zset.images) == 12
    assert all(zset.classes[label] == image.parent.name for image, label in zip(zset.images, zset.labels))
    # underscores become spaces; a names file picks folders and their order
    renamed = tmp_path / "set"
    shutil.copytree(colour_folder / folders[0], renamed / "light_blue")
    shutil.copytree(colour_folder / folders[1], renamed / "deep_sea")
    (tmp_path / "names.txt").write_text("light_blue\n\ndeep_sea\n", encoding="utf-8")
    picked = load_zeroshot_set(renamed, tmp_path / "names.txt")
    assert picked.classes == ["light blue", "deep sea"] and picked.images[0].parent.name == "light_blue"
    (tmp_path / "names.txt").write_text("light_blue\nteal\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"class folder .*set/teal not found \(class 'teal' of .*names.txt\)"):
        load_zeroshot_set(renamed, tmp_path / "names.txt")
    (renamed / "empty").mkdir()
    (tmp_path / "names.txt").write_text("light_blue\nempty\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"class folder .*set/empty holds no images"):
        load_zeroshot_set(renamed, tmp_path / "names.txt")
    with pytest.raises(DataError, match="not found"):
        load_zeroshot_set(tmp_path / "nowhere")


def test_csv_layout_equals_the_folder_layout(
    trained_model: Path, colour_folder: Path, shapes32: tuple[list[Path], list[str]], tmp_path: Path
) -> None:
    rows = [(f"{colour}/{image.name}", colour) for image, colour in zip(*shapes32)]
    labels = _write_csv(colour_folder / "labels.csv", rows)
    try:
        from_csv, from_folder = load_zeroshot_set(labels), load_zeroshot_set(colour_folder)
        assert from_csv.name == "labels" and from_csv.classes == sorted({c for _, c in rows})
        encoder = load_model(trained_model)
        a = evaluate_zeroshot(encoder, from_csv, device=torch.device("cpu"))
        b = evaluate_zeroshot(encoder, from_folder, device=torch.device("cpu"))
        assert a.metrics == b.metrics and (a.confusion == b.confusion).all() and a.templates == list(TEMPLATES)
        # with a names file, classes and their order come from it (a class may have no image)
        names = tmp_path / "names.txt"
        names.write_text("\n".join(["teal", *reversed(from_csv.classes)]) + "\n", encoding="utf-8")
        named = load_zeroshot_set(labels, names)
        assert named.classes[0] == "teal" and 0 not in named.labels
        names.write_text("\n".join(from_csv.classes[1:]) + "\n", encoding="utf-8")
        missing = from_csv.classes[0]
        line = 2 + [c for _, c in rows].index(missing)
        with pytest.raises(DataError, match=rf"labels.csv, line {line}: label '{missing}' is not in .*names.txt"):
            load_zeroshot_set(labels, names)
    finally:
        labels.unlink()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("filename,caption\na.jpg,red\n", r"bad.csv: the first line must be the header 'filename,label'"),
        ("filename,label\nmissing.jpg,red\n", r"bad.csv, line 2: image .*missing.jpg not found"),
        ("filename,label\n../a.jpg,red\n", r"bad.csv, line 2: '../a.jpg' leaves the CSV's folder"),
        ("filename,label\na.jpg,red\nb.jpg\n", r"bad.csv, line 3: expected 'filename,label'"),
        ("filename,label\n", r"bad.csv holds no images"),
    ],
)
def test_bad_csv_names_file_and_line(
    tmp_path: Path, shapes32: tuple[list[Path], list[str]], text: str, message: str
) -> None:
    shutil.copy(shapes32[0][0], tmp_path / "a.jpg")
    (tmp_path / "bad.csv").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_zeroshot_set(tmp_path / "bad.csv")


def test_templates_file(tmp_path: Path) -> None:
    assert read_templates(None) == list(TEMPLATES) and all(t.count("{}") == 1 for t in TEMPLATES)
    good = tmp_path / "good.txt"
    good.write_text("a photo of a {}.\n\n  a {} shape  \n", encoding="utf-8")
    assert read_templates(good) == ["a photo of a {}.", "a {} shape"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\n\na drawing\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"templates file .*bad.txt, line 3: 'a drawing' must contain '\{\}'"):
        read_templates(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"templates file .*empty.txt is empty"):
        read_templates(empty)
    with pytest.raises(DataError, match=r"templates file .*none.txt not found"):
        read_templates(tmp_path / "none.txt")


# --------------------------------------------------------------------------------------------------------------
# (d) the command


def test_eval_classes_writes_report_and_plot(
    trained_model: Path, colour_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    args = ["eval", "--model", str(trained_model), "--classes", str(colour_folder), "--out", str(out), *FAST]
    assert main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = out / f"{trained_model.name}_zeroshot_colours.json"
    stored = json.loads(report.read_text(encoding="utf-8"))
    assert stored["zeroshot"] == printed["zeroshot"] and set(printed["zeroshot"]) == {
        "top1",
        "top5",
        "mean_per_class_recall",
    }
    assert stored["num_images"] == 12 and stored["classes"] == sorted(p.name for p in colour_folder.iterdir())
    assert (out / "plots" / f"{trained_model.name}_zeroshot_colours_confusion.png").stat().st_size > 1000
    assert (out / ".finderpartner.json").is_file() and (out / "history.jsonl").is_file()
    # the same folder again (this command made it), and the retrieval eval beside it
    templates = tmp_path / "templates.txt"
    templates.write_text("a large {} circle on the left\n", encoding="utf-8")
    assert main([*args, "--templates", str(templates)]) == 0
    assert "top1" in capsys.readouterr().out
    assert json.loads(report.read_text(encoding="utf-8"))["templates"] == ["a large {} circle on the left"]


def test_eval_classes_refuses_what_it_did_not_make(
    trained_model: Path, colour_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    args = ["eval", "--model", str(trained_model), "--classes", str(colour_folder), *FAST]
    assert main([*args, "--out", str(mine)]) == 10
    assert "notes.txt" in capsys.readouterr().err and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    inside = colour_folder / "eval"
    assert main([*args, "--out", str(inside)]) == 10  # inside the input images
    err = capsys.readouterr().err
    assert f"--out {inside} is inside the input" in err and "Loading weights" not in err and not inside.exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert main([*args, "--out", str(tmp_path / "eval"), "--templates", str(empty)]) == 4
    err = capsys.readouterr().err
    assert f"templates file {empty} is empty" in err and "Traceback" not in err and not (tmp_path / "eval").exists()
    assert main(["eval", "--model", str(trained_model), "--data", str(tmp_path), "--templates", str(empty)]) == 2
    assert "--templates go with --classes" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# During training


def test_training_logs_zeroshot_and_selects_by_it(small_data: Path, colour_folder: Path, tmp_path: Path) -> None:
    from finderpartner.train import train

    raw = micro_config(tmp_path, small_data, epochs=2)
    raw["eval"] = {
        "zeroshot": [{"path": str(colour_folder), "name": "colour"}],
        "best_metric": "zeroshot/colour/mean_per_class_recall",
    }
    result = train(config_from_dict(raw))
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [line for line in lines if "val/zeroshot/colour/top1" in line]
    assert len(validations) == 2 and all("val/zeroshot/colour/mean_per_class_recall" in v for v in validations)
    best = max(validations, key=lambda v: v["val/zeroshot/colour/mean_per_class_recall"])  # the first of equals
    assert result.state.best_metric == best["val/zeroshot/colour/mean_per_class_recall"]
    assert result.state.best_step == best["step"]
    raw["eval"]["best_metric"] = "zeroshot/colours/top1"
    with pytest.raises(ConfigError, match="did you mean 'zeroshot/colour/top1'"):
        config_from_dict(raw)
    raw["eval"]["best_metric"] = "zeroshot/colour/top1"
    raw["data"]["val_split"] = None
    with pytest.raises(ConfigError, match="eval.zeroshot is evaluated at each validation"):
        train(config_from_dict({**raw, "experiment": "no_val"}))


def _colour_set(small_data: Path) -> tuple[DualEncoder, ZeroShotSet]:
    """The same model (seed 0) and 23 val images by colour (uneven shares for 2 processes) in every process."""
    with open(small_data / "captions_train.csv", encoding="utf-8", newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    encoder = build_tiny(TinySpec(**MICRO_SPEC), captions, seed=0)
    with open(small_data / "captions_val.csv", encoding="utf-8", newline="") as f:
        first: dict[str, str] = {}
        for row in csv.DictReader(f):
            first.setdefault(row["filename"], row["caption"].split()[2] if row["caption"].startswith("a ") else "")
    files = sorted(first)[:23]
    classes = sorted(COLOURS)
    images = [small_data / "images" / "val" / name for name in files]
    return encoder, ZeroShotSet("colour", images, [classes.index(first[name]) for name in files], classes)


def test_two_gloo_processes_classify_as_one(small_data: Path, tmp_path: Path) -> None:
    """Each process embeds its share of the images; both get the figures of one process (the best-model decision)."""
    encoder, zset = _colour_set(small_data)
    one = evaluate_zeroshot(encoder, zset, device=torch.device("cpu"), batch_size=8).summary()
    out = tmp_path / "zeroshot.json"
    run = run_torchrun(__file__, str(small_data), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["rank_0"] == two["rank_1"]
    assert two["rank_0"]["confusion"] == one["confusion"] and two["rank_0"]["num_images"] == 23
    assert two["rank_0"]["zeroshot"] == pytest.approx(one["zeroshot"], abs=1e-6)


def _worker(small_data: Path, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    encoder, zset = _colour_set(small_data)
    summary = evaluate_zeroshot(encoder, zset, device=torch.device("cpu"), batch_size=8, distributed=True).summary()
    everyone: list[dict] = [{}, {}]
    dist.all_gather_object(everyone, summary)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"rank_0": everyone[0], "rank_1": everyone[1]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # the worker of the two-process test, started by torchrun
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
    end_worker()


def test_an_empty_class_folder_is_said_to_be_left_out(
    colour_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = Path(shutil.copytree(colour_folder, tmp_path / "colours"))
    (root / "purple").mkdir()  # the user forgot to copy this class's images
    (root / ".cache").mkdir()  # hidden: not a class, not worth a word
    with caplog.at_level("WARNING", logger="finderpartner"):
        zset = load_zeroshot_set(root)
    assert "purple" not in zset.classes and len(zset.classes) == len(list(colour_folder.iterdir()))
    assert (
        f"zero-shot set {root}: 1 folder(s) hold no images (purple) and are left out: classifying among the "
        f"{len(zset.classes)} other classes"
    ) in caplog.text
    assert ".cache" not in caplog.text
