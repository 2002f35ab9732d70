"""Model behaviour beyond parity: config validation, packing, causality, dtypes, layout, sharding."""

import contextlib
import io
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import cream_jax
from cream_jax.config import ConfigError
from cream_jax.model import forward
from cream_jax.sharding import logical_to_spec, param_specs
from helpers import relative_error


@pytest.mark.parametrize("overrides,message", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "not divisible by num_key_value_heads=3"),
    (dict(head_dim=7), "head_dim=7 must be a positive even number"),
    (dict(rope={"type": "su"}), "rope.type='su' is not a supported RoPE type"),
    (dict(rope={"type": "yarn", "factor": 4.0}), "needs rope.original_max_position_embeddings"),
    (dict(rope={"type": "llama3", "factor": 8.0}), "needs rope.low_freq_factor, rope.high_freq_factor"),
    (dict(rope={"type": "linear"}), "needs rope.factor"),
    (dict(remat="some"), "remat='some' is not one of"),
    (dict(eabf={"enabled": True, "skip_layers": (0, 5)}), r"skip_layers has \[5\]"),
])
def test_validation_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cream_jax.preset("debug", **overrides)


def test_presets():
    assert abs(cream_jax.preset("llama2-7b").num_params() - 6.738e9) < 0.01e9
    assert abs(cream_jax.preset("llama2-13b").num_params() - 13.016e9) < 0.01e9
    assert abs(cream_jax.preset("llama3-8b").num_params() - 8.030e9) < 0.01e9
    with pytest.raises(ConfigError, match="Unknown model preset 'llama9'"):
        cream_jax.preset("llama9")


def test_every_parameter_has_logical_axis_names():
    model = cream_jax.init(cream_jax.preset("debug"))
    known = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers", "norm"}
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = leaf.get_metadata()["out_sharding"]
        assert len(names) == leaf.value.ndim and set(names) <= known, path
    q = model.model.layers.self_attn.q_proj.weight
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")


def test_packed_rows_do_not_attend_across_documents():
    model = cream_jax.init(cream_jax.preset("debug"))
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 128, 20), rng.integers(0, 128, 28)
    tokens = jnp.asarray(np.concatenate([doc_a, doc_b]))[None]
    positions = jnp.asarray(np.concatenate([np.arange(20), np.arange(28)]))[None]
    segments = jnp.asarray([[1] * 20 + [2] * 28])
    packed = model(tokens, position_ids=positions, segment_ids=segments)
    alone_b = model(jnp.asarray(doc_b)[None])
    np.testing.assert_allclose(packed[:, 20:], alone_b, atol=1e-5)
    unpacked = model(tokens, position_ids=positions)
    assert relative_error(unpacked[:, 20:], alone_b) > 1e-3


def test_causality_follows_sequence_order_not_positions():
    """Changing a later token never changes earlier logits, even when positions run backwards."""
    model = cream_jax.init(cream_jax.preset("debug"))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (1, 16)))
    positions = jnp.arange(1000, 984, -1)[None]  # decreasing position ids
    a = model(tokens, position_ids=positions)
    b = model(tokens.at[0, 10].set((tokens[0, 10] + 1) % 128), position_ids=positions)
    np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
    assert not np.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.slow
def test_bf16_compute_with_fp32_params():
    cfg = cream_jax.preset("tiny-gqa")
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 64)))
    ref = cream_jax.init(cfg)(tokens)
    model = cream_jax.init(cfg.replace(dtype="bfloat16"))
    assert model.model.layers.mlp.up_proj.weight.value.dtype == jnp.float32
    got = model(tokens)
    assert got.dtype == jnp.float32 and relative_error(got, ref) < 0.05

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.grad(lambda p: forward(model.config, p, tokens).mean())(params)
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_scan_equals_unrolled_and_remat_keeps_gradients():
    cfg = cream_jax.preset("debug", num_hidden_layers=3)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 24)))
    params = nnx.to_pure_dict(nnx.state(cream_jax.init(cfg), nnx.Param))

    def grads(**kw):
        return jax.grad(lambda p: forward(cfg.replace(**kw), p, tokens).std())(params)

    ref = grads(scan_layers=False)
    for kw in (dict(), *(dict(remat=r) for r in ("full", "save_attention", "save_proj", "save_dots"))):
        for g, r in zip(jax.tree.leaves(grads(**kw)), jax.tree.leaves(ref)):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def _primitive_count(jaxpr) -> int:
    return len(jaxpr.eqns) + sum(_primitive_count(sub) for sub in jax.extend.core.subjaxprs(jaxpr))


@pytest.mark.slow
def test_save_proj_keeps_the_rotated_queries_and_keys():
    """`save_proj` saves the attention's inputs (after RoPE and EABF's scale) instead of the q and k
    projections: the same memory as `save_dots`, and the backward pass does not run RoPE again."""
    from cream_jax.model import decoder_layer, remat_policy
    from cream_jax.rope import cos_sin, eabf_scale

    cfg = cream_jax.preset("debug", num_hidden_layers=1, eabf={"enabled": True, "base_length": 8, "skip_layers": ()})
    p = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(cream_jax.init(cfg), nnx.Param))["model"]["layers"])
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 16, cfg.hidden_size)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(0, 64, 4), (2, 16))
    cos, sin = cos_sin(cfg, positions)
    scale = eabf_scale(positions, cfg.eabf.base_length)

    def loss(policy):
        layer = lambda p, x: decoder_layer(cfg, p, x, cos, sin, scale, None)  # noqa: E731
        if policy != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(policy))
        return lambda p, x: jnp.sum(layer(p, x) ** 2)

    def saved(policy):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            jax.ad_checkpoint.print_saved_residuals(loss(policy), p, x)
        return out.getvalue()

    proj, dots = saved("save_proj"), saved("save_dots")
    for name in ("attention_query", "attention_key"):
        assert f"named '{name}'" in proj, proj
    for name in ("q_proj", "k_proj"):
        assert f"named '{name}'" not in proj, proj

    def saved_bytes(text):
        sizes = {"f32": 4, "bf16": 2, "i32": 4, "s32": 4}
        return sum(sizes[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
                   for dtype, dims in re.findall(r"\b(f32|bf16|i32|s32)\[([\d,]*)\]", text))

    assert saved_bytes(proj) <= saved_bytes(dots), (proj, dots)
    backward = {policy: _primitive_count(jax.make_jaxpr(jax.grad(loss(policy), argnums=(0, 1)))(p, x).jaxpr)
                for policy in ("save_proj", "save_dots")}
    assert backward["save_proj"] < backward["save_dots"], backward
    got, want = (jax.grad(loss(policy), argnums=(0, 1))(p, x) for policy in ("save_proj", "none"))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_sharded_forward_matches_single_device():
    """Params sharded by the logical rule table on a (data=2, fsdp=2, tensor=2) mesh."""
    cfg = cream_jax.preset("tiny-gqa")
    model = cream_jax.init(cfg)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 512, (4, 32)))
    ref = forward(cfg, params, tokens)

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    specs = param_specs(model)
    with jax.set_mesh(mesh):
        sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
        assert sharded["model"]["layers"]["mlp"]["up_proj"]["weight"].sharding.spec == P(None, "fsdp", "tensor")
        tokens_sharded = jax.device_put(tokens, NamedSharding(mesh, logical_to_spec(("batch", "length"))))
        got = jax.jit(lambda p, t: forward(cfg, p, t))(sharded, tokens_sharded)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,x_shape,w_shape", [
    ("q_proj", (2, 5, 16), (16, 4, 8)),   # one input axis, two output axes
    ("o_proj", (2, 5, 4, 8), (4, 8, 16)),  # two input axes
    ("down_proj", (2, 5, 24), (24, 16)),
])
def test_projection_is_the_same_einsum_on_cpu_and_tpu(name, x_shape, w_shape):
    """`project` is a 2D matmul on CPU and a tensordot elsewhere (docs/bench.md, docs/plan_v5p8.md):
    both are the einsum of the HF layout, and only the CPU form is a single rank-2 dot in the HLO."""
    from cream_jax.model import project

    r = np.random.default_rng(0)
    x, w = jnp.asarray(r.standard_normal(x_shape), jnp.float32), jnp.asarray(r.standard_normal(w_shape), jnp.float32)
    n_in = len(x_shape) - 2
    spec = {1: "bsi,i...->bs...", 2: "bsij,ij...->bs..."}[n_in]
    expected = jnp.einsum(spec, x, w)
    on_cpu = project(x, w, name)
    elsewhere = project(x, w, name, "tpu")
    tpu_hlo = jax.jit(lambda x, w: project(x, w, name, "tpu")).lower(x, w).as_text()
    cpu_hlo = jax.jit(lambda x, w: project(x, w, name)).lower(x, w).as_text()
    np.testing.assert_allclose(on_cpu, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(elsewhere, expected, rtol=1e-5, atol=1e-5)
    assert on_cpu.shape == elsewhere.shape == expected.shape
    assert f"tensor<{x_shape[0] * x_shape[1]}x" in cpu_hlo.split("dot_general")[1].split("->")[0]
    assert f"tensor<{x_shape[0]}x{x_shape[1]}x" in tpu_hlo.split("dot_general")[1].split("->")[0]


def _rotary_concatenating_negated_half(x_BxSxHxK, cos_BxSxK, sin_BxSxK):
    """The textbook rotate-half form: x * cos + concat(-x2, x1) * sin, all in float32."""
    x = x_BxSxHxK.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos_BxSxK[:, :, None, :], sin_BxSxK[:, :, None, :]
    return (x * cos + rotated * sin).astype(x_BxSxHxK.dtype)


def _rotary_then_kernel_layout(rotary):
    """RoPE forward and backward as the splash path runs it: rotate, then transpose to [B, H, S, K]."""
    def fwd_bwd(x_BxSxHxK, cos_BxSxK, sin_BxSxK, g_BxHxSxK):
        y, vjp = jax.vjp(lambda x: rotary(x, cos_BxSxK, sin_BxSxK).transpose(0, 2, 1, 3), x_BxSxHxK)
        return y, vjp(g_BxHxSxK)[0]
    return fwd_bwd


@pytest.mark.parametrize("form", ["_rotary_per_half", "_rotary_by_matmul"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotary_equals_the_textbook_form(dtype, form):
    """The same products and sums: equal bit for bit op by op, and up to one rounding under jit (XLA:CPU
    fuses the forms differently). One exception: in bfloat16 the matmul form's gradient adds the two paths'
    cotangents after each is rounded to bfloat16 (x feeds the cast and the matmul separately)."""
    from cream_jax import rope

    rotary = getattr(rope, form)
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, 16, 4, 32)), dtype)
    angles = np.tile(r.uniform(0, 100, (2, 16, 16)), 2)  # HF repeats the frequencies over both halves
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    g = jnp.asarray(r.standard_normal((2, 4, 16, 32)), dtype)
    for jit in (False, True):
        wrap = jax.jit if jit else (lambda f: f)
        got = wrap(_rotary_then_kernel_layout(rotary))(x, cos, sin, g)
        want = wrap(_rotary_then_kernel_layout(_rotary_concatenating_negated_half))(x, cos, sin, g)
        for a, b, what in zip(got, want, ("value", "gradient")):
            assert a.dtype == b.dtype == dtype
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            if not jit and not (what == "gradient" and form == "_rotary_by_matmul" and dtype == jnp.bfloat16):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(a, b, rtol=0, atol=2 * float(jnp.finfo(dtype).eps) * np.abs(b).max())


def test_rotary_is_a_matmul_on_tpu_only():
    """Compiled for TPU (as the planner does), RoPE takes the matmul form; on this CPU, the per-half form."""
    from cream_jax.rope import apply_rotary

    x, cos = jnp.ones((1, 4, 2, 8), jnp.bfloat16), jnp.ones((1, 4, 8), jnp.float32)

    def matmuls(platform=""):
        return str(jax.make_jaxpr(lambda *a: apply_rotary(*a, platform))(x, cos, cos)).count("dot_general")

    assert matmuls() == 0
    assert matmuls("tpu") == 1


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_rotary_on_tpu_is_cheaper_than_the_textbook_form():
    """On TPU the head dim (128) is the lane dim. The textbook form materialises the query in float32 and
    its negated half, then concatenates; rotating each half on its own avoids the copies; rotate_half as a
    matmul also avoids moving half the lanes. The TPU compiler's estimate for RoPE's forward and backward on
    one chip's Llama-2-7B queries (4 x 4096)."""
    from cream_jax import rope, tpu

    B, S, H, K = 4, 4096, 32, 128
    shapes = [jax.ShapeDtypeStruct(s, d) for s, d in [((B, S, H, K), jnp.bfloat16), ((B, S, K), jnp.float32),
                                                       ((B, S, K), jnp.float32), ((B, H, S, K), jnp.bfloat16)]]

    def estimate(rotary):
        return tpu.compile_for_tpu(_rotary_then_kernel_layout(rotary), *shapes).cost_analysis()["optimal_seconds"]

    textbook, per_half, matmul = (estimate(f) for f in (_rotary_concatenating_negated_half, rope._rotary_per_half,
                                                         rope._rotary_by_matmul))
    assert per_half < 0.6 * textbook, (per_half, textbook)
    assert matmul < 0.8 * per_half, (matmul, per_half)
