"""Ahead-of-time compilation for a TPU topology on a CPU-only machine (needs `libtpu`).

The TPU compiler's `memory_analysis()` is the trustworthy memory figure
here: XLA's CPU compiler reports 0 temporaries for large buffers.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec

from cream_jax.errors import CreamError

# Public names -> libtpu topology strings (v5p-8 is 4 chips; the suffix counts TensorCores).
TOPOLOGIES = {
    "v4-8": "v4:2x2x1", "v4-32": "v4:2x2x4",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4",
    "v5p-8": "v5p:2x2x1", "v5p-32": "v5p:2x2x4",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4",
}


# A raw libtpu topology: generation, then chips per axis ("v5p:2x2x1").
_RAW_TOPOLOGY = re.compile(r"^(v\d+[a-z]*):\d+(x\d+)*$")
# Generations with two TensorCores per chip that jax runs as one device per chip ("megacore"), as on a real
# v4 slice. libtpu's topology otherwise lists each core as a device, and `jax.make_mesh` refuses those.
_MEGACORE = ("v4",)
# What libtpu would otherwise ask a TPU VM's metadata server for, set when jax runs on CPU only.
_NO_TPU_VM = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_ID": "0",
              "TPU_WORKER_HOSTNAMES": "localhost"}


class TopologyError(CreamError, ValueError):
    """A TPU topology name that is neither a known one nor a raw libtpu topology."""


def topology_devices(name: str) -> list[Any]:
    """Compile-only devices of a TPU topology, e.g. `v5p-8` or a raw `v5p:2x2x1`: one per chip."""
    raw = TOPOLOGIES.get(name, name)
    match = _RAW_TOPOLOGY.match(raw)
    if not match:
        raise TopologyError(f"unknown TPU topology {name!r}: use one of {sorted(TOPOLOGIES)} or a raw libtpu "
                            f"topology such as 'v5p:2x2x4' (generation:chips per axis).")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("jax.experimental.topologies is unavailable in this jax version.") from e
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"planning for TPU topology {name!r} needs libtpu: pip install -r requirements-tpu.txt "
                           f"(or `pip install libtpu`).") from e
    # Compile-only use touches no TPU, so several processes may load libtpu at once (else its lockfile aborts).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if jax.config.jax_platforms == "cpu":  # no TPU attached: spare libtpu's probes of a TPU VM's metadata,
        for key, value in _NO_TPU_VM.items():  # which print alarming errors (the compiles are the same)
            os.environ.setdefault(key, value)
    options = {"chip_config_name": "megacore"} if match.group(1) in _MEGACORE else {}
    try:
        return list(topologies.get_topology_desc(raw, "tpu", **options).devices)
    except Exception as e:
        raise RuntimeError(f"libtpu cannot build TPU topology {name!r} ({raw}): {e}. Known names: "
                           f"{sorted(TOPOLOGIES)}.") from e


@dataclasses.dataclass
class CompiledMemory:
    arguments: int
    outputs: int
    temporaries: int
    code: int


def compile_for_tpu(fn: Callable, *shapes: jax.ShapeDtypeStruct, topology: str = "v5p-8",
                    num_devices: int = 1) -> jax.stages.Compiled:
    """Compile `fn` for the first `num_devices` devices of `topology` with replicated abstract inputs."""
    devices = topology_devices(topology)[:num_devices]
    mesh = jax.sharding.Mesh(devices, ("x",))
    replicated = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated) for s in shapes]
    return jax.jit(fn).trace(*args).lower().compile()


def memory(compiled: jax.stages.Compiled) -> CompiledMemory:
    m = compiled.memory_analysis()
    return CompiledMemory(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                          m.generated_code_size_in_bytes)


def compile_with_hlo(lowered: jax.stages.Lowered, module: str, compiler_options: dict | None = None
                     ) -> tuple[jax.stages.Compiled, str]:
    """`lowered.compile()` and the optimised HLO text of the jitted function named `module`, as the compiler
    itself dumps it: `compiled.as_text()` fails on some TPU modules (jaxlib cannot parse back libtpu's
    async-update instructions)."""
    with tempfile.TemporaryDirectory() as dump:
        compiled = lowered.compile({**(compiler_options or {}), "xla_dump_to": dump, "xla_dump_hlo_as_text": True})
        texts = list(Path(dump).glob(f"*jit_{module}*.after_optimizations.txt"))
        if len(texts) != 1:
            raise RuntimeError(f"expected one optimised HLO dump of {module} in {dump}, found {texts}")
        return compiled, texts[0].read_text()


def while_loops(hlo: str) -> list[str]:
    """The while loops in optimised HLO text, by their condition computations' names."""
    return re.findall(r" while\(.*?condition=%?([\w.-]+)", hlo)
