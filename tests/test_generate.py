"""KV-cache generation: chunked prefill and decode steps equal full recomputation for every RoPE type and
EABF; greedy generation equals transformers' `generate` on the exported model."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cream_jax import generate, hf, sharding
from cream_jax import model as model_lib
from cream_jax.config import preset

ROPES = {
    "default": {},
    "linear": {"rope": {"type": "linear", "factor": 4.0}},
    "dynamic": {"rope": {"type": "dynamic", "factor": 2.0}},  # within max_position_embeddings
    "ntk": {"rope": {"type": "ntk", "factor": 4.0}},
    "yarn": {"rope": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    "llama3": {"rope": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 16}},
    "eabf": {"rope": {"theta": 500000.0}, "eabf": {"enabled": True, "base_length": 8, "skip_layers": (0,)}},
}


def _model(**overrides):
    cfg = preset("debug", **{"vocab_size": 97, "max_position_embeddings": 64, "num_key_value_heads": 2, **overrides})
    module = model_lib.init(cfg, seed=1)
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, params)  # large weights: errors would show
    return cfg, params


@pytest.mark.parametrize("rope", ROPES)
def test_cached_logits_equal_full_recomputation(rope):
    cfg, params = _model(**ROPES[rope])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    full = np.asarray(model_lib.forward(cfg, params, jnp.asarray(tokens)))
    # 30 slots in key blocks of 8: four blocks, the last overlapping the third
    cache = generate.init_cache(cfg, batch=2, max_len=30)
    last, cache = generate.prefill(cfg, params, tokens[:, :13], cache, chunk=5, block=8)  # 5 + 5 + 3 (padded)
    cached = [np.asarray(last)]
    for t in range(13, 24):  # one token at a time
        logits, cache = generate.extend(cfg, params, jnp.asarray(tokens[:, t:t + 1]), cache, 1, block=8)
        cached.append(np.asarray(logits[:, 0]))
    cached = np.stack(cached[:-1], axis=1)
    scale = np.abs(full).max()
    assert int(cache.length) == 24
    np.testing.assert_allclose(cached / scale, full[:, 12:23] / scale, atol=1e-4)


def test_prompt_too_long_for_the_cache():
    cfg, params = _model()
    with pytest.raises(ValueError, match="does not fit the cache of 8 slots"):
        generate.prefill(cfg, params, np.zeros((1, 9), np.int32), generate.init_cache(cfg, 1, 8))


@pytest.mark.torch
def test_greedy_generation_equals_transformers(tmp_path, torch_and_transformers):
    torch, transformers = torch_and_transformers
    cfg, params = _model(rope={"type": "linear", "factor": 2.0})
    module = model_lib.init(cfg, seed=1)
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)
    hf.save_hf(module, tmp_path, progress=False)
    prompt = np.random.default_rng(1).integers(3, cfg.vocab_size, (1, 11)).astype(np.int32)
    ours = generate.generate(cfg, params, prompt, 32, chunk=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_sampling_is_reproducible_and_varies_with_the_key():
    cfg, params = _model()
    prompt = np.ones((2, 5), np.int32)
    a = generate.generate(cfg, params, prompt, 16, temperature=1.0, key=jax.random.key(0))
    b = generate.generate(cfg, params, prompt, 16, temperature=1.0, key=jax.random.key(0))
    c = generate.generate(cfg, params, prompt, 16, temperature=1.0, key=jax.random.key(1))
    assert a.shape == (2, 21) and (a == b).all() and not (a == c).all()


@pytest.mark.slow
def test_left_padded_batch_equals_each_prompt_alone():
    cfg, params = _model(**ROPES["eabf"])
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (7, 12, 9)]
    batch, start = generate.left_pad(prompts)
    together = generate.generate(cfg, params, batch, 10, chunk=4, start_B=start, block=4)  # padding-only blocks
    for row, prompt in enumerate(prompts):
        alone = generate.generate(cfg, params, np.asarray([prompt], np.int32), 10, chunk=4)
        assert together[row, -10:].tolist() == alone[0, -10:].tolist()


def test_block_skipping_computes_the_causal_blocks_only(monkeypatch):
    """Counted key-block visits of a 256-token prefill in chunks of 32 against a 256-slot cache in blocks of
    32, per layer: the 8 chunks see 1, 2, ..., 8 blocks (36) with skipping, 8 each (64) without; with 64 slots
    of left padding the first two blocks are never computed. Same logits."""
    cfg, params = _model()
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 256)).astype(np.int32)
    calls = []
    block_update = generate._block_update
    monkeypatch.setattr(generate, "_block_update", lambda *a: calls.append(1) or block_update(*a))

    def visits(skip, start=None):
        calls.clear()
        with jax.disable_jit():  # the block loop runs in Python, one call per block computed
            logits, _ = generate.prefill(cfg, params, tokens, generate.init_cache(cfg, 1, 256, start), chunk=32,
                                         block=32, skip=skip)
        return len(calls) // cfg.num_hidden_layers, np.asarray(logits)

    skipped, logits = visits(True)
    full, reference = visits(False)
    assert (skipped, full) == (36, 64)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
    padded, _ = visits(True, start=[64])
    assert padded == 36 - 3 - 2 * 6  # chunks 1, 2 (all padding) compute none; chunks 3..8 skip blocks 0 and 1


@pytest.mark.slow
def test_generation_on_a_mesh_shards_the_cache_over_heads():
    from cream_jax import sharding

    cfg, params = _model()
    prompt = np.random.default_rng(3).integers(3, cfg.vocab_size, (2, 9)).astype(np.int32)
    alone = generate.generate(cfg, params, prompt, 8, chunk=4)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 2}, jax.devices()[:2])
    with jax.set_mesh(mesh):
        sharded = generate.generate(cfg, params, prompt, 8, chunk=4)
        _, cache = generate.prefill(cfg, params, prompt, generate.init_cache(cfg, 2, 16), chunk=4)
    assert (sharded == alone).all()
    assert cache.k.sharding.spec[2] == "tensor"  # [layers, batch, kv heads, slots, head_dim]


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """A dynamic-NTK x4 model with max_position_embeddings=64, and its export for transformers."""
    path = tmp_path_factory.mktemp("dynamic")
    cfg, params = _model(rope={"type": "dynamic", "factor": 4.0})
    params = jax.tree.map(lambda x: x / 4.0 if x.ndim > 1 else x, params)  # moderate logits: argmax ties are rare
    module = model_lib.init(cfg, seed=1)
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)
    hf.save_hf(module, path, progress=False)
    return cfg, params, path


@pytest.mark.torch
@pytest.mark.slow
def test_dynamic_ntk_prefill_in_chunks_equals_transformers(dynamic_export, torch_and_transformers):
    """A 240-token prompt (past max_position_embeddings=64) prefilled in chunks of 32: every prompt token is
    rotated with the one theta of the whole prompt, as transformers' full forward does; decoding then grows
    theta per token, as transformers' `generate` does. On a mesh too."""
    from cream_jax import sharding

    torch, transformers = torch_and_transformers
    cfg, params, path = dynamic_export
    prompt = np.random.default_rng(4).integers(3, cfg.vocab_size, (1, 240)).astype(np.int32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        full = model(torch.from_numpy(prompt).long()).logits[0, -1].numpy()
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # its theta is stateful: afresh
    with torch.no_grad():
        theirs = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    last, _ = generate.prefill(cfg, params, prompt, generate.init_cache(cfg, 1, 256), chunk=32)
    np.testing.assert_allclose(np.asarray(last[0]), full, atol=1e-4 * np.abs(full).max())
    ours = generate.generate(cfg, params, prompt, 16, chunk=32)
    assert ours.tolist() == theirs.tolist()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 2}, jax.devices()[:2])
    with jax.set_mesh(mesh):
        assert generate.generate(cfg, params, prompt, 16, chunk=32).tolist() == theirs.tolist()


@pytest.mark.torch
def test_dynamic_ntk_perplexity_in_chunks_equals_transformers(dynamic_export, torch_and_transformers):
    """Perplexity's chunked NLL of a 200-token sequence (past max_position_embeddings) equals transformers'
    full forward pass: one theta for the whole sequence in every chunk."""
    from cream_jax import evaluate

    torch, transformers = torch_and_transformers
    cfg, params, path = dynamic_export
    ids = np.random.default_rng(5).integers(3, cfg.vocab_size, 200).astype(np.int32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(ids[None]).long()).logits[0].double(), -1).numpy()
    theirs = -logp[np.arange(199), ids[1:]]
    ours = evaluate.sequence_nll(cfg, params, ids, chunk=48)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads, mesh", [(4, None), (1, None), (2, {"data": 1, "fsdp": 1, "tensor": 2})])
def test_pallas_kernel_equals_the_block_loop(kv_heads, mesh):
    """The TPU kernel (`cache_kernel`, interpreted here) against `cached_attention`'s block loop: EABF, MHA and
    grouped heads (G = 4, 2), left padding (one row's first key block all padding), a cache of 300 slots in
    blocks of 128 (the last block partly past the end), a prefill in chunks of 64 and a decode; on a mesh with
    kv heads over `tensor`, inside shard_map."""
    cfg, params = _model(num_key_value_heads=kv_heads, **ROPES["eabf"])
    rng = np.random.default_rng(5)
    tokens, start = generate.left_pad([list(rng.integers(3, cfg.vocab_size, n)) for n in (150, 290)])

    def run(kernel):
        cache = generate.init_cache(cfg, 2, 300, start)
        logits, cache = generate.prefill(cfg, params, tokens, cache, chunk=64, block=128, kernel=kernel)
        new, n, _ = generate.decode(cfg, params, logits, cache, 6, block=128, kernel=kernel)
        return np.asarray(logits), np.asarray(new)

    with jax.set_mesh(sharding.make_mesh(mesh, jax.devices()[:2])) if mesh else contextlib.nullcontext():
        (loop_logits, loop_new), (kernel_logits, kernel_new) = run(False), run(True)
    scale = np.abs(loop_logits).max()
    np.testing.assert_allclose(kernel_logits / scale, loop_logits / scale, atol=1e-5)
    assert (kernel_new == loop_new).all()


def test_kernel_work_counts_the_blocks_the_loop_visits():
    """The planner's model of the kernel (`cache_kernel.work`) computes, over a prompt's chunks, the key blocks
    `generate.block_range` visits (one query block per chunk, G = 1), per group of kv heads and row; a decode
    step at a full cache computes every block, all heads in one step per block."""
    from cream_jax import cache_kernel, plan_eval

    length, chunk, block = 4096, 512, 256
    groups = 4 // cache_kernel.heads_per_step(4, chunk)  # two heads per step: 2 x 512 query rows
    assert groups == 2
    chunks = [cache_kernel.work(2, 4, 1, chunk, length, block, 64, 2, i * chunk) for i in range(length // chunk)]
    assert sum(w.computed for w in chunks) == 2 * groups * sum(plan_eval.visited_blocks(length, chunk, block))
    assert all(w.steps == 2 * groups * (length // block) for w in chunks)
    step = cache_kernel.work(2, 4, 4, 1, length, block, 64, 2, length - 1)
    assert (step.steps, step.computed) == (2 * length // block, 2 * length // block)
    assert step.step_bytes == 2 * 4 * block * 64 * 2
