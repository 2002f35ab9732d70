"""Entropy-aware ABF Llama for transformers (`trust_remote_code=True`).

Shipped by cream-jax beside exported weights. It is transformers' own
`LlamaForCausalLM` with one change in attention: after RoPE, each query is
multiplied by

    scale(p) = max(1, ln(p + 1) / ln(c))

where p is the query's absolute position id and c is `config.eabf["base_length"]`
(the pre-training window), in every layer not listed in
`config.eabf["skip_layers"]`. This keeps attention entropy stable beyond c
(EABF, "Extending LLMs' Context Window with 100 Samples"). Weights, cache and
everything else are unchanged, so a server without this file still loads the
directory as a plain Llama with the same `rope_theta` (ABF without the scale).
"""

import math

import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM


def eabf_scale(position_ids: torch.Tensor, base_length: int) -> torch.Tensor:
    p = position_ids.to(torch.float32)
    return torch.clamp(torch.log(p + 1.0) / math.log(base_length), min=1.0)


class EabfLlamaAttention(LlamaAttention):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = modeling_llama.apply_rotary_pos_emb(query_states, key_states, cos, sin)

        eabf = self.config.eabf
        if self.layer_idx not in eabf["skip_layers"]:
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                raise ValueError("EABF attention needs position_ids (absolute positions) in the forward call.")
            scale = eabf_scale(position_ids, eabf["base_length"])  # [B, S]
            query_states = (query_states.to(torch.float32) * scale[:, None, :, None]).to(query_states.dtype)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention_interface = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_llama.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class EabfLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = EabfLlamaAttention(config, layer_idx=i)
        self.post_init()
