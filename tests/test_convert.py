"""`python -m cream_jax.convert`: both directions, errors before work, and memory that stays near one model."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cream_jax import checkpoint, convert
from helpers import assert_bit_identical, cli_env, random_hf_llama, read_all


@pytest.mark.torch
def test_cli_round_trip_is_bit_identical(tmp_path, capsys):
    random_hf_llama(tmp_path / "hf", rope_scaling={"rope_type": "linear", "factor": 8.0},
                    max_position_embeddings=32768)
    assert convert.main(["hf-to-orbax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert checkpoint.load_params(tmp_path / "ckpt").config.rope.factor == 8.0
    assert convert.main(["orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                         "--max_shard_size", "60KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert_bit_identical(read_all(tmp_path / "hf"), read_all(tmp_path / "out"))


@pytest.mark.torch
def test_cli_errors_before_work(tmp_path, capsys):
    random_hf_llama(tmp_path / "hf")
    assert convert.main(["hf-to-orbax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    before = sorted(p.name for p in (tmp_path / "ckpt").rglob("*"))
    assert convert.main(["hf-to-orbax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "ckpt").rglob("*")) == before  # nothing overwritten
    assert convert.main(["orbax-to-hf", "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 2
    assert "no model_config.json" in capsys.readouterr().err
    assert convert.main(["orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"),
                         "--tokenizer", str(tmp_path / "nope.model")]) == 2
    err = capsys.readouterr().err
    assert "no SentencePiece model at" in err and "nope.model" in err
    assert not (tmp_path / "o").exists()  # checked before the weights were read


def test_an_export_is_whole_or_nothing_and_never_overwrites_unasked(tmp_path, capsys, monkeypatch):
    """orbax-to-hf ships a registry tokenizer by name, with the files world-readable as mkdir and open would
    make them; a non-empty --out is refused unless --overwrite; a failed export leaves --out as it was and
    nothing beside it."""
    from cream_jax import LlamaConfig, hf, init

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    checkpoint.save_params(init(cfg), tmp_path / "ckpt")
    out = tmp_path / "hf"
    export = ["orbax-to-hf", f"--ckpt={tmp_path / 'ckpt'}", f"--out={out}", "--tokenizer=botchan-bpe-1000"]
    assert convert.main(export) == 0
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)

    (out / "stale.safetensors").write_text("left from another export")
    capsys.readouterr()
    assert convert.main(export) == 2
    assert f"--out={out} exists and is not empty" in capsys.readouterr().err
    assert (out / "stale.safetensors").exists()
    assert convert.main([*export, "--overwrite"]) == 0
    assert not (out / "stale.safetensors").exists() and (out / "model.safetensors").exists()

    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    save_hf = hf.save_hf

    def fails_midway(module, path, **kwargs):
        save_hf(module, path, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_hf", fails_midway)
    with pytest.raises(OSError, match="disk full"):
        convert.export_hf(tmp_path / "ckpt", out, overwrite=True, progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no half-built folder beside it


_REPORT_PEAK = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__") if sys.argv[0] else None
except SystemExit as e:
    assert not e.code, e.code
import cream_jax.convert, jax; jax.numpy.zeros(1)
# VmHWM: this process image's own peak RSS (ru_maxrss would include pages inherited across fork)
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def _peak_rss_mib(module, *args):
    env = cli_env()
    out = subprocess.run([sys.executable, "-c", _REPORT_PEAK, module, *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024


@pytest.mark.torch
@pytest.mark.slow
def test_conversion_streams_instead_of_copying(tmp_path):
    """A 640 MiB model: each direction peaks well below two copies of it above the interpreter's baseline."""
    random_hf_llama(tmp_path / "hf", std=0.02, vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)
    model_mib = os.path.getsize(tmp_path / "hf" / "model.safetensors") / 2**20
    baseline = _peak_rss_mib("")  # the interpreter with jax and cream_jax's imports
    to_orbax = _peak_rss_mib("cream_jax.convert", "hf-to-orbax", "--hf", str(tmp_path / "hf"),
                             "--out", str(tmp_path / "ckpt")) - baseline
    to_hf = _peak_rss_mib("cream_jax.convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"),
                          "--out", str(tmp_path / "out"), "--max_shard_size", "100MB") - baseline
    print(f"\nbaseline {baseline:.0f} MiB, model {model_mib:.0f} MiB; peak above baseline: "
          f"hf-to-orbax {to_orbax:.0f} MiB, orbax-to-hf {to_hf:.0f} MiB")
    assert to_orbax < 1.75 * model_mib and to_hf < 1.75 * model_mib
    a, b = read_all(tmp_path / "hf"), read_all(tmp_path / "out")
    assert all(np.array_equal(a[k], b[k]) for k in a)
