"""Convert between Hugging Face directories and cream-jax Orbax checkpoints.

    python -m cream_jax.convert hf-to-orbax --hf DIR --out DIR [--param_dtype bfloat16]
    python -m cream_jax.convert orbax-to-hf --ckpt DIR --out DIR [--tokenizer tokenizer.model] [--dtype bfloat16]
    python -m cream_jax.convert orbax-to-hf --ckpt RUN_DIR [--step N] --out DIR    # a train checkpoint

A train run's directory exports its newest (or `--step`) checkpoint with the run's RoPE and EABF settings
(e.g. linear factor 8 and max_position_embeddings 32768 after a CREAM run).

Both stream tensor by tensor: the model is held once, plus one tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cream_jax import checkpoint, cli, files, hf, load
from cream_jax.errors import CreamError

if TYPE_CHECKING:
    from cream_jax.model import Llama


class ExportError(CreamError):
    """An export that would overwrite a directory or ship a tokenizer that does not fit the model."""


def source_tokenizer(source: str | Path) -> str:
    """The tokenizer that goes with a model source: a train run's own (its data.tokenizer, else the one of the
    model it started from), the tokenizer.model beside a params checkpoint or HF directory; "" if none."""
    if load.source_kind(source) == "run":
        return load.run_tokenizer(source)
    return str(source) if (Path(source) / "tokenizer.model").is_file() else ""


def export_hf(source: str | Path, out: str | Path, *, step: int | None = None, tokenizer: str | None = None,
              dtype: str | None = None, max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
              progress: bool = True) -> tuple[Llama, str, Path]:
    """A model from any source (`load.load_model`: a train run's newest or `step` checkpoint, a params
    checkpoint, an HF directory) written as a Hugging Face directory that transformers loads as it is, its
    tokenizer included: `tokenizer` (a tokenizer.model, a directory holding one, or a registry name), by
    default the source's own (`source_tokenizer`); "" ships none. The directory is built beside `out` and
    renamed into place, so a failure leaves `out` as it was; a non-empty `out` is refused unless
    `overwrite`. Returns (module, label, out)."""
    from cream_jax.data import tokenizer as tok_lib

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"--out={out} exists and is not empty; choose a new folder or pass --overwrite.")
    config, _ = load.read_config(source, step)
    spec = source_tokenizer(source) if tokenizer is None else tokenizer
    tok = tok_lib.resolve(spec) if spec else None
    if tok is not None:
        tok_lib.check_vocab(tok, config.vocab_size)
    module, label = load.load_model(source, step, progress=progress)
    with files.replaced_dir(out) as build:
        hf.save_hf(module, build, tokenizer=tok.path if tok else None, dtype=dtype, max_shard_bytes=max_shard_bytes,
                   progress=progress)
    return module, label, out


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    from cream_jax.platform import use_local_backends

    use_local_backends()  # before jax starts its backends
    parser = cli.ArgumentParser("cream_jax.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="a transformers Llama directory -> a params checkpoint")
    a.add_argument("--hf", required=True, help="directory with config.json and safetensors")
    a.add_argument("--out", required=True, help="new checkpoint directory")
    a.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage dtype of the parameters (default float32 master weights)")
    b = sub.add_parser("orbax-to-hf", help="a params checkpoint -> a transformers directory")
    b.add_argument("--ckpt", required=True, help="a params checkpoint (from hf-to-orbax) or a train run directory")
    b.add_argument("--step", type=int, default=None, help="train run: the step to export (default: the newest)")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--tokenizer", default=None,
                   help="the tokenizer to ship: a tokenizer.model, a directory holding one, or a registry name "
                        "(llama2-32k, botchan-bpe-1000); '' for none (default: the run's own)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype in the export (default: the parameters' dtype)")
    b.add_argument("--max_shard_size", default="5GB", help="shard the safetensors above this size (e.g. 2GB)")
    args = parser.parse_args(argv)

    try:
        if args.command == "hf-to-orbax":
            checkpoint.check_new(args.out)
            module = hf.load_hf(args.hf, param_dtype=args.param_dtype)
            out = checkpoint.save_params(module, args.out)
        else:
            if load.source_kind(args.ckpt) == "hf":
                raise checkpoint.CheckpointError(
                    f"{args.ckpt} has no {checkpoint.CONFIG_FILE}: it is a Hugging Face directory already; "
                    f"orbax-to-hf exports a params checkpoint or a train run.")
            module, label, out = export_hf(args.ckpt, args.out, step=args.step, tokenizer=args.tokenizer,
                                           dtype=args.dtype, max_shard_bytes=_parse_size(args.max_shard_size),
                                           overwrite=args.overwrite)
            print(f"exported {label}")
    except (CreamError, FileNotFoundError, ValueError) as e:
        return cli.report(e)
    cfg = module.config
    print(f"wrote {out} ({cfg.num_params() / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, "
          f"rope={cfg.rope.type}, eabf={'on' if cfg.eabf.enabled else 'off'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
