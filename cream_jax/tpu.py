"""Ahead-of-time compilation for a TPU topology on a CPU-only machine (needs `libtpu`).

The TPU compiler's `memory_analysis()` is the trustworthy memory figure
here: XLA's CPU compiler reports 0 temporaries for large buffers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Public names -> libtpu topology strings (v5p-8 is 4 chips; the suffix counts TensorCores).
TOPOLOGIES = {
    "v4-8": "v4:2x2x1", "v4-32": "v4:2x2x4",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4",
    "v5p-8": "v5p:2x2x1", "v5p-32": "v5p:2x2x4",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4",
}


def topology_devices(name: str) -> list[Any]:
    """Compile-only devices of a TPU topology, e.g. `v5p-8` or a raw `v5p:2x2x1`."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("jax.experimental.topologies is unavailable in this jax version.") from e
    raw = TOPOLOGIES.get(name, name)
    # Compile-only use touches no TPU, so several processes may load libtpu at once (else its lockfile aborts).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(raw, "tpu").devices)
    except Exception as e:
        raise RuntimeError(
            f"Cannot build TPU topology {name!r} ({raw}): {e}. Install libtpu (pip install -r requirements-tpu.txt "
            f"or `pip install libtpu`); known names: {sorted(TOPOLOGIES)}.") from e


@dataclasses.dataclass
class CompiledMemory:
    arguments: int
    outputs: int
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.code


def compile_for_tpu(fn: Callable, *shapes: jax.ShapeDtypeStruct, topology: str = "v5p-8", num_devices: int = 1):
    """Compile `fn` for the first `num_devices` devices of `topology` with replicated abstract inputs."""
    devices = topology_devices(topology)[:num_devices]
    mesh = jax.sharding.Mesh(devices, ("x",))
    replicated = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated) for s in shapes]
    return jax.jit(fn).trace(*args).lower().compile()


def memory(compiled) -> CompiledMemory:
    m = compiled.memory_analysis()
    return CompiledMemory(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                          m.generated_code_size_in_bytes)
