"""Evaluation: the CLI end to end (tables, JSON, PNG plots) for every task. The task generators and scorers
are tested in test_tasks.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

from cream_jax.data import tokenizer as tok_lib

ROOT = Path(__file__).resolve().parents[1]


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
