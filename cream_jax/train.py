"""The train loop and its CLI: config -> data -> sharded state -> jitted step, checkpoints, metrics.

    python -m cream_jax.train --config=configs/tiny_cream.py --config.train.lr=1e-4 --workdir=DIR

The step itself is `step.py`, the state `state.py`, the optimizer `optim.py`; this module runs them:
validate everything up front, restore or initialise, log metrics (metrics.jsonl, TensorBoard), save
checkpoints, stop cleanly on SIGTERM (`preemption.py`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections

from cream_jax import cli, flops, load, sharding
from cream_jax import state as state_lib
from cream_jax import train_config as tc
from cream_jax.config import LlamaConfig
from cream_jax.errors import CreamError
from cream_jax.heap import reuse_freed_memory
from cream_jax.preemption import Preemption
from cream_jax import step as step_lib


def run(c: ml_collections.ConfigDict, workdir: str | Path) -> list[dict[str, Any]]:
    """Train for `train.steps`; returns the logged metrics (also in workdir/metrics.jsonl).

    Everything that can be wrong with the config, the model source or the data is reported before any
    weights are loaded or anything is compiled."""
    from tqdm.auto import tqdm

    from cream_jax.data import pipeline as data_pipeline

    tc.validate(c, num_devices=jax.device_count())
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    cfg, _ = load.initial_config(c)
    tc.check_model_fits_mesh(cfg, c, jax.device_count())
    changes = _check_resume(c, cfg, workdir)
    mesh = sharding.make_mesh(dict(c.mesh))
    t = c.train
    row_len = tc.buffer_length(c)
    rows = sharding.host_rows(state_lib.batch_sharding(mesh), (t.global_batch, row_len))
    data = data_pipeline.from_config(c, cfg.vocab_size, row_len=row_len, rows=rows, window=c.train.window,
                                     offsets=tc.offsets(c), host=jax.process_index(),
                                     num_hosts=jax.process_count(), progress=lead)
    try:
        return _train(c, cfg, workdir, mesh, data, lead, tqdm, changes)
    finally:
        data.batches.close()


def _check_resume(c: ml_collections.ConfigDict, cfg: LlamaConfig, workdir: Path) -> list[str]:
    """Where `workdir` holds checkpoints: the same model (else a ConfigError), and the config differences a
    resume accepts, one line each (`train_config.resume_changes`; a refused one is a ConfigError)."""
    from cream_jax import checkpoint

    if not (workdir / checkpoint.CHECKPOINTS_DIR).is_dir():
        return []
    try:
        step, meta = checkpoint.read_meta(workdir)
    except checkpoint.CheckpointError:
        return []  # unreadable newest step: restore_latest reports it and falls back
    saved = LlamaConfig(**meta["model_config"])
    for name in tc.ARCHITECTURE_FIELDS:
        if getattr(saved, name) != getattr(cfg, name):
            raise tc.ConfigError(f"{workdir / checkpoint.CHECKPOINTS_DIR} holds checkpoints of another model "
                                 f"({name}={getattr(saved, name)}, this config: {getattr(cfg, name)}); use a new "
                                 f"--workdir.")
    return tc.resume_changes(meta["config"], c, step) if "config" in meta else []


def _write_status(workdir: Path, state: str, step: int) -> None:
    """WORKDIR/status.json: {"state": "running" | "preempted" | "done", "step": n}, for launchers that relaunch
    until done (a preempted run exits 0 too)."""
    (workdir / "status.json").write_text(json.dumps({"state": state, "step": step}) + "\n")


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """On resume, drop logged metrics of steps after the checkpoint (they are about to be recomputed)."""
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
        path.write_text("".join(x + "\n" for x in lines))


def _train(c, cfg: LlamaConfig, workdir: Path, mesh, data, lead: bool,
           tqdm, changes: list[str]) -> list[dict[str, Any]]:
    from cream_jax import checkpoint

    t = c.train
    built = step_lib.build(c, cfg, mesh, data.keys)
    tx, step_cfg = built.tx, built.config
    ckpt = checkpoint.TrainCheckpoints(workdir, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
    start, restored = 0, None
    with jax.set_mesh(mesh):
        if ckpt.steps():
            restored = ckpt.restore_latest(built.abstract_state)
        if restored is not None:
            start, state, data_state, meta = restored
            data.batches.restore(data_state)
            origin = f"resumed from {ckpt.directory} at step {start}"
        else:
            cfg, host_params, origin = load.initial_params(c)
            state, _ = state_lib.init_state(cfg, tx, mesh, c.seed, host_params)
            del host_params
        step_fn = built.fn
    in_shardings = state_lib.batch_shardings(mesh, data.keys)
    meta = {"seed": c.seed, "model_config": cfg.to_dict(), "config": json.loads(c.to_json_best_effort())}

    peak = flops.peak_flops(jax.devices()[0], t.peak_flops_per_device)
    step_flops = flops.flops_per_token(cfg, step_cfg.window) * t.global_batch * step_cfg.window
    writer = None
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
        _keep_metrics_up_to(workdir / "metrics.jsonl", start)
        _write_status(workdir, "running", start)
        writer = _summary_writer(workdir / "tensorboard")
        print(f"cream-jax train: {origin}\n"
              f"  model: {cfg.num_params() / 1e6:.1f}M params, mesh {dict(mesh.shape)}\n"
              f"  positions: {step_cfg.method}, window N={step_cfg.window}, target L={step_cfg.target}\n"
              f"  data: {data.description}", flush=True)
        if restored is not None:
            for line in changes:
                print(f"resume: {line}", flush=True)
    history = []
    preemption = Preemption()
    bar = tqdm(range(start, t.steps), disable=not lead, desc="train", unit="step", initial=start, total=t.steps)
    # the first call compiles: steps are timed from its end, so tokens/s says what the steady steps do
    last, since, reached, first_seconds = time.perf_counter(), start, start, 0.0
    try:
        with jax.set_mesh(mesh), open(workdir / "metrics.jsonl", "a") if lead else _nullfile() as log:
            for step in bar:
                local = next(data.batches)
                batch = {k: jax.make_array_from_process_local_data(in_shardings[k], local[k]) for k in data.keys}
                state, metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
                done = reached = step + 1
                if step == start:
                    jax.block_until_ready(metrics)
                    now = time.perf_counter()
                    first_seconds, last, since = now - last, now, done
                if done % t.log_every == 0 or done == t.steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    seconds = (now - last) / (done - since) if done > since else first_seconds
                    last, since = now, done
                    metrics.update(step=done, seconds_per_step=seconds,
                                   tokens_per_s=t.global_batch * step_cfg.window / seconds)
                    if peak:
                        metrics["mfu"] = step_flops / seconds / (peak * jax.device_count())
                    history.append(metrics)
                    if lead:
                        log.write(json.dumps(metrics) + "\n")
                        log.flush()
                        for k, v in metrics.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, done)
                        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                preempted = preemption.reached(done)
                every = c.checkpoint.every
                if preempted or done == t.steps or (every > 0 and done % every == 0):
                    ckpt.save(done, state, data.batches.state(), meta)
                if preempted:
                    if lead:
                        print(f"preempted (SIGTERM) after step {done}: checkpoint saved in {ckpt.directory}; "
                              f"relaunch the same command to resume", file=sys.stderr, flush=True)
                    break
        ckpt.wait()
        if lead:
            _write_status(workdir, "done" if reached >= t.steps else "preempted", reached)
            if reached >= t.steps and reached > start:
                print(f"done: step {reached} saved in {ckpt.directory / str(reached)} (first step, compiling: "
                      f"{first_seconds:.1f} s). Next:\n"
                      f"  python -m cream_jax.evaluate --ckpt={workdir} --task=passkey "
                      f"--lengths={step_cfg.window},{step_cfg.target}\n"
                      f"  python -m cream_jax.convert orbax-to-hf --ckpt={workdir} --out={workdir / 'hf'}", flush=True)
    finally:
        preemption.close()
        ckpt.close()
        if writer is not None:
            writer.close()
    return history


def _summary_writer(logdir: Path):
    """tensorboardX's SummaryWriter. tensorboardX imports torch, when installed, only to accept torch tensors
    (about 2 s); the loop logs floats, so torch stays unimported unless something else already imported it."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir))


class _nullfile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass


def main(argv: list[str] | None = None) -> NoReturn:
    from cream_jax.platform import use_local_backends

    use_local_backends()  # before jax starts its backends
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a recipe in configs/ (overridable: --config.train.lr=1e-4)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where metrics.jsonl, config.json and TensorBoard events go")
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0 (jax.distributed)")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with no arguments (TPU pods)")
    flags.DEFINE_bool("reuse_freed_memory", False, "CPU runs: glibc keeps freed memory for the next step "
                      "(faster steps, a larger steady peak; docs/bench.md)")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_):
        from absl import logging

        f = flags.FLAGS
        if f.reuse_freed_memory and not reuse_freed_memory():  # first: before jax starts threads
            print("warning: --reuse_freed_memory needs glibc's mallopt; this C library does not take it",
                  file=sys.stderr)
        if not f["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO
        sharding.init_distributed(f.coordinator_address, f.num_processes, f.process_id, force=f.distributed)
        try:
            run(f.config, f.workdir)
        except (CreamError, FileNotFoundError) as e:
            return cli.report(e)
        return 0

    app.run(lambda argv: sys.exit(_main(argv)), argv=argv, flags_parser=tc.parse_flags)  # exits with its status


if __name__ == "__main__":
    main()
