"""cream-jax: cheap context-window extension (CREAM, EABF) for Llama in JAX/Flax.

The names below load on first use, so that `cream_jax.vllm_plugin` imports on a vLLM server that has
neither JAX nor Flax."""

import importlib

_EXPORTS = {
    "CreamError": "cream_jax.errors",
    "ConfigError": "cream_jax.config", "EabfConfig": "cream_jax.config", "LlamaConfig": "cream_jax.config",
    "RopeConfig": "cream_jax.config", "preset": "cream_jax.config",
    "HFFormatError": "cream_jax.hf", "load_hf": "cream_jax.hf", "save_hf": "cream_jax.hf",
    "Llama": "cream_jax.model", "forward": "cream_jax.model", "init": "cream_jax.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cream_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
