"""Logical axis names and the one table that maps them to mesh axes.

Every parameter carries logical names in its `sharding_names` metadata
(`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, `layers`, `norm`),
and the model pins its main activations with `constrain` (`batch`,
`length`, `activation_*`). Nothing is sharded unless a mesh is active
(`jax.set_mesh`), so the same model code runs on one CPU and on a pod.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
from jax.sharding import PartitionSpec

from cream_jax.errors import CreamError

if TYPE_CHECKING:
    from flax import nnx

    from cream_jax.config import LlamaConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes); None = replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "activation_embed": None,
    "activation_mlp": "tensor",
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_vocab": "tensor",
}


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
                    mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
    """PartitionSpec for logical names; mesh axes absent from the mesh are dropped."""
    rules = RULES if rules is None else rules
    spec = []
    for name in names:
        if name is not None and name not in rules:
            raise KeyError(f"Logical axis {name!r} has no rule; add it to cream_jax.sharding.RULES.")
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if mesh_axes is not None:
            axes = tuple(a for a in axes if a in mesh_axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op without an active mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh_axes=mesh.axis_names))


def param_specs(module: nnx.Module, rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
                mesh_axes: Sequence[str] | None = None) -> dict:
    """PartitionSpecs for an NNX module's parameters, as a pure dict shaped like `nnx.to_pure_dict`."""
    from flax import nnx

    names = nnx.map_state(lambda _, v: v.get_metadata()["out_sharding"], nnx.state(module, nnx.Param))
    return jax.tree.map(lambda n: logical_to_spec(n, rules, mesh_axes), nnx.to_pure_dict(names),
                        is_leaf=lambda x: isinstance(x, tuple))


def check_heads(cfg: LlamaConfig, tensor: int, axis: str = "mesh.tensor") -> None:
    """The query and kv heads must divide by the `tensor` axis (`axis`: how the user sets it), which shards
    them (parameters, activations and the KV cache)."""
    for name in ("num_attention_heads", "num_key_value_heads"):
        if getattr(cfg, name) % tensor:
            raise MeshError(f"model {name}={getattr(cfg, name)} is not divisible by {axis}={tensor}; shard heads "
                            f"over a divisor of it (the rest of the devices on data or fsdp).")


def param_shardings(module: nnx.Module, mesh: jax.sharding.Mesh) -> dict:
    """NamedShardings of a (possibly abstract) module's parameters on `mesh`, by the rule table, after
    checking that every sharded dimension divides by its mesh axes."""
    specs = param_specs(module, mesh_axes=mesh.axis_names)
    from flax import nnx

    shapes = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    check_divisible(shapes, specs, mesh)
    return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


class MeshError(CreamError, ValueError):
    """A mesh shape or a divisibility requirement is wrong; the message names the field."""


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve `{data, fsdp, tensor}` sizes (one may be -1 = the rest) against the device count."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"Unknown mesh axis {sorted(unknown)}; the mesh axes are {MESH_AXES}.")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if shape.count(-1) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1 (the rest).")
    if any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))}: sizes must be positive (or -1 for the rest).")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not divisible by {known}.")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices but {num_devices} are "
                        f"available; make mesh.data * mesh.fsdp * mesh.tensor = {num_devices} (or set one to -1).")
    return tuple(shape)


def parse_mesh(text: str, flag: str = "--mesh") -> dict[str, int]:
    """`data=1,fsdp=-1,tensor=4` as {axis: size}; an axis left out is 1."""
    sizes = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = part.partition("=")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise MeshError(f"{flag}={text!r}: {part!r} is not axis=size; write e.g. {flag}=data=1,fsdp=-1,tensor=4"
                            ) from None
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown or not sizes:
        raise MeshError(f"{flag}={text!r}: the mesh axes are {', '.join(MESH_AXES)}; write e.g. "
                        f"{flag}=data=1,fsdp=-1,tensor=4")
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes: the compiler propagates shardings between the
    annotated parameters, batches and `constrain`ed activations."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def check_divisible(shapes: dict, specs: dict, mesh: jax.sharding.Mesh, what: str = "parameter") -> None:
    """Every sharded dimension must divide evenly by its mesh axes."""
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, shape), spec in zip(flat_shapes, flat_specs):
        for dim, axes in zip(shape.shape, spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            n = math.prod(mesh.shape[a] for a in axes)
            if dim % n:
                raise MeshError(f"{what} {jax.tree_util.keystr(path)} has a dimension of {dim}, not divisible by "
                                f"mesh axes {axes} of size {n}; change the mesh (mesh.{axes[0]}) or the model.")


def check_not_replicated(shapes: dict, specs: dict, mesh: jax.sharding.Mesh, min_size: int = 2**22) -> None:
    """Fail loudly when a large parameter would sit whole on every device of a multi-device mesh."""
    if math.prod(mesh.shape[a] for a in ("fsdp", "tensor") if a in mesh.shape) == 1:
        return  # pure data parallelism replicates on purpose
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, shape), spec in zip(flat_shapes, flat_specs):
        sharded = any(ax is not None and math.prod(
            mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax)) > 1 for ax in spec)
        if shape.size >= min_size and not sharded:
            raise MeshError(f"parameter {jax.tree_util.keystr(path)} ({shape.size / 1e6:.1f}M values) would be "
                            f"replicated on every device of mesh {dict(mesh.shape)}; fix the rule table "
                            f"(cream_jax.sharding.RULES) or the mesh.")


def host_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous rows of a batch-sharded global array that this process must supply."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(global_shape[0] if rows.stop is None else rows.stop)
    start, stop = min(starts), max(stops)
    covered = sum(b - a for a, b in sorted(set(zip(starts, stops))))
    if covered != stop - start:
        raise MeshError("this process's batch rows are not contiguous; order the mesh so that each host's "
                        "devices hold consecutive batch shards.")
    return slice(start, stop)


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, force: bool = False) -> None:
    """`jax.distributed.initialize` from flags, or from the environment (a TPU pod needs no arguments).

    Does nothing for a single-process run (no coordinator given and not `force`)."""
    if coordinator_address is None and not force:
        return
    if coordinator_address is not None:  # an explicit (e.g. localhost CPU) cluster: CPU collectives over gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
