"""The CPU benchmark's process plumbing: each measurement in a fresh subprocess, its peak RSS, its result line.

Imports the standard library only, as do `bench` and `bench_generation` at their tops: a worker runs with
the package registered bare (its __init__, which imports jax and flax, is not run), so a torch worker's
memory holds no jax; each worker function imports what it measures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "
MiB = 2**20
PACKAGE_DIR = Path(__file__).resolve().parent
# `python -c` this with the package's folder, then the worker's arguments: cream_jax as a bare package (a module
# object whose path is the folder, so `import cream_jax.x` loads x alone), then `cream_jax.bench` as __main__.
_LAUNCH = ("import runpy, sys, types; bare = types.ModuleType('cream_jax'); bare.__path__ = [sys.argv.pop(1)]; "
           "sys.modules['cream_jax'] = bare; runpy.run_module('cream_jax.bench', run_name='__main__')")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def vm_hwm_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def worker_command(kind: str, spec: dict, env: dict | None = None) -> tuple[list[str], dict, str]:
    """(command, environment, working folder) of one worker process: `python -m cream_jax.bench --worker kind`
    with the package bare, and `env` added to a default environment (no XLA_FLAGS or GLIBC_TUNABLES)."""
    root = str(PACKAGE_DIR.parent)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "GLIBC_TUNABLES": "", **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return [sys.executable, "-c", _LAUNCH, str(PACKAGE_DIR), "--worker", kind, "--spec", json.dumps(spec)], env, root


def run_worker(kind: str, spec: dict, env: dict | None = None) -> dict:
    """Run one worker in a fresh Python process (`worker_command`); returns its result (or {"error": ...})
    with the process's wall time and the machine's 1-minute load average at its start and end."""
    cmd, env, cwd = worker_command(kind, spec, env)
    start, load = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    context = {"process_s": time.perf_counter() - start, "loadavg_1min": [load, os.getloadavg()[0]]}
    if proc.returncode or not lines:
        log(f"  worker {kind} failed (exit {proc.returncode})")
        return {"error": f"exit code {proc.returncode}", **context}
    return {**json.loads(lines[-1][len(RESULT_PREFIX):]), **context}
