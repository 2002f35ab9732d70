"""CREAM, Llama-2-7B, 4K -> 256K (linear PI x64). With f = 64 an absolute sigma keeps the middle near
the centre; `--config.positions.sigma_scale=relative` spreads it (see cream_jax/positions.py)."""

from pathlib import Path

from cream_jax.train_config import load_config

CREAM_32K = Path(__file__).with_name("llama2_7b_cream_32k.py")


def get_config():
    return load_config(CREAM_32K, factor=64)
