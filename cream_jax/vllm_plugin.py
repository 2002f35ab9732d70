"""vLLM plugin: serves cream-jax's EABF exports (architecture `EabfLlamaForCausalLM`) exactly.

vLLM calls `register()` in each of its processes through the `vllm.general_plugins` entry point that
cream-jax's package declares. Install the package beside vLLM without its JAX dependencies:

    pip install --no-deps /path/to/cream-jax        # or a wheel / git URL of it

then `vllm serve EXPORT_DIR` serves an EABF export with the entropy-aware query scale and no
`trust_remote_code`. This module imports nothing but vLLM's registry; the model itself
(`cream_jax.vllm_eabf`) loads only when vLLM builds an EABF model.
"""

ARCHITECTURE = "EabfLlamaForCausalLM"  # what `cream_jax.hf.config_to_hf` writes for EABF
MODEL_CLASS = "cream_jax.vllm_eabf:EabfLlamaForCausalLM"


def register() -> None:
    """Register the EABF architecture with vLLM's model registry; a second call does nothing."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
