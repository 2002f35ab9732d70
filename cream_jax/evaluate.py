"""Long-context evaluation as the papers run it: passkey, LongChat-Lines, key-value retrieval, RULER, perplexity.

    python -m cream_jax.evaluate --ckpt RUN_DIR [--step N] --task passkey --lengths 4096,8192 \\
        --depths 0,0.25,0.5,0.75,1 --samples 5 --out results/eval
    python -m cream_jax.evaluate --hf DIR --task kv --keys 75,140            # lost-in-the-middle's grid
    python -m cream_jax.evaluate --hf DIR --task lines --lines 200,300,400   # CREAM's LongChat-Lines grid
    python -m cream_jax.evaluate --hf DIR --task ruler --lengths 4096,32768  # RULER's synthetic suite
    python -m cream_jax.evaluate --ckpt RUN_DIR --task ppl --lengths 4096,8192 --corpus austen

Each task follows its reference's prompt and metric (docs/evaluation.md): passkey as PoSE's eval_passkey,
kv as lost-in-the-middle, lines as LongChat's generator scored as CREAM, RULER's synthetic tasks with its
templates and string-match metrics, perplexity as CREAM's eval_ppl (`--ppl_mode sliding` for windows over the
concatenated corpus). A prompt is its text encoded once; its true token count is in every result row.
Generation decodes greedily with the KV cache (`cream_jax.generate`), prompts of similar length batched
together (left-padded), and stops at EOS. Writes TASK.json (every example and the summary), TASK.md (the
table) and TASK.png (passkey: accuracy heatmap length x depth; kv: accuracy by key position; lines: accuracy
by line count; ruler: score by length per task and their average; ppl: perplexity by length and by position
bucket) into --out, and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax import cli, files, generate, tasks
from cream_jax.config import LlamaConfig
from cream_jax.errors import CreamError
from cream_jax.report import markdown_table

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

    from cream_jax.data.tokenizer import Tokenizer

# The grid axes of each task's results (the references' axes) and what the table's rows are.
GRID = {"passkey": ("length", "depth"), "kv": ("keys", "index"), "lines": ("lines",), "ruler": ("subtask", "length")}
PPL_MODES = ("documents", "sliding")
SHAPE_MULTIPLE = 64  # prompts and caches are padded to multiples of this: prompts of similar length share compiles


def check_source(args: argparse.Namespace, mesh: jax.sharding.Mesh | None = None) -> Tokenizer:
    """The tokenizer of --ckpt / --hf (or --tokenizer), checked against the model's config and the model
    against the mesh: everything about the source that can be wrong, read without its weights."""
    from cream_jax import load as load_lib
    from cream_jax.data import tokenizer as tok_lib

    source = args.ckpt or args.hf
    config, kind = load_lib.read_config(source, args.step if args.ckpt else None)
    spec = args.tokenizer or (load_lib.run_tokenizer(source) if kind == "run" else source)
    tok = tok_lib.resolve(spec)
    tok_lib.check_vocab(tok, config.vocab_size)
    if mesh is not None:
        from cream_jax.sharding import check_heads

        check_heads(config, mesh.shape.get("tensor", 1), "--mesh tensor")
    return tok


def load(args: argparse.Namespace, mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> tuple:
    """(config, params, tokenizer, label) from --ckpt (a train run or params checkpoint) or --hf (a Hugging
    Face directory), on one device or in their shards on `mesh`, after `check_source`."""
    from flax import nnx

    from cream_jax import load as load_lib

    tok = check_source(args, mesh)
    module, label = load_lib.load_model(args.ckpt or args.hf, args.step if args.ckpt else None, progress=progress,
                                        mesh=mesh)
    return module.config, nnx.to_pure_dict(nnx.state(module, nnx.Param)), tok, label


def make_examples(task: str, tok: Tokenizer, *, lengths: Sequence[int] = (), depths: Sequence[float] = (),
                  keys: Iterable[int] = (), lines: Iterable[int] = (), subtasks: Iterable[str] = (), samples: int = 1,
                  seed: int = 0, corpus: str = "austen", chat: str | None = None,
                  key_range: tuple[int, int] = tasks.PASSKEY_KEYS, style: str = "pose") -> list[tasks.Example]:
    """`samples` prompts per grid cell, reproducible by `seed`. kv and lines: the counts in `keys` / `lines`,
    and for each of `lengths` the largest count that fits it; kv asks every gold index of each count.
    `key_range`, `style`: passkey's keys and prompt format (`tasks.passkey`; PoSE's by default)."""
    rng = np.random.default_rng(seed)
    out = []
    if task == "passkey":
        for length in lengths:
            for depth in depths:
                out += [tasks.passkey(tok, length, depth, rng, chat=chat, key_range=key_range, style=style)
                        for _ in range(samples)]
    elif task == "kv":
        counts = list(keys) + [tasks.kv_keys_for_length(tok, length, chat=chat) for length in lengths]
        for k in dict.fromkeys(counts):
            for index in tasks.kv_gold_indices(k):
                out += [tasks.kv(tok, k, index, rng, chat=chat) for _ in range(samples)]
    elif task == "lines":
        counts = list(lines) + [tasks.lines_for_length(tok, length, chat=chat) for length in lengths]
        for n in dict.fromkeys(counts):
            out += [tasks.lines(tok, n, rng, chat=chat) for _ in range(samples)]
    elif task == "ruler":
        from cream_jax import ruler

        for subtask in subtasks:
            for length in lengths:
                out += [ruler.build(tok, subtask, length, rng, corpus=corpus, chat=chat) for _ in range(samples)]
    else:
        raise tasks.TaskError(f"unknown task {task!r}; allowed: {', '.join(GRID)}")
    return out


def _scorer(example: tasks.Example):
    """(new tokens to generate, score(output) -> float) for one example."""
    if example.meta["task"] == "ruler":
        from cream_jax import ruler

        subtask = example.meta["subtask"]
        return ruler.answer_tokens(subtask), lambda text: ruler.score(subtask, text, example.answer)
    task = example.meta["task"]
    return tasks.answer_tokens(task), lambda text: tasks.score(task, text, example.answer)


def _row_multiple() -> int:
    """Batch rows must divide by the active mesh's batch axes (`data` x `fsdp`); 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def _padded_rows(rows: list, multiple: int) -> list:
    """`rows` with its last one repeated up to a multiple of `multiple` (the copies' results are dropped)."""
    return rows + rows[-1:] * (-len(rows) % multiple)


def generation_batches(examples: Sequence[tasks.Example], batch: int) -> list[list[int]]:
    """The example indices of each generation batch: prompts with the same number of new tokens, in order of
    length, `batch` at a time. Fixed by the examples alone, so a resumed run computes the same batches."""
    groups = defaultdict(list)  # new tokens -> example indices
    for i, ex in enumerate(examples):
        groups[_scorer(ex)[0]].append(i)
    out = []
    for _, group in sorted(groups.items()):
        group = sorted(group, key=lambda i: len(examples[i].ids))
        out += [group[i:i + batch] for i in range(0, len(group), batch)]
    return out


def run_generation(cfg: LlamaConfig, params: dict, tok: Tokenizer, examples: Sequence[tasks.Example], batch: int,
                   chunk: int, progress: bool = True, finished: np.ndarray | None = None,
                   record: Callable[[list[dict]], None] | None = None, stop: Callable[[], bool] | None = None) -> list:
    """Greedy answers for `examples` (`generation_batches`), left-padded together; a continuation ends at the
    first EOS (as generate() stops there in the references); the rest is not scored. Each row carries its
    example's index as `key`.

    Resuming: batches whose examples are all `finished` are skipped; `record` receives each batch's rows as it
    ends; `stop()` (e.g. SIGTERM seen) is asked after each batch and ends the run early."""
    from tqdm.auto import tqdm

    finished = np.zeros(len(examples), bool) if finished is None else finished
    multiple = _row_multiple()
    rows = []
    bar = tqdm(total=len(examples), desc=examples[0].meta["task"] if examples else "", unit="prompt",
               disable=not progress, initial=int(finished.sum()))
    for part in generation_batches(examples, batch):
        if finished[part].all():
            continue
        new, _ = _scorer(examples[part[0]])
        padded = _padded_rows(part, multiple)
        prompts, start = generate.left_pad([examples[i].ids for i in padded], multiple=SHAPE_MULTIPLE)
        max_len = -(-(prompts.shape[1] + new) // SHAPE_MULTIPLE) * SHAPE_MULTIPLE
        out = generate.generate(cfg, params, prompts, new, chunk=chunk, start_B=start, max_len=max_len,
                                stop_token=tok.eos_id)
        batch_rows = []
        for i, row in zip(part, out[:len(part), prompts.shape[1]:]):
            ex, (_, score) = examples[i], _scorer(examples[i])
            row = list(row)
            text = tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row)
            if not finished[i]:
                batch_rows.append({"key": i, **ex.meta, "tokens": len(ex.ids), "answer": ex.answer,
                                   "output": text, "score": float(score(text))})
        rows += batch_rows
        if record:
            record(batch_rows)
        bar.update(int((~finished[part]).sum()))
        if stop and stop():
            break
    bar.close()
    return rows


def summarize(task: str, rows: list) -> list[dict]:
    """Mean score and mean true prompt length per grid cell."""
    axes = GRID[task]
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[a] for a in axes)].append(r)
    def order(cell):  # numbers ascending; RULER's tasks in RULER's order
        return [x if not isinstance(x, str) else _ruler_tasks().index(x) for x in cell]

    return [{**dict(zip(axes, cell)), "n": len(v), "tokens": round(float(np.mean([r["tokens"] for r in v]))),
             "accuracy": float(np.mean([r["score"] for r in v]))}
            for cell, v in sorted(groups.items(), key=lambda kv: order(kv[0]))]


def _ruler_tasks() -> tuple[str, ...]:
    from cream_jax import ruler

    return ruler.TASKS


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _chunk_nll(cfg: LlamaConfig, params: dict, tokens_BxC: jax.Array, cache: generate.KVCache, num_new: int,
               seq_len: int, targets_BxC: jax.Array) -> tuple[jax.Array, generate.KVCache]:
    """One chunk through the cache, and the NLL [B, C] of each next token `targets_BxC` (computed where the
    logits are, so no [B, C, V] array leaves the devices)."""
    logits, cache = generate.extend(cfg, params, tokens_BxC, cache, num_new, seq_len)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BxC[..., None], axis=-1)[..., 0], cache


def batch_nll(cfg: LlamaConfig, params: dict, ids_BxT: np.ndarray, chunk: int) -> np.ndarray:
    """Negative log-likelihood of each next token of B sequences of one length [B, T - 1], fed through the KV
    cache in chunks (memory for one chunk, not T x T): the same values as one forward pass over each sequence,
    dynamic NTK RoPE included (every chunk is rotated for the whole sequence's length)."""
    ids_BxT = np.asarray(ids_BxT, np.int32)
    B, T = ids_BxT.shape
    targets_BxT = np.pad(ids_BxT[:, 1:], ((0, 0), (0, 1)))
    cache = generate.init_cache(cfg, B, T)
    nll = []
    for s in range(0, T, chunk):
        piece = ids_BxT[:, s:s + chunk]
        out, cache = _chunk_nll(cfg, params, generate.replicated(piece), cache, piece.shape[1], T,
                                generate.replicated(targets_BxT[:, s:s + chunk]))
        nll.append(generate.to_host(out))
    return np.concatenate(nll, axis=1)[:, :T - 1]


def sequence_nll(cfg: LlamaConfig, params: dict, ids: Sequence[int] | np.ndarray, chunk: int) -> np.ndarray:
    """`batch_nll` of one sequence [T - 1]."""
    return batch_nll(cfg, params, np.asarray(ids, np.int32)[None], chunk)[0]


def ppl_sequences(tok: Tokenizer, docs: list[str], lengths: Sequence[int], mode: str = "documents",
                  count: int = 4) -> list[tuple[int, np.ndarray]]:
    """(T, token ids) of every sequence perplexity is measured on, by length (`perplexity` says how)."""
    if mode not in PPL_MODES:
        raise tasks.TaskError(f"unknown perplexity mode {mode!r}; allowed: {', '.join(PPL_MODES)}")
    encoded = tok.encode(docs, bos=False, eos=False) if mode == "documents" else tok.encode(docs)
    if mode == "documents":
        need = max(lengths) - 1
        long_docs = [d for d in encoded if len(d) >= need][:count]
        if not long_docs:
            raise tasks.TaskError(f"no document has the {need} tokens that length {max(lengths)} needs (the "
                                  f"longest has {max(map(len, encoded), default=0)}); use shorter --lengths, "
                                  f"another --corpus, or --ppl_mode sliding")
        return [(T, np.asarray([tok.bos_id] + d[:T - 1], np.int32)) for T in lengths for d in long_docs]
    stream = np.concatenate([np.asarray(x, np.int32) for x in encoded])
    for T in lengths:
        if count * T > len(stream):
            raise tasks.TaskError(f"the corpus has {len(stream)} tokens: too few for {count} windows of {T}; "
                                  f"use fewer --windows or shorter --lengths")
    return [(T, stream[w * T:(w + 1) * T]) for T in lengths for w in range(count)]


def _bucket_edges(T: int, buckets: int) -> list[int]:
    return np.linspace(0, T - 1, buckets + 1).astype(int).tolist()


def perplexity_rows(cfg: LlamaConfig, params: dict, sequences: Sequence[tuple[int, np.ndarray]], *, batch: int = 8,
                    chunk: int = 512, buckets: int = 8, progress: bool = True, mode: str = "documents",
                    finished: np.ndarray | None = None, record: Callable[[list[dict]], None] | None = None,
                    stop: Callable[[], bool] | None = None) -> list[dict]:
    """A row per sequence (key: its index): its length and the summed NLL and token count of each position
    bucket. Sequences of one length go `batch` at a time; `finished`, `record`, `stop` as `run_generation`."""
    from tqdm.auto import tqdm

    finished = np.zeros(len(sequences), bool) if finished is None else finished
    multiple = _row_multiple()
    by_length = defaultdict(list)
    for i, (T, _) in enumerate(sequences):
        by_length[T].append(i)
    rows = []
    bar = tqdm(total=len(sequences), desc=f"ppl ({mode})", unit="sequence", disable=not progress,
               initial=int(finished.sum()))
    for T, keys in by_length.items():
        edges = _bucket_edges(T, buckets)
        for b in range(0, len(keys), batch):
            part = keys[b:b + batch]
            if finished[part].all():
                continue
            padded = _padded_rows(part, multiple)
            nll = batch_nll(cfg, params, np.stack([sequences[i][1] for i in padded]), chunk)
            batch_rows = [{"key": i, "length": T, "mode": mode,
                           "bucket_nll": [float(nll[r, x:y].sum()) for x, y in zip(edges[:-1], edges[1:])],
                           "bucket_tokens": [y - x for x, y in zip(edges[:-1], edges[1:])]}
                          for r, i in enumerate(part) if not finished[i]]
            rows += batch_rows
            if record:
                record(batch_rows)
            bar.update(len(batch_rows))
            if stop and stop():
                bar.close()
                return rows
    bar.close()
    return rows


def ppl_summary(rows: Sequence[dict], buckets: int = 8) -> list[dict]:
    """Per length: exp of the mean NLL over sequences and positions, and per position bucket."""
    out = []
    for T in dict.fromkeys(r["length"] for r in rows):
        mine = [r for r in rows if r["length"] == T]
        sums = np.sum([r["bucket_nll"] for r in mine], axis=0)
        tokens = np.sum([r["bucket_tokens"] for r in mine], axis=0)
        out.append({"length": T, "mode": mine[0]["mode"], "sequences": len(mine),
                    "ppl": float(np.exp(sums.sum() / tokens.sum())),
                    "bucket_ppl": [float(np.exp(x / n)) for x, n in zip(sums, tokens)],
                    "bucket_edges": _bucket_edges(T, buckets)})
    return out


def perplexity(cfg: LlamaConfig, params: dict, tok: Tokenizer, docs: list[str], lengths: Sequence[int], *,
               mode: str = "documents", count: int = 4, batch: int = 8,
               chunk: int = 512, buckets: int = 8, progress: bool = True) -> list[dict]:
    """Perplexity per length T, and per position bucket (T / buckets positions each).

    mode "documents" (CREAM's eval_ppl): the first `count` documents with at least max(lengths) - 1 tokens,
    each evaluated on its own as BOS then its first T - 1 tokens; the perplexity is exp of the mean NLL over
    documents and positions. mode "sliding": `count` consecutive windows of T tokens over the concatenated
    documents (each BOS, text, EOS), stride T."""
    sequences = ppl_sequences(tok, docs, lengths, mode, count)
    rows = perplexity_rows(cfg, params, sequences, batch=batch, chunk=chunk, buckets=buckets, progress=progress,
                           mode=mode)
    return ppl_summary(rows, buckets)


def table(task: str, summary: list[dict]) -> str:
    """The results as a markdown table on the task's grid axes (RULER: tasks x lengths, and their average)."""
    if task == "ppl":
        header = ["length", "sequences", "perplexity", "per position bucket (first -> last)"]
        body = [[r["length"], r["sequences"], f"{r['ppl']:.2f}", " ".join(f"{x:.1f}" for x in r["bucket_ppl"])]
                for r in summary]
    elif task == "passkey":
        lengths = sorted({r["length"] for r in summary})
        acc = {(r["length"], r["depth"]): r for r in summary}
        header = ["length", "tokens"] + [f"depth {d:g}" for d in sorted({r["depth"] for r in summary})]
        body = [[length, round(np.mean([r["tokens"] for r in summary if r["length"] == length]))]
                + [f"{acc[(length, d)]['accuracy']:.2f}" for d in sorted({r["depth"] for r in summary})]
                for length in lengths]
    elif task == "kv":
        header = ["keys", "tokens", "gold index", "n", "accuracy"]
        body = [[r["keys"], r["tokens"], r["index"], r["n"], f"{r['accuracy']:.2f}"] for r in summary]
    elif task == "lines":
        header = ["lines", "tokens", "n", "accuracy"]
        body = [[r["lines"], r["tokens"], r["n"], f"{r['accuracy']:.2f}"] for r in summary]
    else:  # ruler: a row per task, a column per length, scores in percent as RULER prints them
        lengths = sorted({r["length"] for r in summary})
        subtasks = list(dict.fromkeys(r["subtask"] for r in summary))
        score = {(r["subtask"], r["length"]): 100 * r["accuracy"] for r in summary}
        header = ["task"] + [str(length) for length in lengths]
        body = [[t] + [f"{score[(t, length)]:.1f}" for length in lengths] for t in subtasks]
        body.append(["**average**"] + [f"**{np.mean([score[(t, length)] for t in subtasks]):.1f}**"
                                       for length in lengths])
    return markdown_table(header, body)


def passkey_heatmap(ax: Axes, summary: list[dict], fontsize: int = 8) -> AxesImage:
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
    if task == "passkey":
        fig.colorbar(passkey_heatmap(ax, summary), ax=ax, label="accuracy")
    elif task == "kv":  # lost-in-the-middle's figure: accuracy by where the asked key sits
        for keys in sorted({r["keys"] for r in summary}):
            pts = sorted((r["index"] / max(keys - 1, 1), r["accuracy"]) for r in summary if r["keys"] == keys)
            tokens = round(np.mean([r["tokens"] for r in summary if r["keys"] == keys]))
            ax.plot(*zip(*pts), marker="o", label=f"{keys} keys ({tokens} tokens)")
        ax.set_xlabel("position of the asked key (0 = first, 1 = last)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()
    elif task == "lines":
        ax.plot([r["lines"] for r in summary], [r["accuracy"] for r in summary], marker="o")
        for r in summary:
            ax.annotate(f"{r['tokens']} tok", (r["lines"], r["accuracy"]), fontsize=7, textcoords="offset points",
                        xytext=(0, 6), ha="center")
        ax.set_xlabel("lines in the prompt")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.1)
    elif task == "ruler":
        lengths = sorted({r["length"] for r in summary})
        subtasks = list(dict.fromkeys(r["subtask"] for r in summary))
        score = {(r["subtask"], r["length"]): r["accuracy"] for r in summary}
        for t in subtasks:
            ax.plot(lengths, [score[(t, length)] for length in lengths], marker=".", lw=0.8, alpha=0.6, label=t)
        ax.plot(lengths, [np.mean([score[(t, length)] for t in subtasks]) for length in lengths], color="black",
                lw=2.5, marker="o", label="average")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("score")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=6, ncol=2)
    else:
        for r in summary:
            edges = r["bucket_edges"]
            centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            ax.plot(centres, r["bucket_ppl"], marker="o", label=f"T = {r['length']} (ppl {r['ppl']:.1f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the sequence (tokens)")
        ax.set_ylabel("perplexity")
        ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _depths(text: str) -> list[float]:
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        depths = []
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise tasks.TaskError(f"--depths={text!r} must be comma-separated numbers in [0, 1], e.g. --depths=0,0.5,1")
    return depths


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise tasks.TaskError(f"{flag}={text!r} must be comma-separated integers, e.g. {flag}=4096,8192") from None


# The arguments that decide an evaluation's results: a rerun into the same --out must repeat them (the mesh and
# the processes may change: sharded and single-device runs give the same results).
RESULT_ARGUMENTS = ("ckpt", "hf", "step", "tokenizer", "task", "lengths", "depths", "keys", "lines", "ruler_tasks",
                    "chat", "samples", "corpus", "ppl_mode", "documents", "windows", "batch", "chunk", "seed")


def make_mesh(text: str) -> jax.sharding.Mesh | None:
    """--mesh as a mesh of every device of every process, or None for one device. `auto`: the whole machine
    on TPU and GPU and across processes, the batch over `data` and the parameters and cache over `tensor` (as
    many as divide the kv heads: see `--mesh`); one device on a single CPU process."""
    from cream_jax import sharding

    if text == "auto":
        if jax.process_count() == 1 and jax.devices()[0].platform == "cpu":
            return None
        text = "data=1,fsdp=-1,tensor=1"
    return sharding.make_mesh(sharding.parse_mesh(text, flag="--mesh"))


def main(argv: list[str] | None = None) -> int:
    from cream_jax.platform import use_local_backends

    use_local_backends()  # before jax starts its backends
    p = cli.ArgumentParser("cream_jax.evaluate", description=__doc__.split("\n")[0],
                           epilog="docs/evaluation.md: each task's reference, prompt and metric; resuming and "
                                  "meshes are described there too.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a train run directory (its newest or --step checkpoint)")
    src.add_argument("--hf", help="a Hugging Face model directory")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--tokenizer", default="", help="default: the run's data.tokenizer, or the HF directory's")
    p.add_argument("--task", required=True, choices=[*tasks.TASKS, "ruler", "ppl"])
    p.add_argument("--lengths", default="", help="comma-separated token lengths: passkey, ruler and ppl lengths; "
                                                 "kv and lines: the largest key / line count that fits each")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: needle depths in [0, 1]")
    p.add_argument("--keys", default="", help="kv: key counts (the papers': 75,140)")
    p.add_argument("--lines", default="", help="lines: line counts (CREAM's: 200,300,400,500,600,680)")
    p.add_argument("--ruler_tasks", default="all", help="ruler: comma-separated RULER task names, or all")
    p.add_argument("--chat", default="none", help="wrap prompts in a chat template: none, llama2 or vicuna (CREAM's "
                                                       "Lines evaluation wraps every model's prompt in vicuna's)")
    p.add_argument("--samples", type=int, default=5, help="prompts per grid cell")
    p.add_argument("--corpus", default="austen",
                   help="ppl, and RULER's essay haystack: a registry corpus name or .txt/.jsonl files")
    p.add_argument("--ppl_mode", default="documents", choices=PPL_MODES,
                   help="documents: each long document on its own, BOS + its first T - 1 tokens (CREAM's "
                        "eval_ppl); sliding: windows of T over the concatenated corpus")
    p.add_argument("--documents", type=int, default=50, help="ppl documents mode: at most this many documents")
    p.add_argument("--windows", type=int, default=4, help="ppl sliding mode: windows per length")
    p.add_argument("--batch", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/eval")
    p.add_argument("--mesh", default="auto", help="data=D,fsdp=F,tensor=T over every device (one may be -1: the "
                   "rest), as training's mesh.*: parameters over fsdp and tensor, the KV cache's kv heads over "
                   "tensor, the batch over data and fsdp; auto: one device on a CPU, else data=1,fsdp=-1,tensor=1")
    p.add_argument("--coordinator_address", default=None, help="multi-host: host:port of process 0 (jax.distributed)")
    p.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with no arguments (TPU pods)")
    a = p.parse_args(argv)
    try:  # every input is checked before the model loads
        from cream_jax import sharding
        from cream_jax.preemption import Preemption
        from cream_jax.results import Results, finished_mask, ordered

        out = files.output_dir(a.out)
        lengths, keys, lines = _ints(a.lengths, "--lengths"), _ints(a.keys, "--keys"), _ints(a.lines, "--lines")
        depths = _depths(a.depths)
        if a.mesh != "auto":
            sharding.parse_mesh(a.mesh, flag="--mesh")
        if a.step is not None and not a.ckpt:
            raise tasks.TaskError(f"--step={a.step} picks a checkpoint of --ckpt (a train run); --hf has one model")
        chat = None if a.chat == "none" else a.chat
        tasks.chat_wrap("", chat)
        counts = {"kv": keys, "lines": lines}.get(a.task, [])
        if not lengths and not counts:
            need = {"kv": "--keys or --lengths", "lines": "--lines or --lengths"}.get(a.task, "--lengths")
            raise tasks.TaskError(f"--task={a.task} needs {need}")
        subtasks = []
        if a.task == "ruler":
            from cream_jax import ruler

            subtasks = list(ruler.TASKS) if a.ruler_tasks == "all" else a.ruler_tasks.split(",")
            unknown = [t for t in subtasks if t not in ruler.TASKS]
            if unknown:
                raise tasks.TaskError(f"unknown RULER task(s) {', '.join(unknown)}; allowed: {', '.join(ruler.TASKS)}"
                                      f" or all")
        if a.task in ("ppl", "ruler"):
            from cream_jax.data import sources

            corpus_files = sources.resolve_files(a.corpus)  # a bad corpus fails here, before the model loads
        sharding.init_distributed(a.coordinator_address, a.num_processes, a.process_id, force=a.distributed)
        lead = jax.process_index() == 0
        mesh = make_mesh(a.mesh)
        check_source(a, mesh)
        results = Results(out, a.task, {k: getattr(a, k) for k in RESULT_ARGUMENTS})
        done = results.open()  # refuses another evaluation's results before the model loads
        cfg, params, tok, label = load(a, mesh, progress=lead)
        preemption = Preemption()
        batches = iter(range(1, 1 << 62))
        common = dict(progress=lead, record=results.append, stop=lambda: preemption.reached(next(batches)))
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            if a.task == "ppl":
                docs = list(sources.read_documents(corpus_files))
                count = a.documents if a.ppl_mode == "documents" else a.windows
                items = ppl_sequences(tok, docs, lengths, a.ppl_mode, count)
                new = perplexity_rows(cfg, params, items, batch=a.batch, chunk=a.chunk, mode=a.ppl_mode,
                                      finished=finished_mask(done, len(items)), **common)
            else:
                items = make_examples(a.task, tok, lengths=lengths, depths=depths,
                                      keys=keys, lines=lines, subtasks=subtasks, samples=a.samples, seed=a.seed,
                                      corpus=a.corpus, chat=chat)
                new = run_generation(cfg, params, tok, items, a.batch, a.chunk,
                                     finished=finished_mask(done, len(items)), **common)
        preemption.close()
    except (CreamError, FileNotFoundError, ValueError) as e:
        return cli.report(e)
    done.update({r["key"]: r for r in new})
    if not lead:
        return 0
    if len(done) < len(items):
        print(f"stopped (SIGTERM) with {len(done)} of {len(items)} {'sequences' if a.task == 'ppl' else 'examples'} "
              f"in {results.rows_path}; rerun the same command to finish", file=sys.stderr)
        return 0
    rows = ordered(done, range(len(items)))
    summary = ppl_summary(rows) if a.task == "ppl" else summarize(a.task, rows)
    if a.task == "ppl":  # which text the numbers are about
        label = f"{label}, on {a.corpus} ({a.ppl_mode})"
    md = table(a.task, summary)
    (out / f"{a.task}.json").write_text(json.dumps({"model": label, "task": a.task, "chat": a.chat,
                                                    "summary": summary, "rows": rows}, indent=1) + "\n")
    (out / f"{a.task}.md").write_text(f"# {a.task}: {label}\n\n{md}\n")
    plot(a.task, summary, out / f"{a.task}.png", f"{a.task}: {label}")
    print(md)
    print(f"wrote {out / (a.task + '.json')}, {a.task}.md and {a.task}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
