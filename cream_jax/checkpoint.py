"""Orbax checkpoints. For now: a params-only checkpoint (model config JSON + parameters).

Layout of a params checkpoint directory:
    model_config.json   the LlamaConfig as JSON
    params/             an Orbax PyTree checkpoint of the parameters (pure nested dict, our layout)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from cream_jax import model as model_lib
from cream_jax.config import LlamaConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match the model."""


def config_from_json(text: str, **overrides: Any) -> LlamaConfig:
    return LlamaConfig(**json.loads(text)).replace(**overrides)


def _checkpointer(tree) -> ocp.Checkpointer:
    """Orbax copies device buffers to host before writing them; bounding the bytes in flight to the
    largest tensor (at least 64 MiB) keeps a conversion near one copy of the model instead of two."""
    largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    in_flight_gb = (max(largest, 2**26) + 2**20) / 1e9  # Orbax counts 10^9 bytes to the GB
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=in_flight_gb, save_device_host_concurrent_gb=in_flight_gb,
        restore_concurrent_gb=in_flight_gb))


def check_new(directory: str | os.PathLike) -> Path:
    """Fail before any expensive work if `directory` already holds a checkpoint (never overwrite one)."""
    directory = Path(directory).absolute()
    if (directory / PARAMS_DIR).exists() or (directory / CONFIG_FILE).exists():
        raise CheckpointError(f"{directory} already holds a checkpoint; choose a new --out directory.")
    return directory


def save_params(module: model_lib.Llama, directory: str | os.PathLike) -> Path:
    """Write `module`'s config and parameters; refuses to overwrite an existing checkpoint."""
    directory = check_new(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    with _checkpointer(params) as ckptr:
        ckptr.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
    (directory / CONFIG_FILE).write_text(json.dumps(module.config.to_dict(), indent=2))
    return directory


def load_params(directory: str | os.PathLike, **config_overrides: Any) -> model_lib.Llama:
    """A model from a params checkpoint; `config_overrides` change run-time fields (dtype, attention, ...)."""
    directory = Path(directory).absolute()
    if not (directory / CONFIG_FILE).exists():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a cream-jax params checkpoint "
                              f"(make one with `python -m cream_jax.convert hf-to-orbax`).")
    if not (directory / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{directory} has no {PARAMS_DIR}/ directory: the checkpoint is incomplete.")
    cfg = config_from_json((directory / CONFIG_FILE).read_text(), **config_overrides)
    abstract = model_lib.abstract(cfg)
    graphdef, state = nnx.split(abstract)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    with _checkpointer(target) as ckptr:
        try:
            params = ckptr.restore(directory / PARAMS_DIR, args=ocp.args.PyTreeRestore(
                target, restore_args=jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{directory / PARAMS_DIR} does not match {CONFIG_FILE}: {e}") from e
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
