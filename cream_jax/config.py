"""Model configuration: one dataclass, named presets, validation up front.

Field names follow Hugging Face's `LlamaConfig` where one exists, so that
`config.json` maps onto this class field by field (see `hf.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cream_jax.errors import CreamError
from cream_jax.platform import PLATFORMS

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")
# From the least recomputation (and most memory) to the most; `model.remat_policy` says what each keeps.
REMAT_POLICIES = ("none", "save_dots", "save_proj", "save_attention", "full")
# The checkpoint name of the blockwise and splash forward's output and logsumexp: the `save_attention` and
# `save_proj` policies keep what carries it, so the backward pass does not run the forward again.
ATTENTION_RESIDUALS = "attention_residuals"
ATTENTION_BACKENDS = ("auto", "dot_product", "blockwise", "splash")
DTYPES = ("float32", "bfloat16", "float16")

# Parameters each scaling type needs (beyond `theta`); the others have defaults.
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "ntk": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


class ConfigError(CreamError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (docs/methods.md). ABF is just a larger `theta`."""

    type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None

    def validate(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError(
                f"rope.type={self.type!r} is not a supported RoPE type; use one of {ROPE_TYPES}."
            )
        if not self.theta > 0:
            raise ConfigError(f"rope.theta={self.theta} must be positive (Llama-2: 10000, ABF: 500000).")
        missing = [k for k in _ROPE_REQUIRED[self.type] if getattr(self, k) is None]
        if missing:
            raise ConfigError(
                f"rope.type={self.type!r} needs rope.{', rope.'.join(missing)}; set "
                f"{'them' if len(missing) > 1 else 'it'} (e.g. rope.factor=8 for a 4K->32K extension)."
            )
        if self.factor is not None and self.factor < 1 and self.type != "default":
            raise ConfigError(f"rope.factor={self.factor} must be >= 1 (it is target length / trained length).")


@dataclasses.dataclass(frozen=True)
class EabfConfig:
    """Entropy-aware attention-logit scaling (docs/methods.md)."""

    enabled: bool = False
    base_length: int = 4096  # c: the pre-training window
    skip_layers: tuple[int, ...] = (0, 1)  # the paper's; () reproduces the reference code

    def validate(self, num_layers: int) -> None:
        if self.base_length < 2:
            raise ConfigError(f"eabf.base_length={self.base_length} must be >= 2 (it is ln(c) in a denominator).")
        bad = [i for i in self.skip_layers if not 0 <= i < num_layers]
        if self.enabled and bad:
            raise ConfigError(f"eabf.skip_layers has {bad}, outside the model's layers 0..{num_layers - 1}.")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096  # the context length served (the target L after extension)
    rope: RopeConfig = RopeConfig()
    eabf: EabfConfig = EabfConfig()
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"  # storage (fp32 master weights under bf16 compute)
    remat: str = "none"
    attention: str = "dot_product"
    attention_block_size: int = 0  # blockwise/splash block length; 0: the backend's (attention.DEFAULT_BLOCK_SIZE)
    scan_layers: bool = True
    platform: str = ""  # the compiler traced for (platform.py): "" = the default backend; the planner sets "tpu"
    initializer_range: float = 0.02

    def __post_init__(self):
        if isinstance(self.rope, dict):
            object.__setattr__(self, "rope", RopeConfig(**self.rope))
        if isinstance(self.eabf, dict):
            object.__setattr__(self, "eabf", EabfConfig(**self.eabf))
        if self.head_dim is None and self.num_attention_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "eabf", dataclasses.replace(self.eabf, skip_layers=tuple(self.eabf.skip_layers)))
        self.validate()

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; GQA needs whole groups "
                f"(use a divisor, e.g. 1 for MQA or {self.num_attention_heads} for MHA)."
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs).")
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES),
                              ("attention", ATTENTION_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.platform not in PLATFORMS:
            raise ConfigError(f"platform={self.platform!r} is not one of {PLATFORMS} ('' = jax's default backend).")
        if self.attention_block_size < 0:
            raise ConfigError(f"attention_block_size={self.attention_block_size} must be positive "
                              f"(or 0 for the backend's default).")
        self.rope.validate()
        self.eabf.validate(self.num_hidden_layers)

    def replace(self, **overrides: Any) -> "LlamaConfig":
        """Copy with overrides (validated); `rope`/`eabf` also accept dicts of their fields, merged in."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"Unknown LlamaConfig field(s) {sorted(unknown)}.")
        for sub in ("rope", "eabf"):
            if isinstance(overrides.get(sub), dict):
                try:
                    overrides[sub] = dataclasses.replace(getattr(self, sub), **overrides[sub])
                except TypeError as e:
                    raise ConfigError(f"Bad {sub} override {overrides[sub]}: {e}") from None
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields as saved with checkpoints and runs; `platform` is left out (a compile target, not the
        model: a checkpoint made while planning for a TPU loads anywhere)."""
        fields = dataclasses.asdict(self)
        del fields["platform"]
        return fields

    def num_params(self) -> int:
        d, f, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = d * (2 * q + 2 * kv) + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + n * per_layer + d


PRESETS: dict[str, dict[str, Any]] = {}


def _preset(name: str, **fields: Any) -> None:
    PRESETS[name] = fields


_preset("llama2-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
_preset("llama2-13b", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)
_preset("llama3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope=RopeConfig(theta=500000.0))
# Tiny models for tests and CPU demos (Llama-2 tokenizer vocabulary or a small one).
_preset("tiny", vocab_size=32000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
_preset("tiny-gqa", vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
_preset("debug", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def preset(name: str, **overrides: Any) -> LlamaConfig:
    """A named configuration (`llama2-7b`, `llama2-13b`, `llama3-8b`, `tiny`, `tiny-gqa`, `debug`)."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return LlamaConfig(**PRESETS[name]).replace(**overrides)
