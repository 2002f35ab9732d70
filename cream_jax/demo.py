"""`make demo` (for now): the Hugging Face bridge end to end on a tiny random Llama.

Builds a tiny model extended 4x with linear position interpolation, and one
with EABF; feeds CREAM-like jumping position ids; exports both to Hugging Face
format; reloads them with transformers (EABF through trust_remote_code); and
prints how far the logits differ. The full CREAM demo (real corpus,
pretraining, extension, passkey) replaces this once the train, data and eval
pieces land.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import cream_jax


def _positions(rng: np.random.Generator, window: int, target: int) -> np.ndarray:
    third = window // 3
    middle = window - 2 * third
    start = rng.integers(third, target - third - middle)
    return np.concatenate([np.arange(third), np.arange(start, start + middle), np.arange(target - third, target)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cream_jax.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/demo", help="where the exports and results.json go")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    window, target = 96, 384
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (2, window))
    positions = np.stack([_positions(rng, window, target) for _ in range(2)])
    variants = {  # export directory -> config
        "linear_x4": cream_jax.preset("debug", max_position_embeddings=target,
                                      rope={"type": "linear", "factor": 4.0}),
        "linear_x4_blockwise": cream_jax.preset("debug", max_position_embeddings=target,
                                                 rope={"type": "linear", "factor": 4.0},
                                                 attention="blockwise", attention_block_size=32),
        "eabf_theta5e5": cream_jax.preset("debug", max_position_embeddings=target, rope={"theta": 500000.0},
                                             eabf={"enabled": True, "base_length": window, "skip_layers": (0,)}),
    }
    rows = []
    print(f"tiny Llama, window {window}, CREAM-like position ids up to {positions.max()}\n")
    print(f"{'variant':22s} {'loaded by transformers as':28s} {'max |dlogit| / max |logit|':>28s}")
    for name, cfg in variants.items():
        model = cream_jax.init(cfg, seed=0)
        t0 = time.perf_counter()
        export = out / name
        cream_jax.save_hf(model, export, progress=False)
        hf = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=cfg.eabf.enabled,
                                                               attn_implementation="eager").eval()
        with torch.no_grad():
            ref = hf(torch.from_numpy(tokens), position_ids=torch.from_numpy(positions)).logits.numpy()
        ours = np.asarray(model(jnp.asarray(tokens), position_ids=jnp.asarray(positions)))
        err = float(np.abs(ours - ref).max() / np.abs(ref).max())
        rows.append({"variant": name, "relative_logit_error": err, "export": str(export),
                     "seconds": time.perf_counter() - t0})
        print(f"{name:22s} {type(hf).__name__:28s} {err:28.2e}")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nexports and results.json in {out}/")
    return 0 if all(r["relative_logit_error"] < 1e-4 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
