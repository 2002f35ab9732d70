"""The optimizer: AdamW with global-norm clipping, and the learning-rate schedule."""

from __future__ import annotations

import jax
import ml_collections
import optax


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
