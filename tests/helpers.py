"""Shared test helpers: tiny random transformers Llamas saved to disk, the environment for CLI subprocesses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the repository
UNOPTIMIZED = "--xla_backend_optimization_level=0"  # the tests' XLA:CPU flag (conftest.py says why)

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def cli_env(devices: int | None = None, optimized: bool = False, **extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this session's XLA flags (conftest.py) with `devices` simulated
    CPU devices (None: one, XLA's default), on CPU. `optimized`: LLVM optimises the emitted code, for a
    process that runs many steps (slower compiles, faster steps)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count") and not (optimized and f == UNOPTIMIZED)]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), **extra)


def random_hf_llama(path, seed: int = 0, std: float = 0.2, **overrides):
    """A transformers Llama with random weights (large enough std that errors would show), saved to `path`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides}, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens), position_ids=torch.from_numpy(position_ids)).logits.numpy()


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def cream_like_positions(rng: np.random.Generator, batch: int, length: int, target: int) -> np.ndarray:
    """Head, jumped middle, tail ending at target - 1: strictly rising, non-contiguous."""
    third = length // 3
    rows = []
    for _ in range(batch):
        head = np.arange(third)
        tail = np.arange(target - third, target)
        m = length - 2 * third
        start = rng.integers(third, target - third - m)
        rows.append(np.concatenate([head, np.arange(start, start + m), tail]))
    return np.stack(rows).astype(np.int64)


def read_all(path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory's safetensors (one file or an index of shards)."""
    from safetensors import safe_open

    from cream_jax.hf import INDEX_FILE, SINGLE_FILE

    path = Path(path)
    files = [SINGLE_FILE] if (path / SINGLE_FILE).exists() else sorted(
        set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
    out = {}
    for name in files:
        with safe_open(path / name, "numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k
