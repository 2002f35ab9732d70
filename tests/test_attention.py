"""blockwise vs dot_product: values, gradients, masking, and memory that grows linearly in S."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cream_jax import attention
from cream_jax.attention import attend
from cream_jax.config import ConfigError, LlamaConfig
from cream_jax.tpu import compile_for_tpu, memory


def qkv(seed, B, S, H, N, K, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (B, S, H, K), dtype), jax.random.normal(k2, (B, S, N, K), dtype),
            jax.random.normal(k3, (B, S, N, K), dtype))


def packed_segments(B, S, seed=0):
    """Random document boundaries per row (segment ids rise along the row)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.stack([np.cumsum(rng.random(S) < 0.05) for _ in range(B)]).astype(np.int32))


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.slow
@pytest.mark.parametrize("S,block,H,N,packed", [
    (64, 16, 4, 4, False),   # MHA, exact blocks
    (100, 32, 4, 2, True),   # GQA, padded last block, packed documents
    (96, 32, 6, 1, True),    # MQA
    (40, 64, 2, 2, False),   # block larger than S
])
def test_blockwise_matches_dot_product(S, block, H, N, packed):
    q, k, v = qkv(0, 2, S, H, N, 16)
    seg = packed_segments(2, S) if packed else None
    cot = jax.random.normal(jax.random.key(9), q.shape)

    def loss(backend):
        return lambda q, k, v: jnp.sum(attend(q, k, v, seg, backend=backend, block_size=block) * cot)

    ref = attend(q, k, v, seg, backend="dot_product")
    got = attend(q, k, v, seg, backend="blockwise", block_size=block)
    assert rel(got, ref) <= 1e-5
    grads_ref = jax.grad(loss("dot_product"), argnums=(0, 1, 2))(q, k, v)
    grads = jax.jit(jax.grad(loss("blockwise"), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, grads_ref):
        assert rel(g, r) <= 1e-5


@pytest.mark.slow
def test_segments_isolate_documents():
    """A packed row equals its documents run one by one."""
    q, k, v = qkv(1, 1, 48, 2, 2, 8)
    seg = jnp.asarray([[0] * 20 + [1] * 28], jnp.int32)
    for backend in ("dot_product", "blockwise"):
        packed = attend(q, k, v, seg, backend=backend, block_size=16)
        first = attend(q[:, :20], k[:, :20], v[:, :20], backend=backend, block_size=16)
        second = attend(q[:, 20:], k[:, 20:], v[:, 20:], backend=backend, block_size=16)
        np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-5)


def test_bf16_blockwise_close_to_fp32():
    q, k, v = qkv(2, 1, 128, 4, 2, 32)
    ref = attend(q, k, v, backend="dot_product")
    got = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), backend="blockwise", block_size=32)
    assert got.dtype == jnp.bfloat16 and rel(got.astype(jnp.float32), ref) < 3e-2


def _grad_temporaries(backend, S, H=4, K=128):
    shape = jax.ShapeDtypeStruct((1, S, H, K), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, backend=backend, block_size=512))

    compiled = compile_for_tpu(jax.grad(loss, argnums=(0, 1, 2)), shape, shape, shape, topology="v5p-8")
    return memory(compiled).temporaries


def growth_exponent(lengths, sizes):
    """Slope of log(size) against log(S): 1 for linear growth, 2 for quadratic."""
    return float(np.polyfit(np.log(lengths), np.log(sizes), 1)[0])


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_blockwise_gradient_memory_is_linear_in_length():
    """Forward+backward temporaries from the TPU compiler (XLA:CPU reports 0 for large buffers)."""
    lengths = [2048, 4096, 8192]
    blockwise = [_grad_temporaries("blockwise", S) for S in lengths]
    dense = [_grad_temporaries("dot_product", S) for S in lengths]
    print("\n S      blockwise MiB   dot_product MiB")
    for S, b, d in zip(lengths, blockwise, dense):
        print(f"{S:6d} {b / 2**20:14.1f} {d / 2**20:17.1f}")
    assert growth_exponent(lengths, blockwise) < 1.2
    assert growth_exponent(lengths, dense) > 1.8
    assert blockwise[2] * 8 < dense[2]  # at 8K the dense gradient needs far more


@pytest.mark.slow
def test_unrolled_block_loops_compute_the_same():
    from cream_jax.attention import unrolled_block_loops

    q, k, v = qkv(3, 1, 80, 4, 2, 16)
    seg = packed_segments(1, 80)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg, backend="blockwise", block_size=32) ** 2)  # noqa: E731
    ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    with unrolled_block_loops():
        got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        text = jax.jit(jax.grad(loss)).lower(q, k, v).as_text()
    assert "while" not in text
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("H,N,packed", [(4, 4, False), (4, 2, True), (4, 1, True)])
def test_splash_interpret_matches_dot_product(H, N, packed):
    """The Pallas TPU kernel in interpret mode (CPU): values and gradients."""
    q, k, v = qkv(4, 2, 256, H, N, 64)
    seg = packed_segments(2, 256, seed=1) if packed else None
    ref = attend(q, k, v, seg, backend="dot_product")
    got = attend(q, k, v, seg, backend="splash", block_size=128)
    assert rel(got, ref) <= 1e-5
    loss = lambda b: lambda q, k, v: jnp.sum(attend(q, k, v, seg, backend=b, block_size=128) ** 2)  # noqa: E731
    for g, r in zip(jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss("dot_product"), argnums=(0, 1, 2))(q, k, v)):
        assert rel(g, r) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["blockwise", "splash"])
def test_remat_policies_save_the_attention_residuals(backend):
    """Policies that save `config.ATTENTION_RESIDUALS` keep the forward pass's output and logsumexp, so the backward
    pass does not run the attention forward again; gradients are unchanged."""
    from cream_jax.model import remat_policy

    q, k, v = qkv(5, 1, 256, 4, 2, 64)
    seg = packed_segments(1, 256, seed=2)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg, backend=backend, block_size=128) ** 2)  # noqa: E731
    ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for policy in ("full", "save_attention", "save_proj", "save_dots"):
        remat = jax.checkpoint(loss, policy=remat_policy(policy))
        with contextlib.redirect_stdout(io.StringIO()) as saved:
            jax.ad_checkpoint.print_saved_residuals(remat, q, k, v)
        saved = saved.getvalue()  # splash's named values leave its jitted call: they show as its outputs
        named = sum(saved.count(s) for s in ("named 'attention_residuals'", "jitted function '_splash_attention'"))
        assert named == (0 if policy == "full" else 2), (policy, saved)  # the output and its logsumexp
    got = jax.grad(jax.checkpoint(loss, policy=remat_policy("save_attention")), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        assert rel(g, r) <= 1e-5


def test_auto_backend():
    from cream_jax.attention import resolve_backend

    assert resolve_backend("auto") == "blockwise"  # this machine has no TPU
    assert resolve_backend("auto", platform="tpu") == "splash"


def test_block_size_defaults_per_backend():
    """0 takes the backend's own block (blockwise 128, splash 512); an explicit size wins."""
    assert attention.block_size_for("blockwise") == 128
    assert attention.block_size_for("splash") == 512
    assert attention.block_size_for("blockwise", 64) == 64
    assert attention.block_size_for("auto", platform="tpu") == 512
    with pytest.raises(ConfigError, match="attention_block_size=-1"):
        LlamaConfig(attention_block_size=-1)
