"""Evaluation on a mesh and across processes gives one device's answers and perplexities; runs survive
SIGKILL (a rerun finishes with the uninterrupted run's table) and refuse another evaluation's --out."""

import contextlib
import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cream_jax import evaluate, sharding
from cream_jax import load as load_lib
from cream_jax.data import tokenizer as tok_lib
from helpers import cli_env
from test_train import _free_port

MESHES = [{"data": 1, "fsdp": 1, "tensor": 8}, {"data": 2, "fsdp": 1, "tensor": 4}, {"data": 1, "fsdp": 8, "tensor": 1}]
EABF = {"rope": {"theta": 500000.0}, "eabf": {"enabled": True, "base_length": 64, "skip_layers": (0,)}}
MODELS = {"mha": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=8),
          "gqa": dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=8)}


def _export(path, **overrides):
    from cream_jax import hf
    from cream_jax import model as model_lib
    from cream_jax.config import preset

    tok = tok_lib.resolve("botchan-bpe-1000")
    cfg = preset("debug", vocab_size=1000, max_position_embeddings=2048, intermediate_size=128, **EABF, **overrides)
    hf.save_hf(model_lib.init(cfg, seed=0), path, tokenizer=tok.path, progress=False)
    return tok


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return _export(path, **MODELS[request.param]), path


def _evaluate(path, tok, mesh_sizes):
    from flax import nnx

    mesh = None if mesh_sizes is None else sharding.make_mesh(mesh_sizes)
    module, _ = load_lib.load_model(path, progress=False, mesh=mesh)
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    cfg = module.config
    examples = evaluate.make_examples("passkey", tok, lengths=[400], depths=[0.0, 0.5, 1.0], samples=2)
    sequences = [(256, np.random.default_rng(i).integers(3, 1000, 256).astype(np.int32)) for i in range(3)]
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        answers = evaluate.run_generation(cfg, params, tok, examples, batch=6, chunk=512, progress=False)
        ppl = evaluate.perplexity_rows(cfg, params, sequences, batch=3, chunk=256, progress=False)
    if mesh is not None and mesh.shape["tensor"] > 1:  # the weights really are in shards
        assert "tensor" in str(params["model"]["layers"]["self_attn"]["k_proj"]["weight"].sharding.spec)
    return [r["output"] for r in answers], evaluate.ppl_summary(ppl)


@pytest.mark.slow
def test_meshes_give_one_devices_answers_and_perplexities(exported, tmp_path):
    """From the HF directory and from a params checkpoint of it, loaded straight into shards."""
    from cream_jax import checkpoint

    tok, path = exported
    answers, ppl = _evaluate(path, tok, None)
    params_checkpoint = checkpoint.save_params(load_lib.load_model(path, progress=False)[0], tmp_path / "params")
    for sizes, source in zip(MESHES, [path, params_checkpoint, path]):
        got_answers, got_ppl = _evaluate(source, tok, sizes)
        assert got_answers == answers, sizes
        for a, b in zip(got_ppl, ppl):
            np.testing.assert_allclose(a["bucket_ppl"], b["bucket_ppl"], rtol=1e-5)
            assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)


TASK_ARGS = {"ppl": ["--lengths=192", "--ppl_mode=sliding", "--windows=4"],
             "passkey": ["--lengths=200,400", "--depths=0,1", "--samples=3"]}


def _cli(out, path, *extra, devices=8, task="ppl", task_args=None):
    args = [f"--hf={path}", f"--task={task}", f"--out={out}", "--batch=2", "--chunk=64",
            "--mesh=data=2,fsdp=1,tensor=4"]
    args += TASK_ARGS[task] if task_args is None else task_args
    return subprocess.Popen([sys.executable, "-m", "cream_jax.evaluate", *args, *extra], env=cli_env(devices=devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_give_one_process_tables(tmp_path):
    """Generation (passkey) and perplexity, 4 devices in each of two processes against 8 in one."""
    _export(tmp_path / "model", **MODELS["gqa"])
    runs = {"passkey": ["--lengths=200", "--depths=0,1", "--samples=1"], "ppl": TASK_ARGS["ppl"]}
    for task, task_args in runs.items():
        single = _cli(tmp_path / "single", tmp_path / "model", task=task, task_args=task_args)
        assert single.wait(timeout=300) == 0, single.stdout.read()[-3000:]
        port = _free_port()
        procs = [_cli(tmp_path / "multi", tmp_path / "model", f"--coordinator_address=localhost:{port}",
                      "--num_processes=2", f"--process_id={i}", devices=4, task=task, task_args=task_args)
                 for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
        a = json.loads((tmp_path / "single" / f"{task}.json").read_text())
        b = json.loads((tmp_path / "multi" / f"{task}.json").read_text())
        if task == "ppl":
            assert [x["ppl"] for x in a["summary"]] == pytest.approx([x["ppl"] for x in b["summary"]], rel=1e-5)
        else:
            assert [r["output"] for r in a["rows"]] == [r["output"] for r in b["rows"]]
        assert "wrote" in outs[0] and "wrote" not in outs[1]  # process 0 alone writes the results


def _wait_for_rows(path, count, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().count("\n") >= count) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_and_stopped_runs_resume_to_the_uninterrupted_table(tmp_path):
    """SIGKILL mid-run, then SIGTERM mid-run (stops after its batch, exit 0), then a rerun that finishes: the
    same rows and table as one uninterrupted run, no example run twice; other arguments are refused."""
    _export(tmp_path / "model", **MODELS["mha"])
    whole = _cli(tmp_path / "whole", tmp_path / "model", task="passkey")
    assert whole.wait(timeout=300) == 0, whole.stdout.read()[-3000:]
    rows = tmp_path / "resumed" / "passkey.jsonl"
    killed = _cli(tmp_path / "resumed", tmp_path / "model", task="passkey")
    _wait_for_rows(rows, 2, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    after_kill = rows.read_text().count("\n")
    stopped = _cli(tmp_path / "resumed", tmp_path / "model", task="passkey")
    _wait_for_rows(rows, after_kill + 2, stopped)
    stopped.send_signal(signal.SIGTERM)
    out = stopped.communicate(timeout=300)[0]
    after_stop = rows.read_text().count("\n")
    assert stopped.returncode == 0 and "stopped (SIGTERM)" in out, out[-3000:]
    assert 2 <= after_kill < after_stop < 12, (after_kill, after_stop)
    assert not (tmp_path / "resumed" / "passkey.json").exists()  # no table from part of the examples
    rerun = _cli(tmp_path / "resumed", tmp_path / "model", task="passkey")
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out[-3000:]
    assert rows.read_text().count("\n") == 12  # the finished examples were not run again
    assert ((tmp_path / "resumed" / "passkey.md").read_text().splitlines()[1:]
            == (tmp_path / "whole" / "passkey.md").read_text().splitlines()[1:])
    a = json.loads((tmp_path / "whole" / "passkey.json").read_text())["rows"]
    b = json.loads((tmp_path / "resumed" / "passkey.json").read_text())["rows"]
    assert a == b
    other = _cli(tmp_path / "resumed", tmp_path / "model", "--seed=1", task="passkey")
    out = other.communicate(timeout=300)[0]
    assert other.returncode == 2 and "holds 12 results of another evaluation (--seed=0 there, 1 here)" in out, out
