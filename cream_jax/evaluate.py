"""Long-context evaluation: passkey, LongChat-Lines, key-value retrieval, sliding-window perplexity.

    python -m cream_jax.evaluate --ckpt RUN_DIR [--step N] --task passkey --lengths 512,1024,2048 \\
        --depths 0,0.25,0.5,0.75,1 --samples 5 --out results/eval
    python -m cream_jax.evaluate --hf DIR --task kv --lengths 2048 --positions 0,0.25,0.5,0.75,1
    python -m cream_jax.evaluate --ckpt RUN_DIR --task lines --lengths 1024,2048
    python -m cream_jax.evaluate --ckpt RUN_DIR --task ppl --lengths 256,512,1024 --corpus austen

Generation tasks decode greedily with the KV cache (`cream_jax.generate`), many prompts per batch: prompts
of one length share a batch (left-padded where their token counts differ), so there is one prefill shape
per length. Writes TASK.json (every example and the summary), TASK.md (the table) and TASK.png (passkey:
accuracy heatmap length x depth; kv: accuracy by key position; lines: accuracy by length; ppl: perplexity
by length and by position bucket) into --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax import generate, tasks

GRID = {"passkey": "depth", "kv": "position", "lines": None, "ppl": None}


def load(args) -> tuple:
    """(config, params, tokenizer, label) from --ckpt (a train run) or --hf (a Hugging Face directory)."""
    from flax import nnx

    from cream_jax import checkpoint, hf
    from cream_jax.data import tokenizer as tok_lib

    if args.ckpt:
        module, step = checkpoint.load_train_params(args.ckpt, args.step)
        label = f"{args.ckpt} step {step}"
        spec = args.tokenizer
        if not spec:
            run_config = json.loads((Path(args.ckpt) / "config.json").read_text())
            spec = run_config["data"]["tokenizer"] or run_config["model"]["init_from"]
    else:
        module = hf.load_hf(args.hf, progress=False)
        label = str(args.hf)
        spec = args.tokenizer or args.hf
    tok = tok_lib.resolve(spec)
    tok_lib.check_vocab(tok, module.config.vocab_size)
    return module.config, nnx.to_pure_dict(nnx.state(module, nnx.Param)), tok, label


def make_examples(task: str, tok, lengths, grid, samples: int, seed: int) -> list[tasks.Example]:
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        for g in grid:
            for _ in range(samples):
                if task == "passkey":
                    out.append(tasks.passkey(tok, length, g, rng))
                elif task == "kv":
                    out.append(tasks.kv(tok, length, g, rng))
                else:
                    out.append(tasks.lines(tok, length, rng))
    return out


def run_generation(task: str, cfg, params, tok, examples, batch: int, chunk: int, progress: bool = True) -> list:
    from tqdm.auto import tqdm

    by_length = defaultdict(list)
    for ex in examples:
        by_length[ex.meta["length"]].append(ex)
    rows = []
    bar = tqdm(total=len(examples), desc=f"{task}", unit="prompt", disable=not progress)
    new = tasks.answer_tokens(task)
    for length in sorted(by_length):
        group = by_length[length]
        for i in range(0, len(group), batch):
            part = group[i:i + batch]
            prompts, start = generate.left_pad([ex.ids for ex in part])
            out = generate.generate(cfg, params, prompts, new, chunk=chunk, start_B=start)
            for ex, row in zip(part, out[:, prompts.shape[1]:]):
                text = tok.decode(row)
                rows.append({**ex.meta, "tokens": len(ex.ids), "answer": ex.answer, "output": text,
                             "correct": tasks.score(task, text, ex.answer)})
            bar.update(len(part))
    bar.close()
    return rows


def summarize(task: str, rows: list) -> list[dict]:
    key = GRID[task]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["length"], r[key] if key else None)].append(r["correct"])
    return [{"length": length, **({key: g} if key else {}), "n": len(v), "accuracy": float(np.mean(v))}
            for (length, g), v in sorted(groups.items())]


def perplexity(cfg, params, tok, docs: list[str], lengths, windows: int, chunk: int, buckets: int = 8,
               progress: bool = True) -> list[dict]:
    """Sliding windows of length T over the concatenated documents (stride T): perplexity per T and per
    position bucket (T / buckets positions each)."""
    from tqdm.auto import tqdm

    stream = np.concatenate([np.asarray(x, np.int32) for x in tok.encode(docs)])
    out = []
    bar = tqdm(total=len(lengths) * windows, desc="ppl", unit="window", disable=not progress)
    for T in lengths:
        if (windows + 1) * T > len(stream):
            raise tasks.TaskError(f"the corpus has {len(stream)} tokens: too few for {windows} windows of {T}")
        nll = np.zeros(T - 1)
        for w in range(windows):
            window = stream[w * T:(w + 1) * T][None]
            cache = generate.init_cache(cfg, 1, T)
            logp = []
            for s in range(0, T, chunk):
                piece = window[:, s:s + chunk]
                logits, cache = generate.extend(cfg, params, jnp.asarray(piece), cache, piece.shape[1])
                logp.append(np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)))
            logp = np.concatenate(logp)[:-1]
            nll += -logp[np.arange(T - 1), window[0, 1:]]
            bar.update(1)
        nll /= windows
        edges = np.linspace(0, T - 1, buckets + 1).astype(int)
        out.append({"length": T, "windows": windows, "ppl": float(np.exp(nll.mean())),
                    "bucket_ppl": [float(np.exp(nll[a:b].mean())) for a, b in zip(edges[:-1], edges[1:])],
                    "bucket_edges": edges.tolist()})
    bar.close()
    return out


def table(task: str, summary: list[dict]) -> str:
    if task == "ppl":
        header = ["length", "perplexity", "per position bucket (first -> last)"]
        body = [[r["length"], f"{r['ppl']:.2f}", " ".join(f"{x:.1f}" for x in r["bucket_ppl"])] for r in summary]
    elif GRID[task]:
        key = GRID[task]
        grid = sorted({r[key] for r in summary})
        header = ["length"] + [f"{key} {g:g}" for g in grid]
        acc = {(r["length"], r[key]): r["accuracy"] for r in summary}
        body = [[length] + [f"{acc[(length, g)]:.2f}" for g in grid]
                for length in sorted({r["length"] for r in summary})]
    else:
        header = ["length", "n", "accuracy"]
        body = [[r["length"], r["n"], f"{r['accuracy']:.2f}"] for r in summary]
    return "\n".join(["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(str, row)) + " |" for row in body])


def passkey_heatmap(ax, summary: list[dict], fontsize: int = 8):
    """Passkey accuracy as a depth x length grid on `ax`, each cell labelled; returns the image."""
    lengths = sorted({r["length"] for r in summary})
    depths = sorted({r["depth"] for r in summary})
    acc = {(r["length"], r["depth"]): r["accuracy"] for r in summary}
    grid = np.array([[acc[(length, d)] for length in lengths] for d in depths])
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize)
    return im


def plot(task: str, summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lengths = sorted({r["length"] for r in summary})
    if task == "passkey":
        fig.colorbar(passkey_heatmap(ax, summary), ax=ax, label="accuracy")
    elif task == "kv":
        for length in lengths:
            pts = sorted((r["position"], r["accuracy"]) for r in summary if r["length"] == length)
            ax.plot(*zip(*pts), marker="o", label=f"{length} tokens")
        ax.set_xlabel("position of the asked key (0 = first, 1 = last)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()
    elif task == "lines":
        ax.plot(lengths, [r["accuracy"] for r in summary], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
    else:
        for r in summary:
            edges = r["bucket_edges"]
            centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            ax.plot(centres, r["bucket_ppl"], marker="o", label=f"T = {r['length']} (ppl {r['ppl']:.1f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the window (tokens)")
        ax.set_ylabel("perplexity")
        ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cream_jax.evaluate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a train run directory (its newest or --step checkpoint)")
    src.add_argument("--hf", help="a Hugging Face model directory")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--tokenizer", default="", help="default: the run's data.tokenizer, or the HF directory's")
    p.add_argument("--task", required=True, choices=[*tasks.TASKS, "ppl"])
    p.add_argument("--lengths", required=True, help="comma-separated prompt / window lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: needle depths in [0, 1]")
    p.add_argument("--positions", default="0,0.25,0.5,0.75,1", help="kv: asked key positions in [0, 1]")
    p.add_argument("--samples", type=int, default=5, help="prompts per grid cell")
    p.add_argument("--corpus", default="austen", help="ppl: a registry corpus name or .txt/.jsonl files")
    p.add_argument("--windows", type=int, default=4, help="ppl: windows per length")
    p.add_argument("--batch", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/eval")
    a = p.parse_args(argv)
    try:
        lengths = [int(x) for x in a.lengths.split(",")]
        cfg, params, tok, label = load(a)
        if a.task == "ppl":
            from cream_jax.data import sources

            docs = list(sources.read_documents(sources.resolve_files(a.corpus)))
            rows = summary = perplexity(cfg, params, tok, docs, lengths, a.windows, a.chunk)
        else:
            key = GRID[a.task]
            grid = [float(x) for x in (a.depths if key == "depth" else a.positions).split(",")] if key else [None]
            examples = make_examples(a.task, tok, lengths, grid, a.samples, a.seed)
            rows = run_generation(a.task, cfg, params, tok, examples, a.batch, a.chunk)
            summary = summarize(a.task, rows)
    except (tasks.TaskError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(a.task, summary)
    (out / f"{a.task}.json").write_text(json.dumps({"model": label, "task": a.task, "summary": summary,
                                                    "rows": rows}, indent=1) + "\n")
    (out / f"{a.task}.md").write_text(f"# {a.task}: {label}\n\n{md}\n")
    plot(a.task, summary, out / f"{a.task}.png", f"{a.task}: {label}")
    print(md)
    print(f"wrote {out / (a.task + '.json')}, {a.task}.md and {a.task}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
