"""Training levers on a model: freezing (with the last layers unlocked), LoRA adapters, gradient checkpointing, and
the cache of a locked tower's outputs (LiT). Only training uses them; model.py's DualEncoder consults a cache when
one is set."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ModelError

log = logging.getLogger("finderpartner.model")  # the name these messages had

# Host memory a TowerCache may fill (ViT-B/32's text tower: 512 fp32 values per caption, 1M captions in 2 GiB).
TOWER_CACHE_BYTES = 2 * 2**30


class TowerCache:
    """A locked tower's outputs, computed once per distinct input and then looked up (LiT, Zhai et al. 2022).

    A locked tower is a fixed function: it runs in eval mode here (no dropout), so its output for a caption (or,
    without augmentation, an image) is the same every epoch and an epoch costs only the trainable tower. Keys are
    the token ids up to the text's length (padding does not matter), or a hash of an image's pixels. Values are not
    bitwise those of a batch computed in another grouping (matrix kernels may round differently), so a resumed run
    that re-fills the cache equals an uninterrupted one up to float rounding.

    The outputs are kept in host memory, never on the GPU: a cache that grows through an epoch would otherwise take
    GPU memory that the micro-batch probe never saw, into an out-of-memory error that halving the micro-batch cannot
    cure. Looked-up rows travel to the device once per batch. At most ``max_entries`` inputs and ``max_bytes``
    (``nbytes`` counts them) are kept; later ones are computed each time.
    """

    def __init__(self, tower: nn.Module, max_entries: int = 1_000_000, max_bytes: int = TOWER_CACHE_BYTES) -> None:
        self.tower, self.max_entries, self.max_bytes = tower, max_entries, max_bytes
        self.clear()

    def clear(self) -> None:
        self.table: dict[bytes, torch.Tensor] = {}  # key -> the tower's output, a CPU tensor
        self.hits = self.misses = 0
        self.nbytes = 0  # host memory the kept outputs take
        self._full_noted = False

    def lookup(self, keys: list[bytes], compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The tower's outputs for a batch whose rows have these keys; ``compute(rows)`` runs the tower on the rows
        (a LongTensor of row indices) not seen before, once per distinct key, in eval mode and without gradients."""
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # each distinct input's first row
        todo = [k for k in first if k not in self.table]
        fresh: torch.Tensor | None = None
        if todo:
            was_training = self.tower.training
            self.tower.eval()
            try:
                with torch.no_grad():
                    fresh = compute(torch.tensor([first[k] for k in todo]))
            finally:
                self.tower.train(was_training)
            self._keep(todo, fresh)
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return self._assemble(keys, todo, fresh)

    def _keep(self, todo: list[bytes], fresh: torch.Tensor) -> None:
        """Keep a host copy of new outputs (one transfer per batch) while within the bounds."""
        size = fresh.numel() * fresh.element_size()
        if len(self.table) + len(todo) <= self.max_entries and self.nbytes + size <= self.max_bytes:
            host = fresh.detach().to("cpu", copy=True)
            self.table.update(zip(todo, host))  # rows are views of ``host``: its bytes are counted once
            self.nbytes += size
        elif not self._full_noted:
            self._full_noted = True
            log.info(
                "locked-tower cache full (%d inputs, %.2f GiB of host memory): further inputs are computed each time",
                len(self.table),
                self.nbytes / 2**30,
            )

    def _assemble(self, keys: list[bytes], todo: list[bytes], fresh: torch.Tensor | None) -> torch.Tensor:
        """The batch's rows in key order: new ones from ``fresh`` (on the device), the others sent from the host."""
        new_row = {k: i for i, k in enumerate(todo)}
        old_keys = list(dict.fromkeys(k for k in keys if k not in new_row))
        device = fresh.device if fresh is not None else next(self.tower.parameters()).device
        parts = [] if fresh is None else [fresh]
        if old_keys:
            parts.append(torch.stack([self.table[k] for k in old_keys]).to(device, non_blocking=True))
        where = {**new_row, **{k: len(todo) + i for i, k in enumerate(old_keys)}}
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        return rows[torch.tensor([where[k] for k in keys], device=device)]

    @staticmethod
    def text_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
        """A caption's key: its token ids up to its length (padding does not matter)."""
        rows, lengths = input_ids.cpu().numpy(), attention_mask.sum(1).tolist()
        return [rows[i, : int(n)].tobytes() for i, n in enumerate(lengths)]

    @staticmethod
    def image_keys(pixels: torch.Tensor) -> list[bytes]:
        """An image's key: a 128-bit hash of its (unnormalised) pixels, computed where they are (a batch on the GPU
        is not copied back: only the 16 bytes per image are)."""
        return [row.tobytes() for row in pixel_hash(pixels).cpu().numpy()]


_HASH_CHUNK = 8192  # pixel values hashed at once per image (bounds the int64 temporaries)


@functools.lru_cache(maxsize=8)
def _hash_weights(n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x5EED)
    return torch.randint(-(2**63), 2**63 - 1, (n, 2), dtype=torch.int64, generator=g).to(device)


def pixel_hash(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 2) int64: two random linear hashes of each image's values, modulo 2**64, on the pixels' device.

    Two different images collide in both with probability about 2**-114 (at worst, when every difference of their
    values shares the factor 2**7), the same on every device (integer arithmetic, exact).
    """
    flat = pixels.reshape(len(pixels), -1)
    if flat.is_floating_point():  # float pixels (0-255): hash their exact bits
        flat = flat.float().contiguous().view(torch.int32)
    weights = _hash_weights(flat.shape[1], flat.device)
    out = torch.zeros(len(flat), 2, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.shape[1], _HASH_CHUNK):
        part = flat[:, start : start + _HASH_CHUNK].to(torch.int64)
        out += (part.unsqueeze(-1) * weights[start : start + _HASH_CHUNK]).sum(1)
    return out


def tower_locked(tower: nn.Module) -> bool:
    """Whether every parameter of a tower is frozen (then its outputs can be cached: ``TowerCache``)."""
    return not any(p.requires_grad for p in tower.parameters())


def _tower_layers(tower: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a tower (CLIP: encoder.layers; BERT-like text towers: encoder.layer)."""
    for name, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith(("encoder.layers", "encoder.layer")):
            return list(module)
    raise ModelError(f"cannot find the transformer layers of {type(tower).__name__} to unlock")


def _final_norm(tower: nn.Module) -> list[nn.Module]:
    return [m for name, m in tower.named_children() if name in ("post_layernorm", "final_layer_norm")]


def apply_freezing(
    model: nn.Module,
    *,
    image_tower: bool = False,
    image_unlocked_layers: int = 0,
    text_tower: bool = False,
    text_unlocked_layers: int = 0,
    projections_only: bool = False,
) -> None:
    """Set ``requires_grad`` per the freezing options. Projections and the logit scale always stay trainable."""
    towers = []
    if projections_only:
        towers = [(model.vision_model, 0), (model.text_model, 0)]
    else:
        if image_tower:
            towers.append((model.vision_model, image_unlocked_layers))
        if text_tower:
            towers.append((model.text_model, text_unlocked_layers))
    for tower, unlocked in towers:
        tower.requires_grad_(False)
        if unlocked:
            layers = _tower_layers(tower)
            if unlocked > len(layers):
                raise ModelError(f"cannot unlock {unlocked} layers: the tower has {len(layers)}")
            for module in layers[-unlocked:] + _final_norm(tower):
                module.requires_grad_(True)


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """Wrap the model with PEFT LoRA adapters; only the adapters and the logit scale train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("model.lora needs PEFT: pip install 'finderpartner[lora]'") from None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as e:
        raise ModelError(f"model.lora.target_modules {target_modules} do not match the model: {e}") from None
    wrapped.base_model.model.logit_scale.requires_grad_(True)
    return wrapped


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant, so frozen inputs and the gradient cache work)."""
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
