"""Logit parity with transformers' PyTorch LlamaForCausalLM (fp32, eager attention, random weights)."""

import jax.numpy as jnp
import numpy as np
import pytest

import cream_jax
from helpers import cream_like_positions, hf_logits, random_hf_llama, relative_error

TOL = 1e-4  # max |difference| relative to the largest logit

CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa2": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "theta500k": dict(rope_theta=500000.0),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


@pytest.mark.torch
@pytest.mark.parametrize("backend", ["dot_product", "blockwise"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case, backend):
    hf = random_hf_llama(tmp_path, **CASES[case])
    ours = cream_jax.load_hf(tmp_path, progress=False, attention=backend, attention_block_size=16)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 48))
    positions = np.broadcast_to(np.arange(48), (2, 48)).copy()
    got = ours(jnp.asarray(tokens), position_ids=jnp.asarray(positions))
    assert got.shape == (2, 48, 256)
    assert relative_error(got, hf_logits(hf, tokens, positions)) <= TOL


@pytest.mark.torch
@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 8.0}])
@pytest.mark.parametrize("backend", ["dot_product", "blockwise"])
def test_cream_positions_reaching_32k(tmp_path, rope_scaling, backend):
    """Non-contiguous, jumping position ids up to 32767 (a CREAM draw for N=96, L=32768)."""
    hf = random_hf_llama(tmp_path, rope_scaling=rope_scaling, max_position_embeddings=32768)
    ours = cream_jax.load_hf(tmp_path, progress=False, attention=backend, attention_block_size=32)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, (2, 96))
    positions = cream_like_positions(rng, 2, 96, 32768)
    assert positions.max() == 32767 and np.any(np.diff(positions, axis=1) > 1)
    got = ours(jnp.asarray(tokens), position_ids=jnp.asarray(positions))
    assert relative_error(got, hf_logits(hf, tokens, positions)) <= TOL


@pytest.mark.torch
def test_positions_up_to_a_million(tmp_path):
    hf = random_hf_llama(tmp_path, rope_theta=500000.0, max_position_embeddings=1 << 20)
    ours = cream_jax.load_hf(tmp_path, progress=False)
    tokens = np.random.default_rng(2).integers(0, 256, (1, 32))
    positions = (np.arange(32) * 30000 + 118575)[None]  # ends at 1,048,575
    got = ours(jnp.asarray(tokens), position_ids=jnp.asarray(positions))
    assert relative_error(got, hf_logits(hf, tokens, positions)) <= TOL


@pytest.mark.torch
def test_dynamic_ntk_beyond_max_position_embeddings(tmp_path):
    hf = random_hf_llama(tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=64)
    ours = cream_jax.load_hf(tmp_path, progress=False)
    tokens = np.random.default_rng(3).integers(0, 256, (1, 160))  # 160 > 64: the base grows
    positions = np.arange(160)[None]
    got = ours(jnp.asarray(tokens), position_ids=jnp.asarray(positions))
    assert relative_error(got, hf_logits(hf, tokens, positions)) <= TOL
    plain = cream_jax.load_hf(tmp_path, progress=False, rope={"type": "default", "factor": None})
    assert relative_error(plain(jnp.asarray(tokens), position_ids=jnp.asarray(positions)),
                          hf_logits(hf, tokens, positions)) > 1e-3  # the dynamic branch really ran


@pytest.mark.torch
@pytest.mark.parametrize("remat", ["full", "save_attention", "save_proj", "save_dots"])
def test_scan_and_remat(tmp_path, remat):
    hf = random_hf_llama(tmp_path, num_hidden_layers=3)
    ours = cream_jax.load_hf(tmp_path, progress=False, remat=remat, scan_layers=True)
    tokens = np.random.default_rng(4).integers(0, 256, (2, 40))
    positions = np.broadcast_to(np.arange(40), (2, 40)).copy()
    assert relative_error(ours(jnp.asarray(tokens), position_ids=jnp.asarray(positions)),
                          hf_logits(hf, tokens, positions)) <= TOL


@pytest.mark.torch
def test_ntk_equals_hf_with_the_equivalent_theta(tmp_path):
    d = 16
    theta = 10000.0 * 4.0 ** (d / (d - 2))
    hf = random_hf_llama(tmp_path, rope_theta=theta)
    ours = cream_jax.load_hf(tmp_path, progress=False, rope={"type": "ntk", "theta": 10000.0, "factor": 4.0})
    tokens = np.random.default_rng(5).integers(0, 256, (1, 64))
    positions = np.arange(0, 640, 10)[None]
    assert relative_error(ours(jnp.asarray(tokens), position_ids=jnp.asarray(positions)),
                          hf_logits(hf, tokens, positions)) <= TOL
