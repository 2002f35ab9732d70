"""The sharded train state (parameters, optimizer state) and the batch's shardings, from the rule table."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cream_jax import model as model_lib
from cream_jax import sharding
from cream_jax.config import LlamaConfig

BATCH_SPEC = ("batch", "length")  # logical axes of a batch's [rows, tokens] arrays


def state_specs(module_or_cfg: nnx.Module | LlamaConfig, tx: optax.GradientTransformation,
                mesh: jax.sharding.Mesh) -> tuple[dict, dict]:
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


def named(mesh: jax.sharding.Mesh, specs: dict) -> dict:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def init_state(cfg: LlamaConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, seed: int,
               params: dict | None = None) -> tuple[dict, dict]:
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


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, sharding.logical_to_spec(BATCH_SPEC[:ndim], mesh_axes=mesh.axis_names))


def batch_shardings(mesh: jax.sharding.Mesh, keys: Iterable[str] = ("tokens", "weights")) -> dict[str, NamedSharding]:
    """The batch's shardings: rows over the batch axes; doc_lengths is one number per row."""
    return {k: batch_sharding(mesh, 1 if k == "doc_lengths" else 2) for k in keys}


def abstract_state(cfg: LlamaConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> tuple[dict, dict]:
    """The train state as shapes carrying their target shardings (for restoring into any mesh)."""
    shapes, specs = state_specs(cfg, tx, mesh)
    shardings = named(mesh, specs)
    return jax.tree.map(lambda s, n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=n), shapes, shardings), shardings
