"""Entropy-aware ABF: the scale, its placement after RoPE, and the trust_remote_code export."""

import jax.numpy as jnp
import numpy as np
import pytest

import cream_jax
from cream_jax.rope import eabf_scale
from helpers import relative_error


def test_scale_values_are_pinned():
    got = np.asarray(eabf_scale(jnp.array([0, 100, 4095, 8191, 32767]), 4096))
    np.testing.assert_allclose(got, [1.0, 1.0, 1.0, 1.0833, 1.25], atol=5e-5)


def eabf_config(skip_layers, **kw):
    return cream_jax.preset("debug", num_hidden_layers=3, max_position_embeddings=1024,
                            rope={"theta": 500000.0},
                            eabf={"enabled": True, "base_length": 16, "skip_layers": skip_layers}, **kw)


@pytest.mark.torch
@pytest.mark.parametrize("skip_layers", [(0, 1), ()])
def test_export_with_remote_code_matches(tmp_path, torch_and_transformers, skip_layers):
    torch, transformers = torch_and_transformers
    ours = cream_jax.init(eabf_config(skip_layers), seed=1)
    cream_jax.save_hf(ours, tmp_path, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                           attn_implementation="eager").eval()
    assert type(hf).__name__ == "EabfLlamaForCausalLM"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (2, 40))
    positions = np.sort(rng.choice(1024, (2, 40), replace=False), axis=1)  # well past c = 16: scales up to 2.5
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens), position_ids=torch.from_numpy(positions)).logits.numpy()
    got = ours(jnp.asarray(tokens), position_ids=jnp.asarray(positions))
    assert relative_error(got, ref) <= 1e-4
    # and the scale matters: the same weights without EABF differ
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        plain_logits = plain(torch.from_numpy(tokens), position_ids=torch.from_numpy(positions)).logits.numpy()
    assert relative_error(plain_logits, ref) > 1e-3


@pytest.mark.slow
def test_skip_layers_change_the_output():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (1, 32)))
    positions = jnp.arange(500, 532)[None]
    a = cream_jax.init(eabf_config((0, 1)), seed=0)(tokens, position_ids=positions)
    b = cream_jax.init(eabf_config(()), seed=0)(tokens, position_ids=positions)
    c = cream_jax.init(eabf_config((0, 1, 2)), seed=0)(tokens, position_ids=positions)
    off = cream_jax.init(eabf_config(()).replace(eabf={"enabled": False}), seed=0)(tokens, position_ids=positions)
    assert relative_error(a, b) > 1e-4
    np.testing.assert_array_equal(np.asarray(c), np.asarray(off))  # all layers skipped = no EABF


def test_eabf_with_blockwise_and_gqa():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 48)))
    positions = jnp.asarray(np.sort(np.random.default_rng(2).choice(1024, (2, 48), replace=False), axis=1))
    cfg = eabf_config((0,), num_key_value_heads=1)
    ref = cream_jax.init(cfg, seed=0)(tokens, position_ids=positions)
    got = cream_jax.init(cfg.replace(attention="blockwise", attention_block_size=16), seed=0)(
        tokens, position_ids=positions)
    assert relative_error(got, ref) <= 1e-5
