"""Shared test helpers: tiny random transformers Llamas saved to disk, the environment for CLI subprocesses,
and a record of the expensive work (weights loaded, compiles) a command did."""

from __future__ import annotations

import contextlib
import json
import os
import sys
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


# ----------------------------------------------------------------------------- expensive work, recorded

WORK_MARK = "EXPENSIVE WORK: "  # how a subprocess started by `watched_command` reports it on stderr
_recording: list[list[str]] = []


def _install_work_recorders() -> None:
    """Once per process: model weights read from any source, and every XLA compile, append to the list that
    `recording_work` holds open (nothing is recorded outside it; the wrapped functions still run)."""
    if getattr(_install_work_recorders, "done", False):
        return
    import jax

    from cream_jax import checkpoint, hf

    def wrap(module, name):
        original = getattr(module, name)

        def recorded(*args, **kwargs):
            for work in _recording:
                work.append(f"{module.__name__}.{name}({args[0] if args else ''})")
            return original(*args, **kwargs)

        setattr(module, name, recorded)

    for module, name in ((hf, "load_hf"), (checkpoint, "load_params"), (checkpoint, "load_train_params")):
        wrap(module, name)

    def on_event(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            for work in _recording:
                work.append(f"an XLA compile ({duration:.2f} s)")

    jax.monitoring.register_event_duration_secs_listener(on_event)
    _install_work_recorders.done = True


def start_recording() -> list[str]:
    """A list that the expensive work done in this process from now on (weights loaded, XLA compiles) fills."""
    _install_work_recorders()
    work: list[str] = []
    _recording.append(work)
    return work


@contextlib.contextmanager
def recording_work():
    """Yields a list of the expensive work done in this process meanwhile."""
    work = start_recording()
    try:
        yield work
    finally:
        _recording.remove(work)


def watched_command(module: str, argv: list[str]) -> list[str]:
    """`python -m module argv` that records its expensive work and prints each item after WORK_MARK on stderr
    when it exits."""
    code = (f"import atexit, runpy, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import helpers; "
            "work = helpers.start_recording(); "
            "atexit.register(lambda: [print(helpers.WORK_MARK + w, file=sys.stderr) for w in work]); "
            f"sys.argv = [{module!r}, *sys.argv[1:]]; runpy.run_module({module!r}, run_name='__main__')")
    return [sys.executable, "-c", code, *argv]
