"""The train config schema: every field with its default, and validation before any compile.

Recipes in `configs/` start from `base()` and change what they need; the CLI
overrides any field (`--config.train.lr=1e-4`).
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import ml_collections

from cream_jax import cli, positions
from cream_jax.config import ConfigError, LlamaConfig, preset
from cream_jax.sharding import MESH_AXES


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # model.preset names an architecture (cream_jax.config.PRESETS); every other model.* field overrides
    # a LlamaConfig field (rope and eabf as sub-dicts). model.init_from: '' (random), an HF directory,
    # or a params checkpoint (from `python -m cream_jax.convert hf-to-orbax`).
    # Run-time fields are placeholders (None = the preset's value), so any recipe takes them on the command line.
    c.model = ml_collections.ConfigDict({"preset": "tiny", "init_from": ""})
    for name, kind in (("max_position_embeddings", int), ("dtype", str), ("param_dtype", str), ("remat", str),
                       ("attention", str), ("attention_block_size", int), ("scan_layers", bool)):
        c.model[name] = ml_collections.config_dict.placeholder(kind)

    c.positions = ml_collections.ConfigDict({
        "method": "cream",  # cream | pose | randpos | plain | full
        "gaussian": "truncated",
        "sigma": 3.0,
        "sigma_scale": "absolute",
        "p_continuity": 0.5,
        "k": 0,  # continuity head/tail length; 0 = 4 * f
        "content": "contiguous",
    })

    c.train = ml_collections.ConfigDict({
        "steps": 100,
        "global_batch": 8,
        "window": 128,  # N: the sequence length actually trained
        "target_length": 512,  # L: the context length the positions reach
        "grad_accum": 1,
        "lr": 3e-4,
        "warmup_steps": 10,
        "decay": "cosine",  # cosine | linear | constant
        "min_lr_ratio": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "clip": 1.0,
        "log_every": 10,
        "peak_flops_per_device": 0.0,  # 0: look up the device kind (unknown devices report no MFU)
    })

    # Where the tokens come from (cream_jax/data/): a corpus fetched from the package registries, local
    # .txt/.jsonl files, a prepared TFDS dataset, or the synthetic Markov source (no tokenizer needed).
    c.data = ml_collections.ConfigDict({
        "source": "synthetic_markov",  # synthetic_markov | corpus | files | tfds
        "name": "",  # corpus: a name from `python -m cream_jax.data.corpora list`; tfds: a dataset (e.g. pg19)
        "files": "",  # files: comma-separated .txt (one document each) and .jsonl (one per line) paths
        "text_key": "text",  # the jsonl field / TFDS feature holding the text (pg19: book_text)
        "format": "text",  # text | chat (jsonl {"messages": [...]}; loss on the answers only)
        "split": "train",  # tfds split
        "data_dir": "",  # tfds: its data_dir; corpus/files: where their TFDS copy goes ('' = the cache)
        "tokenizer": "",  # a tokenizer.model path, a directory holding one, or a registry tokenizer name
        "packing": "packed",  # packed (documents concatenated, segment ids) | document (one per row, padded)
        "drop_short": False,  # content='offsets': skip documents shorter than the window instead of failing
        "prefetch": 2,  # batches computed ahead on a background thread (0 = none)
        "cache_dir": "",  # '' = $CREAM_JAX_CACHE or ~/.cache/cream_jax
        "branching": 4,  # synthetic_markov: successors per token
    })

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Train checkpoints in WORKDIR/checkpoints: every `every` steps (0: only at the end), at the end, and on
    # SIGTERM (preemption); the last `keep` are kept. A run resumes from its own newest good checkpoint.
    c.checkpoint = ml_collections.ConfigDict({"every": 0, "keep": 3, "async_save": True})
    return c


POSITION_OPTIONS = ("gaussian", "sigma", "sigma_scale", "p_continuity", "k", "content")
# What the sampler's checks call its arguments in a config's error messages.
POSITION_NAMES = {"method": "positions.method", "window": "train.window", "target": "train.target_length"}


def position_options(c: ml_collections.ConfigDict) -> dict:
    """The sampler keyword options of the config (CREAM's only for CREAM)."""
    if c.positions.method != "cream":
        return {"content": c.positions.content} if c.positions.method == "pose" else {}
    opts = {k: c.positions[k] for k in POSITION_OPTIONS}
    opts["k"] = opts["k"] or None
    return opts


ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "tie_word_embeddings")


def model_config(c: ml_collections.ConfigDict, base_config: LlamaConfig | None = None) -> LlamaConfig:
    """LlamaConfig from `model.*`, or, with `base_config` (the one in model.init_from), that config with the
    run-time fields of `model.*` applied (RoPE, EABF, dtypes, remat, attention, max_position_embeddings)."""
    fields = {k: (v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v)
              for k, v in c.model.items() if k not in ("preset", "init_from") and v is not None}
    if base_config is None:
        return preset(c.model.preset, **fields)
    for name in ARCHITECTURE_FIELDS:
        if name in fields and fields.pop(name) != getattr(base_config, name):
            raise ConfigError(f"model.{name}={c.model[name]} differs from {getattr(base_config, name)} in "
                              f"model.init_from={c.model.init_from!r}; remove the override.")
    return base_config.replace(**fields)


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> LlamaConfig:
    """Check the whole config before anything is compiled; returns the model config."""
    t = c.train
    unknown_mesh = set(c.mesh.keys()) - set(MESH_AXES)
    if unknown_mesh:
        raise ConfigError(f"mesh.{sorted(unknown_mesh)[0]} is not a mesh axis; use mesh.data, mesh.fsdp, mesh.tensor.")
    for name in ("steps", "global_batch", "grad_accum"):
        if t[name] <= 0:
            raise ConfigError(f"train.{name}={t[name]} must be positive.")
    try:  # the sampler's own checks (method, window vs target, CREAM's integer ratio, options), without drawing
        positions.validate(c.positions.method, window=t.window, target=t.target_length, names=POSITION_NAMES,
                           **position_options(c))
    except ValueError as e:
        raise ConfigError(f"positions: {e}") from None
    if t.global_batch % t.grad_accum:
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by train.grad_accum={t.grad_accum}.")
    if t.decay not in ("cosine", "linear", "constant"):
        raise ConfigError(f"train.decay={t.decay!r} is not one of ('cosine', 'linear', 'constant').")
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be in [0, train.steps={t.steps}].")
    from cream_jax.data import pipeline as data_pipeline  # here: the data package loads only when checked

    data_pipeline.check(c.data, offsets(c))
    cfg = model_config(c) if not c.model.init_from else None
    if num_devices is not None:
        from cream_jax.sharding import MeshError, mesh_shape

        try:
            data, fsdp, tensor = mesh_shape(dict(c.mesh), num_devices)
        except MeshError as e:
            raise ConfigError(str(e)) from None
        micro = t.global_batch // t.grad_accum
        if micro % (data * fsdp):
            raise ConfigError(f"the microbatch train.global_batch / train.grad_accum = {micro} is not divisible by "
                              f"mesh.data * mesh.fsdp = {data * fsdp}; change train.global_batch or the mesh.")
        if cfg is not None:
            check_model_fits_mesh(cfg, c, num_devices)
    return cfg


def pg19(c: ml_collections.ConfigDict, data_dir: str = "") -> None:
    """Train on PG-19's books (a prepared array_record TFDS dataset in data.data_dir, e.g. a gs:// bucket),
    tokenized with the tokenizer.model in model.init_from unless data.tokenizer says otherwise."""
    c.data.update(source="tfds", name="pg19", split="train", text_key="book_text", data_dir=data_dir)


def offsets(c: ml_collections.ConfigDict) -> bool:
    """Whether rows hold up to L tokens of one document with its true length (CREAM/PoSE 'offsets')."""
    return c.positions.method in ("cream", "pose") and c.positions.content == "offsets"


def batch_keys(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The arrays of a batch that the data source of `c` produces."""
    from cream_jax.data import pipeline as data_pipeline

    return data_pipeline.batch_keys(c.data.source, offsets(c))


def buffer_length(c: ml_collections.ConfigDict) -> int:
    """Tokens per example row: L for 'offsets' content, else the window N."""
    return c.train.target_length if offsets(c) else c.train.window


def check_model_fits_mesh(cfg: LlamaConfig, c: ml_collections.ConfigDict, num_devices: int) -> None:
    from cream_jax.sharding import mesh_shape

    from cream_jax.sharding import MeshError, check_heads

    tensor = mesh_shape(dict(c.mesh), num_devices)[MESH_AXES.index("tensor")]
    try:
        check_heads(cfg, tensor)
    except MeshError as e:
        raise ConfigError(str(e)) from None


def load_config(path: str | os.PathLike, **kwargs: Any) -> ml_collections.ConfigDict:
    """`get_config(**kwargs)` of a recipe file, loaded by path (as the CLI's --config does)."""
    import importlib.util
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"cream_jax_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(**kwargs)


# ----------------------------------------------------------------------------- resume

# What a resumed run may change from the config it was started with: how it runs (mesh, checkpoints, logging,
# remat, the attention backend), where its files live (local data and tokenizers count by content: the data
# pipeline's saved state refuses other content) and train.steps (the schedule then spans the new length).
# Any other change (the data's kind, the positions, the optimizer, the model) would make the rest of it
# another run: refused, naming the field.
RESUME_MAY_CHANGE = ("train.steps", "train.grad_accum", "train.log_every", "train.peak_flops_per_device", "mesh.",
                     "checkpoint.", "data.prefetch", "data.cache_dir", "data.data_dir", "data.files", "data.tokenizer",
                     "model.remat", "model.attention", "model.attention_block_size", "model.scan_layers",
                     "model.init_from", "name")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, c: ml_collections.ConfigDict, step: int) -> list[str]:
    """One line per accepted difference between the config a run was started with (`saved`, as its
    checkpoints record it) and `c`, resuming at `step`; a ConfigError names the first refused one. Fields
    that `saved` lacks (a run from before they existed) count as unchanged."""
    import json

    from cream_jax import optim

    was, now = _flat(saved), _flat(json.loads(c.to_json_best_effort()))
    changed = sorted(k for k in was.keys() & now.keys() if was[k] != now[k])
    for k in changed:
        if not k.startswith(RESUME_MAY_CHANGE):
            raise ConfigError(f"{k}={now[k]!r} differs from the run's {k}={was[k]!r}: resuming with it would make "
                              f"the rest another run; pass --config.{k}={was[k]!r} or use a new --workdir.")
    lines = []
    for k in changed:
        line = f"{k} {was[k]!r} -> {now[k]!r}"
        if k == "train.steps":
            before = float(optim.lr_schedule(ml_collections.ConfigDict(saved["train"]))(step))
            after = float(optim.lr_schedule(c.train)(step))
            line += f" (the schedule now spans {now[k]} steps: lr at step {step} {before:.3g} -> {after:.3g})"
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------- command line

def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for the CLIs that take a recipe (`app.run(..., flags_parser=parse_flags)`): an
    unknown flag, a bad value, a missing or unreadable --config file or an unknown --config.* field exits 2
    naming it."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        own_recipes = "page" in flags.FLAGS and flags.FLAGS.page and not flags.FLAGS["config"].present
        if "config" in flags.FLAGS and not own_recipes:  # `plan --eval --page` plans its own recipes
            flags.FLAGS.config.keys()  # a failed load shows at first use: here, not mid-run
        return rest
    except flags.Error as e:  # unknown flag or bad value: absl's message names the flag
        cli.fail(str(e))
    except Exception as e:  # noqa: BLE001 - anything raised while loading --config or applying --config.*
        cli.fail(_explain(argv, e))


def _explain(argv: list[str], error: Exception) -> str:
    """Which --config argument `error` came from, and what would be right."""
    config_args = [a for a in argv[1:] if a.startswith("--config=") or a.startswith("--config.")]
    path = next((a.split("=", 1)[1] for a in config_args if a.startswith("--config=")), None)
    if path is None:
        return "--config is required: a recipe file such as configs/tiny_cream.py"
    from pathlib import Path

    if not Path(path).is_file():
        return f"--config={path}: no such file (the recipes are in configs/)"
    try:
        config = load_config(path)
    except Exception as e:  # noqa: BLE001 - the recipe itself is broken: say so in one line
        return f"--config={path} does not load: {type(e).__name__}: {str(e).splitlines()[0]}"
    for arg in config_args:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
        node, seen = config, []
        for part in dotted.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(seen) or "the config"
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f"; did you mean --config.{'.'.join([*seen, close[0]])}?" if close else (
                    f"; {where} has {', '.join(sorted(keys))}" if keys else f"; {where} is a value, not a section")
                return f"{arg}: {where} has no field {part!r}{hint}"
            node, seen = node[part], [*seen, part]
    return f"{' '.join(config_args)}: {type(error).__name__}: {error}"
