"""The TPU attention backend: jax's Pallas splash (flash) attention kernel.

Causal in sequence order, segment ids for packed rows, GQA through the kernel's MQA form (one kernel
call per kv head with its G query heads), EABF through the pre-scaled queries the model passes in.
Pallas calls cannot be partitioned by the compiler, so under a mesh the kernel runs inside `shard_map`:
batch over (data, fsdp), heads over tensor, as the rule table says. Off TPU it runs in Pallas's
interpret mode (slow, for tests). The kernel reports no cost to XLA's cost analysis; the planner counts
the kernel calls in the compiled step (`kernel_calls`) and adds what they execute (`splash_flops`).

The kernel names its output and logsumexp `config.ATTENTION_RESIDUALS`, so a remat policy that saves that name
keeps the backward pass from running the forward kernel a second time.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Mapping

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from cream_jax.config import ATTENTION_RESIDUALS
from cream_jax.sharding import logical_to_spec

# S x S x head_dim matmuls per (query block, kv block) pair in each kernel: forward QK^T, PV; dq: QK^T,
# dO V^T, dS K; dkv: QK^T, dO V^T, P^T dO, dS^T Q.
KERNEL_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


@functools.lru_cache(maxsize=32)
def _kernel(seq_len: int, q_heads: int, block: int, interpret: bool):
    block = min(block, seq_len)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block)
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((seq_len, seq_len)) for _ in range(q_heads)])
    return kernel_lib.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret,
                                                    residual_checkpoint_name=ATTENTION_RESIDUALS)


def _local(q_BxSxHxK, k_BxSxNxK, v_BxSxNxK, segment_ids_BxS, block: int, interpret: bool):
    B, S, H, K = q_BxSxHxK.shape
    N = k_BxSxNxK.shape[2]
    kernel = _kernel(S, H // N, block, interpret)
    q_BxNxGxSxK = (q_BxSxHxK * (K ** -0.5)).reshape(B, S, N, H // N, K).transpose(0, 2, 3, 1, 4)
    k_BxNxSxK = k_BxSxNxK.transpose(0, 2, 1, 3)
    v_BxNxSxK = v_BxSxNxK.transpose(0, 2, 1, 3)

    def one(q_GxSxK, k_SxK, v_SxK, seg_S):
        return kernel(q_GxSxK, k_SxK, v_SxK, segment_ids=kernel_lib.SegmentIds(q=seg_S, kv=seg_S))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # kv heads
    out_BxNxGxSxK = jax.vmap(per_head)(q_BxNxGxSxK, k_BxNxSxK, v_BxNxSxK, segment_ids_BxS)
    return out_BxNxGxSxK.transpose(0, 3, 1, 2, 4).reshape(B, S, H, K).astype(q_BxSxHxK.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, block_size: int,
                     interpret: bool = False) -> jax.Array:
    fn = functools.partial(_local, block=block_size, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, segment_ids)
    heads = logical_to_spec(("batch", "length", "activation_heads", None), mesh_axes=mesh.axis_names)
    kv = logical_to_spec(("batch", "length", "activation_kv_heads", None), mesh_axes=mesh.axis_names)
    seg = logical_to_spec(("batch", "length"), mesh_axes=mesh.axis_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=(heads, kv, kv, seg), out_specs=heads, check_vma=False)(
        q, k, v, segment_ids)


def kernel_calls(hlo_text: str) -> Counter:
    """How many times the compiled program calls each splash kernel (`fwd`, `dq`, `dkv`): the custom calls
    keep the kernel's name (`splash_mqa_fwd_segmented_residuals.3 = ... custom-call(...)`). Under remat
    the forward kernel runs twice per layer unless its residuals are saved."""
    call = r"^\s*%?splash_m[hq]a_(fwd|dq|dkv)\w*(?:\.\d+)? = .*custom-call\("
    return Counter(re.findall(call, hlo_text, flags=re.MULTILINE))


def splash_flops(calls: Mapping[str, int], batch: int, seq_len: int, heads: int, head_dim: int,
                 block: int) -> float:
    """FLOPs executed by `calls` (kernel kind -> number of calls, each over `batch` rows of `heads` heads):
    each kind's `KERNEL_MATMULS` over the causal mask's non-empty blocks, which the kernel computes whole:
    nb (nb + 1) / 2 of nb^2 block pairs, nb = seq_len / block, a little over half."""
    nb = -(-seq_len // min(block, seq_len))
    pair = 2 * min(block, seq_len) ** 2 * head_dim  # one matmul over one (query block, kv block) pair
    per_matmul = pair * nb * (nb + 1) / 2 * heads * batch
    return sum(KERNEL_MATMULS[kind] * n * per_matmul for kind, n in calls.items())
