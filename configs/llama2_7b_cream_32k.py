"""CREAM, Llama-2-7B, 4K -> 32K with linear position interpolation (the paper's main recipe; docs/methods.md)."""

from cream_jax.train_config import base, pg19


def get_config(factor: int = 8):
    c = base()
    c.model.preset = "llama2-7b"
    c.model.init_from = ""  # set to a Llama-2-7B HF directory or params checkpoint
    c.model.max_position_embeddings = 4096 * factor
    c.model.rope = {"type": "linear", "factor": float(factor)}
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    # `full` fits on any topology that holds the model; on v5p-8 (8 sequences per chip), `save_proj` with
    # train.grad_accum=2 plans faster: `python -m cream_jax.plan ... --search=all` (docs/plan_v5p8.md).
    c.model.remat = "full"
    c.model.attention = "auto"  # Pallas splash on TPU, blockwise elsewhere
    c.positions.method = "cream"
    c.train.steps = 1000
    c.train.global_batch = 32
    c.train.window = 4096
    c.train.target_length = 4096 * factor
    c.train.lr = 2e-5
    c.train.warmup_steps = 10
    c.train.decay = "linear"  # linear decay to 0, the Hugging Face Trainer default
    c.train.min_lr_ratio = 0.0
    c.train.clip = 1.0
    c.train.weight_decay = 0.0
    c.train.b2 = 0.999
    pg19(c)  # set data.data_dir to where the array_record TFDS copy of pg19 lives
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every = 100
    return c
