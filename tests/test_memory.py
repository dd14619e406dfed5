"""The contrastive batch does not depend on memory: gradient cache and OOM recovery (step.py), micro-batch probing
(probe.py), memory levers."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import MICRO_SPEC, micro_config
from safetensors.torch import load_file

import finderpartner.train.probe as probe
import finderpartner.train.step as step
from finderpartner.config import TinySpec, config_from_dict
from finderpartner.data.collate import Collator
from finderpartner.data.dataset import PairDataset, read_split
from finderpartner.data.transforms import TrainTransform
from finderpartner.errors import TrainingError
from finderpartner.loss import ClipLoss
from finderpartner.model import build_tiny, plain_model
from finderpartner.train import build_optimizer, train
from finderpartner.train.levers import apply_freezing, apply_lora, enable_gradient_checkpointing
from finderpartner.train.probe import optimizer_state_bytes, probe_micro_batch
from finderpartner.train.step import contrastive_backward

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


def _batch(small_data: Path, encoder, n: int):
    table, _ = read_split(small_data, "train")
    ds = PairDataset(table, TrainTransform(encoder.image_spec))
    return Collator(encoder.text_tokenizer())([ds[(i, 1000 + i)] for i in range(n)])


def _grads(encoder, batch, micro: int) -> dict[str, torch.Tensor]:
    model = encoder.model
    model.zero_grad(set_to_none=True)
    contrastive_backward(
        encoder,
        ClipLoss(model.logit_scale),
        batch,
        micro_batch_size=micro,
        autocast=contextlib.nullcontext,
        backward=lambda loss: loss.backward(),
    )
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_cache_equals_full_batch_gradients(small_data: Path) -> None:
    table, _ = read_split(small_data, "train")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions, seed=0)
    encoder.model.train()
    batch = _batch(small_data, encoder, 64)
    full = _grads(encoder, batch, 64)  # 1 x 64
    cached = _grads(encoder, batch, 8)  # 8 x 8
    assert full.keys() == cached.keys() and "logit_scale" in full
    # Attention key biases get an exactly-zero gradient in theory (softmax ignores a shift shared by a row);
    # what autograd returns for them is rounding noise (~1e-9), whose relative difference means nothing.
    zero = {n for n in full if n.endswith("k_proj.bias")}
    assert all(full[n].abs().max() < 1e-7 and cached[n].abs().max() < 1e-7 for n in zero)
    relative = {n: ((full[n] - cached[n]).abs().max() / full[n].abs().max()).item() for n in full if n not in zero}
    worst = max(relative.items(), key=lambda kv: kv[1])
    print(
        f"\n1x64 vs 8x8: max relative gradient difference {worst[1]:.2e} ({worst[0]}); logit_scale {relative['logit_scale']:.2e}"
    )
    assert worst[1] <= 1e-4, worst
    assert relative["logit_scale"] <= 1e-4


def test_gradient_cache_replays_dropout_identically(small_data: Path, monkeypatch) -> None:
    table, _ = read_split(small_data, "train")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions, seed=0)
    model = encoder.model.train()
    for m in model.modules():  # dropout makes pass 1 and pass 2 disagree unless the RNG is replayed
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.2
    model.config.text_config.attention_dropout = 0.2
    for layer in model.text_model.encoder.layers:
        layer.self_attn.dropout = 0.2
    batch = _batch(small_data, encoder, 32)
    torch.manual_seed(5)
    full = _grads(encoder, batch, 32)
    torch.manual_seed(5)
    cached = _grads(encoder, batch, 32)
    assert all(torch.equal(full[n], cached[n]) for n in full)  # same seed, same path: deterministic
    outputs: list[torch.Tensor] = []
    real_embed_pair = step.embed_pair

    def recording_embed_pair(*args, **kwargs):  # type: ignore[no-untyped-def]
        image, text = real_embed_pair(*args, **kwargs)
        outputs.append(torch.cat([image, text], dim=1).detach())
        return image, text

    monkeypatch.setattr(step, "embed_pair", recording_embed_pair)
    torch.manual_seed(5)
    split = _grads(encoder, batch, 8)
    # 4 micro-batches embedded without gradients, then again with them: the same dropout masks both times, so
    # the cached embeddings the loss was computed from are exactly the ones back-propagated.
    assert len(outputs) == 8
    assert all(torch.equal(outputs[i], outputs[i + 4]) for i in range(4))
    assert not torch.equal(outputs[0], outputs[1][: len(outputs[0])])  # (different micro-batches differ)
    assert all(torch.isfinite(g).all() for g in split.values())


def test_oom_inside_a_step_halves_the_micro_batch_and_loses_nothing(
    small_data: Path, tmp_path: Path, monkeypatch
) -> None:
    reference = train(config_from_dict(micro_config(tmp_path / "a", small_data)))

    real = step.embed_pair
    calls = {"n": 0}

    def oom_once_in_step_3(encoder, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # 1 call per step with micro == batch: this is step 3
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(encoder, batch)

    monkeypatch.setattr(step, "embed_pair", oom_once_in_step_3)
    recovered = train(config_from_dict(micro_config(tmp_path / "b", small_data, micro_batch_size=16)))
    assert recovered.state.micro_batch_size == 8 and recovered.state.global_step == reference.state.global_step
    ours = load_file(sorted((recovered.run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    theirs = load_file(sorted((reference.run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    # Not bitwise: steps 3-16 sum the same gradient in a different order (8 + 8 instead of 16). Equal up to
    # float rounding, which Adam turns into steps of ~1e-6 on the attention key biases (zero true gradient).
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in theirs)
    print(f"\nOOM at step 3 recovered with micro-batch 8: max abs weight difference after 16 steps {worst:.2e}")
    assert worst <= 1e-5, worst


def test_oom_at_micro_batch_one_says_what_to_change(small_data: Path, tmp_path: Path, monkeypatch) -> None:
    def always_oom(encoder, batch):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(step, "embed_pair", always_oom)
    with pytest.raises(TrainingError, match="out of memory at micro-batch 1.*gradient_checkpointing.*LoRA"):
        train(config_from_dict(micro_config(tmp_path, small_data, micro_batch_size=2)))


def _changed_after_steps(model, small_data: Path, encoder, steps: int = 2) -> set[str]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = ClipLoss(model.logit_scale)
    opt = build_optimizer(model, objective, config_from_dict({"train": {"lr": 1e-2}}))
    batch = _batch(small_data, encoder, 16)
    for _ in range(steps):
        contrastive_backward(
            dataclasses.replace(encoder, model=model),  # the model may be wrapped (LoRA)
            objective,
            batch,
            micro_batch_size=16,
            autocast=contextlib.nullcontext,
            backward=lambda loss: loss.backward(),
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize(
    "freeze, trainable",
    [
        ({"image_tower": True}, lambda n: not n.startswith("vision_model.")),
        ({"text_tower": True}, lambda n: not n.startswith("text_model.")),
        (
            {"image_tower": True, "image_unlocked_layers": 1},
            lambda n: (
                not n.startswith("vision_model.")
                or n.startswith(("vision_model.encoder.layers.1.", "vision_model.post_layernorm"))
            ),
        ),
        (
            {"projections_only": True},
            lambda n: n in {"visual_projection.weight", "text_projection.weight", "logit_scale"},
        ),
    ],
    ids=["image_tower", "text_tower", "image_last_layer", "projections_only"],
)
def test_each_freezing_mode_changes_exactly_its_parameters(small_data: Path, freeze, trainable) -> None:
    table, _ = read_split(small_data, "train")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions, seed=0)
    model = encoder.model.train()
    apply_freezing(model, **freeze)
    changed = _changed_after_steps(model, small_data, encoder)
    expected = {n for n, _ in model.named_parameters() if trainable(n)}
    # the text position embeddings of unused positions get no gradient at all: a tensor still changes if any row does
    assert changed == expected


def test_lora_trains_only_adapters_and_merges_into_a_plain_model(small_data: Path) -> None:
    table, _ = read_split(small_data, "train")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions, seed=0)
    base = {n: p.detach().clone() for n, p in encoder.model.named_parameters()}
    model = apply_lora(
        encoder.model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    changed = _changed_after_steps(model, small_data, encoder)
    assert changed and all("lora_" in n or n.endswith("logit_scale") for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    merged = plain_model(model)
    assert type(merged).__name__ == "CLIPModel" and not any("lora" in n for n, _ in merged.named_parameters())
    differs = {n for n, p in merged.named_parameters() if not torch.equal(p.detach(), base[n])}
    assert differs and all(
        n.endswith(("_proj.weight", "logit_scale")) and "self_attn" in n or n == "logit_scale" for n in differs
    )


def test_cpu_probe_picks_a_size_and_caches_it(small_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FINDERPARTNER_CACHE", str(tmp_path))
    table, _ = read_split(small_data, "train")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions, seed=0)
    args = dict(
        local_batch=32,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        reserve_bytes=0,
        cache_key="test-key",
    )
    objective = ClipLoss(encoder.model.logit_scale)
    first = probe_micro_batch(encoder, objective, **args)
    assert first.micro_batch_size == 32 and "the full batch within free memory" in first.reason and first.peak_bytes
    assert "pairs/s" in first.reason
    assert all(p.grad is None for p in encoder.model.parameters())  # probing leaves no gradients behind
    again = probe_micro_batch(encoder, objective, **args)
    assert again.micro_batch_size == first.micro_batch_size and again.reason.startswith("cached")
    # The decision: with 1 MiB per pair (as measured) and 10 MiB free beyond the peak, 16 pairs fit, 32 do not.
    monkeypatch.setattr(probe, "_cpu_step_peak", lambda setup, size: (2**30 + size * 2**20, 100.0))
    monkeypatch.setattr(probe, "available_memory_bytes", lambda: 10 * 2**20)
    tight = probe_micro_batch(encoder, objective, **{**args, "cache_key": None})
    assert tight.micro_batch_size == 16 and tight.reason.startswith("largest size within free memory")
    # The optimizer state the first step will create is kept free too: 8 MiB of it leaves room for 8 pairs.
    with_state = probe_micro_batch(encoder, objective, **{**args, "cache_key": None, "state_bytes": 8 * 2**20})
    assert with_state.micro_batch_size == 8
    # Processes agree on one size (the trainer passes an all_reduce(min)); the agreed size is what is cached.
    agreed = probe_micro_batch(encoder, objective, **{**args, "cache_key": "agreed", "agree": lambda size: 2})
    assert agreed.micro_batch_size == 2 and agreed.reason.startswith("the smallest of all processes' sizes")
    assert probe_micro_batch(encoder, objective, **{**args, "cache_key": "agreed"}).micro_batch_size == 2
    with pytest.raises(TrainingError, match="another process could not fit even a micro-batch of 1"):
        probe_micro_batch(encoder, objective, **{**args, "cache_key": None, "agree": lambda size: 0})


def test_the_optimizer_state_the_probe_counts_is_exactly_what_the_first_step_creates(small_data: Path) -> None:
    table, _ = read_split(small_data, "train")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions, seed=0)
    model = encoder.model
    apply_freezing(model, image_tower=True)  # frozen parameters get no state: they must not be counted
    objective = ClipLoss(model.logit_scale)
    optimizer = build_optimizer(model, objective, config_from_dict({}))
    predicted = optimizer_state_bytes(optimizer)
    contrastive_backward(
        encoder,
        objective,
        _batch(small_data, encoder, 8),
        micro_batch_size=8,
        autocast=contextlib.nullcontext,
        backward=lambda loss: loss.backward(),
    )
    optimizer.step()
    created = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    print(f"\noptimizer state: predicted {predicted} bytes, created {created} (trainable weights {trainable})")
    assert predicted == created and created > 2 * trainable
    assert optimizer_state_bytes(optimizer) == 0  # once it exists it is part of what the probe measures


def test_gradient_checkpointing_gives_the_same_gradients(small_data: Path) -> None:
    table, _ = read_split(small_data, "train")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions, seed=0)
    model = encoder.model.train()
    batch = _batch(small_data, encoder, 16)
    plain = _grads(encoder, batch, 8)
    enable_gradient_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ckpt = _grads(encoder, batch, 8)
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-4, atol=1e-7), n
