"""The caption tokenizer: ids, specials, truncation, unseen text, and reloading by plain transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers
from tokenizers import pre_tokenizers

from finderpartner.errors import ModelError
from finderpartner.tokenizer import MIN_VOCAB_SIZE, build_caption_tokenizer, save_vocab_files

CAPTIONS = [
    f"a {size} {colour} {shape} " + ("in the center" if pos == "center" else f"on the {pos}")
    for colour in ("red", "green", "blue", "yellow", "purple", "orange")
    for shape in ("circle", "square", "triangle", "star")
    for pos in ("left", "center", "right")
    for size in ("small", "large")
] + ["Hello, World! It's 2024.", "naïve café déjà vu"]
CONTEXT = 8
BOS, EOS, UNK = 0, 1, 2
# Text the training captions never showed: new letters, emoji, other scripts, control characters,
# and the specials' own spelling, which must stay text.
UNSEEN = [
    "zebra",
    "Zebra 🦓 über Ωmega",
    "🦓🦒",
    "控制",
    "tab\there \u0007 bell",
    "x",
    "q z j k",
    "∑∫ ½",
    "a <|endoftext|> b",
    "<|startoftext|><|unk|>",
]
# Plain captions: what a saved tokenizer must encode identically however it is loaded.
PLAIN = ["a small red circle on the left", "a large blue star in the center", "Zebra 🦓 über Ωmega", "x"]


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerFast:
    return build_caption_tokenizer(CAPTIONS, vocab_size=4096, context_length=CONTEXT)


def test_same_captions_give_the_same_tokenizer(tok: transformers.PreTrainedTokenizerFast) -> None:
    again = build_caption_tokenizer(iter(CAPTIONS), vocab_size=4096, context_length=CONTEXT)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_vocab_size_is_an_upper_bound(tok: transformers.PreTrainedTokenizerFast) -> None:
    assert MIN_VOCAB_SIZE < len(tok) < 4096  # a small corpus: fewer merges than the budget
    small = build_caption_tokenizer(CAPTIONS, vocab_size=MIN_VOCAB_SIZE + 10)
    assert len(small) == MIN_VOCAB_SIZE + 10


def test_specials(tok: transformers.PreTrainedTokenizerFast) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (BOS, EOS, EOS, UNK)
    assert tok.convert_ids_to_tokens([BOS, EOS, UNK]) == ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    assert tok.model_max_length == CONTEXT and tok.padding_side == "right"
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(len(tok)))  # contiguous: ids index the embedding
    assert (vocab["!</w>"], vocab["!"], max(vocab.values())) == (3, 259, len(tok) - 1)  # the documented layout
    for symbol in pre_tokenizers.ByteLevel.alphabet():  # every byte, inside and at the end of a word
        assert symbol in vocab and symbol + "</w>" in vocab


def test_caption_is_wrapped_in_bos_and_eos(tok: transformers.PreTrainedTokenizerFast) -> None:
    ids = tok("a red star")["input_ids"]
    assert ids[0] == BOS and ids[-1] == EOS and not {BOS, EOS, UNK} & set(ids[1:-1])
    assert tok.decode(ids, skip_special_tokens=True) == "a red star"


def test_truncation_keeps_eos_last(tok: transformers.PreTrainedTokenizerFast) -> None:
    long = "a small red circle on the left and a large blue star in the center"
    for kwargs, length in (({}, CONTEXT), ({"max_length": 5}, 5)):
        ids = tok(long, truncation=True, **kwargs)["input_ids"]
        assert len(ids) == length and ids[0] == BOS and ids[-1] == EOS and ids.count(EOS) == 1


def test_padding_is_right_with_eos(tok: transformers.PreTrainedTokenizerFast) -> None:
    batch = tok(["a red star", "a small red circle on the left"], padding="longest", truncation=True)
    short, full = batch["input_ids"]
    n = sum(batch["attention_mask"][0])
    assert len(short) == len(full) and short[n - 1] == EOS and short[n:] == [EOS] * (len(short) - n)
    assert batch["attention_mask"][0] == [1] * n + [0] * (len(short) - n)


@pytest.mark.parametrize("text", UNSEEN)
def test_unseen_text_never_gives_unk_or_an_early_eos(tok: transformers.PreTrainedTokenizerFast, text: str) -> None:
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS and ids[-1] == EOS and not {BOS, EOS, UNK} & set(ids[1:-1])
    ids = tok(text, truncation=True)["input_ids"]
    assert len(ids) <= CONTEXT and ids[-1] == EOS and ids.count(EOS) == 1


def test_unseen_text_round_trips(tok: transformers.PreTrainedTokenizerFast) -> None:
    text = "zebra 🦓 über ωmega"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("captions", [[], ["", "  \n"]])
def test_no_caption_text_is_a_model_error(captions: list[str]) -> None:
    with pytest.raises(ModelError, match="no captions"):
        build_caption_tokenizer(captions)


def test_too_small_vocab_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="vocab_size"):
        build_caption_tokenizer(CAPTIONS, vocab_size=MIN_VOCAB_SIZE - 1)


# Runs in a fresh interpreter that cannot import finderpartner: a saved tokenizer must need only transformers.
LOADER = textwrap.dedent(
    """
    import json, sys
    import transformers
    directory, texts, plain = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    def ids(tok, texts):
        return {"single": [tok(t)["input_ids"] for t in texts],
                "batch": tok(texts, padding="longest", truncation=True)["input_ids"]}
    out = {name: ids(load(directory), texts) for name, load in (
        ("CLIPTokenizerFast", transformers.CLIPTokenizerFast.from_pretrained),
        ("AutoTokenizer", transformers.AutoTokenizer.from_pretrained),
        ("CLIPProcessor", lambda d: transformers.CLIPProcessor.from_pretrained(d).tokenizer),
    )}
    # transformers 4's slow tokenizer (vocab.json + merges.txt); in 5 the name is the fast class again.
    out["CLIPTokenizer"] = ids(transformers.CLIPTokenizer.from_pretrained(directory), plain)
    assert "finderpartner" not in sys.modules
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # a subprocess loads it with transformers alone
def test_saved_tokenizer_loads_with_plain_transformers(
    tok: transformers.PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(tmp_path)
    save_vocab_files(tok, tmp_path)
    texts = PLAIN + UNSEEN
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path), json.dumps(texts), json.dumps(PLAIN)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    def ids(texts: list[str]) -> dict[str, list[list[int]]]:
        return {
            "single": [tok(t)["input_ids"] for t in texts],
            "batch": tok(texts, padding="longest", truncation=True)["input_ids"],
        }

    for name in ("CLIPTokenizerFast", "AutoTokenizer", "CLIPProcessor"):
        assert loaded[name] == ids(texts), name
    # The slow tokenizer differs from the fast one on CJK, control characters and literal specials
    # (as it does for OpenAI's CLIP), so it is held to plain captions only.
    assert loaded["CLIPTokenizer"] == ids(PLAIN)


def test_text_model_pools_at_the_eos(tok: transformers.PreTrainedTokenizerFast) -> None:
    torch = pytest.importorskip("torch")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=EOS,
            max_position_embeddings=CONTEXT,
            **small,
        ),
        vision_config=dict(image_size=32, patch_size=16, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    batch = tok(
        ["a red star", "a small red circle on the left", "🦓 zebra"],
        padding="longest",
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    first_eos = (batch["input_ids"] == EOS).int().argmax(dim=-1)
    expected = out.last_hidden_state[torch.arange(3), first_eos]
    assert torch.allclose(out.pooler_output, expected)


def test_openai_clips_tokenizer_is_open_clips_without_importing_it() -> None:
    """arch:<name> models tokenise as OpenAI CLIP: the vocabulary, merges and ids of open_clip's SimpleTokenizer,
    read from the merges file it ships (importing open_clip itself takes seconds)."""
    open_clip = pytest.importorskip("open_clip")
    from finderpartner.tokenizer import openai_clip_tokenizer

    ours = openai_clip_tokenizer(77)
    theirs = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert ours.get_vocab() == {names.get(t, t): i for t, i in theirs.encoder.items()}
    texts = ["A photo of a Dog, on the beach!!", "café naïve 日本 123", "left\tright  x", "it's 2 o'clock"]
    expected = [[i for i in row.tolist() if i] for row in theirs(texts)]
    assert [ours(t)["input_ids"] for t in texts] == expected
