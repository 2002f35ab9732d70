"""launch/: every flag that the scripts, the notebook and the docs pass to our CLIs exists (flags drift); the
shell scripts pass shellcheck; tpu_pod.sh --dry_run prints the gcloud commands; local.sh and the Colab
notebook's cells run end to end on this CPU."""

import contextlib
import functools
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from cream_jax import train_config as tc

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.md")), *sorted((ROOT / "launch").glob("*.md")),
        *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "launch").glob("*.sh"))]
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"
SUBCOMMANDS = {"cream_jax.convert", "cream_jax.data.corpora", "cream_jax.data.tokenizer"}


def _texts() -> dict[str, str]:
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in DOCS}
    nb = json.loads(NOTEBOOK.read_text())
    texts[str(NOTEBOOK.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in nb["cells"])
    return texts


def _commands():
    """(file, module, subcommand, [flag tokens]) of every `python -m cream_jax...` command line."""
    out = []
    for name, text in _texts().items():
        text = re.sub(r"\\\n\s*", " ", text)
        for m in re.finditer(r"python3? -m (cream_jax(?:\.\w+)*)([^\n`|;&]*)", text):
            tokens = m.group(2).split()
            sub = tokens[0] if m.group(1) in SUBCOMMANDS and tokens and not tokens[0].startswith("-") else None
            out.append((name, m.group(1), sub, [t for t in tokens if t.startswith("--")]))
    return out


ABSL_CLIS = {"cream_jax.train", "cream_jax.plan"}  # absl flags are process-global: their --help runs apart


@functools.cache
def _known_flags(module: str, sub: str | None) -> frozenset:
    argv = [*([sub] if sub else []), "--help"]
    if module in ABSL_CLIS:
        run = subprocess.run([sys.executable, "-m", module, *argv], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        text = run.stdout + run.stderr
    else:  # argparse: its help, printed in this process
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit):
            importlib.import_module(module).main(argv)
        text = out.getvalue()
    assert "usage" in text.lower() or "flags" in text.lower(), (module, argv, text[-2000:])
    return frozenset(re.findall(r"--(?:\[no\])?([A-Za-z0-9_-]+)", text))


def _config_has(cfg: ml_collections.ConfigDict, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.slow
def test_every_documented_flag_exists():
    commands = _commands()
    modules = {m for _, m, _, _ in commands}
    assert {"cream_jax.train", "cream_jax.convert", "cream_jax.plan", "cream_jax.data.corpora"} <= modules
    assert any(name.startswith("launch/") for name, *_ in commands)
    problems = []
    for name, module, sub, flags in commands:
        known = _known_flags(module, sub)
        recipe = next((f.split("=", 1)[1] for f in flags if f.startswith("--config=")), None)
        cfg = tc.load_config(ROOT / recipe) if recipe and (ROOT / recipe).is_file() else tc.base()
        for flag in flags:
            key = flag[2:].split("=", 1)[0]
            if key.startswith("config.") and module == "cream_jax.train":
                if not _config_has(cfg, key[len("config."):]):
                    problems.append(f"{name}: {module} {flag}: no such config field")
            elif key.startswith("config.") and module == "cream_jax.plan":
                if not _config_has(tc.base(), key[len("config."):]):
                    problems.append(f"{name}: {module} {flag}: no such config field")
            elif key not in known:
                problems.append(f"{name}: {module}{' ' + sub if sub else ''} {flag}: not a flag of the CLI")
    assert not problems, "\n".join(problems)
    # one flag style: every flag of every CLI is spelled with underscores
    hyphenated = {f"{m} {s or ''}": sorted(f for f in _known_flags(m, s) if "-" in f) for _, m, s, _ in commands}
    assert {k: v for k, v in hyphenated.items() if v} == {}


def test_launch_script_flags_exist():
    """Flags given to launch/*.sh in the docs and the notebook are options those scripts parse."""
    problems = []
    for script in sorted((ROOT / "launch").glob("*.sh")):
        options = set(re.findall(r"^\s+(--[a-z_-]+)\)", script.read_text(), re.M)) | {"--help", "--"}
        assert not [o for o in options if "-" in o[2:] and o != "--"], (script.name, options)  # one flag style
        for name, text in _texts().items():
            text = re.sub(r"\\\n\s*", " ", text)
            for m in re.finditer(rf"launch/{script.name}([^\n`]*)", text):
                before_extra = m.group(1).split(" -- ")[0]
                for flag in re.findall(r"(?<!\S)(--[a-z_-]+)", before_extra):
                    if flag not in options:
                        problems.append(f"{name}: launch/{script.name} {flag}")
    assert not problems, "\n".join(problems)


def test_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    run = subprocess.run([shellcheck, *map(str, sorted((ROOT / "launch").glob("*.sh")))], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    args = ["--dry_run", "run", "--name", "c32", "--zone", "us-east5-a", "--type", "v5p-32", "--spot", "--bucket", "b",
            "--workdir", "/gcs/b/runs/c32", "--", "--config.train.lr=1e-5"]
    # no gcloud on PATH: a dry run must not need it
    run = subprocess.run([str(ROOT / "launch" / "tpu_pod.sh"), *args], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create c32 --zone us-east5-a --accelerator-type v5p-32")
    assert "--spot" in lines[0]
    assert any("--worker=all" in x and "requirements-tpu.txt" in x and "gcsfuse" in x for x in lines)
    train = next(x for x in lines if "cream_jax.train" in x)
    assert "--worker=all" in train and "--distributed" in train and "--config.train.lr=1e-5" in train
    assert lines[-1] == "gcloud compute tpus tpu-vm delete c32 --zone us-east5-a --quiet"
    joined = ["--dry_run", "run", "--name=c32", "--zone=us-east5-a", "--type=v5p-32", "--spot", "--bucket=b",
              "--workdir=/gcs/b/runs/c32", "--", "--config.train.lr=1e-5"]
    same = subprocess.run([str(ROOT / "launch" / "tpu_pod.sh"), *joined], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert same.returncode == 0 and same.stdout == run.stdout, same.stderr  # --option=value works too
    bad = subprocess.run([str(ROOT / "launch" / "tpu_pod.sh"), "--dry_run", "run", "--name", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--zone is required" in bad.stderr


# A stand-in for gcloud: logs each call, answers `describe` with $STUB_STATE, exits with the next of
# $STUB_TRAIN_CODES for each train launch, and says the run is done at the status check after the
# launch numbered $STUB_DONE_AFTER.
STUB_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
case "$*" in
  *cream_jax.train*)
    n=$(grep -c cream_jax.train "$STUB_LOG")
    codes=($STUB_TRAIN_CODES)
    exit "${codes[$((n - 1))]:-0}" ;;
  *status.json*) [[ $(grep -c cream_jax.train "$STUB_LOG") -ge ${STUB_DONE_AFTER:-1} ]] ;;
  *describe*) echo "${STUB_STATE:-READY}" ;;
esac
"""


def _tpu_pod_run(tmp_path, codes, *flags, done_after=1, state="READY"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(STUB_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "STUB_TRAIN_CODES": " ".join(map(str, codes)),
           "STUB_DONE_AFTER": str(done_after), "STUB_STATE": state}
    run = subprocess.run([str(ROOT / "launch" / "tpu_pod.sh"), "run", "--name", "c8", "--zone", "z", "--workdir",
                          "/gcs/b/runs/c8", "--retries", "2", *flags], capture_output=True, text=True, env=env,
                         timeout=60)
    calls = log.read_text().splitlines()
    deletes = [c for c in calls if c.startswith("compute tpus tpu-vm delete")]
    return run, sum("cream_jax.train" in c for c in calls), deletes


def test_tpu_pod_run_stops_at_a_config_error_and_retries_the_rest(tmp_path):
    """Exit 2 from train (a config or data error) is never relaunched: the TPU is kept, or deleted with
    --delete_on_error; exit 1 and a preempted run (exit 0, status not done) are relaunched."""
    run, launches, deletes = _tpu_pod_run(tmp_path, [2])
    assert run.returncode == 2 and launches == 1 and deletes == [], run.stderr
    assert "a config or data error" in run.stderr and "not retried" in run.stderr and "is kept" in run.stderr
    run, launches, deletes = _tpu_pod_run(tmp_path, [2], "--delete_on_error")
    assert run.returncode == 2 and launches == 1 and len(deletes) == 1, run.stderr

    run, launches, deletes = _tpu_pod_run(tmp_path, [1, 1, 0], done_after=3)  # a crash twice, then done
    assert run.returncode == 0 and launches == 3 and len(deletes) == 1, run.stderr
    assert "relaunch 2 of 2" in run.stderr and "relaunch 3" not in run.stderr
    run, launches, deletes = _tpu_pod_run(tmp_path, [0, 0], done_after=2, state="PREEMPTED")  # saved, VM gone
    assert run.returncode == 0 and launches == 2 and len(deletes) == 2, run.stderr  # the dead VM, then the end
    run, launches, deletes = _tpu_pod_run(tmp_path, [1, 1, 1], done_after=9)
    assert run.returncode == 1 and launches == 3 and deletes == [], run.stderr  # 2 relaunches, then kept
    assert "giving up after 2 relaunches (train exited 1)" in run.stderr


@pytest.mark.slow
def test_local_sh_trains_resumes_and_exports(tmp_path):
    workdir = tmp_path / "run"
    for steps in (6, 9):  # the second launch resumes from the first's checkpoint and trains 3 more steps
        args = [str(ROOT / "launch" / "local.sh"), "--workdir", str(workdir), "--", f"--config.train.steps={steps}",
                "--config.train.log_every=3", "--config.train.warmup_steps=1"]
        run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert json.loads((workdir / "status.json").read_text()) == {"state": "done", "step": steps}
        assert (workdir / f"hf-step{steps}" / "config.json").exists()
    assert "resumed from" in run.stdout
    bad = subprocess.run([str(ROOT / "launch" / "local.sh"), "--workdir", str(tmp_path / "bad"), "--",
                          "--config.train.window=100"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "not a multiple of train.window=100" in bad.stderr  # no pointless relaunches


@pytest.mark.slow
def test_colab_notebook_runs_on_cpu(tmp_path):
    """The notebook's cells, minus installation, with its run directory in tmp and fewer steps."""
    nb = json.loads(NOTEBOOK.read_text())
    namespace: dict = {}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"]).replace("runs/colab", str(tmp_path / "colab"))
        source = source.replace("--config.train.steps=300", "--config.train.steps=4")
        source = source.replace("--config.train.warmup_steps=20", "--config.train.warmup_steps=1")
        if "pip install" in source:
            continue
        python = []
        for line in re.sub(r"\\\n\s*", " ", source).splitlines():
            if line.startswith("!"):
                run = subprocess.run(line[1:], shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                                     timeout=600)
                assert run.returncode == 0, (line, run.stdout[-2000:], run.stderr[-3000:])
            elif not line.startswith("%"):
                python.append(line)
        exec(compile("\n".join(python), "colab_tpu.ipynb", "exec"), namespace)  # noqa: S102
    assert namespace["step"] == 4 and len(namespace["answer"]) > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.slow
@pytest.mark.torch
def test_the_readme_tiny_sequence_runs_as_written(tmp_path):
    """The README's tiny_cream commands (train, evaluate, convert), in its order, as written but for a shorter
    run and fewer prompts, in a scratch folder: each exits 0, and the export loads in transformers with its
    tokenizer."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())
    lines = [m.group(0).split("  #")[0].strip() for m in re.finditer(r"python -m cream_jax\.\S+[^\n]*", text)
             if "runs/tiny_cream" in m.group(0)]
    assert [x.split()[2] for x in lines] == ["cream_jax.train", "cream_jax.evaluate", "cream_jax.convert"], lines
    shorter = {"cream_jax.train": ["--config.train.steps=4", "--config.train.warmup_steps=1"],
               "cream_jax.evaluate": ["--samples=1"], "cream_jax.convert": []}
    for line in lines:
        argv = line.replace("runs/", f"{tmp_path}/runs/").split()[2:]
        run = subprocess.run([sys.executable, "-m", *argv, *shorter[argv[0]]], cwd=ROOT, capture_output=True,
                             text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
        assert run.returncode == 0, (line, run.stderr[-3000:])
    import transformers

    export = tmp_path / "runs" / "tiny_cream" / "hf"
    assert transformers.AutoTokenizer.from_pretrained(export)("Emma").input_ids[0] == 1
    assert transformers.AutoModelForCausalLM.from_pretrained(export).config.max_position_embeddings == 512
