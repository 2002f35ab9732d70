"""Generation with a KV cache: chunked prefill and a compiled decode loop, greedy or sampled.

    cache = init_cache(cfg, batch=1, max_len=4096)
    logits, cache = prefill(cfg, params, prompt_BxS, cache, chunk=512)    # long prompts in chunks
    tokens, n, cache = decode(cfg, params, logits, cache, steps=32)        # one dispatch for every new token
    tokens = generate(cfg, params, prompt_BxS, max_new_tokens=32)          # both; temperature > 0 samples

Slot t of the cache holds the token at absolute position t; RoPE (every scaling type) and EABF's query scale
use that position, exactly as a full forward pass over the whole sequence does; dynamic NTK RoPE scales for
the whole prompt's length in every prefill chunk and grows with each decoded token, as transformers'
`generate` does.

Attention against the cache is flash-style (`cached_attention`): the keys are read in blocks of `block` slots
with an online softmax, so a chunk of C tokens needs O(C x block) memory per layer instead of C x max_len, and
blocks that no query of the call can see are never computed: those entirely after the chunk (the causal
half of a prefill's work; a decode step reads only the filled slots) and those entirely in every row's left
padding. Blocks that every query sees whole (`clean_range`) build and apply no mask. The whole cache is
carried through the layer scan and each layer writes its C new slots in place. A prefill computes the
vocabulary projection of its last token only. On TPU one Pallas kernel per layer does the block loop
(`cache_kernel`), its scores kept in VMEM.

On a mesh (`jax.set_mesh`) the cache is created in its shards (`cache_sharding`: kv heads over `tensor`,
the batch over `data` and `fsdp`, by the rule table of training), and the token ids are given to every
process whole, so the same calls run on one device, a slice, or every host of a pod (each process running
the same program).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cream_jax import cache_kernel, rope
from cream_jax import platform as platform_lib
from cream_jax.config import LlamaConfig
from cream_jax.model import attention_inputs, layer_output, layer_q_scale, output_logits
from cream_jax.sharding import constrain, logical_to_spec

_MASKED = -1e30
CACHE_AXES = ("layers", "batch", "activation_kv_heads", "length", None)  # the cache [L, B, N, T, K] by logical names
# Cache slots per attention key block, by platform: a chunk's scores are [chunk, block] per head at a time. On
# the CPU a block of 256 keeps a block's scores in cache while long enough to amortise each block's update (a
# 16K prefill in chunks of 512 is about a third faster than with 128 or 512). On TPU the kernel
# (`cache_kernel`) computes a block per grid step: 1024 makes a prefill step's matmuls long against the step's
# fixed overhead and still fits the scoped VMEM.
DEFAULT_BLOCK = {"cpu": 256, "tpu": 1024, "gpu": 512}


def default_block(platform: str = "") -> int:
    """The key block `cached_attention` uses when none is given: `DEFAULT_BLOCK` for `platform` (default: JAX's
    default backend)."""
    return DEFAULT_BLOCK.get(platform_lib.resolve(platform), 512)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, N, T, K]: keys of every layer, T cache slots per kv head
    v: jax.Array  # [L, B, N, T, K]: values
    length: jax.Array  # int32 []: slots filled so far (the same for every row)
    start: jax.Array  # int32 [B]: a row's first real slot (left padding before it is never attended)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def cache_sharding(mesh: jax.sharding.Mesh) -> KVCache:
    """The cache's shardings on `mesh`: kv heads over `tensor`, the batch over `data` and `fsdp` (the rule
    table's `batch`), so each chip holds its rows' slots of its heads."""
    kv = NamedSharding(mesh, logical_to_spec(CACHE_AXES, mesh_axes=mesh.axis_names))
    return KVCache(kv, kv, NamedSharding(mesh, P()),
                   NamedSharding(mesh, logical_to_spec(("batch",), mesh_axes=mesh.axis_names)))


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, start_B: jax.typing.ArrayLike | None = None) -> KVCache:
    """An empty cache; `start_B` (default 0) is each row's left padding, for prompts of different lengths. On a
    mesh (`jax.set_mesh`) it is created in its shards (`cache_sharding`)."""
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    start_B = np.zeros((batch,), np.int32) if start_B is None else np.asarray(start_B, np.int32)

    def make(start_B):
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), start_B)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return make(jnp.asarray(start_B))
    concrete = jax.sharding.get_mesh()
    shardings = cache_sharding(concrete)
    return jax.jit(make, out_shardings=shardings)(to_global(start_B, shardings.start))


def to_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array that every process holds whole, as one global array with `sharding` (each process puts
    only its own devices' parts; on one process this is `jax.device_put`)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated(x: np.ndarray) -> jax.Array:
    """Token ids for `extend`: replicated over the active mesh (every process passes the same ids)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jnp.asarray(x)
    return to_global(x, NamedSharding(jax.sharding.get_mesh(), P()))


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) array as a numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _block_update(carry, q_BxNxGxCxK, k_BxNxSxK, v_BxNxSxK, visible_BxCxS):
    """One key block of the online softmax: the running (output, max, sum) updated with this block's keys
    (`visible_BxCxS` None: every query sees every key of the block)."""
    o, m, row_sum = carry
    s = jnp.einsum("bngck,bnsk->bngcs", q_BxNxGxCxK, k_BxNxSxK, preferred_element_type=jnp.float32)
    if visible_BxCxS is not None:
        s = jnp.where(visible_BxCxS[:, None, None], s, _MASKED)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    if visible_BxCxS is not None:
        p = jnp.where(visible_BxCxS[:, None, None], p, 0.0)
    correction = jnp.exp(m - m_new)
    pv = jnp.einsum("bngcs,bnsk->bngck", p.astype(v_BxNxSxK.dtype), v_BxNxSxK, preferred_element_type=jnp.float32)
    return o * correction[..., None] + pv, m_new, row_sum * correction + p.sum(-1)


def block_range(cache: KVCache, num_tokens: int, block: int | None, skip: bool = True) -> tuple[jax.Array, jax.Array]:
    """[first, last) key blocks that `num_tokens` new tokens at slot `cache.length` attend to: from the block of
    the earliest real slot of any row (blocks of left padding only are skipped) to the block of the last new
    token (blocks entirely in the future are skipped). Without `skip`: every block of the cache."""
    block = min(block or default_block(), cache.max_len)
    num_blocks = -(-cache.max_len // block)
    if not skip:
        return jnp.int32(0), jnp.int32(num_blocks)
    first = jnp.min(cache.start) // block
    last = jnp.minimum((cache.length + num_tokens + block - 1) // block, num_blocks)
    return first.astype(jnp.int32), last.astype(jnp.int32)


def clean_range(cache: KVCache, first: jax.Array, last: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) within [first, last): the blocks that every query of every row sees whole (after every row's
    left padding, before the new tokens' slots), which need no mask."""
    lo = jnp.clip(-(-jnp.max(cache.start) // block), first, last)
    return lo, jnp.clip(cache.length // block, lo, last)


def use_kernel(kernel: bool | None, platform: str = "") -> bool:
    """Whether `cached_attention` runs the Pallas kernel (`cache_kernel`): by default on TPU only."""
    return platform_lib.resolve(platform) == "tpu" if kernel is None else kernel


def cached_attention(q_BxCxHxK: jax.Array, cache: KVCache, layer: jax.Array, block: int | None = None,
                     skip: bool = True, kernel: bool | None = None, platform: str = "") -> jax.Array:
    """Attention of C new queries (at slots [length, length + C), their keys already written) against layer
    `layer` of the cache, key block by key block with an online softmax: memory O(C x block) per layer, and
    only the blocks `block_range` names are computed. A row sees its slots from `start` up to each query's
    own slot. `kernel` (default: where `platform`, the compiler traced for, is a TPU) runs it as one Pallas
    kernel (`cache_kernel`, interpreted off TPU) where the block is a multiple of 128 slots, skipping blocks
    per row and per query block."""
    B, C, H, K = q_BxCxHxK.shape
    T, N = cache.max_len, cache.k.shape[2]
    block = min(block or default_block(platform), T)
    G = H // N
    q_BxCxHxK_scaled = (q_BxCxHxK.astype(jnp.float32) * K ** -0.5).astype(q_BxCxHxK.dtype)
    if use_kernel(kernel, platform) and skip and cache_kernel.supported(block):
        q_BxNxRxK = q_BxCxHxK_scaled.reshape(B, C, N, G, K).transpose(0, 2, 1, 3, 4).reshape(B, N, C * G, K)
        out_BxNxRxK = cache_kernel.cache_attention(q_BxNxRxK, cache.k, cache.v, layer, cache.length, cache.start,
                                                   group=G, block=block,
                                                   interpret=platform_lib.resolve(platform) != "tpu")
        return out_BxNxRxK.reshape(B, N, C, G, K).transpose(0, 2, 1, 3, 4).reshape(B, C, H, K)
    q_BxNxGxCxK = q_BxCxHxK_scaled.reshape(B, C, N, G, K).transpose(0, 2, 3, 1, 4)
    query_slot_C = cache.length + jnp.arange(C, dtype=jnp.int32)

    def blocks_at(first_slot):
        return (jax.lax.dynamic_slice(x, (layer, 0, 0, first_slot, 0), (1, B, N, block, K))[0]
                for x in (cache.k, cache.v))

    def masked(j, carry):
        nominal = j * block
        first_slot = jnp.minimum(nominal, T - block)  # the last block overlaps the one before when T % block
        slot_S = first_slot + jnp.arange(block, dtype=jnp.int32)
        visible_BxCxS = ((slot_S >= nominal)[None, None, :]  # overlapping slots count in their own block only
                         & (slot_S[None, None, :] <= query_slot_C[None, :, None])
                         & (slot_S[None, :] >= cache.start[:, None])[:, None, :])
        return _block_update(carry, q_BxNxGxCxK, *blocks_at(first_slot), visible_BxCxS)

    def whole(j, carry):  # a block every query sees whole: no mask to build or apply
        return _block_update(carry, q_BxNxGxCxK, *blocks_at(j * block), None)

    init = (jnp.zeros((B, N, G, C, K), jnp.float32), jnp.full((B, N, G, C), _MASKED, jnp.float32),
            jnp.zeros((B, N, G, C), jnp.float32))
    first, last = block_range(cache, C, block, skip)
    lo, hi = clean_range(cache, first, last, block)
    carry = jax.lax.fori_loop(first, lo, masked, init)
    carry = jax.lax.fori_loop(lo, hi, whole, carry)
    o, _, row_sum = jax.lax.fori_loop(hi, last, masked, carry)
    row_sum = jnp.where(row_sum == 0, 1.0, row_sum)  # a padding query sees no key at all
    out = (o / row_sum[..., None]).astype(q_BxCxHxK.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, C, H, K)


def sequence_end(cache: KVCache, num_tokens: int | jax.Array) -> jax.Array:
    """The sequence length once `num_tokens` more tokens are cached: the longest row's last position + 1."""
    return cache.length + num_tokens - jnp.min(cache.start)


def _extend(cfg: LlamaConfig, params: dict, tokens_BxC: jax.Array, cache: KVCache, num_new, seq_len,
            logits: str, block: int, skip: bool, kernel: bool | None = None) -> tuple[jax.Array, KVCache]:
    B, C = tokens_BxC.shape
    num_new = C if num_new is None else num_new
    seq_len = sequence_end(cache, num_new) if seq_len is None else seq_len
    slot_C = cache.length + jnp.arange(C, dtype=jnp.int32)
    position_BxC = jnp.maximum(slot_C[None, :] - cache.start[:, None], 0)  # a row's positions start at 0
    dtype = jnp.dtype(cfg.dtype)
    x_BxCxD = jnp.take(params["model"]["embed_tokens"]["weight"], tokens_BxC, axis=0).astype(dtype)
    x_BxCxD = constrain(x_BxCxD, ("batch", "length", "activation_embed"))
    cos_BxCxK, sin_BxCxK = rope.cos_sin(cfg, position_BxC, seq_len)
    q_scale_BxC = rope.eabf_scale(position_BxC, cfg.eabf.base_length) if cfg.eabf.enabled else None

    def layer(carry, inputs):  # the whole cache is carried, so each layer writes its C slots in place
        x_BxCxD, k_cache, v_cache = carry
        p, index = inputs
        q, k, v = attention_inputs(cfg, p, x_BxCxD, cos_BxCxK, sin_BxCxK, layer_q_scale(cfg, q_scale_BxC, index))
        k_BxNxCxK, v_BxNxCxK = (x.astype(k_cache.dtype).transpose(0, 2, 1, 3)[None] for x in (k, v))
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_BxNxCxK, (index, 0, 0, cache.length, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_BxNxCxK, (index, 0, 0, cache.length, 0))
        k_cache, v_cache = (constrain(x, CACHE_AXES) for x in (k_cache, v_cache))  # heads over `tensor`
        filled = KVCache(k_cache, v_cache, cache.length, cache.start)
        attn = cached_attention(q, filled, index, block, skip, kernel, cfg.platform)
        return (layer_output(cfg, p, x_BxCxD, attn), k_cache, v_cache), None

    layers = (params["model"]["layers"], jnp.arange(cfg.num_hidden_layers))
    (x_BxCxD, k_cache, v_cache), _ = jax.lax.scan(layer, (x_BxCxD, cache.k, cache.v), layers)
    if logits == "last":  # only the last real token's: the vocabulary projection of one token per row
        x_BxCxD = jax.lax.dynamic_slice_in_dim(x_BxCxD, num_new - 1, 1, axis=1)
    return output_logits(cfg, params, x_BxCxD), KVCache(k_cache, v_cache, cache.length + num_new, cache.start)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("logits", "block", "skip", "kernel"),
                   donate_argnums=3)
def extend(cfg: LlamaConfig, params: dict, tokens_BxC: jax.Array, cache: KVCache,
           num_new: int | jax.Array | None = None, seq_len: int | jax.Array | None = None, *,
           logits: str = "all", block: int | None = None, skip: bool = True,
           kernel: bool | None = None) -> tuple[jax.Array, KVCache]:
    """Feed C tokens at slots [length, length + C): (logits, the cache with their keys and values).

    `logits`: "all" [B, C, V], or "last" [B, 1, V], the last real token's only (a prefill needs no other).
    `num_new` (<= C, default C) is how many of the C tokens are real; the cache length advances by it, and the
    padding's slots are overwritten by the next call. `seq_len` is the length of the whole sequence these
    tokens belong to, for dynamic NTK RoPE (`rope.inv_freq_for`; default: up to the last real token here):
    `prefill` passes the whole prompt's, so chunks rotate as one forward pass over the prompt would.
    `block`, `skip`, `kernel`: `cached_attention`'s key block (None: `default_block()`), whether it skips
    blocks no query sees, and whether it runs the Pallas kernel (None: on TPU)."""
    return _extend(cfg, params, tokens_BxC, cache, num_new, seq_len, logits, block, skip, kernel)


def prefill(cfg: LlamaConfig, params: dict, tokens_BxS: jax.typing.ArrayLike, cache: KVCache,
            chunk: int = 512, block: int | None = None, skip: bool = True,
            kernel: bool | None = None) -> tuple[jax.Array, KVCache]:
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
        logits, cache = extend(cfg, params, replicated(piece), cache, n, seq_len, logits="last", block=block,
                               skip=skip, kernel=kernel)
        last = logits[:, 0]
    return last, cache


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("stop_token", "block", "kernel"),
                   donate_argnums=3)
def decode(cfg: LlamaConfig, params: dict, logits_BxV: jax.Array, cache: KVCache, steps: int,
           temperature: float | jax.Array = 0.0, key: jax.Array | None = None, *,
           stop_token: int | None = None, block: int | None = None,
           kernel: bool | None = None) -> tuple[jax.Array, jax.Array, KVCache]:
    """Up to `steps` tokens after a prefill, in one compiled loop (one dispatch, no host round trip per token):
    each picked from the current logits (greedy at temperature 0, else sampled with `fold_in(key, i)`), then fed
    through the cache. Stops early once every row has produced `stop_token`. Returns (tokens [B, steps], the
    number produced, cache); columns past that number are 0."""
    B = logits_BxV.shape[0]
    key = jax.random.key(0) if key is None else key

    def pick(logits_BxV, i):
        sampled = jax.random.categorical(jax.random.fold_in(key, i), logits_BxV / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)

    def cond(carry):
        i, _, _, _, done_B = carry
        return (i < steps) & ~jnp.all(done_B)

    def body(carry):
        i, logits_BxV, cache, tokens_BxN, done_B = carry
        next_B = pick(logits_BxV, i)
        tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, next_B[:, None], (0, i))
        if stop_token is not None:
            done_B = done_B | (next_B == stop_token)
        logits_Bx1xV, cache = _extend(cfg, params, next_B[:, None], cache, 1, None, "last", block, True, kernel)
        return i + 1, logits_Bx1xV[:, 0], cache, tokens_BxN, done_B

    init = (jnp.int32(0), logits_BxV, cache, jnp.zeros((B, steps), jnp.int32), jnp.zeros((B,), bool))
    n, _, cache, tokens_BxN, _ = jax.lax.while_loop(cond, body, init)
    return tokens_BxN, n, cache


def left_pad(prompts: list[list[int]], pad_id: int = 0, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one [B, S] array padded on the left, and each row's padding length; S
    is the longest prompt's length rounded up to `multiple` (so that batches of similar prompts share shapes)."""
    S = -(-max(len(p) for p in prompts) // multiple) * multiple
    start_B = np.asarray([S - len(p) for p in prompts], np.int32)
    return np.asarray([[pad_id] * (S - len(p)) + list(p) for p in prompts], np.int32), start_B


def generate(cfg: LlamaConfig, params: dict, prompt_BxS: jax.typing.ArrayLike, max_new_tokens: int, *,
             temperature: float = 0.0,
             key: jax.Array | None = None, chunk: int = 512, max_len: int | None = None,
             stop_token: int | None = None, start_B: jax.typing.ArrayLike | None = None,
             block: int | None = None, kernel: bool | None = None) -> np.ndarray:
    """Prompt plus up to `max_new_tokens` tokens [B, S + new]: greedy at temperature 0, else sampled with `key`;
    fewer when every row has produced `stop_token`.

    Prompts of different lengths: `left_pad` them and pass `start_B`; each row then sees only its own tokens,
    at positions from 0, exactly as if it ran alone."""
    prompt_BxS = np.asarray(prompt_BxS, np.int32)
    B, S = prompt_BxS.shape
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    cache = init_cache(cfg, B, max_len or S + max_new_tokens, start_B)
    logits_BxV, cache = prefill(cfg, params, prompt_BxS, cache, chunk, block, kernel=kernel)
    if max_new_tokens == 0:
        return prompt_BxS
    tokens_BxN, n, _ = decode(cfg, params, logits_BxV, cache, max_new_tokens, temperature, key,
                              stop_token=stop_token, block=block, kernel=kernel)
    return np.concatenate([prompt_BxS, to_host(tokens_BxN)[:, :int(to_host(n))]], axis=1)
