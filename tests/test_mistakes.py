"""A user's mistakes cost nothing: each CLI's bad input exits 2 with one `error:` line naming the bad value,
before any weights are read or anything is compiled (recorded, not timed: `helpers.recording_work`)."""

import importlib
import shutil
import subprocess

import pytest

from helpers import ROOT, WORK_MARK, cli_env, recording_work, watched_command

FILE = ROOT / "README.md"  # a file where a folder would go
TINY = "--config=configs/tiny_cream.py"

# (module, argv, what the one error line says); {hf}: a small Hugging Face directory with its tokenizer
ABSL_MISTAKES = [
    ("cream_jax.train", [TINY, "--workdir={tmp}/r", "--config.train.stpes=10"], "did you mean --config.train.steps?"),
    ("cream_jax.train", [TINY, "--workdir={tmp}/r", "--config.train.steps=abc"], "--config.train.steps=abc"),
    ("cream_jax.train", [TINY, "--workdir={tmp}/r", "--config.mesh.expert=2"], "mesh has no field 'expert'"),
    ("cream_jax.train", ["--config=configs/tiny_crem.py", "--workdir={tmp}/r"], "configs/tiny_crem.py: no such file"),
    ("cream_jax.train", [TINY, "--workdri={tmp}/r"], "Unknown command line flag 'workdri'"),
    ("cream_jax.train", [TINY, "--workdir={tmp}/r", "--config.train.target_length=500"],
     "train.target_length=500 is not a multiple of train.window"),
    ("cream_jax.train", [TINY, "--workdir={tmp}/r", "--config.data.name=no_such_corpus"], "'no_such_corpus'"),
    ("cream_jax.train", [TINY, "--workdir={tmp}/r", "--config.model.init_from={tmp}/nothing"], "is none of"),
    ("cream_jax.train", [TINY, "--workdir={tmp}/r", "--config.model.init_from={hf}", "--config.model.hidden_size=96"],
     "model.hidden_size=96 differs from 64"),
    ("cream_jax.plan", [TINY, "--topology=v5p-7"], "unknown TPU topology 'v5p-7'"),
    ("cream_jax.plan", [TINY, "--config.model.remt=full"], "did you mean --config.model.remat?"),
    ("cream_jax.plan", [TINY, "--eval", "--length=1000", "--chunk=512"],
     "--length=1000 is not a multiple of --chunk=512"),
    ("cream_jax.plan", [TINY, "--eval", "--config.mesh.tensor=4"],
     "num_key_value_heads=2 is not divisible by mesh.tensor=4"),
    ("cream_jax.plan", [TINY, "--eval", "--page={tmp}/plan_eval.md"], "--page plans the page's own recipes"),
    ("cream_jax.plan", ["--eval"], "--config is required: a recipe file such as configs/tiny_cream.py"),
]
ARGPARSE_MISTAKES = [
    ("cream_jax.evaluate", ["--hf={hf}", "--task=kv"], "--task=kv needs --keys or --lengths"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=passkey", "--lengths=128,abc"], "--lengths='128,abc'"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=passkey", "--lengths=128", "--depths=0,2"], "--depths='0,2'"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=passkey", "--lengths=128", "--tokenizer=no_such_tokenizer"],
     "no_such_tokenizer"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=ruler", "--lengths=128", "--ruler_tasks=niah_x"], "niah_x"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=ppl", "--lengths=128", "--corpus=no_such_corpus"], "no_such_corpus"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=passkey", "--lengths=128", f"--out={FILE}"],
     "README.md is not a folder"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=passkey", "--lengths=128", "--step=3"],
     "--step=3 picks a checkpoint of --ckpt"),
    ("cream_jax.evaluate", ["--hf={tmp}/no_model_here", "--task=passkey", "--lengths=128"], "is none of"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=passky"], "argument --task: invalid choice: 'passky'"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=passkey", "--lengths=128", "--mesh=data=2,expert=4"],
     "--mesh='data=2,expert=4': the mesh axes are data, fsdp, tensor"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=passkey", "--lengths=128", "--mesh=data=2,tensor=5"],
     "has 10 devices but 8 are available"),
    ("cream_jax.evaluate", ["--hf={hf}", "--task=passkey", "--lengths=128", "--mesh=data=1,tensor=8"],
     "num_attention_heads=4 is not divisible by --mesh tensor=8"),
    ("cream_jax.convert", ["orbax-to-hf", "--ckpt={tmp}/no_such_dir", "--out={tmp}/o"], "no_such_dir' is none of"),
    ("cream_jax.convert", ["hf-to-orbax", "--hf={hf}"], "the following arguments are required: --out"),
    ("cream_jax.data.tokenizer", ["encode", "--model=no_such_tokenizer", "hi"], "no_such_tokenizer"),
    ("cream_jax.data.tokenizer", ["train", "--input=austen", "--out={tmp}/t"], "required: --vocab_size"),
    ("cream_jax.data.corpora", ["fetch", "austin"], "invalid choice: 'austin'"),
    ("cream_jax.data.bench", ["--quick", "--corpus=no_such_corpus"], "--corpus=no_such_corpus is not a corpus"),
    ("cream_jax.data.bench", ["--quick", f"--out={FILE / 'd'}"], "README.md is not a folder"),
    ("cream_jax.bench", ["--quick", f"--out={FILE / 'bench'}"], "README.md is not a folder"),
    ("cream_jax.demo", ["--quick", "--novels=7"], "novels=7"),
    ("cream_jax.demo", ["--quick", f"--out={FILE / 'demo'}"], "README.md is not a folder"),
]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A small random model exported with the 1000-piece tokenizer (its vocabulary)."""
    from cream_jax import LlamaConfig, hf, init
    from cream_jax.data import corpora

    path = tmp_path_factory.mktemp("hf") / "tiny"
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf.save_hf(init(cfg), path, corpora.fetch("botchan-bpe-1000", quiet=True), progress=False)
    return path


def _argv(argv, tiny_hf, tmp_path):
    return [a.format(hf=tiny_hf, tmp=tmp_path) for a in argv]


def _one_error_line(stderr: str, message: str) -> None:
    errors = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in stderr, stderr[-3000:]


def test_the_table_covers_every_cli():
    modules = {m for m, *_ in ABSL_MISTAKES + ARGPARSE_MISTAKES}
    assert len(ABSL_MISTAKES + ARGPARSE_MISTAKES) >= 20
    assert modules == {"cream_jax.train", "cream_jax.plan", "cream_jax.evaluate", "cream_jax.convert",
                       "cream_jax.data.tokenizer", "cream_jax.data.corpora", "cream_jax.data.bench", "cream_jax.bench",
                       "cream_jax.demo"}


@pytest.mark.parametrize("module, argv, message", ARGPARSE_MISTAKES,
                         ids=[f"{m.removeprefix('cream_jax.')}-{i}" for i, (m, *_) in enumerate(ARGPARSE_MISTAKES)])
def test_an_argparse_cli_mistake(module, argv, message, tiny_hf, tmp_path, capsys):
    with recording_work() as work:
        with pytest.raises(SystemExit) as exit_:
            raise SystemExit(importlib.import_module(module).main(_argv(argv, tiny_hf, tmp_path)))
    assert exit_.value.code == 2
    _one_error_line(capsys.readouterr().err, message)
    assert work == []


@pytest.mark.slow
@pytest.mark.parametrize("module, argv, message", ABSL_MISTAKES,
                         ids=[f"{m.removeprefix('cream_jax.')}-{i}" for i, (m, *_) in enumerate(ABSL_MISTAKES)])
def test_an_absl_cli_mistake(module, argv, message, tiny_hf, tmp_path):
    run = subprocess.run(watched_command(module, _argv(argv, tiny_hf, tmp_path)), cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    _one_error_line(run.stderr, message)
    assert [x for x in run.stderr.splitlines() if x.startswith(WORK_MARK)] == []
    assert not (tmp_path / "r").exists()  # no run folder left behind


def test_the_recorders_see_weights_and_compiles(tiny_hf, tmp_path):
    """The evidence the mistakes rest on: loading weights and compiling are recorded (in process and in a
    watched subprocess)."""
    import jax
    import jax.numpy as jnp

    from cream_jax import hf

    with recording_work() as work:
        hf.load_hf(tiny_hf, progress=False)
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(7))
    assert any("load_hf" in w for w in work) and any("XLA compile" in w for w in work), work
    shutil.copytree(tiny_hf, tmp_path / "hf")
    run = subprocess.run(watched_command("cream_jax.convert", ["hf-to-orbax", f"--hf={tmp_path / 'hf'}",
                                                               f"--out={tmp_path / 'ckpt'}"]),
                         cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(x.startswith(WORK_MARK) and "load_hf" in x for x in run.stderr.splitlines()), run.stderr[-3000:]
