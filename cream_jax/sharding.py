"""Logical axis names and the one table that maps them to mesh axes.

Every parameter carries logical names in its `sharding_names` metadata
(`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, `layers`, `norm`),
and the model pins its main activations with `constrain` (`batch`,
`length`, `activation_*`). Nothing is sharded unless a mesh is active
(`jax.set_mesh`), so the same model code runs on one CPU and on a pod.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import PartitionSpec

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


def logical_to_spec(names: Sequence[str | None], rules=None, mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
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


def param_specs(module, rules=None, mesh_axes: Sequence[str] | None = None):
    """PartitionSpecs for an NNX module's parameters, as a pure dict shaped like `nnx.to_pure_dict`."""
    from flax import nnx

    names = nnx.map_state(lambda _, v: v.get_metadata()["out_sharding"], nnx.state(module, nnx.Param))
    return jax.tree.map(lambda n: logical_to_spec(n, rules, mesh_axes), nnx.to_pure_dict(names),
                        is_leaf=lambda x: isinstance(x, tuple))
