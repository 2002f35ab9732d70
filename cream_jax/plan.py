"""Plan a run before renting the TPUs: compile the real train step for a TPU topology on this machine.

    python -m cream_jax.plan --config=configs/llama2_7b_cream_32k.py --topology=v5p-8 --per_device_batch=4 \\
        [--baseline=configs/llama2_7b_pi_full_32k.py] [--search=all] [--json=plan.json] [--dump_hlo=step.hlo]

The step is `cream_jax.step_lib.jit_train_step`, the function training runs, compiled from abstract shapes
with their shardings through libtpu (no weights allocated). It reports:

- per-device HBM from the TPU compiler (arguments, temporaries, code; outputs alias the donated state),
  against the chip's capacity;
- model FLOPs per step (`flops.flops_per_token`: causal attention counted half, remat not counted) and the
  compiler's FLOPs, whose ratio shows the rematerialisation overhead;
- the compiler's step-time estimate (`optimal_seconds`), the MFU and tokens/s/chip it implies (only for a
  step that fits).

A step that does not fit gets a suggestion that keeps the global batch: a remat policy and a number of
microbatches (`train.grad_accum`). `--search` plans every remat policy at the fewest microbatches that fit
and ranks them by estimated cost per trained token, the fastest first, with the flags that select it.

Traps of the compiler's cost analysis, and what is done about them: a while loop's body is counted once, so
the scanned layers would count as one layer and `blockwise` attention's block loops as one block pair. The
cost figures therefore come from two extra compiles with 1 and 2 layers, unrolled, with the attention's block
loops unrolled too (`attention.unrolled_block_loops`): cost = cost(1) + (layers - 1) x (cost(2) - cost(1)). On
larger meshes (Llama-2-7B on v5p-32 and v6e-8, not v5p-8) XLA also runs all-gathered matmuls as loops over the
shards (collective matmuls, "windowed einsum"): the cost compiles turn them off (`COST_COMPILE_OPTIONS`), so
their time is that of plain all-gathers, and a loop left in a cost compile is an error. Gradient
accumulation's microbatch loop is scaled by its trip count (the optimizer update, which runs once per step, is
then counted once per microbatch: a small overestimate). jax's Pallas splash kernel reports no cost at all:
the kernel calls in those compiles are counted (under remat the forward kernel runs twice per layer unless a
policy saves its residuals) and what they execute is added, its time at the chip's peak. On v4 and v6e
`optimal_seconds` comes out negative (Llama-2-7B on v4-32 and v6e-8): only memory is reported there.

libtpu refuses to compile a step whose temporaries exceed HBM; such a plan does not fit, with the
temporaries the compiler named, and gets a suggestion like any other that does not fit.

`--eval` plans an evaluation instead: the prefill chunk and decode step programs of `generate.extend`
(`cream_jax.plan_eval`, whose docstring says how).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cream_jax import attention, cli, plan_eval, sharding, tpu
from cream_jax import flops as flops_lib
from cream_jax import state as state_lib
from cream_jax import step as step_lib
from cream_jax.config import REMAT_POLICIES, LlamaConfig
from cream_jax import train_config as tc
from cream_jax.splash import KERNEL_MATMULS, kernel_calls, splash_flops
from cream_jax.errors import CreamError

# Attention blocks for the unrolled cost compile: at most this many per sequence, so it stays quick.
_MAX_COST_BLOCKS = 16
# XLA options of the cost compiles. On larger meshes XLA's SPMD partitioner turns an all-gathered matmul into
# a loop over the shards ("windowed einsum", a collective matmul: 22 such loops in Llama-2-7B CREAM's step on
# v5p-32), and the cost analysis counts a loop's body once: that step, 4 sequences per chip, counted 35 % of
# its FLOPs. Without them the step runs the same FLOPs with plain all-gathers.
COST_COMPILE_OPTIONS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 1 << 30}


@dataclasses.dataclass
class Plan:
    config: str
    topology: str
    chips: int
    method: str
    window: int
    target: int
    global_batch: int
    per_device_batch: float
    grad_accum: int  # microbatches per step: each chip holds per_device_batch / grad_accum sequences at once
    remat: str
    attention: str
    attention_kernel_calls: dict | None  # splash: kernel calls per step ({fwd, dq, dkv}), from the cost compiles
    hbm_capacity_gib: float
    arguments_gib: float | None  # None (and fits False) where the compiler refused the step for HBM
    temporaries_gib: float | None
    code_gib: float | None
    total_gib: float | None
    fits: bool
    model_flops_per_step: float
    compiler_flops_per_step: float | None
    remat_overhead: float | None
    step_seconds: float | None
    mfu: float | None
    tokens_per_s_per_chip: float | None
    seconds_per_trained_token_per_chip: float | None
    compile_seconds: float
    notes: list[str]


def _abstract_inputs(c: ml_collections.ConfigDict, cfg, mesh):
    built = step_lib.build(c, cfg, mesh)
    state = built.abstract_state
    keys = tc.batch_keys(c)
    rows, buffer = c.train.global_batch, tc.buffer_length(c)
    batch = {k: jax.ShapeDtypeStruct((rows,) if k == "doc_lengths" else (rows, buffer),
                                     jnp.float32 if k == "weights" else jnp.int32, sharding=bs)
             for k, bs in state_lib.batch_shardings(mesh, keys).items()}
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    return built.fn, (state, batch, step)


def _lower_step(c: ml_collections.ConfigDict, cfg: LlamaConfig, mesh: jax.sharding.Mesh) -> jax.stages.Lowered:
    fn, args = _abstract_inputs(c, cfg.replace(platform=mesh.devices.flat[0].platform), mesh)
    with jax.set_mesh(mesh):
        return fn.trace(*args).lower()


def compile_step(c: ml_collections.ConfigDict, cfg: LlamaConfig, mesh: jax.sharding.Mesh,
                 compiler_options: dict | None = None) -> jax.stages.Compiled:
    return _lower_step(c, cfg, mesh).compile(compiler_options)


def compile_step_with_hlo(c: ml_collections.ConfigDict, cfg: LlamaConfig, mesh: jax.sharding.Mesh,
                          compiler_options: dict | None = None) -> tuple[jax.stages.Compiled, str]:
    """`compile_step` and the optimised HLO text, as the compiler itself dumps it (`tpu.compile_with_hlo`)."""
    return tpu.compile_with_hlo(_lower_step(c, cfg, mesh), "train_step", compiler_options)


while_loops = tpu.while_loops  # the while loops in optimised HLO text, by their condition computations' names


def _backend(cfg, platform: str) -> str:
    """The attention backend the step uses when compiled for `platform` (`auto` resolved)."""
    return attention.resolve_backend(cfg.attention, platform)


def _cost_block_size(cfg, backend: str, window: int) -> int:
    """The attention block of the cost compiles: blockwise's loops get unrolled, so keep them few."""
    block = attention.block_size_for(backend, cfg.attention_block_size)
    return max(block, -(-window // _MAX_COST_BLOCKS)) if backend == "blockwise" else block


def _cost(c, cfg, mesh, peak: float) -> tuple[float, float, dict | None]:
    """(FLOPs, optimal_seconds) per device of one step, loops accounted for (see the module docstring), and
    the splash kernel calls per step ({fwd, dq, dkv}: count) where attention is splash."""
    micro = c.copy_and_resolve_references()
    accum = micro.train.grad_accum
    micro.train.global_batch //= accum
    micro.train.grad_accum = 1
    backend = _backend(cfg, mesh.devices.flat[0].platform)
    block = _cost_block_size(cfg, backend, micro.train.window)
    figures = []
    for layers in (1, 2):
        small = cfg.replace(num_hidden_layers=layers, scan_layers=False, attention_block_size=block,
                            eabf=dataclasses.replace(cfg.eabf, skip_layers=()))
        with attention.unrolled_block_loops():
            compiled, hlo = compile_step_with_hlo(micro, small, mesh, COST_COMPILE_OPTIONS)
        if loops := while_loops(hlo):
            raise RuntimeError(f"the {layers}-layer cost compile of {cfg.remat!r} still has {len(loops)} while "
                               f"loop(s) ({', '.join(sorted(set(loops)))}), whose bodies XLA's cost "
                               f"analysis counts once: the FLOPs and time would be too low. Unroll them for "
                               f"the cost compiles (see `COST_COMPILE_OPTIONS`).")
        cost = compiled.cost_analysis()
        figures.append((cost["flops"], cost.get("optimal_seconds", float("nan")), kernel_calls(hlo)))
    (f1, t1, k1), (f2, t2, k2) = figures
    n = cfg.num_hidden_layers
    flops, seconds = accum * (f1 + (n - 1) * (f2 - f1)), accum * (t1 + (n - 1) * (t2 - t1))
    calls = None
    if backend == "splash":  # the Pallas kernels report no cost: add what they execute, at the chip's peak
        calls = {kind: accum * (k1[kind] + (n - 1) * (k2[kind] - k1[kind])) for kind in KERNEL_MATMULS}
        if not all(calls.values()):
            raise RuntimeError(f"found splash kernel calls {calls} in the compiled step: expected forward, dq and "
                               f"dkv kernels; has jax renamed them? (see `splash.kernel_calls`)")
        extra = splash_flops(calls, micro.train.global_batch / mesh.devices.size, micro.train.window,
                             cfg.num_attention_heads, cfg.head_dim, block)
        flops, seconds = flops + extra, seconds + extra / peak
    return flops, seconds, calls


def _with_batch(c: ml_collections.ConfigDict, chips: int, per_device_batch: float | None):
    """A copy of `c`, with `per_device_batch` sequences per chip if given (it sets train.global_batch)."""
    c = c.copy_and_resolve_references()
    if per_device_batch:
        c.train.global_batch = int(per_device_batch * chips)
    return c


def plan(c: ml_collections.ConfigDict, topology: str, per_device_batch: float | None = None,
         dump_hlo: str | None = None, with_cost: bool = True) -> Plan:
    devices = tpu.topology_devices(topology)
    chips = len(devices)
    c = _with_batch(c, chips, per_device_batch)
    notes = []
    cfg = tc.validate(c, num_devices=chips) or tc.model_config(c)
    if c.model.init_from:
        notes.append(f"model.init_from={c.model.init_from!r} not read: planning uses the preset's shapes")
    mesh = sharding.make_mesh(dict(c.mesh), devices)
    generation = devices[0].device_kind.split()[-1].lower().replace("lite", "e")
    family = next((k for k in flops_lib.CHIPS if topology.startswith(k)), None) or generation
    chip = flops_lib.CHIPS.get(family)
    hbm, peak = (chip.hbm_gib, chip.peak_flops) if chip else (float("nan"), float("nan"))

    t0 = time.perf_counter()
    try:
        compiled, hlo = compile_step_with_hlo(c, cfg, mesh)
        if dump_hlo:
            Path(dump_hlo).write_text(hlo)
    except jax.errors.JaxRuntimeError as e:  # libtpu refuses a step whose temporaries exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, oom = None, str(e).splitlines()[0]
        notes.append(f"the TPU compiler refused the step: {oom}")
    compile_seconds = time.perf_counter() - t0
    gib = 2**30
    if compiled is not None:
        mem = tpu.memory(compiled)
        arguments, temporaries, code = mem.arguments / gib, mem.temporaries / gib, mem.code / gib
        total = arguments + temporaries + code  # outputs alias the donated state
    else:
        needed = re.search(r"HLO temporaries \(([\d.]+)G\)", oom)  # XLA's G: GiB
        arguments = code = total = None
        temporaries = float(needed.group(1)) if needed else None
    fits = total is not None and total <= hbm
    model_flops = flops_lib.flops_per_token(cfg, c.train.window) * c.train.global_batch * c.train.window / chips
    flops = seconds = mfu = tps = kernel_calls_per_step = None
    if with_cost and fits:
        flops, seconds, kernel_calls_per_step = _cost(c, cfg, mesh, peak)
        if not seconds > 0:
            notes.append(f"the compiler's optimal_seconds is {seconds:.3g} on {family}: time, MFU and tokens/s "
                         f"are not reported")
            seconds = None
        else:
            mfu = model_flops / (seconds * peak)
            tps = c.train.global_batch * c.train.window / chips / seconds
    backend = _backend(cfg, devices[0].platform)
    collective_matmuls = sum("windowed" in loop for loop in while_loops(hlo)) if compiled is not None else 0
    if flops is not None and collective_matmuls:
        notes.append(f"XLA runs {collective_matmuls} matmuls of this step as collective matmuls (loops over the "
                     f"shards that overlap an all-gather or reduce-scatter with the matmul); the cost compiles "
                     f"run them as plain all-gathers and matmuls (same FLOPs), since the cost analysis counts a "
                     f"loop's body once")
    if flops is not None and backend == "splash":
        notes.append("attention is the Pallas splash kernel, which reports no cost: the kernel calls in the "
                     "compiled step are counted and what they execute is added (causal blocks, 2 matmuls per "
                     "forward call, 3 per dq, 4 per dkv), its time as those FLOPs at peak")
    elif flops is not None:
        blocks = (f" with attention blocks of {_cost_block_size(cfg, backend, c.train.window)}"
                  if backend == "blockwise" else "")
        notes.append(f"cost from 1- and 2-layer unrolled compiles{blocks}")
    return Plan(
        config=str(c.get("name", "")), topology=topology, chips=chips, method=c.positions.method,
        window=c.train.window, target=c.train.target_length, global_batch=c.train.global_batch,
        per_device_batch=c.train.global_batch / chips, grad_accum=c.train.grad_accum, remat=cfg.remat,
        attention=backend, attention_kernel_calls=kernel_calls_per_step, hbm_capacity_gib=hbm,
        arguments_gib=arguments, temporaries_gib=temporaries, code_gib=code, total_gib=total, fits=fits,
        model_flops_per_step=model_flops, compiler_flops_per_step=flops,
        remat_overhead=None if flops is None else flops / model_flops, step_seconds=seconds, mfu=mfu,
        tokens_per_s_per_chip=tps, seconds_per_trained_token_per_chip=None if tps is None else 1 / tps,
        compile_seconds=compile_seconds, notes=notes)


def _accumulations(c: ml_collections.ConfigDict) -> list[int]:
    """grad_accum values that keep the global batch (its divisors), fewest microbatches first; the config
    check rejects those whose microbatch does not split evenly over the mesh's batch shards."""
    batch = c.train.global_batch
    return [a for a in range(1, batch + 1) if batch % a == 0]


def _variant(c: ml_collections.ConfigDict, remat: str, accum: int) -> ml_collections.ConfigDict:
    trial = c.copy_and_resolve_references()
    trial.model.remat, trial.train.grad_accum = remat, accum
    return trial


def suggest(c: ml_collections.ConfigDict, topology: str, per_device_batch: float | None = None
            ) -> tuple[str, int] | None:
    """A (remat policy, grad_accum) that fits at the same global batch: fewest microbatches first, then
    the cheapest recomputation that fits (memory only: no cost compiles). None if nothing fits."""
    c = _with_batch(c, len(tpu.topology_devices(topology)), per_device_batch)
    for accum in _accumulations(c):
        for remat in ("save_proj", "save_attention", "full"):
            if (remat, accum) == (c.model.remat, c.train.grad_accum):
                continue  # the plan being fixed
            try:
                if plan(_variant(c, remat, accum), topology, with_cost=False).fits:
                    return remat, accum
            except (tc.ConfigError, sharding.MeshError):
                continue
    return None


def search(c: ml_collections.ConfigDict, topology: str, per_device_batch: float | None = None,
           policies: tuple[str, ...] = REMAT_POLICIES, progress: Callable[[str], None] | None = None,
           planned: Plan | None = None) -> list[Plan]:
    """Each remat policy at its fewest microbatches that fit (same global batch), costed, fastest per
    trained token first; a policy that fits at no grad_accum comes last, as its plan at the most
    microbatches. Compiles the step once per (policy, grad_accum) tried, plus the cost compiles.

    `planned`: the plan of `c` as given (at `per_device_batch`), already made; the search takes it for
    c's own remat and grad_accum instead of compiling them again."""
    unknown = set(policies) - set(REMAT_POLICIES)
    if unknown:
        raise tc.ConfigError(f"unknown remat policies {sorted(unknown)} to search: choose from {REMAT_POLICIES}")
    c = _with_batch(c, len(tpu.topology_devices(topology)), per_device_batch)
    found = []
    for remat in policies:
        p = None
        for accum in _accumulations(c):
            reuse = planned is not None and (remat, accum) == (c.model.remat, c.train.grad_accum)
            if progress:
                progress(f"{remat}, grad_accum={accum}" + (" (the recipe's own plan)" if reuse else ""))
            if reuse:
                p = planned
            else:
                try:
                    p = plan(_variant(c, remat, accum), topology)
                except (tc.ConfigError, sharding.MeshError):
                    continue
            if p.fits:
                break
        if p is not None:
            found.append(p)
    return sorted(found, key=lambda p: (not p.fits, p.seconds_per_trained_token_per_chip or float("inf")))


def override_flags(p: Plan) -> str:
    return f"--config.model.remat={p.remat} --config.train.grad_accum={p.grad_accum}"


def search_table(plans: list[Plan]) -> str:
    lines = ["| remat | grad_accum | sequences / chip / microbatch | HBM total | fits | est. step time | est. MFU "
             "| est. us per trained token per chip |", "|---|---|---|---|---|---|---|---|"]
    for p in plans:
        us = p.seconds_per_trained_token_per_chip
        total = _fmt(p.total_gib, " GiB") if p.total_gib is not None else f">{_fmt(p.temporaries_gib, ' GiB')}"
        lines.append(f"| {p.remat} | {p.grad_accum} | {p.per_device_batch / p.grad_accum:g} | {total} | "
                     f"{_fmt(p.fits)} | {_fmt(p.step_seconds, ' s')} | {_fmt(p.mfu, '', 3)} | "
                     f"{'n/a' if us is None else f'{us * 1e6:.1f}'} |")
    return "\n".join(lines)


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and (abs(value) >= 1e6):
        return f"{value:.3e}{unit}"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def table(plans: list[Plan]) -> str:
    rows = [
        ("config", "config", ""), ("positions", "method", ""), ("window N / target L", None, ""),
        ("per-device batch", "per_device_batch", ""), ("grad accumulation (microbatches)", "grad_accum", ""),
        ("remat / attention", None, ""),
        ("HBM arguments", "arguments_gib", " GiB"), ("HBM temporaries", "temporaries_gib", " GiB"),
        ("HBM code", "code_gib", " GiB"), ("HBM total", "total_gib", " GiB"),
        ("HBM capacity", "hbm_capacity_gib", " GiB"), ("fits", "fits", ""),
        ("model FLOPs / step / chip", "model_flops_per_step", ""),
        ("compiler FLOPs / step / chip", "compiler_flops_per_step", ""),
        ("remat overhead (compiler / model)", "remat_overhead", "x"),
        ("est. step time", "step_seconds", " s"), ("est. MFU", "mfu", ""),
        ("est. tokens/s/chip", "tokens_per_s_per_chip", ""),
        ("est. us per trained token per chip", None, ""),
    ]
    header = "| " + " | ".join(["", *[f"{p.topology}" for p in plans]]) + " |"
    lines = [header, "|" + "---|" * (len(plans) + 1)]
    for label, field, unit in rows:
        cells = []
        for p in plans:
            if label == "window N / target L":
                cells.append(f"{p.window} / {p.target}")
            elif label == "remat / attention":
                cells.append(f"{p.remat} / {p.attention}")
            elif label.startswith("est. us per"):
                s = p.seconds_per_trained_token_per_chip
                cells.append("n/a" if s is None else f"{s * 1e6:.1f}")
            else:
                cells.append(_fmt(getattr(p, field), unit, 3 if field == "mfu" else 2))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_line(cream: Plan, baseline: Plan) -> str | None:
    if not (cream.seconds_per_trained_token_per_chip and baseline.seconds_per_trained_token_per_chip):
        return None
    ratio = cream.seconds_per_trained_token_per_chip / baseline.seconds_per_trained_token_per_chip
    flops_ratio = (cream.model_flops_per_step / (cream.per_device_batch * cream.window)) / (
        baseline.model_flops_per_step / (baseline.per_device_batch * baseline.window))
    return (f"{cream.config} ({cream.remat}, grad_accum {cream.grad_accum}) costs {ratio:.2f}x of {baseline.config} "
            f"({baseline.remat}, grad_accum {baseline.grad_accum}) per trained token (model FLOPs per token "
            f"alone: {flops_ratio:.2f}x).")


def main(argv: list[str] | None = None) -> NoReturn:
    from cream_jax.platform import use_local_backends

    use_local_backends()  # before jax starts its backends
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "the recipe to plan", lock_config=True)
    flags.DEFINE_string("topology", "v5p-8", f"TPU topology: {sorted(tpu.TOPOLOGIES)} or a raw libtpu name")
    flags.DEFINE_float("per_device_batch", None, "sequences per chip (sets train.global_batch)")
    flags.DEFINE_string("baseline", None, "a second recipe (e.g. configs/llama2_7b_pi_full_32k.py) planned beside")
    flags.DEFINE_float("baseline_per_device_batch", 1.0, "sequences per chip for the baseline")
    flags.DEFINE_list("search", None, "'all' or some of the remat policies: also plan each at the fewest "
                      "microbatches (train.grad_accum) that fit at the same global batch, and rank them by "
                      "estimated cost per trained token (a few compiles per policy: minutes for a 7B model)")
    flags.DEFINE_string("json", None, "write the plans as JSON here (each with its role: plan, baseline, search, "
                        "baseline search)")
    flags.DEFINE_string("dump_hlo", None, "write the optimised HLO of the step here")
    flags.DEFINE_bool("eval", False, "plan an evaluation instead of the train step: generate.extend's prefill chunk "
                      "and decode step against a cache of --length slots (cream_jax/plan_eval.py)")
    flags.DEFINE_integer("length", None, "--eval: the context, in cache slots (default: the recipe's "
                         "train.target_length)")
    flags.DEFINE_integer("chunk", None, f"--eval: prefill tokens per chunk (evaluate's --chunk; default "
                         f"{plan_eval.DEFAULT_CHUNK}, or --length if shorter)")
    flags.DEFINE_integer("block", plan_eval.generate.DEFAULT_BLOCK["tpu"],
                         "--eval: cache slots per attention key block")
    flags.DEFINE_integer("batch", None, "--eval: sequences (default: one per batch shard, mesh.data * mesh.fsdp)")
    flags.DEFINE_bool("max_batch", True, "--eval: also find the largest batch that fits (a few more compiles)")
    flags.DEFINE_string("page", None, "--eval: plan the evaluations of docs/plan_eval.md (plan_eval.PAGE_PLANS; "
                        "no --config) and write that page here, each plan's JSON beside it (about 20 minutes)")

    def _eval(f) -> int:
        if f.page:
            if f["config"].present:
                return cli.report("--page plans the page's own recipes (plan_eval.PAGE_PLANS); drop --config")
            plan_eval.write_page(f.page)
            print(f"wrote {f.page}")
            return 0
        train_only = [n for n in ("per_device_batch", "baseline", "search", "dump_hlo") if f[n].present]
        if train_only:
            return cli.report(f"--{train_only[0]} plans the train step; it does not go with --eval")
        with f.config.unlocked():
            f.config.name = Path(f["config"].config_filename).stem
        overrides = config_flags.get_override_values(f["config"])
        mesh = dict(f.config.mesh) if any(k.startswith("mesh.") for k in overrides) else None
        return plan_eval.run(f.config, f.topology, length=f.length, chunk=f.chunk, batch=f.batch, block=f.block,
                             mesh_sizes=mesh, search_batch=f.max_batch, json_path=f.json)

    def _main(_):
        f = flags.FLAGS
        if f.eval:
            return _eval(f)
        if f.page:
            return cli.report("--page writes the evaluation planner's page; add --eval")
        eval_only = [n for n in ("length", "chunk", "block", "batch", "max_batch") if f[n].present]
        if eval_only:
            return cli.report(f"--{eval_only[0]} plans an evaluation; add --eval")
        recipes = [(f.config, Path(flags.FLAGS["config"].config_filename).stem, f.per_device_batch, "plan")]
        plans, searches = [], {}
        try:
            with f.config.unlocked():
                f.config.name = recipes[0][1]
            if f.baseline:
                b = tc.load_config(f.baseline)
                b.name = Path(f.baseline).stem
                recipes.append((b, b.name, f.baseline_per_device_batch, "baseline"))
            for c, _, batch, role in recipes:
                plans.append(plan(c, f.topology, batch, f.dump_hlo if role == "plan" else None))
            if f.search:
                policies = REMAT_POLICIES if f.search == ["all"] else tuple(f.search)
                for (c, name, batch, role), p in zip(recipes, plans):
                    searches[role] = search(c, f.topology, batch, policies, planned=p,
                                            progress=lambda what, name=name: print(
                                                f"searching {name}: {what}", file=sys.stderr, flush=True))
        except (CreamError, RuntimeError) as e:
            return cli.report(e)
        print(table(plans))
        for p in plans:
            for note in p.notes:
                print(f"note ({p.config}): {note}")
        if len(plans) == 2 and (line := _ratio_line(*plans)):
            print("\n" + line)
        for (c, _, batch, _), p in zip(recipes, plans):
            if not p.fits and not f.search:
                s = suggest(c, f.topology, batch)
                print(f"{p.config} does not fit: " + (
                    f"try --config.model.remat={s[0]} --config.train.grad_accum={s[1]} "
                    f"({p.per_device_batch / s[1]:g} sequences per chip per microbatch, global batch "
                    f"{p.global_batch} kept), or --search=all to rank every choice that fits" if s else
                    "no remat policy fits at any grad_accum; use more chips"))
        for (_, name, _, role), p in zip(recipes, plans):
            if role not in searches:
                continue
            found = searches[role]
            print(f"\nSearch for {name} on {f.topology} (global batch {p.global_batch}), fastest first:")
            if found:
                print(search_table(found))
            print(f"fastest for {name}: {override_flags(found[0])}" if found and found[0].fits else
                  f"{name}: no remat policy fits at any grad_accum; use more chips")
        if len(searches) == 2 and all(found and found[0].fits for found in searches.values()) and (
                line := _ratio_line(searches["plan"][0], searches["baseline"][0])):
            print("\nFastest against fastest: " + line)
        if f.json:
            rows = [{**dataclasses.asdict(p), "role": role} for p, (_, _, _, role) in zip(plans, recipes)]
            rows += [{**dataclasses.asdict(p), "role": "search" if role == "plan" else "baseline search"}
                     for role, found in searches.items() for p in found]
            Path(f.json).write_text(json.dumps(rows, indent=2))
        return 0

    app.run(lambda argv: sys.exit(_main(argv)), argv=argv, flags_parser=tc.parse_flags)  # exits with its status


if __name__ == "__main__":
    main()
