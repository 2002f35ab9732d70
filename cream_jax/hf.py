"""The Hugging Face bridge: `load_hf` and `save_hf` (numpy + safetensors; no torch).

Tensor names are HF's (docs/methods.md). Our layout differs only by a
transpose (torch Linear is `(out, in)`), a reshape (heads split out of the
projection dimension) and a stack over layers, so both directions stream one
tensor at a time: converting a 7B model holds the model once plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from cream_jax import model as model_lib
from cream_jax.config import EabfConfig, LlamaConfig, RopeConfig
from cream_jax.files import usual_mode
from cream_jax.errors import CreamError
from cream_jax.rope import ntk_theta

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EABF_MODELING_FILE = Path(__file__).parent / "hf_remote_code" / "modeling_eabf_llama.py"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

_HF_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_ROPE_FIELDS = [f.name for f in dataclasses.fields(RopeConfig) if f.name not in ("type", "theta")]


class ServingWarning(CreamError, UserWarning):
    """An export that transformers runs as cream-jax does but GPU servers run differently."""


DYNAMIC_NTK_SERVING = (
    "rope.type='dynamic': transformers and cream-jax grow the RoPE base with each sequence's length, but vLLM "
    "and SGLang compute one base, for length max_position_embeddings * factor, so served tokens differ from "
    "ours. To serve exactly, export a fixed base: rope={'type': 'ntk', 'factor': s} with s = factor * L / "
    "max_position_embeddings - factor + 1 is the base dynamic NTK uses at length L; or fine-tune with 'yarn', "
    "which the servers compute as we do (docs/serving.md).")


class HFFormatError(CreamError, ValueError):
    """A Hugging Face directory does not match what the model expects; the message names the tensor or field."""


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
    """Our LlamaConfig from a transformers `config.json` dict (legacy `rope_scaling` or v5 `rope_parameters`)."""
    arch = hf.get("model_type", "llama")
    if arch != "llama":
        raise HFFormatError(f"config.json has model_type={arch!r}; only Llama ('llama') checkpoints are supported.")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise HFFormatError(f"config.json lacks the field {key!r}.")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise HFFormatError(f"config.json has {key}={hf[key]!r}; only {key}={ok!r} (Llama) is supported.")

    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in _HF_ROPE_TYPES:
        raise HFFormatError(
            f"config.json rope_scaling/rope_parameters has rope_type={rope_type!r}, which cream-jax does not "
            f"support; supported: {_HF_ROPE_TYPES}."
        )
    unknown = set(params) - set(_ROPE_FIELDS) - {"partial_rotary_factor"}
    if unknown:
        raise HFFormatError(f"config.json rope parameters {sorted(unknown)} are not supported for {rope_type!r}.")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise HFFormatError("config.json has partial_rotary_factor != 1, which Llama does not use.")
    if rope_type == "default":
        params = {}
    rope = RopeConfig(type=rope_type, theta=float(theta), **params)

    eabf = EabfConfig()
    if hf.get("eabf"):
        eabf = EabfConfig(enabled=True, base_length=int(hf["eabf"]["base_length"]),
                          skip_layers=tuple(hf["eabf"]["skip_layers"]))
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        initializer_range=hf.get("initializer_range", 0.02), rope=rope, eabf=eabf,
    )
    return LlamaConfig(**fields).replace(**overrides)


def config_to_hf(cfg: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A `config.json` that transformers' LlamaForCausalLM loads with no custom code (EABF adds `auto_map`)."""
    rope, theta = cfg.rope, cfg.rope.theta
    scaling = None
    if rope.type == "ntk":  # not an HF type: exactly a larger base
        theta = ntk_theta(rope, cfg.head_dim)
    elif rope.type != "default":
        scaling = {"rope_type": rope.type}
        scaling.update({k: getattr(rope, k) for k in _ROPE_FIELDS if getattr(rope, k) is not None})
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": float(theta),
        "rope_scaling": scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    }
    if cfg.eabf.enabled:
        out["architectures"] = ["EabfLlamaForCausalLM"]
        out["auto_map"] = {"AutoModelForCausalLM": "modeling_eabf_llama.EabfLlamaForCausalLM"}
        out["eabf"] = {"base_length": cfg.eabf.base_length, "skip_layers": list(cfg.eabf.skip_layers)}
    return out


# ----------------------------------------------------------------------------- tensor names and layout


def _leaf_name(path: tuple[str, ...]) -> str:
    """Our param path -> HF name, with `{i}` standing for the layer index of stacked leaves."""
    parts = list(path)
    if parts[:2] == ["model", "layers"]:
        parts.insert(2, "{i}")
    return ".".join(parts)


def _projection_inputs(path: tuple[str, ...]) -> int | None:
    return model_lib.PROJECTION_INPUT_AXES.get(path[-2])


def to_hf_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """One (unstacked) tensor from our layout to torch's."""
    n_in = _projection_inputs(path)
    if n_in is None:
        return value
    in_size = math.prod(value.shape[:n_in])
    return np.ascontiguousarray(value.reshape(in_size, -1).T)


def from_hf_layout(path: tuple[str, ...], value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One torch tensor to our (unstacked) layout of `shape`."""
    n_in = _projection_inputs(path)
    if n_in is None:
        return value
    return value.T.reshape(shape)


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    n_in = _projection_inputs(path)
    if n_in is None:
        return tuple(shape)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _param_leaves(state) -> list[tuple[tuple[str, ...], Any]]:
    flat = nnx.to_flat_state(state)
    return [(tuple(str(k) for k in path), leaf) for path, leaf in flat]


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config implies, with its torch shape."""
    out = {}
    for path, leaf in _param_leaves(nnx.state(model_lib.abstract(cfg), nnx.Param)):
        shape = leaf.value.shape
        name = _leaf_name(path)
        if "{i}" in name:
            for i in range(cfg.num_hidden_layers):
                out[name.format(i=i)] = _hf_shape(path, shape[1:])
        else:
            out[name] = _hf_shape(path, shape)
    return out


# ----------------------------------------------------------------------------- reading


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class _SafetensorsDir:
    """The tensors of a single-file or sharded safetensors checkpoint, read one at a time with plain
    file reads (no mmap, whose touched pages would stay resident and double the memory of a conversion)."""

    def __init__(self, path: Path):
        index, single = path / INDEX_FILE, path / SINGLE_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.exists():
            weight_map = {k: SINGLE_FILE for k in _read_header(single)[0]}
        else:
            raise HFFormatError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}: not a safetensors checkpoint.")
        self.headers = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).exists():
                raise HFFormatError(f"{path / shard} is named in {INDEX_FILE} but missing (incomplete download?).")
            self.headers[shard] = _read_header(path / shard)
        for name, shard in weight_map.items():
            if name not in self.headers[shard][0]:
                raise HFFormatError(f"{INDEX_FILE} puts {name} in {shard}, which does not hold it.")
        self.path, self.weight_map = path, weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.weight_map[name]][0][name]["shape"])

    def get(self, name: str) -> np.ndarray:
        shard = self.weight_map[name]
        header, data_start = self.headers[shard]
        info = header[name]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise HFFormatError(f"tensor {name} has dtype {info['dtype']}, which cream-jax cannot read.")
        start, end = info["data_offsets"]
        with open(self.path / shard, "rb") as f:
            f.seek(data_start + start)
            data = f.read(end - start)
        return np.frombuffer(data, _SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _check_tensors(files: _SafetensorsDir, cfg: LlamaConfig) -> None:
    expected = expected_tensors(cfg)
    missing = sorted(set(expected) - set(files.weight_map))
    extra = sorted(n for n in set(files.weight_map) - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    if missing:
        raise HFFormatError(f"{files.path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                            f"({len(missing)} in all) for the config in config.json.")
    if extra:
        hint = " (tie_word_embeddings is true but lm_head.weight is present?)" if "lm_head.weight" in extra else ""
        raise HFFormatError(f"{files.path}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}"
                            f"{hint}; they do not belong to a Llama with this config.")
    for name, shape in expected.items():
        got = files.shape(name)
        if got != shape:
            raise HFFormatError(f"{files.path}: tensor {name} has shape {list(got)}, but config.json implies "
                                f"{list(shape)}.")


def read_config(path: str | os.PathLike, **overrides: Any) -> LlamaConfig:
    path = Path(path)
    if not (path / "config.json").exists():
        raise HFFormatError(f"{path} has no config.json: not a Hugging Face model directory.")
    return config_from_hf(json.loads((path / "config.json").read_text()), **overrides)


def load_hf(path: str | os.PathLike, progress: bool = True, mesh: jax.sharding.Mesh | None = None,
            **config_overrides: Any) -> model_lib.Llama:
    """A transformers Llama directory as our NNX model; `config_overrides` are LlamaConfig fields
    (e.g. `param_dtype="bfloat16"`, `attention="blockwise"`, `rope={"type": "linear", "factor": 8}`).

    On `mesh` every parameter goes straight into its shards by the rule table: the host holds one
    parameter (all layers of one projection) at a time, and each process puts only its own devices' parts."""
    path = Path(path)
    cfg = read_config(path, **config_overrides)
    files = _SafetensorsDir(path)
    _check_tensors(files, cfg)
    abstract = model_lib.abstract(cfg)
    graphdef, state = nnx.split(abstract)
    leaves = _param_leaves(nnx.state(abstract, nnx.Param))
    shardings = {}
    if mesh is not None:
        from cream_jax.sharding import param_shardings

        shardings = traverse_util.flatten_dict(param_shardings(abstract, mesh))
    values = {}
    for path_, leaf in tqdm(leaves, desc=f"loading {path.name}", disable=not progress, unit="tensor"):
        shape, dtype = leaf.value.shape, leaf.value.dtype
        name = _leaf_name(path_)
        if "{i}" in name:
            host = np.empty(shape, dtype)
            for i in range(shape[0]):
                host[i] = from_hf_layout(path_, files.get(name.format(i=i)), shape[1:]).astype(dtype)
        else:
            host = from_hf_layout(path_, files.get(name), shape).astype(dtype)
        if mesh is None:
            values[path_] = jnp.asarray(host)
        else:
            values[path_] = jax.make_array_from_callback(shape, shardings[path_], lambda index, h=host: h[index])
        del host
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- writing


def iter_hf_tensors(module: model_lib.Llama, dtype: np.dtype | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, torch-layout numpy array) one tensor at a time, in HF's order."""
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))  # noqa: E731
    for path, leaf in _param_leaves(nnx.state(module, nnx.Param)):
        value = leaf.value
        name = _leaf_name(path)
        if "{i}" in name:
            for i in range(value.shape[0]):
                yield name.format(i=i), cast(to_hf_layout(path, np.asarray(value[i])))
        else:
            yield name, cast(to_hf_layout(path, np.asarray(value)))


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + [current] if current else shards


def save_hf(module: model_lib.Llama, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *,
            dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Write a transformers directory: config.json, safetensors (sharded with an index above
    `max_shard_bytes`), the EABF modeling file when EABF is on, and the SentencePiece tokenizer if given.
    `dtype` defaults to the parameters' dtype."""
    cfg: LlamaConfig = module.config
    if cfg.rope.type == "dynamic":
        warnings.warn(DYNAMIC_NTK_SERVING, ServingWarning, stacklevel=2)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"Tokenizer file {tokenizer} does not exist (expected a SentencePiece .model).")

    sizes = {name: math.prod(shape) * np_dtype.itemsize for name, shape in expected_tensors(cfg).items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    shard_of = {name: k for k, names in enumerate(shards) for name in names}
    tensors = iter_hf_tensors(module, np_dtype)
    bar = tqdm(total=len(sizes), desc=f"saving {path.name}", disable=not progress, unit="tensor")
    buffer: dict[str, np.ndarray] = {}
    for k, names in enumerate(shards):
        while len(buffer) < len(names):
            name, value = next(tensors)
            assert shard_of[name] == k, name
            buffer[name] = value
            bar.update()
        save_file(buffer, str(path / files[k]), metadata={"format": "pt"})
        usual_mode(path / files[k])  # safetensors writes 0600: readable by all as other files are
        buffer = {}
    bar.close()
    for stale in [SINGLE_FILE, INDEX_FILE] if len(shards) > 1 else [INDEX_FILE]:
        if stale not in files and (path / stale).exists():
            (path / stale).unlink()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: files[shard_of[name]] for name in sizes}}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))

    hf_config = config_to_hf(cfg, torch_dtype=str(np_dtype) if np_dtype != np.dtype("bfloat16") else "bfloat16")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    if cfg.eabf.enabled:
        shutil.copy(EABF_MODELING_FILE, path / EABF_MODELING_FILE.name)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path, model_max_length=cfg.max_position_embeddings)
    return path


def save_tokenizer(sentencepiece_model: str | os.PathLike, path: Path, model_max_length: int) -> None:
    """Copy a SentencePiece model with the files `AutoTokenizer.from_pretrained` needs (Llama conventions)."""
    shutil.copy(sentencepiece_model, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
