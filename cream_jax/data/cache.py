"""Tokenize once: each host's share of the documents into a memory-mapped token file.

Host h of H takes documents h, h + H, h + 2H, ... of the source, so a host
reads and tokenizes only its share. The cache directory holds `tokens.bin`
(uint16, or uint32 past 65535 pieces), `starts.npy` (document d is
tokens[starts[d]:starts[d + 1]]), `weights.bin` for chat data (uint8 loss
weights) and `meta.json`. It is keyed by the source, the tokenizer's sha256,
the format and the host split, and written atomically: an interrupted build
leaves no cache behind, and the next run rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cream_jax import files
from cream_jax.data.sources import DataError

if TYPE_CHECKING:
    from cream_jax.data.tokenizer import Tokenizer

CACHE_VERSION = 1
BATCH_DOCS = 256


@dataclasses.dataclass
class TokenCache:
    path: Path
    tokens: np.ndarray  # [total] uint16/uint32, memory-mapped
    starts: np.ndarray  # [docs + 1] int64
    weights: np.ndarray | None  # [total] uint8 loss weights (chat), else None: every token is a target
    meta: dict

    @property
    def num_docs(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])


def key(source_id: str, tokenizer_sha256: str, chat: bool, host: int, num_hosts: int) -> str:
    digest = hashlib.sha256(f"{CACHE_VERSION}|{source_id}|{tokenizer_sha256}|{chat}".encode()).hexdigest()[:16]
    return f"{digest}-host{host}of{num_hosts}"


def load(path: Path) -> TokenCache:
    meta = json.loads((path / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r") if meta["num_tokens"] else np.zeros(0, dtype)
    weights = None
    if meta["chat"] and meta["num_tokens"]:
        weights = np.memmap(path / "weights.bin", dtype=np.uint8, mode="r")
    return TokenCache(path, tokens, np.load(path / "starts.npy"), weights, meta)


def build(documents: Sequence[str], tokenizer: Tokenizer, root: str | Path, *, source_id: str, chat: bool = False,
          host: int = 0, num_hosts: int = 1, progress: bool = True) -> TokenCache:
    """This host's share of `documents` (a random-access sequence of strings) tokenized, or the existing cache."""
    from tqdm.auto import tqdm

    root = Path(root)
    final = root / key(source_id, tokenizer.sha256, chat, host, num_hosts)
    if (final / "meta.json").exists():
        return load(final)
    total_docs = len(documents)
    if total_docs == 0:
        raise DataError(f"the corpus {source_id} has no documents")
    if total_docs < num_hosts:
        raise DataError(f"the corpus {source_id} has {total_docs} documents but there are {num_hosts} hosts; each "
                        f"host needs at least one (use a larger corpus, or split the documents into more files).")
    mine = range(host, total_docs, num_hosts)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    with files.build_dir(final, "meta.json") as tmp:
        starts = [0]
        with open(tmp / "tokens.bin", "wb") as tok_f, open(tmp / "weights.bin", "wb") as w_f:
            bar = tqdm(total=len(mine), desc=f"tokenizing (host {host}/{num_hosts})", unit="doc", disable=not progress)
            for i in range(0, len(mine), BATCH_DOCS):
                texts = [documents[j] for j in mine[i:i + BATCH_DOCS]]
                if chat:
                    pairs = [tokenizer.encode_chat(json.loads(t)) for t in texts]
                    ids_list = [p[0] for p in pairs]
                    for _, w in pairs:
                        w_f.write(w.tobytes())
                else:
                    ids_list = tokenizer.encode(texts)
                for ids in ids_list:
                    tok_f.write(np.asarray(ids, dtype).tobytes())
                    starts.append(starts[-1] + len(ids))
                bar.update(len(texts))
            bar.close()
        if not chat:
            (tmp / "weights.bin").unlink()
        np.save(tmp / "starts.npy", np.asarray(starts, np.int64))
        meta = {"version": CACHE_VERSION, "source": source_id, "tokenizer": str(tokenizer.path),
                "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "chat": chat,
                "host": host, "num_hosts": num_hosts, "num_docs": len(mine), "num_tokens": starts[-1],
                "dtype": np.dtype(dtype).name}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return load(final)
