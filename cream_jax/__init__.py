"""cream-jax: cheap context-window extension (CREAM, EABF) for Llama in JAX/Flax."""

from cream_jax.errors import CreamError
from cream_jax.config import ConfigError, EabfConfig, LlamaConfig, RopeConfig, preset
from cream_jax.hf import HFFormatError, load_hf, save_hf
from cream_jax.model import Llama, forward, init

__all__ = ["ConfigError", "CreamError", "EabfConfig", "HFFormatError", "Llama", "LlamaConfig", "RopeConfig", "forward",
           "init", "load_hf", "preset", "save_hf"]
