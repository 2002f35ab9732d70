"""The jitted, mesh-sharded train step, and the train CLI.

    python -m cream_jax.train --config=configs/tiny_cream.py --config.train.lr=1e-4 --workdir=DIR

One `jax.jit` function `(state, batch, step) -> (state, metrics)` donates the
state. Inside: draw position ids (CREAM, PoSE, ...) for the whole global batch
from a key folded with the step, gather the tokens they index, run the model,
take the next-token loss normalised by the token count, and update with
AdamW. Gradient accumulation scans over microbatches and weighs them by their
token counts, so 4 microbatches of 2 equal 1 batch of 8.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cream_jax import model as model_lib
from cream_jax import positions, sharding
from cream_jax import train_config as tc
from cream_jax.config import LlamaConfig
from cream_jax.data.sources import DataError
from cream_jax.data.tokenizer import TokenizerError

BATCH_SPEC = ("batch", "length")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static part of training: what the jitted step closes over."""

    model: LlamaConfig
    method: str
    position_options: dict
    window: int
    target: int
    global_batch: int
    grad_accum: int
    seed: int

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict, model: LlamaConfig) -> "Setup":
        return cls(model=model, method=c.positions.method, position_options=tc.position_options(c),
                   window=c.train.window, target=c.train.target_length, global_batch=c.train.global_batch,
                   grad_accum=c.train.grad_accum, seed=c.seed)


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine or linear decay to `lr * min_lr_ratio` (or constant)."""
    warmup = optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1))
    rest = max(t.steps - t.warmup_steps, 1)
    end = t.lr * t.min_lr_ratio
    decay = {"cosine": optax.cosine_decay_schedule(t.lr, rest, alpha=t.min_lr_ratio),
             "linear": optax.linear_schedule(t.lr, end, rest),
             "constant": optax.constant_schedule(t.lr)}[t.decay]
    return optax.join_schedules([warmup, decay], [t.warmup_steps])


def decay_mask(params: dict) -> dict:
    """Weight decay on matrices, not on norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", k)) for k in path), params)


def make_optimizer(t: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(t)
    tx = optax.chain(
        optax.clip_by_global_norm(t.clip) if t.clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask),
    )
    return tx, schedule


# ----------------------------------------------------------------------------- loss and step


def loss_sums(cfg: LlamaConfig, params, tokens_BxN, weights_BxN, position_ids_BxN, segment_ids_BxN=None):
    """(sum of weighted next-token cross-entropies, sum of weights) over gathered sequences.

    `weights_BxN` is each token's loss weight as a prediction target (0 on padding and, for chat data, on
    prompts). Tokens of different segments never predict each other, and segment 0 is padding. Predictions
    across CREAM's position jumps count like any other (SPEC 1.1, item 8)."""
    logits_BxNxV = model_lib.forward(cfg, params, tokens_BxN, position_ids=position_ids_BxN,
                                     segment_ids=segment_ids_BxN)
    # Predict at every position against the next token (the last column gets weight 0) rather than slicing
    # logits[:, :-1]: the slice copies the [B, N, V] logits forward and pads their gradient backward.
    labels_BxN = jnp.roll(tokens_BxN, -1, axis=1)
    not_last_N = jnp.arange(tokens_BxN.shape[1]) < tokens_BxN.shape[1] - 1
    weights_BxN = jnp.roll(weights_BxN, -1, axis=1) * not_last_N
    if segment_ids_BxN is not None:
        weights_BxN = weights_BxN * ((jnp.roll(segment_ids_BxN, -1, axis=1) == segment_ids_BxN) & (segment_ids_BxN > 0))
    ce_BxN = optax.softmax_cross_entropy_with_integer_labels(logits_BxNxV, labels_BxN)
    return jnp.sum(ce_BxN * weights_BxN), jnp.sum(weights_BxN)


def _split_micro(x, accum: int):
    """[B, ...] -> [accum, B/accum, ...] taking every accum-th row, so each device's contiguous block of
    the batch feeds every microbatch (a plain reshape would put whole microbatches on a few devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def make_train_step(setup: Setup, tx: optax.GradientTransformation, schedule: optax.Schedule):
    cfg = setup.model

    def train_step(state, batch, step):
        params = state["params"]
        key = positions.fold_step(jax.random.key(setup.seed), step)
        options = dict(setup.position_options)
        if "doc_lengths" in batch:  # 'offsets' content: each row holds up to L tokens of a document of this length
            options["doc_lengths"] = batch["doc_lengths"]
        pos_BxN, index_BxN = positions.sample(key, setup.method, window=setup.window, target=setup.target,
                                              batch=setup.global_batch, **options)
        tokens = jnp.take_along_axis(batch["tokens"], index_BxN, axis=1)
        weights = jnp.take_along_axis(batch["weights"], index_BxN, axis=1).astype(jnp.float32)
        micro = {"tokens": tokens, "weights": weights, "positions": pos_BxN}
        if "segment_ids" in batch:
            micro["segment_ids"] = jnp.take_along_axis(batch["segment_ids"], index_BxN, axis=1)
        micro = jax.tree.map(lambda x: _split_micro(x, setup.grad_accum), micro)

        def accumulate(carry, mb):
            grads_sum, loss_sum, count = carry
            mb = jax.tree.map(lambda x: sharding.constrain(x, BATCH_SPEC[: x.ndim]), mb)
            (loss, n), grads = jax.value_and_grad(
                lambda p: loss_sums(cfg, p, mb["tokens"], mb["weights"], mb["positions"], mb.get("segment_ids")),
                has_aux=True)(params)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, count + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss_sum / count, "grad_norm": optax.global_norm(grads), "lr": schedule(step),
                   "tokens": count, "param_norm": optax.global_norm(params)}
        return {"params": params, "opt_state": opt_state}, metrics

    return train_step


# ----------------------------------------------------------------------------- sharded state


def state_specs(module_or_cfg, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
    """(abstract state, PartitionSpecs) for params and the optimizer state, from the rule table."""
    abstract = module_or_cfg if isinstance(module_or_cfg, nnx.Module) else model_lib.abstract(module_or_cfg)
    param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    param_specs = sharding.param_specs(abstract, mesh_axes=mesh.axis_names)
    opt_shapes = jax.eval_shape(tx.init, param_shapes)
    opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, opt_shapes, param_specs,
                                      transform_non_params=lambda _: P(),
                                      is_leaf=lambda x: isinstance(x, P))
    shapes = {"params": param_shapes, "opt_state": opt_shapes}
    specs = {"params": param_specs, "opt_state": opt_specs}
    sharding.check_divisible(param_shapes, param_specs, mesh)
    sharding.check_not_replicated(param_shapes, param_specs, mesh)
    return shapes, specs


def named(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def init_state(cfg: LlamaConfig, tx, mesh, seed: int, params: dict | None = None):
    """The sharded train state: random parameters made directly in their shards, or given host params placed."""
    _, specs = state_specs(cfg, tx, mesh)
    shardings = named(mesh, specs)
    if params is None:
        make = lambda: nnx.to_pure_dict(nnx.state(model_lib.Llama(cfg, rngs=nnx.Rngs(seed)), nnx.Param))  # noqa
        params = jax.jit(make, out_shardings=shardings["params"])()
    else:
        params = jax.tree.map(jax.device_put, params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state}, shardings


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, sharding.logical_to_spec(BATCH_SPEC[:ndim], mesh_axes=mesh.axis_names))


def batch_shardings(mesh, keys=("tokens", "weights")) -> dict[str, NamedSharding]:
    """The batch's shardings: rows over the batch axes; doc_lengths is one number per row."""
    return {k: batch_sharding(mesh, 1 if k == "doc_lengths" else 2) for k in keys}


def jit_train_step(setup: Setup, tx, schedule, shardings, mesh, batch_keys=("tokens", "weights")):
    return jax.jit(make_train_step(setup, tx, schedule),
                   in_shardings=(shardings, batch_shardings(mesh, batch_keys), NamedSharding(mesh, P())),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


# ----------------------------------------------------------------------------- FLOPs and MFU

# Peak dense bf16 FLOP/s per device (chip), from the vendors' spec sheets.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token (forward + backward = 3x forward; remat recompute not counted).

    Convention: a matmul of m x n by n x p is 2mnp FLOPs. Per token, forward: 2 x (every projection's
    parameters, lm_head included, the embedding lookup excluded) plus attention's QK^T and PV,
    2 x 2 x seq_len x heads x head_dim per layer, halved because causal attention needs only the
    lower triangle. Train = 3 x forward."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    matmul_params = n * (d * (2 * q + 2 * kv) + 3 * d * f) + d * cfg.vocab_size
    attention = n * 2 * 2 * seq_len * q * 0.5
    return 3 * (2 * matmul_params + attention)


def peak_flops(device, override: float = 0.0) -> float | None:
    if override:
        return override
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: one malloc arena, no mmap'd chunks, no trimming. Returns
    whether glibc took all three settings (False elsewhere, e.g. macOS or musl).

    On CPU, XLA mallocs a step's temporaries afresh each call; by default glibc maps the large ones fresh and
    unmaps them after, so every step page-faults them in again. With this (the process-wide form of
    `bench.HEAP_REUSE`) the demo's pretraining ran 400 steps in 48 s instead of 67 s, with equal losses;
    the bench's steps ran 13-19 % faster with a 1.4-2.1x steady peak (fragmentation is kept, not returned).
    Call it first, before jax starts threads: arenas that already exist stay."""
    import ctypes

    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>; a trim threshold of -1: never
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


# ----------------------------------------------------------------------------- the run


def initial_config(c: ml_collections.ConfigDict) -> tuple[LlamaConfig, str]:
    """The model config, read without loading any weights, and a line saying where parameters will come from."""
    from cream_jax import checkpoint, hf

    source = c.model.init_from
    if not source:
        return tc.model_config(c), f"random init (preset {c.model.preset}, seed {c.seed})"
    path = Path(source)
    if (path / checkpoint.CONFIG_FILE).exists():
        base, kind = checkpoint.config_from_json((path / checkpoint.CONFIG_FILE).read_text()), "params checkpoint"
    elif (path / "config.json").exists():
        base, kind = hf.read_config(path), "Hugging Face directory"
    else:
        raise tc.ConfigError(f"model.init_from={source!r} is neither a Hugging Face directory (config.json) nor a "
                             f"params checkpoint ({checkpoint.CONFIG_FILE}).")
    return tc.model_config(c, base_config=base), f"{kind} {source}"


def initial_params(c: ml_collections.ConfigDict) -> tuple[LlamaConfig, dict | None, str]:
    """Model config, host params (None = random init) and a line saying where they came from."""
    from cream_jax import checkpoint, hf

    cfg, origin = initial_config(c)
    if not c.model.init_from:
        return cfg, None, origin
    path = Path(c.model.init_from)
    module = checkpoint.load_params(path) if (path / checkpoint.CONFIG_FILE).exists() else hf.load_hf(path)
    cfg = tc.model_config(c, base_config=module.config)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    return cfg, params, origin


def run(c: ml_collections.ConfigDict, workdir: str | Path) -> list[dict[str, Any]]:
    """Train for `train.steps`; returns the logged metrics (also in workdir/metrics.jsonl).

    Everything that can be wrong with the config, the model source or the data is reported before any
    weights are loaded or anything is compiled."""
    from tqdm.auto import tqdm

    from cream_jax.data import pipeline as data_pipeline

    tc.validate(c, num_devices=jax.device_count())
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    cfg, _ = initial_config(c)
    tc.check_model_fits_mesh(cfg, c, jax.device_count())
    mesh = sharding.make_mesh(dict(c.mesh))
    setup = Setup.from_config(c, cfg)
    t = c.train
    row_len = tc.buffer_length(c)
    rows = sharding.host_rows(batch_sharding(mesh), (t.global_batch, row_len))
    data = data_pipeline.from_config(c, cfg.vocab_size, row_len=row_len, rows=rows, window=setup.window,
                                     offsets=tc.offsets(c), host=jax.process_index(),
                                     num_hosts=jax.process_count(), progress=lead)
    try:
        return _train(c, cfg, workdir, setup, mesh, data, lead, tqdm)
    finally:
        data.batches.close()


class Preemption:
    """SIGTERM (TPU maintenance, spot preemption) as a flag the loop checks after each step.

    Multi-host: jax's preemption sync point, where the coordination service catches the signal and all hosts
    agree on the step to stop at; if that service is not running, our own handler and an all-gather."""

    def __init__(self):
        import signal

        self.flag, self.signal = False, signal
        self._jax_sync = jax.process_count() > 1
        self._previous = None
        if self._jax_sync:
            from jax.experimental import multihost_utils

            try:
                multihost_utils.reached_preemption_sync_point(0)
            except Exception:  # noqa: BLE001 - no preemption service in this cluster
                self._jax_sync = False
        import threading

        if not self._jax_sync and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)  # only the main thread may set handlers

    def _handle(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if self._jax_sync:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag))))
        return self.flag

    def close(self) -> None:
        if self._previous is not None:
            self.signal.signal(self.signal.SIGTERM, self._previous)


def abstract_state(cfg: LlamaConfig, tx, mesh) -> tuple[dict, dict]:
    """The train state as shapes carrying their target shardings (for restoring into any mesh)."""
    shapes, specs = state_specs(cfg, tx, mesh)
    shardings = named(mesh, specs)
    return jax.tree.map(lambda s, n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=n), shapes, shardings), shardings


def _check_same_model(ckpt, cfg: LlamaConfig, workdir: Path) -> None:
    from cream_jax import checkpoint

    try:
        _, meta = checkpoint.read_meta(workdir)
    except checkpoint.CheckpointError:
        return  # unreadable newest step: restore_latest reports it and falls back
    saved = LlamaConfig(**meta["model_config"])
    for name in tc.ARCHITECTURE_FIELDS:
        if getattr(saved, name) != getattr(cfg, name):
            raise tc.ConfigError(f"{ckpt.directory} holds checkpoints of another model ({name}={getattr(saved, name)}, "
                                 f"this config: {getattr(cfg, name)}); use a new --workdir.")


def _write_status(workdir: Path, state: str, step: int) -> None:
    """WORKDIR/status.json: {"state": "running" | "preempted" | "done", "step": n}, for launchers that relaunch
    until done (a preempted run exits 0 too)."""
    (workdir / "status.json").write_text(json.dumps({"state": state, "step": step}) + "\n")


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """On resume, drop logged metrics of steps after the checkpoint (they are about to be recomputed)."""
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
        path.write_text("".join(x + "\n" for x in lines))


def _train(c, cfg: LlamaConfig, workdir: Path, setup: Setup, mesh, data, lead: bool, tqdm) -> list[dict[str, Any]]:
    from cream_jax import checkpoint

    t = c.train
    tx, schedule = make_optimizer(t)
    ckpt = checkpoint.TrainCheckpoints(workdir, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
    start, restored = 0, None
    with jax.set_mesh(mesh):
        if ckpt.steps():
            _check_same_model(ckpt, cfg, workdir)
            target, shardings = abstract_state(cfg, tx, mesh)
            restored = ckpt.restore_latest(target)
        if restored is not None:
            start, state, data_state, meta = restored
            data.batches.restore(data_state)
            origin = f"resumed from {ckpt.directory} at step {start}"
        else:
            cfg, host_params, origin = initial_params(c)
            state, shardings = init_state(cfg, tx, mesh, c.seed, host_params)
            del host_params
        step_fn = jit_train_step(setup, tx, schedule, shardings, mesh, data.keys)
    in_shardings = batch_shardings(mesh, data.keys)
    meta = {"seed": c.seed, "model_config": cfg.to_dict(), "config": json.loads(c.to_json_best_effort())}

    peak = peak_flops(jax.devices()[0], t.peak_flops_per_device)
    step_flops = flops_per_token(cfg, setup.window) * t.global_batch * setup.window
    writer = None
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
        _keep_metrics_up_to(workdir / "metrics.jsonl", start)
        _write_status(workdir, "running", start)
        writer = _summary_writer(workdir / "tensorboard")
        print(f"cream-jax train: {origin}; {cfg.num_params() / 1e6:.1f}M params; mesh {dict(mesh.shape)}; "
              f"positions {setup.method} N={setup.window} L={setup.target}; data: {data.description}", flush=True)
    history = []
    preemption = Preemption()
    bar = tqdm(range(start, t.steps), disable=not lead, desc="train", unit="step", initial=start, total=t.steps)
    last, reached = time.perf_counter(), start
    try:
        with jax.set_mesh(mesh), open(workdir / "metrics.jsonl", "a") if lead else _nullfile() as log:
            for step in bar:
                local = next(data.batches)
                batch = {k: jax.make_array_from_process_local_data(in_shardings[k], local[k]) for k in data.keys}
                state, metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
                done = reached = step + 1
                if done % t.log_every == 0 or done == t.steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    steps_done = t.log_every if done % t.log_every == 0 else done % t.log_every
                    seconds = (now - last) / steps_done
                    last = now
                    metrics.update(step=done, seconds_per_step=seconds,
                                   tokens_per_s=t.global_batch * setup.window / seconds)
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


def main(argv=None) -> int:
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
                      "(steps 13-19 % faster here, steady peak memory 1.4-2.1x; see train.reuse_freed_memory)")
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
        except (tc.ConfigError, DataError, TokenizerError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    app.run(lambda argv: sys.exit(_main(argv)), argv=argv)
    return 0


if __name__ == "__main__":
    main()
