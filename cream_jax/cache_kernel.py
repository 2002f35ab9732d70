"""The Pallas TPU kernel of `generate.cached_attention`: new queries against the KV cache, flash-style.

XLA runs the block loop of `cached_attention` as separate ops, so every key block's scores [chunk, block]
go out to HBM and back (written by the QK matmul, read for the max, the exponential and the PV matmul):
at a 256K context those round trips, not the matmuls, take most of a prefill's time. This kernel keeps a
key block's scores, the running max and sum and the output accumulator in VMEM.

Grid (batch row b, kv head n, query block i, key block j), j innermost. The queries of kv head n are its
C new tokens x G query heads, as R = C G rows (token-major: row r is token r // G). A grid step computes
key block j only if a query of block i can see one of its slots: j from the block of the row's first
real slot (`start`, left padding) up to the block of block i's last query (the causal bound, from the
cache length); on the other steps the key block's index stays where it was, so Pallas fetches nothing.
The cache length, the layer and each row's start reach the index maps as prefetched scalars, so one
compiled program serves every chunk of a prompt and every decode step.

Off TPU it runs in Pallas's interpret mode (slow; for tests). Under a mesh it runs inside `shard_map`:
rows over `data`/`fsdp`, kv heads over `tensor`, as the cache is laid out (`generate.cache_sharding`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cream_jax.sharding import logical_to_spec

LANES = 128  # the running max and sum are kept [rows, 128], one value repeated over the lanes
MAX_QUERY_ROWS = 1024  # query rows per grid step and head: a step's scores are [rows, key block] f32 in VMEM
_MASKED = -1e30


def supported(block: int) -> bool:
    """Whether the kernel takes key blocks of `block` slots: a multiple of 128 (the lanes)."""
    return block % LANES == 0


def query_block(rows: int) -> int:
    """Query rows per grid step: all of them up to MAX_QUERY_ROWS, else the largest divisor below it that
    is a multiple of 8 (the sublanes)."""
    if rows <= MAX_QUERY_ROWS:
        return rows
    for bq in range(MAX_QUERY_ROWS, 7, -8):
        if rows % bq == 0:
            return bq
    return rows


def heads_per_step(kv_heads: int, bq: int) -> int:
    """kv heads per grid step: as many as keep the step's query rows within MAX_QUERY_ROWS (a decode step's
    G rows per head: every head at once, so the grid is short and each step reads a large slice)."""
    hb = max(1, min(kv_heads, MAX_QUERY_ROWS // bq))
    while kv_heads % hb:
        hb -= 1
    return hb


def _token_of_row(rows, group: int):
    if group == 1:
        return rows
    if group & (group - 1) == 0:
        return jax.lax.shift_right_logical(rows, group.bit_length() - 1)
    return rows // group


def _key_block_bounds(meta_ref, start_ref, b, i, *, group: int, bq: int, bk: int, key_blocks: int):
    """[lo, hi]: the key blocks query block `i` of row `b` sees."""
    length = meta_ref[1]
    lo = start_ref[b] // bk
    hi = jnp.minimum((length + _token_of_row((i + 1) * bq - 1, group)) // bk, key_blocks - 1)
    return lo, hi


def _kernel(meta_ref, start_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, group: int, bq: int,
            bk: int, slots: int):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    last_j = pl.num_programs(3) - 1
    hb, _, head_dim = q_ref.shape

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = _key_block_bounds(meta_ref, start_ref, b, i, group=group, bq=bq, bk=bk, key_blocks=-(-slots // bk))
    slot = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    query_slot = meta_ref[1] + _token_of_row(i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0), group)

    def update(partial: bool):
        visible = (slot <= query_slot) & (slot >= start_ref[b])
        for h in range(hb):  # static: each head's scores [bq, bk], its own running max, sum and output
            s = jax.lax.dot_general(q_ref[h], k_ref[h], (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            s = jnp.where(visible, s, _MASKED)
            m_prev, l_prev = m_ref[h], l_ref[h]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [bq, LANES]
            p = jnp.where(visible, jnp.exp(s - jnp.tile(m_next, (1, bk // LANES))), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_ref[h] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
            m_ref[h] = m_next
            v = v_ref[h]
            if partial:  # the slots past the cache's end are whatever the block's buffer held: zero them
                in_cache = j * bk + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0) < slots
                v = jnp.where(in_cache, v, jnp.zeros_like(v))
            pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [bq, K]
            acc_ref[h] = acc_ref[h] * _lanes_to(alpha, head_dim) + pv

    seen = (j >= lo) & (j <= hi)
    if slots % bk:
        pl.when(seen & (j < last_j))(lambda: update(False))
        pl.when(seen & (j == last_j))(lambda: update(True))
    else:
        pl.when(seen)(lambda: update(False))

    @pl.when(j == last_j)
    def _store():
        for h in range(hb):
            row_sum = l_ref[h]
            row_sum = jnp.where(row_sum == 0, 1.0, row_sum)  # a padding query sees no key at all
            o_ref[h] = (acc_ref[h] / _lanes_to(row_sum, head_dim)).astype(o_ref.dtype)


def _lanes_to(x_RxLANES: jax.Array, width: int) -> jax.Array:
    """A [rows, LANES] value repeated over the lanes, as [rows, width]."""
    if width <= LANES:
        return x_RxLANES[:, :width]
    return jnp.tile(x_RxLANES, (1, width // LANES))


def grid(batch: int, kv_heads: int, rows: int, slots: int, block: int) -> tuple[int, int, int, int]:
    """The kernel's grid: (batch rows, kv head groups, query blocks, key blocks)."""
    bq = query_block(rows)
    return batch, kv_heads // heads_per_step(kv_heads, bq), rows // bq, -(-slots // block)


def _local(q_BxNxRxK, k_cache, v_cache, meta_2, start_B, *, group: int, block: int, interpret: bool):
    B, N, R, K = q_BxNxRxK.shape
    T = k_cache.shape[3]
    bq, bk = query_block(R), block
    hb = heads_per_step(N, bq)
    bounds = functools.partial(_key_block_bounds, group=group, bq=bq, bk=bk, key_blocks=-(-T // bk))

    def kv_index(b, n, i, j, meta_ref, start_ref):
        lo, hi = bounds(meta_ref, start_ref, b, i)
        return meta_ref[0], b, n, jnp.clip(j, lo, hi), 0  # an unseen block keeps the last index: no fetch

    def q_index(b, n, i, j, meta_ref, start_ref):
        return b, n, i, 0

    kv_spec = pl.BlockSpec((None, None, hb, bk, K), kv_index)
    q_spec = pl.BlockSpec((None, hb, bq, K), q_index)
    kernel = functools.partial(_kernel, group=group, bq=bq, bk=bk, slots=T)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=grid(B, N, R, T, bk), in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((hb, bq, LANES), jnp.float32), pltpu.VMEM((hb, bq, LANES), jnp.float32),
                            pltpu.VMEM((hb, bq, K), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_BxNxRxK.shape, q_BxNxRxK.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="cream_cache_attention",
    )(meta_2, start_B, q_BxNxRxK, k_cache, v_cache)


def cache_attention(q_BxNxRxK: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                    length: jax.Array, start_B: jax.Array, *, group: int, block: int,
                    interpret: bool = False) -> jax.Array:
    """Attention of the R = C x G query rows of each kv head (token-major, already scaled by head_dim^-0.5)
    against layer `layer` of the cache [L, B, N, T, K], whose slots [length, length + C) hold the new tokens'
    keys: [B, N, R, K]. Row b sees slots from `start_B[b]` up to each query's own slot. `interpret`: Pallas's
    interpreter (off TPU)."""
    meta_2 = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(length, jnp.int32)])  # (layer, length)
    fn = functools.partial(_local, group=group, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q_BxNxRxK, k_cache, v_cache, meta_2, start_B)
    names = mesh.axis_names
    q_spec = logical_to_spec(("batch", "activation_kv_heads", None, None), mesh_axes=names)
    cache_spec = logical_to_spec(("layers", "batch", "activation_kv_heads", "length", None), mesh_axes=names)
    start_spec = logical_to_spec(("batch",), mesh_axes=names)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, cache_spec, cache_spec, jax.sharding.PartitionSpec(),
                                                  start_spec),
                         out_specs=q_spec, check_vma=False)(q_BxNxRxK, k_cache, v_cache, meta_2, start_B)


# Pallas's pipeline spends about this much per grid step beyond its DMA and compute (Pallas's TPU docs give
# 0.35 us); the planner counts it for every step, those that compute nothing included.
STEP_OVERHEAD_S = 0.35e-6


@dataclasses.dataclass(frozen=True)
class KernelWork:
    """What one kernel call executes on one chip (its local shard of rows and kv heads)."""

    steps: int  # grid steps
    computed: int  # grid steps that compute a key block (the others fetch nothing)
    step_flops: float  # matmul FLOPs of a computing step (QK and PV, every head of the step)
    step_bytes: float  # HBM bytes a computing step reads (its heads' key and value blocks)
    io_bytes: float  # queries read and outputs written, once per (row, head group, query block)

    def seconds(self, peak_flops: float, hbm_bytes_per_s: float) -> float:
        """Each computing step bound by its matmuls at peak or its fetch at HBM bandwidth (the pipeline
        overlaps the next block's fetch with this block's compute), plus STEP_OVERHEAD_S per step. Not in it:
        the vector unit's softmax (exp, max, sum over each score)."""
        step = max(self.step_flops / peak_flops, self.step_bytes / hbm_bytes_per_s)
        return self.computed * step + self.steps * STEP_OVERHEAD_S + self.io_bytes / hbm_bytes_per_s


def work(batch: int, kv_heads: int, group: int, tokens: int, slots: int, block: int, head_dim: int,
         itemsize: int, length: int, start: int = 0) -> KernelWork:
    """The grid of one call for `tokens` new tokens at cache slot `length` (every row starting at `start`),
    per chip: `batch` rows and `kv_heads` kv heads are the chip's own."""
    rows = tokens * group
    bq = query_block(rows)
    _, head_groups, query_blocks, key_blocks = grid(batch, kv_heads, rows, slots, block)
    hb = kv_heads // head_groups
    lo = start // block
    computed = sum(min((length + ((i + 1) * bq - 1) // group) // block, key_blocks - 1) - lo + 1
                   for i in range(query_blocks))
    per_row = head_groups * computed
    return KernelWork(steps=batch * head_groups * query_blocks * key_blocks, computed=batch * per_row,
                      step_flops=2 * 2 * hb * bq * block * head_dim, step_bytes=2 * hb * block * head_dim * itemsize,
                      io_bytes=2 * batch * kv_heads * rows * head_dim * itemsize)
