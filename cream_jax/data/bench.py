"""The data pipeline's speed alone, against what the train step consumes.

    python -m cream_jax.data.bench [--corpus austen] [--out docs] [--quick]

Measures, on this machine, in one process:
1. tokenization (the one-time cache build) in tokens/s, for the 32000-piece
   Llama-2-style tokenizer and the 1000-piece one;
2. batch assembly from the cache (what runs every step, on the prefetch
   thread) in tokens/s, for the layouts training uses: tiny_cream's packed
   rows (8 x 128), Llama-2-7B CREAM on a v5p-8 host (16 packed rows of 4096:
   4 chips x per-device batch 4), and CREAM 'offsets' rows of one document
   (16 x 32768);
3. what the step consumes: tiny_cream's jitted train step timed here on the
   CPU, and the planner's estimate for Llama-2-7B on v5p-8
   (docs/plan_v5p8.json, tokens/s/chip x 4 chips per host);
and prints the margin (pipeline tokens/s over step tokens/s). Writes
data_bench.json and data_bench.md into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cream_jax.report import markdown_table

if TYPE_CHECKING:
    from cream_jax.data.cache import TokenCache


def _time(fn, repeat: int) -> float:
    fn()  # warm: epoch permutations, page cache
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tokenization(docs: list[str], tokenizer_name: str) -> dict:
    from cream_jax.data import cache as cache_lib
    from cream_jax.data import tokenizer as tok_lib

    tok = tok_lib.resolve(tokenizer_name)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = cache_lib.build(docs, tok, tmp, source_id="bench", progress=False)
        seconds = time.perf_counter() - start
        tokens = cache.num_tokens
    chars = sum(len(d) for d in docs)
    return {"tokenizer": tokenizer_name, "vocab": tok.vocab_size, "documents": len(docs), "chars": chars,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def assembly(cache: TokenCache, label: str, row_len: int, rows: int, packing: str, offsets_window: int = 0,
             repeat: int = 5) -> dict:
    from cream_jax.data import pipeline

    layout = pipeline.Layout(row_len, packing, min_len=offsets_window or 2, offsets=bool(offsets_window))
    stream = pipeline.Rows(cache, layout, seed=0, drop_short=True)
    batches = pipeline.Batches(stream, rows, prefetch=0)
    seconds = _time(lambda: next(batches), repeat)
    return {"layout": label, "rows": rows, "row_len": row_len, "packing": packing, "seconds_per_batch": seconds,
            "tokens_per_s": rows * row_len / seconds}


def tiny_step_tokens_per_s(steps: int = 5) -> dict:
    """tiny_cream's jitted step on this CPU (synthetic tokens of the right shape)."""
    import jax
    import jax.numpy as jnp

    from cream_jax import sharding
    from cream_jax import state as state_lib
    from cream_jax import step as step_lib
    from cream_jax import train_config as tc

    c = tc.load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny_cream.py")
    c.mesh.update(data=1, fsdp=1, tensor=1)
    cfg = tc.validate(c, num_devices=1)
    mesh = sharding.make_mesh(dict(c.mesh), jax.devices()[:1])
    built = step_lib.build(c, cfg, mesh)
    step_fn = built.fn
    with jax.set_mesh(mesh):
        state, _ = state_lib.init_state(cfg, built.tx, mesh, seed=0)
        shape = (c.train.global_batch, tc.buffer_length(c))
        batch = {"tokens": jnp.ones(shape, jnp.int32), "weights": jnp.ones(shape, jnp.float32),
                 "segment_ids": jnp.ones(shape, jnp.int32)}
        holder = {"state": state, "step": 0}

        def call():
            holder["state"], m = step_fn(holder["state"], batch, jnp.asarray(holder["step"], jnp.int32))
            holder["step"] += 1
            jax.block_until_ready(m)

        seconds = _time(call, steps)
    return {"what": "tiny_cream train step, this CPU (measured)", "tokens_per_step": shape[0] * c.train.window,
            "seconds_per_step": seconds, "tokens_per_s": shape[0] * c.train.window / seconds}


def llama7b_host_tokens_per_s(plan_json: Path) -> dict | None:
    if not plan_json.exists():
        return None
    plan = json.loads(plan_json.read_text())
    rows = plan["plans"] if isinstance(plan, dict) and "plans" in plan else plan
    cream = next(r for r in rows if "cream" in r["config"])
    per_chip = cream["tokens_per_s_per_chip"]
    return {"what": "Llama-2-7B CREAM step, v5p-8 host of 4 chips (planner estimate)", "tokens_per_s": 4 * per_chip,
            "source": str(plan_json)}


def markdown(r: dict) -> str:
    tok = markdown_table(["tokenizer", "vocab", "documents", "characters", "tokens", "seconds", "tokens/s"],
                [[t["tokenizer"], t["vocab"], t["documents"], t["chars"], t["tokens"], f"{t['seconds']:.2f}",
                  f"{t['tokens_per_s']:,.0f}"] for t in r["tokenization"]])
    asm = markdown_table(["layout", "rows x row_len", "packing", "ms per batch", "tokens/s"],
                [[a["layout"], f"{a['rows']} x {a['row_len']}", a["packing"], f"{1e3 * a['seconds_per_batch']:.2f}",
                  f"{a['tokens_per_s']:,.0f}"] for a in r["assembly"]])
    margin = markdown_table(["step", "step tokens/s", "pipeline layout", "pipeline tokens/s", "margin"],
                   [[m["step"], f"{m['step_tokens_per_s']:,.0f}", m["layout"], f"{m['pipeline_tokens_per_s']:,.0f}",
                     f"{m['margin']:,.0f}x"] for m in r["margin"]])
    return "\n\n".join([
        "# Data pipeline benchmark",
        f"`python -m cream_jax.data.bench` on {r['meta']['cpus']} CPU cores; corpus {r['meta']['corpus']}; "
        f"{r['meta']['date']}. Medians of {r['meta']['repeat']} batches after one warm-up.",
        "## Tokenization (once, into the token cache)", tok,
        "## Batch assembly from the cache (every step, on the prefetch thread)", asm,
        "## Margin over the train step (per host)", margin,
        "The tokenization row is a one-time cost per corpus and host; batch assembly is what must keep up with "
        "every step, and it runs on a background thread while the device computes.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="austen")
    p.add_argument("--out", default="docs")
    p.add_argument("--quick", action="store_true", help="one tokenizer, small layouts (a smoke run)")
    a = p.parse_args(argv)

    import os

    from cream_jax.data import cache as cache_lib
    from cream_jax.data import corpora
    from cream_jax.data import tokenizer as tok_lib

    docs = [json.loads(x)["text"] for x in corpora.fetch(a.corpus).read_text().splitlines()]
    tokenizers = ["botchan-bpe-1000"] if a.quick else ["llama2-32k", "botchan-bpe-1000"]
    repeat = 3 if a.quick else 5
    result = {"meta": {"corpus": a.corpus, "cpus": os.cpu_count(), "repeat": repeat,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "tokenization": [tokenization(docs, t) for t in tokenizers]}
    for t in result["tokenization"]:
        print(f"[data bench] tokenize {t['tokenizer']}: {t['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cache = cache_lib.build(docs, tok_lib.resolve(tokenizers[0]), tmp, source_id="bench", progress=False)
        layouts = [("tiny_cream", 128, 8, "packed", 0)]
        if not a.quick:
            layouts += [("Llama-2-7B CREAM, v5p-8 host", 4096, 16, "packed", 0),
                        ("CREAM offsets, L = 32K, N = 4K", 32768, 16, "document", 4096)]
        result["assembly"] = [assembly(cache, *lay, repeat=repeat) for lay in layouts]
    steps = [tiny_step_tokens_per_s(3 if a.quick else 5)]
    big = llama7b_host_tokens_per_s(Path(a.out) / "plan_v5p8.json")
    if big and not a.quick:
        steps.append(big)
    by_layout = {x["layout"]: x for x in result["assembly"]}
    result["steps"] = steps
    result["margin"] = []
    for s, layout in zip(steps, ["tiny_cream", "Llama-2-7B CREAM, v5p-8 host"]):
        if layout in by_layout:
            pipe = by_layout[layout]["tokens_per_s"]
            result["margin"].append({"step": s["what"], "step_tokens_per_s": s["tokens_per_s"], "layout": layout,
                                     "pipeline_tokens_per_s": pipe, "margin": pipe / s["tokens_per_s"]})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "data_bench.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
