"""Caption tokenizer for the randomly initialised tiny CLIP: a CLIP-style byte-level BPE trained on the captions.

The pipeline (normaliser, pre-tokeniser, BPE with ``</w>`` word ends, byte-level decoder, RoBERTa-style
post-processor) is exactly the one of OpenAI CLIP's ``tokenizer.json``, because transformers 5 does not
load a ``tokenizer.json`` as is: its ``CLIPTokenizer`` keeps only the vocabulary and merges and rebuilds
that pipeline around them, so anything done differently here would be silently lost on reload.
Vocabulary layout: 0-2 specials, 3-258 the 256 byte symbols with ``</w>``, 259-514 without, then merges.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from finderpartner.errors import ModelError

if TYPE_CHECKING:
    # transformers 5 keeps this name only as a lazy alias of CLIPTokenizer, unseen by type checkers.
    from transformers import CLIPTokenizerFast  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the pad token, as in HF's openai CLIP configs
UNK_TOKEN = "<|unk|>"
# Ids 0, 1, 2 in this order. The eos id must not be 2: transformers' CLIPTextTransformer reads
# eos_token_id == 2 as a legacy config and then pools at argmax(input_ids) instead of the first eos.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
END_OF_WORD = "</w>"
# OpenAI CLIP's word pattern, as in its tokenizer.json and in transformers' CLIPTokenizer.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Specials + 256 byte symbols + the same 256 with "</w>": the least vocabulary that never needs <|unk|>.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 2 * 256


def _pipeline(
    model: BPE, bos_id: int = SPECIAL_TOKENS.index(BOS_TOKEN), eos_id: int = SPECIAL_TOKENS.index(EOS_TOKEN)
) -> Tokenizer:
    """Wrap a BPE model in CLIP's normaliser, pre-tokeniser, decoder and post-processor."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # RoBERTa's processor, as in CLIP: transformers 5 installs exactly this one on load anyway. Truncation
    # reserves room for the specials it adds, so a truncated caption still ends with eos.
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOS_TOKEN, eos_id),
        (BOS_TOKEN, bos_id),
        trim_offsets=False,
        add_prefix_space=False,
    )
    return tokenizer


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str = UNK_TOKEN) -> BPE:
    # The same settings that transformers 5's CLIPTokenizer uses when it rebuilds the model on load.
    return BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD,
        fuse_unk=False,
        unk_token=unk_token,
    )


def _train(captions: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the BPE on the captions; returns its vocabulary and merges."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # sorted: the library returns a set's order
    tokenizer = _pipeline(BPE(unk_token=UNK_TOKEN, end_of_word_suffix=END_OF_WORD, continuing_subword_prefix=""))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a pair seen once is the corpus's noise, not a subword worth a token
        # The trainer knows every byte symbol (initial_alphabet) but adds a "</w>" form only for bytes that
        # end a word in the corpus, numbered in hash-map order, which makes the ids and the tie-breaks
        # between equally frequent merges differ from run to run. Handing it all 256 "</w>" forms up front,
        # in a fixed order, fixes both; and an unseen word end (an emoji, a new letter) stays a byte
        # instead of becoming <|unk|>. They are trainer specials only: the tokenizer built from the result
        # registers just the three real specials, so these are plain vocabulary, never matched in raw text.
        special_tokens=[*SPECIAL_TOKENS, *(s + END_OF_WORD for s in symbols)],
        initial_alphabet=symbols,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    # tokenizers < 0.20 writes merges as "a b" strings, later versions as [a, b] pairs.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges  # type: ignore[return-value]


def build_caption_tokenizer(
    captions: Iterable[str], *, vocab_size: int = 4096, context_length: int = 32
) -> CLIPTokenizerFast:
    """Train a CLIP-style BPE tokenizer on captions; returns a transformers fast tokenizer.

    ``vocab_size`` is an upper bound: a small corpus yields fewer merges. The same captions always give
    the same tokenizer. Every byte has a symbol, both inside and at the end of a word, so no text is
    ever unknown and no unseen character can turn into the eos token that the text model pools at.
    """
    texts = [str(c) for c in captions]  # materialised: the trainer may consume an iterator only once
    if not any(t.strip() for t in texts):
        raise ModelError("cannot build a caption tokenizer: no captions with text were given")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ModelError(f"tokenizer vocab_size must be at least {MIN_VOCAB_SIZE} (got {vocab_size})")
    if context_length < 3:
        raise ModelError(f"tokenizer context_length must be at least 3 (got {context_length})")

    vocab, merges = _train(texts, vocab_size)
    log.info("trained caption tokenizer: %d tokens, %d merges", len(vocab), len(merges))
    return clip_tokenizer(vocab, merges, context_length=context_length)


def clip_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], *, context_length: int, unk_token: str = UNK_TOKEN
) -> CLIPTokenizerFast:
    """A transformers fast tokenizer from a CLIP-style BPE (``</w>`` word ends): the caption tokenizer's, or
    OpenAI CLIP's (``convert``: open_clip's own vocabulary, where ``<|endoftext|>`` also stands for unknown).

    ``vocab`` must hold ``<|startoftext|>``, ``<|endoftext|>`` and ``unk_token``; ``<|endoftext|>`` pads.
    """
    from transformers import CLIPTokenizerFast  # type: ignore[attr-defined]  # heavy: imported on use

    missing = [t for t in (BOS_TOKEN, EOS_TOKEN, unk_token) if t not in vocab]
    if missing:
        raise ModelError(f"a CLIP tokenizer vocabulary needs the tokens {', '.join(missing)}")
    backend = _pipeline(_bpe(vocab, merges, unk_token), vocab[BOS_TOKEN], vocab[EOS_TOKEN])
    backend.add_special_tokens(list(dict.fromkeys((BOS_TOKEN, EOS_TOKEN, unk_token))))  # in the vocabulary: same ids
    return CLIPTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=unk_token,
        model_max_length=context_length,
        padding_side="right",
        # A caption that literally contains "<|endoftext|>" is text, not an early end of sequence.
        split_special_tokens=True,
    )


OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI CLIP's merges, shipped inside the open_clip package


def openai_clip_tokenizer(context_length: int = 77) -> CLIPTokenizerFast:
    """OpenAI CLIP's BPE (49,408 tokens) as a transformers tokenizer, from the merges file open_clip ships, so no
    download is needed; ``<|endoftext|>`` ends, pads and stands for unknown, as in open_clip.

    The vocabulary is laid out exactly as open_clip's ``SimpleTokenizer`` lays it out (a test compares them), from
    the file alone: importing open_clip takes many seconds (it imports timm). Raises ImportError without
    open_clip_torch.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    folder = next(iter(spec.submodule_search_locations or []), None) if spec is not None else None
    if folder is None or not (Path(folder) / OPENAI_BPE_FILE).is_file():
        raise ImportError(f"open_clip_torch (which ships {OPENAI_BPE_FILE}) is not installed")
    lines = gzip.open(Path(folder) / OPENAI_BPE_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    return clip_tokenizer(vocab, merges, context_length=context_length, unk_token=EOS_TOKEN)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's (and CLIP's) reversible map of the 256 byte values to printable characters, in its order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def save_vocab_files(tokenizer: CLIPTokenizerFast, directory: str | Path) -> list[str]:
    """Write CLIP-style ``vocab.json`` and ``merges.txt`` next to a saved ``tokenizer.json``.

    Only transformers 4's slow ``CLIPTokenizer`` reads them; transformers 5 and every fast tokenizer use
    ``tokenizer.json``. transformers 4 writes them in ``save_pretrained``, transformers 5 no longer does.
    """
    return list(tokenizer.backend_tokenizer.model.save(str(directory)))
