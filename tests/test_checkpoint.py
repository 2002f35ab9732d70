"""Train checkpoints: exact resume after SIGKILLs (one during an async save), SIGTERM preemption, restore onto
another mesh, a corrupt newest step, and HF export of a train checkpoint that generates like transformers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cream_jax import checkpoint, generate, sharding
from cream_jax import optim
from cream_jax import state as state_lib
from cream_jax import train_config as tc
from helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
FLAGS = [f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.checkpoint.every=5",
         "--config.train.global_batch=32", "--config.train.warmup_steps=5"]


class Run:
    """The train CLI in a subprocess, its output in a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, workdir, *extra):
        env = cli_env(devices=1, optimized=True)  # 40 steps of 32 rows
        self.log = Path(str(workdir) + f".{time.time_ns()}.log")
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cream_jax.train", f"--config={ROOT / 'configs' / 'tiny_cream.py'}",
                 f"--workdir={workdir}", *FLAGS, *extra], env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def finish(self, timeout=600) -> str:
        self.proc.wait(timeout=timeout)
        assert self.proc.returncode == 0, self.output()[-3000:]
        return self.output()


def _launch(workdir, *extra) -> Run:
    return Run(workdir, *extra)


def _logged_steps(workdir) -> int:
    try:
        lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}, [r["step"] for r in rows]


def _params(workdir, step=None):
    module, _ = checkpoint.load_train_params(workdir, step)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _wait(run, until, timeout=300):
    start = time.time()
    while not until():
        if run.proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.proc.returncode}) first:\n{run.output()[-3000:]}")
        if time.time() - start > timeout:
            run.proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.002)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    _launch(workdir).finish()
    return workdir


@pytest.mark.slow
def test_resume_after_sigkills_is_bit_identical(straight, tmp_path):
    """40 steps straight vs 40 steps killed with SIGKILL three times (once while an async save is being
    written) and relaunched: identical losses at every step and bit-identical final parameters."""
    workdir = tmp_path / "killed"
    rng = np.random.default_rng(0)
    kills = []
    for kind in ("step", "during_save", "step"):
        proc = _launch(workdir)
        if kind == "during_save":
            ckpts = workdir / "checkpoints"
            _wait(proc, lambda: ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir()))
        else:
            target = _logged_steps(workdir) + int(rng.integers(3, 9))
            _wait(proc, lambda: _logged_steps(workdir) >= target)
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait()
        kills.append((kind, _logged_steps(workdir), sorted(p.name for p in (workdir / "checkpoints").iterdir())))
    print("\nkills (kind, last logged step, checkpoint dir entries):", *kills, sep="\n  ")
    assert any("tmp" in name for _, _, names in kills[1:2] for name in names)  # killed mid-save, left in place
    out = _launch(workdir).finish()
    assert "resumed from" in out
    assert list((workdir / "checkpoints_incomplete").glob("*.orbax-checkpoint-tmp*"))  # set aside, not deleted

    want, _ = _losses(straight)
    got, steps = _losses(workdir)
    assert steps == list(range(1, STEPS + 1))  # re-run steps replaced their lost-progress log lines
    assert got == want
    for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(_params(straight))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = _launch(tmp_path, "--config.train.steps=100000")
    _wait(proc, lambda: _logged_steps(tmp_path) >= 7)
    proc.proc.send_signal(signal.SIGTERM)
    out = proc.finish(timeout=300)
    assert "preempted (SIGTERM)" in out
    step, meta = checkpoint.read_meta(tmp_path)
    assert step == _logged_steps(tmp_path) >= 7 and meta["step"] == step


def test_restore_onto_another_mesh(tmp_path):
    c = tc.load_config(ROOT / "configs" / "tiny_cream.py")
    cfg = tc.model_config(c)
    tx, _ = optim.make_optimizer(c.train)
    meta = {"seed": 0, "model_config": cfg.to_dict()}
    mesh_a = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh_a):
        state, _ = state_lib.init_state(cfg, tx, mesh_a, seed=3)
    ckpt = checkpoint.TrainCheckpoints(tmp_path)
    ckpt.save(7, state, {"step": 7}, meta)
    ckpt.wait()
    mesh_b = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    with jax.set_mesh(mesh_b):
        target, shardings = state_lib.abstract_state(cfg, tx, mesh_b)
        step, restored, data_state, saved_meta = ckpt.restore_latest(target)
    ckpt.close()
    assert (step, data_state, saved_meta["step"]) == (7, {"step": 7}, 7)
    for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == s
    assert {dict(a.sharding.mesh.shape)["fsdp"] for a in jax.tree.leaves(restored)} == {8}
    assert {dict(b.sharding.mesh.shape)["fsdp"] for b in jax.tree.leaves(state)} == {2}


@pytest.mark.slow
def test_corrupt_latest_step_falls_back_and_deletes_nothing(straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    latest, previous = steps[-1], steps[-2]
    for f in (workdir / "checkpoints" / str(latest) / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower():
            f.write_bytes(b"\0" * 16)  # truncate the array data
    files_before = sorted(str(p.relative_to(workdir / "checkpoints" / str(latest)))
                          for p in (workdir / "checkpoints" / str(latest)).rglob("*"))
    out = _launch(workdir, f"--config.train.steps={STEPS + 2}").finish()
    assert f"step {latest} in" in out and "cannot be restored" in out and f"{latest}.corrupt" in out
    assert f"resumed from {workdir / 'checkpoints'} at step {previous}" in out
    kept = workdir / "checkpoints" / f"{latest}.corrupt"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == files_before  # nothing deleted


@pytest.mark.torch
@pytest.mark.slow
def test_export_of_a_train_checkpoint_generates_like_transformers(straight, tmp_path, torch_and_transformers):
    torch, transformers = torch_and_transformers
    out = tmp_path / "hf"
    run = subprocess.run([sys.executable, "-m", "cream_jax.convert", "orbax-to-hf", f"--ckpt={straight}",
                          f"--out={out}"], env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    # the run's own tokenizer ships with it (tiny_cream's data.tokenizer, a registry name): AutoTokenizer loads
    # the export as it is and encodes as the run's tokenizer does
    from cream_jax.data import tokenizer as tok_lib

    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text).input_ids == [hf_tok.bos_token_id, *tok_lib.resolve("botchan-bpe-1000").sp.EncodeAsIds(text)]
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0} and hf_cfg["max_position_embeddings"] == 512

    module, _ = checkpoint.load_train_params(straight)
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    prompt = [1, 45, 300, 12, 87, 9, 501, 33]
    tokens = generate.generate(module.config, params, np.asarray([prompt], np.int32), 32)[0].tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert generated[0].tolist() == tokens


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_hosts_at_the_same_step(tmp_path):
    """Two processes (jax.distributed on localhost): SIGTERM to one; jax's preemption sync point makes both
    stop after the same step, save one checkpoint together and exit 0."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = cli_env(devices=4)
    procs, logs = [], []
    for i in range(2):
        logs.append(open(tmp_path / f"p{i}.log", "w"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cream_jax.train", f"--config={ROOT / 'configs' / 'tiny_cream.py'}",
             f"--workdir={tmp_path / 'run'}", "--config.train.steps=100000", "--config.train.log_every=1",
             "--config.train.warmup_steps=1", "--config.data.source=synthetic_markov", "--config.model.vocab_size=128",
             "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
            env=env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT))
    start = time.time()
    while _logged_steps(tmp_path / "run") < 4:
        assert all(p.poll() is None for p in procs) and time.time() - start < 300, (tmp_path / "p0.log").read_text()
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    outputs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], outputs
    step, _ = checkpoint.read_meta(tmp_path / "run")
    assert step == _logged_steps(tmp_path / "run") >= 4
    assert json.loads((tmp_path / "run" / "status.json").read_text()) == {"state": "preempted", "step": step}
    assert all(f"Reached preemption sync point, step={step}" in out for out in outputs)
