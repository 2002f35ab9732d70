"""vLLM's Llama with entropy-aware ABF attention (loaded by `cream_jax.vllm_plugin`; needs vLLM and torch).

Weights, RoPE, KV cache and attention kernels are vLLM's own Llama. One change: after RoPE, each query is
multiplied by

    scale(p) = max(1, ln(p + 1) / ln(c))

at its absolute position p, with c the export's `eabf.base_length` (the pre-training window), in every layer
not in `eabf.skip_layers`. It is the same scale as cream-jax's `rope.eabf_scale` and the transformers
remote code written beside the export, applied the way vLLM's Llama 4 applies its per-position query scale.
"""

import math

import torch
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index


def eabf_settings(config: object) -> tuple[int, tuple[int, ...]]:
    """(base_length, skip_layers) from the exported config's `eabf` entry, with a clear error if absent."""
    eabf = getattr(config, "eabf", None)
    if not isinstance(eabf, dict) or "base_length" not in eabf:
        raise ValueError(
            "config.json has architectures=['EabfLlamaForCausalLM'] but no 'eabf' entry with 'base_length' "
            "(and 'skip_layers'); export the model with cream_jax.save_hf, which writes both.")
    return int(eabf["base_length"]), tuple(int(i) for i in eabf.get("skip_layers", ()))


class EabfLlamaAttention(LlamaAttention):
    def __init__(self, config, *args, prefix: str = "", **kwargs):
        super().__init__(config, *args, prefix=prefix, **kwargs)
        base_length, skip_layers = eabf_settings(config)
        self.eabf_on = extract_layer_index(prefix) not in skip_layers
        self.log_base_length = math.log(base_length)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if self.eabf_on:  # q: [tokens, heads * head_dim], positions: [tokens]
            scale = torch.clamp(torch.log(positions.to(torch.float32) + 1.0) / self.log_base_length, min=1.0)
            q = (q.to(torch.float32) * scale[:, None]).to(q.dtype)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class EabfLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=EabfLlamaAttention)


class EabfLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=EabfLlamaDecoderLayer)
