"""Evaluation: task generators at exact token lengths with the real 32000-piece tokenizer, their scorers, and
the CLI end to end (tables, JSON, PNG plots) for every task."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cream_jax import tasks
from cream_jax.data import tokenizer as tok_lib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_tok():
    return tok_lib.resolve("llama2-32k")


@pytest.mark.parametrize("length", [1024, 4096])
def test_passkey_prompts(llama_tok, length):
    rng = np.random.default_rng(0)
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ex = tasks.passkey(llama_tok, length, depth, rng)
        assert len(ex.ids) == length
        text = llama_tok.decode(ex.ids)
        assert text.count(f"The pass key is {ex.answer}.") == 1 and text.count(ex.answer) == 2
        assert text.endswith("What is the pass key? The pass key is")
        filler = length - 32 - ex.meta["needle_tokens"] - 14  # intro, needle and question around the filler
        where = (ex.meta["needle_start"] - 32) / filler
        assert abs(where - depth) < 0.03, (depth, where)  # at the sentence boundary nearest the depth


@pytest.mark.parametrize("length", [1024, 4096])
def test_lines_prompts(llama_tok, length):
    ex = tasks.lines(llama_tok, length, np.random.default_rng(1))
    assert len(ex.ids) == length
    text = llama_tok.decode(ex.ids)
    names = re.findall(r"line (\w+-\w+): REGISTER_CONTENT is <(\d+)>", text)
    asked = re.search(r"in line (\w+-\w+) is$", text).group(1)
    assert len(names) == ex.meta["lines"] and [n for n, _ in names].count(asked) == 1
    assert names[ex.meta["index"]] == (asked, ex.answer)
    assert text.count(f"<{ex.answer}>") == 1


@pytest.mark.parametrize("length", [1024, 4096])
def test_kv_prompts(llama_tok, length):
    rng = np.random.default_rng(2)
    for position in (0.0, 0.25, 0.5, 0.75, 1.0):
        ex = tasks.kv(llama_tok, length, position, rng)
        assert len(ex.ids) == length
        text = llama_tok.decode(ex.ids)
        pairs = re.findall(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"', text)
        k = ex.meta["keys"]
        assert len(pairs) == k and ex.meta["index"] == round(position * (k - 1))
        key, value = pairs[ex.meta["index"]]
        assert value == ex.answer and text.count(value) == 1 and text.count(key) == 2
        assert text.endswith(f'Key: "{key}"\nCorresponding value: "')


def test_scorers():
    assert tasks.score("passkey", " 58213. Remember", "58213")
    assert not tasks.score("passkey", " 5821 3", "58213") and not tasks.score("passkey", " no idea", "58213")
    assert tasks.score("lines", " <4419>.", "4419") and not tasks.score("lines", " 44190", "4419")
    v = "b9bc9b21-dd84-4c78-b86a-b94efb7f493f"
    assert tasks.score("kv", v + '"}', v) and not tasks.score("kv", v[:-1] + '0"', v)
    with pytest.raises(tasks.TaskError, match="unknown task"):
        tasks.score("qa", "x", "x")
    with pytest.raises(tasks.TaskError, match="too short for a passkey prompt"):
        tasks.passkey(tok_lib.resolve("botchan-bpe-1000"), 40, 0.5, np.random.default_rng(0))


def test_evaluate_cli_every_task(tmp_path):
    """A tiny random model saved in HF format with the 1000-piece tokenizer: every task runs, prints its
    table and writes JSON and a PNG that renders."""
    import matplotlib.image

    from cream_jax import hf
    from cream_jax import model as model_lib
    from cream_jax.config import preset

    tok_file = tok_lib.resolve("botchan-bpe-1000").path
    cfg = preset("debug", vocab_size=1000, max_position_embeddings=512, rope={"type": "linear", "factor": 2.0})
    hf.save_hf(model_lib.init(cfg, seed=0), tmp_path / "hf", tokenizer=tok_file, progress=False)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs = {"passkey": ["--lengths=128,256", "--depths=0,0.5,1", "--samples=2", "--batch=3"],
            "kv": ["--lengths=512", "--positions=0,1", "--samples=2"],
            "lines": ["--lengths=1024,2048", "--samples=2"],
            "ppl": ["--lengths=64,128", "--windows=2", "--corpus=botchan", "--chunk=48"]}
    for task, extra in runs.items():
        run = subprocess.run([sys.executable, "-m", "cream_jax.evaluate", f"--hf={tmp_path / 'hf'}", f"--task={task}",
                              f"--out={tmp_path / 'out'}", *extra], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.startswith("| length |")
        result = json.loads((tmp_path / "out" / f"{task}.json").read_text())
        assert result["summary"], task
        image = matplotlib.image.imread(tmp_path / "out" / f"{task}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0
    passkey = json.loads((tmp_path / "out" / "passkey.json").read_text())
    assert len(passkey["rows"]) == 2 * 3 * 2 and {r["tokens"] for r in passkey["rows"]} == {128, 256}
    ppl = json.loads((tmp_path / "out" / "ppl.json").read_text())["summary"]
    assert [r["length"] for r in ppl] == [64, 128] and all(r["ppl"] > 1 for r in ppl)
