"""FLOPs: the model FLOPs of a train step and of a prefill, and each accelerator's peak, memory and memory
bandwidth (one table)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from cream_jax.config import LlamaConfig

if TYPE_CHECKING:
    import jax


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float  # memory per chip
    peak_flops: float  # dense bf16 FLOP/s per chip, from the vendor's spec sheet
    device_kinds: tuple[str, ...]  # how jax names its devices (`device.device_kind` starts with one of these)
    hbm_bytes_per_s: float  # HBM bandwidth per chip, from the vendor's spec sheet (GB/s x 1e9)


# By family: TPU generations by their topology prefix (tpu.TOPOLOGIES), GPUs by model.
CHIPS = {
    "v4": Chip(32, 275e12, ("TPU v4",), 1228e9),
    "v5e": Chip(16, 197e12, ("TPU v5 lite", "TPU v5e"), 819e9),
    "v5p": Chip(95, 459e12, ("TPU v5p", "TPU v5"), 2765e9),
    "v6e": Chip(32, 918e12, ("TPU v6 lite", "TPU v6e"), 1640e9),
    "a100": Chip(80, 312e12, ("NVIDIA A100",), 2039e9),
    "h100": Chip(80, 989e12, ("NVIDIA H100",), 3350e9),
    "h200": Chip(141, 989e12, ("NVIDIA H200",), 4800e9),
}


def _matmul_params(cfg: LlamaConfig) -> tuple[int, int]:
    """(the decoder layers' projection parameters, all layers; the vocabulary projection's)."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return n * (d * (2 * q + 2 * kv) + 3 * d * f), d * cfg.vocab_size


def prefill_flops(cfg: LlamaConfig, length: int) -> float:
    """Model FLOPs to prefill one prompt of `length` tokens: the forward pass (2 x the layers' projection
    parameters per token, causal attention's QK^T and PV over the lower triangle, as `flops_per_token`
    counts them) and the vocabulary projection of the last token only (a prefill needs no other logits)."""
    layers, vocab = _matmul_params(cfg)
    attention = cfg.num_hidden_layers * 2 * 2 * length * length * cfg.num_attention_heads * cfg.head_dim * 0.5
    return 2 * layers * length + attention + 2 * vocab


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token (forward + backward = 3x forward; remat recompute not counted).

    Convention: a matmul of m x n by n x p is 2mnp FLOPs. Per token, forward: 2 x (every projection's
    parameters, lm_head included, the embedding lookup excluded) plus attention's QK^T and PV,
    2 x 2 x seq_len x heads x head_dim per layer, halved because causal attention needs only the
    lower triangle. Train = 3 x forward."""
    layers, vocab = _matmul_params(cfg)
    matmul_params = layers + vocab
    attention = cfg.num_hidden_layers * 2 * 2 * seq_len * cfg.num_attention_heads * cfg.head_dim * 0.5
    return 3 * (2 * matmul_params + attention)


def chip_of(device: jax.Device) -> Chip | None:
    """The table's entry for a jax device (by its `device_kind`), or None for one it does not know (a CPU)."""
    kind = getattr(device, "device_kind", "")
    return next((chip for chip in CHIPS.values() if any(kind.startswith(k) for k in chip.device_kinds)), None)


def peak_flops(device: jax.Device, override: float = 0.0) -> float | None:
    """`override` if set, else the device's peak dense bf16 FLOP/s from `CHIPS` (None if unknown)."""
    if override:
        return override
    chip = chip_of(device)
    return chip.peak_flops if chip else None
