"""FLOPs: the model FLOPs of a train step, and each accelerator's peak and memory (one table)."""

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


# By family: TPU generations by their topology prefix (tpu.TOPOLOGIES), GPUs by model.
CHIPS = {
    "v4": Chip(32, 275e12, ("TPU v4",)),
    "v5e": Chip(16, 197e12, ("TPU v5 lite", "TPU v5e")),
    "v5p": Chip(95, 459e12, ("TPU v5p", "TPU v5")),
    "v6e": Chip(32, 918e12, ("TPU v6 lite", "TPU v6e")),
    "a100": Chip(80, 312e12, ("NVIDIA A100",)),
    "h100": Chip(80, 989e12, ("NVIDIA H100",)),
    "h200": Chip(141, 989e12, ("NVIDIA H200",)),
}


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token (forward + backward = 3x forward; remat recompute not counted).

    Convention: a matmul of m x n by n x p is 2mnp FLOPs. Per token, forward: 2 x (every projection's
    parameters, lm_head included, the embedding lookup excluded) plus attention's QK^T and PV,
    2 x 2 x seq_len x heads x head_dim per layer, halved because causal attention needs only the
    lower triangle. Train = 3 x forward."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    matmul_params = n * (d * (2 * q + 2 * kv) + 3 * d * f) + d * cfg.vocab_size
    attention = n * 2 * 2 * seq_len * q * 0.5
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
