"""Rotary embeddings and the EABF logit scale (docs/methods.md).

Frequencies follow `transformers/modeling_rope_utils.py` operation by
operation in float32, so that angles at position 10^6 agree with PyTorch's
to the last bit where possible: a one-ulp difference in `inv_freq` times a
position of 32768 is already a visible logit difference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax import platform as platform_lib
from cream_jax.config import LlamaConfig, RopeConfig

f32 = np.float32


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2).astype(f32) / f32(dim)
    return (f32(1.0) / (f32(theta) ** exponents)).astype(f32)


def ntk_theta(rope: RopeConfig, head_dim: int) -> float:
    """Fixed NTK-aware base: theta * s ** (d / (d - 2)) (exported to HF as a plain rope_theta)."""
    return rope.theta * rope.factor ** (head_dim / (head_dim - 2))


def static_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2] float32, attention_factor) for every type but `dynamic`'s long branch."""
    d = head_dim
    if rope.type in ("default", "dynamic"):
        return _default_inv_freq(rope.theta, d), 1.0
    if rope.type == "ntk":
        return _default_inv_freq(ntk_theta(rope, d), d), 1.0
    if rope.type == "linear":
        return (_default_inv_freq(rope.theta, d) / f32(rope.factor)).astype(f32), 1.0
    if rope.type == "llama3":
        return _llama3_inv_freq(rope, d), 1.0
    if rope.type == "yarn":
        return _yarn_inv_freq(rope, d)
    raise ValueError(f"Unknown rope.type {rope.type!r}")


def _llama3_inv_freq(rope: RopeConfig, d: int) -> np.ndarray:
    inv_freq = _default_inv_freq(rope.theta, d)
    factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
    wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
    smooth = ((f32(old_len) / wavelen - f32(lo)) / f32(hi - lo)).astype(f32)
    smoothed = ((1 - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def yarn_attention_factor(rope: RopeConfig) -> float:
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        return float(mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim))
    return mscale(rope.factor)


def _yarn_inv_freq(rope: RopeConfig, d: int) -> tuple[np.ndarray, float]:
    base, factor = rope.theta, rope.factor
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1
    orig = rope.original_max_position_embeddings
    truncate = True if rope.truncate is None else rope.truncate

    def correction_dim(rotations):
        return (d * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    pos_freqs = (f32(base) ** (np.arange(0, d, 2).astype(f32) / f32(d))).astype(f32)
    extrapolation = (f32(1.0) / pos_freqs).astype(f32)
    interpolation = (f32(1.0) / (f32(factor) * pos_freqs)).astype(f32)
    extrapolation_factor = (1 - ramp).astype(f32)
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(f32), yarn_attention_factor(rope)


def inv_freq_for(config: LlamaConfig, position_ids: jax.Array,
                 seq_len: int | jax.Array | None = None) -> tuple[jax.Array, float]:
    """inv_freq for this batch. Only `dynamic` depends on the input: its base grows with the sequence length
    T once T exceeds max_position_embeddings (as HF's dynamic NTK). T is `seq_len` where given, else
    max(position_ids) + 1: a full forward pass sees the whole sequence, but a chunk of a longer prompt does
    not, so the KV-cache prefill passes the prompt's length (one theta for every prompt token, as
    transformers computes it from the whole prompt; each decoded token then grows it)."""
    rope, d = config.rope, config.head_dim
    inv_freq, attention_factor = static_inv_freq(rope, d)
    if rope.type != "dynamic":
        return jnp.asarray(inv_freq), attention_factor
    max_pos = config.max_position_embeddings
    if seq_len is None:
        seq_len = jnp.max(position_ids) + 1
    seq_len = jnp.asarray(seq_len).astype(jnp.float32)
    grown = (f32(rope.factor) * seq_len / f32(max_pos)) - f32(rope.factor - 1)
    theta = f32(rope.theta) * grown ** f32(d / (d - 2))
    exponents = jnp.arange(0, d, 2).astype(jnp.float32) / f32(d)
    long_inv_freq = 1.0 / (theta ** exponents)
    return jnp.where(seq_len > max_pos, long_inv_freq, jnp.asarray(inv_freq)), attention_factor


def cos_sin(config: LlamaConfig, position_ids_BxS: jax.Array,
            seq_len: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, head_dim] in float32 from explicit (possibly jumping) position ids; `seq_len`: the
    length dynamic NTK scales for (default: max(position_ids) + 1, see `inv_freq_for`)."""
    inv_freq_K2, attention_factor = inv_freq_for(config, position_ids_BxS, seq_len)
    angle_BxSxK2 = position_ids_BxS.astype(jnp.float32)[..., None] * inv_freq_K2
    angle_BxSxK = jnp.concatenate([angle_BxSxK2, angle_BxSxK2], axis=-1)
    return jnp.cos(angle_BxSxK) * attention_factor, jnp.sin(angle_BxSxK) * attention_factor


def apply_rotary(x_BxSxHxK: jax.Array, cos_BxSxK: jax.Array, sin_BxSxK: jax.Array, platform: str = "") -> jax.Array:
    """Hugging Face's rotate-half layout, computed in float32, returned in x's dtype: x * cos + rotate_half(x)
    * sin, rotate_half(x) = concat(-x2, x1). On TPU rotate_half is a matmul (`_rotary_by_matmul`),
    elsewhere each half is rotated on its own (`_rotary_per_half`): the same products and sums either way."""
    if platform_lib.resolve(platform) == "tpu":
        return _rotary_by_matmul(x_BxSxHxK, cos_BxSxK, sin_BxSxK)
    return _rotary_per_half(x_BxSxHxK, cos_BxSxK, sin_BxSxK)


def _rotary_per_half(x_BxSxHxK, cos_BxSxK, sin_BxSxK):
    """Each half cast and rotated on its own, rather than x * cos + concat(-x2, x1) * sin over a float32 copy
    of x: on TPU (head dim = the 128 lanes) XLA then writes no float32 or negated copies of the queries and
    keys (tests/test_model.py compares the TPU compiler's estimates of the forms)."""
    half = x_BxSxHxK.shape[-1] // 2
    x1 = x_BxSxHxK[..., :half].astype(jnp.float32)
    x2 = x_BxSxHxK[..., half:].astype(jnp.float32)
    cos, sin = cos_BxSxK[:, :, None, :], sin_BxSxK[:, :, None, :]
    out1 = (x1 * cos[..., :half] - x2 * sin[..., :half]).astype(x_BxSxHxK.dtype)
    out2 = (x2 * cos[..., half:] + x1 * sin[..., half:]).astype(x_BxSxHxK.dtype)
    return jnp.concatenate([out1, out2], axis=-1)


def _rotary_by_matmul(x_BxSxHxK, cos_BxSxK, sin_BxSxK):
    """rotate_half as a matmul by a signed permutation matrix, on the MXU instead of moving half the lanes;
    on TPU cheaper than `_rotary_per_half` (the TPU compiler's estimate: tests/test_model.py).
    The values are exact (each output is one input times +-1, in x's dtype; HIGHEST keeps float32 whole). The
    gradient differs by a rounding in bfloat16: x's two cotangents (through the cast and through the matmul)
    are each rounded to bfloat16 before they are added. The per-head matrix gives the product a batch
    dimension, so the `save_dots` remat policy does not save it."""
    _, _, H, K = x_BxSxHxK.shape
    half = K // 2
    rotate_KxK = np.zeros((K, K), np.float32)
    rotate_KxK[np.arange(half) + half, np.arange(half)] = -1.0  # output i < K/2 is -x[i + K/2]
    rotate_KxK[np.arange(half), np.arange(half) + half] = 1.0  # output i >= K/2 is x[i - K/2]
    rotate_HxKxK = jnp.broadcast_to(jnp.asarray(rotate_KxK, x_BxSxHxK.dtype), (H, K, K))
    rotated_BxSxHxK = jnp.einsum("bshk,hkj->bshj", x_BxSxHxK, rotate_HxKxK, precision=jax.lax.Precision.HIGHEST)
    cos, sin = cos_BxSxK[:, :, None, :], sin_BxSxK[:, :, None, :]
    return (x_BxSxHxK.astype(jnp.float32) * cos + rotated_BxSxHxK.astype(jnp.float32) * sin).astype(x_BxSxHxK.dtype)


def eabf_scale(position_ids: jax.typing.ArrayLike, base_length: int) -> jax.Array:
    """EABF query scale max(1, ln(p + 1) / ln(c)) in float32, p the absolute position id."""
    p = jnp.asarray(position_ids).astype(jnp.float32)
    return jnp.maximum(1.0, jnp.log(p + 1.0) / f32(math.log(base_length)))
