"""The compiler a program is traced for: a static choice carried by the model config.

A few functions lay out the same arithmetic differently per compiler (`model.project`, `rope.apply_rotary`,
attention's `auto` backend, splash's interpret mode). They take the platform as an argument, from
`LlamaConfig.platform`, so it is part of the static config that `jax.jit` closes over and caches by: the
planner compiles for a TPU on a CPU-only machine with `cfg.replace(platform="tpu")`, and no trace made for
one platform is reused for another.

`use_local_backends` picks the backends a CLI's process starts (not what it compiles for).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax

PLATFORMS = ("", "cpu", "gpu", "tpu")  # "": the default backend of the process that traces


def resolve(platform: str = "") -> str:
    """`platform`, or jax's default backend (fixed for the life of a process) when it is ""."""
    return platform or jax.default_backend()


def _has_tpu() -> bool:
    """A TPU VM: its chips are /dev/accel* (v2-v5e) or VFIO devices (v5p, v6e), or the runtime named them."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_ACCELERATOR_TYPE"))


def use_local_backends() -> None:
    """Every CLI's first step. Where JAX_PLATFORMS is unset and this machine has no TPU, jax starts only the
    backends it has (CPU, and CUDA where a GPU and jax's CUDA plugin are installed) instead of trying libtpu,
    installed for the planner's TPU compiles, which prints a screen of warnings at every start. The TPU
    compiler of the ahead-of-time plans does not need a TPU backend."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or _has_tpu():
        return
    platforms = ["cpu"]
    if glob.glob("/dev/nvidia[0-9]*") and any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin",
                                                                                     "jax_cuda13_plugin")):
        platforms.insert(0, "cuda")
    jax.config.update("jax_platforms", ",".join(platforms))
