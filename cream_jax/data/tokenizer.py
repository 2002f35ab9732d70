"""SentencePiece tokenizers as Llama uses them, and a command that trains a small one.

    python -m cream_jax.data.tokenizer train --input a.txt,b.jsonl --vocab_size 2000 --out DIR
    python -m cream_jax.data.tokenizer encode --model DIR/tokenizer.model "some text"

Documents are encoded as Llama-2 does: BOS, the pieces, EOS. Chat (SFT) data
uses Llama-2's chat format, `<s>[INST] user [/INST] answer </s>` per turn
(a system message goes inside the first [INST] between <<SYS>> markers), and
the loss weights are 1 exactly on the answer tokens and their EOS.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cream_jax import cli
from cream_jax.errors import CreamError


class TokenizerError(CreamError, ValueError):
    """A tokenizer that cannot be used as asked."""


class Tokenizer:
    """A SentencePiece model with Llama's conventions (BOS = 1, EOS = 2 in Llama's own model)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise TokenizerError(f"no SentencePiece model at {path} (give a tokenizer.model file or a directory "
                                 f"holding one, or a name from `python -m cream_jax.data.corpora list`).")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path} is not a SentencePiece model: {e}") from e
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{path} defines no BOS/EOS pieces (bos_id={self.bos_id}, eos_id={self.eos_id}); "
                                 f"Llama needs both. Train one with this module's `train` command.")
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    def encode(self, texts: list[str], bos: bool = True, eos: bool = True, threads: int = 0) -> list[list[int]]:
        ids = self.sp.Encode(texts, num_threads=threads or os.cpu_count() or 1)
        return [([self.bos_id] if bos else []) + x + ([self.eos_id] if eos else []) for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.Decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def encode_chat(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, loss weights) of a conversation [{"role": "system"|"user"|"assistant", "content"}, ...].

        Turns must alternate user/assistant after an optional system message. Weight 1 on each answer and
        its EOS, 0 on everything the model is given."""
        if not messages:
            raise TokenizerError("an empty conversation")
        roles = [m.get("role") for m in messages]
        system = None
        if roles[0] == "system":
            system, messages, roles = messages[0]["content"], messages[1:], roles[1:]
        if not roles or roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
            raise TokenizerError(f"a conversation must alternate user/assistant (after an optional system "
                                 f"message); got roles {roles}")
        ids, weights = [], []
        for i in range(0, len(messages), 2):
            user = messages[i]["content"].strip()
            if i == 0 and system:
                user = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user}"
            prompt = [self.bos_id] + self.sp.Encode(f"[INST] {user} [/INST]")
            ids += prompt
            weights += [0] * len(prompt)
            if i + 1 < len(messages):
                answer = self.sp.Encode(" " + messages[i + 1]["content"].strip()) + [self.eos_id]
                ids += answer
                weights += [1] * len(answer)
        return np.asarray(ids, np.int32), np.asarray(weights, np.uint8)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    if tokenizer.vocab_size != model_vocab_size:
        raise TokenizerError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's vocab_size is "
            f"{model_vocab_size}; use the tokenizer the model was trained with, or set "
            f"--config.model.vocab_size={tokenizer.vocab_size} for a model trained from scratch.")


def resolve(spec: str, cache_dir: str | None = None) -> Tokenizer:
    """A tokenizer from a path (file or directory) or the name of a registry tokenizer in `corpora`."""
    from cream_jax.data import corpora

    if not spec:
        known = ", ".join(n for n, a in corpora.ASSETS.items() if a.kind == "tokenizer")
        raise TokenizerError("no tokenizer given (and model.init_from holds no tokenizer.model): set data.tokenizer "
                             f"to a tokenizer.model path, a directory holding one, or one of {known}")
    if spec in corpora.ASSETS and not Path(spec).exists():
        if corpora.ASSETS[spec].kind != "tokenizer":
            raise TokenizerError(f"{spec!r} is a corpus, not a tokenizer")
        return Tokenizer(corpora.fetch(spec, cache_dir))
    return Tokenizer(spec)


def _sentences(paths: list[Path], text_key: str) -> Iterator[str]:
    from cream_jax.data.sources import read_documents

    for doc in read_documents(paths, text_key=text_key):
        for line in doc.splitlines():
            if line.strip():
                yield line


def train(paths: list[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike, *, text_key: str = "text",
          model_type: str = "bpe", max_sentences: int = 2_000_000) -> Path:
    """Train a Llama-style SentencePiece model (BPE, byte fallback, digits split and always
    pieces, <unk>=0 <s>=1 </s>=2) on
    .txt/.jsonl files; writes out_dir/tokenizer.model. Deterministic for the same input."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: byte fallback alone takes 256 pieces + 3 "
                             f"specials; use at least 300 (e.g. 512, 1000, 2000).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tokenizer.model"
    spm.SentencePieceTrainer.Train(
        sentence_iterator=_sentences([Path(p) for p in paths], text_key), model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size, model_type=model_type, byte_fallback=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995, required_chars="0123456789",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
    return model


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser("cream_jax.data.tokenizer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a small Llama-style SentencePiece model")
    t.add_argument("--input", required=True, help="comma-separated .txt/.jsonl files, or a corpus name from corpora")
    t.add_argument("--vocab_size", type=int, required=True)
    t.add_argument("--out", required=True, help="directory for tokenizer.model")
    t.add_argument("--text_key", default="text")
    e = sub.add_parser("encode", help="print the pieces and ids of a text")
    e.add_argument("--model", required=True)
    e.add_argument("text")
    a = p.parse_args(argv)
    try:
        if a.command == "train":
            from cream_jax.data import sources

            paths = sources.resolve_files(a.input)
            model = train(paths, a.vocab_size, a.out, text_key=a.text_key)
            print(f"wrote {model} ({Tokenizer(model).vocab_size} pieces)")
        else:
            tok = resolve(a.model)
            ids = tok.encode([a.text])[0]
            print(ids)
            print([tok.sp.IdToPiece(i) for i in ids])
    except (CreamError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
