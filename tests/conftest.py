"""Test set-up: 8 simulated CPU devices for meshes, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (for AOT compiles) is installed; never probe for a TPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402



@pytest.fixture(scope="session")
def torch_and_transformers():
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    return torch, transformers
