"""One way to read a model from any source: a Hugging Face directory, a params checkpoint or a train run.

`source_kind` tells them apart, `read_config` reads a source's model config without its weights (for
validating a run before anything is loaded), and `load_model` loads the weights. Training's
`model.init_from`, evaluation, conversion and the demo all go through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from cream_jax import train_config as tc
from cream_jax.config import LlamaConfig
from cream_jax.errors import CreamError

if TYPE_CHECKING:
    from cream_jax.model import Llama

KINDS = {"hf": "Hugging Face directory", "params": "params checkpoint", "run": "train run"}


class SourceError(CreamError, ValueError):
    """A path that is none of the model sources."""


def source_kind(path: str | Path) -> str:
    """"run" (a train run's workdir), "params" (a params checkpoint) or "hf" (a Hugging Face directory)."""
    from cream_jax import checkpoint

    path = Path(path)
    if (path / checkpoint.CHECKPOINTS_DIR).is_dir():
        return "run"
    if (path / checkpoint.CONFIG_FILE).exists():
        return "params"
    if (path / "config.json").exists():
        return "hf"
    raise SourceError(f"{str(path)!r} is none of a train run ({checkpoint.CHECKPOINTS_DIR}/), a params checkpoint "
                      f"({checkpoint.CONFIG_FILE}) or a Hugging Face directory (config.json).")


def read_config(path: str | Path, step: int | None = None) -> tuple[LlamaConfig, str]:
    """A source's model config, read without its weights, and its kind."""
    from cream_jax import checkpoint, hf

    kind = source_kind(path)
    if kind == "run":
        _, meta = checkpoint.read_meta(path, step)
        return LlamaConfig(**meta["model_config"]), kind
    if kind == "params":
        return checkpoint.config_from_json((Path(path) / checkpoint.CONFIG_FILE).read_text()), kind
    return hf.read_config(path), kind


def load_model(path: str | Path, step: int | None = None, progress: bool = True,
               mesh: jax.sharding.Mesh | None = None, **config_overrides: Any) -> tuple[Llama, str]:
    """(the model, a label saying what was loaded) from any source, on one device or in its shards on
    `mesh` (never whole on one device or host); `step` picks a train run's checkpoint (default: the newest)
    and is refused for the other sources."""
    from cream_jax import checkpoint, hf

    kind = source_kind(path)
    if step is not None and kind != "run":
        raise SourceError(f"a step ({step}) applies to train runs; {str(path)!r} is a {KINDS[kind]}.")
    if kind == "run":
        module, step = checkpoint.load_train_params(path, step, mesh)
        return module, f"{path} step {step}"
    if kind == "params":
        return checkpoint.load_params(path, mesh, **config_overrides), str(path)
    return hf.load_hf(path, progress=progress, mesh=mesh, **config_overrides), str(path)


def run_tokenizer(run_dir: str | Path) -> str:
    """The tokenizer a train run used: its data.tokenizer, else the one beside the model it started from."""
    run_config = json.loads((Path(run_dir) / "config.json").read_text())
    return run_config["data"]["tokenizer"] or run_config["model"]["init_from"]


def initial_config(c: ml_collections.ConfigDict) -> tuple[LlamaConfig, str]:
    """The run's model config, read without loading any weights, and a line saying where parameters will
    come from (`model.init_from`: any source; empty: a random init)."""
    source = c.model.init_from
    if not source:
        return tc.model_config(c), f"random init (preset {c.model.preset}, seed {c.seed})"
    try:
        base, kind = read_config(source)
    except SourceError as e:
        raise tc.ConfigError(f"model.init_from: {e}") from None
    return tc.model_config(c, base_config=base), f"{KINDS[kind]} {source}"


def initial_params(c: ml_collections.ConfigDict) -> tuple[LlamaConfig, dict | None, str]:
    """Model config, host params (None = random init) and a line saying where they came from."""
    cfg, origin = initial_config(c)
    if not c.model.init_from:
        return cfg, None, origin
    module, _ = load_model(c.model.init_from)
    cfg = tc.model_config(c, base_config=module.config)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    return cfg, params, origin
