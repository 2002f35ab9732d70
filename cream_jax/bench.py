"""CPU benchmark: our train step vs transformers', CREAM's sampler overhead, attention backends, generation.

    python -m cream_jax.bench [--out docs] [--quick] [--sections train attention generation]

Prints markdown tables and writes `bench.json` and `bench.md` into `--out`.
`--quick` shrinks every size (a smoke run: about 2 minutes on 2 cores, most of it process start-ups).
`--sections` runs only the sections named (`SECTIONS`): the others' results already in `--out`'s
bench.json are kept and bench.md is written anew from all of them, e.g. `--sections generation --out docs`
refreshes the generation tables without the half hour of the train sections.

What is measured, and how:

1. Train step, ours vs transformers. The same Llama (fp32, MHA, head_dim 64,
   intermediate = 2.6875 x hidden rounded up to a multiple of 64, untied
   lm_head) and the same random tokens. Ours: the jitted, state-donating step
   of `cream_jax.train` (positions "plain", AdamW + clip 1.0) on a one-device
   mesh. Theirs: `LlamaForCausalLM` with its default attention (sdpa),
   forward + loss, backward, clip 1.0, `torch.optim.AdamW`, 2 torch threads.
   Ours runs with both attention backends, then the faster one again under
   each setting of `SETTINGS` (an XLA flag; glibc's heap reuse),
   and transformers again under the glibc one: the ours/transformers ratio is
   reported with both frameworks in the same environment, default or tuned.
2. The same step with CREAM positions (window = seq, target = 4 x seq) vs
   "plain": the sampler's overhead in percent of the step time. Both steps are
   compiled in one process and called alternately on one evolving state, so a
   load change on the shared cores hits both alike; the overhead is the median
   of the per-pair time ratios (separate runs differed by +-5 % from noise).
   Measured in the default environment and again in each shared setting.
3. `attend` alone, forward + backward (`jax.vjp` with a random cotangent),
   head_dim 128, 8 heads, batch 1, fp32: CPU wall time per call, and memory
   as the temporaries of the TPU compiler (v5p-8, ahead of time via libtpu;
   XLA's CPU compiler reports no temporaries for large buffers).
4. Generation: our `prefill` and `decode` against transformers' `generate` on one exported model
   (`bench_generation`, whose docstring says what is timed).

Conventions. Every measurement runs in its own subprocess (`--worker`), so
its memory is its own: peak RSS is that process's VmHWM from
/proc/self/status at the end; "above baseline" subtracts its VmHWM right after
its imports; "steady" is the peak during the timed steps alone (VmHWM reset
through /proc/self/clear_refs after warm-up, so compilation and initialisation
are excluded). Timing: the first call (compile for ours) is timed apart,
`warmup` more calls are discarded, then each timed call is wall-clock timed
up to `block_until_ready` (ours) or the optimizer step's return (torch); we
report the median. tokens/s = batch x seq / median step time; GFLOP/s uses
`flops.flops_per_token` (same model FLOPs for both frameworks). A
measurement whose steps would run past its time budget times fewer steps
(never fewer than 3); the `n` column says how many. Attention: after the
compile, one untimed call, then the median of 5 calls (3 if a call takes over
10 s; a call over 60 s is timed once, that first call itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cream_jax import bench_generation
from cream_jax.bench_process import RESULT_PREFIX, MiB, log, reset_hwm, run_worker, seconds, vm_hwm_mib

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# glibc keeps freed memory in one heap (one arena, no mmap'd chunks, no trimming) for the next step to reuse.
# By default the large buffers of a step (XLA:CPU mallocs its temporaries afresh each call) are mapped fresh
# and unmapped after, so every step page-faults them in again. Reusing the heap makes both frameworks' steps
# faster at the price of what fragmentation keeps resident; the `settings` section measures both (docs/bench.md).
HEAP_REUSE = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
# Environment settings measured against the default: name -> (variables, frameworks measured with them).
SETTINGS = {
    "XLA_FLAGS=" + SCHEDULER_FLAG: ({"XLA_FLAGS": SCHEDULER_FLAG}, ("ours",)),
    "GLIBC_TUNABLES=" + HEAP_REUSE: ({"GLIBC_TUNABLES": HEAP_REUSE}, ("ours", "transformers")),
}
SHARED_SETTINGS = [name for name, (_, frameworks) in SETTINGS.items() if set(frameworks) == {"ours", "transformers"}]


@dataclasses.dataclass(frozen=True)
class TrainSize:
    hidden: int
    layers: int
    seq: int
    batch: int
    vocab: int = 32000

    @property
    def name(self) -> str:
        return f"d{self.hidden}-L{self.layers}-S{self.seq}-B{self.batch}"

    def dims(self) -> dict:
        """Llama's shape: head_dim 64, MHA, intermediate 2.6875 x hidden rounded up to a multiple of 64."""
        return dict(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                    intermediate_size=64 * math.ceil(2.6875 * self.hidden / 64),
                    num_attention_heads=self.hidden // 64, num_key_value_heads=self.hidden // 64)


@dataclasses.dataclass(frozen=True)
class Sizes:
    train: tuple[TrainSize, ...]
    steps: int  # timed steps per train measurement
    pairs: int  # alternated (plain, CREAM) step pairs for the sampler's overhead
    warmup: int  # discarded calls after the first (compiling) one
    budget_s: float  # per train measurement; past it, fewer timed steps (>= 3)
    attn_lengths: tuple[int, ...]  # compiled (TPU) memory for both backends
    attn_time_max: dict  # backend -> longest S timed on CPU
    attn_block: int  # 0: blockwise's default (attention.DEFAULT_BLOCK_SIZE)
    attn_heads: int = 8
    attn_head_dim: int = 128


FULL = Sizes(train=(TrainSize(512, 4, 1024, 2), TrainSize(1024, 8, 2048, 1)), steps=7, pairs=7, warmup=2, budget_s=600,
             attn_lengths=(1024, 2048, 4096, 8192, 16384, 32768),
             attn_time_max={"dot_product": 8192, "blockwise": 32768}, attn_block=0)
QUICK = Sizes(train=(TrainSize(64, 1, 128, 2, vocab=512),), steps=3, pairs=3, warmup=1, budget_s=60,
              attn_lengths=(512, 1024, 2048), attn_time_max={"dot_product": 512, "blockwise": 512}, attn_block=128)
BACKENDS = ("dot_product", "blockwise")
# The benchmark's sections -> the keys of bench.json that each one writes.
SECTIONS = {"train": ("train", "ours_vs_transformers", "cream_overhead", "settings"), "attention": ("attention",),
            "generation": ("generation",)}


# ----------------------------------------------------------------------------- timing


def timed_calls(call: Callable[[], object], steps: int, warmup: int, budget_s: float) -> dict:
    """Time `call()` (which blocks until done): the first call apart, `warmup` discarded, then up to `steps`
    timed ones (fewer, never under 3, if they would run past `budget_s`); peak RSS over the timed ones."""
    start = time.perf_counter()
    first = per_call = seconds(call)
    for _ in range(warmup):
        per_call = seconds(call)
    left = budget_s - (time.perf_counter() - start)
    n = max(min(steps, int(left / per_call)), min(steps, 3))
    reset_hwm()
    cpu = time.process_time()
    times = [seconds(call) for _ in range(n)]
    return {"first_call_s": first, "times_s": times, "median_s": statistics.median(times), "n": n,
            "steady_peak_mib": vm_hwm_mib(), "cores_used": (time.process_time() - cpu) / sum(times)}


# ----------------------------------------------------------------------------- workers (one per subprocess)


def _tokens(size: TrainSize):
    import numpy as np

    return np.random.default_rng(0).integers(0, size.vocab, (size.batch, size.seq), dtype=np.int32)


def _our_steps(spec: dict, methods: tuple[str, ...]):
    """Our jitted train step on a one-device mesh for each positions method, sharing one state; and the batch."""
    import jax
    import numpy as np

    from cream_jax import sharding
    from cream_jax import state as state_lib
    from cream_jax import step as step_lib
    from cream_jax import train_config as tc

    size = TrainSize(**spec["size"])
    factor = 4 if "cream" in methods else 1
    steps, state = {}, None
    for method in methods:
        c = tc.base()
        c.model.update(size.dims(), attention=spec["attention"], max_position_embeddings=factor * size.seq,
                       **spec.get("model", {}))
        c.positions.method = method
        c.train.update(window=size.seq, target_length=(factor if method == "cream" else 1) * size.seq,
                       global_batch=size.batch, warmup_steps=1)
        c.mesh.update(data=1, fsdp=1, tensor=1)
        cfg = tc.validate(c, num_devices=1)
        mesh = sharding.make_mesh(dict(c.mesh), jax.devices()[:1])
        built = step_lib.build(c, cfg, mesh, ("tokens", "weights"))
        steps[method] = built.fn
        if state is None:
            with jax.set_mesh(mesh):
                state, _ = state_lib.init_state(cfg, built.tx, mesh, seed=0)
                bs = state_lib.batch_sharding(mesh)
                tokens = _tokens(size)
                batch = {"tokens": jax.device_put(tokens, bs), "weights": jax.device_put(np.ones_like(tokens), bs)}
    return steps, state, batch, mesh


def _stepper(step_fn, holder: dict, batch: dict):
    import jax
    import jax.numpy as jnp

    def call():
        holder["state"], metrics = step_fn(holder["state"], batch, jnp.asarray(holder["step"], jnp.int32))
        holder["step"] += 1
        jax.block_until_ready((holder["state"], metrics))
        holder["loss"] = float(metrics["loss"])

    return call


def worker_ours(spec: dict) -> dict:
    """Our jitted train step on a one-device mesh."""
    import jax

    jax.devices()
    baseline = vm_hwm_mib()
    steps, state, batch, mesh = _our_steps(spec, (spec["method"],))
    holder = {"state": state, "step": 0}
    with jax.set_mesh(mesh):
        out = timed_calls(_stepper(steps[spec["method"]], holder, batch), spec["steps"], spec["warmup"],
                          spec["budget_s"])
    assert math.isfinite(holder["loss"]), holder["loss"]
    return {**out, "baseline_mib": baseline, "peak_mib": vm_hwm_mib(), "loss": holder["loss"]}


def worker_cream_ab(spec: dict) -> dict:
    """The plain and the CREAM step in one process on one evolving state, called alternately (plain, CREAM,
    plain, ...): both see the same machine load, so their per-pair ratio measures the sampler's cost."""
    import jax

    steps, state, batch, mesh = _our_steps(spec, ("plain", "cream"))
    holder = {"state": state, "step": 0}
    calls = {m: _stepper(steps[m], holder, batch) for m in steps}
    with jax.set_mesh(mesh):
        for _ in range(1 + spec["warmup"]):
            for m in calls:
                calls[m]()
        pairs = [(seconds(calls["plain"]), seconds(calls["cream"])) for _ in range(spec["pairs"])]
    assert math.isfinite(holder["loss"]), holder["loss"]
    ratios = sorted(c / p for p, c in pairs)
    return {"plain_s": [p for p, _ in pairs], "cream_s": [c for _, c in pairs],
            "plain_median_s": statistics.median(p for p, _ in pairs),
            "cream_median_s": statistics.median(c for _, c in pairs),
            "overhead_pct": 100 * (statistics.median(ratios) - 1),
            "overhead_pct_range": [100 * (ratios[0] - 1), 100 * (ratios[-1] - 1)], "pairs": len(pairs)}


def worker_torch(spec: dict) -> dict:
    """transformers' LlamaForCausalLM: forward + loss, backward, clip, AdamW."""
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    baseline = vm_hwm_mib()
    size = TrainSize(**spec["size"])
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**size.dims(), max_position_embeddings=size.seq, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    tokens = torch.from_numpy(_tokens(size)).long()
    holder = {}

    def call():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = loss.detach().item()

    out = timed_calls(call, spec["steps"], spec["warmup"], spec["budget_s"])
    assert math.isfinite(holder["loss"]), holder["loss"]
    return {**out, "baseline_mib": baseline, "peak_mib": vm_hwm_mib(), "loss": holder["loss"],
            "attn_implementation": model.config._attn_implementation, "torch": torch.__version__,
            "transformers": transformers.__version__}


def _attention_vjp(backend: str, block: int):
    """(q, k, v, d_out) -> (dq, dk, dv): `attend`'s forward and backward."""
    import jax

    from cream_jax.attention import attend

    def fwd_bwd(q, k, v, d_out):
        _, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, backend=backend, block_size=block), q, k, v)
        return vjp(d_out)

    return fwd_bwd


def worker_attention(spec: dict) -> dict:
    """CPU wall time of one `attend` forward + backward; the run that follows the compile counts as warm-up,
    unless it took over `long_s` (then it is the only timing, n = 1)."""
    import jax
    import jax.numpy as jnp

    jax.devices()
    baseline = vm_hwm_mib()
    shape = (1, spec["S"], spec["heads"], spec["head_dim"])
    q, k, v, d_out = (jax.random.normal(key, shape, jnp.float32) for key in jax.random.split(jax.random.key(0), 4))
    fn = jax.jit(_attention_vjp(spec["backend"], spec["block"])).lower(q, k, v, d_out).compile()
    call = lambda: jax.block_until_ready(fn(q, k, v, d_out))  # noqa: E731
    cpu = time.process_time()
    first = seconds(call)
    times = [first]  # too slow to repeat: the single run after compiling is the timing
    if first <= spec["long_s"]:
        cpu = time.process_time()
        times = [seconds(call) for _ in range(5 if first < 10 else 3)]
    return {"times_s": times, "median_s": statistics.median(times), "n": len(times), "baseline_mib": baseline,
            "peak_mib": vm_hwm_mib(), "cores_used": (time.process_time() - cpu) / sum(times)}


def worker_compiled(spec: dict) -> dict:
    """TPU compiler temporaries of `attend` forward + backward for every backend and length."""
    import jax
    import jax.numpy as jnp

    from cream_jax import tpu

    rows = []
    for backend in BACKENDS:
        for S in spec["lengths"]:
            shape = jax.ShapeDtypeStruct((1, S, spec["heads"], spec["head_dim"]), jnp.float32)
            compiled = tpu.compile_for_tpu(_attention_vjp(backend, spec["block"]), shape, shape, shape, shape,
                                           topology=spec["topology"])
            mem = tpu.memory(compiled)
            rows.append({"backend": backend, "S": S, "temporaries_mib": mem.temporaries / MiB,
                         "arguments_mib": mem.arguments / MiB, "outputs_mib": mem.outputs / MiB})
            log(f"  compiled {backend} S={S}: temporaries {mem.temporaries / MiB:.1f} MiB")
    return {"rows": rows}


WORKERS = {"ours": worker_ours, "cream_ab": worker_cream_ab, "torch": worker_torch, "attention": worker_attention,
           "compiled": worker_compiled, **bench_generation.WORKERS}


# ----------------------------------------------------------------------------- the benchmark


def _variables(setting: str) -> dict:
    """The environment variables of a `SETTINGS` entry ("" = the default environment: none)."""
    return SETTINGS[setting][0] if setting else {}


def _train_row(size: TrainSize, sizes: Sizes, framework: str, attention: str, method: str = "plain",
               setting: str = "") -> dict:
    """One train-step measurement; `setting` names an entry of SETTINGS ("" = the default environment)."""
    label = f"{size.name} {framework} {attention} positions={method}" + (f" {setting}" if setting else "")
    log(f"train step: {label} ...")
    spec = {"size": dataclasses.asdict(size), "steps": sizes.steps, "warmup": sizes.warmup,
            "budget_s": sizes.budget_s, "method": method, "attention": attention, "threads": 2}
    result = run_worker("ours" if framework == "ours" else "torch", spec, _variables(setting))
    row = {"config": size.name, "framework": framework, "attention": attention, "positions": method,
           "setting": setting, **result}
    if "median_s" in result:
        row["tokens_per_s"] = size.batch * size.seq / result["median_s"]
        row["gflops_per_s"] = _flops_per_step(size) / result["median_s"] / 1e9
        row["above_baseline_mib"] = result["peak_mib"] - result["baseline_mib"]
        log(f"  {row['tokens_per_s']:.0f} tokens/s (median {result['median_s']:.3f} s of {result['n']}), "
            f"peak RSS {result['peak_mib']:.0f} MiB")
    return row


def _flops_per_step(size: TrainSize) -> float:
    from cream_jax.config import LlamaConfig
    from cream_jax.flops import flops_per_token

    return flops_per_token(LlamaConfig(**size.dims()), size.seq) * size.batch * size.seq


def _tps(row: dict) -> float:
    return row.get("tokens_per_s", 0.0)


def bench_train(sizes: Sizes) -> dict:
    rows, ratio, cream, settings = [], [], [], []
    for size in sizes.train:
        ours = {b: _train_row(size, sizes, "ours", b) for b in BACKENDS}
        best = max(BACKENDS, key=lambda b: _tps(ours[b]))
        default = {"ours": ours[best], "transformers": _train_row(size, sizes, "transformers", "sdpa (default)")}
        default["transformers"]["attention"] = default["transformers"].get("attn_implementation", "default")
        rows += [ours["dot_product"], ours["blockwise"], default["transformers"]]
        tuned = {}
        for setting, (_, frameworks) in SETTINGS.items():
            for framework in frameworks:
                attention = best if framework == "ours" else default["transformers"]["attention"]
                row = tuned[setting, framework] = _train_row(size, sizes, framework, attention, setting=setting)
                rows.append(row)
                base = default[framework]
                settings.append({"config": size.name, "framework": framework, "attention": attention,
                                 "setting": setting, "default_tokens_per_s": _tps(base),
                                 "setting_tokens_per_s": _tps(row),
                                 "tokens_per_s_change_pct": 100 * (_tps(row) / max(_tps(base), 1e-9) - 1),
                                 "default_steady_peak_mib": base.get("steady_peak_mib"),
                                 "setting_steady_peak_mib": row.get("steady_peak_mib")})
        for setting in ["", *SHARED_SETTINGS]:  # the same environment for both frameworks
            pair = default if not setting else {f: tuned[setting, f] for f in ("ours", "transformers")}
            ours_tps, theirs_tps = _tps(pair["ours"]), _tps(pair["transformers"])
            ratio.append({"config": size.name, "ours_attention": best, "setting": setting,
                          "ours_tokens_per_s": ours_tps, "transformers_tokens_per_s": theirs_tps,
                          "ratio": ours_tps / max(theirs_tps, 1e-9)})
            log(f"CREAM sampler overhead: {size.name} {best} {setting or 'default'}, plain and CREAM steps "
                "alternated ...")
            ab = run_worker("cream_ab", {"size": dataclasses.asdict(size), "warmup": sizes.warmup,
                                         "pairs": sizes.pairs, "attention": best}, _variables(setting))
            cream.append({"config": size.name, "attention": best, "setting": setting, **ab})
    return {"train": rows, "ours_vs_transformers": ratio, "cream_overhead": cream, "settings": settings}


def bench_attention(sizes: Sizes, topology: str = "v5p-8") -> list[dict]:
    common = {"heads": sizes.attn_heads, "head_dim": sizes.attn_head_dim, "block": sizes.attn_block}
    log(f"attention: TPU ({topology}) compiled memory for S={list(sizes.attn_lengths)} ...")
    compiled = run_worker("compiled", {**common, "lengths": list(sizes.attn_lengths), "topology": topology})
    rows = []
    for row in compiled.get("rows", []):
        S, backend = row["S"], row["backend"]
        if S <= sizes.attn_time_max[backend]:
            log(f"attention: CPU fwd+bwd {backend} S={S} ...")
            cpu = run_worker("attention", {**common, "backend": backend, "S": S, "long_s": 60.0})
            if "median_s" in cpu:
                log(f"  {cpu['median_s']:.3f} s (n={cpu['n']}), peak RSS {cpu['peak_mib']:.0f} MiB")
            row.update({f"cpu_{k}": v for k, v in cpu.items()})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report


def _fmt(x, spec: str = ".0f") -> str:
    return "n/a" if x is None else format(x, spec)


def _train_markdown(results: dict) -> list[str]:
    from cream_jax.report import markdown_table as _table  # here, not at the top: workers run without jax

    train = _table(
        ["config", "framework", "attention", "positions", "environment", "tokens/s", "step s (median)", "n",
         "first call s", "GFLOP/s", "peak RSS MiB", "above baseline MiB", "steady peak MiB", "cores used", "load"],
        [[r["config"], r["framework"], r["attention"], r["positions"], r["setting"] or "default",
          _fmt(r.get("tokens_per_s")), _fmt(r.get("median_s"), ".3f"), r.get("n", "failed"),
          _fmt(r.get("first_call_s"), ".1f"), _fmt(r.get("gflops_per_s"), ".1f"), _fmt(r.get("peak_mib")),
          _fmt(r.get("above_baseline_mib")), _fmt(r.get("steady_peak_mib")), _fmt(r.get("cores_used"), ".2f"),
          "/".join(f"{x:.1f}" for x in r["loadavg_1min"])] for r in results["train"]])
    ratio = _table(["config", "environment (both)", "ours (attention)", "ours tokens/s", "transformers tokens/s",
                    "ours / transformers"],
                   [[r["config"], r["setting"] or "default", r["ours_attention"], _fmt(r["ours_tokens_per_s"]),
                     _fmt(r["transformers_tokens_per_s"]), _fmt(r["ratio"], ".2f")]
                    for r in results["ours_vs_transformers"]])
    cream = _table(["config", "attention", "environment", "pairs", "plain step s (median)", "CREAM step s (median)",
                    "CREAM overhead % (median of pair ratios)", "range of pair ratios %"],
                   [[r["config"], r["attention"], r["setting"] or "default", r.get("pairs", "-"),
                     _fmt(r.get("plain_median_s"), ".3f"),
                     _fmt(r.get("cream_median_s"), ".3f"), _fmt(r.get("overhead_pct"), "+.1f"),
                     " to ".join(_fmt(x, "+.1f") for x in r.get("overhead_pct_range", []))]
                    for r in results["cream_overhead"]])

    settings = _table(["config", "framework", "attention", "setting", "tokens/s default", "tokens/s with it",
                       "change %", "steady peak MiB default", "steady peak MiB with it"],
                      [[r["config"], r["framework"], r["attention"], f"`{r['setting']}`",
                        _fmt(r["default_tokens_per_s"]), _fmt(r["setting_tokens_per_s"]),
                        _fmt(r["tokens_per_s_change_pct"], "+.1f"), _fmt(r["default_steady_peak_mib"]),
                        _fmt(r["setting_steady_peak_mib"])] for r in results["settings"]])
    return ["## Train step: ours vs transformers", train,
            "Peak RSS: the measuring process's VmHWM at its end (compilation/initialisation included); above "
            "baseline: minus its VmHWM after imports; steady peak: VmHWM over the timed steps alone. load: the "
            "machine's 1-minute load average when the measurement started / ended; cores used: the process's CPU "
            "time over the timed steps / their wall time (2.00 = both cores; less = waiting, or other work on the "
            "cores).",
            "## Ours / transformers (tokens/s, ours with the faster backend, both in the same environment)", ratio,
            "## CREAM sampler overhead (window = seq, target = 4 x seq)", cream,
            "## Environment settings against the default environment", settings]


def _attention_markdown(results: dict) -> list[str]:
    from cream_jax.report import markdown_table as _table

    attn = _table(["backend", "S", "CPU s per fwd+bwd", "n", "cores used", "CPU peak RSS MiB",
                   "CPU above baseline MiB", "TPU temporaries MiB"],
                  [[r["backend"], r["S"], _fmt(r.get("cpu_median_s"), ".3f") if "cpu_median_s" in r else "not timed",
                    r.get("cpu_n", "-"), _fmt(r.get("cpu_cores_used"), ".2f"), _fmt(r.get("cpu_peak_mib")),
                    _fmt(r["cpu_peak_mib"] - r["cpu_baseline_mib"] if "cpu_peak_mib" in r else None),
                    _fmt(r["temporaries_mib"], ".1f")] for r in results["attention"]])
    m = results["meta"]
    return [f"## Attention alone: forward + backward, batch 1, {m['attn_heads']} heads, head_dim "
            f"{m['attn_head_dim']}, block {m['attn_block']}", attn,
            "TPU temporaries: `tpu.compile_for_tpu(..., topology='v5p-8')` + `tpu.memory(...).temporaries` "
            "(compiled, not run). CPU: median wall time (n = 1: the single run after compiling, too slow to repeat)."]


def _section_runs(results: dict) -> dict:
    """Each present section's run (commit, quick, notes): `meta["sections"]`, else the page's own meta."""
    m = results["meta"]
    runs = m.get("sections", {})
    return {name: runs.get(name, {"commit": m["commit"], "quick": m["quick"]}) for name in SECTIONS
            if all(key in results for key in SECTIONS[name])}


def markdown(results: dict) -> str:
    """bench.md: the sections `results` holds, each with how it was measured."""
    m, runs = results["meta"], _section_runs(results)
    commits = ", ".join(f"{name} at {run['commit']}" for name, run in runs.items())
    parts = [f"# CPU benchmark{' (--quick)' if m['quick'] else ''}",
             f"`python -m cream_jax.bench{' --quick' if m['quick'] else ''}` on {m['cpus']} CPU cores "
             f"({m['cpu_model']}); jax {m['jax']}, torch {m['torch']}, transformers {m['transformers']}; "
             f"code: {commits}. fp32 throughout." + (
                 f" Medians of {m['steps']} timed train steps after 1 compiling/first call and {m['warmup']} "
                 "warm-up call(s) unless the n column says otherwise." if "train" in runs else "")]
    for name, run in runs.items():
        if name == "train":
            parts += _train_markdown(results)
        elif name == "attention":
            parts += _attention_markdown(results)
        else:
            parts.append(bench_generation.markdown(results["generation"], run))
        if run.get("notes"):
            parts.append(f"Notes ({name}): {run['notes']}")
    if m.get("notes"):  # the notes of the run of every section
        parts.append(f"Notes (the run of every section at {m['commit']}): {m['notes']}")
    return "\n\n".join(parts) + "\n"


def _meta(sizes: Sizes, quick: bool) -> dict:
    import platform

    import jax

    from cream_jax.attention import block_size_for

    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor())
    try:
        import importlib.metadata as md

        torch_v, tf_v = md.version("torch"), md.version("transformers")
    except Exception:  # pragma: no cover
        torch_v = tf_v = "?"
    return {"quick": quick, "commit": commit.stdout.strip() or "unknown", "cpus": os.cpu_count(),
            "cpu_model": cpu_model, "jax": jax.__version__, "torch": torch_v, "transformers": tf_v,
            "steps": sizes.steps, "warmup": sizes.warmup, "attn_heads": sizes.attn_heads,
            "attn_head_dim": sizes.attn_head_dim, "attn_block": block_size_for("blockwise", sizes.attn_block),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # run_worker's own call (plain argparse; the package is bare: bench_process)
        w = argparse.ArgumentParser()
        w.add_argument("--worker", choices=sorted(WORKERS))
        w.add_argument("--spec")
        a = w.parse_args(argv)
        print(RESULT_PREFIX + json.dumps(WORKERS[a.worker](json.loads(a.spec))), flush=True)
        return 0
    from cream_jax import cli
    from cream_jax.platform import use_local_backends

    use_local_backends()  # before jax starts its backends
    p = cli.ArgumentParser("cream_jax.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs")
    p.add_argument("--quick", action="store_true", help="shrink every size (a smoke run)")
    p.add_argument("--notes", default="", help="a line added to bench.md")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                   help="run these sections only: the other sections' results in --out's bench.json are kept, and "
                        "bench.md is written anew from all of them")
    a = p.parse_args(argv)
    from cream_jax.errors import CreamError
    from cream_jax.files import output_dir

    try:
        output_dir(a.out)  # before the measurements, not after them
        results = _earlier_results(Path(a.out), a.sections, a.quick)
    except CreamError as e:
        return cli.report(e)
    sizes = QUICK if a.quick else FULL
    meta = _meta(sizes, a.quick)
    whole = set(a.sections) == set(SECTIONS)
    if whole or "meta" not in results:
        results["meta"] = {**meta, "notes": a.notes if whole else ""}
    start = time.perf_counter()
    for name in [s for s in SECTIONS if s in a.sections]:
        began = time.perf_counter()
        if name == "train":
            results.update(bench_train(sizes))
        elif name == "attention":
            results["attention"] = bench_attention(sizes)
        else:
            results["generation"] = bench_generation.bench_generation(
                bench_generation.QUICK if a.quick else bench_generation.FULL)
        results["meta"].setdefault("sections", {})[name] = {
            "commit": meta["commit"], "date": meta["date"], "quick": a.quick, "notes": "" if whole else a.notes,
            "total_s": time.perf_counter() - began}
    if whole:
        results["meta"]["total_s"] = time.perf_counter() - start
    from cream_jax.report import write_report

    md = markdown(results)
    json_path, md_path = write_report(a.out, "bench", results, md)
    print(md)
    log(f"done in {time.perf_counter() - start:.0f} s; wrote {json_path} and {md_path}")
    return 0


def _earlier_results(out: Path, sections: list[str], quick: bool) -> dict:
    """What --out's bench.json holds of the sections not run now (nothing when every section runs)."""
    from cream_jax.errors import CreamError

    path = out / "bench.json"
    if set(sections) == set(SECTIONS) or not path.exists():
        return {}
    try:
        results = json.loads(path.read_text())
    except ValueError as e:
        raise CreamError(f"{path} is not JSON ({e}); run every section to write it anew") from None
    if results.get("meta", {}).get("quick", quick) != quick:
        raise CreamError(f"{path} holds {'full' if quick else '--quick'} results: run --sections "
                         f"{' '.join(sections)} {'without' if quick else 'with'} --quick, or into another --out")
    for name in sections:
        for key in SECTIONS[name]:
            results.pop(key, None)
    return results


if __name__ == "__main__":
    sys.exit(main())
