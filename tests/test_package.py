"""The package's conventions: one error base class, a docstring per module, no import cycles, and the
compile target as a static config field."""

import ast
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cream_jax
from cream_jax import CreamError, LlamaConfig, platform
from helpers import ROOT, cli_env

PACKAGE = Path(cream_jax.__file__).parent
# Shipped beside HF exports as transformers remote code (it imports transformers, not cream_jax).
REMOTE_CODE = "cream_jax.hf_remote_code"
# Runs inside a vLLM server (it imports vllm and torch, not jax); tests/test_serving.py runs it there.
VLLM_MODEL = "cream_jax.vllm_eabf"


def _modules() -> list[str]:
    names = ["cream_jax"]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="cream_jax."):
        if not info.name.startswith((REMOTE_CODE, VLLM_MODEL)):
            names.append(info.name)
    return sorted(names)


def test_every_project_error_derives_from_the_one_base_class():
    errors = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__ == name:
                errors.append(cls)
    assert len(errors) >= 9
    assert [e.__qualname__ for e in errors if not issubclass(e, CreamError)] == []


def test_the_vllm_plugin_imports_without_jax_or_flax():
    code = ("import sys, cream_jax.vllm_plugin as p; bad = [m for m in ('jax', 'flax', 'optax', 'numpy') "
            "if m in sys.modules]; assert bad == [], bad; print(p.ARCHITECTURE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "EabfLlamaForCausalLM"


def test_every_module_says_its_concern_in_its_first_docstring_line():
    missing = [name for name in _modules() if not (importlib.import_module(name).__doc__ or "").strip()]
    assert missing == []


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in modules else node.module)
    return found & modules


def _import_graph() -> dict[str, set[str]]:
    paths = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        paths[name] = p
    modules = set(paths)
    return {m: _imports(p, modules) - {m, "cream_jax"} for m, p in paths.items()}


def test_no_import_cycles():
    graph = _import_graph()

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert cycles == []


def test_the_data_package_knows_nothing_of_models_or_training():
    """cream_jax.data imports only itself and the leaf utilities (cli, errors, files, report), so it can be read,
    tested and reused without the model, the step or jax's sharding."""
    leaves = {"cream_jax.cli", "cream_jax.errors", "cream_jax.files", "cream_jax.report"}
    outside = {m: sorted(i for i in imports if not i.startswith("cream_jax.data") and i not in leaves)
               for m, imports in _import_graph().items() if m.startswith("cream_jax.data")}
    assert {m: i for m, i in outside.items() if i} == {}


def test_a_test_cannot_reach_beyond_this_machine():
    """conftest refuses connections to anything but loopback unless a test is marked `network`."""
    import socket

    with socket.socket() as s, pytest.raises(OSError, match="mark it @pytest.mark.network"):
        s.settimeout(1.0)
        s.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.connect(server.getsockname())  # loopback stays open (jax.distributed, local servers)


def test_every_public_function_is_annotated():
    """Every public function and method (a public class's `__call__` too) annotates its parameters but self/cls,
    its *args/**kwargs and its return."""
    missing = []
    for p in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if module.startswith(REMOTE_CODE):
            continue
        scopes = [(ast.parse(p.read_text()).body, False)]
        while scopes:
            body, in_class = scopes.pop()
            for node in body:
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    scopes.append((node.body, True))
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not node.name.startswith("_") or (in_class and node.name == "__call__")):
                    a = node.args
                    params = a.posonlyargs + a.args
                    if in_class and params and params[0].arg in ("self", "cls"):
                        params = params[1:]
                    params += a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
                    if node.returns is None or any(x.annotation is None for x in params):
                        missing.append(f"{module}:{node.lineno} {node.name}")
    assert missing == []


def test_the_compile_target_is_a_static_config_field():
    """`platform` is validated, resolved to the default backend when empty, left out of what checkpoints
    save, and changes the traced program (rotate_half as a matmul on TPU)."""
    with pytest.raises(CreamError, match="platform='xpu' is not one of"):
        LlamaConfig(platform="xpu")
    assert platform.resolve("") == "cpu" and platform.resolve("tpu") == "tpu"
    cfg = LlamaConfig(platform="tpu")
    assert "platform" not in cfg.to_dict() and LlamaConfig(**cfg.to_dict()).platform == ""
    assert cfg != cfg.replace(platform="")  # part of the config jit closes over, so of its cache key


NOISE = re.compile(r"libtpu|TPU|InitGoogle|^[EWI]\d{4} |WARNING|absl|Traceback|Source Location")


@pytest.mark.slow
def test_off_a_tpu_the_clis_print_no_backend_or_library_warnings(tmp_path):
    """With JAX_PLATFORMS unset on this TPU-less machine (libtpu installed for the planner), train, convert
    and evaluate print their own lines only: no libtpu start-up noise, no Orbax/absl warnings."""
    env = {k: v for k, v in cli_env(devices=1).items() if k != "JAX_PLATFORMS"}
    run_dir = tmp_path / "run"
    commands = [
        ["cream_jax.train", "--config=configs/tiny_cream.py", f"--workdir={run_dir}", "--config.train.steps=2",
         "--config.train.warmup_steps=1", "--config.checkpoint.every=2"],
        ["cream_jax.convert", "orbax-to-hf", f"--ckpt={run_dir}", f"--out={tmp_path / 'hf'}"],
        ["cream_jax.evaluate", f"--ckpt={run_dir}", "--task=passkey", "--lengths=128", "--samples=1", "--depths=0.5",
         f"--out={tmp_path / 'eval'}"],
    ]
    for command in commands:
        run = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = [x for x in re.split(r"[\r\n]", run.stdout + run.stderr) if x.strip()]
        assert [x for x in lines if NOISE.search(x)] == [], command[0]


def test_the_readme_layout_lists_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    top = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    data = [p.stem for p in (PACKAGE / "data").glob("*.py") if p.name != "__init__.py"]
    data_entry = layout.split("cream_jax/data/", 1)[1].split("\ncream_jax/", 1)[0]
    assert [m for m in top if f"cream_jax/{m}" not in layout] == []
    assert [m for m in data if not re.search(rf"\b{m}\b", data_entry)] == []
