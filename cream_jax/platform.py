"""The compiler a program is traced for: a static choice carried by the model config.

A few functions lay out the same arithmetic differently per compiler (`model.project`, `rope.apply_rotary`,
attention's `auto` backend, splash's interpret mode). They take the platform as an argument, from
`LlamaConfig.platform`, so it is part of the static config that `jax.jit` closes over and caches by: the
planner compiles for a TPU on a CPU-only machine with `cfg.replace(platform="tpu")`, and no trace made for
one platform is reused for another.
"""

from __future__ import annotations

import jax

PLATFORMS = ("", "cpu", "gpu", "tpu")  # "": the default backend of the process that traces


def resolve(platform: str = "") -> str:
    """`platform`, or jax's default backend (fixed for the life of a process) when it is ""."""
    return platform or jax.default_backend()
