"""Causal attention backends behind one signature.

    attend(q_BxSxHxK, k_BxSxNxK, v_BxSxNxK, segment_ids_BxS, backend=..., block_size=...)

Shapes: B batch, S sequence, H query heads, N key/value heads (H = N * G,
G query heads per kv head: GQA, N = 1 is MQA), K head_dim. Causality follows
sequence order, never position values (CREAM's position ids jump); tokens
attend only within their own segment (packed rows). EABF needs nothing here:
the model multiplies q by its scale before calling.

- `dot_product`: the reference; materialises the S x S logits.
- `blockwise`: online softmax over key/value blocks (flash attention in pure
  JAX) with its own backward pass that recomputes the blocks, so forward and
  gradient memory grow linearly in S. Blocks above the diagonal are skipped.
  The backward is one pass over key blocks (as FlashAttention-2): each block
  pair's probabilities are recomputed once for dq, dk and dv together.
- `splash`: jax's Pallas TPU kernel (`splash.py`).

`blockwise` and `splash` name their forward pass's output and logsumexp `ATTENTION_RESIDUALS`: a remat policy
that saves them (`model.remat_policy`) spares the backward pass a second forward pass.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cream_jax import platform as platform_lib
from cream_jax.config import ATTENTION_RESIDUALS

_MASKED = -1e30  # finite, so a fully masked (padding) row gives zeros, not NaN

# XLA's cost analysis counts a while loop's body once, so the planner compiles a copy of the step with
# the block loops unrolled in Python (same arithmetic, one HLO op per block pair) to read its FLOPs.
_UNROLL_BLOCK_LOOPS = contextvars.ContextVar("unroll_block_loops", default=False)


@contextlib.contextmanager
def unrolled_block_loops() -> Iterator[None]:
    """Trace `blockwise` attention with Python loops over blocks (for exact compiler cost figures)."""
    token = _UNROLL_BLOCK_LOOPS.set(True)
    try:
        yield
    finally:
        _UNROLL_BLOCK_LOOPS.reset(token)


def _map(fn, n: int):
    """`jax.lax.map(fn, arange(n))`, or a Python loop under `unrolled_block_loops`."""
    if _UNROLL_BLOCK_LOOPS.get():
        return jax.tree.map(lambda *xs: jnp.stack(xs), *[fn(i) for i in range(n)])
    return jax.lax.map(fn, jnp.arange(n))


def _scan(fn, init, n: int):
    """`jax.lax.scan(fn, init, arange(n))`, or a Python loop under `unrolled_block_loops`."""
    if _UNROLL_BLOCK_LOOPS.get():
        ys = []
        for i in range(n):
            init, y = fn(init, i)
            ys.append(y)
        return init, jax.tree.map(lambda *xs: jnp.stack(xs), *ys)
    return jax.lax.scan(fn, init, jnp.arange(n))


def _fori(lower, upper, body, init):
    """`jax.lax.fori_loop`; the bounds are Python ints under `unrolled_block_loops`."""
    if _UNROLL_BLOCK_LOOPS.get():
        for j in range(lower, upper):
            init = body(j, init)
        return init
    return jax.lax.fori_loop(lower, upper, body, init)


# Block length per backend when `block_size` is 0. Pure-JAX blockwise on CPU is fastest at 128 for training
# lengths, 512 from about 8K on (`python -m cream_jax.bench`, docs/bench.md). Splash's blocks tile the TPU's MXU.
DEFAULT_BLOCK_SIZE = {"blockwise": 128, "splash": 512}


def block_size_for(backend: str, block_size: int = 0, platform: str = "") -> int:
    """`block_size`, or the resolved backend's default when it is 0."""
    return block_size or DEFAULT_BLOCK_SIZE.get(resolve_backend(backend, platform), 0)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
           backend: str = "dot_product", block_size: int = 0, platform: str = "") -> jax.Array:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads.")
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    backend = resolve_backend(backend, platform)
    block_size = block_size_for(backend, block_size)
    if backend == "dot_product":
        return dot_product_attention(q, k, v, segment_ids)
    if backend == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, block_size=block_size)
    if backend == "splash":
        from cream_jax.splash import splash_attention

        interpret = platform_lib.resolve(platform) != "tpu"  # Pallas's interpreter: the kernel on CPU, for tests
        return splash_attention(q, k, v, segment_ids, block_size=block_size, interpret=interpret)
    raise ValueError(f"Unknown attention backend {backend!r}; use 'auto', 'dot_product', 'blockwise' or 'splash'.")


def resolve_backend(backend: str, platform: str = "") -> str:
    """`auto` is the Pallas `splash` kernel on TPU and `blockwise` elsewhere (`platform`: platform.py)."""
    if backend == "auto":
        return "splash" if platform_lib.resolve(platform) == "tpu" else "blockwise"
    return backend


def _mask(q_index, kv_index, q_segment, kv_segment):
    """[B, Sq, Sk] boolean: causal in sequence order and same segment."""
    causal = q_index[:, None] >= kv_index[None, :]
    same = q_segment[:, :, None] == kv_segment[:, None, :]
    return causal[None] & same


def dot_product_attention(q_BxSxHxK: jax.Array, k_BxTxNxK: jax.Array, v_BxTxNxK: jax.Array,
                          segment_ids_BxS: jax.Array) -> jax.Array:
    B, S, H, K = q_BxSxHxK.shape
    N = k_BxTxNxK.shape[2]
    q_BxSxNxGxK = q_BxSxHxK.reshape(B, S, N, H // N, K)
    logits_BxNxGxSxT = jnp.einsum("bsngk,btnk->bngst", q_BxSxNxGxK, k_BxTxNxK,
                                  preferred_element_type=jnp.float32) * (K ** -0.5)
    index = jnp.arange(S)
    mask_BxSxT = _mask(index, index, segment_ids_BxS, segment_ids_BxS)
    logits_BxNxGxSxT = jnp.where(mask_BxSxT[:, None, None], logits_BxNxGxSxT, _MASKED)
    probs = jax.nn.softmax(logits_BxNxGxSxT, axis=-1).astype(v_BxTxNxK.dtype)
    out_BxSxNxGxK = jnp.einsum("bngst,btnk->bsngk", probs, v_BxTxNxK)
    return out_BxSxNxGxK.reshape(B, S, H, K)


def blockwise_attention(q_BxSxHxK: jax.Array, k_BxSxNxK: jax.Array, v_BxSxNxK: jax.Array, segment_ids_BxS: jax.Array,
                        *, block_size: int) -> jax.Array:
    B, S, H, K = q_BxSxHxK.shape
    N = k_BxSxNxK.shape[2]
    G = H // N
    c = min(block_size, S)
    pad = (-S) % c
    if pad:  # padded keys get segment -1 (never attended), padded queries -2 (dropped below)
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_BxSxHxK, k_BxSxNxK, v_BxSxNxK = (jnp.pad(x, widths) for x in (q_BxSxHxK, k_BxSxNxK, v_BxSxNxK))
    nb = (S + pad) // c
    q_seg = jnp.pad(segment_ids_BxS, ((0, 0), (0, pad)), constant_values=-2)
    kv_seg = jnp.pad(segment_ids_BxS, ((0, 0), (0, pad)), constant_values=-1)
    # Blocks first, heads before length: q [nb, B, N, G, c, K], k/v [nb, B, N, c, K].
    q = (q_BxSxHxK * (K ** -0.5)).reshape(B, nb, c, N, G, K).transpose(1, 0, 3, 4, 2, 5)
    k = k_BxSxNxK.reshape(B, nb, c, N, K).transpose(1, 0, 3, 2, 4)
    v = v_BxSxNxK.reshape(B, nb, c, N, K).transpose(1, 0, 3, 2, 4)
    q_seg = q_seg.reshape(B, nb, c).transpose(1, 0, 2)
    kv_seg = kv_seg.reshape(B, nb, c).transpose(1, 0, 2)
    out = _flash(q, k, v, q_seg, kv_seg)  # [nb, B, N, G, c, K]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, nb * c, H, K)
    return out[:, :S]


def _block_probs(q_i, k_j, q_seg_i, kv_seg_j, i, j, lse_i=None):
    """Scaled logits (or probabilities given lse) of query block i against key block j."""
    c = q_i.shape[-2]
    s = jnp.einsum("bngqk,bnsk->bngqs", q_i, k_j, preferred_element_type=jnp.float32)
    mask = _mask(i * c + jnp.arange(c), j * c + jnp.arange(c), q_seg_i, kv_seg_j)[:, None, None]
    if lse_i is None:
        return jnp.where(mask, s, _MASKED), mask
    return jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)


def _flash_forward(q, k, v, q_seg, kv_seg):
    def one_query_block(i):
        q_i = q[i]
        B, N, G, c, K = q_i.shape

        def step(j, carry):
            o, m, row_sum = carry
            s, mask = _block_probs(q_i, k[j], q_seg[i], kv_seg[j], i, j)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            row_sum = row_sum * correction + p.sum(-1)
            pv = jnp.einsum("bngqs,bnsk->bngqk", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
            return o * correction[..., None] + pv, m_new, row_sum

        init = (jnp.zeros((B, N, G, c, K), jnp.float32), jnp.full((B, N, G, c), _MASKED, jnp.float32),
                jnp.zeros((B, N, G, c), jnp.float32))
        o, m, row_sum = _fori(0, i + 1, step, init)  # causal: key blocks 0..i only
        row_sum = jnp.where(row_sum == 0, 1.0, row_sum)  # padding rows: no key at all
        return (o / row_sum[..., None]).astype(q.dtype), m + jnp.log(row_sum)

    return _map(one_query_block, q.shape[0])


@jax.custom_vjp
def _flash(q, k, v, q_seg, kv_seg):
    return _flash_forward(q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg):
    out, lse = (checkpoint_name(x, ATTENTION_RESIDUALS) for x in _flash_forward(q, k, v, q_seg, kv_seg))
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(residuals, d_out):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    nb = q.shape[0]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nb, B, N, G, c]

    def dp_ds(i, j):
        p = _block_probs(q[i], k[j], q_seg[i], kv_seg[j], i, j, lse[i])
        dp = jnp.einsum("bngqk,bnsk->bngqs", d_out[i], v[j], preferred_element_type=jnp.float32)
        return p, p * (dp - delta[i][..., None])

    def kv_block(dq, j):
        """Key block j's dk, dv, and its share of every later query block's dq (one pass, as FlashAttention-2)."""
        def step(i, carry):
            dq, dk, dv = carry
            p, ds = dp_ds(i, j)
            dv = dv + jnp.einsum("bngqs,bngqk->bnsk", p, d_out[i], preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bngqs,bngqk->bnsk", ds, q[i], preferred_element_type=jnp.float32)
            dq = dq.at[i].add(jnp.einsum("bngqs,bnsk->bngqk", ds, k[j], preferred_element_type=jnp.float32))
            return dq, dk, dv

        zeros = jnp.zeros(k.shape[1:], jnp.float32)
        dq, dk, dv = _fori(j, nb, step, (dq, zeros, zeros))  # causal: query blocks j..nb-1
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = _scan(kv_block, jnp.zeros(q.shape, jnp.float32), nb)
    return dq.astype(q.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
