"""Evaluation: the CLI end to end (tables, JSON, PNG plots) for every task, RULER on tiny_cream's checkpoint,
perplexity as CREAM's eval_ppl computes it, and bad input rejected before the model loads. The task
generators and scorers are tested in test_tasks.py and test_ruler.py."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cream_jax import evaluate
from cream_jax.data import tokenizer as tok_lib
from helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random model in HF format with the 1000-piece tokenizer: (config, params, tokenizer, directory)."""
    from flax import nnx

    from cream_jax import hf
    from cream_jax import model as model_lib
    from cream_jax.config import preset

    path = tmp_path_factory.mktemp("hf")
    tok = tok_lib.resolve("botchan-bpe-1000")
    cfg = preset("debug", vocab_size=1000, max_position_embeddings=512, rope={"type": "linear", "factor": 2.0})
    module = model_lib.init(cfg, seed=0)
    hf.save_hf(module, path, tokenizer=tok.path, progress=False)
    return cfg, nnx.to_pure_dict(nnx.state(module, nnx.Param)), tok, path


def _image_renders(path: Path) -> bool:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image.ndim == 3 and image.shape[0] > 200 and image.std() > 0


@pytest.mark.torch
@pytest.mark.slow
def test_evaluate_cli_every_task(tiny_hf, tmp_path, capsys):
    """Every task runs through the CLI, prints its table on the task's grid axes, and writes JSON (with each
    prompt's true token count) and a PNG that renders."""
    hf_dir, out = tiny_hf[3], tmp_path / "out"
    runs = {"passkey": (["--lengths=128,256", "--depths=0,0.5,1", "--samples=2", "--batch=3"], "| length | tokens |"),
            "kv": (["--keys=3", "--lengths=400", "--samples=1"], "| keys | tokens | gold index |"),
            "lines": (["--lines=4", "--lengths=700", "--samples=2", "--chat=vicuna"], "| lines | tokens |"),
            "ppl": (["--lengths=64,128", "--corpus=botchan", "--chunk=48"], "| length | sequences |")}
    for task, (extra, header) in runs.items():
        assert evaluate.main([f"--hf={hf_dir}", f"--task={task}", f"--out={out}", *extra]) == 0, task
        assert capsys.readouterr().out.startswith(header), task
        result = json.loads((out / f"{task}.json").read_text())
        assert result["summary"], task
        assert _image_renders(out / f"{task}.png"), task
    passkey = json.loads((out / "passkey.json").read_text())["rows"]
    assert len(passkey) == 2 * 3 * 2
    assert all(r["length"] - 40 < r["tokens"] <= r["length"] for r in passkey)  # short by less than a filler
    kv = json.loads((out / "kv.json").read_text())["summary"]
    assert {r["keys"] for r in kv} == {3, evaluate.tasks.kv_keys_for_length(tiny_hf[2], 400)}
    assert all(r["tokens"] <= 400 for r in kv if r["keys"] != 3)
    lines = json.loads((out / "lines.json").read_text())
    assert lines["chat"] == "vicuna" and all(r["chat"] == "vicuna" for r in lines["rows"])
    assert (out / "ppl.md").read_text().splitlines()[0].endswith(", on botchan (documents)")  # says its text
    ppl = json.loads((out / "ppl.json").read_text())["summary"]
    assert [r["length"] for r in ppl] == [64, 128] and all(r["ppl"] > 1 and r["mode"] == "documents" for r in ppl)


@pytest.mark.parametrize("argv, message", [
    (["--task=kv"], "--task=kv needs --keys or --lengths"),
    (["--task=passkey", "--lengths=4k"], "--lengths='4k' must be comma-separated integers"),
    (["--task=lines", "--lines=10", "--chat=alpaca"], "unknown chat template 'alpaca'"),
    (["--task=ruler", "--lengths=512", "--ruler_tasks=niah_single_9"], "unknown RULER task"),
    (["--task=ppl", "--lengths=512", "--corpus=no_such_corpus.txt"], "does not exist"),
])
def test_bad_input_fails_before_the_model_loads(argv, message, tmp_path, capsys):
    assert evaluate.main([f"--hf={tmp_path / 'no_model_here'}", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_ruler_on_tiny_cream_checkpoint(tmp_path, capsys):
    """`evaluate --task ruler` end to end on a tiny_cream train run (2 steps): every RULER task is built,
    answered and scored; the table has a row per task and their average, one column per length."""
    from cream_jax import ruler

    env = cli_env(devices=1)
    run = subprocess.run([sys.executable, "-m", "cream_jax.train", f"--config={ROOT / 'configs' / 'tiny_cream.py'}",
                          f"--workdir={tmp_path / 'run'}", "--config.train.steps=2", "--config.train.warmup_steps=1",
                          "--config.train.log_every=1"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    assert evaluate.main([f"--ckpt={tmp_path / 'run'}", "--task=ruler", "--lengths=2048", "--samples=1",
                          "--batch=11", f"--out={out}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| task | 2048 |" and printed[-1].startswith("| **average** |")
    assert [row.split(" | ")[0][2:] for row in printed[2:-1]] == list(ruler.TASKS)
    rows = json.loads((out / "ruler.json").read_text())["rows"]
    assert sorted(r["subtask"] for r in rows) == sorted(ruler.TASKS)
    assert all(0 <= r["score"] <= 1 and r["tokens"] <= 2048 for r in rows)
    assert _image_renders(out / "ruler.png")
    # the run's checkpoint restored straight into shards on a mesh holds the same weights
    from cream_jax import load as load_lib
    from cream_jax import sharding

    whole, _ = load_lib.load_model(tmp_path / "run", progress=False)
    sharded, _ = load_lib.load_model(tmp_path / "run", progress=False,
                                     mesh=sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4]))
    k_proj = sharded.model.layers.self_attn.k_proj.weight.value
    assert k_proj.sharding.spec[1:3] == ("fsdp", "tensor")  # [layers, embed, kv heads, head_dim]
    np.testing.assert_array_equal(np.asarray(k_proj), np.asarray(whole.model.layers.self_attn.k_proj.weight.value))


@pytest.mark.torch
@pytest.mark.slow
def test_perplexity_as_cream_eval_ppl(tiny_hf):
    """Documents mode: documents shorter than the longest length - 1 tokens are dropped, and for each T every
    kept document is BOS + its first T - 1 tokens, scored by one full forward pass (the reference's
    transformers loss); the perplexity is exp of the mean NLL over documents and positions."""
    from cream_jax import model as model_lib

    cfg, params, tok, _ = tiny_hf
    from cream_jax.data import sources

    text = next(sources.read_documents(sources.resolve_files("botchan")))
    docs = [text[:200], text[1000:6000], text[6000:12000], text[12000:13000]]
    sizes = [len(x) for x in tok.encode(docs, bos=False, eos=False)]
    assert sizes[0] < 127 <= min(sizes[1:3])  # the first document is too short for T = 128
    result = evaluate.perplexity(cfg, params, tok, docs, [64, 128], mode="documents", count=2, chunk=40,
                                 progress=False)
    kept = [d for d, n in zip(tok.encode(docs, bos=False, eos=False), sizes) if n >= 127][:2]
    for row, T in zip(result, (64, 128)):
        nll = []
        for doc in kept:
            ids = np.asarray([tok.bos_id] + doc[:T - 1], np.int32)
            logits = model_lib.forward(cfg, params, jnp.asarray(ids[None]))[0]
            logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
            nll.append(-logp[np.arange(T - 1), ids[1:]])
        assert row["sequences"] == 2
        assert row["ppl"] == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-5)
    with pytest.raises(evaluate.tasks.TaskError, match="no document has the 4095 tokens"):
        evaluate.perplexity(cfg, params, tok, docs, [4096], progress=False)
