"""CREAM, Llama-3-8B, 8K -> 128K (linear PI x16 on top of theta 500000)."""

from cream_jax.train_config import base, pg19


def get_config():
    c = base()
    c.model.preset = "llama3-8b"
    c.model.init_from = ""  # set to a Llama-3-8B HF directory or params checkpoint
    c.model.max_position_embeddings = 131072
    c.model.rope = {"type": "linear", "theta": 500000.0, "factor": 16.0}
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.attention = "auto"  # Pallas splash on TPU, blockwise elsewhere
    c.positions.method = "cream"
    c.train.steps = 1000
    c.train.global_batch = 32
    c.train.window = 8192
    c.train.target_length = 131072
    c.train.lr = 2e-5
    c.train.warmup_steps = 10
    c.train.decay = "linear"  # linear decay to 0, the Hugging Face Trainer default
    c.train.min_lr_ratio = 0.0
    c.train.clip = 1.0
    pg19(c)  # set data.data_dir; Llama-3's tokenizer is tiktoken, not SentencePiece: data.tokenizer needs a
    # SentencePiece model until the pipeline reads tiktoken files
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every = 100
    return c
