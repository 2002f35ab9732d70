"""`make demo`: CREAM end to end on a CPU, from a real corpus to a passkey answered by transformers.

1. Fetch Jane Austen's novels (Debian's r-cran-janeaustenr) and train a SentencePiece tokenizer on them.
2. Pretrain a tiny Llama at window N on the novels mixed with passkey prompts of up to N tokens, so that it
   learns to retrieve a passkey within N (checked; below the target, one more cosine cycle).
3. Extend it to L = f * N with YaRN interpolation, fine-tuning at N only, three ways: plain
   positions (no extension), PoSE and CREAM. Same data, steps and learning rate for all three.
4. Evaluate passkey retrieval at lengths N .. L and needle depths 0 .. 1 (greedy, KV cache) for the
   unextended model and the three fine-tunes: a table, JSON and a heatmap.
5. Export the CREAM model to Hugging Face format and answer one passkey prompt of L tokens with
   transformers from the exported directory.

Everything goes to --out (default results/demo): README.md (the table), results.json, passkey.png,
recipe.json (re-running the same recipe reuses the finished runs),
hf/ (the export), runs/ (train runs with metrics.jsonl), data/ (tokenizer and jsonl).
`--quick` runs a few steps of everything (for tests; its accuracies mean nothing).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cream_jax import cli

if TYPE_CHECKING:
    import ml_collections

    from cream_jax.config import LlamaConfig
    from cream_jax.data.tokenizer import Tokenizer

METHODS = ("plain", "pose", "cream")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The demo's passkey prompts: five-digit keys, sentences joined by spaces (`tasks.passkey_text`'s "spaced"), a
# format its 2-layer model learns within N in this CPU budget; in PoSE's own layout (keys 1-50000, newline-
# separated parts) it did not (docs/demo_recipe.md). `python -m cream_jax.evaluate` uses PoSE's layout.
KEY_RANGE = (10000, 99999)
PASSKEY_STYLE = "spaced"


@dataclasses.dataclass
class Recipe:
    window: int = 128  # N, the pretraining and fine-tuning window
    factor: int = 4  # f: L = f * N
    vocab_size: int = 1000  # of the SentencePiece model trained on the corpus
    hidden_size: int = 128
    layers: int = 2
    heads: int = 8
    kv_heads: int = 4
    batch: int = 16
    pretrain_steps: int = 3000
    pretrain_lr: float = 3e-3  # cosine decay to a tenth: the exact 5-digit copy appears as the rate decays
    pretrain_weight_decay: float = 0.1  # AdamW's: without it, whether the copy is learned in time depends on the seed
    pretrain_target: float = 0.9  # passkey accuracy within N below which pretraining goes on (one more cycle)
    anneal_steps: int = 1000  # that cycle: a fresh cosine schedule from the pretrained weights
    anneal_lr: float = 1.5e-3
    finetune_steps: int = 800  # 400 left CREAM under PoSE and plain on seed 1 (0.57 beyond N; 800: 0.96, now 0.59)
    finetune_lr: float = 1e-3
    rope: str = "yarn"  # the interpolation of the fine-tunes: yarn | ntk | linear (cream_jax.rope)
    passkey_fraction: float = 0.8  # of the training rows
    novels: int = 6  # the first k of the corpus's six novels (the quick run reads one)
    eval_samples: int = 8  # passkey prompts per (length, depth) cell
    seed: int = 0

    @property
    def target(self) -> int:
        return self.window * self.factor

    @classmethod
    def quick(cls, **kw: Any) -> "Recipe":
        return cls(**{**dict(pretrain_steps=6, anneal_steps=2, finetune_steps=4, batch=8, eval_samples=1,
                             factor=2, novels=1), **kw})


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- data


def read_novels(r: Recipe) -> list[str]:
    """The recipe's first `novels` of the corpus (fetched on first use)."""
    from cream_jax.data import sources

    novels = list(sources.read_documents(sources.resolve_files("austen")))
    if not 1 <= r.novels <= len(novels):
        raise ValueError(f"novels={r.novels}: the corpus holds {len(novels)}; use 1 to {len(novels)}")
    return novels[:r.novels]


def prepare_data(r: Recipe, out: Path, novels: list[str]) -> tuple[Tokenizer, Path, Path]:
    """Tokenizer trained on the novels, and a jsonl of corpus windows and passkey prompts with their answers."""
    from cream_jax import tasks
    from cream_jax.data import tokenizer as tok_lib

    data = out / "data"
    model = data / "tokenizer" / "tokenizer.model"
    if not model.exists():  # on the novels and the passkey template, so that its words are single pieces
        data.mkdir(parents=True, exist_ok=True)
        corpus = data / "novels.jsonl"
        corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in novels))
        template = data / "passkey_template.txt"
        rng = np.random.default_rng(r.seed)
        template.write_text("\n".join(tasks.passkey_text(1, 1, k, PASSKEY_STYLE) + f" {k}."
                                      for k in rng.integers(*KEY_RANGE, 2000)))
        tok_lib.train([corpus, template], r.vocab_size, model.parent)
    tok = tok_lib.Tokenizer(model)
    corpus_tokens = sum(len(x) for x in tok.encode(novels, bos=False, eos=False))
    corpus_rows = corpus_tokens // r.window
    n_passkey = int(corpus_rows * r.passkey_fraction / (1 - r.passkey_fraction))
    rng = np.random.default_rng(r.seed)
    shortest = next(n for n in range(8, r.window) if _fits(tok, n))
    if shortest > r.window - 16:
        raise ValueError(f"window={r.window} is too short for passkey prompts ({shortest} tokens without filler); "
                         f"use --window {shortest + 16} or more")
    docs = []
    for _ in range(n_passkey):  # prompt + answer fit the window: the question is always in the same row
        ex = tasks.passkey(tok, int(rng.integers(shortest, r.window - 8)), float(rng.random()), rng,
                           key_range=KEY_RANGE, style=PASSKEY_STYLE)
        docs.append(ex.text + f" {ex.answer}.")
    path = data / "train.jsonl"
    with path.open("w") as f:
        for text in novels + docs:
            f.write(json.dumps({"text": text}) + "\n")
    log(f"data: {len(novels)} novels ({corpus_tokens / 1e6:.2f}M tokens, {corpus_rows} windows of {r.window}) "
        f"+ {n_passkey} passkey prompts of {shortest}-{r.window - 8} tokens; tokenizer {model} "
        f"({tok.vocab_size} pieces)")
    return tok, model, path


def _fits(tok, length: int) -> bool:
    from cream_jax import tasks

    try:
        tasks.passkey(tok, length, 0.0, np.random.default_rng(0), key_range=KEY_RANGE, style=PASSKEY_STYLE)
        return True
    except tasks.TaskError:
        return False


# ----------------------------------------------------------------------------- training


def train_config(r: Recipe, tokenizer: Path, data: Path, *, method: str,
                 init_from: str = "") -> ml_collections.ConfigDict:
    from cream_jax.train_config import base

    c = base()
    c.seed = r.seed
    c.model.preset = "debug"
    c.model.update(vocab_size=r.vocab_size, hidden_size=r.hidden_size, intermediate_size=int(r.hidden_size * 8 / 3),
                   num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.kv_heads,
                   init_from=init_from)
    c.data.update(source="files", files=str(data), tokenizer=str(tokenizer), packing="document", prefetch=2)
    c.train.update(global_batch=r.batch, window=r.window, log_every=max(1, min(50, r.pretrain_steps // 4)),
                   warmup_steps=0)
    if method == "pretrain":
        c.positions.method = "plain"
        c.model.max_position_embeddings = r.window
        c.train.update(steps=r.pretrain_steps, lr=r.pretrain_lr, target_length=r.window,
                       warmup_steps=min(50, r.pretrain_steps // 10), weight_decay=r.pretrain_weight_decay)
    else:
        c.positions.method = method
        c.model.max_position_embeddings = r.target
        c.model.rope = extended_rope(r)
        c.train.update(steps=r.finetune_steps, lr=r.finetune_lr, target_length=r.target,
                       warmup_steps=min(20, r.finetune_steps // 10))
    return c


def pretrain(r: Recipe, tok: Tokenizer, tok_path: Path, data: Path, out: Path) -> dict:
    """Pretrain at N and check passkey retrieval within N (on prompts the final evaluation does not use); below
    `pretrain_target`, one more cosine cycle from those weights. Returns the run info and its HF export."""
    info = train("pretrain", train_config(r, tok_path, data, method="pretrain"), out)
    info.update(steps=r.pretrain_steps, passkey_within_window=_within_window(r, tok, info["run"]))
    export = out / "runs" / "pretrain_hf"
    if not export.exists():
        _export(info["run"], export)
    if info["passkey_within_window"] >= r.pretrain_target:
        return {**info, "hf": str(export)}
    log(f"pretrain: below {r.pretrain_target:.2f}; {r.anneal_steps} more steps from a fresh cosine schedule")
    c = train_config(r, tok_path, data, method="pretrain", init_from=str(export))
    c.train.update(steps=r.anneal_steps, lr=r.anneal_lr, warmup_steps=min(20, r.anneal_steps // 10))
    more = train("pretrain_anneal", c, out)
    more.update(steps=r.pretrain_steps + r.anneal_steps, passkey_within_window=_within_window(r, tok, more["run"]),
                seconds=info["seconds"] + more["seconds"])
    if more["passkey_within_window"] < r.pretrain_target:
        log(f"pretrain: still below {r.pretrain_target:.2f}; the extension below starts from a model that has "
            f"not fully learned the task (try --pretrain_steps {r.pretrain_steps + 1000} or another --seed)")
    export = out / "runs" / "pretrain_anneal_hf"
    if not export.exists():
        _export(more["run"], export)
    return {**more, "hf": str(export)}


def _export(run: str, out: Path) -> None:
    """A train run's newest checkpoint as an HF directory (what later runs start from)."""
    from cream_jax import convert

    module, label, written = convert.export_hf(run, out, progress=False)
    log(f"exported {label} to {written} ({module.config.num_params() / 1e6:.1f}M parameters)")


def _within_window(r: Recipe, tok, run: str) -> float:
    from flax import nnx

    from cream_jax import checkpoint

    module, step = checkpoint.load_train_params(run)
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    accuracy = float(np.mean([s["accuracy"] for s in passkey_eval(module.config, params, tok, [r.window], 4,
                                                                   seed=r.seed + 3000)]))
    log(f"pretrain: passkey accuracy within N = {r.window} after {step} steps: {accuracy:.2f}")
    return accuracy


def extended_rope(r: Recipe) -> dict:
    rope = {"type": r.rope, "factor": float(r.factor)}
    if r.rope == "yarn":
        rope["original_max_position_embeddings"] = r.window
    return rope


def train(name: str, c: ml_collections.ConfigDict, out: Path) -> dict:
    from cream_jax import train as train_lib

    workdir = out / "runs" / name
    t0 = time.perf_counter()
    history = train_lib.run(c, workdir)
    seconds = time.perf_counter() - t0
    if not history:  # the run was already complete in workdir
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        history = [json.loads(lines[-1])] if lines else []
    loss = history[-1]["loss"] if history else float("nan")
    log(f"{name}: {c.train.steps} steps in {seconds:.0f} s, final loss {loss:.3f}")
    return {"run": str(workdir), "seconds": seconds, "final_loss": loss}


# ----------------------------------------------------------------------------- evaluation


def passkey_eval(cfg: LlamaConfig, params: dict, tok: Tokenizer, lengths: Sequence[int], samples: int,
                 seed: int) -> list[dict]:
    from cream_jax import evaluate

    examples = evaluate.make_examples("passkey", tok, lengths=lengths, depths=DEPTHS, samples=samples, seed=seed,
                                      key_range=KEY_RANGE, style=PASSKEY_STYLE)
    rows = evaluate.run_generation(cfg, params, tok, examples, batch=40, chunk=max(lengths), progress=False)
    return evaluate.summarize("passkey", rows)


def by_length(summary: list[dict]) -> dict[int, float]:
    out: dict[int, list] = {}
    for s in summary:
        out.setdefault(s["length"], []).append(s["accuracy"])
    return {k: float(np.mean(v)) for k, v in sorted(out.items())}


def table(results: dict, lengths: Sequence[int], window: int) -> str:
    header = ["model"] + [f"{n}{' (N)' if n == window else ''}" for n in lengths] + ["mean beyond N"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, res in results.items():
        acc = res["accuracy_by_length"]
        beyond = np.mean([acc[n] for n in lengths if n > window])
        lines.append("| " + " | ".join([name] + [f"{acc[n]:.2f}" for n in lengths] + [f"**{beyond:.2f}**"]) + " |")
    return "\n".join(lines)


def heatmap(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cream_jax import evaluate

    fig, axes = plt.subplots(1, len(results), figsize=(3.1 * len(results) + 0.8, 3.4), sharey=True,
                             constrained_layout=True)
    for i, (ax, (name, res)) in enumerate(zip(np.atleast_1d(axes), results.items())):
        im = evaluate.passkey_heatmap(ax, res["summary"], fontsize=7)
        ax.set_title(name, fontsize=9)
        if i:
            ax.set_ylabel("")
    fig.colorbar(im, ax=axes, label="passkey accuracy", shrink=0.9)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- export


def export_and_answer(run: Path, tokenizer: Path, out: Path, length: int, seed: int) -> dict:
    """Export a run to HF format, then answer one passkey prompt of `length` tokens with transformers from the
    export and with cream-jax from the checkpoint (the two answers must be the same)."""
    import torch
    import transformers

    from flax import nnx

    from cream_jax import checkpoint, evaluate, hf, tasks
    from cream_jax.data import tokenizer as tok_lib

    module, _ = checkpoint.load_train_params(run)
    hf.save_hf(module, out, tokenizer=tokenizer, progress=False)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = tok_lib.Tokenizer(tokenizer)
    ex = tasks.passkey(tok, length, 0.5, np.random.default_rng(seed), key_range=KEY_RANGE, style=PASSKEY_STYLE)
    ids = hf_tok(ex.text, return_tensors="pt").input_ids  # transformers' tokenizer on the prompt's text
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=tasks.answer_tokens("passkey"), do_sample=False)[0, ids.shape[1]:]
    answer = hf_tok.decode(new, skip_special_tokens=True)
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    ours = evaluate.run_generation(module.config, params, tok, [ex], batch=1, chunk=length,
                                   progress=False)[0]["output"]
    return {"export": str(out), "model_class": type(model).__name__, "prompt_tokens": int(ids.shape[1]),
            "prompt_ids_equal": ids[0].tolist() == ex.ids,  # transformers' tokenizer gives our prompt's ids
            "expected": ex.answer, "answer": answer.strip(), "correct": tasks.score("passkey", answer, ex.answer),
            "cream_jax_answer": ours.strip()}


# ----------------------------------------------------------------------------- the job


def another_recipe(saved: dict, r: Recipe) -> bool:
    """Whether a results folder's recipe.json is not `r`; a field added since it was written ran there as
    the field's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    return {**defaults, **saved} != dataclasses.asdict(r)


def run(r: Recipe, out: Path, methods: Sequence[str] = METHODS) -> dict:
    import jax

    from flax import nnx

    from cream_jax import checkpoint

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    recipe, saved = out / "recipe.json", dataclasses.asdict(r)
    if recipe.exists() and another_recipe(json.loads(recipe.read_text()), r):
        raise ValueError(f"{out} holds the runs of another recipe ({recipe}); use another --out or remove it")
    novels = read_novels(r)  # checks the recipe against the corpus before the folder is marked as its own
    recipe.write_text(json.dumps(saved, indent=1) + "\n")  # re-running the same recipe reuses finished runs
    tok, tok_path, data = prepare_data(r, out, novels)
    timings = {"data": time.perf_counter() - t_start}

    runs = {"pretrain": pretrain(r, tok, tok_path, data, out)}
    for m in methods:
        runs[m] = train(m, train_config(r, tok_path, data, method=m, init_from=runs["pretrain"]["hf"]), out)
    timings["train"] = sum(v["seconds"] for v in runs.values())

    t0 = time.perf_counter()
    lengths = [r.window * k for k in range(1, r.factor + 1)]
    results = {}
    no_finetune = f"{r.rope}, no fine-tune"  # the interpolation alone, on the pretrained weights
    for name in ("unextended", no_finetune) + tuple(methods):
        run_info = runs.get(name, runs["pretrain"])
        module, _ = checkpoint.load_train_params(run_info["run"])
        cfg = module.config
        if name == no_finetune:
            cfg = cfg.replace(rope=extended_rope(r), max_position_embeddings=r.target)
        params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
        summary = passkey_eval(cfg, params, tok, lengths, r.eval_samples, seed=r.seed + 1000)
        results[name] = {"summary": summary, "accuracy_by_length": by_length(summary), "rope": cfg.rope.type,
                         "run": run_info}
        log(f"eval {name}: " + "  ".join(f"{n}: {a:.2f}" for n, a in results[name]["accuracy_by_length"].items()))
        del module, params
        jax.clear_caches()
    timings["eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    export = export_and_answer(Path(runs["cream" if "cream" in methods else methods[-1]]["run"]), tok_path,
                               out / "hf", r.target, seed=r.seed + 2000)
    timings["export"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    md = table(results, lengths, r.window)
    title = (f"passkey accuracy, {r.eval_samples} prompts per cell; N = {r.window}, L = {r.target}; "
             f"{r.finetune_steps} fine-tune steps at N")
    heatmap(results, out / "passkey.png", title)
    summary = {"recipe": dataclasses.asdict(r), "lengths": lengths, "depths": list(DEPTHS), "results": results,
               "export": export, "seconds": timings}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(
        f"# cream-jax demo: passkey retrieval after extending N = {r.window} to L = {r.target}\n\n"
        f"Tiny Llama ({r.layers} layers, hidden {r.hidden_size}), pretrained {runs['pretrain']['steps']} steps at N on "
        f"Jane Austen + passkey prompts, then fine-tuned {r.finetune_steps} steps at N with {r.rope} "
        f"interpolation x{r.factor} and each position method (plain, PoSE, CREAM); `{no_finetune}` is the "
        f"pretrained model with that interpolation and no training. Passkey accuracy over depths "
        f"{', '.join(f'{d:g}' for d in DEPTHS)}, {r.eval_samples} prompts each.\n\n{md}\n\n"
        f"![passkey heatmap](passkey.png)\n\n"
        f"transformers, from `hf/`, on a {export['prompt_tokens']}-token prompt: answered "
        f"{export['answer']!r} (expected {export['expected']}); cream-jax on the same prompt: "
        f"{export['cream_jax_answer']!r}.\n")
    log("\n" + md + "\n")
    same = export["cream_jax_answer"] == export["answer"]
    log(f"transformers ({export['model_class']}) from {export['export']}: {export['prompt_tokens']}-token passkey "
        f"prompt -> {export['answer']!r} (expected {export['expected']}, "
        f"{'correct' if export['correct'] else 'wrong'}); cream-jax on the same prompt -> "
        f"{export['cream_jax_answer']!r} ({'the same' if same else 'DIFFERENT'})")
    log(f"results in {out}/ (README.md, results.json, passkey.png, hf/); {timings['total'] / 60:.1f} min")
    return summary


def beyond_window(result: dict, window: int) -> float:
    """Mean passkey accuracy over the lengths beyond N."""
    return float(np.mean([a for n, a in result["accuracy_by_length"].items() if int(n) > window]))


def seeds_benchmark(r: Recipe, seeds: list[int], out: Path, doc: Path | None) -> dict:
    """The whole job once per seed (pretraining init, data, position draws and eval prompts all change);
    a table of the mean accuracy beyond N per seed and model."""
    rows = []
    for seed in seeds:
        log(f"\n===== seed {seed} =====")
        res = run(dataclasses.replace(r, seed=seed), out / f"seed{seed}")
        pretrained = res["results"]["unextended"]["run"]
        rows.append({"seed": seed, "pretrain_within_window": pretrained["passkey_within_window"],
                     **{name: beyond_window(m, r.window) for name, m in res["results"].items()},
                     "minutes": res["seconds"]["total"] / 60})
    names = [k for k in rows[0] if k not in ("seed", "pretrain_within_window", "minutes")]  # the models
    md = "\n".join(["| seed | pretrained, within N | " + " | ".join(names) + " | CREAM - unextended | minutes |",
                    "|---" * (len(names) + 4) + "|"]
                   + [f"| {x['seed']} | {x['pretrain_within_window']:.2f} | " + " | ".join(f"{x[n]:.2f}" for n in names)
                      + f" | {x['cream'] - x['unextended']:+.2f} | {x['minutes']:.1f} |" for x in rows])
    summary = {"recipe": {**dataclasses.asdict(r), "seed": seeds}, "mean_accuracy_beyond_window": rows}
    log("\nmean passkey accuracy beyond N, per seed:\n" + md)
    if doc is not None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        doc.with_suffix(".md").write_text(
            f"# `make demo` on {len(seeds)} seeds\n\n`python -m cream_jax.demo --seeds "
            f"{','.join(map(str, seeds))}`: the whole demo (N = {r.window}, L = {r.target}) once per seed; mean "
            f"passkey accuracy over the lengths beyond N ({r.eval_samples} prompts per length and depth).\n\n"
            f"{md}\n\n`minutes` is this invocation's wall time per seed: a seed whose runs already existed in "
            f"`{out}/seed<k>` with the same recipe was only evaluated again.\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    from cream_jax.platform import use_local_backends

    use_local_backends()  # before jax starts its backends
    p = cli.ArgumentParser("cream_jax.demo", description=__doc__)
    p.add_argument("--out", default="results/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test)")
    p.add_argument("--seeds", default="", help="comma-separated seeds: run the whole demo once per seed into "
                   "OUT/seed<k> and write the per-seed table to --doc")
    p.add_argument("--doc", default="docs/demo_seeds", help="--seeds: the table's path, without .md/.json")
    for f in dataclasses.fields(Recipe):
        if f.name != "seed":
            p.add_argument(f"--{f.name}", type=type(f.default), default=None)
    a = p.parse_args(argv)
    overrides = {f.name: getattr(a, f.name) for f in dataclasses.fields(Recipe)
                 if f.name != "seed" and getattr(a, f.name) is not None}
    r = (Recipe.quick if a.quick else Recipe)(seed=a.seed, **overrides)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every restore at WARNING/INFO
    from cream_jax.errors import CreamError
    from cream_jax.files import output_dir

    try:
        output_dir(a.out)  # writable, before hours of training
        if a.seeds:
            seeds_benchmark(r, [int(x) for x in a.seeds.split(",")], Path(a.out), Path(a.doc) if a.doc else None)
        else:
            run(r, Path(a.out))
    except (CreamError, ValueError) as e:
        return cli.report(e)
    return 0


if __name__ == "__main__":
    from cream_jax.train import reuse_freed_memory

    reuse_freed_memory()  # a CPU job: faster steps (docs/bench.md); not in main(), which tests call
    sys.exit(main())
