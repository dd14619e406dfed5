"""The CUDA code paths, checked on the CPU (issue 27).

Where the mechanism exists on a CPU it runs for real: fp16 loss scaling with ``torch.amp.GradScaler("cpu")`` in
whole training runs, checkpoints resumed in another precision, models saved in half precision and loaded back.
Where only a GPU has it (bf16 support, free memory, the GPU random generators, TF32), the decision is a function
of the device's facts, and the tests hand it the facts of the cards in question (a T4, a 12 GB RTX 3060 with a
display attached, ...).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import MICRO_SPEC, micro_config

import finderpartner.env as env
import finderpartner.model as model_module
import finderpartner.train.levers as levers
import finderpartner.train.probe as probe
import finderpartner.train.recipe as train_module
import finderpartner.train.step as step
from finderpartner.config import TinySpec, config_from_dict
from finderpartner.data.transforms import ImageSpec, normalize
from finderpartner.errors import ConfigError, TrainingError
from finderpartner.model import build_tiny, load_model, save_model
from finderpartner.train import train
from finderpartner.train.levers import TowerCache

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

GiB = 2**30


def _fp16_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train in fp16 with a real GradScaler on the CPU (autocast and GradScaler("cpu") do fp16 there; only
    ``resolve_precision`` refuses it, because it is slow)."""
    monkeypatch.setattr(train_module, "resolve_precision", lambda setting, device: "fp16")


def _newest_state(run_dir: Path) -> dict:
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return json.loads((newest / "state.json").read_text())


# --------------------------------------------------------------------------------------------------------------
# 1. fp16: a non-finite loss is skipped, and the next step runs


def test_fp16_a_non_finite_loss_is_skipped_and_training_goes_on(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fp16_on_the_cpu(monkeypatch)
    real, calls = step.embed_pair, {"n": 0}

    def nan_in_step_2(encoder, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1  # one call per step: the micro-batch is the whole batch on a CPU
        image, text = real(encoder, batch)
        return (image * float("nan"), text) if calls["n"] == 2 else (image, text)

    monkeypatch.setattr(step, "embed_pair", nan_in_step_2)
    result = train(config_from_dict(micro_config(tmp_path, small_data, epochs=1)))
    assert result.state.global_step == 8 and result.state.nonfinite_steps == 1
    scaler = _newest_state(result.run_dir)["scaler"]
    assert scaler["scale"] == 2.0**16 / 2  # the overflow step lowered the loss scale (backoff 0.5)


# --------------------------------------------------------------------------------------------------------------
# 2. Each process saves and restores its own GPU's random generator


def test_each_process_resumes_its_own_gpu_generator_with_any_number_of_processes() -> None:
    states = [torch.full((16,), rank, dtype=torch.uint8) for rank in range(12)]
    saved = {"cpu": torch.zeros(5, dtype=torch.uint8), **train_module.gpu_rng_entries(states)}
    # 12 processes saved, 1 resumes: it takes its own (rank 0's) state, nobody indexes 12 generators
    assert torch.equal(train_module.own_gpu_rng(saved, 0), states[0])
    for rank in (2, 10, 11):  # rank 10 is not rank 2's neighbour (no string sorting)
        assert torch.equal(train_module.own_gpu_rng(saved, rank), states[rank])
    assert train_module.own_gpu_rng(saved, 12) is None  # more processes now: a fresh generator, not another's
    assert train_module.gpu_rng_entries([None, None]) == {}  # CPU processes save no GPU state


def test_a_checkpoint_of_the_earlier_layout_gives_only_the_main_process_its_state() -> None:
    # Before: the main process saved cuda_0..cuda_N, every generator it could see; only cuda_0 was ever its own.
    legacy = {"cpu": torch.zeros(5, dtype=torch.uint8), **{f"cuda_{i}": torch.full((16,), i) for i in range(11)}}
    assert torch.equal(train_module.own_gpu_rng(legacy, 0), legacy["cuda_0"])
    assert train_module.own_gpu_rng(legacy, 1) is None


# --------------------------------------------------------------------------------------------------------------
# 3. Resuming in another precision


def test_an_fp32_checkpoint_resumes_in_fp16_and_back(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = micro_config(tmp_path, small_data, epochs=1)
    first = train(config_from_dict(raw))  # fp32: the checkpoint's scaler state is {}
    assert _newest_state(first.run_dir)["scaler"] == {}
    raw["train"]["epochs"] = 2
    with monkeypatch.context() as m:
        _fp16_on_the_cpu(m)
        resumed = train(config_from_dict(raw), resume="auto")  # the fresh fp16 scaler keeps its initial scale
    assert resumed.state.global_step == 16 and _newest_state(resumed.run_dir)["scaler"]["scale"] == 2.0**16
    raw["train"]["epochs"] = 3
    again = train(config_from_dict(raw), resume="auto")  # fp16 -> fp32: the saved scale is not needed
    assert again.state.global_step == 24


# --------------------------------------------------------------------------------------------------------------
# 4. bf16 only where the GPU computes it natively


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int], memory: int = 16 * GiB) -> None:
    """torch.cuda as on a machine with this one GPU (its is_bf16_supported as torch's: emulation counts)."""
    props = SimpleNamespace(name=name, total_memory=memory, major=capability[0], minor=capability[1])
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.version, "cuda", "12.8")


@pytest.mark.parametrize("name,capability", [("Tesla T4", (7, 5)), ("Tesla V100-SXM2-16GB", (7, 0))])
def test_bf16_is_refused_before_ampere(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple) -> None:
    _fake_gpu(monkeypatch, name, capability)
    gpu = torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"no native bf16.*compute 8\.0.*[Uu]se precision fp16 or auto"):
        env.resolve_precision("bf16", gpu)
    assert env.resolve_precision("auto", gpu) == "fp16"
    report = env._gpu_report()
    assert report["bf16"] is False and env._recommendation(report)["precision"] == "fp16"  # check-env agrees


def test_bf16_is_chosen_from_ampere_on(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpu(monkeypatch, "NVIDIA GeForce RTX 3060", (8, 6), 12 * GiB)
    gpu = torch.device("cuda", 0)
    assert env.resolve_precision("auto", gpu) == env.resolve_precision("bf16", gpu) == "bf16"
    assert env._gpu_report()["bf16"] is True


# --------------------------------------------------------------------------------------------------------------
# 5. The micro-batch probe's budget: the memory this process can really get


class _FakeCudaMemory:
    """torch.cuda's memory functions on a card where ``others`` bytes are held by the display and other
    processes and our CUDA context holds ``context``; a step of n pairs peaks at ``base + n * per_pair`` allocated,
    with ``fragmentation`` of it again reserved."""

    def __init__(self, total: int, others: int, context: int, base: int, per_pair: int, fragmentation: float):
        self.total, self.others, self.context = total, others, context
        self.base, self.per_pair, self.fragmentation = base, per_pair, fragmentation
        self.allocated = self.reserved = base  # the model's weights
        self.peak_allocated = self.peak_reserved = base

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        props = SimpleNamespace(name="NVIDIA GeForce RTX 3060", total_memory=self.total, major=8, minor=6)
        free = lambda device=None: (self.total - self.others - self.context - self.reserved, self.total)  # noqa: E731
        monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(cuda, "mem_get_info", free)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.peak_allocated)
        monkeypatch.setattr(cuda, "max_memory_reserved", lambda device=None: self.peak_reserved)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", self.reset)
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)

    def reset(self, device=None) -> None:  # type: ignore[no-untyped-def]
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    # the probe's _Setup: batch(size) and step(batch)
    def batch(self, size: int) -> int:
        return size

    def step(self, size: int) -> None:
        self.peak_allocated = self.base + size * self.per_pair
        self.peak_reserved = int(self.peak_allocated * (1 + self.fragmentation))

    device = torch.device("cuda", 0)


def test_the_cuda_probe_budgets_the_memory_this_process_can_really_get(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 12 GiB RTX 3060 driving the display (1.5 GiB with a browser), another process with 1 GiB, our context 0.5 GiB:
    # 9 GiB are free. The model holds 1 GiB; a step takes 64 MiB per pair; the allocator reserves 8 % over that.
    card = _FakeCudaMemory(12 * GiB, int(2.5 * GiB), GiB // 2, GiB, 64 * 2**20, 0.08)
    card.install(monkeypatch)
    reserve = 2 * GiB
    chosen = probe._probe_cuda(card, 256, reserve)
    allocated = card.base + chosen.micro_batch_size * card.per_pair
    need = allocated * 1.08  # its allocation and the fragmentation it shows
    usable = card.total - card.others - card.context  # what our allocator can get: free + what it holds
    print(f"\nmicro-batch {chosen.micro_batch_size}: {chosen.reason}")
    assert need + reserve <= usable  # it fits, with its fragmentation, next to the others
    assert chosen.micro_batch_size == 64  # 128 pairs (9 GiB + 8 %) would not: the old budget (total - reserve) took it


def test_the_cuda_probe_budgets_nccl_and_the_flat_gradient_copy_with_several_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    card = _FakeCudaMemory(24 * GiB, 0, GiB // 2, GiB, 64 * 2**20, 0.0)
    card.install(monkeypatch)
    alone = probe._probe_cuda(card, 512, 2 * GiB)
    eight = probe._probe_cuda(card, 512, 2 * GiB, probe.Extra(state_bytes=0, world_size=8, flat_grad_bytes=5 * GiB))
    assert (alone.micro_batch_size, eight.micro_batch_size) == (256, 128)
    assert "NCCL" in eight.reason and "flat gradient copy" in eight.reason


def test_an_emulated_card_keeps_room_for_the_cuda_context() -> None:
    memory = probe.CudaMemory(total=80 * GiB, free=79 * GiB, reserved=0, allocated=0, cap=12 * GiB)
    assert memory.capacity == 12 * GiB - probe.CUDA_CONTEXT_BYTES
    assert probe.CudaMemory(total=12 * GiB, free=9 * GiB, reserved=GiB, allocated=GiB).capacity == 10 * GiB


def test_the_probe_cache_tells_cards_of_one_name_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = torch.device("cuda", 0)
    keys = []
    for memory, fraction in ((12 * GiB, 1.0), (8 * GiB, 1.0), (12 * GiB, 0.5)):
        _fake_gpu(monkeypatch, "NVIDIA GeForce RTX 3060", (8, 6), memory)
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None, f=fraction: f, raising=False)
        keys.append(probe.device_key(gpu))
    assert len(set(keys)) == 3 and all("RTX 3060" in k for k in keys)


# --------------------------------------------------------------------------------------------------------------
# 6. The locked-tower cache lives in host memory, bounded and counted


def _tower_cache(max_bytes: int) -> tuple[TowerCache, torch.nn.Module]:
    torch.manual_seed(0)
    tower = torch.nn.Linear(6, 4)
    tower.requires_grad_(False)
    return TowerCache(tower, max_bytes=max_bytes), tower


def test_the_tower_cache_keeps_host_copies_counts_their_bytes_and_stops_at_its_bound() -> None:
    cache, tower = _tower_cache(max_bytes=3 * 4 * 4)  # room for 3 outputs of 4 float32
    inputs = torch.randn(5, 6)
    keys = [bytes([i]) for i in range(5)]

    def compute(rows: torch.Tensor) -> torch.Tensor:
        return tower(inputs[rows])

    first = cache.lookup(keys[:3], lambda rows: compute(rows))  # 3 new: kept
    assert len(cache.table) == 3 and cache.nbytes == 48
    assert all(v.device.type == "cpu" for v in cache.table.values())
    assert {v.untyped_storage().data_ptr() for v in cache.table.values()} != {first.untyped_storage().data_ptr()}
    both = cache.lookup(keys[1:], lambda rows: compute(rows + 1))  # 2 hits, 2 new: full
    assert len(cache.table) == 3 and cache.nbytes == 48  # bounded: the 2 new ones were computed, not kept
    assert (cache.hits, cache.misses) == (2, 5)
    torch.testing.assert_close(both, tower(inputs[1:]))
    torch.testing.assert_close(first, tower(inputs[:3]))
    # a batch with repeats and hits in any order comes back in its own order
    mixed = cache.lookup([keys[2], keys[0], keys[2]], lambda rows: pytest.fail("all cached"))
    torch.testing.assert_close(mixed, tower(inputs[[2, 0, 2]]))


def test_image_keys_are_computed_where_the_pixels_are_and_tell_images_apart() -> None:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    pixels[3] = pixels[1]
    nudged = pixels.clone()
    nudged[0, 2, 31, 31] ^= 1  # one value, one bit
    keys, again = TowerCache.image_keys(pixels), TowerCache.image_keys(nudged)
    assert keys[1] == keys[3] and len(set(keys)) == 3 and all(len(k) == 16 for k in keys)
    assert again[0] != keys[0] and again[1:] == keys[1:]
    assert levers.pixel_hash(pixels).device == pixels.device  # hashed in place: a GPU batch stays on the GPU
    assert TowerCache.image_keys(pixels.float()) != keys  # float pixels are hashed by their bits (not cast)


# --------------------------------------------------------------------------------------------------------------
# 7. A model saved in half precision trains in float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_saved_in_half_precision_loads_as_float32(small_data: Path, tmp_path: Path, dtype) -> None:
    captions = [line.split(",", 1)[1] for line in (small_data / "captions_train.csv").read_text().splitlines()[1:]]
    encoder = build_tiny(TinySpec(**MICRO_SPEC), captions, seed=0)
    encoder.model.to(dtype)
    save_model(encoder, tmp_path / "half")
    loaded = load_model(tmp_path / "half")
    dtypes = {p.dtype for p in loaded.model.parameters()}
    assert dtypes == {torch.float32}, dtypes
    original = dict(encoder.model.named_parameters())
    for name, p in loaded.model.named_parameters():  # the same values, widened
        assert torch.equal(p, original[name].float()), name


# --------------------------------------------------------------------------------------------------------------
# Slow paths: constants made once, SLURM CPUs, the allocator, TF32, the LoRA model card


def test_normalisation_constants_are_made_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import finderpartner.data.transforms as transforms

    spec = ImageSpec(8, 8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = normalize(pixels, spec)
    made = []
    real = torch.tensor
    monkeypatch.setattr(transforms.torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    for _ in range(5):  # five micro-batches
        torch.testing.assert_close(normalize(pixels, spec), expected, rtol=0, atol=0)
    assert made == []  # no new constant tensor (on a GPU: no blocking copy) per micro-batch


def test_the_slurm_example_gives_srun_the_cpus_per_task() -> None:
    script = (Path(__file__).parents[1] / "examples" / "slurm_2_nodes.sbatch").read_text()
    exported = script.index("export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK")
    assert exported < script.index("\nsrun torchrun")


def test_the_allocator_setting_is_set_only_where_it_applies_and_never_over_the_users() -> None:
    assert env.allocator_setting({}, "Linux") == "expandable_segments:True"
    assert env.allocator_setting({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "Linux") is None
    assert env.allocator_setting({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, "Linux") is None
    assert env.allocator_setting({}, "Windows") is None  # not supported there


def test_training_sets_the_allocator_before_cuda_starts(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(env.platform, "system", lambda: "Linux")
    seen = []
    real = train_module.make_accelerator  # where the device (and CUDA) is first touched
    monkeypatch.setattr(
        train_module,
        "make_accelerator",
        lambda cfg: seen.append(env.os.environ.get("PYTORCH_CUDA_ALLOC_CONF")) or real(cfg),
    )
    train(config_from_dict(micro_config(tmp_path, small_data, epochs=1, max_steps=1)))
    assert seen == ["expandable_segments:True"]


def test_tf32_is_turned_on_for_fp32_training_on_ampere_and_newer(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env.use_tf32("cuda", (8, 6), "fp32") and env.use_tf32("cuda", (9, 0), "fp32")
    assert not env.use_tf32("cuda", (7, 5), "fp32")  # no TF32 before Ampere
    assert not env.use_tf32("cuda", (8, 6), "bf16") and not env.use_tf32("cpu", None, "fp32")
    before = torch.get_float32_matmul_precision()
    try:
        _fake_gpu(monkeypatch, "NVIDIA GeForce RTX 3090", (8, 6))
        torch.set_float32_matmul_precision("highest")
        assert env.enable_tf32(torch.device("cuda", 0), "fp32")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("highest")
        _fake_gpu(monkeypatch, "Tesla T4", (7, 5))
        assert not env.enable_tf32(torch.device("cuda", 0), "fp32")
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_model_card_of_a_lora_run_does_not_merge_the_model_to_name_its_class(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merges, saves = [], []
    real_plain, real_save_best = model_module.plain_model, train_module._save_best

    def counting_plain(model):  # type: ignore[no-untyped-def]
        merges.append(hasattr(model, "merge_and_unload"))
        return real_plain(model)

    monkeypatch.setattr(model_module, "plain_model", counting_plain)
    monkeypatch.setattr(train_module, "plain_model", counting_plain, raising=False)
    monkeypatch.setattr(train_module, "_save_best", lambda run, result: saves.append(1) or real_save_best(run, result))
    raw = micro_config(tmp_path, small_data, epochs=1)
    raw["model"]["lora"] = {"enabled": True, "r": 4}
    result = train(config_from_dict(raw))
    assert "from transformers import CLIPModel, CLIPProcessor" in (result.best_model / "README.md").read_text()
    assert saves and merges == [True] * len(saves)  # one merge per saved model: the one that is saved


def test_a_config_that_does_not_fit_one_pair_under_the_cpu_cap_is_a_training_error(small_data: Path) -> None:
    captions = [line.split(",", 1)[1] for line in (small_data / "captions_train.csv").read_text().splitlines()[1:]]
    encoder = build_tiny(TinySpec(**MICRO_SPEC), captions, seed=0)
    objective = train_module.build_objective("clip", encoder.model)
    with pytest.raises(TrainingError, match="even a micro-batch of 1 does not fit under the memory cap of 0.10 GiB"):
        probe.probe_micro_batch(
            encoder,
            objective,
            local_batch=16,
            device=torch.device("cpu"),
            autocast=contextlib.nullcontext,
            reserve_bytes=0,
            memory_cap_bytes=GiB // 10,  # a Python process with torch alone is larger
        )
