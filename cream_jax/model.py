"""A Llama in Flax NNX with Hugging Face's parameter names and layout.

Parameter paths mirror `LlamaForCausalLM`'s state dict: `model.embed_tokens.weight`,
`model.layers.self_attn.q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`.
The decoder layers are stacked on a leading `layers` axis and run by a
`jax.lax.scan`, so compile time does not grow with depth; a torch Linear
`(out, in)` becomes our `(in, out)` (heads split out), so conversion is a
transpose, a reshape and a stack (see `hf.py`).

Shape suffixes, the one legend for every module (`x_BxSxD` is [batch, sequence, hidden]):
B batch, S sequence (the training window N of docs/methods.md), C a chunk of new tokens, T cache slots,
D hidden, F intermediate, V vocab, H query heads, N kv heads, G query heads per kv head (H = N x G),
K head_dim, L layers. Scalars keep their names (`window`, `target`); public fields carry no suffix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from cream_jax import rope
from cream_jax import platform as platform_lib
from cream_jax.attention import attend
from cream_jax.config import ATTENTION_RESIDUALS, LlamaConfig
from cream_jax.sharding import constrain

# How many leading (input) axes each projection's kernel has; the rest are outputs.
PROJECTION_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2,
                         "gate_proj": 1, "up_proj": 1, "down_proj": 1, "lm_head": 1}
# The names `save_proj` keeps: the queries and keys after RoPE (named in `attention_inputs`), not the q and k
# projections, and the other projections' outputs.
_SAVE_PROJ_NAMES = ("attention_query", "attention_key", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Weight(nnx.Module):
    """One tensor named `weight`, as in torch, with its logical axis names."""

    def __init__(self, value: jax.Array, names: tuple[str, ...]):
        self.weight = nnx.Param(value, sharding_names=names, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, dtype):
        L, D, H, N, K, std = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                              cfg.num_key_value_heads, cfg.head_dim, cfg.initializer_range)
        self.q_proj = Weight(_normal(rngs, (L, D, H, K), std, dtype), ("layers", "embed", "heads", "head_dim"))
        self.k_proj = Weight(_normal(rngs, (L, D, N, K), std, dtype), ("layers", "embed", "kv_heads", "head_dim"))
        self.v_proj = Weight(_normal(rngs, (L, D, N, K), std, dtype), ("layers", "embed", "kv_heads", "head_dim"))
        self.o_proj = Weight(_normal(rngs, (L, H, K, D), std, dtype), ("layers", "heads", "head_dim", "embed"))


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, dtype):
        L, D, F, std = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.gate_proj = Weight(_normal(rngs, (L, D, F), std, dtype), ("layers", "embed", "mlp"))
        self.up_proj = Weight(_normal(rngs, (L, D, F), std, dtype), ("layers", "embed", "mlp"))
        self.down_proj = Weight(_normal(rngs, (L, F, D), std, dtype), ("layers", "mlp", "embed"))


class DecoderLayers(nnx.Module):
    """All decoder layers' parameters, stacked on the leading `layers` axis."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, dtype):
        L, D = cfg.num_hidden_layers, cfg.hidden_size
        self.self_attn = Attention(cfg, rngs, dtype)
        self.mlp = MLP(cfg, rngs, dtype)
        self.input_layernorm = Weight(jnp.ones((L, D), dtype), ("layers", "norm"))
        self.post_attention_layernorm = Weight(jnp.ones((L, D), dtype), ("layers", "norm"))


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, dtype):
        self.embed_tokens = Weight(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.initializer_range, dtype),
                                   ("vocab", "embed"))
        self.layers = DecoderLayers(cfg, rngs, dtype)
        self.norm = Weight(jnp.ones((cfg.hidden_size,), dtype), ("norm",))


class Llama(nnx.Module):
    """`Llama(config, rngs=nnx.Rngs(0))(tokens, position_ids=..., segment_ids=...) -> logits [B,S,V]` (float32)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.param_dtype)
        self.model = LlamaModel(config, rngs, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Weight(_normal(rngs, (config.hidden_size, config.vocab_size), config.initializer_range,
                                          dtype), ("embed", "vocab"))

    def __call__(self, tokens_BxS: jax.Array, position_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return forward(self.config, nnx.to_pure_dict(nnx.state(self, nnx.Param)), tokens_BxS,
                       position_ids=position_ids, segment_ids=segment_ids)


def rms_norm(x_BxSxD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    """As HF: normalise in float32, cast back, then multiply by the weight."""
    x = x_BxSxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return weight_D.astype(x_BxSxD.dtype) * x.astype(x_BxSxD.dtype)


def project(x: jax.Array, w: jax.Array, name: str, platform: str = "",
            preferred_element_type: jax.typing.DTypeLike | None = None) -> jax.Array:
    """`x @ w` over the kernel's input axes (`PROJECTION_INPUT_AXES[name]`), named `name` for the remat
    policies: the einsum "bsd,dhk->bshk" for q_proj, "bshk,hkd->bsd" for o_proj, and so on.

    On CPU it runs as one 2D matmul of [batch x length, in] by [in, out]: XLA:CPU lays out the backward
    pass of the 3D form with transposing copies, which the 2D form avoids. On TPU the 3D form plans faster
    (docs/plan_v5p8.md). `platform`: platform.py."""
    w = w.astype(x.dtype)
    n_in = PROJECTION_INPUT_AXES[name]
    if platform_lib.resolve(platform) != "cpu":
        y = jnp.tensordot(x, w, axes=n_in, preferred_element_type=preferred_element_type)
    else:
        ins, outs = w.shape[:n_in], w.shape[n_in:]
        lead = x.shape[:x.ndim - n_in]
        y = jnp.dot(x.reshape(math.prod(lead), math.prod(ins)), w.reshape(math.prod(ins), math.prod(outs)),
                    preferred_element_type=preferred_element_type).reshape(*lead, *outs)
    return checkpoint_name(y, name)


def attention_inputs(cfg: LlamaConfig, p: dict, x_BxSxD: jax.Array, cos_BxSxK: jax.Array, sin_BxSxK: jax.Array,
                     q_scale_BxS: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's queries, keys and values: projected, RoPE applied, and (EABF) the query scaled."""
    dtype = x_BxSxD.dtype
    h_BxSxD = rms_norm(x_BxSxD, p["input_layernorm"]["weight"], cfg.rms_norm_eps)
    attn = p["self_attn"]
    q_BxSxHxK = project(h_BxSxD, attn["q_proj"]["weight"], "q_proj", cfg.platform)
    k_BxSxNxK = project(h_BxSxD, attn["k_proj"]["weight"], "k_proj", cfg.platform)
    v_BxSxNxK = project(h_BxSxD, attn["v_proj"]["weight"], "v_proj", cfg.platform)
    q_BxSxHxK = constrain(q_BxSxHxK, ("batch", "length", "activation_heads", None))
    k_BxSxNxK = constrain(k_BxSxNxK, ("batch", "length", "activation_kv_heads", None))
    q_BxSxHxK = rope.apply_rotary(q_BxSxHxK, cos_BxSxK, sin_BxSxK, cfg.platform)
    k_BxSxNxK = rope.apply_rotary(k_BxSxNxK, cos_BxSxK, sin_BxSxK, cfg.platform)
    if q_scale_BxS is not None:  # EABF: scale the query after RoPE
        q_BxSxHxK = (q_BxSxHxK.astype(jnp.float32) * q_scale_BxS[:, :, None, None]).astype(dtype)
    return checkpoint_name(q_BxSxHxK, "attention_query"), checkpoint_name(k_BxSxNxK, "attention_key"), v_BxSxNxK


def layer_output(cfg: LlamaConfig, p: dict, x_BxSxD: jax.Array, attn_BxSxHxK: jax.Array) -> jax.Array:
    """The rest of a layer after attention: output projection, residual, MLP, residual."""
    out_BxSxD = project(attn_BxSxHxK, p["self_attn"]["o_proj"]["weight"], "o_proj", cfg.platform)
    x_BxSxD = constrain(x_BxSxD + out_BxSxD, ("batch", "length", "activation_embed"))

    h_BxSxD = rms_norm(x_BxSxD, p["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
    mlp = p["mlp"]
    gate_BxSxF = project(h_BxSxD, mlp["gate_proj"]["weight"], "gate_proj", cfg.platform)
    up_BxSxF = project(h_BxSxD, mlp["up_proj"]["weight"], "up_proj", cfg.platform)
    act_BxSxF = constrain(jax.nn.silu(gate_BxSxF) * up_BxSxF, ("batch", "length", "activation_mlp"))
    out_BxSxD = project(act_BxSxF, mlp["down_proj"]["weight"], "down_proj", cfg.platform)
    return constrain(x_BxSxD + out_BxSxD, ("batch", "length", "activation_embed"))


def decoder_layer(cfg: LlamaConfig, p: dict, x_BxSxD: jax.Array, cos_BxSxK: jax.Array, sin_BxSxK: jax.Array,
                  q_scale_BxS: jax.Array | None, segment_ids_BxS: jax.Array | None) -> jax.Array:
    """One layer on one layer's parameters `p` (a slice of the stacked tree)."""
    q_BxSxHxK, k_BxSxNxK, v_BxSxNxK = attention_inputs(cfg, p, x_BxSxD, cos_BxSxK, sin_BxSxK, q_scale_BxS)
    attn_BxSxHxK = attend(q_BxSxHxK, k_BxSxNxK, v_BxSxNxK, segment_ids_BxS,
                          backend=cfg.attention, block_size=cfg.attention_block_size, platform=cfg.platform)
    return layer_output(cfg, p, x_BxSxD, attn_BxSxHxK)


def remat_policy(name: str) -> Callable[..., bool] | None:
    """What the backward pass keeps from the forward, from least to most memory: `full` nothing;
    `save_attention` the attention's output and logsumexp (`config.ATTENTION_RESIDUALS`, so the blockwise or splash
    forward does not run twice; at long lengths it is the bulk of the recomputation); `save_proj` those, the
    queries and keys as attention receives them (after RoPE and EABF's scale) and the other projections'
    outputs; `save_dots` the attention's residuals and every matmul's output. The last two keep the same
    memory, but `save_dots` keeps the q and k projections before RoPE, so its backward pass rotates them again
    (`save_proj` plans faster for Llama-2-7B CREAM on v5p-8: docs/plan_v5p8.md)."""
    policies = jax.checkpoint_policies
    attention_residuals = policies.save_only_these_names(ATTENTION_RESIDUALS)
    return {
        "full": None,
        "save_attention": attention_residuals,
        "save_proj": policies.save_only_these_names(*_SAVE_PROJ_NAMES, ATTENTION_RESIDUALS),
        "save_dots": policies.save_from_both_policies(policies.dots_with_no_batch_dims_saveable, attention_residuals),
    }[name]


def forward(cfg: LlamaConfig, params: dict, tokens_BxS: jax.Array, position_ids: jax.Array | None = None,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """The pure forward pass on a nested dict of parameters (the NNX state as a pure dict)."""
    B, S = tokens_BxS.shape
    dtype = jnp.dtype(cfg.dtype)
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    embed_VxD = params["model"]["embed_tokens"]["weight"]
    x_BxSxD = jnp.take(embed_VxD, tokens_BxS, axis=0).astype(dtype)
    x_BxSxD = constrain(x_BxSxD, ("batch", "length", "activation_embed"))
    cos_BxSxK, sin_BxSxK = rope.cos_sin(cfg, position_ids)
    q_scale_BxS = rope.eabf_scale(position_ids, cfg.eabf.base_length) if cfg.eabf.enabled else None

    def layer(x_BxSxD, layer_params_and_index):
        p, index = layer_params_and_index
        scale = layer_q_scale(cfg, q_scale_BxS, index)
        return decoder_layer(cfg, p, x_BxSxD, cos_BxSxK, sin_BxSxK, scale, segment_ids), None

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
    stacked = (params["model"]["layers"], jnp.arange(cfg.num_hidden_layers))
    if cfg.scan_layers:
        x_BxSxD, _ = jax.lax.scan(layer, x_BxSxD, stacked)
    else:  # unrolled: one copy of the layer per depth (e.g. for exact compiler cost figures)
        for i in range(cfg.num_hidden_layers):
            x_BxSxD, _ = layer(x_BxSxD, jax.tree.map(lambda a: a[i], stacked))

    return output_logits(cfg, params, x_BxSxD)


def output_logits(cfg: LlamaConfig, params: dict, x_BxSxD: jax.Array) -> jax.Array:
    """Final norm and the vocabulary projection (tied or lm_head), in float32."""
    x_BxSxD = rms_norm(x_BxSxD, params["model"]["norm"]["weight"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        head_DxV = params["model"]["embed_tokens"]["weight"].T
    else:
        head_DxV = params["lm_head"]["weight"]
    logits_BxSxV = project(x_BxSxD, head_DxV, "lm_head", cfg.platform, preferred_element_type=jnp.float32)
    return constrain(logits_BxSxV, ("batch", "length", "activation_vocab"))


def layer_q_scale(cfg: LlamaConfig, q_scale_BxS: jax.Array | None, index: jax.Array) -> jax.Array | None:
    """EABF's query scale for layer `index` (1 on the skipped layers), or None without EABF."""
    if q_scale_BxS is None:
        return None
    skip = jnp.asarray(cfg.eabf.skip_layers or (-1,), jnp.int32)
    return jnp.where(jnp.any(skip == index), 1.0, q_scale_BxS)


def init(config: LlamaConfig, seed: int = 0) -> Llama:
    """A randomly initialised model."""
    return Llama(config, rngs=nnx.Rngs(seed))


def abstract(config: LlamaConfig) -> Llama:
    """The model's structure with shapes and dtypes only (no memory allocated). Shardings come from
    `cream_jax.sharding` (logical names -> mesh axes), so flax must not read the logical names as mesh
    axes of an active mesh: evaluate with none."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
