"""A tiny Llama on CPU: CREAM at N = 128 reaching L = 512 (linear PI x4), on Jane Austen's novels.

The corpus (Debian's r-cran-janeaustenr) and the 1000-piece tokenizer (from
sentencepiece's source distribution on PyPI) are fetched on first use.
`--config.data.source=synthetic_markov --config.model.vocab_size=128` trains
on the synthetic Markov source instead (nothing fetched).
"""

from cream_jax.train_config import base


def get_config():
    c = base()
    c.model.preset = "debug"
    c.model.vocab_size = 1000
    c.model.hidden_size = 64
    c.model.intermediate_size = 172
    c.model.num_attention_heads = 4
    c.model.num_key_value_heads = 2
    c.model.max_position_embeddings = 512
    c.model.rope = {"type": "linear", "factor": 4.0}
    c.data.source = "corpus"
    c.data.name = "austen"
    c.data.tokenizer = "botchan-bpe-1000"
    c.train.steps = 200
    c.train.global_batch = 8
    c.train.window = 128
    c.train.target_length = 512
    c.train.lr = 3e-3
    c.train.warmup_steps = 10
    c.train.log_every = 10
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
