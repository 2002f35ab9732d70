"""Generation with a KV cache: chunked prefill and one-token decode steps, greedy or sampled.

    cache = init_cache(cfg, batch=1, max_len=4096)
    logits, cache = prefill(cfg, params, prompt_BxS, cache, chunk=512)    # long prompts in chunks
    tokens = generate(cfg, params, prompt_BxS, max_new_tokens=32)          # greedy; temperature > 0 samples

On a mesh (`jax.set_mesh`) the cache is sharded over kv heads on the `tensor` axis and over the batch on
`data`/`fsdp`, by the same rule table as training. Slot t of the cache holds the token at absolute position t;
RoPE (every scaling type) and EABF's query scale use that position, exactly as a full forward pass over the
whole sequence does; dynamic NTK RoPE scales for the whole prompt's length in every prefill chunk and grows
with each decoded token, as transformers' `generate` does. A chunk of C new tokens attends to the cached
slots before it and causally within itself, so the prefill of a long prompt needs memory for one chunk's
C x max_len scores, not the prompt's S x S.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax import rope
from cream_jax.config import LlamaConfig
from cream_jax.model import attention_inputs, layer_output, layer_q_scale, output_logits
from cream_jax.sharding import constrain

_MASKED = -1e30
CACHE_AXES = ("batch", "length", "activation_kv_heads", None)  # one layer's cache, by logical axis names


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, T, N, K]: keys of every layer, T cache slots
    v: jax.Array  # [L, B, T, N, K]: values
    length: jax.Array  # int32 []: slots filled so far (the same for every row)
    start: jax.Array  # int32 [B]: a row's first real slot (left padding before it is never attended)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, start_B: jax.typing.ArrayLike | None = None) -> KVCache:
    """An empty cache; `start_B` (default 0) is each row's left padding, for prompts of different lengths."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else jnp.asarray(start_B, jnp.int32)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), start_B)


def _cached_attention(q_BxCxHxK, k_BxTxNxK, v_BxTxNxK, query_slot_C, start_B):
    B, C, H, K = q_BxCxHxK.shape
    N = k_BxTxNxK.shape[2]
    q_BxCxNxGxK = q_BxCxHxK.reshape(B, C, N, H // N, K)
    logits = jnp.einsum("bcngk,btnk->bngct", q_BxCxNxGxK, k_BxTxNxK, preferred_element_type=jnp.float32) * K ** -0.5
    slot_T = jnp.arange(k_BxTxNxK.shape[1])
    visible_BxCxT = (slot_T[None, None, :] <= query_slot_C[None, :, None]) & (slot_T >= start_B[:, None])[:, None, :]
    logits = jnp.where(visible_BxCxT[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxTxNxK.dtype)
    return jnp.einsum("bngct,btnk->bcngk", probs, v_BxTxNxK).reshape(B, C, H, K)


def sequence_end(cache: KVCache, num_tokens: int) -> jax.Array:
    """The sequence length once `num_tokens` more tokens are cached: the longest row's last position + 1."""
    return cache.length + num_tokens - jnp.min(cache.start)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def extend(cfg: LlamaConfig, params: dict, tokens_BxC: jax.Array, cache: KVCache,
           num_new: int | jax.Array | None = None, seq_len: int | jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Feed C tokens at slots [length, length + C): (logits [B, C, V], the cache with their keys and values).

    `num_new` (<= C, default C) is how many of the C tokens are real; the cache length advances by it, and the
    padding's slots are overwritten by the next call. `seq_len` is the length of the whole sequence these
    tokens belong to, for dynamic NTK RoPE (`rope.inv_freq_for`; default: up to the last real token here):
    `prefill` passes the whole prompt's, so chunks rotate as one forward pass over the prompt would."""
    B, C = tokens_BxC.shape
    num_new = C if num_new is None else num_new
    seq_len = sequence_end(cache, num_new) if seq_len is None else seq_len
    slot_C = cache.length + jnp.arange(C, dtype=jnp.int32)
    position_BxC = jnp.maximum(slot_C[None, :] - cache.start[:, None], 0)  # a row's positions start at 0
    dtype = jnp.dtype(cfg.dtype)
    x_BxCxD = jnp.take(params["model"]["embed_tokens"]["weight"], tokens_BxC, axis=0).astype(dtype)
    cos_BxCxK, sin_BxCxK = rope.cos_sin(cfg, position_BxC, seq_len)
    q_scale_BxC = rope.eabf_scale(position_BxC, cfg.eabf.base_length) if cfg.eabf.enabled else None

    def layer(x_BxCxD, inputs):
        p, index, k_BxTxNxK, v_BxTxNxK = inputs
        q, k, v = attention_inputs(cfg, p, x_BxCxD, cos_BxCxK, sin_BxCxK, layer_q_scale(cfg, q_scale_BxC, index))
        k_BxTxNxK = jax.lax.dynamic_update_slice(k_BxTxNxK, k.astype(k_BxTxNxK.dtype), (0, cache.length, 0, 0))
        v_BxTxNxK = jax.lax.dynamic_update_slice(v_BxTxNxK, v.astype(v_BxTxNxK.dtype), (0, cache.length, 0, 0))
        k_BxTxNxK, v_BxTxNxK = (constrain(x, CACHE_AXES) for x in (k_BxTxNxK, v_BxTxNxK))  # heads over `tensor`
        attn = _cached_attention(q, k_BxTxNxK, v_BxTxNxK, slot_C, cache.start)
        return layer_output(cfg, p, x_BxCxD, attn), (k_BxTxNxK, v_BxTxNxK)

    layers = (params["model"]["layers"], jnp.arange(cfg.num_hidden_layers), cache.k, cache.v)
    x_BxCxD, (k_cache, v_cache) = jax.lax.scan(layer, x_BxCxD, layers)
    return output_logits(cfg, params, x_BxCxD), KVCache(k_cache, v_cache, cache.length + num_new, cache.start)


def prefill(cfg: LlamaConfig, params: dict, tokens_BxS: jax.typing.ArrayLike, cache: KVCache,
            chunk: int = 512) -> tuple[jax.Array, KVCache]:
    """Feed a prompt in chunks of `chunk` tokens (the last one padded, so only two shapes compile).

    Returns (logits of the prompt's last token [B, V], cache)."""
    tokens_BxS = np.asarray(tokens_BxS, np.int32)
    B, S = tokens_BxS.shape
    if S == 0:
        raise ValueError("an empty prompt")
    if int(cache.length) + S > cache.max_len:
        raise ValueError(f"the prompt ({S} tokens after {int(cache.length)} cached) does not fit the cache of "
                         f"{cache.max_len} slots; make the cache longer (init_cache(..., max_len=...))")
    last = None
    seq_len = sequence_end(cache, S)  # dynamic NTK: the whole prompt's theta for every chunk
    for start in range(0, S, chunk):
        piece = tokens_BxS[:, start:start + chunk]
        n = piece.shape[1]
        if n < chunk and S > chunk:  # pad the tail chunk to the common shape
            piece = np.pad(piece, ((0, 0), (0, chunk - n)))
        if int(cache.length) + piece.shape[1] > cache.max_len:  # padding past the end: use the exact shape
            piece = piece[:, :n]
        logits, cache = extend(cfg, params, jnp.asarray(piece), cache, n, seq_len)
        last = logits[:, n - 1]
    return last, cache


def left_pad(prompts: list[list[int]], pad_id: int = 0, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one [B, S] array padded on the left, and each row's padding length; S
    is the longest prompt's length rounded up to `multiple` (so that batches of similar prompts share shapes)."""
    S = -(-max(len(p) for p in prompts) // multiple) * multiple
    start_B = np.asarray([S - len(p) for p in prompts], np.int32)
    return np.asarray([[pad_id] * (S - len(p)) + list(p) for p in prompts], np.int32), start_B


def generate(cfg: LlamaConfig, params: dict, prompt_BxS: jax.typing.ArrayLike, max_new_tokens: int, *,
             temperature: float = 0.0,
             key: jax.Array | None = None, chunk: int = 512, max_len: int | None = None,
             stop_token: int | None = None, start_B: jax.typing.ArrayLike | None = None) -> np.ndarray:
    """Prompt plus `max_new_tokens` tokens [B, S + new]: greedy at temperature 0, else sampled with `key`.

    Prompts of different lengths: `left_pad` them and pass `start_B`; each row then sees only its own tokens,
    at positions from 0, exactly as if it ran alone."""
    prompt_BxS = np.asarray(prompt_BxS, np.int32)
    B, S = prompt_BxS.shape
    cache = init_cache(cfg, B, max_len or S + max_new_tokens, start_B)
    logits_BxV, cache = prefill(cfg, params, prompt_BxS, cache, chunk)
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    out = [prompt_BxS]
    done = np.zeros(B, bool)
    for i in range(max_new_tokens):
        if temperature > 0:
            next_B = jax.random.categorical(jax.random.fold_in(key, i), logits_BxV / temperature, axis=-1)
        else:
            next_B = jnp.argmax(logits_BxV, axis=-1)
        next_B = np.asarray(next_B, np.int32)
        out.append(next_B[:, None])
        if stop_token is not None:
            done |= next_B == stop_token
            if done.all():
                break
        if i + 1 < max_new_tokens:
            logits_BxCxV, cache = extend(cfg, params, jnp.asarray(next_B[:, None]), cache, 1)
            logits_BxV = logits_BxCxV[:, 0]
    return np.concatenate(out, axis=1)
