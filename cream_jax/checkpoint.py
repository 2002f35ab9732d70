"""Orbax checkpoints: params-only checkpoints for conversion, and train checkpoints that resume exactly.

A params checkpoint directory (`convert hf-to-orbax`):
    model_config.json   the LlamaConfig as JSON
    params/             an Orbax PyTree checkpoint of the parameters (pure nested dict, our layout)

A run directory's train checkpoints (`TrainCheckpoints`, an Orbax CheckpointManager), one per saved step:
    RUN/checkpoints/<step>/params     the parameters          (sharded arrays, restored into any mesh)
                          /opt_state  the optimizer state
                          /data       the data iterator state (JSON: the next step and a fingerprint)
                          /meta       step, seed, the LlamaConfig and the whole run config (JSON)
Saves are asynchronous: the arrays are copied to host before `save` returns and written on a background
thread into a temporary directory that is renamed when complete, so a kill at any moment leaves the
previous steps intact; an interrupted save's temporary directory is reported and moved to
RUN/checkpoints_incomplete/ on the next start. A step that fails to restore is reported, renamed
`<step>.corrupt` (nothing is deleted) and the previous step is used.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from cream_jax import model as model_lib
from cream_jax.config import LlamaConfig
from cream_jax.errors import CreamError

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


class CheckpointError(CreamError, ValueError):
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


def _target(abstract: model_lib.Llama, mesh: jax.sharding.Mesh | None) -> dict:
    """The parameters' shapes with the shardings to restore into: on `mesh` by the rule table (each process
    reads only its shards), else on the first device."""
    from cream_jax import sharding as sharding_lib

    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    else:
        shardings = sharding_lib.param_shardings(abstract, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def load_params(directory: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                **config_overrides: Any) -> model_lib.Llama:
    """A model from a params checkpoint, on one device or in its shards on `mesh`; `config_overrides`
    change run-time fields (dtype, attention, ...)."""
    directory = Path(directory).absolute()
    if not (directory / CONFIG_FILE).exists():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a cream-jax params checkpoint "
                              f"(make one with `python -m cream_jax.convert hf-to-orbax`).")
    if not (directory / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{directory} has no {PARAMS_DIR}/ directory: the checkpoint is incomplete.")
    cfg = config_from_json((directory / CONFIG_FILE).read_text(), **config_overrides)
    abstract = model_lib.abstract(cfg)
    graphdef, state = nnx.split(abstract)
    target = _target(abstract, mesh)
    with _checkpointer(target) as ckptr:
        try:
            params = ckptr.restore(directory / PARAMS_DIR, args=ocp.args.PyTreeRestore(
                target, restore_args=jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{directory / PARAMS_DIR} does not match {CONFIG_FILE}: {e}") from e
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- train checkpoints

CHECKPOINTS_DIR = "checkpoints"
INCOMPLETE_DIR = "checkpoints_incomplete"  # interrupted saves, set aside (never deleted)
ITEMS = ("params", "opt_state", "data", "meta")


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"checkpoint: {msg}", file=sys.stderr, flush=True)


class TrainCheckpoints:
    """Save every K steps (and when asked), asynchronously, keeping the last N; restore the newest good one."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / CHECKPOINTS_DIR
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep if keep > 0 else None, create=True,
                                                 enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=False))
        self._set_aside_incomplete_saves()

    def _set_aside_incomplete_saves(self) -> None:
        """Orbax never lists an interrupted save's temporary directory as a step, but would remove it when it
        saves that step again: move it out of Orbax's directory instead, so nothing is ever deleted."""
        if jax.process_index() != 0:
            return
        incomplete = self.directory.parent / INCOMPLETE_DIR
        for tmp in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
            incomplete.mkdir(exist_ok=True)
            tmp.rename(incomplete / tmp.name)
            _log(f"ignoring {tmp.name}: an interrupted save; moved to {incomplete}")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: dict, meta: dict) -> None:
        self.manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]), opt_state=ocp.args.StandardSave(state["opt_state"]),
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave({**meta, "step": step})))

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict, dict]:
        """(state, data state, meta) of `step`, arrays placed as `abstract_state`'s shardings say."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return {"params": out.params, "opt_state": out.opt_state}, dict(out.data), dict(out.meta)

    def restore_latest(self, abstract_state: dict) -> tuple[int, dict, dict, dict] | None:
        """The newest step that restores; a step that does not is reported and renamed `<step>.corrupt`."""
        for step in reversed(self.steps()):
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as e:  # noqa: BLE001 - any failure to read a step means it cannot be used
                aside = self.directory / f"{step}.corrupt"
                _log(f"step {step} in {self.directory} cannot be restored ({type(e).__name__}: "
                     f"{str(e)[:300]}); keeping it as {aside.name} and trying the previous step")
                if jax.process_index() == 0:
                    (self.directory / str(step)).rename(aside)
                self.manager.reload()
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def read_meta(run_dir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of a run directory's newest (or given) train checkpoint, without touching the arrays."""
    directory = Path(run_dir).absolute() / CHECKPOINTS_DIR
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise CheckpointError(f"{run_dir} has no train checkpoints ({directory} holds no step directories).")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint at step {step}; it has steps {steps}.")
    meta_file = directory / str(step) / "meta" / "metadata"
    if not meta_file.exists():
        raise CheckpointError(f"step {step} of {run_dir} has no meta item ({meta_file}); is it complete?")
    return step, json.loads(meta_file.read_text())


def load_train_params(run_dir: str | os.PathLike, step: int | None = None,
                      mesh: jax.sharding.Mesh | None = None) -> tuple[model_lib.Llama, int]:
    """The model of a run's train checkpoint (newest, or `step`) on one device or in its shards on `mesh`,
    with the run's RoPE/EABF."""
    step, meta = read_meta(run_dir, step)
    cfg = LlamaConfig(**meta["model_config"])
    abstract = model_lib.abstract(cfg)
    graphdef, state = nnx.split(abstract)
    target = _target(abstract, mesh)
    # create=False and never a save, rather than read_only=True: Orbax warns about read-only managers
    manager = ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINTS_DIR, item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    except Exception as e:  # noqa: BLE001 - TensorStore's message is a page of its spec: one line of it
        earlier = [s for s in manager.all_steps() if s < step]
        hint = f"; pass the previous step, --step={max(earlier)}" if earlier else ""
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"step {step} of {run_dir} cannot be restored ({type(e).__name__}: {first}){hint}") from e
    finally:
        manager.close()
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), step
