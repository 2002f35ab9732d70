"""The train step: one jitted function `(state, batch, step) -> (state, metrics)` that donates the state.

Inside: draw position ids (CREAM, PoSE, ...) for the whole global batch from a key folded with the step,
gather the tokens they index, run the model, take the next-token loss normalised by the token count, and
update with AdamW. Gradient accumulation scans over microbatches and weighs them by their token counts, so
4 microbatches of 2 equal 1 batch of 8. Shape suffixes as in model.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cream_jax import model as model_lib
from cream_jax import optim, positions, sharding
from cream_jax import state as state_lib
from cream_jax import train_config as tc
from cream_jax.config import LlamaConfig
from cream_jax.state import BATCH_SPEC, batch_shardings


@dataclasses.dataclass(frozen=True)
class StepConfig:
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
    def from_config(cls, c: ml_collections.ConfigDict, model: LlamaConfig) -> "StepConfig":
        return cls(model=model, method=c.positions.method, position_options=tc.position_options(c),
                   window=c.train.window, target=c.train.target_length, global_batch=c.train.global_batch,
                   grad_accum=c.train.grad_accum, seed=c.seed)


def loss_sums(cfg: LlamaConfig, params: dict, tokens_BxS: jax.Array, weights_BxS: jax.Array,
              position_ids_BxS: jax.Array, segment_ids_BxS: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token cross-entropies, sum of weights) over gathered sequences.

    `weights_BxS` is each token's loss weight as a prediction target (0 on padding and, for chat data, on
    prompts). Tokens of different segments never predict each other, and segment 0 is padding. Predictions
    across CREAM's position jumps count like any other (docs/methods.md)."""
    logits_BxSxV = model_lib.forward(cfg, params, tokens_BxS, position_ids=position_ids_BxS,
                                     segment_ids=segment_ids_BxS)
    # Predict at every position against the next token (the last column gets weight 0) rather than slicing
    # logits[:, :-1]: the slice copies the [B, N, V] logits forward and pads their gradient backward.
    labels_BxS = jnp.roll(tokens_BxS, -1, axis=1)
    not_last_S = jnp.arange(tokens_BxS.shape[1]) < tokens_BxS.shape[1] - 1
    weights_BxS = jnp.roll(weights_BxS, -1, axis=1) * not_last_S
    if segment_ids_BxS is not None:
        weights_BxS = weights_BxS * ((jnp.roll(segment_ids_BxS, -1, axis=1) == segment_ids_BxS) & (segment_ids_BxS > 0))
    ce_BxS = optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV, labels_BxS)
    return jnp.sum(ce_BxS * weights_BxS), jnp.sum(weights_BxS)


def _split_micro(x, accum: int):
    """[B, ...] -> [accum, B/accum, ...] taking every accum-th row, so each device's contiguous block of
    the batch feeds every microbatch (a plain reshape would put whole microbatches on a few devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def make_train_step(step_cfg: StepConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[dict, dict, jax.Array], tuple[dict, dict]]:
    cfg = step_cfg.model

    def train_step(state, batch, step):
        params = state["params"]
        key = positions.fold_step(jax.random.key(step_cfg.seed), step)
        options = dict(step_cfg.position_options)
        if "doc_lengths" in batch:  # 'offsets' content: each row holds up to L tokens of a document of this length
            options["doc_lengths"] = batch["doc_lengths"]
        pos_BxS, index_BxS = positions.sample(key, step_cfg.method, window=step_cfg.window, target=step_cfg.target,
                                              batch=step_cfg.global_batch, **options)
        tokens = jnp.take_along_axis(batch["tokens"], index_BxS, axis=1)
        weights = jnp.take_along_axis(batch["weights"], index_BxS, axis=1).astype(jnp.float32)
        micro = {"tokens": tokens, "weights": weights, "positions": pos_BxS}
        if "segment_ids" in batch:
            micro["segment_ids"] = jnp.take_along_axis(batch["segment_ids"], index_BxS, axis=1)
        micro = jax.tree.map(lambda x: _split_micro(x, step_cfg.grad_accum), micro)

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


def jit_train_step(step_cfg: StepConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, shardings: dict,
                   mesh: jax.sharding.Mesh, batch_keys: Iterable[str] = ("tokens", "weights")) -> jax.stages.Wrapped:
    return jax.jit(make_train_step(step_cfg, tx, schedule),
                   in_shardings=(shardings, batch_shardings(mesh, batch_keys), NamedSharding(mesh, P())),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A jitted train step and what it was built with."""

    fn: Callable  # (state, batch, step) -> (state, metrics), donating the state
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: dict  # the state's NamedShardings ({"params", "opt_state"})
    abstract_state: dict  # the state as shapes carrying those shardings (for restoring, or compiling ahead of time)
    config: StepConfig


def build(c: ml_collections.ConfigDict, cfg: LlamaConfig, mesh: jax.sharding.Mesh,
          batch_keys: Iterable[str] | None = None) -> TrainStep:
    """config -> optimizer -> the state's shardings -> the jitted step on `mesh`: how training, the planner
    and the benchmarks all make their step (`batch_keys`: the batch's arrays, default the config's)."""
    tx, schedule = optim.make_optimizer(c.train)
    keys = tuple(batch_keys or tc.batch_keys(c))
    abstract, shardings = state_lib.abstract_state(cfg, tx, mesh)
    step_cfg = StepConfig.from_config(c, cfg)
    fn = jit_train_step(step_cfg, tx, schedule, shardings, mesh, keys)
    return TrainStep(fn, tx, schedule, shardings, abstract, step_cfg)
