"""CREAM, a TinyLlama-1.1B-shaped model (22 layers, 32 heads, 4 kv heads), 2K -> 32K (linear PI x16).

A 1B-class recipe for small slices, such as one v5e chip (16 GiB): `python -m cream_jax.plan --eval
--config=configs/tinyllama_1b_cream_32k.py --topology=v5e-1` plans its evaluation (docs/plan_eval.md)."""

from pathlib import Path

from cream_jax.train_config import load_config

CREAM_32K = Path(__file__).with_name("llama2_7b_cream_32k.py")


def get_config():
    c = load_config(CREAM_32K)
    # head_dim too: the preset's (4096 / 32 = 128) stays unless set
    c.model.update(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4, head_dim=64, max_position_embeddings=32768)
    c.model.rope = {"type": "linear", "factor": 16.0}
    c.train.window = 2048
    c.train.target_length = 32768
    return c
