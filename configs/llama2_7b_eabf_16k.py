"""Entropy-aware ABF, Llama-2-7B(-chat), full-length 16K fine-tuning (the EABF paper's recipe; docs/methods.md)."""

from cream_jax.train_config import base, pg19


def get_config():
    c = base()
    c.model.preset = "llama2-7b"
    c.model.init_from = ""  # set to a Llama-2-7B-chat HF directory or params checkpoint
    c.model.max_position_embeddings = 16384
    c.model.rope = {"type": "default", "theta": 500000.0}
    c.model.eabf = {"enabled": True, "base_length": 4096, "skip_layers": (0, 1)}
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.attention = "auto"  # Pallas splash on TPU, blockwise elsewhere
    c.positions.method = "full"
    c.train.steps = 1000
    c.train.global_batch = 32
    c.train.window = 16384
    c.train.target_length = 16384
    c.train.lr = 2e-5
    c.train.warmup_steps = 10
    c.train.decay = "cosine"
    c.train.b1, c.train.b2 = 0.9, 0.95
    c.train.weight_decay = 0.1
    c.train.clip = 1.0
    pg19(c)  # set data.data_dir to where the array_record TFDS copy of pg19 lives
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every = 100
    return c
