"""The train step: recipes, sharded equivalence, gradient accumulation, learning, bad configs, the CLI."""

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cream_jax import sharding, train
from cream_jax import flops, load, optim
from cream_jax import state as state_lib
from cream_jax import step as step_lib
from cream_jax.model import Llama
from cream_jax import train_config as tc
from cream_jax.data.synthetic import MarkovSource
from helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.py"))


SYNTHETIC = {"data.source": "synthetic_markov", "model.vocab_size": 128}


def tiny(**train_overrides):
    """tiny_cream on the synthetic Markov source (no corpus to fetch; known entropies)."""
    c = tc.load_config(ROOT / "configs" / "tiny_cream.py")
    for field, value in SYNTHETIC.items():
        section, name = field.split(".")
        c[section][name] = value
    c.train.update(train_overrides)
    return c


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(recipe):
    c = tc.load_config(recipe)
    cfg = tc.validate(c, num_devices=8)
    mesh = sharding.make_mesh(dict(c.mesh))
    tx, _ = optim.make_optimizer(c.train)
    shapes, specs = state_lib.state_specs(cfg, tx, mesh)  # divisibility and no large replicated parameter
    assert jax.tree.structure(shapes["opt_state"]) == jax.tree.structure(
        specs["opt_state"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def test_recipes_match_the_papers():
    c = tc.load_config(ROOT / "configs" / "llama2_7b_cream_32k.py")
    assert (c.model.rope.type, c.model.rope.factor, c.train.window, c.train.target_length) == ("linear", 8.0, 4096,
                                                                                             32768)
    assert (c.train.steps, c.train.global_batch, c.train.lr, c.train.warmup_steps, c.train.clip) == (
        1000, 32, 2e-5, 10, 1.0)
    assert tc.load_config(ROOT / "configs" / "llama2_7b_cream_256k.py").train.target_length == 4096 * 64
    e = tc.load_config(ROOT / "configs" / "llama2_7b_eabf_16k.py")
    assert e.model.rope.theta == 500000.0 and tuple(e.model.eabf.skip_layers) == (0, 1)
    assert (e.train.b1, e.train.b2, e.train.weight_decay, e.train.decay) == (0.9, 0.95, 0.1, "cosine")
    assert e.positions.method == "full" and e.train.window == 16384


def one_step(c, mesh_sizes, devices=None, steps=1):
    """Run `steps` train steps on a mesh; returns (losses, host params)."""
    c.mesh.update(mesh_sizes)
    cfg = tc.model_config(c)
    mesh = sharding.make_mesh(dict(c.mesh), devices)
    tx, schedule = optim.make_optimizer(c.train)
    step_cfg = step_lib.StepConfig.from_config(c, cfg)
    source = MarkovSource(cfg.vocab_size, 4, seed=0)
    losses = []
    with jax.set_mesh(mesh):
        state, shardings = state_lib.init_state(cfg, tx, mesh, seed=0)
        step_fn = step_lib.jit_train_step(step_cfg, tx, schedule, shardings, mesh)
        bs = state_lib.batch_sharding(mesh)
        for step in range(steps):
            tokens = source.rows(step, slice(0, c.train.global_batch), c.train.window)
            batch = {"tokens": jax.device_put(tokens, bs), "weights": jax.device_put(np.ones_like(tokens), bs)}
            state, metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"])


def assert_params_close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.slow
def test_sharded_step_equals_single_device():
    ref_loss, ref_params = one_step(tiny(), {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1], steps=2)
    for sizes in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1}):
        loss, params = one_step(tiny(), sizes, steps=2)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        assert_params_close(params, ref_params)


@pytest.mark.slow
def test_gradient_accumulation_4x2_equals_1x8():
    ref_loss, ref_params = one_step(tiny(grad_accum=1), {"data": 2, "fsdp": 1, "tensor": 1},
                                    devices=jax.devices()[:2])
    loss, params = one_step(tiny(grad_accum=4), {"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_params_close(params, ref_params)


def _scalar_tags(events_file: Path) -> set[str]:
    """The scalar tags in a TensorBoard event file (TFRecord framing: length, its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    tags, data = set(), events_file.read_bytes()
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12:12 + length])
        tags |= {v.tag for v in event.summary.value}
        data = data[16 + length:]
    return tags


@pytest.mark.slow
def test_cream_training_learns_the_source(tmp_path):
    """120 CREAM steps on the synthetic Markov source: loss far below the unigram entropy."""
    c = tiny(steps=120, log_every=20)
    history = train.run(c, tmp_path)
    source = MarkovSource(c.model.vocab_size, c.data.branching, seed=c.seed)
    unigram, rate = source.unigram_entropy(), source.conditional_entropy()
    final = history[-1]["loss"]
    print(f"\nCREAM training: loss {history[0]['loss']:.3f} -> {final:.3f} nats; source unigram entropy "
          f"{unigram:.3f}, entropy rate {rate:.3f}")
    assert final < unigram - 2.0 and final < rate + 0.5
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [20, 40, 60, 80, 100, 120]
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "param_norm"} <= set(lines[0])
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert {"train/loss", "train/lr", "train/grad_norm"} <= _scalar_tags(events)


@pytest.mark.slow
def test_tensorboard_writer_leaves_torch_unimported(tmp_path):
    """tensorboardX imports torch (seconds of every train launch) unless the train loop hides it."""
    code = ("import sys; from cream_jax import train; w = train._summary_writer(sys.argv[1]); "
            "w.add_scalar('x', 1.0, 1); w.close(); assert 'torch' not in sys.modules; import torch")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    (events,) = tmp_path.glob("events.out.tfevents.*")
    assert _scalar_tags(events) == {"x"}


@pytest.mark.parametrize("field,value,message", [
    ("train.target_length", 500, "train.target_length=500 is not a multiple of train.window=128"),
    ("train.global_batch", 6, "not divisible by mesh.data \\* mesh.fsdp = 8"),
    ("positions.method", "yarnpos", "positions.method='yarnpos' is not one of"),
    ("train.grad_accum", 3, "train.global_batch=8 is not divisible by train.grad_accum=3"),
])
def test_bad_configs_fail_before_compiling(tmp_path, field, value, message):
    c = tiny()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(tc.ConfigError, match=message):
        train.run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_mesh_axis_and_heads_vs_tensor(tmp_path):
    c = tiny()
    with c.mesh.unlocked():
        c.mesh.expert = 2
    with pytest.raises(tc.ConfigError, match="mesh.expert is not a mesh axis"):
        train.run(c, tmp_path)
    c = tiny()
    c.mesh.update({"data": 1, "fsdp": 2, "tensor": 4})
    with pytest.raises(tc.ConfigError, match="num_key_value_heads=2 is not divisible by mesh.tensor=4"):
        train.run(c, tmp_path)


def test_large_replicated_parameter_is_refused():
    cfg = tc.model_config(tiny())
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    shapes, specs = state_lib.state_specs(cfg, optim.make_optimizer(tiny().train)[0], mesh)
    specs = jax.tree.map(lambda s: jax.sharding.PartitionSpec(), specs["params"],
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    with pytest.raises(sharding.MeshError, match="would be replicated on every device"):
        sharding.check_not_replicated(shapes["params"], specs, mesh, min_size=1000)


def test_flops_per_token_matches_the_compiler():
    """Our causal-aware count vs XLA's count of the unrolled dot_product gradient (which computes the full
    S x S attention, so its attention term is twice ours)."""
    c = tiny()
    cfg = tc.model_config(c).replace(scan_layers=False)
    S, B = 128, 2
    params = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    tokens = jax.ShapeDtypeStruct((B, S), jnp.int32)
    weights = jax.ShapeDtypeStruct((B, S), jnp.float32)
    grad = jax.grad(lambda p, t, w: step_lib.loss_sums(cfg, p, t, w, jnp.broadcast_to(jnp.arange(S), (B, S)))[0])
    compiled = jax.jit(grad).lower(params, tokens, weights).compile().cost_analysis()
    q = cfg.num_attention_heads * cfg.head_dim
    full_attention_extra = 3 * cfg.num_hidden_layers * 2 * 2 * S * q * 0.5  # the masked half XLA also computes
    ours = (flops.flops_per_token(cfg, S) + full_attention_extra) * B * S
    assert abs(compiled["flops"] - ours) / ours < 0.1, (compiled["flops"], ours)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cli(workdir, *extra, env_devices=8, process=None):
    env = cli_env(devices=env_devices)
    args = [sys.executable, "-m", "cream_jax.train", f"--config={ROOT / 'configs' / 'tiny_cream.py'}",
            f"--workdir={workdir}", "--config.train.steps=3", "--config.train.warmup_steps=1",
            "--config.train.log_every=1",
            "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            *[f"--config.{k}={v}" for k, v in SYNTHETIC.items()], *extra]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """jax.distributed on localhost, gloo collectives, 4 devices per process vs one process with 8."""
    single = _cli(tmp_path / "single")
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out[-3000:]
    port = _free_port()
    procs = [_cli(tmp_path / "multi", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}", env_devices=4) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    a = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "param_norm", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key


_FAULTS_PER_CYCLE = """
import ctypes, resource, sys
from cream_jax import heap, train
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def cycle(n=2**27):  # what a train step does with its temporaries: malloc, write, free
    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
def faults_per_cycle(*_):
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        cycle()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
if sys.argv[1] == "cli":  # the train CLI's flag, with the cycles as its run
    train.run = faults_per_cycle
    train.main(["train", "--config=configs/tiny_cream.py", "--workdir=unused", "--reuse_freed_memory"])
if sys.argv[1] == "reuse":
    assert heap.reuse_freed_memory()
faults_per_cycle()
"""


@pytest.mark.slow
def test_reuse_freed_memory_stops_the_page_faults():
    """A freed 128 MiB buffer is faulted in afresh on every cycle by default (32768 pages of 4 KiB here;
    64 with transparent huge pages always on), and reused without faults after `reuse_freed_memory`, which
    the train CLI's `--reuse_freed_memory` calls."""
    env = {**os.environ, "GLIBC_TUNABLES": ""}
    faults = {mode: float(subprocess.run([sys.executable, "-c", _FAULTS_PER_CYCLE, mode], env=env, cwd=ROOT,
                                         capture_output=True, text=True, check=True).stdout.split()[0])
              for mode in ("default", "reuse", "cli")}
    assert faults["default"] >= 50, faults  # 50: 2 MiB pages
    assert faults["reuse"] <= faults["default"] / 10 and faults["cli"] <= faults["default"] / 10, faults


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "params"])
def test_initial_weights_from_hf_or_params_checkpoint(tmp_path, kind):
    """model.init_from loads exactly the saved parameters, keeps the recipe's run-time fields, refuses an
    architecture override, and a run starts from it."""
    from cream_jax import checkpoint, hf
    from cream_jax import model as model_lib

    source = model_lib.init(tc.model_config(tiny()), seed=7)
    if kind == "hf":
        hf.save_hf(source, tmp_path / "init", progress=False)
    else:
        checkpoint.save_params(source, tmp_path / "init")
    c = tiny(steps=1, warmup_steps=0, lr=0.0)
    c.model.init_from = str(tmp_path / "init")
    cfg, params, origin = load.initial_params(c)
    assert kind.replace("hf", "Hugging Face").replace("params", "params checkpoint") in origin
    expected = nnx.to_pure_dict(nnx.state(source, nnx.Param))
    assert_params_close(params, jax.device_get(expected), tol=0)
    assert cfg.rope.factor == 4.0
    assert len(train.run(c, tmp_path / "run")) == 1
    c.model.hidden_size = 96
    with pytest.raises(tc.ConfigError, match="model.hidden_size=96 differs from 64"):
        load.initial_params(c)


def test_resume_refuses_another_run_and_reports_what_it_accepts(tmp_path, capsys):
    """A relaunch with another learning rate, batch or positions is refused by name before anything runs;
    more steps, another mesh or log interval are accepted and reported (the schedule's jump included)."""
    workdir = tmp_path / "run"
    c = tiny(steps=4, warmup_steps=1, log_every=2)
    c.checkpoint.every = 2
    train.run(c, workdir)
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    for field, value in (("train.lr", 1e-3), ("train.global_batch", 16), ("positions.sigma", 2.0),
                         ("data.branching", 3)):
        changed = c.copy_and_resolve_references()
        section, name = field.split(".")
        changed[section][name] = value
        with pytest.raises(tc.ConfigError, match=rf"{field}={value!r} differs from the run's {field}="):
            train.run(changed, workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == saved  # nothing written
    capsys.readouterr()
    longer = tiny(steps=8, warmup_steps=1, log_every=4)
    longer.checkpoint.every = 2
    history = train.run(longer, workdir)
    out = capsys.readouterr().out
    assert [h["step"] for h in history] == [8]
    assert "resume: train.log_every 2 -> 4" in out
    (steps_line,) = [x for x in out.splitlines() if x.startswith("resume: train.steps 4 -> 8")]
    assert "the schedule now spans 8 steps: lr at step 4" in steps_line


def test_the_run_says_what_it_did_and_what_to_run_next(tmp_path, capsys):
    """tokens/s times the steady steps (the compiling first call apart), and the end says where the checkpoint
    is and which commands come next."""
    history = train.run(tiny(steps=7, warmup_steps=1, log_every=3), tmp_path / "run")
    out = capsys.readouterr().out
    first, second = (h["seconds_per_step"] for h in history[:2])
    assert first < 3 * second and second < 3 * first, history  # a compile inside the first would be 100x
    assert f"done: step 7 saved in {tmp_path / 'run' / 'checkpoints' / '7'}" in out
    assert f"python -m cream_jax.evaluate --ckpt={tmp_path / 'run'} --task=passkey --lengths=128,512" in out
    assert f"python -m cream_jax.convert orbax-to-hf --ckpt={tmp_path / 'run'} --out={tmp_path / 'run' / 'hf'}" in out
    header = out.splitlines()[:4]  # what, model, positions, data: a line each
    assert [x.split(":")[0] for x in header] == ["cream-jax train", "  model", "  positions", "  data"], header
