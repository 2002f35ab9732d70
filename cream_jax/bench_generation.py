"""The CPU benchmark's generation section: our prefill and decode against transformers' `generate`.

    python -m cream_jax.bench --sections generation [--out docs] [--quick]

One model for both: Llama with hidden 512, 4 layers, 8 heads (MHA, head_dim 64), intermediate 1376, vocab
32000, fp32, random init (`model.init`, seed 0), exported by `hf.save_hf`; ours loads that export with
`hf.load_hf`, transformers with `LlamaForCausalLM.from_pretrained` (sdpa attention, 2 torch threads). The
same random prompts (ids in [3, vocab), all rows of full length, no padding) for every prompt length and
batch, and exactly `new_tokens` greedy tokens (no stop token; transformers: `eos_token_id=None`,
`min_new_tokens`).

What is timed, per call, wall clock:

- prefill. Ours: `generate.init_cache` plus `generate.prefill` (chunks of `chunk` tokens) until
  `block_until_ready`: the last token's logits and the filled cache. Theirs: `generate(max_new_tokens=1)`,
  the call that gives a user the same: one forward over the prompt with `use_cache` (generate computes the
  last position's logits only, `logits_to_keep=1`) and the greedy pick of one token. A bare forward would
  leave out generate's own set-up, which a user pays on every prompt.
- decode. Ours: `generate.decode` of `new_tokens` tokens from the prefill's logits and cache (each timed
  call sets the cache's length back to the prompt's, so it rewrites the same slots). Theirs: `generate` of
  `new_tokens` tokens on the prompt with `cache=` the prompt's cache from the prefill cropped to its first
  S - 1 tokens (cropped back after each call): `new_tokens` one-token forwards (the prompt's last token,
  then each new token but the last) and their greedy picks; ours runs the same count of one-token steps
  (the first token is picked from the prefill's logits, the last step's logits are not used). The
  alternative, (generate(1 + new_tokens) - generate(1)) / new_tokens, subtracts two whole prefills whose
  noise on shared cores (tens of seconds at 16K tokens) is larger than the decode itself.
  ms/token = call / new_tokens; decode tokens/s = batch x new_tokens / call.

Each framework x size runs in its own subprocess (peak RSS is that process's VmHWM at its end; "above
baseline" subtracts its VmHWM after imports). The two processes of a size run side by side but take turns:
before each timed call a worker waits for the benchmark's go, and the benchmark alternates them (ours,
theirs, ours, ...), so that a change of load on the shared cores falls on both alike and the other process
never runs at the same time. The first call of each phase (ours: compiling) is timed apart; then the
median of up to `steps` calls, fewer (never under `min_calls`) when they would pass the phase's `budget_s`.
Greedy tokens are compared position by position between the frameworks on every row: random-init logits
have near ties, so a last-bit difference can pick another token and the continuations part there; the
fraction of equal tokens is reported, never a failure. vLLM's CPU build is not measured: its row is added
when the serving environment exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from cream_jax.bench_process import RESULT_PREFIX, log, seconds, vm_hwm_mib, worker_command

TURN = "BENCH_TURN"  # a worker's line: waiting for its turn (the benchmark answers with a line on its stdin)
FRAMEWORKS = ("ours", "transformers")


@dataclasses.dataclass(frozen=True)
class GenerationSizes:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    rows: tuple[tuple[int, int], ...]  # (prompt length, batch) of each row
    new_tokens: int = 32
    chunk: int = 512  # our prefill's chunk
    steps: int = 5  # timed calls per phase at most
    min_calls: int = 3  # timed calls per phase at least
    budget_s: float = 150.0  # per phase and framework: past it, fewer timed calls (>= min_calls)
    threads: int = 2  # torch's

    def dims(self) -> dict:
        """The model's fields (`LlamaConfig`'s names): MHA, head_dim 64."""
        return dict(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                    intermediate_size=self.intermediate, num_attention_heads=self.hidden // 64,
                    num_key_value_heads=self.hidden // 64, head_dim=64,
                    max_position_embeddings=max(S for S, _ in self.rows) + self.new_tokens)


# min_calls 2: a prefill of 16K tokens x 8 takes 2-3 minutes a call on 2 cores.
FULL = GenerationSizes(512, 4, 1376, 32000, rows=tuple((S, B) for S in (4096, 16384) for B in (1, 8)), min_calls=2,
                       budget_s=90.0)
# Two rows, not the four of lengths x batches: each row is two process starts (about 10 s on 2 cores).
QUICK = GenerationSizes(64, 1, 172, 512, rows=((256, 1), (512, 2)), chunk=128, steps=3, min_calls=2, budget_s=5.0)


# ----------------------------------------------------------------------------- workers (one per subprocess)


def turn() -> None:
    """Wait for the benchmark's go (`run_alternating`): the other framework's worker is idle meanwhile."""
    print(TURN, flush=True)
    if not sys.stdin.readline():
        raise SystemExit("the benchmark stopped")


def _phase(call: Callable[[], object], spec: dict) -> dict:
    """The first call apart, then up to `steps` timed calls (>= `min_calls`) within `budget_s`, each on its turn."""
    turn()
    first = seconds(call)
    times, cpu = [], 0.0
    while len(times) < spec["steps"]:
        if len(times) >= spec["min_calls"] and sum(times) + times[-1] > spec["budget_s"]:
            break
        turn()
        start = time.process_time()
        times.append(seconds(call))
        cpu += time.process_time() - start
    return {"first_call_s": first, "times_s": times, "median_s": statistics.median(times), "n": len(times),
            "cores_used": cpu / sum(times)}


def _prompt(spec: dict):
    import numpy as np

    return np.random.default_rng(0).integers(3, spec["vocab"], (spec["batch"], spec["S"]), dtype=np.int32)


def worker_ours(spec: dict) -> dict:
    """Our `prefill` and `decode` on the exported model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cream_jax import generate, hf

    jax.devices()
    baseline = vm_hwm_mib()
    module = hf.load_hf(spec["model_dir"], progress=False)
    cfg, params = module.config, nnx.to_pure_dict(nnx.state(module, nnx.Param))
    del module
    prompt, S, new = _prompt(spec), spec["S"], spec["new_tokens"]
    held = {}

    def prefill():
        held.clear()  # the last call's cache is freed before the next one is made
        cache = generate.init_cache(cfg, spec["batch"], S + new)
        held["logits"], held["cache"] = jax.block_until_ready(
            generate.prefill(cfg, params, prompt, cache, spec["chunk"]))

    def decode():
        cache = dataclasses.replace(held["cache"], length=jnp.int32(S))  # the prompt's cache again
        tokens, n, held["cache"] = jax.block_until_ready(generate.decode(cfg, params, held["logits"], cache, new))
        assert int(n) == new, int(n)
        held["tokens"] = tokens

    out = {"prefill": _phase(prefill, spec), "decode": _phase(decode, spec)}
    return {**out, "tokens": jax.device_get(held["tokens"]).tolist(), "baseline_mib": baseline,
            "peak_mib": vm_hwm_mib(), "jax": jax.__version__}


def worker_torch(spec: dict) -> dict:
    """transformers' `generate` on the exported model (LlamaForCausalLM, sdpa)."""
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    baseline = vm_hwm_mib()
    model = transformers.LlamaForCausalLM.from_pretrained(spec["model_dir"], attn_implementation="sdpa",
                                                          dtype=torch.float32).eval()
    prompt, S, new = torch.from_numpy(_prompt(spec)).long(), spec["S"], spec["new_tokens"]
    greedy = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompt),
                  return_dict_in_generate=True)
    held = {}

    def prefill():
        held.clear()
        out = model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **greedy)
        held["cache"] = out.cache

    def decode():
        cache = held["cache"]
        cache.crop(S - 1 - cache.get_seq_length())  # the prompt's first S - 1 tokens: its last one is fed again
        out = model.generate(prompt, cache=cache, max_new_tokens=new, min_new_tokens=new, **greedy)
        held["tokens"] = out.sequences[:, S:]
        assert held["tokens"].shape[1] == new, held["tokens"].shape

    out = {"prefill": _phase(prefill, spec), "decode": _phase(decode, spec)}
    return {**out, "tokens": held["tokens"].tolist(), "baseline_mib": baseline, "peak_mib": vm_hwm_mib(),
            "attn_implementation": model.config._attn_implementation, "torch": torch.__version__,
            "transformers": transformers.__version__}


WORKERS = {"gen_ours": worker_ours, "gen_torch": worker_torch}


# ----------------------------------------------------------------------------- the section


def export_model(sizes: GenerationSizes, path: str) -> int:
    """The random-init model (seed 0), written for transformers by `hf.save_hf`; returns its parameter count."""
    from cream_jax import hf
    from cream_jax import model as model_lib
    from cream_jax.config import LlamaConfig

    cfg = LlamaConfig(**sizes.dims())
    hf.save_hf(model_lib.init(cfg, seed=0), path, progress=False)
    return cfg.num_params()


def run_alternating(jobs: list[tuple[str, dict]]) -> list[dict]:
    """Run the workers `jobs` names side by side, one subprocess each, taking turns: each runs until it
    waits (`turn`), then the next one goes. Their set-up before the first turn overlaps. Returns their
    results in order (or {"error": ...})."""
    procs = []
    for kind, spec in jobs:
        cmd, env, cwd = worker_command(kind, spec)
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, bufsize=1))
    results: list[dict] = [{} for _ in jobs]

    def advance(i: int) -> bool:
        """Read worker i's output until it waits for a turn (True) or ends (False, its result stored)."""
        for line in procs[i].stdout:
            if line.rstrip("\n") == TURN:
                return True
            if line.startswith(RESULT_PREFIX):
                results[i] = json.loads(line[len(RESULT_PREFIX):])
        code = procs[i].wait()
        if code or not results[i]:
            log(f"  worker {jobs[i][0]} failed (exit {code})")
            results[i] = {"error": f"exit code {code}"}
        return False

    active = [i for i in range(len(jobs)) if advance(i)]
    while active:
        for i in list(active):
            procs[i].stdin.write("go\n")
            procs[i].stdin.flush()
            if not advance(i):
                active.remove(i)
    return results


def _row(size: tuple[int, int], framework: str, result: dict, new_tokens: int, context: dict) -> dict:
    S, B = size
    row = {"S": S, "batch": B, "framework": framework, **context,
           **{k: v for k, v in result.items() if k != "tokens"}}
    if "error" in result:
        return row
    prefill, decode = result["prefill"], result["decode"]
    row.update(prefill_s=prefill["median_s"], prefill_tokens_per_s=B * S / prefill["median_s"],
               decode_ms_per_token=1000 * decode["median_s"] / new_tokens,
               decode_tokens_per_s=B * new_tokens / decode["median_s"],
               above_baseline_mib=result["peak_mib"] - result["baseline_mib"])
    return row


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Greedy tokens position by position: the fraction equal, and per row the first position that differs."""
    pairs = [(a, b) for row_a, row_b in zip(ours, theirs) for a, b in zip(row_a, row_b)]
    first = [next((t for t, (a, b) in enumerate(zip(ra, rb)) if a != b), len(ra)) for ra, rb in zip(ours, theirs)]
    return {"tokens_equal": sum(a == b for a, b in pairs) / len(pairs), "tokens_compared": len(pairs),
            "rows_equal": sum(f == len(r) for f, r in zip(first, ours)), "first_difference": first}


def bench_generation(sizes: GenerationSizes) -> dict:
    """Every row (prompt length, batch): ours and transformers' prefill and decode, alternated; their ratios."""
    start = time.perf_counter()
    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="cream-bench-generation-") as tmp:
        model_dir = os.path.join(tmp, "model")
        log(f"generation: exporting the random-init model {sizes.dims()} ...")
        num_params = export_model(sizes, model_dir)
        for S, B in sizes.rows:
            log(f"generation: S={S} batch={B}, ours and transformers taking turns ...")
            spec = {**dataclasses.asdict(sizes), "S": S, "batch": B, "model_dir": model_dir}
            context = {"loadavg_1min": [os.getloadavg()[0]]}
            began = time.perf_counter()
            ours, theirs = run_alternating([("gen_ours", spec), ("gen_torch", spec)])
            context.update(process_s=time.perf_counter() - began,
                           loadavg_1min=context["loadavg_1min"] + [os.getloadavg()[0]])
            pair = {f: _row((S, B), f, r, sizes.new_tokens, context) for f, r in zip(FRAMEWORKS, (ours, theirs))}
            rows += [pair["ours"], pair["transformers"]]
            if "error" in ours or "error" in theirs:
                continue
            ours_row, theirs_row = pair["ours"], pair["transformers"]
            ratio = {"S": S, "batch": B,
                     "prefill_ratio": ours_row["prefill_tokens_per_s"] / theirs_row["prefill_tokens_per_s"],
                     "decode_ratio": ours_row["decode_tokens_per_s"] / theirs_row["decode_tokens_per_s"],
                     **_agreement(ours["tokens"], theirs["tokens"])}
            ratios.append(ratio)
            log(f"  prefill {pair['ours']['prefill_s']:.2f} s vs {pair['transformers']['prefill_s']:.2f} s "
                f"(ratio {ratio['prefill_ratio']:.2f}); decode {pair['ours']['decode_ms_per_token']:.1f} vs "
                f"{pair['transformers']['decode_ms_per_token']:.1f} ms/token (ratio {ratio['decode_ratio']:.2f}); "
                f"greedy tokens equal {ratio['tokens_equal']:.0%}")
    return {"rows": rows, "ratios": ratios, "sizes": dataclasses.asdict(sizes), "num_params": num_params,
            "total_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------- report


def markdown(section: dict, run: dict) -> str:
    """The section's tables and how they were measured; `run`: its commit and whether --quick."""
    from cream_jax.report import markdown_table

    def fmt(x, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    sizes = section["sizes"]
    rows = markdown_table(
        ["S", "batch", "framework", "prefill s (median)", "n", "prefill tokens/s", "first prefill s",
         "decode ms/token (median)", "n", "decode tokens/s", "first decode s", "peak RSS MiB",
         "above baseline MiB", "cores used (prefill/decode)", "load"],
        [[r["S"], r["batch"], r["framework"], fmt(r.get("prefill_s"), ".3f"), r.get("prefill", {}).get("n", "failed"),
          fmt(r.get("prefill_tokens_per_s"), ".0f"), fmt(r.get("prefill", {}).get("first_call_s"), ".2f"),
          fmt(r.get("decode_ms_per_token"), ".1f"), r.get("decode", {}).get("n", "failed"),
          fmt(r.get("decode_tokens_per_s"), ".1f"), fmt(r.get("decode", {}).get("first_call_s"), ".2f"),
          fmt(r.get("peak_mib"), ".0f"), fmt(r.get("above_baseline_mib"), ".0f"),
          "/".join(fmt(r.get(p, {}).get("cores_used"), ".2f") for p in ("prefill", "decode")),
          "/".join(f"{x:.1f}" for x in r["loadavg_1min"])] for r in section["rows"]])
    ratios = markdown_table(
        ["S", "batch", "prefill ours / transformers", "decode ours / transformers", "greedy tokens equal",
         "rows equal", "first differing token per row"],
        [[r["S"], r["batch"], f"{r['prefill_ratio']:.2f}", f"{r['decode_ratio']:.2f}", f"{r['tokens_equal']:.0%}",
          f"{r['rows_equal']}/{len(r['first_difference'])}",
          " ".join("-" if f == sizes["new_tokens"] else str(f) for f in r["first_difference"])]
         for r in section["ratios"]])
    versions = next((r for r in section["rows"] if "transformers" in r), {})
    return "\n\n".join([
        "## Generation: ours vs transformers' `generate`",
        f"Llama d{sizes['hidden']} L{sizes['layers']}, {sizes['hidden'] // 64} heads (MHA, head_dim 64), "
        f"intermediate {sizes['intermediate']}, vocab {sizes['vocab']}, fp32, random init, "
        f"{section.get('num_params', 0) / 1e6:.1f} M parameters, exported by `hf.save_hf`; transformers "
        f"{versions.get('transformers', '?')} `LlamaForCausalLM` (sdpa, {sizes['threads']} torch threads) and ours "
        f"(prefill in chunks of {sizes['chunk']}) on the same random prompts; {sizes['new_tokens']} greedy "
        f"tokens, no stop token. Measured with `python -m cream_jax.bench --sections generation"
        f"{' --quick' if run.get('quick') else ''}` at code {run.get('commit', '?')} in "
        f"{section.get('total_s', 0):.0f} s.",
        "Throughput, ours / transformers (> 1: ours is faster)", ratios,
        rows,
        "prefill: ours `init_cache` + `prefill` to `block_until_ready`; theirs `generate(max_new_tokens=1)` (one "
        "forward over the prompt with its cache, last-position logits only, one greedy pick). decode: ours "
        f"`decode` of {sizes['new_tokens']} tokens from the prefill's cache; theirs `generate` of "
        f"{sizes['new_tokens']} tokens from the prompt's cache less its last token: both "
        f"{sizes['new_tokens']} one-token steps; ms/token = the call / {sizes['new_tokens']}. Medians of n calls "
        "after the first (ours: compiling) call, the two frameworks' processes taking turns call by call. "
        "Peak RSS: each framework x size in its own process (VmHWM at its end; above baseline: minus VmHWM "
        "after imports). cores used: CPU time / wall time of the timed calls; load: the machine's 1-minute "
        "load average when the pair started / ended. Greedy tokens are compared position by position "
        "(random-init logits have near ties: after a first differing token the continuations part; '-': the "
        "row agrees throughout). vLLM's CPU build gets its row when the serving environment exists.",
    ])
