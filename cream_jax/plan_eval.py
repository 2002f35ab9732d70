"""Plan an evaluation before renting the TPUs: compile the real prefill and decode programs for a TPU topology.

    python -m cream_jax.plan --eval --config=configs/llama2_7b_cream_256k.py --topology=v5p-8 --length=262144 \\
        [--chunk=2048] [--block=1024] [--batch=N] [--json=plan.json]

The programs are `generate.extend`, the jitted function evaluation runs: one prefill chunk (C = `--chunk`
tokens, `logits="last"`, as `generate.prefill` calls it) and one decode step (C = 1, as `generate.decode`'s
loop runs it), each against a cache of `--length` slots, compiled from abstract shapes with their shardings
through libtpu (no weights allocated). The model is the recipe's (its RoPE scaling and EABF) in bfloat16, as
an evaluation loads it. The mesh: kv heads over `tensor` (by default as many chips as divide the kv heads),
the rest of the chips over `data`, so each chip holds its rows' cache slots of its heads; `--config.mesh.*`
sets it instead, as in training. Parameters are sharded by `sharding.param_specs`, the cache by
`generate.cache_sharding`, the batch over `data` and `fsdp`; the token ids are replicated, as evaluation
passes them (the activations are constrained to the batch axes inside). It reports:

- per-chip HBM from the TPU compiler's `memory_analysis`: the weights and the cache (the arguments; the
  donated cache aliases the output), each program's temporaries and code, the total against capacity;
- the largest batch that fits: the prefill chunk program (the larger of the two) compiled at the planned
  batch and one step more, its total extrapolated linearly to capacity, and the batch found verified by a
  compile (stepping down, one compile each, should it not fit);
- estimated seconds for a whole prompt's prefill (its `--length / --chunk` chunks) and ms per decoded token
  at a context of `--length` tokens (the step that writes the cache's last slot), beside their floors:
  the prefill's model FLOPs (`flops.prefill_flops`: causal attention) at the chips' peak, and a decode step's
  bytes (every weight but the embedding table, of which a lookup reads one row per sequence, and the whole
  cache, each chip its own shards) at the chip's HBM bandwidth (`flops.CHIPS`).

How the time is estimated. XLA's cost analysis counts a while loop's body once, and both programs are
loops: a `lax.scan` over the layers, and in each layer `cached_attention`'s `fori_loop` over key blocks,
whose bounds depend on the traced `cache.length` (a chunk attends to the blocks up to its own last token).
A compile of the real program reports one layer with one key block. So the cost figures (the compiler's
`optimal_seconds`, FLOPs and bytes, per chip) come from three more compiles of the same function,
`generate._extend`, with the same shapes, shardings and layer scan, in which `cost_loops` makes the block
loop a Python loop over exactly 1 or 2 blocks and puts u layers in each iteration of the scan (`unroll`, u
the least divisor of the layer count above 1). With `outside` the work outside the layer loop (embedding,
RoPE tables, final norm, the last token's logits, and any copy of the whole cache the compiler makes),
`layer` a layer without its key blocks (projections, MLP, norms, cache writes, the collectives of the
tensor-sharded matmuls) and `block` one key block's online-softmax update (`generate._block_update`, its
slice of the cache and its mask):

    cost(1 block,  1 layer per iteration)  = outside + layer + block
    cost(2 blocks, 1 layer per iteration)  = outside + layer + 2 block
    cost(1 block,  u layers per iteration) = outside + u (layer + block)

and a program visiting n blocks in each of L layers costs outside + L (layer + n block). Prefill chunk i
(0-based, no left padding) visits ceil((i + 1) C / block) blocks (`generate.block_range`), so a prompt costs
(length / C) (outside + L layer) + L block x (the sum of those counts); the decode step at a full cache
visits them all. A cost compile with the block loop left in it is an error. The TPU compiler copies the
cache into another layout for the attention in some programs and not in others (`cache_copies` counts the
whole-cache copies in the optimised HLO); where the real program makes copies the cost compiles do not,
they are added at HBM bandwidth. Not in the figures: the loop's own overhead per iteration (its counter and
carries). The cost compiles turn off XLA's collective matmuls (as the train planner's do: loops over the
shards on larger meshes).

With the attention kernel (on TPU, `generate.use_kernel`; `cache_kernel`), the real programs call it once
per layer, and the compiler costs a Pallas kernel at nothing. The estimate then takes outside and layer from
the cost compiles above (which run XLA's block loop, `kernel=False`, with their own cache copies replaced by
the real program's, `with_copies`) and adds the kernel's work as `cache_kernel.work` counts it from the
kernel's grid: each step that computes is bound by its matmuls at peak or its key and value blocks at HBM
bandwidth, every step costs `cache_kernel.STEP_OVERHEAD_S`. That part is a model, not the compiler's figure;
the XLA loop's estimate is printed beside it.

libtpu refuses to compile a program whose temporaries exceed HBM: such a batch does not fit, with the
temporaries the compiler named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cream_jax import cache_kernel, cli, generate, sharding, tpu
from cream_jax import flops as flops_lib
from cream_jax import model as model_lib
from cream_jax import train_config as tc
from cream_jax.config import LlamaConfig
from cream_jax.errors import CreamError

GIB = 2**30
DEFAULT_CHUNK = 2048  # prefill tokens per `extend` call (evaluate's --chunk)
# XLA options of the cost compiles: no collective matmuls, whose loops over the shards the cost analysis would
# count once (plan.COST_COMPILE_OPTIONS says more).
COST_COMPILE_OPTIONS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 1 << 30}


class EvalPlanError(CreamError, ValueError):
    """An evaluation plan's length, chunk, block or batch that cannot run; the message names the flag."""


@dataclasses.dataclass
class Cost:
    """Per-chip cost of one part of a program, from the TPU compiler's cost analysis."""

    seconds: float  # optimal_seconds
    flops: float
    bytes: float  # bytes accessed

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.seconds + other.seconds, self.flops + other.flops, self.bytes + other.bytes)

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(self.seconds - other.seconds, self.flops - other.flops, self.bytes - other.bytes)

    def __mul__(self, n: float) -> "Cost":
        return Cost(self.seconds * n, self.flops * n, self.bytes * n)

    __rmul__ = __mul__


@dataclasses.dataclass
class Parts:
    """A program's cost split as the module docstring says: outside the layers, one layer without its key
    blocks, one key block (all per chip)."""

    outside: Cost
    layer: Cost
    block: Cost
    cache_copies: int = 0  # whole-cache layout copies in `outside` (`cache_copies`)

    def total(self, layers: int, blocks_per_layer: float) -> Cost:
        return self.outside + layers * (self.layer + blocks_per_layer * self.block)


@dataclasses.dataclass
class EvalPlan:
    config: str
    topology: str
    chips: int
    mesh: dict  # {data, fsdp, tensor}
    params_billions: float
    layers: int
    dtype: str
    rope: str
    length: int  # cache slots: the context planned
    chunk: int
    block: int
    batch: int  # sequences (all chips together)
    hbm_capacity_gib: float
    weights_gib: float  # per chip
    cache_gib: float  # per chip, at `batch`
    prefill_temporaries_gib: float | None  # None where the compiler refused the program for HBM
    decode_temporaries_gib: float | None
    code_gib: float | None
    prefill_total_gib: float | None
    decode_total_gib: float | None
    attention: str  # "kernel" (cache_kernel, Pallas) or "xla" (generate's key-block loop)
    cache_copies_prefill: int  # whole-cache (k or v) layout copies per call of the program, each read and written
    cache_copies_decode: int
    fits: bool
    max_batch: int | None  # the largest batch whose prefill program fits (None: not searched)
    max_batch_method: str
    prefill_chunks: int
    prefill_blocks_visited: int  # key blocks per layer, all chunks together
    prefill_seconds: float | None  # the whole prompt (every row of the batch at once)
    prefill_flop_floor_seconds: float
    prefill_ratio: float | None
    decode_blocks_visited: int
    decode_ms: float | None  # one step at a context of `length`
    decode_hbm_floor_ms: float
    decode_ratio: float | None
    model_flops_prefill: float  # per chip
    compiler_flops_prefill: float | None  # per chip, from the parts
    decode_bytes_floor: float  # per chip
    compiler_bytes_decode: float | None  # per chip, from the parts
    prefill_parts: dict | None  # {outside, layer, block}: Cost fields per chip
    decode_parts: dict | None
    prefill_xla_seconds: float | None  # the same prompt with XLA's key-block loop instead of the kernel
    decode_xla_ms: float | None
    prefill_kernel: dict | None  # the kernel's work, all layers and chunks: steps, computed, flops, bytes, seconds,
    decode_kernel: dict | None  # overhead_seconds (per chip); None where attention is "xla"
    compile_seconds: float
    notes: list[str]


# ----------------------------------------------------------------------------- inputs


def eval_model_config(c: ml_collections.ConfigDict, platform: str = "tpu") -> LlamaConfig:
    """The recipe's model as an evaluation runs it: its architecture, RoPE scaling and EABF, in bfloat16."""
    return tc.model_config(c).replace(dtype="bfloat16", param_dtype="bfloat16", platform=platform)


def default_mesh(cfg: LlamaConfig, chips: int) -> dict[str, int]:
    """kv heads over `tensor` on as many chips as divide them (and the chip count), the rest over `data`."""
    tensor = max(t for t in range(1, chips + 1) if chips % t == 0 and cfg.num_key_value_heads % t == 0)
    return {"data": chips // tensor, "fsdp": 1, "tensor": tensor}


def check(cfg: LlamaConfig, mesh: jax.sharding.Mesh, length: int, chunk: int, block: int, batch: int) -> None:
    """Everything that would fail later, before any compile: one EvalPlanError (or MeshError) naming the flag."""
    for name, value in (("length", length), ("chunk", chunk), ("block", block), ("batch", batch)):
        if value < 1:
            raise EvalPlanError(f"--{name}={value} must be a positive integer.")
    if length % chunk:
        raise EvalPlanError(f"--length={length} is not a multiple of --chunk={chunk}: the prefill runs whole "
                            f"chunks of the same shape; use --chunk={math.gcd(length, chunk)} or a length of "
                            f"{-(-length // chunk) * chunk}.")
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % rows:
        raise EvalPlanError(f"--batch={batch} is not divisible by mesh.data * mesh.fsdp = {rows} (the cache's "
                            f"rows are sharded over them); use a multiple of {rows}.")
    sharding.check_heads(cfg, mesh.shape["tensor"])
    shapes, specs = _param_shapes_and_specs(cfg, mesh)
    sharding.check_divisible(shapes, specs, mesh)


def _param_shapes_and_specs(cfg: LlamaConfig, mesh: jax.sharding.Mesh) -> tuple[dict, dict]:
    abstract = model_lib.abstract(cfg)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(nnx.state(abstract,
                                                                                                       nnx.Param)))
    return shapes, sharding.param_specs(abstract, mesh_axes=mesh.axis_names)


def abstract_inputs(cfg: LlamaConfig, mesh: jax.sharding.Mesh, batch: int, chunk: int, length: int,
                    decode: bool = False) -> tuple:
    """(params, tokens, cache, num_new, seq_len) as abstract shapes with their shardings, as `generate.prefill`
    passes them to `extend` (num_new a Python int, seq_len the prompt's length as an array); for a decode step
    (`decode`), as `generate.decode`'s loop does: one token, num_new and seq_len None."""
    shapes, specs = _param_shapes_and_specs(cfg, mesh)
    params = jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, p)),
                          shapes, specs, is_leaf=lambda x: isinstance(x, P))
    where = generate.cache_sharding(mesh)
    kv = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    cache = generate.KVCache(jax.ShapeDtypeStruct(kv, dtype, sharding=where.k),
                             jax.ShapeDtypeStruct(kv, dtype, sharding=where.v),
                             jax.ShapeDtypeStruct((), jnp.int32, sharding=where.length),
                             jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=where.start))
    replicated = NamedSharding(mesh, P())
    tokens = jax.ShapeDtypeStruct((batch, 1 if decode else chunk), jnp.int32, sharding=replicated)
    if decode:
        return params, tokens, cache, None, None
    num_new = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated, weak_type=True)
    seq_len = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return params, tokens, cache, num_new, seq_len


def per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a tree of abstract arrays with shardings (the first device's shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- compiles


def compile_extend(cfg: LlamaConfig, mesh: jax.sharding.Mesh, batch: int, chunk: int, length: int, block: int,
                   decode: bool = False) -> tuple[jax.stages.Compiled, str]:
    """The real program, `generate.extend` (jitted, the cache donated), for a prefill chunk or a decode step:
    compiled, and its optimised HLO text."""
    params, tokens, cache, num_new, seq_len = abstract_inputs(cfg, mesh, batch, chunk, length, decode)
    with jax.set_mesh(mesh):
        lowered = generate.extend.trace(cfg, params, tokens, cache, num_new, seq_len, logits="last",
                                        block=block).lower()
    return tpu.compile_with_hlo(lowered, "extend")


def cache_copies(hlo: str, cache: jax.ShapeDtypeStruct) -> int:
    """How many copies of a whole per-chip cache array (k or v) a compiled program makes: the TPU compiler
    copies the cache into the layout it prefers for the attention and back (each a read and a write)."""
    dims = ",".join(map(str, cache.sharding.shard_shape(cache.shape)))
    dtype = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}[jnp.dtype(cache.dtype).name]
    return len(re.findall(rf"= {dtype}\[{dims}\]\{{[^}}]*\}} copy(?:-start)?\(", hlo))


@contextlib.contextmanager
def cost_loops(blocks: int, layers_per_iteration: int = 1) -> Iterator[None]:
    """While tracing `generate._extend`: `cached_attention`'s key-block loop as a Python loop over exactly
    `blocks` blocks (0 to `blocks`), and `layers_per_iteration` layers in each iteration of the layer scan
    (its `unroll`), so that the cost analysis, which counts a loop's body once, counts those blocks and layers
    (the module docstring). generate.py has no hook for it, so the functions it calls are replaced for the
    duration: `generate.block_range` and `generate.clean_range` (every block masked), `jax.lax.fori_loop` (a
    Python loop only where the bounds are Python ints; any other loop traced meanwhile gets jax's own) and
    `jax.lax.scan` (with `unroll`). Tracing only: the programs these traces compile to run nowhere."""
    scan, fori_loop = jax.lax.scan, jax.lax.fori_loop
    block_range, clean_range = generate.block_range, generate.clean_range

    def python_fori_loop(lower, upper, body, init, **kwargs):
        if not (isinstance(lower, int) and isinstance(upper, int)):
            return fori_loop(lower, upper, body, init, **kwargs)
        for j in range(lower, upper):
            init = body(j, init)
        return init

    jax.lax.scan = functools.partial(scan, unroll=layers_per_iteration)
    jax.lax.fori_loop = python_fori_loop
    generate.block_range = lambda cache, num_tokens, block, skip=True: (0, blocks)
    generate.clean_range = lambda cache, first, last, block: (last, last)  # all masked: whole blocks cost less
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.fori_loop, generate.block_range = scan, fori_loop, block_range
        generate.clean_range = clean_range


def _cost_of(compiled: jax.stages.Compiled) -> Cost:
    cost = compiled.cost_analysis()
    return Cost(cost.get("optimal_seconds", float("nan")), cost["flops"], cost.get("bytes accessed", float("nan")))


def cost_compile(cfg: LlamaConfig, mesh: jax.sharding.Mesh, batch: int, chunk: int, length: int, block: int,
                 blocks: int, layers_per_iteration: int = 1, decode: bool = False) -> tuple[Cost, int]:
    """Per-chip cost of `generate._extend` as `compile_extend` compiles it (same shapes, shardings and layer
    scan), with `blocks` key blocks unrolled in each layer and `layers_per_iteration` layers in each
    iteration of the scan (`cost_loops`): what the cost analysis reports is the work outside the layer loop
    plus `layers_per_iteration` x (a layer with `blocks` blocks); and the whole-cache copies it makes."""
    args = abstract_inputs(cfg, mesh, batch, chunk, length, decode)

    def extend_costed(params, tokens, cache, num_new, seq_len):
        return generate._extend(cfg, params, tokens, cache, num_new, seq_len, "last", block, True, kernel=False)

    fn = jax.jit(extend_costed, donate_argnums=2)
    with cost_loops(blocks, layers_per_iteration), jax.set_mesh(mesh):
        lowered = fn.trace(*args).lower()
    compiled, hlo = tpu.compile_with_hlo(lowered, "extend_costed", COST_COMPILE_OPTIONS)
    if len(loops := tpu.while_loops(hlo)) > 1:
        raise RuntimeError(f"the cost compile of extend ({blocks} key blocks, {layers_per_iteration} layers per "
                           f"iteration) has {len(loops)} while loops ({', '.join(sorted(set(loops)))}), not just "
                           f"the layer scan: XLA's cost analysis counts a loop's body once, so the time would be "
                           f"too low. Has generate.py changed its loops?")
    return _cost_of(compiled), cache_copies(hlo, args[2].k)


def cost_parts(cfg: LlamaConfig, mesh: jax.sharding.Mesh, batch: int, chunk: int, length: int, block: int,
               decode: bool = False) -> Parts:
    """outside, layer and block costs from three compiles (the module docstring): 1 and 2 key blocks, and u
    layers per scan iteration, u the least divisor of the layer count above 1."""
    one = functools.partial(cost_compile, cfg, mesh, batch, chunk, length, block, decode=decode)
    layers = cfg.num_hidden_layers
    u = next((d for d in range(2, layers + 1) if layers % d == 0), 1)
    (r11, copies), (r12, copies2) = one(blocks=1), one(blocks=2)
    block_cost = r12 - r11
    if u == 1:  # one layer: no loop, nothing to split from the layer
        parts = Parts(outside=Cost(0.0, 0.0, 0.0), layer=r11 - block_cost, block=block_cost, cache_copies=copies)
        copies3 = copies
    else:
        ru, copies3 = one(blocks=1, layers_per_iteration=u)
        body = (ru - r11) * (1 / (u - 1))  # a layer and one key block
        parts = Parts(outside=r11 - body, layer=body - block_cost, block=block_cost, cache_copies=copies)
    if not copies == copies2 == copies3:
        raise RuntimeError(f"the cost compiles of extend copy the whole cache {copies}, {copies2} and {copies3} "
                           f"times: they differ, so the split into outside, layer and block would be wrong")
    if not (parts.block.seconds > 0 and parts.layer.seconds > 0 and parts.outside.seconds >= 0):
        raise RuntimeError(f"the cost compiles of extend give no consistent split ({parts}): the compiler's "
                           f"estimate does not add up over layers and key blocks here")
    return parts


def visited_blocks(length: int, chunk: int, block: int) -> list[int]:
    """Key blocks per layer that each prefill chunk of a `length`-token prompt visits, from its first row's
    slot 0 (no left padding) to its last token (`generate.block_range`)."""
    block = min(block, length)
    total = -(-length // block)
    return [min(-(-((i + 1) * chunk) // block), total) for i in range(length // chunk)]


def with_copies(outside: Cost, extra: int, copy: Cost) -> Cost:
    """`outside` with `extra` more whole-cache copies (fewer where negative: those the cost compiles made and
    the real program does not). Copies removed take their share of the compiler's time by bytes, since the
    compiler's time for a copy is not the bandwidth's."""
    if extra >= 0:
        return outside + extra * copy
    kept = max(0.0, 1.0 + extra * copy.bytes / outside.bytes) if outside.bytes > 0 else 1.0
    return Cost(outside.seconds * kept, outside.flops, outside.bytes * kept)


def kernel_work(cfg: LlamaConfig, mesh: jax.sharding.Mesh, batch: int, chunk: int, length: int, block: int,
                peak: float, bandwidth: float) -> tuple[dict, dict]:
    """The attention kernel's work per chip (`cache_kernel.work`, its time modeled by `KernelWork.seconds`),
    over every layer: a whole prompt's prefill (its chunks at slots 0, C, 2C, ...) and one decode step at the
    full context. The Pallas kernel reports no cost to XLA's cost analysis, hence a model."""
    rows_local = batch // (mesh.shape["data"] * mesh.shape["fsdp"])
    heads_local = cfg.num_key_value_heads // mesh.shape["tensor"]
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    itemsize = jnp.dtype(cfg.dtype).itemsize
    layers = cfg.num_hidden_layers

    def total(calls: list) -> dict:
        out = {"steps": 0, "computed": 0, "flops": 0.0, "bytes": 0.0, "seconds": 0.0, "overhead_seconds": 0.0}
        for w in calls:
            out["steps"] += layers * w.steps
            out["computed"] += layers * w.computed
            out["flops"] += layers * w.computed * w.step_flops
            out["bytes"] += layers * (w.computed * w.step_bytes + w.io_bytes)
            out["seconds"] += layers * w.seconds(peak, bandwidth)
            out["overhead_seconds"] += layers * w.steps * cache_kernel.STEP_OVERHEAD_S
        return out

    work = functools.partial(cache_kernel.work, rows_local, heads_local, group, slots=length, block=block,
                             head_dim=cfg.head_dim, itemsize=itemsize)
    prefill = [work(tokens=chunk, length=i * chunk) for i in range(length // chunk)]
    return total(prefill), total([work(tokens=1, length=length - 1)])


# ----------------------------------------------------------------------------- memory


@dataclasses.dataclass
class Memory:
    temporaries: int
    total: int | None  # None: the compiler refused the program
    code: int | None
    refusal: str = ""
    cache_copies: int = 0  # whole-cache copies per call (`cache_copies`)


def program_memory(cfg: LlamaConfig, mesh: jax.sharding.Mesh, batch: int, chunk: int, length: int, block: int,
                   decode: bool = False) -> Memory:
    """A program's per-chip HBM from the compiler: arguments + outputs not aliased to the donated cache +
    temporaries + code; where libtpu refuses it for HBM, the temporaries it named and no total."""
    try:
        compiled, hlo = compile_extend(cfg, mesh, batch, chunk, length, block, decode)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        refusal = str(e).splitlines()[0]
        needed = re.search(r"HLO temporaries \(([\d.]+)G\)", refusal)  # XLA's G: GiB
        return Memory(int(float(needed.group(1)) * GIB) if needed else -1, None, None, refusal)
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    cache = abstract_inputs(cfg, mesh, batch, chunk, length, decode)[2]
    return Memory(m.temp_size_in_bytes, total, m.generated_code_size_in_bytes, cache_copies=cache_copies(hlo, cache.k))


def largest_batch(measure: Callable[[int], Memory], capacity: float, batch: int, step: int,
                  known: dict[int, Memory] | None = None, max_compiles: int = 8) -> tuple[int, str]:
    """The largest multiple of `step` whose program fits `capacity`; `measure(n)` compiles it at batch n.

    The total is linear in the batch (the cache is, and the temporaries nearly): the guess is extrapolated
    from the compiles at `batch` and `batch + step` and compiled; then, until n fits and n + step does not,
    the next guess comes from the line through the two compiles around capacity, or halfway between them
    where that line gives none inside. Returns (the batch, how it was found); 0 where `step` rows do not fit."""
    known = dict(known or {})
    compiled = []

    def total(n: int) -> float:  # inf where the compiler refused the program
        if n not in known:
            known[n] = measure(n)
            compiled.append(n)
        return float("inf") if known[n].total is None else known[n].total

    def line(x0: int, x1: int) -> int | None:
        """The largest multiple of `step` at or under capacity on the line through the totals at x0 < x1."""
        t0, t1 = total(x0), total(x1)
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
            return None
        return x0 + int((capacity - t0) / ((t1 - t0) / (x1 - x0)) // step) * step

    lo, hi = 0, None  # the largest batch known to fit, the smallest known not to
    for n in (batch, batch + step):
        if total(n) <= capacity:
            lo = n
        else:
            hi = n
            break
    guess, moved = (line(batch, batch + step) if hi is None else None), []
    first_guess = guess
    while hi is None or hi - lo > step:
        if len(compiled) >= max_compiles:
            at = ", ".join(map(str, sorted(known)))
            return lo, f"search stopped after {len(compiled)} compiles, at batch {at}: {lo} fits" + (
                f", {hi} does not" if hi else "")
        if hi is None and (guess is None or guess <= lo):
            guess = lo + step if guess is not None else 2 * lo  # at the line's end: is it the last that fits?
        elif hi is not None and (guess is None or not lo < guess < hi or moved[-2:] == [moved[-1]] * 2):
            guess = max(lo + step, (lo + hi) // 2 // step * step)  # no line inside, or one end stuck: halve
        fits = total(guess) <= capacity
        lo, hi = (guess, hi) if fits else (lo, guess)
        moved.append(fits)
        below = [n for n in known if n < lo and math.isfinite(total(n))]
        guess = line(lo, hi) if lo and hi else (line(max(below), lo) if lo and below else None)
    tried = sorted(set(known) | {batch})
    if lo == 0:
        return 0, f"compiled at batch {', '.join(map(str, tried))}: even {step} does not fit"
    how = f"compiled at batch {', '.join(map(str, tried))}: {lo} fits, {hi} does not"
    return lo, how + (f" (the line through {batch} and {batch + step} gave {first_guess})" if first_guess else "")


# ----------------------------------------------------------------------------- the plan


def _chip(topology: str, devices: list) -> tuple[str, flops_lib.Chip | None]:
    generation = devices[0].device_kind.split()[-1].lower().replace("lite", "e")
    family = next((k for k in flops_lib.CHIPS if topology.startswith(k)), None) or generation
    return family, flops_lib.CHIPS.get(family)


def _rope_label(cfg: LlamaConfig) -> str:
    rope = cfg.rope
    label = rope.type + (f" x{rope.factor:g}" if rope.factor else "") + f", theta {rope.theta:g}"
    return label + (f", EABF (c = {cfg.eabf.base_length})" if cfg.eabf.enabled else "")


def decode_floor_bytes(cfg: LlamaConfig, mesh: jax.sharding.Mesh, batch: int, length: int) -> int:
    """Bytes one chip reads from HBM in a decode step at a full cache, at the least: every weight of its shards
    but the embedding table (a lookup reads one row per sequence; with tied embeddings it is the vocabulary
    projection, read whole) and its shards of the whole cache."""
    params, _, cache, _, _ = abstract_inputs(cfg, mesh, batch, 1, length, decode=True)
    weights = per_chip_bytes(params)
    if not cfg.tie_word_embeddings:
        weights -= per_chip_bytes(params["model"]["embed_tokens"])
    return weights + per_chip_bytes((cache.k, cache.v))


def plan_eval(c: ml_collections.ConfigDict, topology: str, length: int | None = None, chunk: int | None = None,
              batch: int | None = None, block: int = generate.DEFAULT_BLOCK["tpu"], mesh_sizes: dict | None = None,
              search_batch: bool = True, with_cost: bool = True, progress: Any = None) -> EvalPlan:
    """The evaluation plan of recipe `c` on `topology` (the module docstring); `mesh_sizes` replaces the default
    eval mesh (`default_mesh`), `batch` defaults to one row per batch shard, `length` to the recipe's target,
    `chunk` to DEFAULT_CHUNK or the length if shorter."""
    say = progress or (lambda _: None)
    devices = tpu.topology_devices(topology)
    chips = len(devices)
    cfg = eval_model_config(c, devices[0].platform)
    length = length or c.train.target_length
    chunk = chunk or min(DEFAULT_CHUNK, length)
    sizes = dict(mesh_sizes) if mesh_sizes else default_mesh(cfg, chips)
    mesh = sharding.make_mesh(sizes, devices)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = batch or rows
    check(cfg, mesh, length, chunk, block, batch)
    notes = []
    if c.model.get("init_from"):
        notes.append(f"model.init_from={c.model.init_from!r} not read: planning uses the preset's shapes")
    family, chip = _chip(topology, devices)
    capacity = chip.hbm_gib * GIB if chip else float("nan")
    peak = chip.peak_flops if chip else float("nan")
    bandwidth = chip.hbm_bytes_per_s if chip else float("nan")
    block = min(block, length)
    kernel = generate.use_kernel(None, cfg.platform) and cache_kernel.supported(block)

    params, _, cache, _, _ = abstract_inputs(cfg, mesh, batch, chunk, length)
    weights, cache_bytes = per_chip_bytes(params), per_chip_bytes((cache.k, cache.v))
    t0 = time.perf_counter()
    say(f"compiling the prefill chunk program (batch {batch})")
    prefill_mem = program_memory(cfg, mesh, batch, chunk, length, block)
    say(f"compiling the decode step program (batch {batch})")
    decode_mem = program_memory(cfg, mesh, batch, chunk, length, block, decode=True)
    fits = all(m.total is not None and m.total <= capacity for m in (prefill_mem, decode_mem))
    for name, m in (("prefill chunk", prefill_mem), ("decode step", decode_mem)):
        if m.refusal:
            notes.append(f"the TPU compiler refused the {name} program: {m.refusal}")
        if m.cache_copies:
            notes.append(f"the {name} program copies the whole cache {m.cache_copies} times per call (k and v into "
                         f"another layout, the compiler's choice for the attention, and back out; the temporaries "
                         f"hold them), and each call reads and writes "
                         f"{m.cache_copies * cache_bytes / GIB:.3g} GiB per chip for them")

    max_batch, how = None, "not searched"
    if search_batch:
        def measure(n: int) -> Memory:
            say(f"compiling the prefill chunk program at batch {n} (largest batch)")
            return program_memory(cfg, mesh, n, chunk, length, block)

        max_batch, how = largest_batch(measure, capacity, batch, rows, known={batch: prefill_mem})
        if decode_mem.total is not None and prefill_mem.total is not None and decode_mem.total <= prefill_mem.total:
            how += "; the decode step program needs less"

    blocks = visited_blocks(length, chunk, block)
    decode_blocks = -(-length // block)
    prefill = decode = None
    prefill_cost = decode_cost = None
    prefill_kernel = decode_kernel = None
    xla_prefill_s = xla_decode_s = None
    if with_cost and fits:
        say("cost compiles of the prefill chunk: 1 and 2 key blocks, 1 and more layers per iteration")
        prefill = cost_parts(cfg, mesh, batch, chunk, length, block)
        say("cost compiles of the decode step: 1 and 2 key blocks, 1 and more layers per iteration")
        decode = cost_parts(cfg, mesh, batch, chunk, length, block, decode=True)
        n = cfg.num_hidden_layers
        copy = Cost(cache_bytes / bandwidth, 0.0, cache_bytes)  # one array (k or v), read and written
        for name, parts, m in (("prefill chunk", prefill, prefill_mem), ("decode step", decode, decode_mem)):
            # the compiler laid the cost compiles out otherwise (with the kernel: `with_copies` below)
            if not kernel and (extra := m.cache_copies - parts.cache_copies):
                parts.outside, parts.cache_copies = parts.outside + extra * copy, m.cache_copies
                notes.append(f"the {name} cost compiles copy the whole cache {m.cache_copies - extra} times, the "
                             f"program itself {m.cache_copies}: {extra:+d} copies at HBM bandwidth added")
        prefill_cost = len(blocks) * (prefill.outside + n * prefill.layer) + n * sum(blocks) * prefill.block
        decode_cost = decode.total(n, decode_blocks)
        xla_prefill_s, xla_decode_s = prefill_cost.seconds, decode_cost.seconds
        if kernel:
            prefill_kernel, decode_kernel = kernel_work(cfg, mesh, batch, chunk, length, block, peak, bandwidth)
            kernel_cost = {}
            for name, parts, m, kw, calls in (("prefill", prefill, prefill_mem, prefill_kernel, len(blocks)),
                                              ("decode", decode, decode_mem, decode_kernel, 1)):
                outside = with_copies(parts.outside, m.cache_copies - parts.cache_copies, copy)
                kw["outside"] = dataclasses.asdict(outside)
                kernel_cost[name] = calls * (outside + n * parts.layer) + Cost(kw["seconds"], kw["flops"], kw["bytes"])
            prefill_cost, decode_cost = kernel_cost["prefill"], kernel_cost["decode"]
        else:
            notes.append(f"not in the estimates: the key-block loop's own overhead per iteration ({n * sum(blocks)} "
                         f"iterations per prefill, {n * decode_blocks} per decode step)")
    compile_seconds = time.perf_counter() - t0

    model_flops = batch * flops_lib.prefill_flops(cfg, length) / chips
    floor_bytes = decode_floor_bytes(cfg, mesh, batch, length)
    prefill_floor, decode_floor = model_flops / peak, floor_bytes / bandwidth
    prefill_s = prefill_cost.seconds if prefill_cost else None
    decode_s = decode_cost.seconds if decode_cost else None
    if prefill_cost and not (prefill_s > 0 and decode_s > 0):
        notes.append(f"the compiler's optimal_seconds is not positive on {family}: times are not reported")
        prefill_s = decode_s = None
    if not fits:
        notes.append("the planned batch does not fit: no time estimated")
    return EvalPlan(
        config=str(c.get("name", "")), topology=topology, chips=chips, mesh=dict(mesh.shape),
        params_billions=cfg.num_params() / 1e9, layers=cfg.num_hidden_layers, dtype=cfg.dtype,
        rope=_rope_label(cfg), length=length, chunk=chunk, block=block, batch=batch,
        hbm_capacity_gib=capacity / GIB, weights_gib=weights / GIB, cache_gib=cache_bytes / GIB,
        prefill_temporaries_gib=prefill_mem.temporaries / GIB if prefill_mem.temporaries >= 0 else None,
        decode_temporaries_gib=decode_mem.temporaries / GIB if decode_mem.temporaries >= 0 else None,
        code_gib=None if prefill_mem.code is None else prefill_mem.code / GIB,
        prefill_total_gib=None if prefill_mem.total is None else prefill_mem.total / GIB,
        decode_total_gib=None if decode_mem.total is None else decode_mem.total / GIB,
        attention="kernel" if kernel else "xla", cache_copies_prefill=prefill_mem.cache_copies,
        cache_copies_decode=decode_mem.cache_copies,
        fits=fits, max_batch=max_batch, max_batch_method=how,
        prefill_chunks=len(blocks), prefill_blocks_visited=sum(blocks), prefill_seconds=prefill_s,
        prefill_flop_floor_seconds=prefill_floor,
        prefill_ratio=None if prefill_s is None else prefill_s / prefill_floor,
        decode_blocks_visited=decode_blocks, decode_ms=None if decode_s is None else decode_s * 1e3,
        decode_hbm_floor_ms=decode_floor * 1e3, decode_ratio=None if decode_s is None else decode_s / decode_floor,
        model_flops_prefill=model_flops, compiler_flops_prefill=prefill_cost.flops if prefill_cost else None,
        decode_bytes_floor=floor_bytes, compiler_bytes_decode=decode_cost.bytes if decode_cost else None,
        prefill_parts=dataclasses.asdict(prefill) if prefill else None,
        decode_parts=dataclasses.asdict(decode) if decode else None,
        prefill_xla_seconds=xla_prefill_s if prefill_s is not None else None,
        decode_xla_ms=xla_decode_s * 1e3 if decode_s is not None else None,
        prefill_kernel=prefill_kernel, decode_kernel=decode_kernel,
        compile_seconds=compile_seconds, notes=notes)


# ----------------------------------------------------------------------------- tables


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and abs(value) >= 1e6:
        return f"{value:.3e}{unit}"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def table(plans: list[EvalPlan]) -> str:
    """The plans side by side, one column each."""
    rows = [
        ("config", lambda p: p.config),
        ("topology (chips)", lambda p: f"{p.topology} ({p.chips})"),
        ("mesh data x fsdp x tensor", lambda p: " x ".join(str(p.mesh[a]) for a in sharding.MESH_AXES)),
        ("model", lambda p: f"{p.params_billions:.2f}B params, {p.dtype}"),
        ("RoPE", lambda p: p.rope),
        ("context (cache slots) / chunk / key block", lambda p: f"{p.length} / {p.chunk} / {p.block}"),
        ("batch (sequences)", lambda p: p.batch),
        ("HBM weights", lambda p: _fmt(p.weights_gib, " GiB")),
        ("HBM KV cache", lambda p: _fmt(p.cache_gib, " GiB")),
        ("HBM temporaries: prefill chunk", lambda p: _fmt(p.prefill_temporaries_gib, " GiB", 3)),
        ("HBM temporaries: decode step", lambda p: _fmt(p.decode_temporaries_gib, " GiB", 3)),
        ("HBM code", lambda p: _fmt(p.code_gib, " GiB", 3)),
        ("HBM total: prefill chunk", lambda p: _fmt(p.prefill_total_gib, " GiB")),
        ("HBM total: decode step", lambda p: _fmt(p.decode_total_gib, " GiB")),
        ("HBM capacity", lambda p: _fmt(p.hbm_capacity_gib, " GiB")),
        ("fits", lambda p: _fmt(p.fits)),
        ("largest batch that fits", lambda p: _fmt(p.max_batch)),
        ("prefill: est. time, whole prompt", lambda p: _fmt(p.prefill_seconds, " s")),
        ("prefill: FLOP floor (model FLOPs at peak)", lambda p: _fmt(p.prefill_flop_floor_seconds, " s")),
        ("prefill: est. / floor", lambda p: _fmt(p.prefill_ratio, "x")),
        ("decode: est. ms per token at the full context", lambda p: _fmt(p.decode_ms, " ms", 3)),
        ("decode: HBM floor (weights + cache read)", lambda p: _fmt(p.decode_hbm_floor_ms, " ms", 3)),
        ("decode: est. / floor", lambda p: _fmt(p.decode_ratio, "x")),
        ("attention", lambda p: "Pallas kernel (modeled)" if p.attention == "kernel" else "XLA key-block loop"),
        ("prefill: est. with XLA's key-block loop", lambda p: _fmt(p.prefill_xla_seconds, " s")),
        ("decode: est. with XLA's key-block loop", lambda p: _fmt(p.decode_xla_ms, " ms", 3)),
    ]
    lines = ["| " + " | ".join(["", *[p.topology for p in plans]]) + " |", "|" + "---|" * (len(plans) + 1)]
    lines += [f"| {label} | " + " | ".join(str(cell(p)) for p in plans) + " |" for label, cell in rows]
    return "\n".join(lines)


def time_table(p: EvalPlan, chip: flops_lib.Chip | None = None) -> str:
    """Where the time goes: each part's estimated time, its FLOPs at peak and bytes at HBM bandwidth, per chip.
    With the kernel, its computing steps and its grid-step overhead take the place of the key blocks."""
    if p.prefill_parts is None or p.decode_parts is None:
        return ""
    family = next((k for k in flops_lib.CHIPS if p.topology.startswith(k)), None)
    chip = chip or flops_lib.CHIPS.get(family)
    layers, kernel = p.layers, p.attention == "kernel"
    copy_s = p.cache_gib * GIB / chip.hbm_bytes_per_s  # one whole-cache array (k or v) read and written
    lines = ["| part | count | est. time | share | FLOPs at peak | bytes at HBM bandwidth |",
             "|---|---|---|---|---|---|"]
    for program, parts, kw, chunks, blocks, copies, unit, scale in (
            ("prefill", p.prefill_parts, p.prefill_kernel, p.prefill_chunks, p.prefill_blocks_visited,
             p.cache_copies_prefill, "s", 1.0),
            ("decode", p.decode_parts, p.decode_kernel, 1, p.decode_blocks_visited, p.cache_copies_decode, "ms", 1e3)):
        # (label, count, the cost of one or of all, multiplier to the total)
        outside = kw["outside"] if kernel else parts["outside"]  # kernel: its program's copies (`with_copies`)
        rows = [("outside the layers", chunks, outside, chunks),
                ("a layer without attention", chunks * layers, parts["layer"], chunks * layers)]
        if kernel:
            overhead = kw["overhead_seconds"]
            rows += [("attention kernel: steps that compute", kw["computed"],
                      {"seconds": kw["seconds"] - overhead, "flops": kw["flops"], "bytes": kw["bytes"]}, 1),
                     ("attention kernel: grid-step overhead (all steps)", kw["steps"],
                      {"seconds": overhead, "flops": 0.0, "bytes": 0.0}, 1)]
        else:
            rows.append(("a key block", blocks * layers, parts["block"], blocks * layers))
        total = sum(cost["seconds"] * mult for _, _, cost, mult in rows)
        for label, n, cost, mult in rows:
            at_peak = cost["flops"] * mult / chip.peak_flops * scale
            at_bandwidth = cost["bytes"] * mult / chip.hbm_bytes_per_s * scale
            lines.append(f"| {program}: {label} | {n} | {cost['seconds'] * mult * scale:.4g} {unit} | "
                         f"{cost['seconds'] * mult / total:.1%} | {at_peak:.4g} {unit} | {at_bandwidth:.4g} {unit} |")
            if label == "outside the layers" and copies:
                seconds = copies * chunks * copy_s
                lines.append(f"| {program}: of which whole-cache layout copies | {copies * chunks} | "
                             f"{seconds * scale:.4g} {unit} | {seconds / total:.1%} | 0 | "
                             f"{seconds * scale:.4g} {unit} |")
    return "\n".join(lines)


# The evaluations docs/plan_eval.md plans (`write_page`): (recipe, topology, context).
PAGE_PLANS = (
    ("configs/llama2_7b_cream_32k.py", "v5p-8", 32768),
    ("configs/llama2_7b_cream_256k.py", "v5p-8", 262144),
    ("configs/llama3_8b_cream_128k.py", "v5p-8", 131072),
    ("configs/tinyllama_1b_cream_32k.py", "v5e-1", 32768),
)
PREFILL_TARGET, DECODE_TARGET = 2.0, 1.5  # est. / floor that a plan should reach


def _verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "not estimated"
    return f"{ratio:.2f}x: {'within' if ratio <= target else 'misses'} {target:g}x"


def page(plans: list[EvalPlan], command: str) -> str:
    """docs/plan_eval.md: the plans side by side, each one's split of the time and notes."""
    lines = ["# Planner output: evaluation at 32K-256K on TPU", "",
             "Produced on a CPU-only machine (libtpu, ahead-of-time compiles of `generate.extend`) by:", "",
             f"    {command}", "",
             "Each column is one evaluation: the model in bfloat16, a cache of the context's length, the prompt",
             "prefilled in chunks and one decode step at the full context (cream_jax/plan_eval.py says how each",
             "figure is obtained). HBM figures are the TPU compiler's. With the Pallas kernel (`cache_kernel`, the",
             "default on TPU) the compiler costs the kernel at nothing, so its time is modeled from its grid: each",
             "step that computes a key block at the larger of its matmuls at peak and its key and value blocks at",
             f"HBM bandwidth, plus {cache_kernel.STEP_OVERHEAD_S * 1e6:.2f} us per grid step; the vector unit's "
             "softmax is not in it. The",
             "estimate with XLA's key-block loop (no kernel), from the compiler's cost analysis, is beside it. No",
             "figure here was timed on a TPU.", "",
             "## Side by side", "", table(plans), "",
             "| plan | prefill est. / FLOP floor | decode est. / HBM floor |", "|---|---|---|"]
    for p in plans:
        lines.append(f"| {p.config}, {p.length} on {p.topology} | {_verdict(p.prefill_ratio, PREFILL_TARGET)} | "
                     f"{_verdict(p.decode_ratio, DECODE_TARGET)} |")
    if any(p.cache_copies_prefill or p.cache_copies_decode for p in plans):
        lines += ["", "Whole-cache layout copies (in a plan's notes): a TPU array takes the compiler's default layout,",
                  "which for a cache with head_dim 64 puts the slots minor; the kernel reads the cache row-major,",
                  "so each call copies k and v into that layout and back. With head_dim 128 (the 7-8B models) the",
                  "cache stays in place."]
    for p in plans:
        lines += ["", f"## {p.config}: {p.length} slots on {p.topology}", ""]
        if p.max_batch is not None:
            lines += [f"Largest batch: {p.max_batch_method}.", ""]
        if where := time_table(p):
            lines += ["Where the time goes (per chip; counts are of each part's executions):", "", where, ""]
        lines += [f"- {note}" for note in p.notes]
    return "\n".join(lines).rstrip() + "\n"


def write_page(path: str | Path, root: str | Path | None = None) -> list[EvalPlan]:
    """Plan `PAGE_PLANS` (recipes under `root`, default this repository) and write the page at `path` and each
    plan's JSON beside it (plan_eval_<recipe>.json)."""
    path, root = Path(path), Path(root) if root else Path(__file__).resolve().parents[1]
    plans = []
    for recipe, topology, length in PAGE_PLANS:
        c = tc.load_config(root / recipe)
        c.name = Path(recipe).stem
        plans.append(plan_eval(c, topology, length=length, progress=lambda what, c=c: print(
            f"planning {c.name}: {what}", file=sys.stderr, flush=True)))
        (path.parent / f"plan_eval_{c.name}.json").write_text(json.dumps(dataclasses.asdict(plans[-1]), indent=2)
                                                               + "\n")
    path.write_text(page(plans, f"python -m cream_jax.plan --eval --page={path}"))
    return plans


def run(c: ml_collections.ConfigDict, topology: str, *, json_path: str | None = None, **options: Any) -> int:
    """The `--eval` CLI: plan, print the tables and notes (progress on stderr), write JSON; 2 for a mistake."""
    try:
        p = plan_eval(c, topology, progress=lambda what: print(f"planning {c.get('name', '')}: {what}",
                                                                 file=sys.stderr, flush=True), **options)
    except (CreamError, RuntimeError) as e:
        return cli.report(e)
    print(table([p]))
    if p.max_batch is not None:
        print(f"\nlargest batch: {p.max_batch_method}")
    if where := time_table(p):
        print(f"\nWhere the time goes (per chip; counts are of each part's executions, key blocks per layer):\n"
              f"{where}")
    for note in p.notes:
        print(f"note: {note}")
    if json_path:
        Path(json_path).write_text(json.dumps(dataclasses.asdict(p), indent=2) + "\n")
    return 0
