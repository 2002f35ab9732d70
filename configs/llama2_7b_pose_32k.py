"""PoSE baseline, Llama-2-7B, 4K -> 32K (linear PI x8), same budget as CREAM's recipe."""

from pathlib import Path

from cream_jax.train_config import load_config

CREAM_32K = Path(__file__).with_name("llama2_7b_cream_32k.py")


def get_config():
    c = load_config(CREAM_32K)
    c.positions.method = "pose"
    return c
