"""The data pipeline's speed alone, against what the train step consumes.

    python -m cream_jax.data.bench [--corpus austen] [--out docs] [--steps_from docs] [--quick]

Measures, on this machine, in one process:
1. tokenization (the one-time cache build) in tokens/s, for the 32000-piece
   Llama-2-style tokenizer and the 1000-piece one;
2. batch assembly from the cache (what runs every step, on the prefetch
   thread) in tokens/s, for the layouts training uses: tiny_cream's packed
   rows (8 x 128), each published step's (below; Llama-2-7B CREAM on a v5p-8
   host is 16 packed rows of 4096: 4 chips x per-device batch 4), and CREAM
   'offsets' rows of one document (16 x 32768);
3. the margin over what the step consumes: batch assembly at each published
   step's layout over that step's tokens/s, as the step benchmarks publish it
   in --steps_from (bench.json: `python -m cream_jax.bench`, measured on a
   CPU; plan_v5p8.json: the planner's Llama-2-7B CREAM estimate,
   tokens/s/chip x 4 chips per host). The data package runs no train step.
Writes data_bench.json and data_bench.md into --out.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cream_jax import cli
from cream_jax.report import markdown_table, write_report

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


def published_steps(folder: Path) -> list[dict]:
    """The train steps' tokens/s as the step benchmarks publish them in `folder`: each config's faster
    backend in bench.json (`python -m cream_jax.bench`, measured on a CPU, default environment) and the
    Llama-2-7B CREAM plan in plan_v5p8.json (`python -m cream_jax.plan`, 4 chips per host). Missing files
    give no rows."""
    steps = []
    bench_json = folder / "bench.json"
    if bench_json.exists():
        for r in json.loads(bench_json.read_text())["ours_vs_transformers"]:
            seq, batch = map(int, re.fullmatch(r"d\d+-L\d+-S(\d+)-B(\d+)", r["config"]).groups())
            if not r["setting"]:
                steps.append({"what": f"{r['config']} train step ({r['ours_attention']}), CPU (bench.json)",
                              "tokens_per_s": r["ours_tokens_per_s"], "layout": (r["config"], seq, batch),
                              "source": str(bench_json)})
    plan_json = folder / "plan_v5p8.json"
    if plan_json.exists():
        plan = json.loads(plan_json.read_text())
        rows = plan["plans"] if isinstance(plan, dict) and "plans" in plan else plan
        cream = next(r for r in rows if "cream" in r["config"])
        steps.append({"what": "Llama-2-7B CREAM step, v5p-8 host of 4 chips (plan_v5p8.json)",
                      "tokens_per_s": 4 * cream["tokens_per_s_per_chip"],
                      "layout": ("Llama-2-7B CREAM, v5p-8 host", 4096, 16), "source": str(plan_json)})
    return steps


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
        "## Margin over the train step (per host)",
        margin if r["margin"] else "No published step figures (bench.json, plan_v5p8.json) in --steps_from.",
        "The tokenization row is a one-time cost per corpus and host; batch assembly is what must keep up with "
        "every step, and it runs on a background thread while the device computes.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser("cream_jax.data.bench", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="austen")
    p.add_argument("--out", default="docs")
    p.add_argument("--steps_from", default="docs",
                   help="the folder holding the step benchmarks' bench.json and plan_v5p8.json (the margin's steps)")
    p.add_argument("--quick", action="store_true", help="one tokenizer, small layouts (a smoke run)")
    a = p.parse_args(argv)

    import os

    from cream_jax.data import cache as cache_lib
    from cream_jax.data import corpora
    from cream_jax.data import tokenizer as tok_lib
    from cream_jax.errors import CreamError
    from cream_jax.files import output_dir

    try:  # the inputs, before any measurement
        output_dir(a.out)
        known = [n for n, x in corpora.ASSETS.items() if x.kind == "corpus"]
        if a.corpus not in known:
            raise corpora.FetchError(f"--corpus={a.corpus} is not a corpus; use one of {', '.join(known)}")
        docs = [json.loads(x)["text"] for x in corpora.fetch(a.corpus).read_text().splitlines()]
    except CreamError as e:
        return cli.report(e)
    tokenizers = ["botchan-bpe-1000"] if a.quick else ["llama2-32k", "botchan-bpe-1000"]
    repeat = 3 if a.quick else 5
    result = {"meta": {"corpus": a.corpus, "cpus": os.cpu_count(), "repeat": repeat,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "tokenization": [tokenization(docs, t) for t in tokenizers]}
    for t in result["tokenization"]:
        print(f"[data bench] tokenize {t['tokenizer']}: {t['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    steps = published_steps(Path(a.steps_from))
    layouts = [("tiny_cream", 128, 8, "packed", 0)]
    layouts += [(label, seq, batch, "packed", 0) for label, seq, batch in (s["layout"] for s in steps)]
    if not a.quick:
        layouts += [("CREAM offsets, L = 32K, N = 4K", 32768, 16, "document", 4096)]
    with tempfile.TemporaryDirectory() as tmp:
        cache = cache_lib.build(docs, tok_lib.resolve(tokenizers[0]), tmp, source_id="bench", progress=False)
        result["assembly"] = [assembly(cache, *lay, repeat=repeat) for lay in layouts]
    by_layout = {x["layout"]: x for x in result["assembly"]}
    result["steps"] = steps
    result["margin"] = []
    for s in steps:
        pipe = by_layout[s["layout"][0]]["tokens_per_s"]
        result["margin"].append({"step": s["what"], "step_tokens_per_s": s["tokens_per_s"], "layout": s["layout"][0],
                                 "pipeline_tokens_per_s": pipe, "margin": pipe / s["tokens_per_s"]})
    md = markdown(result)
    write_report(a.out, "data_bench", result, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
